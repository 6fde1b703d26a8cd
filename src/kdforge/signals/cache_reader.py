"""Reading the teacher cache: examples' outputs by dataset index, a few shards open at a time.

The layout is :mod:`kdforge.signals.cache_store`'s. A reader opens a shard only when an
example in it is asked for, verifies its checksum the first time, reads only the rows
asked for (safetensors slices of a memory map) and keeps a few shards open, so the memory
it holds does not grow with the cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kdforge.errors import CacheError
from kdforge.signals.cache_store import (
    FieldSpec,
    decode_topk,
    file_sha256,
    fingerprint_differences,
    read_manifest,
)

#: a reader keeps this many shards open (each a memory map of one file)
OPEN_SHARDS = 4


class CacheReader:
    """Reads examples' outputs by dataset index, a few shards open at a time, checksums verified once."""

    def __init__(self, directory: Path, *, expected_fingerprint: dict[str, Any] | None = None, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.complete:
            raise CacheError(
                f"{self.directory}: incomplete ({self.manifest.cached_examples} of {self.manifest.examples} examples);"
                " run `kdforge cache` again to finish it"
            )
        if expected_fingerprint is not None:
            differences = fingerprint_differences(expected_fingerprint, self.manifest.fingerprint)
            if differences:
                raise CacheError(
                    f"{self.directory}: made for another run: {'; '.join(differences)};"
                    " write a cache for this recipe with `kdforge cache`"
                )
        self.verify = verify
        self._verified: set[int] = set()
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._firsts = [s.first for s in self.manifest.shards]

    def __len__(self) -> int:
        return self.manifest.examples

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return self.manifest.fields

    def _shard_of(self, index: int) -> int:
        if not 0 <= index < self.manifest.examples:
            raise CacheError(f"{self.directory}: example {index} is outside the cache's {self.manifest.examples}")
        lo, hi = 0, len(self._firsts) - 1
        while lo < hi:  # the last shard whose first example is <= index
            mid = (lo + hi + 1) // 2
            if self._firsts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _handle(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        info = self.manifest.shards[shard]
        path = self.directory / info.file
        if not path.is_file():
            raise CacheError(f"{path}: missing shard; run `kdforge cache` again to rewrite it")
        if self.verify and shard not in self._verified:
            if path.stat().st_size != info.bytes:
                raise CacheError(
                    f"{path}: truncated ({path.stat().st_size} of {info.bytes} bytes); run `kdforge cache` again"
                )
            if file_sha256(path) != info.sha256:
                raise CacheError(f"{path}: checksum mismatch (corrupt shard); run `kdforge cache` again")
            self._verified.add(shard)
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CacheError(f"{path}: unreadable shard ({exc}); run `kdforge cache` again") from None
        self._open[shard] = handle
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return handle

    def example(self, index: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """One example's outputs: top-k fields as ``(ids int64, logprobs float32)``, dense as ``(values,)``."""
        shard = self._shard_of(index)
        handle = self._handle(shard)
        local = index - self.manifest.shards[shard].first
        bounds = handle.get_slice("offsets")[local : local + 2]
        a, b = int(bounds[0]), int(bounds[1])
        out: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, spec in self.manifest.fields.items():
            if spec.kind == "topk":
                ids = handle.get_slice(f"{name}.ids")[a:b].long()
                tail = handle.get_slice(f"{name}.tail")[a:b]
                logprobs = decode_topk(handle.get_slice(f"{name}.logprobs")[a:b], tail, spec.dtype)
                out[name] = (ids, logprobs)
            else:
                out[name] = (handle.get_slice(name)[a:b].float(),)
        return out


def bytes_per_position(directory: Path) -> float:
    """Shard bytes (ids, values, tail and offsets included) per cached position."""
    manifest = read_manifest(directory)
    return sum(s.bytes for s in manifest.shards) / max(manifest.positions, 1)


def pad_topk(rows: list[tuple[torch.Tensor, torch.Tensor]], length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example top-k rows ``(ids [P_i, k], log_probs [P_i, k])`` as ``[B, length, k]``, right-padded.

    Padded positions get a uniform top-k (finite values a masked loss never counts).
    """
    ids = torch.arange(k).expand(len(rows), length, k).clone()
    values = torch.full((len(rows), length, k), -math.log(k))
    for i, (row_ids, row_values) in enumerate(rows):
        ids[i, : row_ids.shape[0]] = row_ids[:length]
        values[i, : row_values.shape[0]] = row_values[:length]
    return ids, values

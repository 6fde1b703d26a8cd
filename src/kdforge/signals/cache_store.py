"""The teacher cache on disk: a manifest and checksummed safetensors shards.

Layout of a cache directory::

    manifest.json            format version, fingerprint, fields, shards (see Manifest)
    shard-00000.safetensors  examples [0, n) of the dataset, in dataset order
    shard-00001.safetensors  ...

Written by N processes (``accelerate launch --num_processes N -m kdforge cache``), each
process ``r`` writes its contiguous share of the examples as ``shard-rRRR-IIIII.safetensors``
and records them in its own partial manifest, ``manifest-rRRR-of-NNN.json``, while
``manifest.json`` (written first by the main process) holds the fingerprint and no shards.
When every process is done the main process merges the partial manifests into
``manifest.json`` (shards sorted by their first example) and removes them; readers see
one manifest whatever wrote it. A rerun with the same N resumes each process after its
last complete shard; a rerun with another N (or on one process) keeps nothing of the
unfinished run's shards and writes the cache from the start, so shares never overlap.

Each shard holds, for every cached field, the outputs of its examples with their
positions concatenated (``offsets[i]:offsets[i+1]`` are example i's positions: one
for a classifier's logits or an embedding, one per token for a language model):

* a **top-k** field ``F`` (logits over a vocabulary): ``F.ids`` ``[P, k]`` (uint16 when
  the vocabulary fits, else int32), ``F.logprobs`` ``[P, k]`` (float16, bfloat16,
  float32, or ``q8``: uint8 codes of -logprob in steps of 1/16 nat), and ``F.tail``
  ``[P]`` float32, the teacher's probability mass outside its top-k;
* a **dense** field ``F`` (embeddings, ranking scores, class logits): ``F`` ``[P, D]``
  in the chosen float dtype, uncompressed.

Writers write a shard to a temporary name, rename it, then rewrite the manifest
(atomically); a writer that is killed resumes after its last complete shard. Readers
(:mod:`kdforge.signals.cache_reader`) open a shard only when an example in it is asked
for, verify its checksum the first time, read only the rows asked for (safetensors slices of a memory map) and keep a
few shards open, so the memory they hold does not grow with the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from kdforge import faults
from kdforge.errors import CacheError
from kdforge.fsutil import atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: a process's partial manifest while N processes write one cache
SHARE_MANIFEST = re.compile(r"manifest-r(\d+)-of-(\d+)\.json")
#: a shard of one process (``shard-00000``) or of process r of several (``shard-r001-00000``), or its temporary
SHARD_FILE = re.compile(r"\.?shard-(r\d+-)?\d+\.safetensors(\.tmp)?")
CacheDtype = Literal["float32", "float16", "bfloat16", "q8"]
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: q8 codes: -logprob in steps of 1/16 nat, so 255 is -15.9 (probability 1.2e-7); below is clamped
Q8_STEP = 1.0 / 16.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldSpec(_Strict):
    kind: Literal["topk", "dense"]
    #: one row per example (a classifier's logits, an embedding) or per token (a language model)
    layout: Literal["example", "token"] = "example"
    dtype: CacheDtype
    k: int | None = None
    vocab: int | None = None
    width: int | None = None


class ShardInfo(_Strict):
    file: str
    first: int = Field(ge=0, description="index of the shard's first example")
    count: int = Field(ge=1)
    positions: int = Field(ge=0)
    sha256: str
    bytes: int


class Manifest(_Strict):
    format_version: int
    fingerprint: dict[str, Any]
    fields: dict[str, FieldSpec]
    examples: int = Field(ge=0, description="examples the cache will hold when complete")
    shards: list[ShardInfo] = []
    complete: bool = False
    #: sum over cached positions of the teacher's top-k mass, per top-k field (for the report)
    kept_mass_sum: dict[str, float] = {}

    @property
    def cached_examples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.shards)

    def kept_mass(self) -> dict[str, float]:
        """Mean top-k mass per position of each top-k field (1.0 = nothing lost)."""
        return {name: total / max(self.positions, 1) for name, total in self.kept_mass_sum.items()}


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """The fingerprint entries that differ, as ``name (cache X, run Y)`` phrases."""
    out = []
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            out.append(f"{key} (cache {_short(found.get(key))}, this run {_short(expected.get(key))})")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "…"


def share_manifest_name(rank: int, world: int) -> str:
    """The partial manifest of process ``rank`` of ``world`` (see the module doc)."""
    return f"manifest-r{rank:03d}-of-{world:03d}.json"


def read_manifest(directory: Path, name: str = MANIFEST) -> Manifest:
    path = Path(directory) / name
    if not path.is_file():
        raise CacheError(f"{directory}: no {name}; write the cache with `kdforge cache RECIPE` first")
    try:
        manifest = Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, ValueError) as exc:
        raise CacheError(f"{path}: not a kdforge cache manifest ({str(exc).splitlines()[0]})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format {manifest.format_version}, this kdforge reads {FORMAT_VERSION}; write it again"
        )
    return manifest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- encoding


def _ids_dtype(vocab: int) -> torch.dtype:
    return torch.uint16 if vocab <= 1 << 16 else torch.int32


def encode_logprobs(logprobs: torch.Tensor, dtype: CacheDtype) -> torch.Tensor:
    if dtype == "q8":
        codes = (-logprobs.float() / Q8_STEP).round().clamp(0, 255)
        return codes.nan_to_num(255).to(torch.uint8)
    return logprobs.to(FLOAT_DTYPES[dtype])


def decode_topk(logprobs: torch.Tensor, tail: torch.Tensor, dtype: CacheDtype) -> torch.Tensor:
    """float32 log-probs whose top-k mass is 1 - tail: rounding in storage never changes the kept mass."""
    values = -logprobs.float() * Q8_STEP if dtype == "q8" else logprobs.float()
    kept = (1.0 - tail.float()).clamp_min(1e-30).log().unsqueeze(-1)
    return values - torch.logsumexp(values, dim=-1, keepdim=True) + kept


def topk_of(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids, their log-probs at ``temperature`` and the tail mass, per position."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # no copy at T = 1
    log_p = torch.log_softmax(scaled, dim=-1)
    k = min(k, log_p.shape[-1])
    values, ids = log_p.topk(k, dim=-1)
    tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    return ids, values, tail


# ------------------------------------------------------------------------ writing


@dataclass
class ExampleOutputs:
    """One example's teacher outputs for the cache: per field, ``[P, ...]`` rows."""

    rows: dict[str, tuple[torch.Tensor, ...]]  # topk: (ids, logprobs, tail); dense: (values,)


class CacheWriter:
    """Appends examples in dataset order and writes a shard every ``shard_examples`` of them.

    ``CacheWriter.open`` starts a cache or resumes one with the same fingerprint
    (``start`` tells from which example); a cache with another fingerprint is refused
    unless ``overwrite``, and a complete one is left alone. ``CacheWriter.open_share``
    writes one process's share of a cache that several processes write.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        shard_examples: int,
        *,
        manifest_name: str = MANIFEST,
        shard_prefix: str = "shard-",
        first: int = 0,
    ):
        self.directory = Path(directory)
        #: for a process's share: its partial manifest, whose ``examples`` are the share's
        self.manifest = manifest
        self.shard_examples = shard_examples
        self.manifest_name = manifest_name
        self.shard_prefix = shard_prefix
        #: index of the first example this writer writes (the share's start)
        self.first = first
        self._pending: list[ExampleOutputs] = []

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        fingerprint: dict[str, Any],
        fields: dict[str, FieldSpec],
        examples: int,
        shard_examples: int = 1024,
        overwrite: bool = False,
    ) -> CacheWriter:
        directory = Path(directory)
        old = _this_runs_manifest(
            directory, fingerprint=fingerprint, fields=fields, examples=examples, overwrite=overwrite
        )
        # a run of several processes that did not finish leaves shares that one process does not continue
        remove_shares(directory, keep_world=None)
        if old is not None:
            writer = cls(directory, old, shard_examples)
            writer._drop_bad_shards()
            return writer
        directory.mkdir(parents=True, exist_ok=True)
        fresh = Manifest(format_version=FORMAT_VERSION, fingerprint=fingerprint, fields=fields, examples=examples)
        writer = cls(directory, fresh, shard_examples)
        writer._save_manifest()
        return writer

    @classmethod
    def open_share(
        cls,
        directory: Path,
        *,
        fingerprint: dict[str, Any],
        fields: dict[str, FieldSpec],
        rank: int,
        world: int,
        bounds: tuple[int, int],
        shard_examples: int = 1024,
    ) -> CacheWriter:
        """The writer of process ``rank``'s share ``bounds = [start, stop)``, resumed after the last
        complete shard of its partial manifest.

        The main process must have run :func:`prepare_shares` first (it checks the
        fingerprint against ``manifest.json`` and removes other runs' shares); a partial
        manifest that does not match this share anyway is started over.
        """
        directory = Path(directory)
        start, stop = bounds
        name = share_manifest_name(rank, world)
        manifest = Manifest(
            format_version=FORMAT_VERSION, fingerprint=fingerprint, fields=fields, examples=stop - start
        )
        old = _share_manifest(directory, name)
        resumed = (
            old is not None
            and (old.fingerprint, old.fields, old.examples) == (fingerprint, fields, stop - start)
            and all(s.first == start for s in old.shards[:1])
        )
        writer = cls(
            directory,
            old if resumed and old is not None else manifest,
            shard_examples,
            manifest_name=name,
            shard_prefix=f"shard-r{rank:03d}-",
            first=start,
        )
        if resumed:
            writer._drop_bad_shards()
        writer.manifest.complete = writer.manifest.cached_examples >= writer.manifest.examples  # an empty share too
        writer._save_manifest()
        return writer

    @property
    def start(self) -> int:
        """Index of the next example to write (examples before it are in complete shards)."""
        return self.first + self.manifest.cached_examples

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def _drop_bad_shards(self) -> None:
        """Keep the longest prefix of listed shards that exist with their checksum; forget the rest."""
        good = []
        for shard in self.manifest.shards:
            path = self.directory / shard.file
            if not path.is_file() or path.stat().st_size != shard.bytes or file_sha256(path) != shard.sha256:
                break
            good.append(shard)
        if len(good) != len(self.manifest.shards):
            self.manifest.shards = good
            self.manifest.complete = False
            self._recount_kept_mass()
            self._save_manifest()

    def _recount_kept_mass(self) -> None:
        totals = {name: 0.0 for name, spec in self.manifest.fields.items() if spec.kind == "topk"}
        for shard in self.manifest.shards:
            with safe_open(str(self.directory / shard.file), framework="pt") as fh:
                for name in totals:
                    totals[name] += float((1.0 - fh.get_tensor(f"{name}.tail").double()).sum())
        self.manifest.kept_mass_sum = totals

    def add(self, example: ExampleOutputs) -> None:
        if self.manifest.complete:
            raise CacheError(f"{self.directory}: the cache is complete; nothing more can be added")
        self._pending.append(example)
        if len(self._pending) >= self.shard_examples:
            self.flush()

    def flush(self) -> None:
        """Write the pending examples as one shard (temporary name, then rename), then the manifest."""
        if not self._pending:
            return
        tensors: dict[str, torch.Tensor] = {}
        counts = None
        for name, spec in self.manifest.fields.items():
            parts = [ex.rows[name] for ex in self._pending]
            lengths = [p[0].shape[0] for p in parts]
            if counts is None:
                counts = lengths
            elif lengths != counts:
                raise ValueError(f"field {name} has {lengths} positions per example, another field {counts}")
            if spec.kind == "topk":
                assert spec.vocab is not None
                tensors[f"{name}.ids"] = torch.cat([p[0] for p in parts]).to(_ids_dtype(spec.vocab))
                tensors[f"{name}.logprobs"] = encode_logprobs(torch.cat([p[1] for p in parts]), spec.dtype)
                tail = torch.cat([p[2] for p in parts]).float()
                tensors[f"{name}.tail"] = tail
                self.manifest.kept_mass_sum[name] = self.manifest.kept_mass_sum.get(name, 0.0) + float(
                    (1.0 - tail.double()).sum()
                )
            else:
                tensors[name] = torch.cat([p[0] for p in parts]).to(FLOAT_DTYPES[spec.dtype])
        assert counts is not None
        offsets = torch.tensor([0, *counts]).cumsum(0)
        tensors["offsets"] = offsets
        index = len(self.manifest.shards)
        name = f"{self.shard_prefix}{index:05d}.safetensors"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        faults.point("cache_shard", index)  # the tests kill the writer here: a shard the manifest lacks
        self.manifest.shards.append(
            ShardInfo(
                file=name,
                first=self.start,
                count=len(self._pending),
                positions=int(offsets[-1]),
                sha256=file_sha256(final),
                bytes=final.stat().st_size,
            )
        )
        self._pending = []
        if self.manifest.cached_examples >= self.manifest.examples:
            self.manifest.complete = True
        self._save_manifest()

    def close(self) -> Manifest:
        """Write what is pending; the cache is complete once every example is in."""
        self.flush()
        return self.manifest

    def _save_manifest(self) -> None:
        atomic_write_text(self.directory / self.manifest_name, self.manifest.model_dump_json(indent=1))


# ------------------------------------------------------- several processes, one cache


def remove_shares(directory: Path, keep_world: int | None) -> None:
    """Remove the partial manifests of runs with other than ``keep_world`` processes (None: all),
    and every shard that neither a kept partial manifest nor ``manifest.json`` lists (a removed
    share's, or one a killed process wrote but did not list: it would be written again anyway)."""
    directory = Path(directory)
    kept: set[str] = set()
    if (directory / MANIFEST).is_file():
        kept.update(s.file for s in read_manifest(directory).shards)
    for path in sorted(directory.glob("manifest-r*-of-*.json")):
        match = SHARE_MANIFEST.fullmatch(path.name)
        if match is None:
            continue
        if keep_world is not None and int(match.group(2)) == keep_world:
            try:
                kept.update(s.file for s in read_manifest(directory, path.name).shards)
                continue
            except CacheError:  # unreadable: its process starts its share over
                pass
        path.unlink(missing_ok=True)
    for path in directory.glob("*shard-*"):
        if SHARD_FILE.fullmatch(path.name) and path.name not in kept:
            path.unlink(missing_ok=True)


def prepare_shares(
    directory: Path,
    *,
    fingerprint: dict[str, Any],
    fields: dict[str, FieldSpec],
    examples: int,
    world: int,
    overwrite: bool = False,
) -> bool:
    """Run by the main process before ``world`` processes open their shares; True when the cache
    is complete already (nothing to write).

    Refuses a cache of another run as :meth:`CacheWriter.open` does. Otherwise
    ``manifest.json`` is left in progress with this run's fingerprint and no shards, and
    the shards of a single process or of a run with another number of processes are
    removed: their shares are not this run's, and resuming from them could overlap.
    """
    directory = Path(directory)
    old = _this_runs_manifest(directory, fingerprint=fingerprint, fields=fields, examples=examples, overwrite=overwrite)
    if old is not None and old.complete:
        remove_shares(directory, keep_world=None)  # partial manifests left by a merge killed at its end
        return True
    remove_shares(directory, keep_world=world if old is not None else None)
    for shard in old.shards if old is not None else []:
        (directory / shard.file).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    fresh = Manifest(format_version=FORMAT_VERSION, fingerprint=fingerprint, fields=fields, examples=examples)
    atomic_write_text(directory / MANIFEST, fresh.model_dump_json(indent=1))
    return False


def merge_shares(directory: Path, world: int) -> Manifest:
    """Run by the main process once all ``world`` processes have closed their shares: the one
    ``manifest.json`` (shards sorted by first example, kept mass summed, complete), then the
    partial manifests are removed. A share that is missing or unfinished is refused."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shards: list[ShardInfo] = []
    for rank in range(world):
        share = _share_manifest(directory, share_manifest_name(rank, world))
        if share is None or not share.complete or share.fingerprint != manifest.fingerprint:
            raise CacheError(
                f"{directory / share_manifest_name(rank, world)}: process {rank} did not finish its share;"
                " run the same kdforge cache command again"
            )
        shards.extend(share.shards)
        for name, total in share.kept_mass_sum.items():
            manifest.kept_mass_sum[name] = manifest.kept_mass_sum.get(name, 0.0) + total
    shards.sort(key=lambda s: s.first)
    expected = 0
    for shard in shards:  # a gap or an overlap would give readers the wrong examples
        if shard.first != expected:
            raise CacheError(f"{directory / shard.file}: starts at example {shard.first}, expected {expected};"
                             " write the cache again with --overwrite")  # fmt: skip
        expected += shard.count
    if expected != manifest.examples:
        raise CacheError(f"{directory}: the shares hold {expected} of {manifest.examples} examples;"
                         " write the cache again with --overwrite")  # fmt: skip
    manifest.shards, manifest.complete = shards, True
    atomic_write_text(directory / MANIFEST, manifest.model_dump_json(indent=1))
    remove_shares(directory, keep_world=None)  # the shards are listed in manifest.json now, not in a share
    return manifest


def _this_runs_manifest(
    directory: Path, *, fingerprint: dict[str, Any], fields: dict[str, FieldSpec], examples: int, overwrite: bool
) -> Manifest | None:
    """The manifest of this run's cache in ``directory`` (complete or not), or None for a new cache;
    a cache of another run is refused, or with ``overwrite`` its shards are removed."""
    if (directory / MANIFEST).is_file():
        old = read_manifest(directory)
        differences = fingerprint_differences(fingerprint, old.fingerprint)
        if old.fields != fields:
            differences.append("fields (k, dtype or outputs)")
        if old.examples != examples:
            differences.append(f"examples (cache {old.examples}, this run {examples})")
        if differences and not overwrite:
            raise CacheError(
                f"{directory}: holds a cache for another run: {'; '.join(differences)};"
                " choose another --output or pass --overwrite"
            )
        if not differences:
            return old
        for shard in old.shards:
            (directory / shard.file).unlink(missing_ok=True)
    elif directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CacheError(f"{directory}: exists and is not a kdforge cache; choose another --output")
    return None


def _share_manifest(directory: Path, name: str) -> Manifest | None:
    """A process's partial manifest, or None when there is none or it cannot be read (start over)."""
    if not (directory / name).is_file():
        return None
    try:
        return read_manifest(directory, name)
    except CacheError:
        return None

"""The cached teacher: outputs written once by ``kdforge cache`` and read back by example index.

Batches carry ``example_index`` (the runner adds it: the position of each example
in the training set), and the cache stores examples in that order. A field laid out
per ``example`` comes back as ``[B, ...]``; one laid out per ``token`` as
``[B, L, ...]`` with L the batch's output length (``position_mask``, else
``attention_mask`` or ``input_ids``), each example's positions first (right padding) and padded
positions filled with finite values that a masked loss never counts. Logits come
back as the top-k pair ``(ids, log_probs)`` that every logit divergence accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from kdforge.data.indexed import INDEX_KEY
from kdforge.errors import CacheError
from kdforge.outputs import ModelOutputs
from kdforge.signals.base import SIGNALS, Batch, BuiltSignal, SignalConfig, TeacherSignal
from kdforge.signals.cache_reader import CacheReader, bytes_per_position, pad_topk
from kdforge.signals.cache_store import ExampleOutputs, FieldSpec, topk_of
from kdforge.signals.fingerprint import cache_fingerprint, cache_settings

#: per-position masks a batch may carry, in order of preference: ``position_mask`` is the task's
#: own, aligned with its outputs (a causal LM's shifted logits have one position fewer than
#: its input); ``attention_mask`` is aligned with the input
POSITION_KEYS = ("position_mask", "attention_mask")


def sequence_length(batch: Batch) -> int | None:
    for key in (*POSITION_KEYS, "input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    return None


def example_positions(batch: Batch, size: int) -> list[int]:
    """How many positions each example of the batch has (right padding; every position without a mask)."""
    for key in POSITION_KEYS:
        mask = batch.get(key)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return [int(n) for n in mask.sum(-1).tolist()]
    length = sequence_length(batch)
    return [length or 1] * size


def split_outputs(
    outputs: ModelOutputs, batch: Batch, fields: dict[str, FieldSpec], temperature: float
) -> list[ExampleOutputs]:
    """A batch of teacher outputs as per-example cache rows (top-k at ``temperature`` for top-k fields)."""
    per_example: list[dict[str, tuple[torch.Tensor, ...]]] = []
    for name, spec in fields.items():
        value = outputs.get(name).detach().float().cpu()
        if spec.layout == "token":
            counts = example_positions(batch, value.shape[0])
            rows = [value[i, :n] for i, n in enumerate(counts)]
        else:
            rows = [value[i : i + 1] for i in range(value.shape[0])]
        if not per_example:
            per_example = [{} for _ in rows]
        for i, row in enumerate(rows):
            if spec.kind == "topk":
                assert spec.k is not None
                per_example[i][name] = topk_of(row, spec.k, temperature)
            else:
                per_example[i][name] = (row,)
    return [ExampleOutputs(rows) for rows in per_example]


class CacheTeacherConfig(SignalConfig):
    """Outputs written by ``kdforge cache RECIPE`` into ``path``, read back during training.

    ``model`` is the teacher that writes the cache; a run that names it also checks
    that the cache came from those weights and reports the teacher's own results.
    Top-k log-probs are stored at ``temperature``: every teacher term of the objective
    must use that temperature.
    """

    signal: Literal["cache"]
    path: str = Field(description="the cache directory")
    model: str | None = Field(None, description="the teacher that writes (wrote) the cache")
    k: int = Field(64, ge=1, description="top-k tokens kept per position")
    dtype: Literal["float32", "float16", "bfloat16", "q8"] = Field(
        "q8", description="storage of log-probs: q8 is 1/16-nat steps, as faithful as float16 at 3/4 of its size"
    )
    temperature: float = Field(1.0, gt=0)
    device: str | None = Field(None, description="where the teacher runs while writing")
    trust_remote_code: bool = False

    def label(self) -> str:
        return f"{self.model or 'teacher'} (cache {self.path})"

    def stored_temperature(self) -> float | None:
        return self.temperature


@SIGNALS.register("cache")
class CachedTeacher(TeacherSignal):
    config = CacheTeacherConfig

    def __init__(self, reader: CacheReader):
        self.reader = reader

    @classmethod
    def from_config(
        cls, task, cfg: CacheTeacherConfig, teacher_fields: frozenset[str], where: str = "teacher"
    ) -> BuiltSignal:
        settings = cache_settings(k=cfg.k, dtype=cfg.dtype, temperature=cfg.temperature, fields=sorted(teacher_fields))
        expected = cache_fingerprint(task, settings, teacher_ref=cfg.model, field=f"{where}.model")
        reader = CacheReader(Path(cfg.path), expected_fingerprint=expected)
        model = task.load_teacher(cfg.model, f"{where}.model") if cfg.model else None
        manifest = reader.manifest
        info = {
            "signal": "cache",
            "path": cfg.path,
            "model": cfg.model,
            "k": cfg.k,
            "dtype": cfg.dtype,
            "temperature": cfg.temperature,
            "examples": manifest.examples,
            "positions": manifest.positions,
            "bytes_per_position": bytes_per_position(Path(cfg.path)),
            "kept_mass": manifest.kept_mass(),
            "stored": {
                name: f"top-{spec.k}" if spec.kind == "topk" else "dense" for name, spec in manifest.fields.items()
            },
        }
        return BuiltSignal(cls(reader), model, cfg.model, info)

    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        index = batch.get(INDEX_KEY)
        if index is None:
            raise CacheError(f"a cached teacher needs {INDEX_KEY!r} in each batch (kdforge's runner adds it)")
        missing = sorted(set(fields) - set(self.reader.fields))
        if missing:
            raise CacheError(
                f"{self.reader.directory}: holds {', '.join(sorted(self.reader.fields))}, not {', '.join(missing)};"
                " write the cache again for this objective"
            )
        examples = [self.reader.example(int(i)) for i in index.tolist()]
        device = index.device
        out = {}
        for name in fields:
            spec = self.reader.fields[name]
            parts = [ex[name] for ex in examples]
            out[name] = self._assemble(spec, parts, batch, name)
            out[name] = tuple(t.to(device) for t in out[name]) if spec.kind == "topk" else out[name].to(device)
        return ModelOutputs(**out)

    def _assemble(self, spec: FieldSpec, parts: list[tuple[torch.Tensor, ...]], batch: Batch, name: str):
        if spec.layout == "example":
            stacked = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
            return tuple(stacked) if spec.kind == "topk" else stacked[0]
        length = sequence_length(batch) or max(p[0].shape[0] for p in parts)
        longest = max(p[0].shape[0] for p in parts)
        if longest > length:
            raise CacheError(
                f"{self.reader.directory}: {name} has {longest} positions for an example but the batch has {length};"
                " the cache was written with another sequence length"
            )
        if spec.kind == "topk":
            return pad_topk(parts, length, parts[0][0].shape[-1])
        width = parts[0][0].shape[-1]
        dense = torch.zeros(len(parts), length, width)
        for i, (row,) in enumerate(parts):
            dense[i, : row.shape[0]] = row
        return dense

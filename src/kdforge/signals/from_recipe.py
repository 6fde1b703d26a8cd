"""Build the teacher signal a recipe's ``teacher`` section describes, for a task.

Kept apart from the signals themselves so that they stay task-agnostic: only this
module calls the task (to load a teacher model and get its adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.distributed import process_gpu
from kdforge.recipe import (
    CacheTeacherConfig,
    EnsembleTeacherConfig,
    OnlineTeacherConfig,
    ServedTeacherConfig,
)
from kdforge.signals.base import TeacherSignal
from kdforge.signals.cache_run import cache_fingerprint, cache_settings
from kdforge.signals.cache_store import CacheReader, bytes_per_position
from kdforge.signals.cached import CachedTeacher
from kdforge.signals.ensemble import EnsembleTeacher
from kdforge.signals.online import OnlineTeacher
from kdforge.signals.served import CompletionsClient, ServedTeacher


@dataclass
class BuiltSignal:
    signal: TeacherSignal
    #: the teacher model to evaluate for the report, when there is exactly one
    model: nn.Module | None = None
    model_ref: str | None = None
    #: what the report says about the signal (kind, cache statistics)
    info: dict[str, Any] = field(default_factory=dict)


def build_signal(task, cfg, teacher_fields: frozenset[str], where: str = "teacher") -> BuiltSignal:
    if isinstance(cfg, OnlineTeacherConfig):
        model = task.load_teacher(cfg.model, f"{where}.model")
        signal = OnlineTeacher(model, task.adapter, device=cfg.device or process_gpu(), dtype=cfg.dtype)
        return BuiltSignal(signal, model, cfg.model, {"signal": "online", "model": cfg.model})
    if isinstance(cfg, CacheTeacherConfig):
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
        return BuiltSignal(CachedTeacher(reader), model, cfg.model, info)
    if isinstance(cfg, ServedTeacherConfig):
        client = CompletionsClient(
            cfg.url,
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            timeout=cfg.timeout,
            retries=cfg.retries,
            field=f"{where}.url",
        )
        return BuiltSignal(ServedTeacher(client, k=cfg.k), info={"signal": "served", "url": cfg.url, "k": cfg.k})
    if isinstance(cfg, EnsembleTeacherConfig):
        members = [
            build_signal(task, member, teacher_fields, f"{where}.members[{i}]") for i, member in enumerate(cfg.members)
        ]
        ensemble = EnsembleTeacher([m.signal for m in members], cfg.weights)
        info = {"signal": "ensemble", "weights": ensemble.weights, "members": [m.info for m in members]}
        return BuiltSignal(ensemble, info=info)
    raise TypeError(f"unknown teacher configuration {type(cfg).__name__}")

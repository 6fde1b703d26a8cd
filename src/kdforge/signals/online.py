"""The online teacher: a local model run on each batch, in eval mode, without gradients."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdforge.distributed import process_gpu
from kdforge.outputs import HEAD_LOGITS, ModelOutputs
from kdforge.signals.base import SIGNALS, Adapter, Batch, BuiltSignal, SignalConfig, TeacherSignal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _to(value, device: torch.device, dtype: torch.dtype | None = None):
    """Move tensors to ``device``; cast floating ones to ``dtype`` (ids and masks keep theirs)."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


class OnlineTeacherConfig(SignalConfig):
    """A local model run on each batch."""

    signal: Literal["online"] = "online"
    model: str = Field(description="local folder, hub id, or package:NAME")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    trust_remote_code: bool = False

    def label(self) -> str:
        return self.model


@SIGNALS.register("online")
class OnlineTeacher(TeacherSignal):
    """Runs ``model`` through ``adapter``; optionally on its own device and dtype.

    Outputs come back on the batch's device so losses never see mixed devices.
    """

    config = OnlineTeacherConfig

    @classmethod
    def from_config(
        cls, task, cfg: OnlineTeacherConfig, teacher_fields: frozenset[str], where: str = "teacher"
    ) -> BuiltSignal:
        model = task.load_teacher(cfg.model, f"{where}.model")
        signal = cls(model, task.adapter, device=cfg.device or process_gpu(), dtype=cfg.dtype)
        return BuiltSignal(signal, model, cfg.model, {"signal": "online", "model": cfg.model})

    def __init__(self, model: nn.Module, adapter: Adapter, *, device: str | None = None, dtype: str | None = None):
        self.device = torch.device(device) if device else None
        self.dtype = DTYPES[dtype] if dtype else None
        self.model = model.eval()
        if self.dtype:
            self.model = self.model.to(self.dtype)
        if self.device is not None:
            self.model = self.model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.adapter = adapter

    #: True once :meth:`shard` has spread the model over the processes
    sharded = False

    def shard(self, precision: str = "fp32") -> None:
        """Spread the teacher over every process with FSDP2 (``training.sharding: fsdp``): each holds
        1/N of its weights and gathers one block at a time in every forward pass, so from now on every
        process must call :meth:`outputs` in step with the others (the training steps do). It then
        gives whole logits: its head is sharded again after each forward pass."""
        from kdforge.distributed import process_device
        from kdforge.engine.sharding import shard_for_inference, skeleton

        if self.sharded:
            return
        device = self.device or process_device()
        self._whole = skeleton(self.model)
        self.model = shard_for_inference(self.model, device, precision)
        self.device, self.sharded = device, True

    def unshard(self) -> None:
        """Whole again on every process (the same object): for what runs on one process after training
        (the report's sample answers, a later phase's evaluation). Every process calls it together."""
        from kdforge.engine.sharding import unshard_in_place

        if not self.sharded:
            return
        unshard_in_place(self.model, self._whole)
        self._whole, self.sharded = None, False
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        home = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        # a teacher without weights (BM25) runs where the batch is
        device = self.device or next((p.device for p in self.model.parameters()), home)
        if device != home or self.dtype is not None:
            batch = _to(batch, device, self.dtype)
        if device != home or self.sharded:  # logits travel; the head stays on its device (or in shards)
            fields = fields - {HEAD_LOGITS}
        out = self.adapter(self.model, batch, fields)
        if device == home:
            return out
        return ModelOutputs(**{name: _to(getattr(out, name), home) for name in out.present()})

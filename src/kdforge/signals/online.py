"""The online teacher: a local model run on each batch, in eval mode, without gradients."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.outputs import ModelOutputs
from kdforge.signals.base import SIGNALS, Adapter, Batch, TeacherSignal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@SIGNALS.register("online")
class OnlineTeacher(TeacherSignal):
    """Runs ``model`` through ``adapter``; optionally on its own device and dtype.

    Outputs come back on the batch's device so losses never see mixed devices.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, *, device: str | None = None, dtype: str | None = None):
        self.device = torch.device(device) if device else None
        self.model = model.eval()
        if dtype:
            self.model = self.model.to(DTYPES[dtype])
        if self.device is not None:
            self.model = self.model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.adapter = adapter

    @torch.no_grad()
    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        home = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        device = self.device or next(self.model.parameters()).device
        if device != home:
            batch = _to(batch, device)
        out = self.adapter(self.model, batch, fields)
        if device == home:
            return out
        return ModelOutputs(**{name: _to(getattr(out, name), home) for name in out.present()})

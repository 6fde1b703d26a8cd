import torch

from kdforge.models.mlp import MLPClassifier
from kdforge.signals import OnlineTeacher


def adapter(model, batch, fields):
    from kdforge.outputs import ModelOutputs

    return ModelOutputs(logits=model(batch["inputs"]))


def test_online_teacher_is_frozen_and_fills_the_fields():
    model = MLPClassifier(8, [16], 3, dropout=0.5)
    signal = OnlineTeacher(model, adapter)
    batch = {"inputs": torch.randn(5, 8)}
    a = signal.outputs(batch, frozenset({"logits"}))
    b = signal.outputs(batch, frozenset({"logits"}))
    assert not a.logits.requires_grad
    torch.testing.assert_close(a.logits, b.logits)  # eval mode: dropout off
    assert a.present() == ["logits"]


def test_online_teacher_in_its_own_dtype_returns_to_the_batch_device():
    model = MLPClassifier(8, [16], 3)
    signal = OnlineTeacher(model, adapter, device="cpu", dtype="bfloat16")
    out = signal.outputs({"inputs": torch.randn(4, 8)}, frozenset({"logits"}))
    assert out.logits.dtype == torch.bfloat16 and out.logits.device.type == "cpu"

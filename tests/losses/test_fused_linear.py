"""Fused linear divergences (losses/linear.py): from the last hidden states and the LM head, chunk by
chunk, equal to the logit path (values and gradients to the hidden states, the head's weight and bias)."""

import json

import pytest
import torch

from kdforge.losses import linear
from kdforge.losses import logits as L
from kdforge.losses.linear import HeadLogits
from kdforge.losses.taid import taid
from kdforge.objective import Objective
from kdforge.recipe import ObjectiveTerm

B, T, H, V = 2, 7, 16, 50

DIVERGENCES = [
    ("forward_kl", L.forward_kl, {"temperature": 2.0}),
    ("hinton_kd", L.hinton_kd, {}),
    ("reverse_kl", L.reverse_kl, {}),
    ("generalized_jsd", L.generalized_jsd, {"beta": 0.3, "temperature": 1.5}),
    ("skew_kl", L.skew_kl, {"alpha": 0.1}),
    ("skew_reverse_kl", L.skew_reverse_kl, {"alpha": 0.2}),
    ("total_variation", L.total_variation, {}),
    ("taid", taid, {"t": 0.4}),
    ("taid_end", taid, {"t": 1.0}),
]


def _student(dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, dtype=dtype, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, dtype=dtype, generator=g) * 0.5).requires_grad_(True)
    b = torch.randn(V, dtype=dtype, generator=g).requires_grad_(True) if bias else None
    return h, w, b


def _teacher(kind, dtype, temperature=1.0):
    g = torch.Generator().manual_seed(1)
    ht, wt, bt = torch.randn(B, T, H, dtype=dtype, generator=g), torch.randn(V, H, dtype=dtype, generator=g), None
    dense = ht @ wt.T
    if kind == "dense":
        return dense, dense
    if kind == "head":
        return HeadLogits(ht, wt, bt), dense
    log_probs, ids = torch.log_softmax(dense / temperature, -1).topk(6, -1)
    return (ids, log_probs), (ids, log_probs)


def _both(fn, kw, teacher_kind, dtype, mask, bias=True):
    h, w, b = _student(dtype, bias)
    params = [x for x in (h, w, b) if x is not None]
    fused_teacher, dense_teacher = _teacher(teacher_kind, dtype, kw.get("temperature", 4.0 if fn is L.hinton_kd else 1))
    logits = h @ w.T + (b if b is not None else 0)
    ref = fn(logits, dense_teacher, mask=mask, **kw)
    ref_grads = torch.autograd.grad(ref, params)
    out = fn(HeadLogits(h, w, b), fused_teacher, mask=mask, **kw)
    grads = torch.autograd.grad(out, params)
    return ref, out, ref_grads, grads


@pytest.mark.parametrize("teacher_kind", ["dense", "head", "topk"])
@pytest.mark.parametrize(("name", "fn", "kw"), DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_every_divergence_equals_the_logit_path(name, fn, kw, teacher_kind, monkeypatch):
    monkeypatch.setattr(linear, "CHUNK_ELEMENTS", 3 * V)  # several chunks, the last one short
    monkeypatch.setattr(linear, "MIN_ROWS", 1)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.3
    ref, out, ref_grads, grads = _both(fn, kw, teacher_kind, torch.float64, mask)
    assert out.item() == pytest.approx(ref.item(), abs=1e-12, rel=1e-10)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("name", "fn", "kw"), DIVERGENCES[:3], ids=[d[0] for d in DIVERGENCES[:3]])
def test_float32_without_mask_or_bias(name, fn, kw):
    ref, out, ref_grads, grads = _both(fn, kw, "head", torch.float32, None, bias=False)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_cross_entropy_with_ignored_labels_and_mask(monkeypatch):
    monkeypatch.setattr(linear, "CHUNK_ELEMENTS", 2 * V)
    monkeypatch.setattr(linear, "MIN_ROWS", 1)
    h, w, b = _student(torch.float64)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    labels[0, :2] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -1] = False
    ref = L.cross_entropy(h @ w.T + b, labels, mask=mask)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    out = L.cross_entropy(HeadLogits(h, w, b), labels, mask=mask)
    grads = torch.autograd.grad(out, (h, w, b))
    assert out.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, c in zip(ref_grads, grads):
        torch.testing.assert_close(c, a, atol=1e-12, rtol=1e-10)


def test_masked_positions_are_skipped_and_an_empty_mask_gives_zero():
    h, w, b = _student(torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    teacher = torch.randn(B, T, V, dtype=torch.float64)
    out = L.forward_kl(HeadLogits(h, w, b), teacher, mask=mask)
    grads = torch.autograd.grad(out, (h, w, b))
    assert out.item() == 0.0 and all(bool((g == 0).all()) for g in grads)


def test_upstream_weight_scales_the_gradients():
    h, w, b = _student(torch.float64)
    teacher = torch.randn(B, T, V, dtype=torch.float64)
    once = torch.autograd.grad(L.reverse_kl(HeadLogits(h, w, b), teacher), (h, w))
    thrice = torch.autograd.grad(3.0 * L.reverse_kl(HeadLogits(h, w, b), teacher), (h, w))
    for a, c in zip(once, thrice):
        torch.testing.assert_close(c, 3 * a)


def test_a_teacher_with_gradients_goes_through_the_dense_path():
    h, w, b = _student(torch.float64)
    teacher = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    out = L.forward_kl(HeadLogits(h, w, b), teacher)
    (grad_teacher,) = torch.autograd.grad(out, (teacher,))
    assert grad_teacher.abs().sum() > 0


def test_no_gradient_needed_gives_the_value_alone():
    h, w, b = _student(torch.float64)
    teacher = torch.randn(B, T, V, dtype=torch.float64)
    with torch.no_grad():
        value = L.generalized_jsd(HeadLogits(h, w, b), teacher)
    assert value.item() == pytest.approx(L.generalized_jsd(h @ w.T + b, teacher).item(), rel=1e-12)


def test_the_objective_asks_for_head_logits_only_when_every_logit_term_takes_them():
    fused = Objective([ObjectiveTerm(loss="forward_kl"), ObjectiveTerm(loss="cross_entropy", weight=0.1)], 10)
    assert fused.head_logits
    assert not Objective([ObjectiveTerm(loss="forward_kl"), ObjectiveTerm(loss="dkd")], 10).head_logits
    assert not Objective([ObjectiveTerm(loss="hidden_mse", field="hidden")], 10).head_logits


def test_head_of_refuses_models_whose_logits_change_after_the_head(tiny_lm_teacher):
    from transformers import AutoModelForCausalLM

    from kdforge.tasks.lm_family import head_of

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_teacher)
    assert head_of(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert head_of(model) is None


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_a_causal_lm_run_trains_the_same_with_and_without_the_fused_linear_path(tiny_lm_teacher, tmp_path, monkeypatch):
    """Equal to float rounding: the same losses at every logged step."""
    from test_tasks_causal_lm import TEXT, lm_recipe  # noqa: I001

    from kdforge.runner import run_recipe

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    runs, calls = {}, []
    run_chunks = linear._run

    def counted(chunk_fn, student, teacher, *args, **kwargs):
        calls.append(isinstance(teacher, HeadLogits))
        return run_chunks(chunk_fn, student, teacher, *args, **kwargs)

    monkeypatch.setattr(linear, "_run", counted)
    for fused in (True, False):
        recipe = lm_recipe(
            tmp_path / str(fused),
            tiny_lm_teacher,
            text,
            f"training.fused_linear={str(fused).lower()}",
            "evaluation.baseline=false",
        )
        run_recipe(recipe)
        runs[fused] = recipe.run_dir
        if fused:  # the student's logits and the online teacher's came as hidden states and heads
            assert calls and any(calls)
            calls.clear()
    assert not calls  # fused_linear: false computes the logits whole
    fused_losses, dense_losses = _losses(runs[True]), _losses(runs[False])
    assert len(fused_losses) == len(dense_losses) > 0
    assert fused_losses == pytest.approx(dense_losses, rel=1e-5)

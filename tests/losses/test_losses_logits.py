import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.losses import LOSSES, cross_entropy, forward_kl, hinton_kd


def reference_kl(student, teacher, temperature, mask=None):
    """KL(p_t || q_s) from the formula, in float64, position by position."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    p = torch.exp(t - torch.logsumexp(t, -1, keepdim=True))
    log_p = t - torch.logsumexp(t, -1, keepdim=True)
    log_q = s - torch.logsumexp(s, -1, keepdim=True)
    per = (p * (log_p - log_q)).sum(-1)
    if mask is None:
        return per.mean() * temperature**2
    m = mask.double()
    return (per * m).sum() / m.sum() * temperature**2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("shape", [(7, 10), (3, 5, 50)])
def test_forward_kl_matches_float64_reference(temperature, shape):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3
    got = forward_kl(s, t, temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_kl(s, t, temperature).item(), rel=1e-5, abs=1e-6)


def test_mask_is_a_mean_over_counted_positions_of_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    got = forward_kl(s, t, mask=mask)
    assert got.item() == pytest.approx(reference_kl(s, t, 1.0, mask).item(), rel=1e-6)
    # not the mean of per-sequence means
    per_seq = torch.stack([reference_kl(s[i : i + 1], t[i : i + 1], 1.0, mask[i : i + 1]) for i in range(2)]).mean()
    assert got.item() != pytest.approx(per_seq.item(), rel=1e-3)


def test_temperature_squared_applied_exactly_once():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    T = 4.0
    plain = forward_kl(s / T, t / T, temperature=1.0)
    assert forward_kl(s, t, temperature=T).item() == pytest.approx(plain.item() * T**2, rel=1e-5)
    assert hinton_kd(s, t, temperature=T).item() == pytest.approx(forward_kl(s, t, temperature=T).item())


def test_kl_and_soft_cross_entropy_have_the_same_gradient():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g)
    T = 3.0
    (grad_kl,) = torch.autograd.grad(forward_kl(s, t, temperature=T), s)
    soft_ce = -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean() * T**2
    (grad_ce,) = torch.autograd.grad(soft_ce, s)
    torch.testing.assert_close(grad_kl, grad_ce)


def test_minus_inf_logits_never_give_nan():
    s = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -math.inf, -math.inf]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -math.inf], [0.5, -math.inf, -math.inf]])
    value = forward_kl(s, t, temperature=2.0)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_identical_logits_give_zero_and_bfloat16_inputs_compute_in_float32():
    x = torch.randn(3, 7).bfloat16()
    assert forward_kl(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(x, x).dtype == torch.float32


def test_shape_mismatch_is_an_error_not_a_broadcast():
    with pytest.raises(ValueError, match="nothing is broadcast"):
        forward_kl(torch.zeros(2, 3), torch.zeros(1, 3))


def test_cross_entropy_matches_torch_and_ignores_minus_100():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = -100
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_registry_knows_targets():
    assert LOSSES.get("cross_entropy").target == "labels"
    assert LOSSES.get("hinton_kd").target == "teacher"
    assert LOSSES.get("hinton_kd").param_names() == {"temperature"}


# ----- the divergence family -------------------------------------------------------

from kdforge.losses import chunking as chunking_module  # noqa: E402
from kdforge.losses.logits import (  # noqa: E402
    dkd,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)


def _probs(logits, T):
    z = logits.double() / T
    z = z - z.max(-1, keepdim=True).values
    e = torch.exp(z)
    return e / e.sum(-1, keepdim=True)


def _kl(a, b):
    """sum a log(a/b) with 0 log 0 = 0, float64."""
    terms = torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a))
    return terms.sum(-1)


def _reduce(per, mask, T):
    if mask is None:
        return per.mean() * T**2
    m = mask.double()
    return (per * m).sum() / m.sum() * T**2


REFERENCES = {
    "forward_kl": lambda p, q, kw: _kl(p, q),
    "reverse_kl": lambda p, q, kw: _kl(q, p),
    "generalized_jsd": lambda p, q, kw: (
        kw["beta"] * _kl(p, kw["beta"] * p + (1 - kw["beta"]) * q)
        + (1 - kw["beta"]) * _kl(q, kw["beta"] * p + (1 - kw["beta"]) * q)
    ),
    "skew_kl": lambda p, q, kw: _kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q),
    "skew_reverse_kl": lambda p, q, kw: _kl(q, (1 - kw["alpha"]) * p + kw["alpha"] * q),
    "total_variation": lambda p, q, kw: 0.5 * (p - q).abs().sum(-1),
}
FUNCTIONS = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "generalized_jsd": (generalized_jsd, {"beta": 0.3}),
    "skew_kl": (skew_kl, {"alpha": 0.1}),
    "skew_reverse_kl": (skew_reverse_kl, {"alpha": 0.2}),
    "total_variation": (total_variation, {}),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_divergences_match_float64_references(name, temperature, masked):
    fn, kw = FUNCTIONS[name]
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(3, 4, 13, generator=g) * 2, torch.randn(3, 4, 13, generator=g) * 2
    mask = (torch.rand(3, 4, generator=g) > 0.4) if masked else None
    if mask is not None:
        mask[0, 0] = True
    p, q = _probs(t, temperature), _probs(s, temperature)
    expected = _reduce(REFERENCES[name](p, q, kw), mask, temperature)
    got = fn(s, t, temperature=temperature, mask=mask, **kw)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_divergences_bf16_inputs_compute_in_float32(name):
    fn, kw = FUNCTIONS[name]
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(5, 9, generator=g).bfloat16(), torch.randn(5, 9, generator=g).bfloat16()
    got = fn(s, t, **kw)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(fn(s.float(), t.float(), **kw).item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_divergences_gradcheck(name):
    fn, kw = FUNCTIONS[name]
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    torch.autograd.gradcheck(lambda x: fn(x, t, temperature=1.5, mask=mask, **kw), (s,))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_masked_vocabulary_gives_finite_values_and_gradients(name):
    fn, kw = FUNCTIONS[name]
    s = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [2.0, -math.inf, -math.inf, 0.5]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -math.inf, 0.3], [0.5, -math.inf, -math.inf, 1.5]])
    value = fn(s, t, temperature=2.0, **kw)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_limits():
    g = torch.Generator().manual_seed(14)
    s, t = torch.randn(6, 10, generator=g) * 2, torch.randn(6, 10, generator=g) * 2
    fkl = forward_kl(s, t).item()
    assert skew_kl(s, t, alpha=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert skew_reverse_kl(s, t, alpha=0.0).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-6)
    # JSD_beta / beta -> KL(p || q) as beta -> 0 (JSD itself -> 0)
    ratios = [generalized_jsd(s.double(), t.double(), beta=b).item() / b for b in (1e-2, 1e-4)]
    assert abs(ratios[1] - fkl) < abs(ratios[0] - fkl)
    assert ratios[1] == pytest.approx(fkl, rel=1e-2)
    with pytest.raises(ValueError, match="forward_kl"):
        generalized_jsd(s, t, beta=0.0)
    with pytest.raises(ValueError, match="reverse_kl"):
        generalized_jsd(s, t, beta=1.0)


def test_chunked_equals_unchunked_in_value_and_gradient(monkeypatch):
    g = torch.Generator().manual_seed(15)
    s0, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    results = []
    for chunk in (1 << 24, 23):  # one piece, then pieces of 2 positions
        monkeypatch.setattr(chunking_module, "CHUNK_ELEMENTS", chunk)
        s = s0.clone().requires_grad_(True)
        value = generalized_jsd(s, t, beta=0.4, temperature=2.0, mask=mask)
        value.backward()
        results.append((value.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


# ----- DKD ----------------------------------------------------------------------------


def test_dkd_decomposes_the_kl():
    """KL(p||q) = TCKD + (1 - p_gt) * NCKD, per example (Zhao et al. 2022, eq. 1)."""
    g = torch.Generator().manual_seed(16)
    for _ in range(5):
        s, t = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 8, (1,), generator=g)
        T = 3.0
        p_gt = _probs(t, T)[0, y].item()
        kl = forward_kl(s, t, temperature=T).item()
        assert dkd(s, t, y, alpha=1.0, beta=1 - p_gt, temperature=T).item() == pytest.approx(kl, rel=1e-5)


def test_dkd_matches_a_float64_reference_and_ignores_minus_100():
    g = torch.Generator().manual_seed(17)
    s, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    y = torch.randint(0, 6, (2, 3), generator=g)
    y[1, 2] = -100
    T, a, b = 4.0, 1.0, 8.0
    total, count = 0.0, 0
    for i in range(2):
        for j in range(3):
            if y[i, j] == -100:
                continue
            ps, pt = _probs(s[i, j], T), _probs(t[i, j], T)
            k = y[i, j].item()
            bs, bt = torch.stack([ps[k], 1 - ps[k]]), torch.stack([pt[k], 1 - pt[k]])
            keep = [c for c in range(6) if c != k]
            ns, nt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
            total += a * _kl(bt, bs).item() + b * _kl(nt, ns).item()
            count += 1
    assert dkd(s, t, y, alpha=a, beta=b, temperature=T).item() == pytest.approx(total / count * T**2, rel=1e-5)


def test_dkd_gradcheck():
    g = torch.Generator().manual_seed(18)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    torch.autograd.gradcheck(lambda x: dkd(x, t, y, temperature=2.0), (s,))


def test_dkd_in_an_objective_gets_the_labels():
    from kdforge.objective import Objective
    from kdforge.outputs import ModelOutputs
    from kdforge.recipe import ObjectiveTerm

    g = torch.Generator().manual_seed(19)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    objective = Objective([ObjectiveTerm(loss="dkd", params={"beta": 2.0})], total_steps=1)
    loss, _ = objective(ModelOutputs(logits=s), ModelOutputs(logits=t), {"labels": y}, step=0)
    assert loss.item() == pytest.approx(dkd(s, t, y, beta=2.0).item())


# ----- oracle: TRL's generalized JSD ----------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl(beta, temperature, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd", reason="trl is a test-only dependency")
    g = torch.Generator().manual_seed(20)
    s, t = torch.randn(2, 5, 17, generator=g) * 2, torch.randn(2, 5, 17, generator=g) * 2
    labels = torch.randint(0, 17, (2, 5), generator=g)
    labels[0, :2] = -100
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    mask = labels != -100
    if beta == 0.0:
        ours = forward_kl(s, t, temperature=temperature, mask=mask)
    elif beta == 1.0:
        ours = reverse_kl(s, t, temperature=temperature, mask=mask)
    else:
        ours = generalized_jsd(s, t, beta=beta, temperature=temperature, mask=mask)
    # TRL applies no T^2 factor; kdforge applies it once
    assert ours.item() / temperature**2 == pytest.approx(theirs.item(), rel=1e-5)


# ----- top-k teachers -----------------------------------------------------------------


def _topk(t, k, T):
    log_p = torch.log_softmax(t.double() / T, -1)
    values, ids = log_p.topk(k, dim=-1)
    return ids, values.float()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_topk_teacher_with_k_equal_to_the_vocabulary_is_the_dense_loss(name):
    fn, kw = FUNCTIONS[name]
    g = torch.Generator().manual_seed(21)
    s, t = torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    dense = fn(s, t, temperature=2.0, **kw)
    assert fn(s, _topk(t, 9, 2.0), temperature=2.0, **kw).item() == pytest.approx(dense.item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_topk_teacher_compares_k_plus_one_buckets(name):
    fn, kw = FUNCTIONS[name]
    g = torch.Generator().manual_seed(22)
    s, t = torch.randn(4, 12, generator=g) * 2, torch.randn(4, 12, generator=g) * 2
    T, k = 1.5, 3
    ids, log_p = _topk(t, k, T)
    q = _probs(s, T)
    q_k = q.gather(-1, ids)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    p_k = log_p.double().exp()
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    expected = REFERENCES[name](p_b, q_b, kw).mean() * T**2
    got = fn(s, (ids, log_p), temperature=T, **kw)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_a_topk_teacher_sure_of_its_k_tokens_gives_finite_values_and_gradients(name):
    """Top-k log-probs that sum to 1 in float32 leave no residual; the tail is floored, not -inf.

    Found on a SmolLM2 cache: reverse KL was +inf wherever the student had mass outside the k tokens.
    """
    fn, kw = FUNCTIONS[name]
    ids = torch.tensor([[[0, 1]]])
    log_p = torch.log(torch.tensor([[[1.0 - 1e-9, 1e-9]]]))  # sums to exactly 1.0 in float32
    assert float(log_p.exp().sum()) == 1.0
    s = torch.zeros(1, 1, 6, requires_grad=True)  # the student spreads mass over all six tokens
    value = fn(s, (ids, log_p), **kw)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_the_tail_floor_leaves_a_masked_vocabulary_alone():
    """Where the student has no mass outside the top-k (masked vocabulary), nothing is added to the teacher."""
    ids = torch.tensor([[0, 1]])
    log_p = torch.log(torch.tensor([[0.75, 0.25]]))
    s = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert forward_kl(s, (ids, log_p)).item() == pytest.approx(expected, rel=1e-6)


def test_topk_teacher_chunked_and_gradients(monkeypatch):
    g = torch.Generator().manual_seed(23)
    s0, t = torch.randn(3, 5, 20, generator=g), torch.randn(3, 5, 20, generator=g)
    teacher = _topk(t, 4, 1.0)
    results = []
    for chunk in (1 << 24, 40):
        monkeypatch.setattr(chunking_module, "CHUNK_ELEMENTS", chunk)
        s = s0.clone().requires_grad_(True)
        value = skew_kl(s, teacher)
        value.backward()
        assert torch.isfinite(s.grad).all()
        results.append((value.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_topk_teacher_shape_errors():
    s = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top-k teacher"):
        forward_kl(s, (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="top-k teacher"):
        forward_kl(s, (torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3)))


# ----- oracle: torchdistill's KDLoss ------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 0.1, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_hinton_kd_matches_torchdistill(alpha, temperature):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level", reason="torchdistill is a test-only oracle")
    from kdforge.objective import Objective
    from kdforge.outputs import ModelOutputs
    from kdforge.recipe import ObjectiveTerm

    g = torch.Generator().manual_seed(24)
    s, t = torch.randn(6, 10, generator=g) * 2, torch.randn(6, 10, generator=g) * 2
    y = torch.randint(0, 10, (6,), generator=g)
    # beta only weighs the mixed form; torchdistill needs it when alpha is None
    beta = 1.0 if alpha is None else None
    oracle = mid_level.KDLoss("s", "out", "t", "out", temperature=temperature, alpha=alpha, beta=beta)
    theirs = oracle({"s": {"out": s}}, {"t": {"out": t}}, y)
    if alpha is None:
        # without alpha torchdistill returns the bare soft loss: no T^2 factor
        assert hinton_kd(s, t, temperature=temperature).item() / temperature**2 == pytest.approx(
            theirs.item(), rel=1e-5
        )
        return
    objective = Objective(
        [
            ObjectiveTerm(loss="cross_entropy", weight=alpha),
            ObjectiveTerm(loss="hinton_kd", weight=1 - alpha, params={"temperature": temperature}),
        ],
        total_steps=1,
    )
    ours, _ = objective(ModelOutputs(logits=s), ModelOutputs(logits=t), {"labels": y}, step=0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def _dkd_reference(q, p, label, a, b):
    """alpha*TCKD + beta*NCKD from the definition, on float64 probability vectors."""
    keep = [c for c in range(q.shape[-1]) if c != label]
    bs, bt = torch.stack([q[label], 1 - q[label]]), torch.stack([p[label], 1 - p[label]])
    ns, nt = q[keep] / q[keep].sum(), p[keep] / p[keep].sum()
    return a * _kl(bt, bs).item() + b * _kl(nt, ns).item()


def test_dkd_with_a_topk_teacher_uses_a_label_bucket():
    """Buckets: the teacher's k tokens, the label, the rest; a label outside the top-k gets r / (V - k)."""
    g = torch.Generator().manual_seed(24)
    V, k, T = 10, 3, 2.0
    s, t = torch.randn(4, V, generator=g) * 2, torch.randn(4, V, generator=g) * 2
    ids, log_p = _topk(t, k, T)
    # rows 0, 1: label inside the top-k; rows 2, 3: outside
    outside = [c for c in range(V) if c not in ids[2].tolist()][0], [c for c in range(V) if c not in ids[3].tolist()][1]
    y = torch.tensor([ids[0, 0].item(), ids[1, 2].item(), *outside])
    q = _probs(s, T)
    total = 0.0
    for i in range(4):
        label = y[i].item()
        q_k, p_k = q[i, ids[i]], log_p[i].double().exp()
        r = 1 - p_k.sum()
        if label in ids[i].tolist():
            q_b = torch.cat([q_k, (1 - q_k.sum()).reshape(1)])
            p_b = torch.cat([p_k, r.reshape(1)])
            bucket = ids[i].tolist().index(label)
        else:
            q_b = torch.cat([q_k, q[i, label].reshape(1), (1 - q_k.sum() - q[i, label]).reshape(1)])
            p_b = torch.cat([p_k, (r / (V - k)).reshape(1), (r * (V - k - 1) / (V - k)).reshape(1)])
            bucket = k
        total += _dkd_reference(q_b, p_b, bucket, 1.0, 8.0)
    got = dkd(s, (ids, log_p), y, temperature=T)
    assert got.item() == pytest.approx(total / 4 * T**2, rel=1e-4)


def test_dkd_topk_with_k_equal_to_the_vocabulary_is_dense_and_chunks(monkeypatch):
    g = torch.Generator().manual_seed(25)
    s0, t = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    y = torch.randint(0, 8, (3, 4), generator=g)
    y[0, 1] = -100
    results = []
    for chunk in (1 << 24, 16):
        monkeypatch.setattr(chunking_module, "CHUNK_ELEMENTS", chunk)
        for teacher in (t, _topk(t, 8, 4.0)):
            s = s0.clone().requires_grad_(True)
            value = dkd(s, teacher, y)
            value.backward()
            results.append((value.detach(), s.grad))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-6)


def test_dkd_topk_gradients_are_finite_with_labels_outside():
    g = torch.Generator().manual_seed(26)
    s = torch.randn(6, 12, generator=g, requires_grad=True)
    ids, log_p = _topk(torch.randn(6, 12, generator=g), 2, 4.0)
    y = torch.tensor([c for c in range(12) if c not in ids[0].tolist()][:1] * 6)
    value = dkd(s, (ids, log_p), y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


# ----- the fused path against autograd ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("topk", [None, 4])
def test_closed_form_gradients_equal_autograd_of_the_formula(name, topk, monkeypatch):
    """A teacher that needs gradients takes the autograd path: both paths give the same student gradient."""
    fn, kw = FUNCTIONS[name]
    g = torch.Generator().manual_seed(27)
    s0, t = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    s0[0, 0, 2] = -math.inf  # a masked vocabulary entry
    t[0, 0, 2] = -math.inf
    mask = torch.rand(3, 5, generator=g) > 0.3
    monkeypatch.setattr(chunking_module, "CHUNK_ELEMENTS", 33)  # several chunks, a short last one
    grads, values = [], []
    for teacher_grad in (False, True):
        s = s0.clone().requires_grad_(True)
        teacher = t.clone().requires_grad_(teacher_grad) if topk is None else _topk(t, topk, 1.5)
        if topk is not None and teacher_grad:
            teacher = (teacher[0], teacher[1].clone().requires_grad_(True))
        value = fn(s, teacher, temperature=1.5, mask=mask, **kw)
        value.backward()
        values.append(value.detach())
        grads.append(s.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("name", ["forward_kl", "skew_kl", "generalized_jsd"])
def test_gradient_where_the_student_probability_underflows(name):
    """q = 0 in float32 (logit -200 next to 0) while the teacher gives mass: the gradient is not dropped."""
    fn, kw = FUNCTIONS[name]
    s = torch.tensor([[0.0, -200.0, 1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 0.0]])
    fn(s, t, **kw).backward()
    s64 = s.detach().double().requires_grad_(True)
    fn(s64, t.double(), **kw).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    if name == "forward_kl":  # q - p: the missing token is pulled up (the skews damp it by q, by design)
        assert s.grad[0, 1] < -0.1


def test_multi_label_losses_match_the_bernoulli_definitions():
    """binary_kd is T^2 times the mean Bernoulli KL per class; binary_cross_entropy torch's BCE on logits."""
    from torch.distributions import Bernoulli, kl_divergence

    from kdforge.losses import binary_cross_entropy, binary_kd

    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    labels = (torch.rand(5, 4) > 0.5).double()
    for t in (1.0, 2.0):
        reference = kl_divergence(Bernoulli(logits=teacher / t), Bernoulli(logits=student / t)).mean() * t * t
        assert torch.allclose(binary_kd(student, teacher, temperature=t), reference)
    mask = torch.tensor([True, True, False, True, False])
    reference = kl_divergence(Bernoulli(logits=teacher[mask]), Bernoulli(logits=student[mask])).mean()
    assert torch.allclose(binary_kd(student, teacher, mask=mask), reference)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(student, labels)
    assert torch.allclose(binary_cross_entropy(student, labels), bce)
    assert binary_kd(teacher.clone(), teacher) == 0
    with pytest.raises(ValueError, match="multi-hot labels"):
        binary_cross_entropy(student, labels[:, 0].long())

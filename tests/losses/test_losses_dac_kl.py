import math

import pytest
import torch

from kdforge.losses import chunking
from kdforge.losses.dac_kl import DACKL


def reference_forward_kl(student, teacher, temperature=1.0, mask=None):
    """KL(p_t || q_s) * T^2 from the formula in float64, mean over counted positions."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_p = t - torch.logsumexp(t, -1, keepdim=True)
    log_q = s - torch.logsumexp(s, -1, keepdim=True)
    per = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return per.mean() * temperature**2
    m = mask.double()
    return (per * m).sum() / m.sum() * temperature**2


def reference_clipped_kl(teacher_probs, student_logits, low, high):
    """DAC-KL at one position, by hand over Python floats: sort, midpoints, keep, renormalise, KL."""
    q_norm = sum(math.exp(x) for x in student_logits)
    ranked = sorted(range(len(teacher_probs)), key=lambda k: -teacher_probs[k])
    kept, before = [], 0.0
    for rank, k in enumerate(ranked):
        midpoint = before + teacher_probs[k] / 2
        before += teacher_probs[k]
        if rank == 0 or low <= midpoint <= high:
            kept.append(k)
    mass = sum(teacher_probs[k] for k in kept)
    return sum(
        teacher_probs[k] / mass * math.log(teacher_probs[k] / mass / (math.exp(student_logits[k]) / q_norm))
        for k in kept
    )


def randomise(module, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 40)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gates_wide_open_is_forward_kl(shape, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g) * 3
    t = torch.randn(*shape, generator=g) * 3
    got = DACKL()(s, t, temperature=temperature, limits=(0.0, 1.0))
    assert got.dtype == torch.float32
    expected = reference_forward_kl(s, t, temperature).item()
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got64 = DACKL().double()(s.double(), t.double(), temperature=temperature, limits=(0.0, 1.0))
    assert got64.item() == pytest.approx(expected, rel=1e-12)


TEACHER = [0.1, 0.5, 0.15, 0.25]  # sorted: 0.5, 0.25, 0.15, 0.1 with midpoints 0.25, 0.625, 0.825, 0.95
STUDENT = [0.3, 1.2, -0.4, 0.1]


@pytest.mark.parametrize(
    ("low", "high", "kept"),
    [
        (0.6, 0.9, [1, 3, 2]),  # the tail token (midpoint 0.95) is cut
        (0.7, 0.9, [1, 2]),  # the argmax is kept although its midpoint 0.25 < l
        (0.0, 0.3, [1]),  # the argmax alone
        (0.9, 1.0, [1, 0]),  # the tail token and the argmax
    ],
)
def test_narrow_region_counts_only_the_kept_tokens(low, high, kept):
    teacher = torch.tensor([TEACHER], dtype=torch.float64).log()
    student = torch.tensor([STUDENT], dtype=torch.float64)
    got = DACKL().double()(student, teacher, limits=(low, high)).item()
    assert got == pytest.approx(reference_clipped_kl(TEACHER, STUDENT, low, high), rel=1e-12)
    # the same number written out from the kept set alone
    q = torch.softmax(student[0], -1).tolist()
    mass = sum(TEACHER[k] for k in kept)
    by_hand = sum(TEACHER[k] / mass * math.log(TEACHER[k] / mass / q[k]) for k in kept)
    assert got == pytest.approx(by_hand, rel=1e-12)


def test_limits_per_position_and_mask():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 2
    low = torch.tensor([[0.0, 0.2, 0.5], [0.1, 0.3, 0.0]], dtype=torch.float64)
    high = torch.tensor([[1.0, 0.7, 0.9], [0.4, 0.95, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    per = [
        [
            reference_clipped_kl(t[b, i].softmax(-1).tolist(), s[b, i].tolist(), low[b, i].item(), high[b, i].item())
            for i in range(3)
        ]
        for b in range(2)
    ]
    counted = [per[b][i] for b in range(2) for i in range(3) if mask[b, i]]
    got = DACKL().double()(s, t, limits=(low, high), mask=mask).item()
    assert got == pytest.approx(sum(counted) / len(counted), rel=1e-12)


def test_permuting_the_vocabulary_changes_nothing():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g) * 2
    perm = torch.randperm(30, generator=g)
    module = randomise(DACKL(), 3)
    assert module(s[:, perm], t[:, perm]).item() == pytest.approx(module(s, t).item(), rel=1e-6)


def test_f_sub_starts_at_the_initial_limits():
    g = torch.Generator().manual_seed(4)
    module = DACKL(initial_limits=(0.05, 0.8))
    low, high = module.limits(torch.randn(3, 5, 50, generator=g) * 4)
    assert low.shape == high.shape == (3, 5)
    assert torch.allclose(low, torch.full_like(low, 0.05)) and torch.allclose(high, torch.full_like(high, 0.8))
    low, high = randomise(module, 5, scale=2.0).limits(torch.randn(64, 50, generator=g) * 4)
    assert ((0 < low) & (low < high) & (high < 1)).all()


def test_neg_inf_logits_give_no_nan():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 4, 12, generator=g).requires_grad_()
    t = torch.randn(2, 4, 12, generator=g) * 3
    vocab_mask = torch.zeros(12, dtype=torch.bool)
    vocab_mask[[2, 7, 11]] = True
    t_masked = t.masked_fill(vocab_mask, -math.inf)
    module = randomise(DACKL(top_m=16), 7)
    for limits in (None, (0.0, 1.0), (0.3, 0.8)):
        s.grad = None
        module.zero_grad()
        value = module(s.masked_fill(vocab_mask, -math.inf), t_masked, limits=limits)
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(s.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    # the masked entries take no part: same as dropping them from the vocabulary
    keep = ~vocab_mask
    wide = module(s.masked_fill(vocab_mask, -math.inf), t_masked, limits=(0.0, 1.0))
    assert wide.item() == pytest.approx(module(s[..., keep], t[..., keep], limits=(0.0, 1.0)).item(), rel=1e-6)
    # a teacher -inf where the student has mass is fine too
    assert torch.isfinite(module(s, t_masked))


def test_gradients_reach_f_sub_and_the_student():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 6, 20, generator=g).requires_grad_()
    t = torch.randn(3, 6, 20, generator=g) * 2
    module = randomise(DACKL(hidden=16), 9)
    module(s, t).backward()
    assert s.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # a freshly built module (zero output weights) still moves its output layer
    fresh = DACKL()
    fresh(s, t).backward()
    assert fresh.f_sub[2].weight.grad.abs().sum() > 0 and fresh.f_sub[2].bias.grad.abs().sum() > 0


def reference_relaxed(teacher_probs, student_log_probs, low, high, tau):
    """The relaxed loss whose gradient the limits receive: sigmoid gates on the sorted midpoints."""
    p, order = teacher_probs.sort(-1, descending=True)
    log_q = student_log_probs.gather(-1, order)
    midpoint = p.cumsum(-1) - p / 2
    gate = torch.sigmoid((midpoint - low.unsqueeze(-1)) / tau) * torch.sigmoid((high.unsqueeze(-1) - midpoint) / tau)
    gate = torch.cat([torch.ones_like(gate[:, :1]), gate[:, 1:]], -1)
    weights = gate * p / (gate * p).sum(-1, keepdim=True)
    return (weights * (torch.log(p / (gate * p).sum(-1, keepdim=True)) - log_q)).sum(-1).mean()


def test_the_limits_gradient_is_that_of_the_sigmoid_relaxation():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(5, 15, generator=g, dtype=torch.float64)
    t = torch.randn(5, 15, generator=g, dtype=torch.float64) * 2
    low = torch.rand(5, generator=g, dtype=torch.float64) * 0.3
    high = 0.6 + torch.rand(5, generator=g, dtype=torch.float64) * 0.35
    low.requires_grad_(), high.requires_grad_()
    module = DACKL(gate_temperature=0.1).double()
    module(s, t, limits=(low, high)).backward()
    low_ref, high_ref = low.detach().clone().requires_grad_(), high.detach().clone().requires_grad_()
    reference_relaxed(t.softmax(-1), s.log_softmax(-1), low_ref, high_ref, 0.1).backward()
    assert torch.allclose(low.grad, low_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(high.grad, high_ref.grad, rtol=1e-10, atol=1e-12)
    assert high.grad.abs().sum() > 0


@pytest.mark.parametrize("limits", [None, (0.1, 0.85)])
def test_gradcheck_student(limits):
    g = torch.Generator().manual_seed(11)
    module = randomise(DACKL(top_m=4, hidden=5).double(), 12)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda x: module(x, t, mask=mask, temperature=1.5, limits=limits), (s,))


def test_chunks_give_the_same_value_and_gradients(monkeypatch):
    g = torch.Generator().manual_seed(13)
    s = torch.randn(3, 7, 50, generator=g, requires_grad=True)
    t = torch.randn(3, 7, 50, generator=g) * 2
    module = randomise(DACKL(hidden=8), 14)
    whole = module(s, t)
    whole.backward()
    grads = [s.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    s.grad = None
    module.zero_grad()
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 150)  # 3 positions a chunk
    chunked = module(s, t)
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    for before, after in zip(grads, [s.grad] + [p.grad for p in module.parameters()]):
        assert torch.allclose(before, after, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert module(s, t).item() == pytest.approx(whole.item(), rel=1e-6)


def test_half_inputs_compute_in_float32_and_small_vocabularies_work():
    g = torch.Generator().manual_seed(15)
    s, t = torch.randn(4, 6, 10, generator=g), torch.randn(4, 6, 10, generator=g)
    module = DACKL()  # top_m = 32 > 10: zero-padded
    got = module(s.half(), t.half())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(module(s.half().float(), t.half().float()).item(), rel=1e-6)


def test_bad_arguments_are_refused():
    module = DACKL()
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="differ"):
        module(s, torch.randn(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        module(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="limits"):
        module(s, s, limits=(0.7, 0.3))
    with pytest.raises(ValueError, match="broadcast"):
        module(s, s, limits=(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match="mask"):
        module(s, s, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="initial_limits"):
        DACKL(initial_limits=(0.5, 0.5))
    with pytest.raises(ValueError, match="gate_temperature"):
        DACKL(gate_temperature=0.0)
    with pytest.raises(ValueError, match="top_m"):
        DACKL(top_m=0)

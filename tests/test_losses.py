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

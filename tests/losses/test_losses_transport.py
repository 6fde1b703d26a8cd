import math
import warnings

import numpy as np
import pytest
import torch

from kdforge.losses import LOSSES
from kdforge.losses.transport import _sinkhorn_plan, sinkhorn


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def reference_cost(student, teacher, temperature, mask=None):
    """W_ij = ||softmax(s_i/T) - softmax(t_j/T)||_1 over the counted rows, in float64 NumPy."""
    s = student.detach().double().numpy()
    z = teacher.detach().double().numpy()
    s, z = s.reshape(-1, s.shape[-1]), z.reshape(-1, z.shape[-1])
    if mask is not None:
        keep = mask.numpy().reshape(-1).astype(bool)
        s, z = s[keep], z[keep]
    q, p = _softmax(s / temperature), _softmax(z / temperature)
    return np.abs(q[:, None, :] - p[None, :, :]).sum(-1)


def reference_plan(cost, epsilon, iterations):
    """SinKD's rounds as the paper's code states them: divide rows by their sums, then columns."""
    plan = np.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdims=True)
        plan = plan / plan.sum(0, keepdims=True)
    return plan


def reference_sinkhorn(student, teacher, temperature=2.0, epsilon=0.1, iterations=20, mask=None):
    cost = reference_cost(student, teacher, temperature, mask)
    return (reference_plan(cost, epsilon, iterations) * cost).sum()


def _pair(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("epsilon, iterations", [(0.1, 20), (0.1, 1), (0.5, 7), (0.02, 20)])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 7)])
def test_sinkhorn_matches_float64_reference(temperature, epsilon, iterations, shape):
    s, z = _pair(shape, 0)
    expected = reference_sinkhorn(s, z, temperature, epsilon, iterations)
    got = sinkhorn(s, z, temperature=temperature, epsilon=epsilon, iterations=iterations)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-4)
    got64 = sinkhorn(s.double(), z.double(), temperature=temperature, epsilon=epsilon, iterations=iterations)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(expected, rel=1e-10)


def test_defaults_are_sinkd_s():
    s, z = _pair((8, 3), 1)
    assert sinkhorn(s, z).item() == pytest.approx(reference_sinkhorn(s, z, 2.0, 0.1, 20), rel=1e-4)


@pytest.mark.parametrize(
    "shape, mask",
    [((5, 4), [1, 0, 1, 1, 0]), ((2, 4, 6), [[1, 1, 0, 1], [0, 1, 0, 0]])],
)
def test_counted_positions_are_the_transport_points(shape, mask):
    s, z = _pair(shape, 2)
    mask = torch.tensor(mask, dtype=torch.bool)
    got = sinkhorn(s, z, mask=mask, temperature=3.0)
    assert got.item() == pytest.approx(reference_sinkhorn(s, z, 3.0, mask=mask), rel=1e-4)
    # [B, L, V] with a mask is the [N, V] problem of its counted positions
    assert got.item() == pytest.approx(sinkhorn(s[mask], z[mask], temperature=3.0).item(), rel=1e-6)


def test_no_counted_position_gives_zero():
    s, z = _pair((2, 3, 4), 3)
    s.requires_grad_(True)
    value = sinkhorn(s, z, mask=torch.zeros(2, 3, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_plan_has_unit_marginals_and_ends_on_the_columns():
    cost = torch.from_numpy(reference_cost(*_pair((7, 5), 4), 2.0))
    plan = _sinkhorn_plan(cost, epsilon=0.1, iterations=20)
    torch.testing.assert_close(plan, torch.from_numpy(reference_plan(cost.numpy(), 0.1, 20)), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(plan.sum(0), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.sum(1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-2)
    converged = _sinkhorn_plan(cost, epsilon=0.1, iterations=2000)
    torch.testing.assert_close(converged.sum(1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-10)


def test_small_epsilon_does_not_underflow():
    # exp(-2/0.001) is 0 in float32 and float64; the log-domain rounds still give a plan
    s, z = _pair((6, 4), 5)
    value = sinkhorn(s, z, epsilon=1e-3)
    assert torch.isfinite(value)


# --- oracle: POT ---------------------------------------------------------------------------


def test_pot_gives_the_same_plan_at_the_same_number_of_rounds():
    ot = pytest.importorskip("ot")
    s, z = _pair((9, 6), 6)
    cost = reference_cost(s, z, 2.0)
    ones = np.ones(9)
    for iterations in (1, 3, 20):
        # POT's round updates the columns' scaling and then the rows', starting from
        # uniform scalings; SinKD's updates rows then columns. So n POT rounds on W^T, transposed,
        # are n SinKD rounds on W. stopThr=0 turns off POT's early stop (it stops when the
        # marginal error is below stopThr, checked every 10 rounds) so it runs exactly n rounds.
        # a = b = ones gives SinKD's unit marginals (POT does not require them to sum to 1).
        pot_plan = ot.sinkhorn(ones, ones, cost.T, reg=0.1, numItermax=iterations, stopThr=0.0, warn=False).T
        ours = _sinkhorn_plan(torch.from_numpy(cost), epsilon=0.1, iterations=iterations).numpy()
        np.testing.assert_allclose(ours, pot_plan, rtol=1e-9, atol=1e-15)
        expected = (pot_plan * cost).sum()
        assert sinkhorn(s.double(), z.double(), iterations=iterations).item() == pytest.approx(expected, rel=1e-9)
        assert sinkhorn(s, z, iterations=iterations).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_pot_agrees_at_convergence(epsilon):
    ot = pytest.importorskip("ot")
    s, z = _pair((3, 4, 5), 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    cost = reference_cost(s, z, 2.0, mask)
    ones = np.ones(len(cost))
    # POT's own order and its default start, run to a marginal error of 1e-13: the fixed point
    # is the same whatever the order, so SinKD's rounds, continued long enough, reach it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fail rather than compare against an unconverged POT plan
        expected = ot.sinkhorn2(ones, ones, cost, reg=epsilon, numItermax=100_000, stopThr=1e-13)
    got = sinkhorn(s.double(), z.double(), epsilon=epsilon, iterations=3000, mask=mask)
    assert got.item() == pytest.approx(float(expected), rel=1e-9)


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [3, 20])
def test_gradcheck_float64(iterations):
    s, z = _pair((2, 3, 4), 8, scale=1.0)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    inputs = (s.double().requires_grad_(True), z.double().requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda a, b: sinkhorn(a, b, temperature=2.0, epsilon=0.2, iterations=iterations, mask=mask), inputs
    )
    s, z = _pair((4, 5), 9, scale=1.0)
    inputs = (s.double().requires_grad_(True), z.double().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: sinkhorn(a, b, iterations=iterations), inputs)


def test_gradient_flows_through_the_plan_too():
    s, z = _pair((6, 5), 10)
    s = s.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(sinkhorn(s, z.double()), s)

    def detached_plan(student):
        cost = torch.cdist(torch.softmax(student / 2.0, -1), torch.softmax(z.double() / 2.0, -1), p=1.0)
        return (_sinkhorn_plan(cost, epsilon=0.1, iterations=20).detach() * cost).sum()

    (grad_cost_only,) = torch.autograd.grad(detached_plan(s), s)
    assert not torch.allclose(grad, grad_cost_only, rtol=1e-3, atol=1e-6)


# --- properties and contract ------------------------------------------------------------------


def test_teacher_order_within_the_batch_does_not_matter():
    # the batch-wise cost compares every student example with every teacher example, and
    # Sinkhorn's scaling is equivariant to reordering columns: the pairing is not used
    s, z = _pair((8, 5), 11)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert sinkhorn(s, z[perm]).item() == pytest.approx(sinkhorn(s, z).item(), rel=1e-5)


def test_bfloat16_inputs_give_a_float32_result():
    s, z = _pair((2, 5, 9), 12)
    got = sinkhorn(s.bfloat16(), z.bfloat16(), temperature=3.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(sinkhorn(s.bfloat16().float(), z.bfloat16().float(), temperature=3.0).item())
    assert got.item() == pytest.approx(sinkhorn(s, z, temperature=3.0).item(), rel=3e-2)


def test_minus_inf_logits_never_give_nan():
    s = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -math.inf, -math.inf], [0.3, 0.1, 0.2]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0, -math.inf], [0.5, -math.inf, -math.inf], [0.0, 0.4, 1.0]], requires_grad=True)
    value = sinkhorn(s, z)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all() and torch.isfinite(z.grad).all()
    assert value.item() == pytest.approx(reference_sinkhorn(s, z), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"epsilon": -0.1}, "epsilon must be > 0"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"iterations": 2.5}, "iterations must be an integer >= 1"),
        ({"mask": torch.ones(2, dtype=torch.bool)}, "mask shape"),
    ],
)
def test_bad_arguments_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), **kwargs)


def _topk(teacher, k, T):
    values, ids = torch.log_softmax(teacher.double() / T, -1).topk(k, dim=-1)
    return ids, values.float()


def test_top_k_teacher_cost_is_l1_over_each_teacher_rows_buckets():
    g = torch.Generator().manual_seed(41)
    s, t = torch.randn(5, 12, generator=g) * 2, torch.randn(5, 12, generator=g) * 2
    T, k = 2.0, 4
    ids, log_p = _topk(t, k, T)
    q = torch.softmax(s.double() / T, -1)
    cost = torch.zeros(5, 5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            q_at, p_at = q[i, ids[j]], log_p[j].double().exp()
            cost[i, j] = (q_at - p_at).abs().sum() + ((1 - q_at.sum()) - (1 - p_at.sum())).abs()
    plan = torch.exp(-cost / 0.1)
    for _ in range(20):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    expected = (plan * cost).sum()
    got = sinkhorn(s, (ids, log_p), temperature=T)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_top_k_teacher_with_k_equal_to_the_vocabulary_is_the_dense_loss():
    g = torch.Generator().manual_seed(42)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    student = s.clone().requires_grad_(True)
    value = sinkhorn(student, _topk(t, 7, 2.0), mask=mask)
    value.backward()
    assert value.item() == pytest.approx(sinkhorn(s, t, mask=mask).item(), rel=1e-4)
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_shape_mismatch_is_an_error_not_a_broadcast():
    with pytest.raises(ValueError, match="nothing is broadcast"):
        sinkhorn(torch.zeros(2, 3), torch.zeros(1, 3))


def test_registered():
    spec = LOSSES.get("sinkhorn")
    assert spec.fn is sinkhorn and spec.target == "teacher" and spec.state is None
    assert spec.param_names() == {"temperature", "epsilon", "iterations"}

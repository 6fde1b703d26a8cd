import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.errors import RecipeError
from kdforge.losses import LOSSES, forward_kl
from kdforge.losses import chunking as chunking_module
from kdforge.losses.registry import TermState
from kdforge.losses.taid import TAIDSchedule, taid
from kdforge.objective import Objective
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_taid(student, teacher, t, mask=None):
    """KL(p_t || q) from the formula, in float64 NumPy, p_t = softmax((1-t) z_s + t z_t)."""
    s = student.detach().double().numpy()
    z = teacher.detach().double().numpy()
    log_p = _log_softmax((1 - t) * s + t * z)
    log_q = _log_softmax(s)
    per = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    if mask is None:
        return per.mean()
    m = mask.numpy().astype(np.float64)
    return (per * m).sum() / m.sum()


def reference_schedule(losses, total_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The t used before each step and after the last one, restated from METHODS.md section 2."""
    t, prev, m, seen = t_start, None, 0.0, [t_start]
    for n, loss in enumerate(losses, start=1):
        t_lin = t_start + (t_end - t_start) * min(n / total_steps, 1.0)
        push = 0.0
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            push = alpha / (1 + math.exp(-m)) * (1 - t)
        prev = loss
        t = min(t_end, max(t_lin, t + push))
        seen.append(t)
    return seen


def _pair(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


# --- the loss -------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("shape", [(7, 10), (3, 5, 50)])
def test_taid_matches_float64_reference(t, shape):
    s, z = _pair(shape, 0)
    got = taid(s, z, t=t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_taid(s, z, t), rel=1e-5, abs=1e-6)
    got64 = taid(s.double(), z.double(), t=t)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(reference_taid(s, z, t), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("shape, mask", [((4, 6), [1, 0, 1, 1]), ((2, 4, 6), [[1, 1, 1, 1], [1, 0, 0, 0]])])
def test_mask_is_a_mean_over_counted_positions_of_the_whole_batch(shape, mask):
    s, z = _pair(shape, 1)
    mask = torch.tensor(mask, dtype=torch.bool)
    got = taid(s, z, t=0.4, mask=mask)
    assert got.item() == pytest.approx(reference_taid(s, z, 0.4, mask), rel=1e-5)
    # the same as keeping only the counted positions
    assert got.item() == pytest.approx(taid(s[mask], z[mask], t=0.4).item(), rel=1e-6)


def test_bfloat16_inputs_give_a_float32_result():
    s, z = _pair((3, 4, 20), 2)
    got = taid(s.bfloat16(), z.bfloat16(), t=0.6)
    assert got.dtype == torch.float32
    # the same as the float32 computation on the rounded inputs, close to it on the originals
    assert got.item() == pytest.approx(taid(s.bfloat16().float(), z.bfloat16().float(), t=0.6).item(), rel=1e-6)
    assert got.item() == pytest.approx(taid(s, z, t=0.6).item(), rel=3e-2)


def test_t_one_is_forward_kl_at_temperature_one():
    s, z = _pair((5, 3, 11), 3)
    s.requires_grad_(True)
    got = taid(s, z, t=1.0)
    expected = forward_kl(s, z, temperature=1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    (g_taid,) = torch.autograd.grad(got, s)
    (g_kl,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(g_taid, g_kl)


def test_t_zero_is_zero_with_zero_gradient():
    s, z = _pair((4, 9), 4)
    s.requires_grad_(True)
    got = taid(s, z, t=0.0)
    assert got.item() == 0.0
    (grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-7)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_gradient_flows_only_through_the_student_distribution(t):
    # the target holds a detached copy of the student: d/dz_s = (q - p_t) / counted positions
    s, z = _pair((2, 3, 7), 5)
    s = s.double().requires_grad_(True)
    z = z.double()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    (grad,) = torch.autograd.grad(taid(s, z, t=t, mask=mask), s)
    with torch.no_grad():
        p_t = F.softmax((1 - t) * s + t * z, -1)
        expected = (F.softmax(s, -1) - p_t) * mask.unsqueeze(-1) / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    s, z = _pair((3, 2, 5), 6, scale=1.0)
    mask = torch.tensor([[1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    s, z = s.double(), z.double()
    # through the teacher (the interpolated target) at 0 < t < 1
    teacher = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda zz: taid(s, zz, t=0.35, mask=mask), (teacher,))
    # through the student at t = 1, where the target does not depend on it (at 0 < t < 1
    # a finite difference also moves the detached target, so it would not match by design)
    student = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda ss: taid(ss, z, t=1.0, mask=mask), (student,))


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_minus_inf_logits_never_give_nan(t):
    s = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -math.inf, -math.inf]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0, -math.inf], [0.5, -math.inf, -math.inf]])
    value = taid(s, z, t=t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    # the -inf entries drop out: row 0 is a 2-class problem, row 1 has one class and KL 0
    assert value.item() == pytest.approx(reference_taid(s[:1, :2], z[:1, :2], t) / 2, abs=1e-6)


@pytest.mark.parametrize("t", [-0.1, 1.01, math.nan])
def test_t_outside_zero_one_is_an_error(t):
    with pytest.raises(ValueError, match="t must be in"):
        taid(torch.zeros(2, 3), torch.zeros(2, 3), t=t)


def test_chunked_equals_unchunked_in_value_and_gradient(monkeypatch):
    s0, z = _pair((3, 7, 11), 7)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    results = []
    for chunk in (1 << 24, 23):  # one piece, then pieces of 2 positions
        monkeypatch.setattr(chunking_module, "CHUNK_ELEMENTS", chunk)
        s = s0.clone().requires_grad_(True)
        value = taid(s, z, t=0.45, mask=mask)
        value.backward()
        results.append((value.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def _topk(teacher, k):
    values, ids = torch.log_softmax(teacher.double(), -1).topk(k, dim=-1)
    return ids, values.float()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_top_k_teacher_interpolates_over_k_plus_one_buckets(t):
    """The target is softmax((1 - t) log q_b + t log p_b) over the k tokens and the tail bucket."""
    student, teacher = _pair((3, 4, 11), seed=31)
    ids, log_p = _topk(teacher, 3)
    log_q = torch.log_softmax(student.double(), -1)
    q_k = log_q.gather(-1, ids).exp()
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    p_k = log_p.double().exp()
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    target = torch.softmax((1 - t) * q_b.log() + t * p_b.log(), -1)
    expected = (target * (target.log() - q_b.log())).sum(-1).mean()
    assert taid(student, (ids, log_p), t=t).item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_top_k_teacher_with_k_equal_to_the_vocabulary_is_dense_and_differentiable(monkeypatch):
    student, teacher = _pair((2, 5, 9), seed=32)
    for chunk in (1 << 24, 18):
        monkeypatch.setattr(chunking_module, "CHUNK_ELEMENTS", chunk)
        s_dense, s_topk = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        dense = taid(s_dense, teacher, t=0.6)
        topk = taid(s_topk, _topk(teacher, 9), t=0.6)
        dense.backward()
        topk.backward()
        assert topk.item() == pytest.approx(dense.item(), rel=1e-5)
        torch.testing.assert_close(s_topk.grad, s_dense.grad, rtol=1e-4, atol=1e-6)


def test_shape_and_mask_mismatches_are_errors():
    with pytest.raises(ValueError, match="nothing is broadcast"):
        taid(torch.zeros(2, 3), torch.zeros(1, 3), t=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        taid(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), t=0.5, mask=torch.ones(2, dtype=torch.bool))


def test_registered_with_its_schedule():
    spec = LOSSES.get("taid")
    assert spec.fn is taid and spec.state is TAIDSchedule and spec.target == "teacher"
    assert spec.param_names() == {"t_start", "t_end", "alpha", "beta", "adaptive"}
    assert isinstance(TAIDSchedule(10), TermState)


# --- the schedule ---------------------------------------------------------------------


def _noisy_falling_losses(n, seed):
    rng = np.random.default_rng(seed)
    return list(3.0 * np.exp(-np.arange(n) / 40) * (1 + 0.3 * rng.standard_normal(n)) + 0.05)


def _run(schedule, losses):
    seen = [schedule.t]
    for loss in losses:
        schedule.update(loss)
        seen.append(schedule.t)
    return seen


@pytest.mark.parametrize("alpha", [5e-4, 0.05])
def test_schedule_follows_the_momentum_rule(alpha):
    losses = _noisy_falling_losses(120, 0)
    got = _run(TAIDSchedule(100, t_start=0.2, alpha=alpha), losses)
    assert got == pytest.approx(reference_schedule(losses, 100, t_start=0.2, alpha=alpha), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    losses=st.lists(st.floats(0.0, 50.0), min_size=1, max_size=80),
    total_steps=st.integers(1, 60),
    t_start=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.0, 0.999),
)
def test_schedule_is_monotone_above_linear_and_ends_at_t_end(losses, total_steps, t_start, alpha, beta):
    t_end = 1.0 if t_start > 0.7 else 0.9
    schedule = TAIDSchedule(total_steps, t_start=t_start, t_end=t_end, alpha=alpha, beta=beta)
    seen = _run(schedule, losses)
    assert seen[0] == t_start
    for n, (before, after) in enumerate(zip(seen, seen[1:]), start=1):
        assert before <= after <= t_end
        assert after >= schedule.linear(n)
    if len(losses) >= total_steps:
        assert seen[total_steps] == pytest.approx(t_end) and seen[-1] == pytest.approx(t_end)


def test_falling_loss_pushes_t_above_the_linear_schedule():
    schedule = TAIDSchedule(1000, alpha=0.05)
    losses = [5.0 * 0.98**n for n in range(50)]
    _run(schedule, losses)
    assert schedule.t > schedule.linear(50) + 0.05


def test_non_adaptive_is_the_linear_schedule():
    schedule = TAIDSchedule(40, t_start=0.2, t_end=0.9, adaptive=False)
    seen = _run(schedule, _noisy_falling_losses(60, 1))
    expected = [0.2 + 0.7 * min(n / 40, 1.0) for n in range(61)]
    assert seen == pytest.approx(expected, abs=1e-15)


def test_a_non_finite_loss_does_not_poison_t():
    schedule = TAIDSchedule(20, alpha=0.05)
    seen = _run(schedule, [3.0, 2.5, math.nan, math.inf, 2.0, 1.8])
    assert all(math.isfinite(x) for x in seen) and seen == sorted(seen)
    assert schedule.prev_loss == 1.8


def test_state_dict_is_json_and_the_run_continues_identically():
    losses = _noisy_falling_losses(60, 2)
    straight = TAIDSchedule(50, alpha=0.01)
    expected = _run(straight, losses)
    first = TAIDSchedule(50, alpha=0.01)
    _run(first, losses[:23])
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = TAIDSchedule(50, alpha=0.01)
    resumed.load_state_dict(saved)
    assert _run(resumed, losses[23:]) == expected[23:]
    # also right after the first step, while only J_prev is known
    early = TAIDSchedule(50, alpha=0.01)
    early.update(losses[0])
    again = TAIDSchedule(50, alpha=0.01)
    again.load_state_dict(json.loads(json.dumps(early.state_dict())))
    assert _run(again, losses[1:]) == expected[1:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total_steps": 0},
        {"total_steps": 2.5},
        {"total_steps": True},
        {"total_steps": 10, "t_start": 0.8, "t_end": 0.5},
        {"total_steps": 10, "t_end": 1.5},
        {"total_steps": 10, "t_start": -0.1},
        {"total_steps": 10, "alpha": 2.0},
        {"total_steps": 10, "beta": 1.0},
        {"total_steps": 10, "adaptive": "no"},
    ],
)
def test_bad_schedule_settings_are_errors(kwargs):
    with pytest.raises(ValueError):
        TAIDSchedule(**kwargs)


def test_total_steps_may_be_any_integer_type():
    assert TAIDSchedule(np.int64(10)).total_steps == 10


# --- inside the objective ---------------------------------------------------------------


def _batches(steps, seed, micro=2):
    """(step, student logits, teacher logits) with ``micro`` micro-batches per optimizer step."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for _ in range(micro):
            yield step, torch.randn(3, 4, 8, generator=g) * 2, torch.randn(3, 4, 8, generator=g) * 2


def _drive(objective, batches):
    """Runs the objective; returns the (t the loss saw, value) of each call."""
    seen = []
    for step, s, z in batches:
        _, values = objective(ModelOutputs(logits=s), ModelOutputs(logits=z), {}, step=step)
        # a step's first call updates t from the previous step before computing the loss,
        # so after the call the state shows the t this call used
        t = objective.scalars()["taid/t"]
        seen.append((t, values["taid"].item()))
        assert values["taid"].item() == pytest.approx(taid(s, z, t=t).item(), rel=1e-6)
    return seen


def test_objective_passes_t_and_updates_once_per_optimizer_step():
    objective = Objective([ObjectiveTerm(loss="taid", params={"t_start": 0.2, "alpha": 0.05})], total_steps=100)
    state = objective.terms[0].state
    assert isinstance(state, TAIDSchedule) and objective.scalars() == {"taid/t": 0.2}
    mirror = TAIDSchedule(100, t_start=0.2, alpha=0.05)
    seen = _drive(objective, _batches(6, 0, micro=3))  # checks each value against taid(t=the state's t)
    # the objective learns that a step is over when the next one starts: the state then
    # gets that step's mean value, once
    for step in range(5):
        mirror.update(sum(v for _, v in seen[3 * step : 3 * step + 3]) / 3)
    assert state.steps_done == 5 and state.t == mirror.t
    assert state.t > state.linear(5) + 0.01  # above the linear floor: the rule ran, not only the floor


def test_objective_gives_every_micro_batch_of_a_step_the_same_t():
    objective = Objective([ObjectiveTerm(loss="taid", params={"t_start": 0.2})], total_steps=8)
    seen = _drive(objective, _batches(3, 0, micro=3))
    for step in range(3):
        assert len({t for t, _ in seen[3 * step : 3 * step + 3]}) == 1


def test_objective_state_round_trip_reproduces_the_t_sequence():
    term = ObjectiveTerm(loss="taid", params={"t_start": 0.2, "alpha": 0.05})
    batches = list(_batches(10, 1))
    straight = _drive(Objective([term], total_steps=10), batches)
    first = Objective([term], total_steps=10)
    _drive(first, batches[:9])  # stops in the middle of step 4's micro-batches
    resumed = Objective([term], total_steps=10)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _drive(resumed, batches[9:]) == straight[9:]
    assert len({t for t, _ in straight}) > 5


def test_objective_turns_bad_schedule_settings_into_recipe_errors():
    with pytest.raises(RecipeError, match=r"objective\[0\]\.params: need 0 <= t_start"):
        Objective([ObjectiveTerm(loss="taid", params={"t_start": 2.0})], total_steps=10)


def test_taid_t_is_logged_during_a_run(tmp_path, digits_teacher):
    import json

    from conftest import tiny
    from kdforge.runner import run_recipe

    recipe = tiny(
        "digits_kd",
        tmp_path,
        f"teacher.model={digits_teacher}",
        "objective[1].loss=taid",
        "objective[1].params={t_start: 0.4}",
        "evaluation.baseline=false",
    )
    run_recipe(recipe)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    ts = [r["scalars"]["taid/t"] for r in records if "scalars" in r]
    assert len(ts) >= 3 and ts == sorted(ts) and 0.4 <= ts[0] < ts[-1] <= 1.0
    assert "TAID&#39;s interpolation t" in (recipe.run_dir / "report.html").read_text()  # plotted

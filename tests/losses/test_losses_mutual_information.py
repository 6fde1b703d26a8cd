import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdforge.losses.mutual_information import MIAlpha, log_mean_exp_leave_one_out, mi_alpha_bound


def reference_scores(student, teacher, weight, bias):
    """f(t_j, s_i) = s_i^T W t_j + c, element by element in Python floats."""
    s, t, w = student.tolist(), teacher.tolist(), weight.tolist()
    return [
        [
            sum(s[i][a] * w[a][b] * t[j][b] for a in range(len(s[i])) for b in range(len(t[j]))) + bias
            for j in range(len(t))
        ]
        for i in range(len(s))
    ]


def reference_bound(f, alpha):
    """Poole et al.'s I_alpha with K = N - 1 in-batch samples, by explicit loops over Python floats."""
    n = len(f)

    def denominator(m):
        return alpha * m + (1 - alpha)

    positive = marginal = 0.0
    for i in range(n):
        # marginal: s_i is independent of every teacher row but t_i
        m_independent = sum(math.exp(f[i][k]) for k in range(n) if k != i) / (n - 1)
        for j in range(n):
            if j == i:
                continue
            # positive: t_i plus the other rows but t_j
            m_with_positive = sum(math.exp(f[i][k]) for k in range(n) if k != j) / (n - 1)
            positive += math.log(math.exp(f[i][i]) / denominator(m_with_positive))
            marginal += math.exp(f[i][j]) / denominator(m_independent)
    pairs = n * (n - 1)
    return 1 + positive / pairs - marginal / pairs


def bilinear(student_dim, teacher_dim, alpha, seed=0, scale=0.5, bias=0.0):
    module = MIAlpha(student_dim, teacher_dim, alpha=alpha).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.critic.weight.copy_(torch.randn(student_dim, teacher_dim, generator=g, dtype=torch.float64) * scale)
        module.critic.bias.fill_(bias)
    return module


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("bias", [0.0, -0.7])
def test_matches_a_float64_loop_reference_for_a_fixed_bilinear_critic(alpha, bias):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    module = bilinear(4, 3, alpha, bias=bias)
    f = reference_scores(s, t, module.critic.weight, bias)
    expected = reference_bound(f, alpha)
    assert module.bound(s, t).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert module(s, t).item() == pytest.approx(-expected, rel=1e-12, abs=1e-12)


def test_alpha_one_is_infonce_log_k_minus_cross_entropy():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = torch.randn(7, 4, generator=g, dtype=torch.float64)
    module = bilinear(5, 4, 1.0, seed=3, scale=1.0, bias=0.4)
    scores = module.scores(s, t).detach()
    n = scores.shape[0]
    # InfoNCE over K = N - 1 teacher rows (the positive and N - 2 negatives), averaged over
    # which negative is left out; the cross-entropy comes from torch's own function
    bounds = []
    for i in range(n):
        for j in range(n):
            if j != i:
                columns = [k for k in range(n) if k != j]
                logits = scores[i, columns].unsqueeze(0)
                target = torch.tensor([columns.index(i)])
                bounds.append(math.log(n - 1) - F.cross_entropy(logits, target).item())
    assert module.bound(s, t).item() == pytest.approx(sum(bounds) / len(bounds), rel=1e-12)


def test_alpha_zero_is_nwj_with_baseline_one():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    module = bilinear(3, 3, 0.0, seed=5, bias=0.3)
    scores = module.scores(s, t).detach()
    n = scores.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    # Nguyen-Wainwright-Jordan's E_p[f'] - e^{-1} E_{p(t)p(s)}[e^{f'}] with f' = f + 1
    shifted = scores + 1
    nwj = shifted.diagonal().mean() - math.exp(-1) * shifted[off].exp().mean()
    assert module.bound(s, t).item() == pytest.approx(nwj.item(), rel=1e-12)


def test_alpha_one_is_at_most_log_k_and_approaches_it_for_a_sharp_critic():
    g = torch.Generator().manual_seed(6)
    n = 9
    for _ in range(20):
        scores = torch.randn(n, n, generator=g, dtype=torch.float64) * 3
        assert mi_alpha_bound(scores, 1.0).item() <= math.log(n - 1) + 1e-12
    sharp = torch.eye(n, dtype=torch.float64) * 50
    assert mi_alpha_bound(sharp, 1.0).item() == pytest.approx(math.log(n - 1), abs=1e-12)
    # a critic that ignores its inputs (every score c) gives 1 + x - e^x <= 0, x = c - log(alpha e^c + 1 - alpha)
    for alpha in (0.0, 0.5, 1.0):
        for c in (-1.0, 0.0, 2.0):
            x = c - math.log(alpha * math.exp(c) + 1 - alpha)
            constant = torch.full((n, n), c, dtype=torch.float64)
            assert mi_alpha_bound(constant, alpha).item() == pytest.approx(1 + x - math.exp(x), abs=1e-12)


def test_a_fresh_module_starts_at_zero():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g)
    for critic in ("bilinear", "mlp"):
        for alpha in (0.0, 0.5, 1.0):
            assert MIAlpha(5, 6, alpha=alpha, critic=critic, hidden=16)(s, t).item() == pytest.approx(0.0, abs=1e-6)


def test_leave_one_out_log_mean_exp_matches_brute_force_at_extreme_spreads():
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(6, 6, generator=g, dtype=torch.float64) * 200
    scores[0, 3] = 1e4  # one entry dominates its row by far: leaving it out must not cancel to -inf
    scores[1] = 5.0  # a row of ties
    got = log_mean_exp_leave_one_out(scores)
    n = scores.shape[0]
    for i in range(n):
        for j in range(n):
            others = torch.cat([scores[i, :j], scores[i, j + 1 :]])
            expected = torch.logsumexp(others, 0) - math.log(n - 1)
            assert got[i, j].item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    assert torch.isfinite(got).all()


def test_large_scores_stay_finite_for_alpha_above_zero():
    g = torch.Generator().manual_seed(9)
    scores = (torch.randn(16, 16, generator=g) * 1e3).requires_grad_()
    value = mi_alpha_bound(scores, 0.5)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(scores.grad).all()
    # each marginal ratio is at most (N - 1) / alpha
    assert value.item() >= 1 - 15 / 0.5 - 1e3 * 100


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_gradcheck_bilinear(alpha):
    g = torch.Generator().manual_seed(10)
    module = bilinear(3, 2, alpha, seed=11, scale=0.8, bias=0.2)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = module.critic.weight.detach().clone().requires_grad_()
    c = module.critic.bias.detach().clone().requires_grad_()

    def loss(s, t, w, c):
        return functional_call(module, {"critic.weight": w, "critic.bias": c}, (s, t))

    assert torch.autograd.gradcheck(loss, (s, t, w, c))


def test_gradcheck_mlp_critic():
    g = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    module = MIAlpha(3, 2, alpha=0.4, critic="mlp", hidden=5).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def loss(s, t, *params):
        return functional_call(module, dict(zip(names, params)), (s, t))

    assert torch.autograd.gradcheck(loss, (s, t, *params))


def test_mask_counts_only_the_selected_positions_of_the_whole_batch():
    g = torch.Generator().manual_seed(13)
    module = bilinear(4, 3, 0.5, seed=14)
    s = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = module(s[mask], t[mask])
    assert module(s, t, mask=mask).item() == pytest.approx(expected.item(), rel=1e-12)
    # without a mask, [B, L, D] is the flattened [B * L, D]
    assert module(s, t).item() == pytest.approx(module(s.reshape(10, 4), t.reshape(10, 3)).item(), rel=1e-12)
    # a [B] mask on [B, D] inputs
    rows = torch.tensor([True, False, True, True, False])
    assert module(s[0], t[0], mask=rows).item() == pytest.approx(module(s[0][rows], t[0][rows]).item(), rel=1e-12)


def test_half_inputs_and_autocast_compute_in_float32():
    g = torch.Generator().manual_seed(15)
    module = MIAlpha(4, 3)
    with torch.no_grad():
        module.critic.weight.copy_(torch.randn(4, 3, generator=g))
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    full = module(s, t)
    half = module(s.bfloat16(), t.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(module(s.bfloat16().float(), t.bfloat16().float()).item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = module(s, t)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(full.item(), rel=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        MIAlpha(3, 3, alpha=1.5)
    with pytest.raises(ValueError, match="critic"):
        MIAlpha(3, 3, critic="concat")
    with pytest.raises(ValueError, match="student_dim"):
        MIAlpha(0, 3)
    module = MIAlpha(3, 2)
    with pytest.raises(ValueError, match="teacher"):
        module(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="student"):
        module(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="mask"):
        module(torch.randn(4, 3), torch.randn(4, 2), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        module(torch.randn(4, 3), torch.randn(4, 2), mask=torch.tensor([True, False, False, False]))


def correlated_pairs(n, dim, rho, generator):
    teacher = torch.randn(n, dim, generator=generator)
    student = rho * teacher + math.sqrt(1 - rho**2) * torch.randn(n, dim, generator=generator)
    return student, teacher


@pytest.fixture
def one_thread():
    """Tiny matrices train faster on one thread than on threads that contend for the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("critic", ["bilinear", "mlp"])
def test_training_the_critic_raises_the_bound_on_dependent_pairs_only(critic):
    torch.manual_seed(16)
    g = torch.Generator().manual_seed(17)
    dim, rho, n = 4, 0.8, 128  # true MI = -dim/2 log(1 - rho^2) = 2.04 nats
    module = MIAlpha(dim, dim, alpha=0.5, critic=critic, hidden=32)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(300):
        s, t = correlated_pairs(n, dim, rho, g)
        optimizer.zero_grad()
        module(s, t).backward()
        optimizer.step()
    with torch.no_grad():
        s, t = correlated_pairs(1024, dim, rho, g)
        dependent = module.bound(s, t).item()
        independent = module.bound(s, torch.randn(1024, dim, generator=g)).item()
    assert dependent > 0.8  # trained: bilinear about 1.2, mlp about 1.9
    assert dependent < 2.04 + 0.2  # a lower bound, up to the estimate's noise
    assert independent < 0.1
    assert dependent > independent + 1.0

import math

import pytest
import torch

from kdforge.losses import LOSSES
from kdforge.losses.ranking import listnet, listwise_kl, margin_mse, margin_mse_scores


def scores(*shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def random_mask(rows, cols, seed=0, keep=0.7, min_per_row=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < keep
    mask[:, :min_per_row] = True
    return mask


# ---------------------------------------------------------------- float64 references, written from the formulas


def softmax_list(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def reference_listwise(student, teacher, temperature, mask=None, kind="kl"):
    """Per query: KL(p||q) (times T^2) or -sum p log q over the real candidates; mean over queries with any."""
    per_query = []
    for b in range(student.shape[0]):
        cols = [j for j in range(student.shape[1]) if mask is None or bool(mask[b, j])]
        if not cols:
            continue
        p = softmax_list([float(teacher[b, j]) / temperature for j in cols])
        q = softmax_list([float(student[b, j]) / temperature for j in cols])
        if kind == "kl":
            per_query.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0) * temperature**2)
        else:
            per_query.append(-sum(pi * math.log(qi) for pi, qi in zip(p, q) if pi > 0))
    return sum(per_query) / len(per_query) if per_query else 0.0


def reference_margin_mse(s_pos, s_neg, t_pos, t_neg):
    s_neg = s_neg.reshape(s_neg.shape[0], -1)
    t_neg = t_neg.reshape(t_neg.shape[0], -1)
    errors = [
        ((float(s_pos[b]) - float(s_neg[b, k])) - (float(t_pos[b]) - float(t_neg[b, k]))) ** 2
        for b in range(s_neg.shape[0])
        for k in range(s_neg.shape[1])
    ]
    return sum(errors) / len(errors)


# ---------------------------------------------------------------- margin_mse


@pytest.mark.parametrize("negatives", [None, 1, 4])
def test_margin_mse_matches_float64_reference(negatives):
    neg_shape = (6,) if negatives is None else (6, negatives)
    s_pos, t_pos = scores(6, seed=1), scores(6, seed=2)
    s_neg, t_neg = scores(*neg_shape, seed=3), scores(*neg_shape, seed=4)
    got = margin_mse(s_pos, s_neg, t_pos, t_neg)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference_margin_mse(s_pos, s_neg, t_pos, t_neg), rel=1e-6)


def test_registered_margin_mse_reads_positive_from_column_zero_and_respects_the_mask():
    student, teacher = scores(5, 4, seed=5), scores(5, 4, seed=6)
    expected = reference_margin_mse(student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:])
    assert margin_mse_scores(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert LOSSES.get("margin_mse").fn is margin_mse_scores
    mask = random_mask(5, 4, seed=7)
    mask[2, 0] = False  # a query without its positive: none of its pairs count
    errors = [
        ((float(student[b, 0]) - float(student[b, k])) - (float(teacher[b, 0]) - float(teacher[b, k]))) ** 2
        for b in range(5)
        for k in range(1, 4)
        if mask[b, 0] and mask[b, k]
    ]
    got = margin_mse_scores(student, teacher, mask=mask)
    assert got.item() == pytest.approx(sum(errors) / len(errors), rel=1e-6)


def test_margin_mse_bfloat16_inputs_compute_in_float32():
    args = [scores(8, seed=i) if i % 2 == 0 else scores(8, 3, seed=i) for i in range(4)]
    s_pos, s_neg, t_pos, t_neg = args
    got = margin_mse(*(a.bfloat16() for a in (s_pos, s_neg, t_pos, t_neg)))
    assert got.dtype == torch.float32
    rounded = [a.bfloat16().double() for a in (s_pos, s_neg, t_pos, t_neg)]
    assert got.item() == pytest.approx(reference_margin_mse(*rounded), rel=1e-5)
    assert got.item() == pytest.approx(reference_margin_mse(s_pos, s_neg, t_pos, t_neg), rel=5e-2)


def test_margin_mse_gradcheck():
    s_pos = scores(3, seed=1, dtype=torch.float64).requires_grad_()
    s_neg = scores(3, 2, seed=2, dtype=torch.float64).requires_grad_()
    t_pos, t_neg = scores(3, seed=3, dtype=torch.float64), scores(3, 2, seed=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: margin_mse(a, b, t_pos, t_neg), (s_pos, s_neg))
    student = scores(3, 4, seed=5, dtype=torch.float64).requires_grad_()
    teacher = scores(3, 4, seed=6, dtype=torch.float64)
    mask = random_mask(3, 4, seed=1)
    assert torch.autograd.gradcheck(lambda s: margin_mse_scores(s, teacher, mask=mask), (student,))


def test_margin_mse_shape_errors():
    with pytest.raises(ValueError, match=r"\[B\] or \[B, K\]"):
        margin_mse(torch.zeros(3), torch.zeros(4, 2), torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="nothing is broadcast"):
        margin_mse(torch.zeros(3), torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="positive scores"):
        margin_mse(torch.zeros(3, 1), torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\[B, 1\+K\]"):
        margin_mse_scores(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="mask shape"):
        margin_mse_scores(torch.zeros(3, 2), torch.zeros(3, 2), mask=torch.ones(3, dtype=torch.bool))


def test_margin_mse_matches_sentence_transformers_margin_mse_loss():
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    oracle = st_losses.MarginMSELoss(model=None)  # the model is only used by forward(), not here
    student, teacher = scores(6, 4, seed=8, dtype=torch.float64), scores(6, 4, seed=9, dtype=torch.float64)
    # Its scores come from pairwise_dot_score(query, doc); a query embedding of [1] and a
    # one-dimensional doc embedding [s] make each score exactly s. Labels given as 1+K raw
    # teacher scores are turned into the K margins by the oracle itself.
    ones = torch.ones(6, 1, dtype=torch.float64)
    columns = [ones] + [student[:, j : j + 1] for j in range(4)]
    expected = oracle.compute_loss_from_embeddings(columns, teacher).item()
    assert margin_mse_scores(student, teacher).item() == pytest.approx(expected, abs=1e-6, rel=1e-9)
    assert margin_mse(student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:]).item() == pytest.approx(
        expected, abs=1e-6, rel=1e-9
    )
    # one negative, labels given as the teacher margin [B]
    expected = oracle.compute_loss_from_embeddings(columns[:3], teacher[:, 0] - teacher[:, 1]).item()
    got = margin_mse(student[:, 0], student[:, 1], teacher[:, 0], teacher[:, 1])
    assert got.item() == pytest.approx(expected, abs=1e-6, rel=1e-9)


# ---------------------------------------------------------------- listwise_kl and listnet


@pytest.mark.parametrize("loss, kind", [(listwise_kl, "kl"), (listnet, "ce")])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("masked", [False, True])
def test_listwise_losses_match_float64_reference(loss, kind, temperature, masked):
    student, teacher = scores(7, 9, seed=10), scores(7, 9, seed=11)
    mask = random_mask(7, 9, seed=12) if masked else None
    got = loss(student, teacher, temperature=temperature, mask=mask)
    assert got.dtype == torch.float32 and got.ndim == 0
    expected = reference_listwise(student, teacher, temperature, mask, kind)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss, kind", [(listwise_kl, "kl"), (listnet, "ce")])
def test_listwise_mask_drops_queries_without_candidates_and_ignores_masked_scores(loss, kind):
    student, teacher = scores(4, 5, seed=13), scores(4, 5, seed=14)
    mask = random_mask(4, 5, seed=15)
    mask[1] = False
    got = loss(student, teacher, temperature=2.0, mask=mask)
    assert got.item() == pytest.approx(reference_listwise(student, teacher, 2.0, mask, kind), rel=1e-5)
    # whatever sits at masked places does not matter
    noisy_s = torch.where(mask, student, torch.full_like(student, 1e4))
    noisy_t = torch.where(mask, teacher, torch.full_like(teacher, -1e4))
    assert loss(noisy_s, noisy_t, temperature=2.0, mask=mask).item() == pytest.approx(got.item(), rel=1e-6)
    # nothing counts: zero, not NaN
    nothing = loss(student, teacher, mask=torch.zeros(4, 5, dtype=torch.bool))
    assert nothing.item() == 0.0


@pytest.mark.parametrize("loss", [listwise_kl, listnet])
def test_listwise_bfloat16_inputs_compute_in_float32(loss):
    student, teacher = scores(5, 8, seed=16), scores(5, 8, seed=17)
    mask = random_mask(5, 8, seed=18)
    got = loss(student.bfloat16(), teacher.bfloat16(), temperature=2.0, mask=mask)
    assert got.dtype == torch.float32
    exact = loss(student.bfloat16().float(), teacher.bfloat16().float(), temperature=2.0, mask=mask)
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)
    assert got.item() == pytest.approx(loss(student, teacher, temperature=2.0, mask=mask).item(), rel=5e-2)


@pytest.mark.parametrize("loss", [listwise_kl, listnet])
def test_listwise_gradcheck(loss):
    student = scores(3, 5, seed=19, scale=1.0, dtype=torch.float64).requires_grad_()
    teacher = scores(3, 5, seed=20, scale=1.0, dtype=torch.float64).requires_grad_()
    mask = random_mask(3, 5, seed=21)
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, temperature=1.7, mask=mask), (student, teacher))
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, temperature=0.6), (student, teacher))


@pytest.mark.parametrize("loss", [listwise_kl, listnet])
def test_listwise_minus_inf_scores_never_give_nan(loss):
    student = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -math.inf, 0.5]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, -math.inf], [0.5, -math.inf, -math.inf]], requires_grad=True)
    value = loss(student, teacher, temperature=2.0)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


def test_listwise_identical_scores_give_zero_kl_and_the_teacher_entropy_for_listnet():
    x = scores(3, 6, seed=22)
    assert listwise_kl(x, x, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(x.double() / 3.0, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert listnet(x, x, temperature=3.0).item() == pytest.approx(entropy.item(), rel=1e-5)


@pytest.mark.parametrize("loss", [listwise_kl, listnet])
def test_listwise_errors(loss):
    with pytest.raises(ValueError, match="temperature"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="nothing is broadcast"):
        loss(torch.zeros(2, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="mask shape"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2, dtype=torch.bool))


def distill_kl_oracle(student, teacher, temperature):
    """sentence-transformers' DistillKLDivLoss on plain [B, N] scores.

    Its scores are pairwise_dot_score(query, candidate); a query embedding of [1] and
    one-dimensional candidate embeddings [s] make each score exactly s.
    """
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    oracle = st_losses.DistillKLDivLoss(model=None, temperature=temperature)  # model only used by forward()
    ones = torch.ones(student.shape[0], 1, dtype=student.dtype)
    columns = [ones] + [student[:, j : j + 1] for j in range(student.shape[1])]
    return oracle.compute_loss_from_embeddings(columns, teacher)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_listwise_kl_matches_sentence_transformers_distill_kl_div_loss(temperature):
    student, teacher = scores(6, 5, seed=23, dtype=torch.float64), scores(6, 5, seed=24, dtype=torch.float64)
    # Same convention: batchmean KL(softmax(t/T) || softmax(s/T)) times T^2 (one shared T).
    expected = distill_kl_oracle(student, teacher, temperature).item()
    assert listwise_kl(student, teacher, temperature=temperature).item() == pytest.approx(expected, abs=1e-6)
    # float32 inputs, as in training
    got32 = listwise_kl(student.float(), teacher.float(), temperature=temperature)
    assert got32.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_listwise_kl_mask_matches_the_oracle_on_each_querys_real_candidates():
    # The oracle has no mask: run it per query on that query's real candidates only
    # (each a batch of one, so batchmean = that query's KL) and average over queries.
    student, teacher = scores(5, 6, seed=25, dtype=torch.float64), scores(5, 6, seed=26, dtype=torch.float64)
    mask = random_mask(5, 6, seed=27, min_per_row=2)
    per_query = [
        distill_kl_oracle(student[b : b + 1, mask[b]], teacher[b : b + 1, mask[b]], 2.0).item() for b in range(5)
    ]
    got = listwise_kl(student, teacher, temperature=2.0, mask=mask)
    assert got.item() == pytest.approx(sum(per_query) / 5, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_listnet_matches_the_oracle_kl_plus_teacher_entropy(temperature):
    # ListNet's cross-entropy H(p, q) = KL(p || q) + H(p). The oracle's value is
    # KL * T^2, and ListNet has no T^2 factor, so: H(p, q) = oracle / T^2 + H(p),
    # with p = softmax(t / T) and the entropy H(p) written out here.
    student, teacher = scores(6, 5, seed=28, dtype=torch.float64), scores(6, 5, seed=29, dtype=torch.float64)
    p = torch.softmax(teacher / temperature, -1)
    teacher_entropy = -(p * torch.log(p)).sum(-1).mean().item()
    expected = distill_kl_oracle(student, teacher, temperature).item() / temperature**2 + teacher_entropy
    assert listnet(student, teacher, temperature=temperature).item() == pytest.approx(expected, abs=1e-6)


def test_registry_entries():
    assert LOSSES.get("listwise_kl").fn is listwise_kl
    assert LOSSES.get("listnet").fn is listnet
    assert LOSSES.get("listwise_kl").param_names() == {"temperature", "teacher_temperature"}
    assert LOSSES.get("listnet").param_names() == {"temperature"}
    assert LOSSES.get("margin_mse").param_names() == set()
    assert all(LOSSES.get(n).target == "teacher" for n in ("margin_mse", "listwise_kl", "listnet"))


def test_listwise_kl_teacher_temperature_rescales_the_teacher_only():
    """Geng et al.: ensemble scores in [0, 1] times 30, then KL at T = 1 (teacher_temperature 1/30)."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 7, generator=g) * 5, torch.rand(3, 7, generator=g)
    p = torch.softmax(t * 30, -1)
    expected = (p * (p.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(listwise_kl(s, t, teacher_temperature=1 / 30), expected)
    # with both temperatures given: t / T_t against s / T, times T^2
    p = torch.softmax(t / 0.1, -1)
    expected = (p * (p.log() - torch.log_softmax(s / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(listwise_kl(s, t, temperature=2.0, teacher_temperature=0.1), expected)
    with pytest.raises(ValueError, match="temperature"):
        listwise_kl(s, t, teacher_temperature=0.0)

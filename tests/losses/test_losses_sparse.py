import pytest
import torch

from kdforge.losses import LOSSES
from kdforge.losses.sparse import flops, flops_regulariser


def weights(*shape, seed=0, dtype=torch.float32, signed=False):
    """SPLADE-like term weights: log(1 + ReLU(x)), mostly zero; signed=True keeps raw values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 - 1
    w = x if signed else torch.log1p(torch.relu(x))
    return w.to(dtype)


def reference_flops(w):
    """sum_v (1/B sum_b |w_bv|)^2, with plain loops."""
    batch, vocab = w.shape
    return sum((sum(abs(float(w[b, v])) for b in range(batch)) / batch) ** 2 for v in range(vocab))


@pytest.mark.parametrize("signed", [False, True])
def test_flops_matches_float64_reference(signed):
    w = weights(6, 40, seed=1, signed=signed)
    got = flops(w)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(reference_flops(w), rel=1e-6)


def test_flops_with_candidate_slots_takes_the_batch_mean_per_slot():
    w = weights(4, 3, 20, seed=2)
    expected = sum(reference_flops(w[:, g]) for g in range(3))
    assert flops(w).item() == pytest.approx(expected, rel=1e-6)


def test_flops_bfloat16_inputs_compute_in_float32():
    w = weights(8, 50, seed=3)
    got = flops(w.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_flops(w.bfloat16().double()), rel=1e-5)
    assert got.item() == pytest.approx(reference_flops(w), rel=2e-2)


def test_flops_gradcheck():
    # signed weights away from 0, where |w| is differentiable
    w = weights(3, 5, seed=4, dtype=torch.float64, signed=True)
    w = (w + torch.sign(w) * 0.1).requires_grad_()
    assert torch.autograd.gradcheck(flops, (w,))
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda x: flops_regulariser(x, None, mask=mask), (w,))


def test_flops_penalises_a_term_every_row_uses_more_than_terms_each_row_has_alone():
    # The same mass per row. Squaring the batch mean makes a term that is active in every
    # row (expensive in an inverted index) cost B times more than B rare terms.
    concentrated = torch.zeros(4, 8)
    concentrated[:, 0] = 1.0
    spread = torch.zeros(4, 8)
    spread[torch.arange(4), torch.arange(4)] = 1.0
    assert flops(concentrated).item() == pytest.approx(1.0)
    assert flops(spread).item() == pytest.approx(4 * (1 / 4) ** 2)


def test_registered_flops_ignores_the_teacher_and_masks_rows():
    w = weights(5, 30, seed=5)
    assert LOSSES.get("flops").fn is flops_regulariser
    assert LOSSES.get("flops").param_names() == set()
    assert flops_regulariser(w, torch.randn(5, 30)).item() == pytest.approx(flops(w).item())
    assert flops_regulariser(w, None).item() == pytest.approx(flops(w).item())
    mask = torch.tensor([True, False, True, True, False])
    assert flops_regulariser(w, None, mask=mask).item() == pytest.approx(reference_flops(w[mask]), rel=1e-6)
    nothing = flops_regulariser(w.requires_grad_(), None, mask=torch.zeros(5, dtype=torch.bool))
    nothing.backward()
    assert nothing.item() == 0.0 and (w.grad == 0).all()


def test_flops_errors():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        flops(torch.zeros(5))
    with pytest.raises(ValueError, match=r"flops mask must be \[B\]"):
        flops_regulariser(torch.zeros(3, 4), None, mask=torch.ones(3, 4, dtype=torch.bool))


def test_flops_matches_sentence_transformers_flops_loss():
    sparse_losses = pytest.importorskip("sentence_transformers.sparse_encoder.losses")
    w = weights(6, 40, seed=6, dtype=torch.float64)
    # FlopsLoss.compute_loss_from_embeddings is sum_v (mean_b w_bv)^2 without the absolute
    # value: SPLADE weights are non-negative, where the two agree. model=None: the model is
    # only used by forward(), which the oracle refuses to run on its own anyway.
    oracle = sparse_losses.FlopsLoss(model=None)
    assert (w >= 0).all()
    assert flops(w).item() == pytest.approx(oracle.compute_loss_from_embeddings(w).item(), abs=1e-6, rel=1e-9)
    # Our row mask (the mean over the counted rows) is the oracle on those rows only. Its
    # own `threshold` zeroes rows with too few non-zeros but still divides by the full
    # batch, so it is our flops of the zeroed weights, not of the kept rows:
    mask = torch.tensor([True, True, False, True, False, True])
    expected = oracle.compute_loss_from_embeddings(w[mask]).item()
    assert flops_regulariser(w, None, mask=mask).item() == pytest.approx(expected, abs=1e-6, rel=1e-9)
    w[1, 3:] = 0.0  # row 1 keeps 3 non-zeros, below the threshold
    thresholded = sparse_losses.FlopsLoss(model=None, threshold=3).compute_loss_from_embeddings(w).item()
    keep = ((w != 0).sum(1) > 3).to(w.dtype)
    assert flops(w * keep[:, None]).item() == pytest.approx(thresholded, abs=1e-6, rel=1e-9)

import pytest
import torch

from kdforge.outputs import ModelOutputs
from kdforge.signals.base import TeacherSignal
from kdforge.signals.ensemble import EnsembleTeacher, minmax_per_query, mix_topk


class Fixed(TeacherSignal):
    def __init__(self, **outputs):
        self.out = outputs

    def outputs(self, batch, fields):
        return ModelOutputs(**{f: self.out[f] for f in fields})


def _topk(logits, k):
    values, ids = torch.log_softmax(logits, -1).topk(k, -1)
    return ids, values


def test_dense_logits_are_averaged_as_probabilities():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    out = EnsembleTeacher([Fixed(logits=a), Fixed(logits=b)], [3.0, 1.0]).outputs({}, frozenset({"logits"}))
    expected = 0.75 * torch.softmax(a, -1) + 0.25 * torch.softmax(b, -1)
    torch.testing.assert_close(out.logits.exp(), expected)
    # not the mean of logits or of log-probs
    assert not torch.allclose(out.logits.softmax(-1), torch.softmax(0.75 * a + 0.25 * b, -1), atol=1e-3)


def test_topk_and_dense_members_mix_over_the_union_of_tokens():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 12, generator=g) * 2, torch.randn(5, 12, generator=g) * 2
    ids, log_p = mix_topk([_topk(a, 3), b], [0.5, 0.5])
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    for row in range(5):
        top_a = set(_topk(a[row], 3)[0].tolist())
        candidates = top_a | set(pb[row].topk(3).indices.tolist())
        mixed = {c: 0.5 * (pa[row, c].item() if c in top_a else 0.0) + 0.5 * pb[row, c].item() for c in candidates}
        best = sorted(mixed.items(), key=lambda kv: -kv[1])[:3]
        assert ids[row].tolist() == [c for c, _ in best]
        torch.testing.assert_close(log_p[row].exp(), torch.tensor([v for _, v in best]), rtol=1e-5, atol=1e-7)


def test_a_complete_topk_member_mixes_like_its_dense_logits():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    ids, log_p = mix_topk([_topk(a, 6), _topk(b, 6)], [0.3, 0.7])
    dense = 0.3 * torch.softmax(a, -1) + 0.7 * torch.softmax(b, -1)
    torch.testing.assert_close(log_p.exp(), dense.gather(-1, ids))
    assert (ids.sort(-1).values == torch.arange(6)).all()  # every token once


def test_scores_are_min_max_normalised_per_query_before_averaging():
    bm25 = torch.tensor([[10.0, 20.0, 30.0], [1.0, 1.5, 0.5]])
    dense = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.2, 0.2]])
    out = EnsembleTeacher([Fixed(scores=bm25), Fixed(scores=dense)]).outputs({}, frozenset({"scores"}))
    expected = 0.5 * minmax_per_query(bm25) + 0.5 * minmax_per_query(dense)
    torch.testing.assert_close(out.scores, expected)
    assert out.scores[0].tolist() == pytest.approx([0.0, 0.75, 0.75])
    assert out.scores[1].tolist() == pytest.approx([0.25, 0.5, 0.0])  # a constant row counts 0


def test_embeddings_weighted_mean_and_shape_check():
    a, b = torch.ones(2, 4), torch.zeros(2, 4)
    out = EnsembleTeacher([Fixed(embeddings=a), Fixed(embeddings=b)], [1, 3]).outputs({}, frozenset({"embeddings"}))
    torch.testing.assert_close(out.embeddings, torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="shapes"):
        EnsembleTeacher([Fixed(embeddings=a), Fixed(embeddings=torch.zeros(2, 5))]).outputs(
            {}, frozenset({"embeddings"})
        )


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0]])
def test_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        EnsembleTeacher([Fixed(), Fixed()], weights)

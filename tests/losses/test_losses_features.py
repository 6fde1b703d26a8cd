import math

import pytest
import torch
from torch import nn

from kdforge.losses import LOSSES
from kdforge.losses.features import (
    attention_kl,
    cosine_distance,
    embedding_mse,
    hidden_mse,
    qkv_relations,
    value_relation,
)


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def token_mask(batch, length, lengths):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def attention_probs(batch, heads, length, mask=None, seed=0, dtype=torch.float64):
    """Row-softmax of random scores; padded keys get exactly zero probability, as in transformers."""
    z = randn(batch, heads, length, length, seed=seed, dtype=torch.float64) * 2
    if mask is not None:
        z = z.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.softmax(z, -1).to(dtype)


def st_losses():
    return pytest.importorskip("sentence_transformers.sentence_transformer.losses")


# ---------------------------------------------------------------- float64 references, written from the formulas


def reference_attention_kl(student, teacher, mask=None):
    """(1 / (heads * counted queries)) * sum_{b, h, counted i} sum_j p log(p / q), skipping p = 0."""
    batch, heads, length, _ = teacher.shape
    total, counted = 0.0, 0
    for b in range(batch):
        for i in range(length):
            if mask is not None and not mask[b, i]:
                continue
            counted += 1
            for h in range(heads):
                for j in range(length):
                    p, q = float(teacher[b, h, i, j]), float(student[b, h, i, j])
                    if p > 0:
                        total += p * math.log(p / q)
    return total / (heads * counted)


def reference_relation_kl(student, teacher, heads, mask=None):
    """MiniLM relation KL: per head a, rows softmax_j(<x_i^a, x_j^a> / sqrt(d_a)) over real keys j."""

    def relation_row(x, b, a, i):
        d = x.shape[-1] // heads
        keys = [j for j in range(x.shape[1]) if mask is None or mask[b, j]]
        logits = [
            sum(float(x[b, i, a * d + c]) * float(x[b, j, a * d + c]) for c in range(d)) / math.sqrt(d) for j in keys
        ]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        return [e / sum(exps) for e in exps]

    batch, length, _ = teacher.shape
    total, counted = 0.0, 0
    for b in range(batch):
        for i in range(length):
            if mask is not None and not mask[b, i]:
                continue
            counted += 1
            for a in range(heads):
                p, q = relation_row(teacher, b, a, i), relation_row(student, b, a, i)
                total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / (heads * counted)


# ---------------------------------------------------------------- embedding_mse, cosine_distance


def test_embedding_losses_match_float64_reference():
    s, t = randn(6, 10, seed=1), randn(6, 10, seed=2)
    sd, td = s.double(), t.double()
    mse = sum(float(sd[b, d] - td[b, d]) ** 2 for b in range(6) for d in range(10)) / 60
    cos = [float((sd[b] * td[b]).sum() / (sd[b].norm() * td[b].norm())) for b in range(6)]
    got_mse, got_cos = embedding_mse(s, t), cosine_distance(s, t)
    assert got_mse.dtype == got_cos.dtype == torch.float32
    assert got_mse.item() == pytest.approx(mse, rel=1e-6)
    assert got_cos.item() == pytest.approx(sum(1 - c for c in cos) / 6, rel=1e-6)
    mask = torch.tensor([True, False, True, True, False, True])
    kept = [b for b in range(6) if mask[b]]
    masked_mse = sum(float(sd[b, d] - td[b, d]) ** 2 for b in kept for d in range(10)) / (len(kept) * 10)
    assert embedding_mse(s, t, mask=mask).item() == pytest.approx(masked_mse, rel=1e-6)
    assert cosine_distance(s, t, mask=mask).item() == pytest.approx(sum(1 - cos[b] for b in kept) / len(kept), rel=1e-6)


def test_embedding_losses_bfloat16_gradcheck_and_errors():
    s, t = randn(4, 8, seed=3), randn(4, 8, seed=4)
    for loss in (embedding_mse, cosine_distance):
        got = loss(s.bfloat16(), t.bfloat16())
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(loss(s.bfloat16().float(), t.bfloat16().float()).item(), rel=1e-6)
        assert got.item() == pytest.approx(loss(s, t).item(), rel=5e-2)
        sd = s.double().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, loss=loss: loss(x, t.double()), (sd,))
        with pytest.raises(ValueError, match="nothing is broadcast"):
            loss(torch.zeros(4, 8), torch.zeros(4, 9))
        with pytest.raises(ValueError, match="mask shape"):
            loss(s, t, mask=torch.ones(4, 8, dtype=torch.bool))
    # a zero vector is cosine 0 with anything, never NaN
    zero = torch.zeros(1, 8, requires_grad=True)
    value = cosine_distance(zero, t[:1])
    value.backward()
    assert value.item() == pytest.approx(1.0) and torch.isfinite(zero.grad).all()


def test_embedding_losses_match_sentence_transformers():
    losses = st_losses()
    s, t = randn(6, 10, seed=5, dtype=torch.float64), randn(6, 10, seed=6, dtype=torch.float64)
    # model=None: the model is only used by forward() (and to size a projection we do not ask for)
    expected_mse = losses.MSELoss(model=None).compute_loss_from_embeddings([s], [t]).item()
    assert embedding_mse(s, t).item() == pytest.approx(expected_mse, abs=1e-6, rel=1e-9)
    cosine = losses.EmbedDistillLoss(model=None, distance_metric="cosine")
    expected_cos = cosine.compute_loss_from_embeddings([s], [t]).item()
    assert cosine_distance(s, t).item() == pytest.approx(expected_cos, abs=1e-6, rel=1e-9)


# ---------------------------------------------------------------- hidden_mse


def test_hidden_mse_matches_float64_reference_with_mask_and_projection():
    s, t = randn(3, 5, 4, seed=7), randn(3, 5, 6, seed=8)
    mask = token_mask(3, 5, [5, 2, 3])
    proj = nn.Linear(4, 6)
    with torch.no_grad():
        proj.weight.copy_(randn(6, 4, seed=9))
        proj.bias.copy_(randn(6, seed=10))
    w, bias = proj.weight.detach().double(), proj.bias.detach().double()
    total, counted = 0.0, 0
    for b in range(3):
        for i in range(5):
            if not mask[b, i]:
                continue
            counted += 1
            for h in range(6):
                projected = sum(float(w[h, c]) * float(s[b, i, c]) for c in range(4)) + float(bias[h])
                total += (projected - float(t[b, i, h])) ** 2
    got = hidden_mse(s, t, projection=proj, mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(total / (counted * 6), rel=1e-5)
    # without a projection, equal sizes
    t4 = randn(3, 5, 4, seed=11)
    plain = sum(
        float(s[b, i, h] - t4[b, i, h]) ** 2 for b in range(3) for i in range(5) for h in range(4) if mask[b, i]
    )
    assert hidden_mse(s, t4, mask=mask).item() == pytest.approx(plain / (counted * 4), rel=1e-6)


def test_hidden_mse_matches_sentence_transformers_mse_on_counted_tokens():
    losses = st_losses()
    s, t = randn(3, 5, 4, seed=12, dtype=torch.float64), randn(3, 5, 6, seed=13, dtype=torch.float64)
    mask = token_mask(3, 5, [4, 5, 1])
    proj = nn.Linear(4, 6).double()
    # The oracle compares [N, D] embeddings: give it the counted tokens as rows, and our
    # projection as its projection layer (it applies self.projection to the student side).
    oracle = losses.MSELoss(model=None)
    oracle.projection = proj
    expected = oracle.compute_loss_from_embeddings([s[mask]], [t[mask]]).item()
    assert hidden_mse(s, t, projection=proj, mask=mask).item() == pytest.approx(expected, abs=1e-6, rel=1e-9)


def test_hidden_mse_bfloat16_gradcheck_and_errors():
    s, t = randn(2, 4, 3, seed=14), randn(2, 4, 3, seed=15)
    mask = token_mask(2, 4, [4, 2])
    got = hidden_mse(s.bfloat16(), t.bfloat16(), mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hidden_mse(s, t, mask=mask).item(), rel=5e-2)
    proj = nn.Linear(3, 5).double()
    sd = s.double().requires_grad_()
    t5 = randn(2, 4, 5, seed=16, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: hidden_mse(x, t5, projection=proj, mask=mask), (sd,))
    with pytest.raises(ValueError, match="hidden sizes differ.*no projection"):
        hidden_mse(s, t5.float())
    with pytest.raises(ValueError, match="hidden sizes differ.*after the projection"):
        hidden_mse(s, t, projection=nn.Linear(3, 5))
    with pytest.raises(ValueError, match="nothing is broadcast"):
        hidden_mse(s, t[:, :3])
    with pytest.raises(ValueError, match="mask shape"):
        hidden_mse(s, t, mask=mask[:, :3])


# ---------------------------------------------------------------- attention_kl


@pytest.mark.parametrize("masked", [False, True])
def test_attention_kl_matches_float64_reference(masked):
    mask = token_mask(2, 5, [5, 3]) if masked else None
    s = attention_probs(2, 3, 5, mask, seed=17, dtype=torch.float32)
    t = attention_probs(2, 3, 5, mask, seed=18, dtype=torch.float32)
    got = attention_kl(s, t, mask=mask)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(reference_attention_kl(s.double(), t.double(), mask), rel=1e-5)


def test_attention_kl_is_a_mean_over_counted_queries_of_the_whole_batch_and_ignores_padded_rows():
    mask = token_mask(2, 4, [4, 1])
    s = attention_probs(2, 2, 4, mask, seed=19)
    t = attention_probs(2, 2, 4, mask, seed=20)
    got = attention_kl(s, t, mask=mask)
    # garbage in padded query rows does not matter
    noisy = s.clone()
    noisy[1, :, 1:] = 0.0
    assert attention_kl(noisy, t, mask=mask).item() == pytest.approx(got.item(), rel=1e-12)
    per_seq = [attention_kl(s[b : b + 1], t[b : b + 1], mask=mask[b : b + 1]).item() for b in range(2)]
    assert got.item() == pytest.approx((4 * per_seq[0] + 1 * per_seq[1]) / 5, rel=1e-12)


def test_attention_kl_zero_probabilities_never_give_nan():
    t = torch.tensor([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]]])
    s = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]]], requires_grad=True)
    value = attention_kl(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert attention_kl(t, t).item() == 0.0


def test_attention_kl_bfloat16_and_gradcheck():
    mask = token_mask(2, 4, [4, 2])
    s, t = attention_probs(2, 2, 4, mask, seed=21), attention_probs(2, 2, 4, mask, seed=22)
    got = attention_kl(s.bfloat16(), t.bfloat16(), mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(attention_kl(s.bfloat16().float(), t.bfloat16().float(), mask=mask).item())
    assert got.item() == pytest.approx(attention_kl(s, t, mask=mask).item(), rel=5e-2)
    # through the softmax that makes the student's probabilities, padded keys at -inf
    z = randn(2, 2, 4, 4, seed=23, dtype=torch.float64).requires_grad_()

    def student_probs(z):
        return torch.softmax(z.masked_fill(~mask[:, None, None, :], -math.inf), -1)

    assert torch.autograd.gradcheck(lambda z: attention_kl(student_probs(z), t, mask=mask), (z,))
    # on strictly positive probabilities directly, teacher side included
    sp, tp = attention_probs(1, 2, 3, seed=24).requires_grad_(), attention_probs(1, 2, 3, seed=25).requires_grad_()
    assert torch.autograd.gradcheck(attention_kl, (sp, tp))


def test_attention_kl_errors():
    with pytest.raises(ValueError, match="same number of heads: the student has 2, the teacher 4"):
        attention_kl(torch.rand(1, 2, 3, 3), torch.rand(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, heads, L, L\]"):
        attention_kl(torch.rand(2, 3, 3), torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="nothing is broadcast"):
        attention_kl(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="square"):
        attention_kl(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"mask must be \[B, L\]"):
        attention_kl(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3), mask=torch.ones(1, 4, dtype=torch.bool))


def test_attention_kl_on_transformers_attentions_of_a_padded_batch():
    transformers = pytest.importorskip("transformers")

    def tiny_bert(layers, hidden, seed, attention_dropout=0.0):
        torch.manual_seed(seed)
        config = transformers.BertConfig(
            vocab_size=30,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=16,
            attention_probs_dropout_prob=attention_dropout,
            initializer_range=0.5,  # sharp attention rows, so the KL is not a float32 rounding residue
        )
        config._attn_implementation = "eager"  # sdpa does not return attention probabilities
        return transformers.BertModel(config).train()

    teacher, student = tiny_bert(2, 16, seed=0).eval(), tiny_bert(1, 8, seed=1)
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = token_mask(2, 6, [6, 3])
    with torch.no_grad():
        t_attn = teacher(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions[-1]
    s_attn = student(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions[-1]
    assert (t_attn[1, :, :, 3:] == 0).all()  # padded keys have zero probability already
    value = attention_kl(s_attn, t_attn, mask=mask)
    expected = reference_attention_kl(s_attn.detach().double(), t_attn.double(), mask)
    assert value.item() == pytest.approx(expected, rel=1e-4)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    # In training mode transformers returns the attentions after dropout (zeros, rescaled
    # rows): the loss stays finite, but train such a student with attention dropout off.
    dropped = tiny_bert(1, 8, seed=1, attention_dropout=0.5)
    d_attn = dropped(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions[-1]
    assert (d_attn[mask[:, None, :, None] & mask[:, None, None, :].expand_as(d_attn)] == 0).any()
    dropped_value = attention_kl(d_attn, t_attn, mask=mask)
    dropped_value.backward()
    assert torch.isfinite(dropped_value)
    assert all(torch.isfinite(p.grad).all() for p in dropped.parameters() if p.grad is not None)


# ---------------------------------------------------------------- value_relation, qkv_relations


@pytest.mark.parametrize("masked", [False, True])
def test_value_relation_matches_float64_reference_with_different_widths(masked):
    mask = token_mask(2, 5, [5, 3]) if masked else None
    s, t = randn(2, 5, 6, seed=26), randn(2, 5, 12, seed=27)
    got = value_relation(s, t, num_heads=3, mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_relation_kl(s.double(), t.double(), 3, mask), rel=1e-5)


def test_value_relation_is_attention_kl_of_the_relation_probabilities():
    mask = token_mask(2, 4, [4, 2])
    s, t = randn(2, 4, 6, seed=28, dtype=torch.float64), randn(2, 4, 9, seed=29, dtype=torch.float64)

    def relation(x, d):
        xh = x.reshape(2, 4, 3, d).transpose(1, 2)
        z = (xh @ xh.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask[:, None, None, :], -math.inf)
        return torch.softmax(z, -1)

    expected = attention_kl(relation(s, 2), relation(t, 3), mask=mask)
    assert value_relation(s, t, num_heads=3, mask=mask).item() == pytest.approx(expected.item(), rel=1e-10)


def test_value_relation_bfloat16_gradcheck_and_errors():
    mask = token_mask(2, 4, [4, 3])
    s, t = randn(2, 4, 4, seed=30), randn(2, 4, 6, seed=31)
    got = value_relation(s.bfloat16(), t.bfloat16(), num_heads=2, mask=mask)
    assert got.dtype == torch.float32
    exact = value_relation(s.bfloat16().float(), t.bfloat16().float(), num_heads=2, mask=mask)
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)
    assert got.item() == pytest.approx(value_relation(s, t, num_heads=2, mask=mask).item(), rel=5e-2)
    sd, td = s.double().requires_grad_(), t.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: value_relation(a, b, num_heads=2, mask=mask), (sd, td))
    with pytest.raises(ValueError, match="size 6 does not split into 4 heads"):
        value_relation(torch.zeros(2, 4, 8), t, num_heads=4)
    with pytest.raises(ValueError, match="must share"):
        value_relation(s, t[:, :3], num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        value_relation(s[0], t[0], num_heads=2)
    with pytest.raises(ValueError, match="positive integer"):
        value_relation(s, t, num_heads=0)
    with pytest.raises(ValueError, match=r"mask must be \[B, L\]"):
        value_relation(s, t, num_heads=2, mask=mask[:, :3])


def test_fully_padded_sequence_gives_no_nan():
    mask = token_mask(2, 3, [3, 0])
    s = randn(2, 3, 4, seed=32).requires_grad_()
    value = value_relation(s, randn(2, 3, 4, seed=33), num_heads=2, mask=mask)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_qkv_relations_sums_the_three_relation_kls():
    mask = token_mask(2, 4, [4, 2])
    student = tuple(randn(2, 4, 8, seed=34 + i) for i in range(3))
    teacher = tuple(randn(2, 4, 12, seed=40 + i) for i in range(3))
    got = qkv_relations(student, teacher, relation_heads=4, mask=mask)
    assert got.dtype == torch.float32
    expected = sum(reference_relation_kl(s.double(), t.double(), 4, mask) for s, t in zip(student, teacher))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    bf16 = qkv_relations(
        tuple(x.bfloat16() for x in student), tuple(x.bfloat16() for x in teacher), relation_heads=4, mask=mask
    )
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(got.item(), rel=5e-2)
    assert qkv_relations(teacher, teacher, relation_heads=4, mask=mask).item() == pytest.approx(0.0, abs=1e-6)


def test_qkv_relations_gradcheck_and_errors():
    mask = token_mask(1, 3, [2])
    student = tuple(randn(1, 3, 4, seed=50 + i, dtype=torch.float64).requires_grad_() for i in range(3))
    teacher = tuple(randn(1, 3, 6, seed=60 + i, dtype=torch.float64) for i in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: qkv_relations((q, k, v), teacher, relation_heads=2, mask=mask), student
    )
    with pytest.raises(ValueError, match=r"student_qkv must be a tuple \(q, k, v\)"):
        qkv_relations(student[:2], teacher, relation_heads=2)
    with pytest.raises(ValueError, match="does not split into 4 heads"):
        qkv_relations(student, teacher, relation_heads=4)


def test_registry_entries():
    for name, fn in [
        ("embedding_mse", embedding_mse),
        ("cosine_distance", cosine_distance),
        ("hidden_mse", hidden_mse),
        ("attention_kl", attention_kl),
        ("value_relation", value_relation),
        ("qkv_relations", qkv_relations),
    ]:
        assert LOSSES.get(name).fn is fn and LOSSES.get(name).target == "teacher"
    assert LOSSES.get("value_relation").param_names() == {"num_heads"}
    assert LOSSES.get("qkv_relations").param_names() == {"relation_heads"}
    # a projection module is passed by code, never by a recipe
    assert LOSSES.get("hidden_mse").param_names() == set()

"""Minitron width pruning: its channel scores are the paper's code's definition, the pruned model is an
ordinary transformers model of the smaller config, and channels that carry nothing are the ones cut."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import RecipeError
from kdforge.models.width_pruning import prune_width, width_scores
from tiny_lm import make_llama


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _mean_abs(a, mask):
    m = mask.unsqueeze(-1).float()
    return (a.abs() * m).sum(1) / m.sum(1)


def test_scores_follow_minitrons_definition():
    model = make_llama(300, layers=2, hidden=32)
    batches = [_batch(0), _batch(1)]
    scores = width_scores(model, batches)
    seen = {}
    hooks = [
        model.model.layers[1].mlp.down_proj.register_forward_hook(
            lambda m, a, o: seen.setdefault("mlp", []).append(a[0])
        ),
        model.model.layers[1].self_attn.o_proj.register_forward_hook(
            lambda m, a, o: seen.setdefault("o", []).append(a[0])
        ),
    ]
    norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    outputs = {i: [] for i in range(len(norms))}
    hooks += [n.register_forward_hook(lambda m, a, o, i=i: outputs[i].append(o)) for i, n in enumerate(norms)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()

    def root_sum_sq(acts):  # sqrt(sum over sequences of (mean over real tokens of |A|)^2)
        return torch.cat([_mean_abs(a, b["attention_mask"]) for a, b in zip(acts, batches)]).pow(2).sum(0).sqrt()

    assert torch.allclose(scores.mlp[1], root_sum_sq(seen["mlp"]), rtol=1e-5)
    per_channel = root_sum_sq(seen["o"]).reshape(4, 8)  # 4 heads of 8 channels
    assert torch.allclose(scores.heads[1], per_channel.norm(dim=-1), rtol=1e-5)
    hidden = sum(root_sum_sq(outputs[i]) for i in outputs)
    assert torch.allclose(scores.hidden, hidden, rtol=1e-5)


def test_keeping_every_channel_changes_nothing_and_the_smaller_model_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_llama(300, layers=2, hidden=32)
    batch = _batch()
    scores = width_scores(model, [batch])
    same = prune_width(model, scores)
    assert torch.allclose(same(**batch).logits, model(**batch).logits, atol=1e-6)
    small = prune_width(model, scores, heads=2, intermediate=24, hidden=24)
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size, config.hidden_size) == (
        2, 2, 24, 24,
    )  # fmt: skip
    assert config.head_dim == 8  # kept (24 hidden channels over 2 heads would give 12)
    small.save_pretrained(tmp_path / "small")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert torch.equal(again(**batch).logits, small(**batch).logits)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def test_channels_that_carry_nothing_are_the_ones_cut():
    model = make_llama(300, layers=2, hidden=32)
    dead = [3, 10, 11, 40, 63]
    with torch.no_grad():
        for layer in model.model.layers:  # silu(0) * up = 0: these MLP channels never reach down_proj
            layer.mlp.gate_proj.weight[dead] = 0
    batch = _batch()
    scores = width_scores(model, [batch])
    assert all(float(s[dead].abs().max()) == 0 for s in scores.mlp)
    pruned = prune_width(model, scores, intermediate=64 - len(dead))
    assert torch.allclose(pruned(**batch).logits, model(**batch).logits, atol=1e-5)


def test_heads_are_pruned_within_their_key_value_groups():
    model = make_llama(300, layers=1, hidden=32)  # 4 query heads, 2 KV heads: groups {0, 1} and {2, 3}
    scores = width_scores(model, [_batch()])
    scores.heads[0] = torch.tensor([0.1, 0.9, 0.8, 0.2])
    pruned = prune_width(model, scores, heads=2)
    q = model.model.layers[0].self_attn.q_proj.weight
    kept = pruned.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(kept[:8], q[8:16]) and torch.equal(kept[8:], q[16:24])  # head 1 of group 0, head 2 of group 1
    with pytest.raises(RecipeError, match=r"student.prune.heads: 3; .* give one of 2, 4"):
        prune_width(model, scores, heads=3)
    with pytest.raises(RecipeError, match="student.prune.hidden: 64"):
        prune_width(model, scores, hidden=64)


def test_a_causal_lm_recipe_prunes_its_student_and_records_it(tmp_path, tiny_lm_teacher):
    import yaml

    from kdforge.checks import load_recipe
    from kdforge.commands import build_task
    from tiny_lm import TEXT

    (tmp_path / "text.txt").write_text(TEXT * 4)
    recipe = {
        "name": "prune",
        "task": "causal_lm",
        "teacher": {"model": str(tiny_lm_teacher)},
        "student": {
            "from_teacher": {"num_layers": 2},
            "prune": {"intermediate": 32, "hidden": 16, "calibration_batches": 2},
        },
        "data": {"format": "text", "path": str(tmp_path / "text.txt"), "max_length": 16},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"batch_size": 4, "steps": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    task = build_task(load_recipe(str(tmp_path / "recipe.yaml"), []))
    student = task.build_student()
    assert (student.config.hidden_size, student.config.intermediate_size, student.config.num_hidden_layers) == (
        16,
        32,
        2,
    )
    assert next(student.parameters()).dtype == torch.float32 and student.training
    record = task.training_info(0)["width_pruning"]
    assert record["hidden_size"] == [32, 16] and record["intermediate_size"] == [64, 32]
    assert record["params"][1] == sum(p.numel() for p in student.parameters())


def test_a_model_on_the_meta_device_is_pruned_to_the_same_shapes():
    from kdforge.models.width_pruning import blank_scores

    model = make_llama(300, layers=2, hidden=32)
    with torch.device("meta"):
        meta = type(model)(model.config)
    real = prune_width(model, width_scores(model, [_batch()]), heads=2, intermediate=24, hidden=16)
    shapes = prune_width(meta, blank_scores(meta), heads=2, intermediate=24, hidden=16)
    assert {n: p.shape for n, p in shapes.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert all(p.is_meta for p in shapes.parameters())

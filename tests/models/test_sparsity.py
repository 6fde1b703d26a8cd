"""Sparse students (Kurtic et al. 2023): magnitude masks, a mask the optimizer never breaks, the SquareHead
loss against its definition, and a causal-LM run that saves a student as sparse as it started."""

from __future__ import annotations

import json

import pytest
import torch

from kdforge.losses import squarehead
from kdforge.models.sparsity import keep_masked, magnitude_masks, sparsity_of
from tiny_lm import TEXT, make_llama


def test_unstructured_masks_drop_each_layers_smallest_weights():
    model = make_llama(300, layers=2, hidden=32)
    masks = magnitude_masks(model, 0.5, "unstructured")
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down per layer; not the embeddings or the head
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.abs()
        assert mask.float().mean() == pytest.approx(0.5, abs=1 / w.numel())
        assert w[~mask].max() <= w[mask].min()


def test_two_four_masks_keep_the_two_largest_of_every_four_inputs():
    model = make_llama(300, layers=1, hidden=32)
    for name, mask in magnitude_masks(model, 0.5, "2:4").items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name
        w = model.get_submodule(name).weight.abs().reshape(groups.shape)
        assert bool((w.masked_fill(~groups, -1).amax(-1) >= 0).all())
        kept_min = w.masked_fill(~groups, float("inf")).amin(-1)
        dropped_max = w.masked_fill(groups, -1).amax(-1)
        assert bool((kept_min >= dropped_max).all()), name


def test_the_optimizer_never_moves_a_masked_weight():
    torch.manual_seed(0)
    model = make_llama(300, layers=2, hidden=32).train()
    masks = magnitude_masks(model, 0.7, "unstructured")
    keep_masked(model, masks)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(input_ids=torch.randint(0, 300, (2, 8))).logits.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert bool((w[~mask] == 0).all()), name
        assert not torch.equal(w[mask], before[name][mask])  # the kept weights did train
    assert sparsity_of(model)["overall"] == pytest.approx(0.7, abs=1e-3)


def test_squarehead_is_the_sum_of_normalised_layer_errors():
    torch.manual_seed(0)
    student = tuple(torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    teacher = tuple(torch.randn(2, 5, 4, dtype=torch.float64) * (i + 1) for i in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = sum(
        ((s - t) ** 2).mean(-1)[mask].mean() / ((t**2).mean(-1)[mask].mean() + 2**-7)
        for s, t in zip(student[1:], teacher[1:])  # the embeddings (index 0) are left out
    )
    value = squarehead(student, teacher, mask=mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda *s: squarehead(s, teacher, mask=mask), student)
    assert squarehead(teacher, teacher).item() == 0
    with pytest.raises(ValueError, match="the student must have the teacher's depth"):
        squarehead(student[:2], teacher)
    with pytest.raises(ValueError, match="use field hidden_states"):
        squarehead(student[0], teacher[0])


def _recipe(folder, teacher, *extra):
    import yaml

    from kdforge.checks import load_recipe

    (folder / "text.txt").write_text(TEXT * 4)
    recipe = {
        "name": "sparse",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"model": str(teacher), "sparsity": {"pattern": "2:4"}},
        "data": {"format": "text", "path": str(folder / "text.txt"), "max_length": 16},
        "objective": [
            {"loss": "cross_entropy", "weight": 1.0},
            {"loss": "squarehead", "field": "hidden_states", "weight": 1.0},
        ],
        "training": {"batch_size": 4, "steps": 3, "lr": 1e-3},
        "evaluation": {"baseline": False, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(folder / "runs")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(folder / "recipe.yaml"), list(extra))


def test_a_sparse_student_distils_and_is_saved_as_sparse(tmp_path, tiny_lm_teacher):
    from safetensors.torch import load_file

    from kdforge.runner import run_recipe

    run_recipe(_recipe(tmp_path, tiny_lm_teacher))
    run = tmp_path / "runs" / "sparse"
    info = json.loads((run / "model.train.json").read_text())
    assert info["sparsity"]["pattern"] == "2:4" and info["sparsity"]["overall"] == pytest.approx(0.5)
    assert info["final_terms"]["squarehead"] > 0
    saved = load_file(run / "model" / "model.safetensors")
    for name, tensor in saved.items():
        if ".layers." in name and name.endswith("proj.weight"):
            groups = (tensor != 0).reshape(tensor.shape[0], -1, 4).sum(-1)
            assert bool((groups <= 2).all()), name  # still 2:4 after training


def test_sparsity_with_sharding_is_refused(tmp_path, tiny_lm_teacher):
    from kdforge.errors import RecipeError

    with pytest.raises(RecipeError, match="student.sparsity: the fixed mask"):
        _recipe(tmp_path, tiny_lm_teacher, "training.sharding=fsdp")

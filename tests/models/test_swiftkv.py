"""SwiftKV (Qiao et al. 2024): the transformation at l = last layer is the teacher exactly, prefill with the
KV cache computes what the full forward does, AcrossKV shrinks the cache, only the new projections train,
and a recipe run saves a folder kdforge loads back in SwiftKV form."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kdforge.models.swiftkv import (
    group_leaders,
    kv_cache_bytes,
    original_model,
    swiftkv_prefill,
    to_swiftkv,
)
from tiny_lm import TEXT, make_llama


def _ids(batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(1))


def test_swiftkv_from_the_last_layer_equals_the_teacher_exactly():
    teacher = make_llama(300, layers=6)
    student = to_swiftkv(copy.deepcopy(teacher), num_key_value_layers=5, group=1)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
        _, last = swiftkv_prefill(student, ids)
        torch.testing.assert_close(last, teacher(input_ids=ids).logits[:, -1])


def test_an_earlier_split_changes_the_model_and_original_model_restores_it():
    teacher = make_llama(300, layers=6)
    student = to_swiftkv(copy.deepcopy(teacher), num_key_value_layers=2, group=2)
    ids = _ids()
    with torch.no_grad():
        reference = teacher(input_ids=ids).logits
        assert (student(input_ids=ids).logits - reference).abs().max() > 1e-2
        with original_model(student):
            assert torch.equal(student(input_ids=ids).logits, reference)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_prefill_and_decode_from_the_cache_match_the_full_forward(group):
    student = to_swiftkv(make_llama(300, layers=7), num_key_value_layers=2, group=group)
    ids, following = _ids(), torch.randint(0, 300, (2, 1))
    with torch.no_grad():
        full = student(input_ids=torch.cat([ids, following], 1)).logits
        cache, last = swiftkv_prefill(student, ids)
        torch.testing.assert_close(last, full[:, -2], atol=1e-5, rtol=1e-5)
        step = student(input_ids=following, cache=cache, use_cache=True).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_across_kv_groups_share_a_cache_entry():
    teacher = make_llama(300, layers=8)
    assert group_leaders(8, 4, 2) == {4: 4, 5: 4, 6: 6, 7: 6}
    student = to_swiftkv(copy.deepcopy(teacher), num_key_value_layers=4, group=2)
    with torch.no_grad():
        swift, _ = swiftkv_prefill(student, _ids())
        plain, _ = swiftkv_prefill(teacher, _ids())
    assert kv_cache_bytes(swift) / kv_cache_bytes(plain) == pytest.approx(6 / 8)
    # the group's shared projection starts as the mean of its layers' own
    own = [teacher.model.layers[i].self_attn.k_proj.weight for i in (4, 5)]
    torch.testing.assert_close(student.model.layers[4].self_attn.k_proj_swiftkv.weight, (own[0] + own[1]) / 2)
    assert not hasattr(student.model.layers[5].self_attn, "k_proj_swiftkv")


def test_only_the_new_modules_train_and_a_copy_has_its_own_state():
    student = to_swiftkv(make_llama(300, layers=4), num_key_value_layers=2, group=1)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("swiftkv" in n for n in trainable)
    assert "model.norm_swiftkv.weight" in trainable
    twin = copy.deepcopy(student)
    assert twin._swiftkv_state is not student._swiftkv_state
    with torch.no_grad():
        twin.model.norm_swiftkv.weight.mul_(3)
        assert not torch.equal(twin(input_ids=_ids()).logits, student(input_ids=_ids()).logits)


def test_bad_split_is_refused_with_the_field():
    from kdforge.errors import RecipeError

    with pytest.raises(RecipeError, match="student.swiftkv.num_key_value_layers: 4; give a layer from 1 to 3"):
        to_swiftkv(make_llama(300, layers=4), num_key_value_layers=4)


def _recipe(folder, teacher, *extra):
    import yaml

    from kdforge.checks import load_recipe

    (folder / "text.txt").write_text(TEXT * 4)
    recipe = {
        "name": "swiftkv",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"swiftkv": {"num_key_value_layers": 2, "key_value_group_size": 2}},
        "data": {"format": "text", "path": str(folder / "text.txt"), "max_length": 16},
        "objective": [
            {"loss": "forward_kl", "weight": 1.0, "params": {"temperature": 2.0}},
            {"loss": "hidden_mse", "field": "hidden_states", "layer": -2, "weight": 1.0},
        ],
        "training": {"batch_size": 4, "steps": 3, "lr": 1e-3},
        "evaluation": {"baseline": False, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(folder / "runs")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(folder / "recipe.yaml"), list(extra))


def test_a_swiftkv_run_trains_the_new_projections_reports_and_reloads(tmp_path, tiny_lm_teacher):
    from safetensors.torch import load_file

    from kdforge.models.hf_causal_lm import load_causal_lm
    from kdforge.runner import run_recipe

    run_recipe(_recipe(tmp_path, tiny_lm_teacher))
    run = tmp_path / "runs" / "swiftkv"
    info = json.loads((run / "model.train.json").read_text())
    assert info["swiftkv"]["kv_cache_fraction"] == pytest.approx(3 / 4)
    saved = load_file(run / "model" / "model.safetensors")
    original = load_file(tiny_lm_teacher / "model.safetensors")
    frozen = original["model.layers.3.mlp.up_proj.weight"].to(torch.bfloat16)  # saved in bfloat16 by default
    assert torch.equal(saved["model.layers.3.mlp.up_proj.weight"], frozen)
    assert not torch.equal(
        saved["model.layers.2.self_attn.q_proj_swiftkv.weight"], original["model.layers.2.self_attn.q_proj.weight"]
    )
    html = (run / "report.html").read_text()
    assert "SwiftKV: layers 2–3 take their keys and values from layer 2" in html
    assert "the KV cache holds\n 75% of the teacher" in html
    reloaded = load_causal_lm(str(run / "model"), field="model", fresh=True)
    assert reloaded.config.swiftkv == {"num_key_value_layers": 2, "key_value_group_size": 2}
    torch.testing.assert_close(
        reloaded.model.layers[2].self_attn.k_proj_swiftkv.weight,
        saved["model.layers.2.self_attn.k_proj_swiftkv.weight"],
    )


def test_swiftkv_recipe_refuses_pruning_and_sharding(tmp_path, tiny_lm_teacher):
    from kdforge.errors import RecipeError

    with pytest.raises(RecipeError, match="student.swiftkv: its layers share"):
        _recipe(tmp_path, tiny_lm_teacher, "training.sharding=fsdp")
    with pytest.raises(RecipeError, match="remove prune and sparsity"):
        _recipe(tmp_path, tiny_lm_teacher, "student.sparsity.target=0.5")

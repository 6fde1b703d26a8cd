"""Causal-LM data written during a run: sampling, the generation store, masks, and the helpers of the
methods' tests that use them (tests/methods/: test_teacher_generated.py, test_online_generation.py,
test_step_by_step.py, test_teacher_hacking_monitor.py, test_on_policy.py)."""

import json

import pytest
import torch

from kdforge.data.generate import GenerationStore, sample_continuations
from kdforge.errors import RecipeError
from kdforge.models.hf_causal_lm import load_causal_lm
from kdforge.runner import run_recipe
from test_tasks_causal_lm import lm_recipe


def mode_recipe(tmp_path, teacher_ref, path, method, *overrides, **sections):
    """JSONL prompts (32 tokens) and ``method`` (teacher_generated, online_generation) listed."""
    return lm_recipe(
        tmp_path / method,
        teacher_ref,
        path,
        "data.format=jsonl",
        f"methods=[{{name: {method}}}]",
        "data.max_length=32",
        "generation.max_new_tokens=10",
        *overrides,
        **sections,
    )


def answers_recipe(tmp_path, teacher_ref, path, *overrides, **sections):
    """The file's own answers (offline), no baseline: the runs of the mask and monitor tests."""
    return lm_recipe(
        tmp_path,
        teacher_ref,
        path,
        "data.format=jsonl",
        "data.max_length=40",
        "evaluation.baseline=false",
        *overrides,
        **sections,
    )


def responses_of(task, dataset) -> list[str]:
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    return task._references(batch)


# ----- sampling and the generation store ----------------------------------------------


def test_sampling_is_seeded_stops_at_a_stop_token_and_leaves_the_global_rng_alone(tiny_lm_teacher):
    model = load_causal_lm(str(tiny_lm_teacher), field="t", fresh=True)
    prompts = [[2, 10, 11, 12], [2, 20]]
    before = torch.get_rng_state()
    first = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    again = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=1.0, seed=3)
    other = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=1.0, seed=4)
    assert first == again and first != other and all(len(c) == 8 for c in first)
    stop = first[0][2]
    cut = sample_continuations(model, prompts, pad_id=1, stop_ids=[stop], max_new_tokens=8, temperature=1.0, seed=3)
    assert cut[0] == first[0][: first[0].index(stop) + 1]
    # a left-padded prompt is continued as if it were alone
    alone = sample_continuations(model, prompts[1:], pad_id=1, stop_ids=[], max_new_tokens=8, temperature=0.0)
    together = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=0.0)
    assert together[1] == alone[0]


def test_an_interrupted_generation_resumes_with_whole_batches_and_the_same_records(tmp_path):
    calls = []

    def make_batch(start, stop):
        calls.append((start, stop))
        return [{"response": f"answer {i}"} for i in range(start, stop)]

    store = GenerationStore(tmp_path, {"teacher": "x"})
    expected = store.build(7, make_batch, batch_size=3, description="d")
    assert [r["response"] for r in expected] == [f"answer {i}" for i in range(7)]
    assert store.exists() and store.read() == expected

    torn = GenerationStore(tmp_path, {"teacher": "y"})
    lines = [json.dumps({"response": f"answer {i}"}) for i in range(4)]
    torn._partial.write_text("\n".join(lines) + '\n{"respo')  # killed while writing batch 2
    calls.clear()
    assert torn.build(7, make_batch, batch_size=3, description="d") == expected
    assert calls == [(3, 6), (6, 7)]  # the half-written batch is written again, from its start
    calls.clear()
    assert GenerationStore(tmp_path, {"teacher": "y"}).build(7, make_batch, batch_size=3, description="d") == expected
    assert calls == []  # stored: nothing generated again


def test_a_mask_the_batch_lacks_is_a_recipe_error_naming_the_term(tmp_path, tiny_lm_teacher, pairs_file):
    recipe = answers_recipe(
        tmp_path,
        tiny_lm_teacher,
        pairs_file,
        objective=[{"loss": "cross_entropy", "mask": "label_mask"}],
    )
    with pytest.raises(RecipeError, match=r"objective\[0\]\.mask: the batch has no 'label_mask'"):
        run_recipe(recipe)

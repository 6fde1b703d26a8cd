"""The README stays true: its methods table lists every registered component."""

import re
from pathlib import Path

from kdforge.losses import LOSS_MODULES, LOSSES
from kdforge.signals import SIGNALS
from kdforge.tasks import TASKS

README = Path(__file__).resolve().parents[1] / "README.md"


def table_names(kind: str) -> set[str]:
    rows = re.findall(r"^\|\s*" + kind + r"\s*\|\s*`([^`]+)`", README.read_text(), flags=re.M)
    return set(rows)


def test_methods_table_matches_the_registries():
    assert table_names("loss") == set(LOSSES)
    assert table_names("loss module") == set(LOSS_MODULES)
    assert table_names("task") == set(TASKS)
    assert table_names("teacher signal") == set(SIGNALS)


def test_quick_start_is_exactly_make_demo_and_make_test():
    text = README.read_text()
    block = re.search(r"## Quick start.*?```(?:sh|bash)?\n(.*?)```", text, flags=re.S).group(1)
    assert [line.strip() for line in block.strip().splitlines()] == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)


def test_teacher_signal_examples_are_valid_teacher_sections():
    import yaml

    from kdforge.signals import teacher_config

    text = README.read_text()
    block = re.search(r"## Teacher signals.*?```yaml\n(.*?)```", text, flags=re.S).group(1)
    examples = re.split(r"\n(?=teacher:)", block.strip())
    assert len(examples) == 4
    kinds = [teacher_config(yaml.safe_load(e)["teacher"]).signal for e in examples]
    assert kinds == ["online", "cache", "served", "ensemble"]


def test_your_data_examples_are_valid_data_sections():
    """Each task's example in "Your data" validates against the task's data schema."""
    import yaml

    from kdforge.recipe import validate_schema

    text = README.read_text()
    blocks = re.findall(r"## Your data.*?```yaml\n(.*?)```.*?```yaml\n(.*?)```", text, flags=re.S)[0]
    whole = yaml.safe_load(blocks[0])
    assert validate_schema(whole).data["columns"] == {"text": "description", "label": "class"}
    examples = list(yaml.safe_load_all(blocks[1]))
    assert {e["task"] for e in examples} == {
        "text_classification",
        "causal_lm",
        "embedding",
        "ranking",
        "classification",
    }
    for example in examples:
        TASKS.get(example["task"]).data_schema.model_validate(example["data"])

"""Registries: a component joins by name, and a lazily registered one is imported when first asked for."""

import subprocess
import sys
import textwrap

import pytest

from kdforge.errors import RecipeError
from kdforge.registry import Registry


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A module on the path that registers ``late`` in the registry this test hands it."""
    (tmp_path / "kdforge_test_late_plugin.py").write_text(
        textwrap.dedent(
            """
            from kdforge_test_registry_holder import REGISTRY

            @REGISTRY.register("late")
            class Late:
                pass
            """
        )
    )
    (tmp_path / "kdforge_test_registry_holder.py").write_text("REGISTRY = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import kdforge_test_registry_holder

    registry: Registry[type] = Registry("widget")
    monkeypatch.setattr(kdforge_test_registry_holder, "REGISTRY", registry)
    yield registry
    for name in ("kdforge_test_late_plugin", "kdforge_test_registry_holder"):
        sys.modules.pop(name, None)


def test_a_lazy_name_is_known_and_imported_when_asked_for(plugin_module):
    registry = plugin_module
    registry.add("early", int)
    registry.lazy("late", "kdforge_test_late_plugin")
    assert "late" in registry and list(registry) == ["early", "late"]
    assert "kdforge_test_late_plugin" not in sys.modules  # knowing the name imported nothing
    assert registry.get("late").__name__ == "Late"
    assert "kdforge_test_late_plugin" in sys.modules
    with pytest.raises(RecipeError, match=r"^task.name: unknown widget 'other'; known: early, late$"):
        registry.get("other", field="task.name")


def test_items_import_every_lazy_name(plugin_module):
    registry = plugin_module
    registry.lazy("late", "kdforge_test_late_plugin")
    assert [name for name, _ in registry.items()] == ["late"]


def test_a_module_that_does_not_register_its_name_and_a_name_given_twice_are_errors(plugin_module):
    registry = plugin_module
    registry.lazy("missing", "kdforge_test_registry_holder")
    with pytest.raises(RuntimeError, match="did not register widget 'missing'"):
        registry.get("missing")
    registry.add("early", int)
    with pytest.raises(ValueError, match="registered twice"):
        registry.lazy("early", "kdforge_test_late_plugin")


def test_a_digits_recipe_is_checked_without_loading_the_encoder_tasks_libraries():
    """Tasks are registered by name: checking (and running) a classification recipe never imports
    sentence-transformers, faiss's users among the tasks, or the causal-LM task."""
    code = (
        "import sys\n"
        "from kdforge.checks import load_recipe\n"
        "load_recipe('digits_kd')\n"
        "heavy = [m for m in ('sentence_transformers', 'kdforge.tasks.ranking', 'kdforge.tasks.causal_lm')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

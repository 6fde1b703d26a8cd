import pytest
import torch

from kdforge.checks import load_recipe
from kdforge.errors import RecipeError
from kdforge.models.mlp import MLPClassifier
from kdforge.tasks import TASKS


@pytest.fixture
def task():
    recipe = load_recipe("digits_kd")
    return TASKS.get(recipe.task)(recipe)


def test_hidden_is_the_last_hidden_layer(task):
    model = MLPClassifier(64, [8, 5], 10)
    batch = {"inputs": torch.randn(4, 64), "labels": torch.zeros(4, dtype=torch.long)}
    out = task.adapter(model, batch, frozenset({"logits", "hidden"}))
    assert out.present() == ["logits", "hidden"]
    _, layers = model(batch["inputs"], output_hidden_states=True)
    assert torch.equal(out.hidden, layers[-1]) and out.hidden.shape == (4, 5)
    only_layers = task.adapter(model, batch, frozenset({"hidden_states"}))
    assert only_layers.present() == ["hidden_states"]


def test_hidden_of_an_mlp_without_hidden_layers_is_a_recipe_error(task):
    model = MLPClassifier(64, [], 10)
    batch = {"inputs": torch.randn(4, 64)}
    with pytest.raises(RecipeError, match="'hidden' output is the last hidden layer's features"):
        task.adapter(model, batch, frozenset({"hidden"}))

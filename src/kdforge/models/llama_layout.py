"""Where a Llama-layout causal LM keeps its decoder layers (Llama, Mistral, Qwen2, SmolLM...).

A module of its own, importing nothing else of kdforge's models, so that the model loader
(:mod:`kdforge.models.hf_causal_lm`) and the transformations it rebuilds (SwiftKV) can both use it.
"""

from __future__ import annotations

from torch import nn

from kdforge.errors import RecipeError


def decoder_layers(model: nn.Module, field: str) -> tuple[str, nn.ModuleList]:
    """The decoder layers of a Llama-style causal LM and their name in its state dict; a RecipeError otherwise."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, nn.ModuleList) or count != len(layers):
        raise RecipeError(
            f"{field}: {type(model).__name__} does not keep its decoder layers at model.model.layers (the Llama"
            " layout), so a student cannot be cut from its layers; use student.model for a separate pretrained student"
        )
    return "model.layers", layers

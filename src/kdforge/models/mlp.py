"""A multi-layer perceptron classifier: the model of the feature-vector classification task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPClassifier(nn.Module):
    """``in_features -> hidden... -> num_classes`` with an activation (and dropout) between layers."""

    architecture = "mlp"

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        num_classes: int,
        *,
        dropout: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        self.config: dict[str, Any] = {
            "in_features": in_features,
            "hidden": list(hidden),
            "num_classes": num_classes,
            "dropout": dropout,
            "activation": activation,
        }
        sizes = [in_features, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), ACTIVATIONS[activation](), nn.Dropout(dropout))
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.head = nn.Linear(sizes[-1], num_classes)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MLPClassifier:
        kwargs = dict(config)
        return cls(kwargs.pop("in_features"), kwargs.pop("hidden"), kwargs.pop("num_classes"), **kwargs)

    def forward(self, inputs: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = []
        x = inputs
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x)
        logits = self.head(x)
        if output_hidden_states:
            return logits, tuple(hidden_states)
        return logits

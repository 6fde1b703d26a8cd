"""Sparse students: a causal LM's linear layers pruned by magnitude, the mask kept fixed while it trains.

The sparse fine-tuning of Kurtic et al. (2023, "Sparse Fine-tuning for Inference Acceleration of Large
Language Models", arXiv 2310.06927; METHODS.md section 23) prunes once to the target sparsity and then
distils with the mask fixed: their code multiplies every masked weight by its mask after each optimizer
step. Here the masked weights are zeroed once and their gradient is masked by a hook, so the optimizer
never moves them (Adam's moments of a weight whose gradient is always 0 stay 0, and decoupled weight
decay keeps a 0 at 0): the same fixed mask, without a hook in the engine, and a saved student is
sparse as it is.

Patterns: ``unstructured`` (each layer's smallest ``sparsity`` fraction of weights by magnitude) and
``2:4`` (in every group of 4 consecutive input weights of an output row, the 2 largest kept: the
pattern sparse tensor cores run). The paper prunes with SparseGPT, which is not done here (magnitude
only). The linear layers of the decoder blocks are pruned; embeddings and the LM head are not.

Example::

    masks = magnitude_masks(model, 0.5, "unstructured")
    keep_masked(model, masks)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdforge.models.from_teacher import decoder_layers

PATTERNS = ("unstructured", "2:4")


def prunable(model: nn.Module, field: str = "student.sparsity") -> dict[str, nn.Linear]:
    """The linear layers of the model's decoder blocks, by their name in the model."""
    prefix, layers = decoder_layers(model, field)
    return {
        f"{prefix}.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


@torch.no_grad()
def magnitude_masks(
    model: nn.Module, sparsity: float, pattern: str, field: str = "student.sparsity"
) -> dict[str, torch.Tensor]:
    """``name -> bool mask`` (True: kept) of every prunable layer: per layer, the weights of smallest magnitude
    go (``unstructured``: a ``sparsity`` fraction; ``2:4``: 2 of every 4 consecutive inputs)."""
    masks = {}
    for name, linear in prunable(model, field).items():
        w = linear.weight.detach().abs().float()
        if pattern == "2:4":
            if w.shape[1] % 4:
                raise ValueError(f"{name}: {w.shape[1]} inputs are not a multiple of 4; 2:4 needs groups of 4")
            groups = w.reshape(w.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
            masks[name] = keep.reshape(w.shape)
        elif pattern == "unstructured":
            drop = int(round(sparsity * w.numel()))
            mask = torch.ones(w.numel(), dtype=torch.bool)
            if drop:
                mask[w.flatten().argsort(stable=True)[:drop]] = False
            masks[name] = mask.reshape(w.shape)
        else:
            raise ValueError(f"unknown sparsity pattern {pattern!r}; one of {', '.join(PATTERNS)}")
    return masks


def keep_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked weight of ``model`` and keep it zero while it trains (a gradient hook); call it on
    each copy that will train (hooks do not survive a deep copy)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            mask = mask.to(weight.device)
            weight.mul_(mask.to(weight.dtype))
            weight.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype))


def sparsity_of(model: nn.Module, field: str = "student.sparsity") -> dict[str, Any]:
    """The fraction of exact zeros in each prunable layer, and over them all."""
    per_layer, zeros, total = {}, 0, 0
    for name, linear in prunable(model, field).items():
        w = linear.weight.detach()
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / max(total, 1), "per_layer": per_layer}

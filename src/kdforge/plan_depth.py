"""Planning models too large to run here: probe copies cut to one and two blocks, extrapolate to the full depth.

``kdforge plan --from-config`` builds causal LMs from their configuration on the meta device (see
:func:`kdforge.models.hf_causal_lm.config_only`): their weights, gradients and optimizer state are
counted exactly from the parameters' shapes and dtypes, but a meta model cannot run the probe's
training forward (transformers reads mask values, and autocast does not apply to meta tensors). So the
probe runs on the same models cut, in place, to their first one and then first two blocks, with
random weights (what the activations' sizes do not depend on). Every block of a transformer keeps the
same tensors for backward, so the activations grow by the same amount per block:
``a(L) = a(1) + (L - 1) * (a(2) - a(1))``; the loss's tensors (the logits) do not depend on the depth.
"""

from __future__ import annotations

import torch
from torch import nn

from kdforge.engine.sharding import block_list

#: the depths the probe runs at: two points of the per-block line
PROBE_DEPTHS = (2, 1)


def depth(model: nn.Module) -> int:
    """How many repeated blocks the model has (0: none found)."""
    found = block_list(model)
    return len(found) if found is not None else 0


def cut_to_blocks(model: nn.Module, keep: int) -> None:
    """Keep the model's first ``keep`` blocks (in place), and say so in every config it holds:
    transformers' decoders loop over ``config.num_hidden_layers`` layers, and some configs list a
    type per layer (``layer_types``)."""
    found = block_list(model)
    if found is None or len(found) <= keep:
        return
    del found[keep:]
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            continue
        config.num_hidden_layers = keep
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:keep]


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device real memory on ``device``, with small random values
    (the probe measures sizes; values only need to be finite)."""
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return
    model.to_empty(device=device)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:
                t.zero_()


def at_depth(counts: dict[int, int], full: int) -> int:
    """Bytes at ``full`` blocks from the counts at the probe's depths (never decreasing per block)."""
    if full in counts or len(counts) == 1:
        return counts.get(full, next(iter(counts.values())))
    per_block = max(counts[2] - counts[1], 0)
    return counts[1] + per_block * (full - 1)

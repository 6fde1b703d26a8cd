"""Which of a teacher's blocks a shallower student should keep: scores from calibration batches.

Two scores of the residual stream ``x_0 .. x_D`` (``x_i``: the input of block ``i``; ``x_D``: the
last block's output, before any final norm, which hooks on the blocks see and HF's last
``hidden_states`` entry does not):

- **Block influence** (ShortGPT, Men et al. 2024, arXiv 2403.03853; METHODS.md section 21):
  ``BI_i = mean over tokens of 1 - cos(x_i, x_{i+1})``, padded positions left out. A block whose
  output is nearly its input changes little; ``select: importance`` keeps the blocks of highest BI
  (the removed ones need not be contiguous). ShortGPT sums over tokens; the mean ranks the same.
- **Angular distance of n-block spans** (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
  the Deeper Layers", arXiv 2403.17887): ``d(l, n) = arccos(cos(x_l, x_{l+n})) / pi`` on each
  sequence's last token, averaged over sequences; ``select: angular`` removes the span of
  ``n = D - keep`` blocks starting at ``argmin_l d(l, n)``. (The last-token choice follows a
  third-party summary of the paper; METHODS.md marks it unverified.)

Example::

    scores = score_blocks(model.model.layers, batches, lambda b: model(**b))
    keep = select_blocks(scores, 6, "importance")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge.models.from_teacher import evenly_spaced_layers

#: how a student's blocks are chosen from the teacher's
SELECTIONS = ("even", "importance", "angular")


@dataclass
class BlockScores:
    """Scores of a model's ``D`` blocks on calibration batches."""

    #: per block: mean over (unpadded) tokens of 1 - cos(input, output)
    block_influence: list[float]
    #: n -> per start l (0 .. D - n): mean over sequences of the last token's angular distance d(l, n)
    angular: dict[int, list[float]] = field(default_factory=dict)
    tokens: int = 0
    sequences: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "block_influence": self.block_influence,
            "angular": {str(n): d for n, d in self.angular.items()},
            "tokens": self.tokens,
            "sequences": self.sequences,
        }


def _hidden(value: Any) -> torch.Tensor:
    """The hidden states of a block's input or output (a tensor, or the first item of a tuple)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine over the last dimension, in float64; a zero vector gives 1 (no change measured)."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(-1) / norms.clamp_min(1e-30)
    return torch.where(norms > 0, cos.clamp(-1.0, 1.0), torch.ones_like(cos))


@torch.no_grad()
def score_blocks(
    blocks: nn.ModuleList,
    batches: Iterable[dict[str, torch.Tensor]],
    run: Callable[[dict[str, torch.Tensor]], Any],
    *,
    mask_key: str = "attention_mask",
) -> BlockScores:
    """Run ``run(batch)`` (the model's forward) on each batch, reading every block's input and output
    through hooks, and score the blocks (see the module docstring). ``batch[mask_key]`` marks real
    tokens (1) and padding (0); without it every position counts."""
    depth = len(blocks)
    if depth == 0:
        raise ValueError("the model has no blocks to score")
    states: list[torch.Tensor | None] = [None] * (depth + 1)

    def on_input(index: int):
        def hook(module, args, kwargs):  # noqa: ANN001
            states[index] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def on_last_output(module, args, output):  # noqa: ANN001
        states[depth] = _hidden(output).detach()

    handles = [b.register_forward_pre_hook(on_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[depth - 1].register_forward_hook(on_last_output))
    influence = torch.zeros(depth, dtype=torch.float64)
    angular = {n: torch.zeros(depth - n + 1, dtype=torch.float64) for n in range(1, depth + 1)}
    tokens = sequences = 0
    try:
        for batch in batches:
            states[:] = [None] * (depth + 1)
            run(batch)
            if any(s is None for s in states):
                raise ValueError("the model's forward did not run every block in order")
            x = torch.stack([s.float() for s in states])  # type: ignore[union-attr]  [D+1, B, L, H]
            mask = batch.get(mask_key)
            mask = torch.ones(x.shape[1:3], dtype=torch.bool) if mask is None else mask.to(torch.bool).cpu()
            flat = x.cpu()[:, mask]  # [D+1, tokens, H]
            influence += (1 - _cosine(flat[:-1], flat[1:])).sum(-1)
            tokens += flat.shape[1]
            # each sequence's last real token (right or left padding): where the mask's running count peaks
            last = mask.long().cumsum(1).argmax(1)
            final = x.cpu()[:, torch.arange(x.shape[1]), last]  # [D+1, B, H]
            for n, total in angular.items():
                total += (torch.arccos(_cosine(final[:-n], final[n:])) / math.pi).sum(-1)
            sequences += final.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("the calibration batches hold no token")
    return BlockScores(
        block_influence=(influence / tokens).tolist(),
        angular={n: (d / sequences).tolist() for n, d in angular.items()},
        tokens=tokens,
        sequences=sequences,
    )


def select_blocks(scores: BlockScores, keep: int, how: str) -> list[int]:
    """The indices (increasing) of the ``keep`` blocks ``how`` chooses (see :data:`SELECTIONS`)."""
    depth = len(scores.block_influence)
    if not 1 <= keep <= depth:
        raise ValueError(f"cannot keep {keep} of {depth} blocks")
    if how == "importance":
        order = sorted(range(depth), key=lambda i: (-scores.block_influence[i], i))
        return sorted(order[:keep])
    if how == "angular":
        n = depth - keep
        if n == 0:
            return list(range(depth))
        distances = scores.angular[n]
        start = min(range(len(distances)), key=lambda i: (distances[i], i))
        return [i for i in range(depth) if not start <= i < start + n]
    if how == "even":
        return [depth - 1] if keep == 1 else evenly_spaced_layers(depth, keep)
    raise ValueError(f"unknown selection {how!r}; one of {', '.join(SELECTIONS)}")


def selection_record(scores: BlockScores, keep: int, how: str) -> tuple[list[int], dict[str, Any]]:
    """The blocks ``how`` keeps, and what a run records of the choice (``layer_selection``): the kept
    blocks, every block's influence and, when blocks go, the angular distance of each span of that many."""
    layers = select_blocks(scores, keep, how)
    removed = len(scores.block_influence) - keep
    record = {
        "select": how,
        "kept": layers,
        "block_influence": scores.block_influence,
        **({"angular_distance": scores.angular[removed], "span": removed} if removed else {}),
        "calibration_tokens": scores.tokens,
    }
    return layers, record

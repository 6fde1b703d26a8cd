"""Width pruning of a Llama-layout causal LM by activation magnitude (Minitron; METHODS.md section 22).

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
arXiv 2407.14679; NVIDIA Model-Optimizer's ``mcore_minitron``) ranks three kinds of channels on
calibration batches, forward only. For an activation ``A [batch, seq, C]``: ``a = mean_seq |A|``, summed
as ``a**2`` over every calibration sequence, and the score is the square root:

- **MLP channels**: ``A`` is the input of ``down_proj`` (after the gate and the activation);
- **attention heads**: ``A`` is the input of ``o_proj``; a head's score is the L2 norm of its channels'.
  Heads are ranked within each group of query heads that share a key/value head (GQA), every group keeps
  the same number, and the key/value heads are kept: ``heads`` must be a multiple of the KV heads;
- **hidden (embedding) channels**: ``A`` is the output of every layer's two RMSNorms; the score is
  the sum over those norms of each one's square-rooted sum.

Each layer keeps its own best MLP channels and heads (the same count in every layer); the hidden
channels are one choice for the whole model (embeddings, every norm, every projection's input columns
and output rows, the final norm and the LM head). The result is an ordinary transformers model of the
smaller config (``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``head_dim`` kept),
which loads with ``from_pretrained``; it is then distilled with the recipe's objective.

Example::

    scores = width_scores(model, batches)
    smaller = prune_width(model, scores, heads=6, intermediate=1024, hidden=512)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from kdforge.errors import RecipeError


@dataclass
class WidthScores:
    """Minitron's scores of a model's channels (float32, higher: kept first)."""

    #: per layer: [intermediate_size]
    mlp: list[torch.Tensor]
    #: per layer: [num_attention_heads]
    heads: list[torch.Tensor]
    #: [hidden_size]
    hidden: torch.Tensor


def _layers(model: nn.Module, field: str) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    parts = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    try:
        ok = isinstance(layers, nn.ModuleList) and all(layers[0].get_submodule(p) is not None for p in parts)
    except AttributeError:
        ok = False
    if not ok:
        raise RecipeError(
            f"{field}: width pruning needs the Llama layout (model.layers[i].self_attn.q_proj, .o_proj, mlp.down_proj,"
            " input_layernorm, post_attention_layernorm)"
        )
    return layers


def _magnitude(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mean over real tokens of |A|`` per sequence: [batch, C]."""
    a = a.detach().float().abs()
    if mask is None:
        return a.mean(1)
    m = mask.to(a.device, a.dtype).unsqueeze(-1)
    return (a * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def width_scores(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], field: str = "student.prune"
) -> WidthScores:
    """Run ``model`` (a Llama-layout causal LM) on ``batches`` (``input_ids``, ``attention_mask``) and score its
    channels as the module docstring says."""
    layers = _layers(model, field)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mlp = [torch.zeros(config.intermediate_size) for _ in layers]
    attn = [torch.zeros(config.num_attention_heads * head_dim) for _ in layers]
    norms = [torch.zeros(config.hidden_size) for _ in range(2 * len(layers))]
    mask: list[torch.Tensor | None] = [None]

    def accumulate(into: list[torch.Tensor], index: int, use_input: bool):
        def hook(module, args, output):  # noqa: ANN001
            a = args[0] if use_input else output
            into[index] += (_magnitude(a, mask[0]) ** 2).sum(0).cpu()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_hook(accumulate(mlp, i, True)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(accumulate(attn, i, True)))
        handles.append(layer.input_layernorm.register_forward_hook(accumulate(norms, 2 * i, False)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(accumulate(norms, 2 * i + 1, False)))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask[0] = batch.get("attention_mask")
            model.model(
                input_ids=batch["input_ids"].to(device), attention_mask=None if mask[0] is None else mask[0].to(device)
            )
    finally:
        for handle in handles:
            handle.remove()
    heads = [s.sqrt().reshape(config.num_attention_heads, head_dim).norm(dim=-1) for s in attn]
    return WidthScores(mlp=[s.sqrt() for s in mlp], heads=heads, hidden=torch.stack([s.sqrt() for s in norms]).sum(0))


def blank_scores(model: nn.Module) -> WidthScores:
    """Equal scores for every channel (a model on the meta device has no activations to score; its pruned
    shapes are the same whichever channels are kept)."""
    config = model.config
    layers = len(_layers(model, "student.prune"))
    return WidthScores(
        mlp=[torch.zeros(config.intermediate_size) for _ in range(layers)],
        heads=[torch.zeros(config.num_attention_heads) for _ in range(layers)],
        hidden=torch.zeros(config.hidden_size),
    )


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the ``keep`` highest scores, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def _kept_heads(scores: torch.Tensor, heads: int, kv_heads: int, field: str) -> torch.Tensor:
    """Query heads kept within each KV group (the same count per group), group by group: query head ``j`` of
    the pruned model then still reads KV head ``j // (heads / kv_heads)``."""
    total = len(scores)
    if heads % kv_heads or not 0 < heads <= total:
        choices = ", ".join(str(k * kv_heads) for k in range(1, total // kv_heads + 1))
        raise RecipeError(
            f"{field}.heads: {heads}; heads are pruned within each of the {kv_heads} groups that share a key/value"
            f" head, so give one of {choices}"
        )
    per_group, size = heads // kv_heads, total // kv_heads
    kept = [g * size + int(i) for g in range(kv_heads) for i in _top(scores[g * size : (g + 1) * size], per_group)]
    return torch.tensor(kept, dtype=torch.long)


def _check_size(value: int, full: int, name: str, field: str) -> None:
    if not 0 < value <= full:
        raise RecipeError(f"{field}.{name}: {value}; give a size from 1 to the model's {full}")


def prune_width(
    model: nn.Module,
    scores: WidthScores,
    *,
    heads: int | None = None,
    intermediate: int | None = None,
    hidden: int | None = None,
    field: str = "student.prune",
) -> nn.Module:
    """A new model of ``model``'s class with the best ``heads`` query heads (per layer, within KV groups),
    ``intermediate`` MLP channels (per layer) and ``hidden`` channels (model-wide) of ``model``; None keeps a size."""
    _layers(model, field)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = heads or config.num_attention_heads
    intermediate = intermediate or config.intermediate_size
    hidden = hidden or config.hidden_size
    _check_size(intermediate, config.intermediate_size, "intermediate", field)
    _check_size(hidden, config.hidden_size, "hidden", field)
    keep_hidden = _top(scores.hidden, hidden)
    keep_heads = [_kept_heads(s, heads, config.num_key_value_heads, field) for s in scores.heads]
    keep_mlp = [_top(s, intermediate) for s in scores.mlp]

    new_config = copy.deepcopy(config)
    new_config.hidden_size, new_config.intermediate_size = hidden, intermediate
    new_config.num_attention_heads, new_config.head_dim = heads, head_dim
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = type(model)(new_config)
    state = {}
    columns = keep_hidden
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            rows_heads = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep_heads[i].tolist()])
            if name.endswith("q_proj.weight"):
                tensor = tensor[rows_heads][:, columns]
            elif name.endswith("q_proj.bias"):
                tensor = tensor[rows_heads]
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                tensor = tensor[:, columns]
            elif name.endswith("o_proj.weight"):
                tensor = tensor[columns][:, rows_heads]
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                tensor = tensor[keep_mlp[i]][:, columns]
            elif name.endswith(("gate_proj.bias", "up_proj.bias")):
                tensor = tensor[keep_mlp[i]]
            elif name.endswith("down_proj.weight"):
                tensor = tensor[columns][:, keep_mlp[i]]
            elif name.endswith(("layernorm.weight", "o_proj.bias", "down_proj.bias")):
                tensor = tensor[columns]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = tensor[:, columns]
        elif name.endswith("norm.weight"):
            tensor = tensor[columns]
        state[name] = tensor.to(dtype).clone()
    missing, _ = pruned.load_state_dict(state, strict=False, assign=True)
    pruned.tie_weights()
    if missing:
        raise RecipeError(f"{field}: the model holds weights width pruning does not know: {missing[:3]}")
    _rebuild_buffers(pruned, model)  # non-persistent buffers (rotary frequencies), not in the state dict
    for index, layer in enumerate(pruned.model.layers):  # the KV cache is indexed by layer
        layer.self_attn.layer_idx = index
    pruned.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    return pruned.eval()


def _rebuild_buffers(pruned: nn.Module, source: nn.Module) -> None:
    """Copy the buffers that are not in the state dict (rotary ``inv_freq``) from ``source``: they depend on
    ``head_dim`` and the rope settings, which pruning keeps."""
    own = dict(source.named_buffers())
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta and name in own:
            module_name, _, attr = name.rpartition(".")
            module = pruned.get_submodule(module_name)
            module.register_buffer(attr, own[name].clone(), persistent=False)

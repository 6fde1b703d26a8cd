"""SwiftKV: a causal LM whose later layers take their keys and values from one earlier layer's input.

Qiao et al. 2024, "SwiftKV: Fast Prefill-Optimized Inference with Knowledge-Preserving Model
Transformation" (arXiv 2410.03960; METHODS.md section 24, read in snowflakedb/ArcticTraining
``projects/swiftkv``). With ``l = num_key_value_layers``:

- **SingleInputKV**: layers ``0 .. l-1`` are unchanged. The residual input ``x_l`` of layer ``l`` goes
  through a new norm (``norm_swiftkv``, initialised from layer ``l``'s input norm), and every layer
  ``j >= l`` takes its keys and values from it: ``K_j = k_proj_swiftkv_j(norm_swiftkv(x_l))``, likewise
  ``V_j``. Its query still comes from its own stream, through a new ``q_proj_swiftkv`` (copied from
  ``q_proj``). Prefill then runs layers ``< l`` on the prompt, writes every later layer's KV cache from
  ``x_l``, and runs layers ``>= l`` on the last prompt token only (:func:`swiftkv_prefill`).
- **AcrossKV** (``key_value_group_size`` G > 1): past ``l``, the layers come in groups of G; only the
  first of each group owns ``k/v_proj_swiftkv`` (initialised to the mean of the group's ``k/v_proj``)
  and a KV cache entry; the others reuse it. The KV cache shrinks to ``l + ceil((L - l) / G)`` layers.

Only the new modules train, by distillation from the unchanged model (the authors: forward KL at
temperature 2 plus the MSE of the second-to-last layer's output). With ``l = L - 1`` and ``G = 1`` the
new modules start as copies of the old, so the model equals the original exactly (a test holds this).

The model stays a transformers ``*ForCausalLM``: the attention modules of layers ``>= l`` get the new
projections and a class that uses them, and ``config.swiftkv`` records ``l`` and ``G``, so
:func:`kdforge.models.hf_causal_lm.load_causal_lm` rebuilds it from a saved folder. Llama-layout
decoders (``q/k/v/o_proj``, ``input_layernorm``: Llama, Mistral, Qwen2, SmolLM) are supported.

Example::

    model = to_swiftkv(AutoModelForCausalLM.from_pretrained(ref), num_key_value_layers=16, group=2)
    cache, logits = swiftkv_prefill(model, input_ids)   # logits of the last prompt token
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import RecipeError
from kdforge.models.llama_layout import decoder_layers

#: the config attribute recording the transformation (``num_key_value_layers``, ``key_value_group_size``)
CONFIG_KEY = "swiftkv"
#: names of the new modules (the only trainable parameters)
NEW_MODULES = ("norm_swiftkv", "q_proj_swiftkv", "k_proj_swiftkv", "v_proj_swiftkv")


class SwiftKVState:
    """What the layers of one SwiftKV model share during a forward: ``norm_swiftkv(x_l)`` (set when layer
    ``l`` starts) and each group leader's keys and values (for the group's other layers).

    A deep copy of the model copies this object once, and its hooks (bound methods) follow the copy.
    """

    def __init__(self, norm: nn.Module, leaders: dict[int, int], enabled: bool = True):
        self.norm, self.leaders, self.enabled = norm, leaders, enabled
        self.x: torch.Tensor | None = None
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of layer ``l``: keep its normalized residual input."""
        self.kv = {}
        hidden = args[0] if args else kwargs["hidden_states"]
        self.x = self.norm(hidden) if self.enabled else None

    def release(self, *_: Any) -> None:
        """Forward hook of the last layer: drop the forward's tensors (and the autograd graph they hold)."""
        self.x, self.kv = None, {}


def _modeling(attention: nn.Module):
    """The transformers modeling module the attention class comes from (Llama, Qwen2, Mistral...)."""
    return getattr(type(attention), "_modeling", None) or sys.modules[type(attention).__module__]


def _rotary(attention: nn.Module):
    return _modeling(attention).apply_rotary_pos_emb


def _attention_interface(attention: nn.Module):
    module = _modeling(attention)
    return module.ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, module.eager_attention_forward
    )


class SwiftKVAttentionMixin:
    """The forward of a layer ``j >= l``: query from its own stream (``q_proj_swiftkv``), keys and values
    from ``norm_swiftkv(x_l)`` (its own projections, or its group leader's cached result)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        state: SwiftKVState = self._swiftkv_state
        if not state.enabled:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        assert state.x is not None, "layer num_key_value_layers records its input before later layers run"
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj_swiftkv(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        leader = state.leaders[self.layer_idx]
        if leader == self.layer_idx:
            source = state.x[:, -hidden_states.shape[1] :]  # swiftkv_prefill runs the last token alone
            shape = (*source.shape[:-1], -1, self.head_dim)
            key = self.k_proj_swiftkv(source).view(shape).transpose(1, 2)
            value = self.v_proj_swiftkv(source).view(shape).transpose(1, 2)
            query, key = _rotary(self)(query, key, cos, sin)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
            state.kv[self.layer_idx] = (key, value)
        else:
            key, value = state.kv[leader]
            query = _rotary(self)(query, query, cos, sin)[0]
        output, weights = _attention_interface(self)(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


@functools.cache
def _swiftkv_class(base: type) -> type:
    """``base`` (an attention class) with the SwiftKV forward."""
    return type(f"SwiftKV{base.__name__}", (SwiftKVAttentionMixin, base), {"_modeling": sys.modules[base.__module__]})


def group_leaders(num_layers: int, num_key_value_layers: int, group: int) -> dict[int, int]:
    """``layer -> the layer whose keys and values it uses`` for every layer past ``l`` (AcrossKV groups of
    ``group`` layers from ``l``)."""
    return {
        j: num_key_value_layers + (j - num_key_value_layers) // group * group
        for j in range(num_key_value_layers, num_layers)
    }


def _linear_like(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    fresh = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    fresh = fresh.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fresh.weight.copy_(weight)
        if bias is not None:
            fresh.bias.copy_(bias)
    return fresh


def _check_layout(layers: nn.ModuleList, field: str) -> None:
    for name in ("self_attn", "input_layernorm"):
        if not hasattr(layers[0], name):
            raise RecipeError(f"{field}: SwiftKV needs Llama-layout decoder layers (self_attn, input_layernorm)")
    attention = layers[0].self_attn
    missing = [
        n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx") if not hasattr(attention, n)
    ]
    module = sys.modules[type(attention).__module__]
    if missing or not hasattr(module, "apply_rotary_pos_emb"):
        raise RecipeError(
            f"{field}: SwiftKV needs Llama-layout attention (q/k/v/o_proj, rotary embeddings);"
            f" {type(attention).__name__} has no {', '.join(missing) or 'apply_rotary_pos_emb'}"
        )


def to_swiftkv(
    model: nn.Module, num_key_value_layers: int, group: int = 1, *, field: str = "student.swiftkv"
) -> nn.Module:
    """Turn ``model`` (in place) into its SwiftKV form, the new modules initialised from the old ones (the
    authors' initialisation); only the new modules keep ``requires_grad``."""
    prefix, layers = decoder_layers(model, field)
    total = len(layers)
    if not 1 <= num_key_value_layers < total:
        raise RecipeError(
            f"{field}.num_key_value_layers: {num_key_value_layers}; give a layer from 1 to {total - 1}"
            f" (the model has {total}; layers before it keep their own keys and values)"
        )
    if group < 1:
        raise RecipeError(f"{field}.key_value_group_size: {group}; give 1 or more")
    if getattr(model.config, CONFIG_KEY, None):
        raise RecipeError(f"{field}: the model is already in SwiftKV form ({getattr(model.config, CONFIG_KEY)})")
    _check_layout(layers, field)
    for p in model.parameters():
        p.requires_grad_(False)
    inner = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    norm = copy.deepcopy(layers[num_key_value_layers].input_layernorm)
    inner.norm_swiftkv = norm
    leaders = group_leaders(total, num_key_value_layers, group)
    state = SwiftKVState(norm, leaders)
    for j in range(num_key_value_layers, total):
        attention = layers[j].self_attn
        q = attention.q_proj
        attention.q_proj_swiftkv = _linear_like(q, q.weight, q.bias)
        if leaders[j] == j:
            members = [layers[i].self_attn for i in range(j, total) if leaders[i] == j]
            for name in ("k_proj", "v_proj"):
                linears = [getattr(m, name) for m in members]
                weight = torch.stack([lin.weight for lin in linears]).mean(0)
                bias = torch.stack([lin.bias for lin in linears]).mean(0) if linears[0].bias is not None else None
                setattr(attention, f"{name}_swiftkv", _linear_like(linears[0], weight, bias))
        attention._swiftkv_state = state
        attention.__class__ = _swiftkv_class(type(attention))
    for name, p in model.named_parameters():
        if any(part in NEW_MODULES for part in name.split(".")):
            p.requires_grad_(True)
    layers[num_key_value_layers].register_forward_pre_hook(state.capture, with_kwargs=True)
    layers[total - 1].register_forward_hook(state.release)
    setattr(model.config, CONFIG_KEY, {"num_key_value_layers": num_key_value_layers, "key_value_group_size": group})
    model._swiftkv_state = state
    return model


def swiftkv_settings(model: nn.Module) -> dict[str, int] | None:
    """``{num_key_value_layers, key_value_group_size}`` of a SwiftKV model; None for any other."""
    return getattr(getattr(model, "config", None), CONFIG_KEY, None) or None


@contextlib.contextmanager
def original_model(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` runs as the model it was made from (its own keys and values everywhere)."""
    state: SwiftKVState = model._swiftkv_state
    before, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = before


def kv_cache_bytes(cache: Any) -> int:
    """Bytes the keys and values of a transformers cache hold (layers that share a leader's hold none)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _cache_for(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def swiftkv_prefill(model: nn.Module, input_ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The prompt's KV cache and the last token's logits ``[B, V]``, computed as SwiftKV inference does:
    layers ``< l`` on every token, the later layers' keys and values from ``norm_swiftkv(x_l)`` in one
    projection each, and layers ``>= l`` on the last token only. Prompts of one length (no padding).

    A model not in SwiftKV form (or inside :func:`original_model`) runs its ordinary prefill, with logits
    for the last token only, so the two are timed alike.
    """
    settings = swiftkv_settings(model)
    state: SwiftKVState | None = getattr(model, "_swiftkv_state", None)
    cache = _cache_for(model)
    if settings is None or state is None or not state.enabled:
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.cache, out.logits[:, -1]
    prefix, layers = decoder_layers(model, "swiftkv_prefill")
    inner = model.get_submodule(prefix.rsplit(".", 1)[0])
    split = settings["num_key_value_layers"]
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cos, sin = inner.rotary_emb(hidden, position_ids=positions)
    mask = _causal_mask(model, hidden, cache, positions)
    for layer in layers[:split]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
    # every later layer's keys and values, for all tokens but the last (which the last-token pass writes)
    x = state.norm(hidden[:, :-1])
    for j, leader in state.leaders.items():
        if leader != j:
            continue
        attention = layers[j].self_attn
        shape = (*x.shape[:-1], -1, attention.head_dim)
        key = attention.k_proj_swiftkv(x).view(shape).transpose(1, 2)
        value = attention.v_proj_swiftkv(x).view(shape).transpose(1, 2)
        key = _rotary(attention)(key, key, cos[:, :-1], sin[:, :-1])[0]
        cache.update(key, value, j)
    last, position = hidden[:, -1:], positions[:, -1:]
    last_pe = (cos[:, -1:], sin[:, -1:])
    for layer in layers[split:]:  # layer split's hook normalizes the last token's x_l
        last = layer(
            last, attention_mask=None, position_embeddings=last_pe, position_ids=position, cache=cache, use_cache=True
        )
    logits = model.get_output_embeddings()(inner.norm(last))
    return cache, logits[:, -1]


def _causal_mask(model: nn.Module, hidden: torch.Tensor, cache: Any, positions: torch.Tensor):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=positions
    )


def load_swiftkv(model: nn.Module, weight_files: list[Path], *, field: str) -> nn.Module:
    """A model loaded from a SwiftKV folder (whose ``config.swiftkv`` transformers keeps but ignores), put
    back in SwiftKV form with the new modules' saved weights."""
    from safetensors import safe_open

    settings = dict(getattr(model.config, CONFIG_KEY))
    delattr(model.config, CONFIG_KEY)
    to_swiftkv(model, settings["num_key_value_layers"], settings["key_value_group_size"], field=field)
    wanted = {name for name, _ in model.named_parameters() if any(p in NEW_MODULES for p in name.split("."))}
    found: dict[str, torch.Tensor] = {}
    for path in weight_files:
        with safe_open(str(path), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    missing = sorted(wanted - set(found))
    if missing:
        raise RecipeError(f"{field}: the folder's config says SwiftKV but its weights lack {missing[0]}")
    model.load_state_dict(found, strict=False)
    return model

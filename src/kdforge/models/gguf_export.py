"""A causal-LM student as one GGUF file, for llama.cpp and everything that reads its format.

The file holds what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama-layout model: the
``llama.*`` hyper-parameters, the tokenizer (a byte-level BPE's tokens, merges, token types, special
ids and chat template) and the tensors under llama.cpp's names. Two details of that converter matter:

- the query and key projections are stored with each head's rotary halves interleaved (its
  ``permute``); readers undo it (transformers' ``_reverse_permute_weights``), so it is done here;
- matrices are quantized with the ``gguf`` package's reference quantizers (``Q8_0``, ``Q4_0``,
  ``Q4_1``: blocks of 32 weights with a scale, and a minimum for ``Q4_1``); norms stay float32, as
  llama.cpp keeps 1-D tensors.

A tied LM head is written once (``token_embd``); llama.cpp and transformers reuse it.

Example::

    export_gguf(student, tokenizer, "student.Q4_1.gguf", quantization="Q4_1")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdforge.errors import KDForgeError

#: what ``quantization`` may be; F32 and F16 store the weights as they are
QUANTIZATIONS = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")

_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _rotary_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of a query or key projection's rows: within each head, the two rotary halves
    interleaved (the inverse of what GGUF readers apply when they load it)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_fields(writer, tokenizer) -> None:  # noqa: ANN001
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise KDForgeError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}")
    vocab = dict(model["vocab"])
    for added in state.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise KDForgeError("GGUF export needs token ids 0..N-1 without gaps")
    special = set(tokenizer.all_special_tokens) | {a["content"] for a in state.get("added_tokens", []) if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model: nn.Module, tokenizer, path: str | Path, *, quantization: str = "Q8_0", name: str = "") -> Path:  # noqa: ANN001
    """Write ``model`` (a Llama-layout causal LM) and ``tokenizer`` to the GGUF file ``path``."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    if quantization not in QUANTIZATIONS:
        raise KDForgeError(f"quantization {quantization!r}: one of {', '.join(QUANTIZATIONS)}")
    config = model.config
    if getattr(config, "swiftkv", None):
        raise KDForgeError(
            "GGUF export: a SwiftKV model's later layers read keys and values llama.cpp's Llama layout has no place"
            " for; serve it with kdforge (or a SwiftKV-aware engine such as vLLM with Arctic Inference)"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if getattr(config, "model_type", None) != "llama" or not isinstance(layers, nn.ModuleList):
        raise KDForgeError(
            f"GGUF export writes Llama-layout models (SmolLM2, Llama); this one is {getattr(config, 'model_type', '?')}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(name or "kdforge student")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[quantization])
    _tokenizer_fields(writer, tokenizer)

    def add(gguf_name: str, tensor: torch.Tensor, *, rotary_heads: int | None = None) -> None:
        values = tensor.detach().float().cpu().numpy()
        if rotary_heads is not None:
            values = _rotary_interleaved(values, rotary_heads)
        if values.ndim == 1 or quantization == "F32":
            writer.add_tensor(gguf_name, values.astype(np.float32))
        elif quantization == "F16":
            writer.add_tensor(gguf_name, values.astype(np.float16))
        else:
            kind = getattr(GGMLQuantizationType, quantization)
            writer.add_tensor(gguf_name, quantize(values, kind), raw_dtype=kind)

    body = model.model
    add("token_embd.weight", body.embed_tokens.weight)
    add("output_norm.weight", body.norm.weight)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != body.embed_tokens.weight.data_ptr():
        add("output.weight", head.weight)
    for b, layer in enumerate(layers):
        for hf_name, gguf_name in _NAMES.items():
            weight = layer.get_submodule(hf_name).weight
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name)
            add(f"blk.{b}.{gguf_name}.weight", weight, rotary_heads=heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)  # a failed export leaves no half-written file under the name
    return path

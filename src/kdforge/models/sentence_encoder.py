"""Sentence encoders as sentence-transformers models: load, cut from a teacher, run with internals.

Teachers and students of the embedding and ranking tasks are
``SentenceTransformer`` objects (a transformer, pooling, optionally a normalisation),
so the student a run saves is a sentence-transformers folder that loads with
``SentenceTransformer(path)``, and any model that library reads can be a teacher.

:func:`run_encoder` runs the transformer itself and then the model's remaining
modules, which gives the same sentence embedding as ``SentenceTransformer.forward``
plus what MiniLM-style losses need: hidden states, attention probabilities and the
query, key and value projections of every layer.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from torch import nn

from kdforge.errors import ModelRefError, RecipeError
from kdforge.models.refs import ModelLocation, resolve_model_ref, unsafe_file_error

POOLING_MODES = ("mean", "cls", "max")


def is_sentence_transformers_folder(path: Path) -> bool:
    return (path / "modules.json").is_file()


def transformer_of(model: SentenceTransformer, field: str = "model") -> nn.Module:
    """The Hugging Face model inside a sentence-transformers encoder (its first module)."""
    first = model[0] if len(model) else None
    inner = getattr(first, "auto_model", None)
    if not isinstance(first, Transformer) or inner is None:
        raise RecipeError(
            f"{field}: the encoder's first module is {type(first).__name__}, not a transformer; kdforge distills"
            " transformer sentence encoders"
        )
    return inner


def _from_modules(source: str, *, pooling: str, normalize: bool, max_length: int) -> SentenceTransformer:
    """A transformers model folder made into a sentence encoder with the given pooling."""
    transformer = Transformer(source, max_seq_length=max_length)
    modules: list[nn.Module] = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def load_encoder(
    ref: str,
    *,
    field: str,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 256,
    tokenizer_from: str | None = None,
) -> SentenceTransformer:
    """Load ``ref`` as a sentence encoder; ``pooling``/``normalize`` apply where the model has no
    sentence-transformers configuration of its own (a plain transformers folder, an ONNX file).

    ``tokenizer_from`` names the model whose tokenizer a checkpoint without one uses (the
    ONNX paraphrase-MiniLM-L3-v2 shares all-MiniLM-L6-v2's vocabulary).
    """
    location = resolve_model_ref(ref, field=field)
    onnx_file = getattr(location, "onnx_file", None)
    if onnx_file:
        return _from_onnx(location, onnx_file, field, pooling, normalize, max_length, tokenizer_from)
    try:
        if location.path is not None and is_sentence_transformers_folder(location.path):
            model = SentenceTransformer(str(location.path), device="cpu", local_files_only=True)
        elif location.path is not None:
            model = _from_modules(str(location.path), pooling=pooling, normalize=normalize, max_length=max_length)
        else:
            model = SentenceTransformer(str(location.hub_id), device="cpu")
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        unsafe = unsafe_file_error(exc, field, ref)
        if unsafe is not None:
            raise unsafe from None
        if not isinstance(exc, OSError):
            raise
        if location.kind == "hub":
            raise ModelRefError(
                f"{field}: {ref!r} is not a local folder and could not be fetched from the Hugging Face Hub"
                " (offline, or no such model); download it where there is a network and give its folder"
            ) from None
        raise ModelRefError(f"{field}: {ref} could not be loaded as a sentence encoder: {exc}") from None
    if max_length and model.max_seq_length != max_length:
        model.max_seq_length = max_length
    transformer_of(model, field)
    return model


def _from_onnx(
    location: ModelLocation,
    onnx_file: str,
    field: str,
    pooling: str,
    normalize: bool,
    max_length: int,
    tokenizer_from: str | None,
) -> SentenceTransformer:
    from kdforge.models.onnx_bert import bert_from_onnx

    if tokenizer_from is None:
        raise RecipeError(f"{field}: {location.ref} is an ONNX file without a tokenizer; name a model to take it from")
    assert location.path is not None
    bert = bert_from_onnx(location.path / onnx_file)
    tokenizer_ref = resolve_model_ref(tokenizer_from, field=field)
    return encoder_from_transformer(
        bert, tokenizer_ref.source, pooling=pooling, normalize=normalize, max_length=max_length
    )


def encoder_from_transformer(
    transformer: nn.Module, tokenizer_source: str, *, pooling: str, normalize: bool, max_length: int
) -> SentenceTransformer:
    """Wrap an in-memory transformers model and a tokenizer into a sentence encoder."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    with tempfile.TemporaryDirectory(prefix="kdforge-encoder-") as tmp:
        transformer.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
        # a model without a pooler (the ONNX export has none) reloads with a fresh one, which
        # sentence pooling never uses; transformers' "MISSING pooler" report would only alarm
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return _from_modules(tmp, pooling=pooling, normalize=normalize, max_length=max_length)
        finally:
            hf_logging.set_verbosity(verbosity)


def with_layers(teacher: SentenceTransformer, layers: list[int], field: str = "student.layers") -> SentenceTransformer:
    """A copy of ``teacher`` that keeps only the transformer layers ``layers`` (in order).

    Initialising a shallow student from the teacher's own layers is what DistilBERT,
    TinyBERT's general stage and sentence-transformers' model-distillation example do;
    embeddings, pooling and normalisation are kept as they are.
    """
    student = copy.deepcopy(teacher)
    inner = transformer_of(student, field)
    stack = getattr(getattr(inner, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise RecipeError(
            f"{field}: {type(inner).__name__} keeps no layer list at encoder.layer (the BERT layout); use"
            " student.model for a separate pretrained student"
        )
    total = len(stack)
    bad = [i for i in layers if not 0 <= i < total]
    if bad or len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise RecipeError(
            f"{field}: {layers} is not an increasing list of distinct layer indices in [0, {total - 1}]"
            f" (the teacher has {total} layers)"
        )
    inner.encoder.layer = nn.ModuleList(stack[i] for i in layers)
    inner.config.num_hidden_layers = len(layers)
    return student


@contextlib.contextmanager
def _attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Attention probabilities come only from the eager kernel; other calls keep the faster one."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == name or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@contextlib.contextmanager
def _capture_projections(model: nn.Module, store: list[dict[str, torch.Tensor]]) -> Iterator[None]:
    """Record every layer's query, key and value projections ([B, L, D], heads concatenated)."""
    handles = []
    for layer in model.encoder.layer:
        attention = layer.attention.self
        record: dict[str, torch.Tensor] = {}
        store.append(record)
        for name in ("query", "key", "value"):

            def hook(_module, _inputs, output, record=record, name=name):
                record[name] = output

            handles.append(getattr(attention, name).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_encoder(
    model: SentenceTransformer,
    inputs: dict[str, torch.Tensor],
    *,
    hidden_states: bool = False,
    attentions: bool = False,
    qkv: bool = False,
) -> dict[str, Any]:
    """Encode tokenized ``inputs``; returns ``sentence_embedding`` [B, D] and the internals asked for.

    ``hidden_states``: one [B, L, H] per layer after the embeddings (the embeddings'
    output first); ``attentions``: one [B, heads, L, L] per layer; ``qkv``: one
    ``(q, k, v)`` per layer.
    """
    inner = transformer_of(model)
    device = next(inner.parameters()).device
    names = ("input_ids", "attention_mask", "token_type_ids")
    features = {k: inputs[k].to(device) for k in names if k in inputs}
    projections: list[dict[str, torch.Tensor]] = []
    hooks = _capture_projections(inner, projections) if qkv else contextlib.nullcontext()
    implementation = _attention_implementation(inner, "eager") if attentions else contextlib.nullcontext()
    with hooks, implementation:
        out = inner(
            **features,
            output_hidden_states=hidden_states,
            output_attentions=attentions,
            return_dict=True,
        )
    pooled: dict[str, Any] = {"token_embeddings": out.last_hidden_state, "attention_mask": features["attention_mask"]}
    for module in list(model)[1:]:
        pooled = module(pooled)
    result: dict[str, Any] = {"sentence_embedding": pooled["sentence_embedding"]}
    if hidden_states:
        result["hidden_states"] = tuple(out.hidden_states)
    if attentions:
        result["attentions"] = tuple(out.attentions)
    if qkv:
        result["qkv"] = tuple((p["query"], p["key"], p["value"]) for p in projections)
    return result


def uses_cosine(model: nn.Module) -> bool:
    """Whether the model's scores are cosine similarities (the sentence-transformers default), not dot products."""
    return getattr(model, "similarity_fn_name", "cosine") != "dot"


def same_vocabulary(a: SentenceTransformer, b: SentenceTransformer) -> bool:
    return a.tokenizer.get_vocab() == b.tokenizer.get_vocab()

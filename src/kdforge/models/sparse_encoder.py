"""Inference-free learned sparse retrievers as sentence-transformers ``SparseEncoder`` models.

Geng et al. 2024 ("Towards Competitive Search Relevance For Inference-Free Learned
Sparse Retrievers"): documents go through a BERT with its masked-language-model head,
and each vocabulary term's weight is the max over the document's tokens of
log(1 + ReLU(logit)); queries need no model at all: a query is its tokens, each
weighted by its IDF on the corpus, and the score is sum over the query's tokens of
idf_t * w_{d,t}. Only documents are encoded, offline.

The student is built as sentence-transformers builds such models (a ``Router`` with
a ``SparseStaticEmbedding`` on the query side and a fill-mask ``Transformer`` plus
``SpladePooling`` on the document side), so the saved student loads with
``SparseEncoder(path)`` and ``encode_query``/``encode_document`` work as usual.

A checkpoint without an MLM head (a sentence-transformers bi-encoder such as
all-MiniLM-L6-v2) gets one tied to its word embeddings: the decoder *is* the
embedding matrix, the head's dense transform starts as the identity, so a token's
logit starts as the similarity of the contextual vector to that token's embedding
(the document's own and related words rank first), and the bias starts at
``head_bias`` so that only the strongest terms are non-zero at step 0 (-5 gives about
770 non-zero terms per SciFact abstract, 0 nearly all 30,522: benchmarks/index/probe_sparse.py).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SparseEncoder
from sentence_transformers.base.modules import Router, Transformer
from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding, SpladePooling
from torch import nn

from kdforge.errors import RecipeError
from kdforge.models.refs import ModelLocation, load_with, resolve_model_ref


@contextmanager
def _quiet_transformers():
    """transformers reports the newly made head of a checkpoint without one; here that is intended."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def idf_weights(tokenizer, texts: list[str], special_ids: list[int]) -> torch.Tensor:
    """``[V]`` IDF of every vocabulary token over ``texts``: log(1 + (N - df + 0.5) / (df + 0.5)).

    The BM25 form (always positive, so every query token counts); special tokens get 0
    (they carry no meaning and every document has them).
    """
    vocab = len(tokenizer)
    df = np.zeros(vocab, dtype=np.int64)
    for start in range(0, len(texts), 1024):
        # whole documents (no truncation): verbose=False mutes the "longer than the model" notice
        encoded = tokenizer(texts[start : start + 1024], add_special_tokens=False, truncation=False, verbose=False)
        encoded = encoded["input_ids"]
        for ids in encoded:
            df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    n = len(texts)
    idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
    idf[special_ids] = 0.0
    return torch.from_numpy(idf)


def _transformer_folder(path: Path) -> Path:
    """Where the transformers model of a (sentence-transformers) folder lives."""
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer"):
                return path / module.get("path", "")
    return path


def _tie_new_head(model: nn.Module, head_bias: float) -> None:
    """Start a freshly made MLM head as described in the module docstring."""
    head = model.cls.predictions
    transform = head.transform
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(transform.dense.weight.shape[0]))
        transform.dense.bias.zero_()
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()
        head.bias.fill_(head_bias)
    if head.decoder.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        head.decoder.weight = model.get_input_embeddings().weight


def _keep_layers(model: nn.Module, layers: list[int], field: str) -> None:
    encoder = model.base_model.encoder
    total = len(encoder.layer)
    bad = [i for i in layers if not -total <= i < total]
    if bad or not layers:
        raise RecipeError(f"{field}: layers {bad or layers} do not exist; the model has layers 0..{total - 1}")
    encoder.layer = nn.ModuleList(encoder.layer[i] for i in layers)
    model.config.num_hidden_layers = len(layers)


def build_sparse_encoder(
    ref: str,
    *,
    field: str,
    idf: torch.Tensor,
    max_length: int,
    layers: list[int] | None = None,
    head_bias: float = -5.0,
) -> SparseEncoder:
    """An inference-free sparse encoder whose document side starts from ``ref`` and whose query
    side weighs tokens by ``idf``. ``ref`` may be a model with an MLM head (kept), a bi-encoder
    without one (a tied head is made), or a saved kdforge/sentence-transformers sparse encoder."""
    location = resolve_model_ref(ref, field=field)
    if location.path is not None and (location.path / "router_config.json").is_file():
        document = document_transformer(SparseEncoder(str(location.path), device="cpu", local_files_only=True))
    else:
        with _quiet_transformers():
            document, info = _fill_mask_transformer(location, field, max_length)
        if any(key.startswith("cls.predictions.transform") for key in info):
            _tie_new_head(document.auto_model, head_bias)
    if layers is not None:
        _keep_layers(document.auto_model, layers, field.rsplit(".", 1)[0] + ".layers")
    document.max_seq_length = max_length
    query = SparseStaticEmbedding(tokenizer=document.tokenizer, weight=idf.clone(), frozen=True)
    router = Router.for_query_document(query_modules=[query], document_modules=[document, SpladePooling("max")])
    model = SparseEncoder(modules=[router], similarity_fn_name="dot", device="cpu")
    for p in document.auto_model.parameters():
        p.requires_grad_(True)
    return model


def model_source(location: ModelLocation) -> str:
    """What transformers loads for a student reference: the transformer inside a local
    (sentence-transformers or saved sparse) folder, else the hub id."""
    if location.path is None:
        return location.source
    saved = sorted(location.path.glob("document_*Transformer"))  # a saved sparse encoder's document side
    return str(saved[0] if saved else _transformer_folder(location.path))


def _fill_mask_transformer(location: ModelLocation, field: str, max_length: int) -> tuple[Transformer, set[str]]:
    """A fill-mask transformer for ``location`` and the names of the weights it had to make."""
    from transformers import AutoModelForMaskedLM

    source = model_source(location)
    # through load_with: a hub id that cannot be fetched (offline) becomes one clear error naming the field
    mlm, info = load_with(
        AutoModelForMaskedLM.from_pretrained,
        replace(location, path=Path(source)) if location.path else location,
        field=field,
        output_loading_info=True,
    )
    if not hasattr(mlm, "cls"):
        raise RecipeError(f"{field}: {location.ref} is not a BERT-style model with a masked-LM head or one to tie")
    document = Transformer(source, transformer_task="fill-mask", max_seq_length=max_length)
    return document, set(info.get("missing_keys", ()))


def router_of(model: SparseEncoder) -> Router:
    first = model[0]
    if not isinstance(first, Router):
        raise RecipeError("the sparse encoder has no query/document router; it is not an inference-free model")
    return first


def document_transformer(model: SparseEncoder) -> Transformer:
    return router_of(model).sub_modules["document"][0]


def query_embedding(model: SparseEncoder) -> SparseStaticEmbedding:
    return router_of(model).sub_modules["query"][0]


def document_weights(model: SparseEncoder, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, V]`` term weights: max over real tokens of log(1 + ReLU(MLM logits)), special tokens 0."""
    transformer = document_transformer(model)
    logits = transformer.auto_model(**inputs).logits
    padding = ~inputs["attention_mask"].bool().unsqueeze(-1)
    # log(1 + ReLU(.)) is monotone, so it commutes with the max over tokens: pooling the raw logits
    # first makes the element-wise work [B, V] instead of [B, L, V] (the largest tensor of the step)
    # and routes the gradient through the same token
    weights = torch.log1p(torch.relu(logits.masked_fill(padding, float("-inf")).amax(1)))
    # the query side never has special tokens (their IDF is 0): weights there would only cost space
    special = torch.as_tensor(transformer.tokenizer.all_special_ids, device=weights.device)
    return weights.index_fill(1, special, 0.0)


def query_vectors(model: SparseEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` query vectors without a model: IDF at each token present (special tokens weigh 0)."""
    idf = query_embedding(model).weight
    present = torch.zeros(input_ids.shape[0], idf.shape[0], dtype=idf.dtype, device=input_ids.device)
    present.scatter_(1, input_ids, attention_mask.to(idf.dtype))
    return present.clamp_max(1.0) * torch.relu(idf)

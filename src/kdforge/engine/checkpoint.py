"""Training checkpoints, written atomically and loaded without running pickled code.

A checkpoint is a folder ``step-0000120/`` with the model (safetensors), the
learnable loss modules when the objective has any (safetensors), the optimizer and
LR-scheduler states, the RNG states, the data position and any schedule state. It
is written as ``.step-0000120.tmp`` and renamed when complete, so the newest folder
named ``step-*`` is always whole. ``torch.load`` runs with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from kdforge import faults
from kdforge.errors import CheckpointError, first_line

PREFIX = "step-"
LOSS_MODULES_FILE = "loss_modules.safetensors"


@dataclass
class TrainState:
    """Where training stands: optimizer steps done and the data position."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    keep: int,
    loss_modules: nn.Module | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(state.step)
    tmp = folder / f".{final.name}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        faults.point("checkpoint", state.step)  # the tests kill the run here: between two files
        if _has_weights(loss_modules):
            save_model(loss_modules, str(tmp / LOSS_MODULES_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        _sync(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _sync_folder(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(folder) if p != final]
        last = previous[-1] if previous else "none"
        raise CheckpointError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); free disk space and resume;"
            f" last good checkpoint: {last}"
        ) from None
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sync(folder: Path) -> None:
    """Flush the checkpoint's files to disk before the rename publishes it: after a power loss
    (not only a killed process) the newest ``step-*`` folder must still hold whole files."""
    for file in folder.iterdir():
        with file.open("rb") as fh:
            os.fsync(fh.fileno())


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (the folder's entry list)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unsafe or corrupt file: refuse, never unpickle
        raise CheckpointError(
            f"{path}: cannot be loaded safely ({exc.__class__.__name__}); delete this checkpoint"
        ) from None


def _has_weights(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.state_dict())


def _load_loss_modules(path: Path, loss_modules: nn.Module | None) -> None:
    """The objective's learnable loss modules; a checkpoint of another objective is refused, not half-loaded."""
    file = path / LOSS_MODULES_FILE
    if not _has_weights(loss_modules):
        if file.exists():
            raise CheckpointError(
                f"{path}: holds weights of learnable loss terms, but this objective has none; it belongs to"
                " another objective: delete it, or run without --resume"
            )
        return
    assert loss_modules is not None
    if not file.exists():
        # checkpoints written before loss modules could be trained, or by another objective
        raise CheckpointError(
            f"{path}: has no weights for the objective's learnable loss terms ({LOSS_MODULES_FILE});"
            " it was written for another objective: delete it, or run without --resume"
        )
    try:
        load_model(loss_modules, str(file))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: the loss-module weights do not fit the objective's terms ({first_line(exc)});"
            " delete this checkpoint, or run without --resume"
        ) from None


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_modules: nn.Module | None = None,
) -> TrainState:
    try:
        load_model(model, str(path / "model.safetensors"))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: model weights do not load ({exc}); delete this checkpoint") from None
    _load_loss_modules(path, loss_modules)
    optimizer.load_state_dict(_load(path / "optimizer.pt"))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    set_rng_state(_load(path / "rng.pt"))
    try:
        return TrainState(**json.loads((path / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}/state.json: unreadable ({first_line(exc)}); delete this checkpoint") from None

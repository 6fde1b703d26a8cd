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
from kdforge.distributed import barrier, is_main, rank
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
        _publish(tmp, final, keep)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, exc) from None
    return final


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Flush the finished ``tmp`` folder, rename it to ``final`` (the step is now whole), keep the newest ``keep``."""
    _sync(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _sync_folder(final.parent)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_error(final: Path, exc: OSError) -> CheckpointError:
    previous = [p for p in list_checkpoints(final.parent) if p != final]
    return CheckpointError(
        f"could not write checkpoint {final} ({exc.strerror or exc}); free disk space and resume;"
        f" last good checkpoint: {previous[-1] if previous else 'none'}"
    )


def _read_state(path: Path) -> TrainState:
    try:
        return TrainState(**json.loads((path / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}/state.json: unreadable ({first_line(exc)}); delete this checkpoint") from None


def _sync(folder: Path) -> None:
    """Flush the checkpoint's files to disk before the rename publishes it: after a power loss
    (not only a killed process) the newest ``step-*`` folder must still hold whole files."""
    for file in folder.iterdir():
        if file.is_dir():  # a sharded checkpoint's dcp/ folder
            _sync(file)
            continue
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
    return _read_state(path)


# ----------------------------------------------------------------- sharded (DCP) checkpoints

DCP_FOLDER = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_FOLDER).is_dir()


def save_sharded_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    keep: int,
    loss_modules: nn.Module | None = None,
) -> Path:
    """Every process writes its shards of the model and optimizer state (``torch.distributed.checkpoint``)
    into ``.step-N.tmp/dcp``; the main process adds the rest (scheduler, state, loss modules), each process
    its RNG state, and once all are done the main process renames the folder: the newest ``step-*`` is whole.
    Called by every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = folder / checkpoint_name(state.step)
    tmp = folder / f".{final.name}.tmp"
    main = is_main()
    try:
        if main:
            folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / DCP_FOLDER))
        faults.point("checkpoint", state.step)  # the tests kill the run here: shards written, the rest not
        torch.save(rng_state(), tmp / f"rng-{rank()}.pt")
        if main:
            if _has_weights(loss_modules):
                save_model(loss_modules, str(tmp / LOSS_MODULES_FILE))
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        barrier()
        if main:
            _publish(tmp, final, keep)
        barrier()
    except OSError as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, exc) from None
    return final


def load_sharded_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_modules: nn.Module | None = None,
) -> TrainState:
    """A DCP checkpoint into ``model`` and ``optimizer``, sharded or whole, on any number of processes
    (DCP re-shards what was written by another number). Called by every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(loaded, checkpoint_id=str(path / DCP_FOLDER))
    except Exception as exc:  # DCP raises its own error types (a missing shard, another model)
        raise CheckpointError(
            f"{path}: the sharded checkpoint does not load ({first_line(exc)}); delete this checkpoint"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    _load_loss_modules(path, loss_modules)
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    own = path / f"rng-{rank()}.pt"
    set_rng_state(_load(own if own.exists() else path / "rng-0.pt"))  # more processes than wrote it: rank 0's
    return _read_state(path)

"""The training loop, on Hugging Face Accelerate.

It knows nothing about tasks: it gets a model, a dataset with its collate
function, and ``loss_fn(model, batch, step) -> (loss, {term: value})``, plus, when
the loss has learnable parts (a critic), the module that holds them. It owns
the optimizer, LR schedule, gradient accumulation, logging, periodic evaluation,
checkpoints, ``--resume``, the SIGTERM and SIGINT handlers and the guard against
NaN and inf (stop at the step, naming the term and the last good checkpoint, or
skip the batch and count it).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kdforge import faults
from kdforge.distributed import average_gradients, mean_over_processes, on_main, process_share, same_start
from kdforge.engine import sharding
from kdforge.engine.checkpoint import (
    TrainState,
    is_sharded_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from kdforge.engine.metrics_log import MetricsLog
from kdforge.engine.optim import build_lr_scheduler, build_optimizer
from kdforge.engine.sampler import EpochShuffleSampler, ProcessShareBatches
from kdforge.errors import Interrupted, KDForgeError, NonFiniteError
from kdforge.interrupts import stop_requests
from kdforge.progress import training_progress
from kdforge.recipe import TrainingConfig
from kdforge.settings import progress_enabled

#: ``loss_fn(model, batch, step) -> (loss, {term: value})``, optionally with a third
#: element ``{name: float}`` of scalars to log as they are (a schedule's t), not averaged
LossFn = Callable[[nn.Module, dict[str, Any], int], tuple]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    final_terms: dict[str, float]
    resumed_from: int | None = None
    #: batches left out for a NaN or inf (training.nonfinite: skip): {"step", "term"} each
    skipped: list[dict[str, Any]] | None = None
    #: the trained model when training sharded it: a new, ordinary module holding the gathered weights
    #: (the one passed in stays sharded); None when the model was trained in place
    model: nn.Module | None = None
    #: the most bytes one process held for the model's weights, gradients and optimizer state (after a step)
    held_bytes: dict[str, int] | None = None


#: Accelerate's launch flags (``ACCELERATE_USE_<name>``) for setups that shard the student
_SHARDED = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}


def check_training_settings(cfg: TrainingConfig) -> tuple[bool, str]:
    """Settings this machine cannot honour, refused before a run writes anything; returns (cpu, precision)."""
    for tracker in cfg.trackers:
        if importlib.util.find_spec(tracker) is None:
            raise KDForgeError(f"training.trackers: {tracker} is not installed; pip install {tracker}")
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise KDForgeError("training.device: cuda was asked for but no GPU is visible; use auto or cpu")
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    if precision == "fp16" and cpu:
        raise KDForgeError("training.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
    sharded = [name for name in _SHARDED if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"]
    if sharded and not cpu:  # (on the CPU, Accelerate runs such a launch as plain data parallel)
        raise KDForgeError(
            f"accelerate launch: {_SHARDED[sharded[0]]} shards the student inside Accelerate's own wrapper, which"
            " kdforge's adapters, checkpoints and saved models do not go through; launch with --multi_gpu and set"
            " training.sharding: fsdp (FSDP2, called by kdforge) to shard the student and the teacher"
        )
    return cpu, precision


def make_accelerator(cfg: TrainingConfig, project_dir: Path) -> Accelerator:
    """A fresh Accelerator; earlier ones in this process (another phase) are forgotten."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cpu, precision = check_training_settings(cfg)
    try:
        return Accelerator(
            cpu=cpu,
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.gradient_accumulation,
            log_with=list(cfg.trackers) or None,
            project_dir=str(project_dir),
        )
    except (ValueError, RuntimeError) as exc:
        raise KDForgeError(f"training: Accelerate cannot start with these settings ({exc})") from None


def total_optimizer_steps(cfg: TrainingConfig, batches_per_epoch: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    assert cfg.epochs is not None
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.gradient_accumulation))


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``training.deterministic``: deterministic kernels for this phase only (the setting is global in torch)."""
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _nonfinite_term(loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> str | None:
    """The term that made the loss NaN or inf (``total`` when each term is finite), or None."""
    if torch.isfinite(loss):
        return None
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    return ", ".join(bad) or "total"


def _any_process(found: str | None, accelerator: Accelerator, elsewhere: str = "another process's batch") -> str | None:
    """What one process found (a NaN, a stop signal), agreed by all: a micro-batch is skipped, or the
    run stopped, on every process when one of them saw it, as one process leaving a backward pass out
    (or a step) would leave the others waiting on it. ``elsewhere`` names it where another process found it."""
    if accelerator.num_processes == 1:
        return found
    count = accelerator.reduce(torch.tensor([float(found is not None)], device=accelerator.device), reduction="sum")
    return found or (elsewhere if count.item() > 0 else None)


def _place_loss_modules(loss_modules: nn.Module | None, accelerator: Accelerator) -> list[nn.Parameter]:
    """Move the loss modules to the training device; returns their trainable parameters."""
    if loss_modules is None:
        return []
    params = [p for p in loss_modules.parameters() if p.requires_grad]
    loss_modules.to(accelerator.device)
    return params


class _ShareItems(Dataset):
    """Items looked up by the ``(index, counted)`` pairs of :class:`ProcessShareBatches`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Any, bool]:
        return self.dataset[key[0]], key[1]


def _share_loader(
    dataset: Dataset, sampler: Sampler[int], collate_fn: Callable, cfg: TrainingConfig, accelerator: Accelerator
) -> DataLoader:
    """This process's share of each global batch of ``cfg.batch_size``, collated as ``(batch, counted)``
    and placed on the training device.

    Accelerate's own sharding is not used: it gives each process a batch of its own (the
    global batch would grow with the number of processes) and repeats examples to even
    out the last batch. Its loader still wraps this one (one process's view), for device
    placement, skipping on resume, and the end-of-epoch signal of gradient accumulation.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size < world:
        raise KDForgeError(
            f"training.batch_size: {cfg.batch_size} is the global batch, split over {world} processes, so some would"
            f" get nothing; set it to at least {world}"
        )

    def collate(items: list[tuple[Any, bool]]) -> tuple[Any, bool]:
        return collate_fn([item for item, _ in items]), all(counted for _, counted in items)

    loader = DataLoader(
        _ShareItems(dataset),
        batch_sampler=ProcessShareBatches(sampler, cfg.batch_size, rank, world),
        collate_fn=collate,
    )
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True)


def model_parameter_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The model's trainable parameters as optimizer groups. A model may split them itself with a
    ``parameter_groups()`` method whose groups carry an ``lr_scale`` (Distill-VQ trains its IVF centroids
    10x faster than its PQ codebooks); otherwise one group."""
    offered = getattr(model, "parameter_groups", None)
    if callable(offered):
        return [dict(group, params=[p for p in group["params"] if p.requires_grad]) for group in offered()]
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def train(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    loss_fn: LossFn,
    cfg: TrainingConfig,
    *,
    phase: str,
    run_dir: Path,
    evaluate: EvalFn | None = None,
    resume: bool = False,
    state_hooks: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
    loss_modules: nn.Module | None = None,
    sampler: Sampler[int] | None = None,
) -> TrainResult:
    """Train ``model`` in place; checkpoints go to ``run_dir/checkpoints/<phase>``.

    ``loss_modules`` holds the loss's learnable parameters, which ``loss_fn`` uses:
    they are trained in place with the model's (their own parameter group, the same
    settings), on its device, and checkpointed with it.

    ``sampler`` replaces the default shuffle (a task that composes its batches, such as
    TAS-B's one-topic batches, yields them flat in order); like the default one, its
    order must depend only on its seed and ``set_epoch``, so a resumed run sees the same data.
    """
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    sampler = sampler if sampler is not None else EpochShuffleSampler(len(dataset), seed=cfg.seed)
    loader = _share_loader(dataset, sampler, collate_fn, cfg, accelerator)
    world = accelerator.num_processes
    loss_params = _place_loss_modules(loss_modules, accelerator)
    shards = sharding.sharded(cfg)
    whole: nn.Module | None = None
    if shards:
        if loss_params:
            raise KDForgeError(
                "training.sharding: fsdp does not train learnable loss terms (a critic) yet; use sharding: none"
            )
        if cfg.precision == "fp16":
            raise KDForgeError("training.precision: fp16 needs a sharded gradient scaler; use bf16 with sharding: fsdp")
        same_start(model)
        whole = sharding.skeleton(model)  # what the trained shards are gathered into at the end
        # FSDP2 reduce-scatters (averages) the gradients and casts to training.precision itself
        model = sharding.shard(model, accelerator.device, precision=cfg.precision, offload=cfg.cpu_offload)
    groups = model_parameter_groups(model)
    if loss_params:
        groups.append({"params": loss_params})
    optimizer = build_optimizer(groups, cfg)
    if not shards:
        # the model is placed (and autocast) but not wrapped in DDP: the processes' gradients are averaged
        # by distributed.average_gradients, since a task's adapter may call any part of the model
        model = accelerator.prepare_model(model, evaluation_mode=True)
    optimizer = accelerator.prepare_optimizer(optimizer)
    if not shards:
        same_start(model)
    # the parameters whose gradients the engine averages itself: the whole model's (sharded: those FSDP
    # does not hold) and the loss's
    synced = [p for group in groups for p in group["params"]]
    if shards:
        synced = sharding.replicated(synced)
    clipped = [*model.parameters(), *loss_params] if loss_params else None
    dcp_checkpoints = cfg.sharding == "fsdp"  # on one process too, so that a run moves between 1 and N
    batches_per_epoch = len(loader)
    total = total_optimizer_steps(cfg, batches_per_epoch)
    # The scheduler is stepped by hand once per optimizer step, so its count is the
    # same on any number of processes (a prepared scheduler steps once per process).
    scheduler = build_lr_scheduler(optimizer.optimizer, cfg, total)

    ckpt_dir = run_dir / "checkpoints" / phase
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    state = TrainState()
    resumed_from = None
    if resume and list_checkpoints(ckpt_dir):
        latest = list_checkpoints(ckpt_dir)[-1]
        if is_sharded_checkpoint(latest) != dcp_checkpoints:
            written, now = ("fsdp", "none") if is_sharded_checkpoint(latest) else ("none", "fsdp")
            raise KDForgeError(
                f"training.sharding: {latest} was written with sharding: {written}; resume with that setting"
                f" (sharding: {now} cannot read it), or start over without --resume"
            )
        load = load_sharded_checkpoint if dcp_checkpoints else load_checkpoint
        state = load(
            latest,
            model=model if shards else accelerator.unwrap_model(model),
            optimizer=optimizer.optimizer,
            scheduler=scheduler,
            loss_modules=loss_modules,
        )
        if state_hooks:
            state_hooks[1](state.extra.get("objective", {}))
        resumed_from = state.step
        log.truncate_after(phase, state.step)
    else:  # a fresh start of the phase (also a resume that finds no checkpoint): its old records go
        log.truncate_after(phase, -1)

    if cfg.trackers:
        accelerator.init_trackers(f"kdforge-{run_dir.name}")

    def checkpoint() -> Path:
        state.extra = {
            "objective": state_hooks[0]() if state_hooks else {},
            "log_interval": [interval_loss, interval_terms, interval_count],
            "skipped": skipped,
        }
        if dcp_checkpoints:  # every process writes its shards
            return save_sharded_checkpoint(
                ckpt_dir,
                model=model if shards else accelerator.unwrap_model(model),
                optimizer=optimizer.optimizer,
                scheduler=scheduler,
                state=state,
                keep=cfg.keep_checkpoints,
                loss_modules=loss_modules,
            )
        path = None
        if main:
            path = save_checkpoint(
                ckpt_dir,
                model=accelerator.unwrap_model(model),
                optimizer=optimizer.optimizer,
                scheduler=scheduler,
                state=state,
                keep=cfg.keep_checkpoints,
                loss_modules=loss_modules,
            )
        accelerator.wait_for_everyone()
        kept = [] if path else list_checkpoints(ckpt_dir)  # the main process's, seen on a shared disk
        return path or (kept[-1] if kept else ckpt_dir)

    interval_loss, interval_terms, interval_count = state.extra.get("log_interval", [0.0, {}, 0])
    skipped: list[dict[str, Any]] = list(state.extra.get("skipped", []))

    def nonfinite(bad: str) -> None:
        """Stop the run (naming the step, the term and the last good checkpoint) or count a skipped batch."""
        if cfg.nonfinite == "skip" and len(skipped) < cfg.max_skipped:
            skipped.append({"step": state.step, "term": bad})
            return
        kept = list_checkpoints(ckpt_dir)
        last = (
            f"last good checkpoint: {kept[-1]} (continue from it with --resume)"
            if kept
            else ("no checkpoint yet (training.checkpoint_every saves them)")
        )
        if cfg.nonfinite == "skip":
            raise NonFiniteError(
                f"{len(skipped)} batches of {phase} were skipped for NaN or inf (training.max_skipped) and"
                f" step {state.step} gave another ({bad}); {last}; lower training.lr or check the data and teacher",
                bad,
            )
        raise NonFiniteError(
            f"NaN or inf at step {state.step} of {phase} (from: {bad}); {last}; lower training.lr, check the"
            " data and teacher, or set training.nonfinite=skip to leave such batches out",
            bad,
        )

    step_loss, step_terms, step_micro = 0.0, {}, 0
    last_loss, last_terms = float("nan"), {}
    held: dict[str, int] | None = None  # this process's bytes of weights, gradients, optimizer state
    model.train()
    if loss_modules is not None:
        loss_modules.train()
    with (
        _deterministic(cfg.deterministic),
        stop_requests() as flag,
        training_progress(main and progress_enabled()) as progress,
    ):
        bar = progress.add_task(phase, total=total, completed=state.step, terms="")
        while state.step < total:
            batches = (
                accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
            )
            # Accelerate's loaders re-seed the sampler from their own count of passes made in
            # this process; a resumed process must start that count at the saved epoch.
            batches.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)  # type: ignore[attr-defined]
            if hasattr(dataset, "set_epoch"):  # a dataset that changes per epoch (fresh generations)
                dataset.set_epoch(state.epoch)
            for batch, counted in batches:
                with accelerator.accumulate(model):
                    try:
                        with process_share(world, counted):  # losses average over the global batch
                            loss, terms, *extra = loss_fn(model, batch, state.step)
                        bad = _nonfinite_term(loss, terms)
                    except NonFiniteError as exc:  # the loss function found it first (a teacher's NaN)
                        loss, terms, extra, bad = None, {}, [], exc.term or "input"
                    scalars = extra[0] if extra else {}
                    bad = _any_process(bad, accelerator)
                    if bad is not None:
                        nonfinite(bad)  # raises, or the micro-batch adds no gradient
                    else:
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        average_gradients(synced)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        # one norm over everything the optimizer steps, loss modules included
                        if shards:
                            norm = sharding.clip_grad_norm(list(model.parameters()), cfg.max_grad_norm)
                        else:
                            norm = accelerator.clip_grad_norm_(clipped or model.parameters(), cfg.max_grad_norm)
                        # (fp16's grad scaler skips its own overflowing steps: not a NaN of the run's)
                        if norm is not None and accelerator.scaler is None and not torch.isfinite(norm):
                            nonfinite("gradient")  # raises, or the whole step is left out
                            optimizer.zero_grad()
                    faults.point("step", state.step)  # the tests kill the run here: mid-step
                    optimizer.step()
                    if held is None and accelerator.sync_gradients:
                        held = sharding.held_bytes(model, optimizer.optimizer)
                    optimizer.zero_grad()
                state.batches_in_epoch += 1
                if bad is None:  # each process holds a share: their mean is the global batch's value
                    values = mean_over_processes(torch.stack([loss.detach(), *terms.values()]).float()).tolist()
                    step_loss += values[0]
                    for k, v in zip(terms, values[1:]):
                        step_terms[k] = step_terms.get(k, 0.0) + v
                    step_micro += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state.step += 1
                if step_micro:
                    last_loss = step_loss / step_micro
                    last_terms = {k: v / step_micro for k, v in step_terms.items()}
                    interval_loss += last_loss
                    for k, v in last_terms.items():
                        interval_terms[k] = interval_terms.get(k, 0.0) + v
                    interval_count += 1
                step_loss, step_terms, step_micro = 0.0, {}, 0
                progress.update(
                    bar, completed=state.step, terms=" ".join(f"{k}={v:.4f}" for k, v in last_terms.items())
                )
                if (state.step % cfg.log_every == 0 or state.step == total) and interval_count:
                    record = {
                        "phase": phase,
                        "step": state.step,
                        "epoch": state.epoch,
                        "lr": scheduler.get_last_lr()[0],
                        "loss": interval_loss / interval_count,
                        "terms": {k: v / interval_count for k, v in interval_terms.items()},
                        **({"scalars": scalars} if scalars else {}),
                        **({"skipped": len(skipped)} if skipped else {}),
                    }
                    log.write(record)
                    if cfg.trackers:
                        accelerator.log(
                            {
                                f"{phase}/loss": record["loss"],
                                **{f"{phase}/{k}": v for k, v in record["terms"].items()},
                            },
                            step=state.step,
                        )
                    interval_loss, interval_terms, interval_count = 0.0, {}, 0
                if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total:
                    model.eval()
                    faults.point("eval", state.step)  # the tests kill the run here: mid-evaluation
                    if shards:  # every process runs the same batches: each gathers one block at a time
                        metrics = evaluate(model)
                    else:
                        metrics = on_main(lambda: evaluate(accelerator.unwrap_model(model)))
                    model.train()
                    log.write({"phase": phase, "step": state.step, "eval": metrics})
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < total:
                    checkpoint()
                # every process stops at the same step (the launcher passes a signal on to each, not at once)
                stop = _any_process(flag["stop"], accelerator, elsewhere="SIGTERM")
                if stop:
                    path = checkpoint()
                    raise Interrupted(
                        f"stopped by {stop} at step {state.step} of {phase}; checkpoint saved in {path};"
                        " continue with --resume",
                        stop,
                    )
                if state.step >= total:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    if cfg.trackers:
        # not accelerator.end_training(): it also leaves the process group, which later phases,
        # the evaluation and the checkpoints of a run on several processes still use
        for tracker in accelerator.trackers:
            tracker.finish()
    if whole is not None:  # the trained shards, gathered into an ordinary module on every process
        model = sharding.gather_whole(model, whole)
    model.eval()
    if loss_modules is not None:
        loss_modules.eval()
    return TrainResult(
        steps=state.step,
        final_loss=last_loss,
        final_terms=last_terms,
        resumed_from=resumed_from,
        skipped=skipped,
        model=whole,
        held_bytes=sharding.largest_over_processes(held) if held else None,
    )

"""How much memory a recipe's training will need, before it starts (``kdforge plan RECIPE``).

The plan builds what a run builds (the task, its splits, the teacher signal, the student,
the objective) and measures rather than guesses:

- weights: the bytes of the real models' parameters and buffers, in the dtype they were
  loaded in (a teacher behind a cache or a server holds none here);
- gradients and optimizer state: from the student's (and learnable loss terms') trainable
  parameters and the recipe's optimizer (Adam/AdamW: two states per parameter; SGD: one
  with momentum, none without);
- activations: the tensors autograd keeps for backward during one real training forward
  (student adapter and objective, under the run's precision), counted by a
  ``saved_tensors_hooks`` pair on batches of 2 and 4 real training examples (not 1: losses
  with in-batch negatives refuse it), and extrapolated linearly to ``training.batch_size``.
  The intercept of that line holds what does not grow with the batch (bf16 copies of the weights under autocast);
- the loss's logits: the student's and teacher's outputs that are alive while the loss
  runs, plus what the loss keeps for backward (log-softmax copies, fp32 upcasts), plus the
  gradients backward makes for the student's outputs (hooks on them in one real backward).

Nothing here knows a task by name: the Task API builds the models and batches.

(About 610 lines, kept in one module on purpose (the depth probe's helpers for models built from
their configuration are in :mod:`kdforge.plan_depth`): the counting helpers, the probe and the
estimate are one measurement whose parts share the same ``seen`` storage set and only make
sense together; split apart, each would need the others' invariants restated.)
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge import plan_depth
from kdforge.distributed import is_main, world_size
from kdforge.errors import KDForgeError, RecipeError
from kdforge.models.hf_causal_lm import config_only
from kdforge.recipe import Recipe

#: training examples looked at to choose the longest ones for the probe batches
CANDIDATES = 64
GB = 1024**3
MB = 1024**2


@dataclass
class MemoryPlan:
    """Estimated peak memory of one training process (bytes), and what it was estimated for."""

    recipe: str
    device: str
    precision: str
    batch_size: int
    sequence_length: int | None
    teacher_weights: int
    student_weights: int
    #: models the task keeps besides the student (a template the student and baseline are copied from),
    #: and copies of weights waiting for Python's cyclic garbage collector
    other_weights: int
    gradients: int
    optimizer_state: int
    #: temporaries of the optimizer's step (see :func:`optimizer_step_bytes`)
    optimizer_step: int
    activations: int
    loss_logits: int
    #: free memory on the training device when the plan was made (None: unknown)
    available: int | None
    optimizer: str = "adamw"
    trainable_params: int = 0
    notes: list[str] = field(default_factory=list)
    #: the probe's raw counts: batch size -> (activations, loss) bytes
    probe: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: sharded (training.sharding: fsdp): the blocks gathered whole at once (one running, the next prefetched)
    gathered: int = 0

    @property
    def persistent(self) -> int:
        """What lives through the whole training phase: weights and optimizer state."""
        return self.teacher_weights + self.student_weights + self.other_weights + self.optimizer_state

    @property
    def peak(self) -> int:
        """Weights, optimizer state and gradients, plus the largest of what comes and goes.

        The backward pass allocates the gradients while the forward's activations and the loss's
        tensors are still alive (the first gradients computed are those of the output layer, the
        largest for a language model), so those three count together. On a GPU the optimizer's
        temporaries come after backward has freed the activations, from the same cached blocks:
        the larger of the two counts. On the CPU, glibc keeps the activations' freed memory in
        its heap for later small allocations while a parameter-sized temporary (above its 32 MB
        mmap threshold) is mapped fresh from the kernel: both count.
        """
        transient = self.activations + self.loss_logits + self.gathered
        if self.device.startswith("cuda"):
            return self.persistent + self.gradients + max(transient, self.optimizer_step)
        return self.persistent + self.gradients + transient + self.optimizer_step

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.peak <= self.available

    def rows(self) -> list[tuple[str, int]]:
        """(component, bytes) in the order the table shows them."""
        rows = [
            ("teacher weights", self.teacher_weights),
            ("student weights", self.student_weights),
            ("gradients", self.gradients),
            (f"optimizer state ({self.optimizer})", self.optimizer_state),
            ("optimizer step temporaries", self.optimizer_step),
            ("activations kept for backward", self.activations),
            ("loss: logits and their copies", self.loss_logits),
        ]
        if self.other_weights:
            rows.insert(2, ("other models and uncollected copies", self.other_weights))
        if self.gathered:
            rows.append(("blocks gathered whole (sharding)", self.gathered))
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "device": self.device,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            **{name: value for name, value in self.rows()},
            "peak": self.peak,
            "available": self.available,
            "fits": self.fits,
            "trainable_params": self.trainable_params,
            "probe": {str(b): list(v) for b, v in self.probe.items()},
            "notes": self.notes,
        }


def human(n: int | None) -> str:
    """Bytes as kB below a MB, MB below a GB, GB above (binary units, as free(1) and nvidia-smi count)."""
    if n is None:
        return "unknown"
    if n < MB:
        return f"{n / 1024:.1f} kB"
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


# ----- counting bytes ----------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, address, bytes) of the memory behind ``t``; views of one storage share it."""
    try:
        storage = t.untyped_storage()
        if t.is_meta:  # no memory, so no address: the storage object itself, which views share
            return ("meta", storage._cdata, storage.nbytes())
        return (str(t.device), storage.data_ptr(), storage.nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return None


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def count_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind ``tensors`` not in ``seen`` (which they join): a tied or
    shared weight, or a view, is counted once."""
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if key is None or key[1] == 0 or key in seen:
            continue
        seen.add(key)
        total += key[2]
    return total


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclasses (model outputs)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors_in(getattr(value, name))


def signal_models(signal: Any) -> list[nn.Module]:
    """The models a teacher signal holds: its own, or its members' (an ensemble); none for a
    cache or a server."""
    models = []
    model = getattr(signal, "model", None)
    if isinstance(model, nn.Module):
        models.append(model)
    for member in getattr(signal, "members", None) or []:
        models.extend(signal_models(member))
    return models


def kept_models(owner: Any) -> list[nn.Module]:
    """Modules an object keeps in its attributes, directly or in a dict, list or tuple (a task's
    student template, the teachers it loaded to cut a student from)."""
    found = []
    for value in vars(owner).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found.extend(v for v in values if isinstance(v, nn.Module))
    return found


def cyclic_garbage_bytes(seen: set) -> int:
    """Bytes of tensors in unreachable reference cycles that Python has not collected yet.

    Python's cyclic collector runs on counts of objects, not bytes, and the runner never calls
    it: a copy of weights left in a cycle (a model deep-copied and cut) can stay in memory all
    through a short run. The collector is run once with DEBUG_SAVEALL, so what it finds is kept
    in ``gc.garbage`` to be counted, then released.
    """
    flags = gc.get_debug()
    gc.set_debug(flags | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = count_bytes((o for o in gc.garbage if isinstance(o, torch.Tensor)), seen)
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.collect()
    return found


def optimizer_state_bytes(trainable: list[nn.Parameter], recipe: Recipe) -> int:
    """Adam and AdamW keep two moments per parameter; SGD one momentum buffer, or none without
    momentum. States have the parameter's dtype (the step counters, 4 bytes per tensor, are left out)."""
    opt = recipe.training.optimizer
    states = 2 if opt.name in ("adam", "adamw") else (1 if opt.momentum > 0 else 0)
    return states * sum(p.numel() * p.element_size() for p in trainable)


def optimizer_step_bytes(trainable: list[nn.Parameter], recipe: Recipe, device: torch.device) -> int:
    """Temporaries of one optimizer step, as torch's optimizers make them.

    On a GPU they run the foreach kernels over all parameters at once: Adam(W) computes
    ``sqrt(exp_avg_sq)`` for every parameter (one copy of them), and Adam's L2 weight decay or
    SGD's adds the parameters to a copy of the gradients. On the CPU they loop over parameters:
    ``(exp_avg_sq.sqrt() / c).add_(eps)`` holds two temporaries the size of the largest parameter
    at once (one more for a weight-decayed gradient).
    """
    if not trainable:
        return 0
    opt = recipe.training.optimizer
    decayed_grad = opt.weight_decay > 0 and opt.name != "adamw"  # AdamW decays the weights in place
    if device.type == "cuda":
        total = sum(p.numel() * p.element_size() for p in trainable)
        return total * ((opt.name != "sgd") + decayed_grad)
    largest = max(p.numel() * p.element_size() for p in trainable)
    return largest * (2 * (opt.name != "sgd") + decayed_grad)


@contextmanager
def saved_for_backward(seen: set, counted: list[int]) -> Iterator[None]:
    """Count the bytes of tensors autograd saves for backward, once per storage; those in
    ``seen`` (weights, earlier activations) are not counted again. ``counted[0]`` accumulates."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        counted[0] += count_bytes([t], seen)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


# ----- the probe: one real training forward -----------------------------------------------


def _batch_numel(batch: dict[str, Any]) -> int:
    return sum(t.numel() for t in _tensors_in(batch))


def sequence_length(batch: dict[str, Any]) -> int | None:
    """The longest second dimension of the batch's integer tensors of 2+ dims (token ids), if any."""
    lengths = [t.shape[1] for t in _tensors_in(batch) if t.dim() >= 2 and not t.is_floating_point()]
    return max(lengths) if lengths else None


def longest_examples(dataset, collate, count: int = 4) -> list[tuple[int, Any]]:
    """The ``count`` examples, among up to :data:`CANDIDATES` spread over the training set, whose
    batch of one is largest: padded batches are as long as their longest example, so the plan is
    for batches of long examples (the worst the run will see)."""
    n = len(dataset)
    if n == 0:
        raise RecipeError("data: the training split is empty; nothing to plan for")
    step = max(1, n // CANDIDATES)
    sizes = []
    for index in range(0, n, step)[:CANDIDATES]:
        item = (index, dataset[index])
        sizes.append((_batch_numel(collate([item])), index, item))
    sizes.sort(key=lambda s: (-s[0], s[1]))
    return [item for _, _, item in sizes[:count]]


def _probe_batch(task, student, signal, objective, batch, excluded: set) -> tuple[int, int]:
    """(activations, loss) bytes of one training forward on ``batch``, as the runner's loss_fn runs it."""
    from kdforge.methods.training_fields import training_fields

    seen = set(excluded)
    activations, loss_bytes = [0], [0]
    student_fields, teacher_fields = training_fields(task, objective, signal)
    # (task.training_batch is not called: on-policy answers are at most data.max_length long, as the
    # longest examples the probe takes are, and generating them here would change nothing but time)
    with saved_for_backward(seen, activations):
        student_out = task.adapter(student, batch, student_fields)
    teacher_out = signal.outputs(batch, teacher_fields) if objective.needs_teacher else None
    with saved_for_backward(seen, loss_bytes):
        loss, _ = objective(student_out, teacher_out, batch, 0)
    # the outputs themselves live until the loss is computed, saved for backward or not
    loss_bytes[0] += count_bytes([*_tensors_in(student_out), *_tensors_in(teacher_out)], seen)
    loss_bytes[0] += output_gradient_bytes(loss, student_out)
    del loss, student_out, teacher_out
    return activations[0], loss_bytes[0]


def output_gradient_bytes(loss: torch.Tensor, outputs: Any) -> int:
    """Bytes of the gradients backward makes for the student's outputs (a copy of the logits for a
    logit loss), counted by hooks during one real backward: they appear at its start, while the
    activations are still kept. Outputs no term uses get none."""
    if not loss.requires_grad:
        return 0
    received, seen = [0], set()

    def hook(grad: torch.Tensor) -> None:
        received[0] += count_bytes([grad], seen)

    tensors = {id(t): t for t in _tensors_in(outputs) if t.requires_grad}
    for t in tensors.values():
        t.register_hook(hook)
    loss.backward()
    return received[0]


def extrapolate(counts: dict[int, int], batch_size: int) -> int:
    """A line through the counts at the probe's two batch sizes (never decreasing), read at
    ``batch_size``; with one probe size, proportional to the batch."""
    (b1, c1), *rest = sorted(counts.items())
    if not rest:
        return c1 * batch_size // b1
    (b2, c2) = rest[-1]
    slope = max(c2 - c1, 0) / (b2 - b1)
    return int(round(c1 + slope * (batch_size - b1)))


# ----- the whole plan ----------------------------------------------------------------------


def available_memory(device: torch.device) -> int | None:
    """Free memory where training runs: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def as_the_engine_runs(student: nn.Module, recipe: Recipe, device: torch.device) -> None:
    """Wrap the student's forward as the engine's Accelerator does under mixed precision: autocast
    inside, outputs converted to fp32 (a copy of the logits the plan must see)."""
    precision = recipe.training.precision
    if precision == "fp32":
        return
    from accelerate.utils import convert_outputs_to_fp32

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    student.forward = convert_outputs_to_fp32(torch.autocast(device_type=device.type, dtype=dtype)(student.forward))


def probe_sizes(batch_size: int, examples: int) -> list[int]:
    """The two batch sizes the probe runs (2 and 4, fewer for a smaller batch or training set).

    Not 1: a loss with in-batch negatives (MI-alpha, contrastive terms) refuses a batch of one,
    which the run itself never sees when its batch is larger."""
    top = min(batch_size, examples)
    return sorted({min(2, top), min(4, top)})


def _probe(task, student, signal, objective, batches, trainable, seen) -> tuple[dict, int | None]:
    """Counts of :func:`_probe_batch` on each of ``batches`` ({size: batch}); and the batch's sequence length."""
    probe: dict[int, tuple[int, int]] = {}
    length = None
    for b, batch in batches.items():
        length = sequence_length(batch)
        probe[b] = _probe_batch(task, student, signal, objective, batch, seen)
        for p in trainable:
            p.grad = None  # the probe's backward filled them; the next probe starts as a step does
    return probe, length


def task_collate(task):
    """The runner's collate: the task's, plus each example's index (a cached teacher reads by it)."""
    from kdforge.data.indexed import indexed_collate

    return indexed_collate(task.collate)


def _largest_block(model: nn.Module) -> int:
    from kdforge.engine.sharding import blocks

    return max((count_bytes(_module_tensors(b), set()) for b in blocks(model)), default=0)


def plan_recipe(
    recipe: Recipe,
    *,
    task=None,
    splits=None,
    teacher: Any = None,
    processes: int | None = None,
    from_config: bool = False,
    device: str | None = None,
) -> MemoryPlan:
    """Estimate the peak memory of ``recipe``'s student training (see the module docstring).

    A run passes what it has already loaded (its ``task``, ``splits`` and ``teacher``, anything
    with the ``signal`` and ``model`` of :class:`~kdforge.signals.base.BuiltSignal`), so
    planning costs one probe, not a second load of every model.

    ``from_config``: causal LMs are built from their configuration alone and the probe runs on
    copies cut to 1 and 2 blocks (:mod:`kdforge.plan_depth`). ``device`` ("cuda" or "cpu"): the
    device to plan for, when it is not this machine's (the probe still runs here).
    """
    with config_only() if from_config else nullcontext():
        return _plan(recipe, task, splits, teacher, processes, from_config, device)


def _plan(recipe, task, splits, teacher, processes, from_config, target) -> MemoryPlan:
    from accelerate.utils import send_to_device, set_seed

    from kdforge.commands import build_task
    from kdforge.engine.trainer import check_training_settings, model_parameter_groups
    from kdforge.objective import Objective, teacher_fields_of
    from kdforge.signals import build_signal

    cpu, _ = check_training_settings(recipe.training)  # refuses what the engine would refuse here
    device = torch.device("cpu" if cpu else "cuda")
    target = torch.device(target or device.type)
    notes: list[str] = []
    available = available_memory(device) if target.type == device.type else None  # before anything loads
    if target.type != device.type:
        notes.append(f"planned for {target.type}; the probe ran on {device.type}, where its activations were counted")
    task = task if task is not None else build_task(recipe)
    splits = splits if splits is not None else task.splits()
    objective = Objective(recipe.objective, 1, names=recipe.term_names(), seed=recipe.training.seed)

    seen: set = set()
    teacher_models: list[nn.Module] = []
    signal = None
    if recipe.teacher is not None:
        built = teacher or build_signal(task, recipe.teacher, teacher_fields_of(recipe.objective))
        signal = built.signal
        teacher_models = signal_models(signal) + ([built.model] if built.model is not None else [])
        if not teacher_models:
            notes.append("the teacher's outputs come from a cache or a server: no teacher weights in memory")
    elif objective.needs_teacher:
        raise RecipeError("teacher: the objective compares with a teacher, but the recipe has none")
    teacher_bytes = count_bytes((t for m in teacher_models for t in _module_tensors(m)), seen)

    # the runner builds the student from a task of its own (one per seed), which keeps what it loads
    seed_task = build_task(recipe)
    set_seed(recipe.training.seed)
    student = seed_task.build_student()
    if not any(t.is_meta for t in student.parameters()):
        student = student.to(device)
    student.train()
    student_bytes = count_bytes(_module_tensors(student), seen)
    student_bytes += count_bytes(_module_tensors(objective.loss_modules().to(device)), seen)
    other_bytes = count_bytes((t for m in kept_models(seed_task) for t in _module_tensors(m)), seen)
    if other_bytes:
        notes.append(
            "the task that builds the student keeps models of its own (a copy of the student's initial"
            " weights, or the teacher it cut the student from): counted as other models"
        )
    garbage = cyclic_garbage_bytes(seen)
    if garbage:
        notes.append(
            f"{human(garbage)} of tensors sit in uncollected reference cycles (left by loading the models or"
            " building the student): counted as other models, as the run holds them until Python's collector runs"
        )
    trainable = [p for group in model_parameter_groups(student) for p in group["params"]] + objective.parameters()

    collate = task_collate(task)
    # under accelerate launch each process holds its share of the global batch (the largest: ceil(B / N))
    n = processes or world_size()
    batch_size = -(-recipe.training.batch_size // n)
    if n > 1:
        notes.append(f"per process: {n} processes share the global batch of {recipe.training.batch_size}")
    shards = n if recipe.training.sharding == "fsdp" and n > 1 else 1
    gathered = 0
    if shards > 1:  # FSDP2: 1/N of every sharded tensor per process, and two blocks whole at a time
        gathered = 2 * (_largest_block(student) + max((_largest_block(m) for m in teacher_models), default=0))
        notes.append(
            f"sharded over {n} processes (training.sharding: fsdp): weights, gradients and optimizer state"
            f" 1/{n} each, plus two blocks of each model gathered whole at a time"
        )
    sizes = probe_sizes(batch_size, len(splits.train))
    items = longest_examples(splits.train, collate, count=sizes[-1])
    batches = {b: send_to_device(collate(items[:b]), device) for b in sizes}
    full_depth = plan_depth.depth(student)
    if from_config and full_depth > max(plan_depth.PROBE_DEPTHS):
        notes.append(
            "built from the models' configurations: activations probed at"
            f" {' and '.join(map(str, plan_depth.PROBE_DEPTHS))} blocks and extrapolated to the student's {full_depth}"
        )
        depths: tuple[int | None, ...] = plan_depth.PROBE_DEPTHS
    else:
        depths = (None,)  # the models as they are
    by_depth = {}
    as_the_engine_runs(student, recipe, device)
    for d in depths:
        for model in [student, *teacher_models]:
            if d is not None:
                plan_depth.cut_to_blocks(model, d)
            plan_depth.materialize(model, device)
        excluded = set(seen)  # the probe's models' own tensors are weights, not activations
        count_bytes((t for m in [student, *teacher_models] for t in _module_tensors(m)), excluded)
        probe_trainable = [p for group in model_parameter_groups(student) for p in group["params"]]
        probe_trainable += objective.parameters()
        probe, length = _probe(seed_task, student, signal, objective, batches, probe_trainable, excluded)
        by_depth[d or full_depth] = probe
    probe = by_depth[max(by_depth)]
    activations = extrapolate(
        {b: plan_depth.at_depth({d: counts[b][0] for d, counts in by_depth.items()}, full_depth) for b in probe},
        batch_size,
    )
    loss_bytes = extrapolate({b: counts[1] for b, counts in probe.items()}, batch_size)
    if recipe.training.gradient_accumulation > 1:
        notes.append("gradient accumulation: activations are for one micro-batch of training.batch_size")
    del student, signal, teacher_models, task, seed_task, splits
    gc.collect()
    return MemoryPlan(
        recipe=recipe.name,
        device=str(target),
        precision=recipe.training.precision,
        batch_size=batch_size,
        sequence_length=length,
        teacher_weights=-(-teacher_bytes // shards),
        student_weights=-(-student_bytes // shards),
        other_weights=other_bytes + garbage,
        gradients=-(-sum(p.numel() * p.element_size() for p in trainable) // shards),
        optimizer_state=-(-optimizer_state_bytes(trainable, recipe) // shards),
        optimizer_step=-(-optimizer_step_bytes(trainable, recipe, target) // shards),
        gathered=gathered,
        activations=activations,
        loss_logits=loss_bytes,
        available=available,
        optimizer=recipe.training.optimizer.name,
        trainable_params=sum(p.numel() for p in trainable),
        notes=notes,
        probe=probe,
    )


# ----- before a run ------------------------------------------------------------------------


def planning_enabled() -> bool:
    """``KDFORGE_PLAN=0`` skips the estimate ``kdforge run`` makes before it starts."""
    return os.environ.get("KDFORGE_PLAN", "1") not in ("0", "false", "no")


def warning_for(recipe: Recipe, **loaded: Any) -> str | None:
    """The warning ``kdforge run`` prints when the plan's peak exceeds the free memory; None when it fits
    (or planning is off). ``loaded``: what the run has loaded already (see :func:`plan_recipe`)."""
    if not planning_enabled():
        return None
    plan = plan_recipe(recipe, **loaded)
    if plan.fits is not False:
        return None
    return (
        f"this run may not fit: kdforge plan estimates a peak of {human(plan.peak)} on {plan.device},"
        f" {human(plan.available)} available (see `kdforge plan`; KDFORGE_PLAN=0 skips this check)"
    )


def warn_if_too_big(recipe: Recipe, **loaded: Any) -> None:
    """Print :func:`warning_for`'s warning in yellow on stderr; the run goes ahead (the user may know better).

    A user's mistake found while planning (a missing teacher) is the run's own first error and stops
    it as the run would; a failure of the planner itself only says so: a run must never stop for it.
    """
    from kdforge.console import make_console

    console = make_console(stderr=True)
    try:
        message = warning_for(recipe, **loaded)
    except KDForgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the estimate is advice; the run itself decides
        console.print(f"[dim]kdforge plan could not estimate this run's memory ({exc!r}); starting it anyway")
        return
    if message is not None and is_main():  # one warning, not one per process
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

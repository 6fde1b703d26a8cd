"""Several processes (``accelerate launch --num_processes N``): who this process is, and
how N processes compute the loss of one global batch.

``training.batch_size`` is the global batch: the engine cuts each batch into N
contiguous shares, one per process, so a recipe means the same run on any number
of processes, and a checkpoint written by one continues under another.

A loss term's value on one process is a *share*: N times that process's part of the
global mean. The engine averages gradients over processes (:func:`average_gradients`,
what DDP does), so the mean of the shares, and its gradient, are those of one process
on the whole batch. Terms reach that in one of two ways:

* a loss that averages over positions or rows calls :func:`masked_mean`'s global form
  (:func:`global_mean`): the counts are summed over processes before dividing, so a
  process with more real tokens weighs more, as it would in one batch;
* a loss whose value couples the rows of a batch (a transport plan, a batch-wide
  regulariser, in-batch negatives) gets its inputs gathered from every process
  (:func:`gather_rows`, with gradients), and each process computes the same value.

Tasks that score each row against the whole batch (in-batch negatives) use
:func:`batch_rows` and :func:`batch_items` for the global batch's rows.

Outside the training step (evaluation, the memory planner's probe) no scope is set
and every function here is local: nothing waits on other processes.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def share_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``rank``'s contiguous share of ``total`` items: the first
    ``total % world`` processes get one more, so shares differ by at most one and cover all."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


#: True while the main process runs :func:`on_main`'s work alone: the others are waiting in its
#: broadcast, so anything inside that would wait on them (a nested on_main, a barrier) runs locally
_alone: ContextVar[bool] = ContextVar("kdforge_main_alone", default=False)


def world_size() -> int:
    if _alone.get():
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def on_main(fn: Callable[[], T], *, share: bool = True) -> T:
    """``fn()`` run by the main process only; every process gets its result (a picklable value),
    or, with ``share=False``, None on the others (a result only the main process uses).

    Evaluation, reports and decisions about shared files: one process acts (so timings do
    not compete for the same cores), the others wait and receive the same value. A user
    error there is the same one line on every process; any other failure is re-raised on
    the main process, and the others stop rather than wait for a result that never comes.
    While ``fn`` runs, the main process counts as alone: what it calls does not wait on the others.
    """
    if world_size() == 1:
        return fn()
    from kdforge.errors import KDForgeError

    box: list[Any] = [None, None]
    if is_main():
        try:
            box[0] = _alone_run(fn)
        except BaseException as exc:
            # the exception itself may not survive pickling (extra constructor arguments): its message does
            box[1] = (
                KDForgeError(str(exc))
                if isinstance(exc, KDForgeError)
                else RuntimeError(f"the main process failed: {exc!r}")
            )
            dist.broadcast_object_list(box, src=0)
            raise
    result = box[0]
    if not share:
        box[0] = None
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return result if is_main() else box[0]


def _alone_run(fn: Callable[[], T]) -> T:
    token = _alone.set(True)
    try:
        return fn()
    finally:
        _alone.reset(token)


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on the main process, then on the others once it has returned.

    For work that fills a file the processes share (the cache of a teacher's embeddings):
    the main process writes it while the others wait, then they read it back instead of
    writing the same file at the same time. A failure on the main process stops every
    process, as in :func:`on_main`.
    """
    if world_size() == 1:
        return fn()
    first = on_main(fn, share=False)
    return first if is_main() else fn()


# ------------------------------------------------------------------ the global batch


@dataclass
class ProcessShare:
    """Set by the engine around one training micro-batch on N processes."""

    world: int
    #: False when this process's micro-batch stands in for nothing: the global batch had fewer
    #: examples than processes, and every process takes part in each step's exchanges (counts,
    #: gathered rows, the gradient average)
    counted: bool = True
    #: calls of :func:`global_mean` in the current loss term (0: the loss reduced on its own)
    reductions: int = 0


_share: ContextVar[ProcessShare | None] = ContextVar("kdforge_process_share", default=None)


def current_share() -> ProcessShare | None:
    """The active share scope, or None on one process and outside training steps."""
    return _share.get()


@contextmanager
def process_share(world: int, counted: bool = True) -> Iterator[ProcessShare | None]:
    """Within it, losses reduce over the global batch of ``world`` processes (no-op for one)."""
    if world <= 1:
        yield None
        return
    token = _share.set(ProcessShare(world, counted))
    try:
        yield _share.get()
    finally:
        _share.reset(token)


@contextmanager
def local_only() -> Iterator[None]:
    """Losses reduce over what they are given (inputs already gathered from every process)."""
    token = _share.set(None)
    try:
        yield
    finally:
        _share.reset(token)


def sum_counts(count: torch.Tensor) -> torch.Tensor:
    """A count summed over processes (no gradient: counts are not learned)."""
    total = count.detach().clone()
    dist.all_reduce(total)
    return total


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This process's share of ``sum(total) / sum(count)`` over processes (see the module doc)."""
    share = current_share()
    assert share is not None
    share.reductions += 1
    if not share.counted:
        total, count = total * 0.0, count * 0.0
    return total * share.world / sum_counts(count).clamp_min(1.0)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a detached value over processes (a term's shares -> its global value)."""
    if world_size() == 1:
        return value.detach()
    out = value.detach().clone().float()
    dist.all_reduce(out)
    return out / world_size()


def _all_rows(local: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Every process's rows, in rank order (all_gather needs equal shapes: padded, then cut)."""
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """:func:`_all_rows` with a gradient: each process's rows get the sum of the gradients every
    process computed for them (each computes the same loss)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return _all_rows(local.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_rows(value: Any, *, counted: bool = True, where: str = "a loss term") -> Any:
    """``value`` (a tensor, a tuple of them, or None) with the rows of every process, in rank order.

    A process whose micro-batch is not counted gives no rows. The tensors' other
    dimensions must agree across processes.
    """
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(gather_rows(v, counted=counted, where=where) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    return _gather(value, counted, where)[0]


def _gather(value: torch.Tensor, counted: bool, where: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Every process's rows of ``value``, and how many rows each gave."""
    local = value if counted else value[:0]
    shape = torch.tensor([local.shape[0], *local.shape[1:]], device=local.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s[1:], shape[1:]) for s in shapes):
        from kdforge.errors import RecipeError

        raise RecipeError(
            f"{where} compares the whole batch, and the processes' shares have different shapes"
            f" ({', '.join(str(tuple(s.tolist())) for s in shapes)}); pad the task's batches to one length"
            " or train it on one process"
        )
    sizes = tuple(int(s[0]) for s in shapes)
    rows = _GatherRows.apply(local, sizes) if local.requires_grad else _all_rows(local, sizes)
    return rows, sizes


def process_gpu() -> str | None:
    """This process's own GPU when ``accelerate launch`` started several on GPUs (where its online
    teacher runs unless the recipe's ``teacher.device`` says otherwise); None otherwise."""
    if world_size() == 1 or not torch.cuda.is_available() or dist.get_backend() != "nccl":
        return None
    from accelerate.state import PartialState

    return str(PartialState().device)


def process_device():
    """The device this process trains on (its own GPU under a launch on GPUs, else the CPU)."""
    from accelerate.state import PartialState

    return PartialState().device


def start_processes(cpu: bool) -> None:
    """Join the process group that ``accelerate launch`` (or torchrun) set up: gloo on the CPU,
    NCCL on GPUs; alone, nothing to join. Must come before anything asks Accelerate who it is,
    so that the group's backend follows the recipe's device rather than a default."""
    from accelerate.state import PartialState

    from kdforge.settings import process_wait_minutes

    # the others wait while the main process evaluates (a large test set can take longer than
    # torch's default of 30 minutes); a process that really hangs is stopped after this
    PartialState(cpu=cpu, timeout=timedelta(minutes=process_wait_minutes()))
    if world_size() > 1:
        atexit.register(leave_processes)  # a second registration finds the group gone: no-op


def leave_processes(*, together: bool = False) -> None:
    """Leave the process group before the interpreter shuts down (no-op without one).

    A gloo group still alive at exit is torn down in an order that can abort a process
    (``terminate called without an active exception``) after its work is done, so a
    finished launch would report a failure. ``together``, at the normal end of a command:
    every process first waits for the others, so none leaves while another is still in its
    last exchange with it. Without it (on the way out after an error) leaving is local.
    """
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def batch_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For in-batch negatives: the rows of the whole global batch and the index of this process's
    first row among them, inside a training step on several processes (the gradient reaches this
    process's own rows); elsewhere ``(local, 0)``.

    A task that scores each of its rows against every row of the batch scores them against
    these, so its per-row losses see the negatives one process would see.
    """
    share = current_share()
    if share is None:
        return local, 0
    rows, sizes = _gather(local, share.counted, "in-batch scores")
    return rows, sum(sizes[: rank()])


def batch_items(local: list[T]) -> tuple[list[T], int]:
    """:func:`batch_rows` for Python objects (texts, ids): every process's items, and where ours start."""
    share = current_share()
    if share is None:
        return local, 0
    parts: list[Any] = [None] * share.world
    dist.all_gather_object(parts, local if share.counted else [])
    return [item for part in parts for item in part], sum(len(part) for part in parts[: rank()])


#: gradients are averaged in messages of at most this many bytes (fewer, larger messages, as DDP's buckets)
BUCKET_BYTES = 64 << 20


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average ``params``' gradients over processes, in place: what DDP does, without its wrapper.

    The engine trains the model itself rather than DDP's wrapper, because a task's adapter
    may call any part of its model (an encoder's layers with hooks, a model's ``generate``)
    where DDP expects one ``forward``. A gradient that is None on some processes (a part
    their batch did not use) counts as zero there; one that is None on all stays None, as on
    one process, so the optimizer leaves that parameter alone.
    """
    if world_size() == 1 or not params:
        return
    device = params[0].device
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(present)
    used = [p for p, n in zip(params, present.tolist()) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(used):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()


def _buckets(params: list[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, up to :data:`BUCKET_BYTES` per bucket."""
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        kind = (p.grad.dtype, p.grad.device)
        if bucket and (size + nbytes > BUCKET_BYTES or kind != (bucket[0].grad.dtype, bucket[0].grad.device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


def same_start(model: torch.nn.Module) -> None:
    """Every process starts from the main process's parameters and buffers (as DDP's wrapper makes
    sure): a student built from the same seed is equal anyway, this makes it certain."""
    if world_size() == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)

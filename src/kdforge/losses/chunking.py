"""Position-wise evaluation of logit losses in chunks, so that large vocabularies fit in memory.

Not a loss module: it registers nothing. A logit loss is a per-position function of
the student's and the teacher's log-softmaxes; this module evaluates it over
``[..., V]`` logits a chunk of positions at a time, in one of two ways:

* **Fused** (:func:`fused_per_position`), for the divergences: a :class:`FusedKernel`
  computes the per-position value and, in closed form, the student's gradient, with
  in-place operations on four chunk-sized float buffers reused for every chunk. The
  forward pass writes each chunk's gradient into one buffer the size of the
  student's logits, which the backward pass scales in place. So the extra memory is
  that buffer plus four chunk buffers, whatever the allocator does with freed memory
  (benchmarks/README.md), and the work is one pass over the chunks.
* **Autograd** (:func:`per_position`), for everything else (a teacher that needs
  gradients, DKD's split, DAC-KL): the per-position formula runs under autograd,
  one chunk at a time, recomputed in the backward pass.

Top-k teachers ``(topk_ids, topk_logprobs)`` are compared over k + 1 buckets (the
teacher's k tokens and a tail bucket holding its residual mass against the
student's mass outside those tokens); both paths use the same buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdforge.losses.common import logsumexp_or_neginf, upcast

#: logits per chunk (16 MiB in float32; benchmarks/README.md); inputs up to this size are one chunk
CHUNK_ELEMENTS = 1 << 22

#: dense teacher logits, or a top-k teacher ``(topk_ids, topk_logprobs)``
Teacher = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

#: ``(log_q_student, log_p_teacher, *extras) -> per-position value`` over the last axis, under autograd
PositionFn = Callable[..., torch.Tensor]


def check_pair(student: torch.Tensor, teacher: Teacher) -> None:
    """Student logits and a dense or top-k teacher must describe the same positions."""
    if isinstance(teacher, tuple):
        ids, log_probs = teacher
        if ids.shape != log_probs.shape or ids.shape[:-1] != student.shape[:-1] or ids.shape[-1] > student.shape[-1]:
            raise ValueError(
                "a top-k teacher needs ids and log-probs of the same shape [..., k] with the student's positions"
                f" and k <= vocabulary; got ids {tuple(ids.shape)}, log-probs {tuple(log_probs.shape)},"
                f" student {tuple(student.shape)}"
            )
        return
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ;"
            " nothing is broadcast"
        )


#: the least residual mass a top-k teacher is taken to leave outside its k tokens
TAIL_FLOOR = 1e-6


def teacher_tail(log_p_topk: torch.Tensor, floor: float = TAIL_FLOOR) -> torch.Tensor:
    """log of the teacher's residual mass 1 - sum(top-k), ``[..., 1]``, at least ``floor``.

    A teacher sure of its top-k leaves a residual that float32 (and stored, rounded
    log-probs) turn into exactly 0. Its log, -inf, would make every mode-seeking
    divergence (reverse KL, skew reverse KL) infinite wherever the student puts any mass
    outside those k tokens; stored log-probs cannot tell a residual of 1e-9 from 0
    anyway. The floor adds at most 1e-6 to the teacher's total mass. ``floor=0`` gives the
    residual as computed (where nothing lies outside the k tokens, e.g. a masked vocabulary).
    """
    return torch.log((1 - log_p_topk.exp().sum(-1, keepdim=True)).clamp_min(floor))


def _log_mass_outside(log_q: torch.Tensor, ids: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """log of the student's mass outside ``ids``, ``[rows, 1]``; uses ``scratch`` (log_q's shape) if given."""
    if scratch is None:
        return logsumexp_or_neginf(log_q.scatter(-1, ids, -math.inf))
    scratch.copy_(log_q).scatter_(-1, ids, -math.inf)
    peak = scratch.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # an empty tail: exp(-inf) = 0
    return scratch.sub_(peak).exp_().sum(-1, keepdim=True).log_().add_(peak)


def topk_buckets(
    log_q: torch.Tensor, ids: torch.Tensor, log_p_topk: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher as log-distributions over k + 1 buckets: the teacher's top-k tokens and the rest.

    The teacher's tail bucket holds its residual mass; the student's holds all its
    mass outside those k tokens. Every divergence is then the same formula on the
    buckets. With k = V there is no tail bucket. ``scratch`` (log_q's shape) saves an allocation.
    """
    log_q_topk = log_q.gather(-1, ids)
    if ids.shape[-1] >= log_q.shape[-1]:
        return log_q_topk, log_p_topk
    log_q_tail = _log_mass_outside(log_q, ids, scratch)
    # the teacher's floor only where the student can put mass outside (not in a masked vocabulary)
    log_p_tail = torch.where(torch.isneginf(log_q_tail), teacher_tail(log_p_topk, 0.0), teacher_tail(log_p_topk))
    return torch.cat([log_q_topk, log_q_tail], -1), torch.cat([log_p_topk, log_p_tail], -1)


def _flat(student: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Student as [N, V] and each other tensor as [N, ...] (per-position tensors as [N])."""
    n = student[..., 0].numel()
    return student.reshape(n, student.shape[-1]), [
        x.reshape(n) if x.shape == student.shape[:-1] else x.reshape(n, x.shape[-1]) for x in tensors
    ]


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _slices(rows: int, *tensors: torch.Tensor):
    for start in range(0, tensors[0].shape[0], rows):
        yield start, [x[start : start + rows] for x in tensors]


# ----------------------------------------------------------------------- autograd path


def per_position(
    student: torch.Tensor, teacher: Teacher, fn: PositionFn, temperature: float, *extras: torch.Tensor
) -> torch.Tensor:
    """``fn(log_q, log_p, *extras)`` of the log-softmaxes at ``temperature``, per position, chunk by chunk.

    ``extras`` are per-position tensors (``student.shape[:-1]``, e.g. labels) passed
    along chunk by chunk. A top-k teacher's log-probs are taken as already at
    ``temperature`` (a cache is written at the run's temperature) and turned into
    k + 1 buckets; only the student's logits are divided by it. A loss that handles
    top-k teachers itself gets ``log_p`` as the pair ``(ids, log_probs)`` when
    ``fn.own_topk`` is set.
    """
    topk = isinstance(teacher, tuple)
    own_topk = getattr(fn, "own_topk", False)

    def run(s: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(upcast(s) / temperature, dim=-1)
        if topk:
            ids, log_p, more = rest[0], upcast(rest[1]), rest[2:]
            if own_topk:
                return fn(log_q, (ids, log_p), *more)
            return fn(*topk_buckets(log_q, ids, log_p), *more)
        return fn(log_q, F.log_softmax(upcast(rest[0]) / temperature, dim=-1), *rest[1:])

    flat_s, others = _flat(student, (*(teacher if topk else (teacher,)), *extras))
    rows = _rows_per_chunk(flat_s.shape[-1])
    positions = student.shape[:-1]
    if flat_s.shape[0] <= rows:
        return run(flat_s, *others).reshape(positions)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (flat_s, *others))
    if not needs_grad:
        return torch.cat([run(*chunk) for _, chunk in _slices(rows, flat_s, *others)]).reshape(positions)
    if any(x.requires_grad for x in others):  # a teacher with gradients: rare, keep it simple
        pieces = [checkpoint(run, *chunk, use_reentrant=False) for _, chunk in _slices(rows, flat_s, *others)]
        return torch.cat(pieces).reshape(positions)
    return _ChunkedStudent.apply(run, rows, flat_s, *others).reshape(positions)


class _ChunkedStudent(torch.autograd.Function):
    """Per-position values chunk by chunk under autograd, the student's gradient written into one buffer.

    Autograd through slices would materialise a full-size gradient per chunk before
    summing them; here the backward pass recomputes one chunk at a time and writes
    its gradient into a single buffer. The other inputs get no gradient.
    """

    @staticmethod
    def forward(ctx, run, rows, student, *others):  # noqa: ANN001
        ctx.run, ctx.rows = run, rows
        ctx.save_for_backward(student, *others)
        with torch.no_grad():
            return torch.cat([run(*chunk) for _, chunk in _slices(rows, student, *others)])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        student, *others = ctx.saved_tensors
        grad = torch.empty_like(student)
        for start, chunk in _slices(ctx.rows, student, *others):
            piece = chunk[0].detach().requires_grad_(True)
            end = start + piece.shape[0]
            with torch.enable_grad():
                (grad[start:end],) = torch.autograd.grad(ctx.run(piece, *chunk[1:]), piece, grad_out[start:end])
        return None, None, grad, *([None] * len(others))


# -------------------------------------------------------------------------- fused path


@dataclass(frozen=True)
class FusedKernel:
    """A divergence f(q, p) = sum_j phi(q_j, p_j) per position, with its gradient in closed form.

    ``fused(log_q, log_p, out, tmp) -> value [rows]`` receives the student's and the
    teacher's log-probabilities (``[rows, n]``, n = V or the k + 1 buckets) and two
    scratch buffers of the same shape; it returns the per-position value and leaves
    in ``out`` the vector ``q_j * df/dq_j`` (0 where q_j = 0). It may overwrite
    ``log_p`` and ``tmp``, never ``log_q``. The gradient with respect to the student's
    logits z = s / T is then ``out - q * sum(out)`` (the softmax Jacobian), which
    :func:`fused_per_position` forms; terms of df/dq that are constant over j cancel
    in it and may be left out. ``formula(log_q, log_p) -> value`` is the same value
    written plainly for autograd, used when the teacher needs gradients.
    """

    fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    formula: PositionFn


class ChunkBuffers:
    """Four ``[rows, V]`` buffers for one call, reused by every chunk (the last chunk uses a prefix)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.all = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(4)]

    def take(self, rows: int) -> list[torch.Tensor]:
        return [b[:rows] for b in self.all]


def fused_chunk(
    kernel: FusedKernel,
    s: torch.Tensor,
    teacher: list[torch.Tensor],
    temperature: float,
    bufs: list[torch.Tensor],
    grad_scale: float | None,
) -> torch.Tensor:
    """Values of one chunk; with ``grad_scale`` also its gradient (times that number), left in ``bufs[3]``.

    ``s`` and a dense teacher's ``teacher[0]`` may be ``bufs[3]`` and ``bufs[2]`` themselves (the fused
    linear path computes the chunk's logits there): each is read before its buffer is written."""
    work, log_q, log_p, out = bufs
    _log_softmax_into(log_q, s, temperature, work)
    if len(teacher) == 1:
        _log_softmax_into(log_p, teacher[0], temperature, work)
        value = kernel.fused(log_q, log_p, out, work)
        if grad_scale is None:
            return value
        # d f / d z = out - q * sum(out), then the chain rule through z = s / T
        total = out.sum(-1, keepdim=True)
        torch.exp(log_q, out=work).mul_(total)
        _scale(out.sub_(work), grad_scale, temperature)
        return value
    ids = teacher[0]
    log_q_b, log_p_b = topk_buckets(log_q, ids, upcast(teacher[1]).to(log_q.dtype), scratch=work)
    q_topk = log_q_b[:, : ids.shape[-1]]
    has_tail = ids.shape[-1] < log_q.shape[-1]
    out_b, tmp_b = torch.empty_like(log_q_b), torch.empty_like(log_q_b)
    value = kernel.fused(log_q_b, log_p_b.clone(), out_b, tmp_b)
    if grad_scale is None:
        return value
    # each token's q_j * df/dq_j is q_j times its bucket's df/dQ = out_b / Q of that bucket
    total = out_b.sum(-1, keepdim=True)
    torch.exp(log_q, out=out)
    if has_tail:
        tail_mass = log_q_b[:, -1:].exp()
        tail_slope = torch.where(tail_mass > 0, out_b[:, -1:] / tail_mass, torch.zeros_like(tail_mass))
        out.mul_(tail_slope - total)
    out.scatter_(-1, ids, out_b[:, : ids.shape[-1]] - q_topk.exp() * total)
    _scale(out, grad_scale, temperature)
    return value


def _log_softmax_into(dest: torch.Tensor, logits: torch.Tensor, temperature: float, work: torch.Tensor) -> None:
    """``dest`` <- log_softmax(logits / T) in ``dest``'s dtype, with as few passes over memory as possible.
    ``logits`` may be ``dest`` (it is then copied to ``work`` first: no kernel reads what it writes)."""
    if logits.dtype != dest.dtype or logits is dest:  # half precision: widen first, then divide in float32
        torch.log_softmax(work.copy_(logits).div_(temperature), -1, out=dest)
    elif temperature == 1.0:
        torch.log_softmax(logits, -1, out=dest)
    else:
        torch.log_softmax(torch.div(logits, temperature, out=work), -1, out=dest)


def _scale(grad: torch.Tensor, grad_scale: float, temperature: float) -> None:
    """The chain rule through z = s / T (the upstream gradient is applied per position later)."""
    if grad_scale / temperature != 1.0:
        grad.mul_(grad_scale / temperature)


def _fused_pass(
    kernel: FusedKernel,
    student: torch.Tensor,
    teacher: list[torch.Tensor],
    temperature: float,
    grad_out: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values of every position; with ``grad_out`` also the student's gradient (times that number).

    The gradient is one buffer the size and dtype of the student's logits.
    """
    rows = min(_rows_per_chunk(student.shape[-1]), student.shape[0])
    dtype = upcast(student).dtype
    bufs = ChunkBuffers(rows, student.shape[-1], dtype, student.device)
    grad = torch.empty_like(student) if grad_out is not None else None
    values = []
    for start, (s, *t) in _slices(rows, student, *teacher):
        n = s.shape[0]
        chunk_bufs = bufs.take(n)
        values.append(fused_chunk(kernel, s, t, temperature, chunk_bufs, grad_out))
        if grad is not None:
            grad[start : start + n].copy_(chunk_bufs[3])
    return torch.cat(values), grad


class _FusedStudent(torch.autograd.Function):
    """Values and the student's gradient in one pass over the chunks; the backward pass only scales it.

    The forward pass writes d value_i / d logits_i for every position into one buffer
    (what a backward pass would have to recompute chunk by chunk); the backward pass
    multiplies it in place by the upstream gradient of each position and hands it on,
    so no second buffer is made. A second backward pass through the same graph
    (``retain_graph=True``, gradcheck) finds the buffer handed on and recomputes.
    """

    @staticmethod
    def forward(ctx, kernel, temperature, student, *teacher):  # noqa: ANN001
        ctx.kernel, ctx.temperature = kernel, temperature
        ctx.save_for_backward(student, *teacher)
        values, ctx.grad = _fused_pass(kernel, student, list(teacher), temperature, grad_out=1.0)
        return values

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        student, *teacher = ctx.saved_tensors
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
        else:  # the same operations in the same order as the first time: bitwise the same result
            _, grad = _fused_pass(ctx.kernel, student, teacher, ctx.temperature, grad_out=1.0)
        grad.mul_(grad_out.to(grad.dtype).unsqueeze(-1))
        return None, None, grad, *([None] * len(teacher))


def fused_per_position(
    student: torch.Tensor, teacher: Teacher, kernel: FusedKernel, temperature: float
) -> torch.Tensor:
    """The kernel's per-position values (``student.shape[:-1]``), differentiable in the student.

    A teacher that needs gradients goes through :func:`per_position` with the
    kernel's plain formula instead (its gradient is not written in closed form here).
    """
    teacher_parts = list(teacher) if isinstance(teacher, tuple) else [teacher]
    if torch.is_grad_enabled() and any(x.requires_grad for x in teacher_parts):
        return per_position(student, teacher, kernel.formula, temperature)
    flat_s, flat_t = _flat(student, tuple(teacher_parts))
    flat_t = [x.detach() for x in flat_t]
    if torch.is_grad_enabled() and student.requires_grad:
        values = _FusedStudent.apply(kernel, temperature, flat_s, *flat_t)
    else:
        with torch.no_grad():
            values = _fused_pass(kernel, flat_s, flat_t, temperature)[0]
    return values.reshape(student.shape[:-1])

"""Fused linear divergences: logit losses computed from the last hidden states and the LM head,
a chunk of positions at a time, so the ``[B, L, V]`` logits and their gradient never exist.

Not a loss module: it registers nothing. A causal LM's logits are ``hidden @ W.T (+ b)``.
When a loss is handed :class:`HeadLogits` instead of a logits tensor, it comes here: each
chunk of positions gets its logits (a ``[rows, V]`` buffer), the divergence's value and
its gradient in closed form (the :class:`~kdforge.losses.chunking.FusedKernel` of the
logit path, so the arithmetic is the same), and that gradient is pushed at once through
the head: ``d hidden = g @ W`` and ``d W += g.T @ hidden``. The teacher may be dense
logits, a top-k cache ``(ids, log_probs)`` or :class:`HeadLogits` too (its chunk's logits
are computed the same way, under no gradient).

The function returns the *weighted sum* ``sum_i w_i f_i`` (w: the mask), never per-position
values: the masked mean is linear in them, so the upstream gradient is one number and the
backward pass only scales what the forward pass wrote (as Liger Kernel's fused linear
losses do). Extra memory: the gradients of the hidden states and of the head (the size
of the head's weight), and four chunk buffers of :data:`CHUNK_ELEMENTS` floats.
Positions with weight 0 (prompts, padding) are skipped, not computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdforge.losses.chunking import ChunkBuffers, FusedKernel, fused_chunk
from kdforge.losses.common import upcast

#: logits per chunk (8 MiB in float32, four buffers): the extra memory is the head's weight gradient
#: plus these; larger chunks make the chunks' matmuls faster on the CPU (benchmarks/scale/README.md)
CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class HeadLogits:
    """The logits ``hidden @ weight.T + bias`` described, not computed.

    ``hidden`` is ``[..., H]`` (the positions of the logits), ``weight`` the head's
    ``[V, H]`` matrix and ``bias`` its ``[V]`` vector or None. ``shape`` is the logits'.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def requires_grad(self) -> bool:
        return any(x is not None and x.requires_grad for x in (self.hidden, self.weight, self.bias))

    def dense(self) -> torch.Tensor:
        """The logits themselves (the loss paths that need every logit at once)."""
        out = self.hidden @ self.weight.T
        return out if self.bias is None else out + self.bias

    def flat(self) -> HeadLogits:
        return HeadLogits(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias)


#: positions per chunk at least, whatever the vocabulary: a matmul of fewer rows runs far below the
#: CPU's peak, and each chunk reads and writes the head's whole weight gradient once (at 49,152 entries
#: the three matmuls of 64-row chunks took 6.7 s against 8.3 s at 42 rows, 4.5 s at 256; at 151,936,
#: CHUNK_ELEMENTS alone would give 13 rows), for 4 x 64 x V floats of buffers
MIN_ROWS = 64


def _rows(vocab: int) -> int:
    return max(MIN_ROWS, CHUNK_ELEMENTS // vocab)


#: ``(student logits [rows, V], teacher parts of the chunk, buffers) -> (values [rows], d value / d logits)``
ChunkFn = Callable[[torch.Tensor, list[torch.Tensor], list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def _logits_into(dest: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    torch.matmul(hidden.to(dest.dtype), weight.T, out=dest)
    if bias is not None:
        dest.add_(bias)


def _run(
    chunk_fn: ChunkFn,
    student: HeadLogits,
    teacher: list[torch.Tensor] | HeadLogits,
    weights: torch.Tensor,
    want_grad: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """``sum_i w_i f_i`` over the positions with ``w_i != 0``; with ``want_grad`` also its gradients
    to the student's hidden states, head weight and bias.

    Four ``[rows, V]`` buffers in all: the student's chunk logits are computed into the gradient's
    buffer and a dense or head teacher's into the teacher log-probabilities' (each is read, then
    overwritten, by the chunk function)."""
    hidden, vocab = student.hidden, student.weight.shape[0]
    dtype = upcast(hidden).dtype
    weight = student.weight.detach().to(dtype)
    bias = None if student.bias is None else student.bias.detach().to(dtype)
    keep = weights.nonzero().squeeze(-1)  # masked positions cost nothing
    rows = min(_rows(vocab), max(1, keep.numel()))
    bufs = ChunkBuffers(rows, vocab, dtype, hidden.device)
    head_teacher = isinstance(teacher, HeadLogits)
    if head_teacher:
        t_weight = teacher.weight.detach().to(dtype)
        t_bias = None if teacher.bias is None else teacher.bias.detach().to(dtype)
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if want_grad else None
    grad_w = torch.zeros_like(weight) if want_grad and student.weight.requires_grad else None
    grad_b = torch.zeros_like(bias) if want_grad and bias is not None and student.bias.requires_grad else None
    for start in range(0, keep.numel(), rows):
        idx = keep[start : start + rows]
        n = idx.numel()
        chunk = bufs.take(n)
        h = hidden.detach()[idx].to(dtype)
        _logits_into(chunk[3], h, weight, bias)
        if head_teacher:
            _logits_into(chunk[2], teacher.hidden.detach()[idx], t_weight, t_bias)
            parts = [chunk[2]]
        elif len(teacher) == 1 and teacher[0].is_floating_point():  # dense logits
            if teacher[0].dtype == dtype:
                torch.index_select(teacher[0], 0, idx, out=chunk[2])
            else:  # half-precision logits: widened into the buffer
                chunk[2].copy_(teacher[0][idx])
            parts = [chunk[2]]
        else:  # a top-k teacher's ids and log-probs, or labels: [rows, k]
            parts = [x[idx] for x in teacher]
        values, grad = chunk_fn(chunk[3], parts, chunk)
        w = weights[idx].to(dtype)
        total += (values * w).sum()
        if not want_grad:
            continue
        grad.mul_(w.unsqueeze(-1))
        grad_h[idx] = grad @ weight  # type: ignore[index]
        if grad_w is not None:
            grad_w.addmm_(grad.T, h)
        if grad_b is not None:
            grad_b += grad.sum(0)
    grads = (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(student.weight.dtype),
        None if grad_b is None else grad_b.to(student.bias.dtype),  # type: ignore[union-attr]
    )
    return total, grads


class _FusedLinear(torch.autograd.Function):
    """The weighted sum and, in the same pass, its gradients; the backward pass scales them."""

    @staticmethod
    def forward(ctx, chunk_fn, teacher, weights, hidden, weight, bias):  # noqa: ANN001
        student = HeadLogits(hidden, weight, bias)
        total, grads = _run(chunk_fn, student, teacher, weights, want_grad=True)
        # saved as autograd saves what backward needs: memory accounting (kdforge plan's saved-tensor
        # hooks) and offloading hooks see them
        ctx.save_for_backward(*grads)
        ctx.handed_on = False
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        if ctx.handed_on:  # (the gradients are scaled in place below)
            raise RuntimeError("fused linear loss: backward called twice; its gradients are handed on once")
        ctx.handed_on = True
        scaled = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors)
        return None, None, None, *scaled


def _teacher_parts(teacher: object) -> list[torch.Tensor] | HeadLogits:
    if isinstance(teacher, HeadLogits):
        return teacher.flat()
    parts = list(teacher) if isinstance(teacher, tuple) else [teacher]  # type: ignore[arg-type]
    return [x.detach().reshape(-1, x.shape[-1]) for x in parts]


def weighted_sum(chunk_fn: ChunkFn, student: HeadLogits, teacher: object, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_i w_i f_i`` of a chunk function over the student's positions (``weights``: the
    mask, ``student.shape[:-1]``, None for all), differentiable in the student's hidden
    states, head weight and bias; the teacher gets no gradient."""
    if weights is not None and weights.shape != student.shape[:-1]:  # (the logit path's message: a recipe's mask)
        raise ValueError(f"mask shape {tuple(weights.shape)} does not match positions {tuple(student.shape[:-1])}")
    flat = student.flat()
    n = flat.hidden.shape[0]
    w = (
        torch.ones(n, device=flat.hidden.device)
        if weights is None
        else weights.reshape(n).to(upcast(flat.hidden).dtype)
    )
    t = _teacher_parts(teacher)
    if torch.is_grad_enabled() and student.requires_grad:
        return _FusedLinear.apply(chunk_fn, t, w, flat.hidden, flat.weight, flat.bias)
    with torch.no_grad():
        return _run(chunk_fn, flat, t, w, want_grad=False)[0]


def kernel_chunk(kernel: FusedKernel, temperature: float) -> ChunkFn:
    """A divergence's chunk function: its fused kernel at ``temperature`` (the logit path's arithmetic)."""

    def run(s: torch.Tensor, teacher: list[torch.Tensor], bufs: list[torch.Tensor]):
        values = fused_chunk(kernel, s, teacher, temperature, bufs, 1.0)
        return values, bufs[3]

    return run


def cross_entropy_chunk(s: torch.Tensor, labels: list[torch.Tensor], bufs: list[torch.Tensor]):
    """Negative log-likelihood of each row's label and its gradient ``softmax - onehot``."""
    log_q, grad = bufs[1], bufs[3]
    (target,) = labels  # [rows, 1]
    torch.log_softmax(s, -1, out=log_q)  # s is grad's buffer: read here, written below
    values = -log_q.gather(-1, target).squeeze(-1)
    torch.exp(log_q, out=grad)
    grad.scatter_add_(-1, target, grad.new_full((grad.shape[0], 1), -1.0))
    return values, grad


def linear_or_dense(student: object, teacher: object) -> tuple[object, object]:
    """The pair as a divergence takes it: the fused linear path while the student is :class:`HeadLogits`
    and the teacher needs no gradient (its gradient is not written in closed form); dense logits
    otherwise (a :class:`HeadLogits` teacher beside a dense student is computed)."""
    teacher_grad = isinstance(teacher, (HeadLogits, torch.Tensor)) and teacher.requires_grad
    if isinstance(student, HeadLogits) and teacher_grad:
        student = student.dense()
    if isinstance(teacher, HeadLogits) and not isinstance(student, HeadLogits):
        teacher = teacher.dense()
    return student, teacher


def position_count(student: HeadLogits, mask: torch.Tensor | None) -> torch.Tensor:
    """How many positions a masked mean over the student's positions divides by."""
    positions = student.shape[:-1]
    if mask is None:
        return torch.tensor(float(positions.numel()), device=student.hidden.device)
    if mask.shape != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(positions)}")
    return mask.to(upcast(student.hidden).dtype).sum()

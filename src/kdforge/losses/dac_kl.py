"""DAC-KL: distribution-adaptive clipping KL, the token-level loss of MGSR.

Liu et al., "Multi-Granularity Semantic Revision for Large Language Model
Distillation" (arXiv 2407.10068; ACL 2026). A small learnable sub-network f_sub reads
the teacher's distribution at each token and predicts lower and upper quantile
limits; the teacher is clipped to the high-density region between them, and the KL
to the student is taken over that region. No official code was found and the
paper's equations were not at hand: :class:`DACKL` is a re-implementation from the
paper's description, and every choice it leaves open is listed in the class
docstring.

This is a loss module, not a loss function: f_sub has learnable parameters. A recipe
term ``{loss: dac_kl, field: logits}`` builds one, and the engine trains f_sub with the
student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdforge.losses import chunking
from kdforge.losses.common import check_temperature, kl_per_position, masked_mean, upcast
from kdforge.losses.registry import register_loss_module
from kdforge.provenance import Paper

__all__ = ["DACKL"]

#: ``(l, u)`` as floats or tensors broadcastable to the positions ``[B]`` / ``[B, L]``
Limits = tuple[float | torch.Tensor, float | torch.Tensor]

MGSR = Paper(
    "Multi-Granularity Semantic Revision for Large Language Model Distillation",
    2024,
    "2407.10068",
    authors="Liu and others",
)


@register_loss_module("dac_kl", paper=MGSR)
class DACKL(nn.Module):
    """Distribution-adaptive clipping KL: KL(clipped teacher || student), times T^2.

    Per position, with p the teacher's and q the student's softmax at temperature T:

    1. sort p in descending order (ties by vocabulary index) and place token k at the
       midpoint of its cumulative-mass interval, c_k = sum_{r<k} p_(r) + p_(k) / 2;
    2. f_sub predicts limits 0 < l < u < 1 from the teacher's distribution;
    3. keep the tokens with l <= c_k <= u, and always the teacher's argmax;
    4. p~ = p restricted to the kept tokens, renormalised; per-position loss
       KL(p~ || q) = sum_{kept} p~_k (log p~_k - log q_k);
    5. mean over counted positions, times T^2 (applied once).

    With l = 0 and u = 1 every token is kept and the loss is :func:`forward_kl`.

    Choices (the paper leaves these open; a reviewer noted the MLP is unspecified):

    - Position of a token in the distribution: the midpoint of its cumulative-mass
      interval, so a token belongs to the region when the centre of its mass does, and
      [0, 1] contains every token.
    - The teacher's argmax is always kept: the clipped teacher is never empty, and
      when l exceeds half the top probability the dominant token (the one the SFT term
      of MGSR also trains) is not removed from the target. Labels are not used.
    - The teacher is renormalised over the kept tokens; the student is not: q is its
      full softmax. So KL(p~ || q) is a KL between two distributions on the vocabulary,
      and it still pushes the student's mass out of the clipped region (renormalising
      q over the kept set would leave mass outside the region unpenalised).
    - f_sub's input: the teacher's top-m probabilities in descending order (zero-padded
      when the vocabulary is smaller than m) and the tail mass 1 - sum(top m), m + 1
      features. The limits are compared with cumulative sorted mass, so the sorted head
      is the evidence they depend on; it does not depend on which token ids carry the
      mass, has a fixed size for any vocabulary, and is cheap.
    - f_sub: Linear(m + 1, hidden) - ReLU - Linear(hidden, 2) -> (a, b), then
      u = sigmoid(b), l = u * sigmoid(a), so 0 < l < u < 1 always. The output layer's
      weights start at 0 and its bias at the values that give ``initial_limits``, so
      every position starts at those limits (default l = 0.01, u = 0.95: drop the last
      5 % of the mass).
    - Differentiable relaxation: the loss value is the hard clip above, and the
      student's gradient is that of the hard-clipped KL, exactly. The hard clip is
      piecewise constant in (l, u), so f_sub's gradient is that of a relaxed loss in
      which each token is weighted by the gate
      sigmoid((c_k - l) / tau) * sigmoid((u - c_k) / tau) (the argmax's gate is 1),
      tau = ``gate_temperature`` (default 0.05, in units of probability mass); in it the
      teacher and student probabilities are held constant, so it only moves (l, u).
      This is a straight-through-style estimator: the value of one, the gradient of the
      other.
    - f_sub is trained by the loss it shapes, end to end as in the paper. It therefore
      has an incentive to choose the region where the student already agrees with the
      teacher (down to the argmax alone); give it a smaller learning rate, freeze it, or
      pass fixed ``limits`` where that shows.

    Args:
        top_m: number of sorted teacher probabilities f_sub reads (default 32).
        hidden: width of f_sub's hidden layer (default 64).
        gate_temperature: tau of the relaxation, > 0 (default 0.05).
        initial_limits: f_sub's output (l, u) at initialisation, 0 < l < u < 1.

    ``forward(student, teacher, *, mask=None, temperature=1.0, limits=None)``:
        student: logits ``[B, C]`` or ``[B, L, V]`` (gradients flow here).
        teacher: logits of the same shape; ``-inf`` entries (a masked vocabulary) give
            no NaN.
        mask: ``[B]`` or ``[B, L]`` booleans, True = counted; default all.
        temperature: T > 0; both sides are divided by it, f_sub reads the teacher at T.
        limits: ``(l, u)`` to use instead of f_sub's prediction (floats or tensors
            broadcastable to the positions), e.g. fixed quantiles; f_sub is then unused.
        Returns the scalar: per-position KL(p~ || q) averaged over counted positions of
        the whole batch, times T^2.

    Arithmetic is in float32 whatever the input dtype (float64 stays float64). Large
    vocabularies are processed in chunks of positions under activation checkpointing,
    as in :mod:`kdforge.losses.logits`.
    """

    def __init__(
        self,
        *,
        top_m: int = 32,
        hidden: int = 64,
        gate_temperature: float = 0.05,
        initial_limits: tuple[float, float] = (0.01, 0.95),
    ) -> None:
        super().__init__()
        for name, value in (("top_m", top_m), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {gate_temperature}")
        low, high = initial_limits
        if not 0 < low < high < 1:
            raise ValueError(f"initial_limits must satisfy 0 < l < u < 1, got {initial_limits}")
        self.top_m, self.gate_temperature = top_m, float(gate_temperature)
        self.f_sub = nn.Sequential(nn.Linear(top_m + 1, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        out = self.f_sub[2]
        nn.init.zeros_(out.weight)
        with torch.no_grad():
            ratio = low / high
            out.bias.copy_(torch.tensor([math.log(ratio / (1 - ratio)), math.log(high / (1 - high))]))

    def _predict(self, sorted_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l, u), each ``[R]``, from teacher probabilities ``[R, V]`` sorted in descending order."""
        head = sorted_probs[:, : self.top_m]
        if head.shape[-1] < self.top_m:
            head = F.pad(head, (0, self.top_m - head.shape[-1]))
        tail = (1 - head.sum(-1, keepdim=True)).clamp_min(0)
        x = torch.cat([head, tail], dim=-1)
        first, _, last = self.f_sub
        dtype = x.dtype
        hidden = F.relu(F.linear(x, first.weight.to(dtype), first.bias.to(dtype)))
        a, b = F.linear(hidden, last.weight.to(dtype), last.bias.to(dtype)).unbind(-1)
        upper = torch.sigmoid(b)
        return upper * torch.sigmoid(a), upper

    def limits(self, teacher: torch.Tensor, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """f_sub's limits (l, u) for teacher logits ``[B, C]`` / ``[B, L, V]``, each of the positions' shape."""
        probs = F.softmax(upcast(teacher) / temperature, dim=-1).reshape(-1, teacher.shape[-1])
        head = probs.topk(min(self.top_m, probs.shape[-1]), dim=-1).values
        low, high = self._predict(head)
        return low.reshape(teacher.shape[:-1]), high.reshape(teacher.shape[:-1])

    def _per_position(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        low: torch.Tensor | None,
        high: torch.Tensor | None,
    ) -> torch.Tensor:
        """KL(p~ || q) for rows ``[R, V]``; ``low``/``high`` ``[R]`` or None for f_sub's."""
        log_q = F.log_softmax(upcast(student) / temperature, dim=-1)
        log_p = F.log_softmax(upcast(teacher) / temperature, dim=-1)
        log_p, order = log_p.sort(dim=-1, descending=True, stable=True)
        log_q = log_q.gather(-1, order)
        p = log_p.exp()
        position = (p.cumsum(-1) - p / 2).clamp(0, 1)  # clamp: the cumsum's rounding may pass 1
        if low is None or high is None:
            low, high = self._predict(p)
        low, high = low.to(p.dtype).unsqueeze(-1), high.to(p.dtype).unsqueeze(-1)
        is_top = torch.zeros_like(position, dtype=torch.bool)
        is_top[:, 0] = True

        keep = ((position >= low) & (position <= high)) | is_top
        log_kept = log_p.masked_fill(~keep, -math.inf)
        log_clipped = log_kept - torch.logsumexp(log_kept, dim=-1, keepdim=True)
        value = kl_per_position(log_clipped, log_q)

        if low.requires_grad or high.requires_grad:
            # the relaxed loss, teacher and student held constant: it only carries (l, u)'s gradient
            p_c, log_p_c, position_c = p.detach(), log_p.detach(), position.detach()
            # a student -inf where the teacher has mass makes the value +inf already; such a
            # term is left out here so that the limits' gradient stays finite
            log_q_c = log_q.detach()
            log_q_c = torch.where(torch.isfinite(log_q_c), log_q_c, torch.zeros_like(log_q_c))
            tau = self.gate_temperature
            gate = torch.sigmoid((position_c - low) / tau) * torch.sigmoid((high - position_c) / tau)
            gate = torch.where(is_top, torch.ones_like(gate), gate)
            mass = (gate * p_c).sum(-1, keepdim=True)
            log_ratio = torch.where(p_c > 0, log_p_c - torch.log(mass) - log_q_c, torch.zeros_like(p_c))
            relaxed = (gate * p_c / mass * log_ratio).sum(-1)
            value = value + (relaxed - relaxed.detach())
        return value

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        limits: Limits | None = None,
    ) -> torch.Tensor:
        """The scalar loss; see the class docstring."""
        check_temperature(temperature)
        if student.shape != teacher.shape:
            raise ValueError(
                f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ;"
                " nothing is broadcast"
            )
        if student.ndim not in (2, 3):
            raise ValueError(f"logits must be [B, C] or [B, L, V], got {tuple(student.shape)}")
        positions, vocab = student.shape[:-1], student.shape[-1]
        flat = [student.reshape(-1, vocab), teacher.reshape(-1, vocab)]
        if limits is not None:
            flat += self._check_limits(limits, positions, student.device)

        def run(s: torch.Tensor, t: torch.Tensor, *lim: torch.Tensor) -> torch.Tensor:
            low, high = lim if lim else (None, None)
            return self._per_position(s, t, temperature, low, high)

        rows = max(1, chunking.CHUNK_ELEMENTS // vocab)
        if flat[0].shape[0] <= rows:
            per_position = run(*flat)
        else:
            grad = torch.is_grad_enabled() and (
                any(x.requires_grad for x in flat)
                or (limits is None and any(w.requires_grad for w in self.parameters()))
            )
            pieces = []
            for start in range(0, flat[0].shape[0], rows):
                chunk = [x[start : start + rows] for x in flat]
                pieces.append(checkpoint(run, *chunk, use_reentrant=False) if grad else run(*chunk))
            per_position = torch.cat(pieces)
        return masked_mean(per_position.reshape(positions), mask) * temperature**2

    @staticmethod
    def _check_limits(limits: Limits, positions: torch.Size, device: torch.device) -> list[torch.Tensor]:
        """(l, u) expanded to the positions and flattened to ``[R]``; 0 <= l <= u <= 1 is required."""
        low, high = (torch.as_tensor(x, device=device) for x in limits)
        try:
            low, high = (x.expand(positions).reshape(-1) for x in (low, high))
        except RuntimeError:
            raise ValueError(
                f"limits of shapes {tuple(low.shape)} and {tuple(high.shape)} do not broadcast to the positions"
                f" {tuple(positions)}"
            ) from None
        if not bool(((low >= 0) & (low <= high) & (high <= 1)).all()):
            raise ValueError("limits must satisfy 0 <= l <= u <= 1 at every position")
        return [low, high]

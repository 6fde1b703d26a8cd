"""Pure loss functions and their registry (see DESIGN.md, "Loss contract")."""

from kdforge.losses import logits as _logits  # noqa: F401  (registers the losses)
from kdforge.losses.logits import cross_entropy, forward_kl, hinton_kd
from kdforge.losses.registry import LOSSES, LossSpec, register_loss

__all__ = ["LOSSES", "LossSpec", "register_loss", "cross_entropy", "forward_kl", "hinton_kd"]

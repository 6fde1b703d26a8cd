"""Pure loss functions and their registry (see DESIGN.md, "Loss contract").

Every module in this package registers its losses when imported; importing the
package imports them all, so adding a loss family is adding one file.
"""

import importlib
import pkgutil

from kdforge.losses.logits import cross_entropy, forward_kl, hinton_kd
from kdforge.losses.registry import LOSS_MODULES, LOSSES, LossSpec, register_loss, register_loss_module

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LOSSES",
    "LOSS_MODULES",
    "LossSpec",
    "register_loss",
    "register_loss_module",
    "cross_entropy",
    "forward_kl",
    "hinton_kd",
]

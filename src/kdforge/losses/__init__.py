"""Pure loss functions and their registry (see DESIGN.md, "Loss contract").

Every module in this package registers its losses when imported; importing the
package imports them all, so adding a loss family is adding one file.

Every registered loss is importable here under the name a recipe gives it
(``from kdforge.losses import generalized_jsd``), and so is every loss module class
(``dac_kl`` is :class:`DACKL`, ``mi_alpha`` is :class:`MIAlpha`). Two names are the
registry forms of functions of the same module with another contract:
``margin_mse`` takes ``[B, 1+K]`` score tables (``kdforge.losses.ranking.margin_mse``
takes positives and negatives apart), and ``flops`` is the term on a student field
(``kdforge.losses.sparse.flops`` takes the weights alone). ``taid`` and ``dac_kl`` are
also the names of their modules: the package attribute is the loss, and
``from kdforge.losses.taid import TAIDSchedule`` still reaches the module.
"""

import importlib
import pkgutil

from kdforge.losses.dac_kl import DACKL
from kdforge.losses.dac_kl import DACKL as dac_kl
from kdforge.losses.features import (
    attention_kl,
    cosine_distance,
    embedding_mse,
    hidden_mse,
    qkv_relations,
    value_relation,
)
from kdforge.losses.logits import (
    cross_entropy,
    dkd,
    forward_kl,
    generalized_jsd,
    hinton_kd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from kdforge.losses.multilabel import binary_cross_entropy, binary_kd
from kdforge.losses.mutual_information import MIAlpha
from kdforge.losses.mutual_information import MIAlpha as mi_alpha
from kdforge.losses.ranking import contrastive, listnet, listwise_kl
from kdforge.losses.ranking import margin_mse_scores as margin_mse
from kdforge.losses.registry import (
    LOSS_MODULES,
    LOSSES,
    LossModuleSpec,
    LossSpec,
    register_loss,
    register_loss_module,
)
from kdforge.losses.sparse import flops_regulariser as flops
from kdforge.losses.squarehead import squarehead
from kdforge.losses.taid import TAIDSchedule, taid
from kdforge.losses.transport import sinkhorn

# a loss family added as a new file registers itself here, before it is exported by name
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LOSSES",
    "LOSS_MODULES",
    "LossSpec",
    "LossModuleSpec",
    "register_loss",
    "register_loss_module",
    "DACKL",
    "MIAlpha",
    "TAIDSchedule",
    # losses, under their registered names
    "attention_kl",
    "binary_cross_entropy",
    "binary_kd",
    "contrastive",
    "cosine_distance",
    "cross_entropy",
    "dkd",
    "embedding_mse",
    "flops",
    "forward_kl",
    "generalized_jsd",
    "hidden_mse",
    "hinton_kd",
    "listnet",
    "listwise_kl",
    "margin_mse",
    "qkv_relations",
    "reverse_kl",
    "sinkhorn",
    "skew_kl",
    "skew_reverse_kl",
    "squarehead",
    "taid",
    "total_variation",
    "value_relation",
    # loss modules, under their registered names
    "dac_kl",
    "mi_alpha",
]

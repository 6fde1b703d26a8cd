"""Students made of the teacher's own layers: a shallower copy of a decoder-only LM.

The student keeps the teacher's embeddings, final norm and LM head (tied or not, as in
the teacher) and a chosen subset of its decoder layers, in order. Starting from the
teacher's weights instead of random ones is what makes a short distillation run
useful (DistilBERT, TinyBERT and MiniMA initialise their students this way).

Only the Llama-style layout is supported (``model.model.layers``, a ``num_hidden_layers``
config), which Llama, Mistral, Qwen2, SmolLM and most current decoder-only models share.

The size advice follows the law of capacity gap (Zhang et al., "Towards the Law of
Capacity Gap in Distilling Language Models", arXiv 2311.07052): the best teacher has
about 2.5x the student's parameters.
"""

from __future__ import annotations

import copy
import re

import torch
from rich.markup import escape
from torch import nn

from kdforge.console import make_console
from kdforge.errors import RecipeError
from kdforge.models.hf_causal_lm import plain_config
from kdforge.models.llama_layout import decoder_layers

console = make_console(stderr=True)

#: teacher/student parameter ratio the law of capacity gap favours, and the range outside which we say so
BEST_RATIO = 2.5
ADVISED_RATIOS = (1.5, 5.0)


def evenly_spaced_layers(total: int, count: int) -> list[int]:
    """``count`` of ``total`` layer indices, evenly spaced, always with the first and the last."""
    if not 2 <= count <= total:
        raise ValueError(f"cannot pick {count} of {total} layers keeping the first and the last")
    return [int(i * (total - 1) / (count - 1) + 0.5) for i in range(count)]


def _subset_per_layer_lists(config, layers: list[int], total: int) -> None:
    """Config lists with one entry per layer (``layer_types``: sliding or full attention, ...) follow the layers."""
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and total > 1 and not name.startswith("_"):
            setattr(config, name, type(value)(value[i] for i in layers))


def student_from_teacher(teacher: nn.Module, layers: list[int], *, field: str = "student.from_teacher") -> nn.Module:
    """A float32 copy of ``teacher`` with only the decoder ``layers`` (teacher indices, increasing)."""
    prefix, teacher_layers = decoder_layers(teacher, field)
    total = len(teacher_layers)
    if not layers:
        raise RecipeError(f"{field}.layers: give at least one layer")
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise RecipeError(
            f"{field}.layers: layer {bad[0]} does not exist; the teacher has {total} layers (0-{total - 1})"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise RecipeError(f"{field}.layers: {layers} must be increasing, each layer once (teacher order is kept)")

    config = plain_config(teacher.config)
    _subset_per_layer_lists(config, layers, total)
    config.num_hidden_layers = len(layers)
    if any(t.is_meta for t in teacher.parameters()):
        # a teacher built from its configuration alone (kdforge plan --from-config): no weights to copy
        with torch.device("meta"):
            student = type(teacher)(config).to(torch.float32)
        return _numbered_like(student, teacher, field)
    student = type(teacher)(config).to(torch.float32)

    new_index = {old: new for new, old in enumerate(layers)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = pattern.match(name)
        if match is None:  # embeddings, final norm, LM head
            state[name] = tensor
        elif int(match.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    student.load_state_dict(state, strict=True)
    return _numbered_like(student, teacher, field)


def _numbered_like(student: nn.Module, teacher: nn.Module, field: str) -> nn.Module:
    # The KV cache is indexed by each attention's layer_idx: it must be the student's index,
    # not the teacher's. Fresh layers are numbered 0..n-1 already; this makes it explicit.
    for index, layer in enumerate(decoder_layers(student, field)[1]):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = index
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings and LM head count once)."""
    return sum(p.numel() for p in model.parameters())


def capacity_advice(teacher_params: int, student_params: int) -> str | None:
    """A sentence of advice when the teacher/student size ratio is far from the law of capacity gap's 2.5x."""
    ratio = teacher_params / max(student_params, 1)
    low, high = ADVISED_RATIOS
    if low <= ratio <= high:
        return None
    direction = "a smaller student (fewer layers)" if ratio < low else "a larger student (more layers)"
    return (
        f"the teacher is {ratio:.1f}x the student; the law of capacity gap (Zhang et al. 2023) finds the best"
        f" teacher about {BEST_RATIO}x the student's parameters: {direction}, or a teacher nearer that ratio,"
        " may distill better"
    )


def describe_sizes(teacher: nn.Module, student: nn.Module, layers: list[int] | None = None) -> list[str]:
    """Lines that tell the user how big the student is next to the teacher (printed when it is built)."""
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    what = f"{len(layers)} of {teacher.config.num_hidden_layers} teacher layers {layers}: " if layers else ""
    lines = [
        f"student: {what}{student_params:,} parameters; teacher {teacher_params:,}"
        f" ({teacher_params / max(student_params, 1):.2f}x)"
    ]
    advice = capacity_advice(teacher_params, student_params)
    if advice:
        lines.append(f"advice: {advice}")
    return lines


def print_sizes(teacher: nn.Module, student: nn.Module, layers: list[int] | None = None) -> None:
    for line in describe_sizes(teacher, student, layers):
        style = "yellow" if line.startswith("advice") else "dim"
        console.print(f"[{style}]{escape(line)}", highlight=False)

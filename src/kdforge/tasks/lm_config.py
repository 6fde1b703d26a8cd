"""The causal-LM task's recipe sections: ``student`` and ``data``, and the settings methods hand it.

The training responses are the data file's own (or its text), unless a method of the
recipe's list has a teacher write them (:class:`kdforge.tasks.lm_generated.ResponseSource`):

- ``teacher_generated``: the teacher answers the file's prompts once before training
  (sequence-level KD, :mod:`kdforge.methods.teacher_generated`);
- ``online_generation``: the teacher answers the training prompts afresh every epoch
  (:mod:`kdforge.methods.online_generation`);
- ``step_by_step``: the teacher writes a rationale and an answer
  (:mod:`kdforge.methods.step_by_step`, settings :class:`StepByStep`).

The recipe's top-level ``generation`` section says which model writes and how, for all of
them (and how long the report's sample answers are):
:func:`kdforge.data.generate.build_generator`. The teacher-hacking monitor is a method too
(:mod:`kdforge.methods.teacher_hacking_monitor`, settings :class:`HackingMonitor`).
On-policy distillation (GKD), where the student answers the prompts itself, is the
``on_policy`` method. The ``data`` fields these methods had before (``data.mode``,
``data.step_by_step``, ``data.monitor``, ``data.on_policy``, ``data.generation``) are
refused with the new spelling.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdforge.data.generate import Sampling
from kdforge.data.table import SourceFields
from kdforge.recipe import Strict
from kdforge.tasks.base import refuse_moved_settings


class FromTeacher(Strict):
    layers: list[int] | None = Field(None, description="teacher layer indices to keep, increasing (0-based)")
    num_layers: int | None = Field(None, ge=2, description="keep this many (chosen by select)")
    select: Literal["even", "importance", "angular"] = Field(
        "even",
        description="how num_layers are chosen: even (evenly spaced, first and last included), importance (the"
        " highest block influence, ShortGPT), angular (all but the n-layer span of least angular distance, Gromov"
        " et al.); scored on calibration_batches of training data",
    )
    calibration_batches: int = Field(8, ge=1, description="training batches the layers are scored on (select)")
    model: str | None = Field(None, description="the model whose layers are copied; default: teacher.model")

    @model_validator(mode="after")
    def _one_choice(self) -> FromTeacher:
        if (self.layers is None) == (self.num_layers is None):
            raise ValueError("give exactly one of layers (e.g. [0, 6, 12]) or num_layers")
        if self.layers is not None and self.select != "even":
            raise ValueError(f"select: {self.select} chooses num_layers; with layers the choice is given")
        return self


class WidthPrune(Strict):
    """Minitron's width pruning of the student (after from_teacher or model): each size None keeps it."""

    heads: int | None = Field(None, ge=1, description="query heads per layer (a multiple of the key/value heads)")
    intermediate: int | None = Field(None, ge=1, description="MLP channels per layer")
    hidden: int | None = Field(None, ge=1, description="hidden (embedding) channels")
    calibration_batches: int = Field(8, ge=1, description="training batches the channels are scored on")

    @model_validator(mode="after")
    def _something(self) -> WidthPrune:
        if self.heads is None and self.intermediate is None and self.hidden is None:
            raise ValueError("give at least one of heads, intermediate, hidden")
        return self


class Sparsity(Strict):
    """The student's decoder layers pruned by magnitude, the mask kept fixed while it trains (Kurtic et al.)."""

    target: float = Field(0.5, gt=0, lt=1, description="unstructured: the fraction of weights set to zero per layer")
    pattern: Literal["unstructured", "2:4"] = Field(
        "unstructured", description="unstructured, or 2:4 (2 of every 4 consecutive inputs kept; target ignored)"
    )


class SwiftKV(Strict):
    """The teacher itself, its later layers' keys and values computed from one layer's input (Qiao et al.)."""

    num_key_value_layers: int = Field(
        ...,
        ge=1,
        description="l: layers 0..l-1 keep their own keys and values; every later layer's come from layer"
        " l's input, so prefill runs only the first l layers on the prompt (the authors: half the layers)",
    )
    key_value_group_size: int = Field(
        1,
        ge=1,
        description="AcrossKV: past l, groups of this many layers share one key/value projection and one"
        " KV cache entry (1: off)",
    )
    model: str | None = Field(None, description="the model transformed; default: teacher.model")


class CausalLMStudent(Strict):
    from_teacher: FromTeacher | None = Field(None, description="a shallower copy of the teacher")
    model: str | None = Field(None, description="a separate pretrained causal LM with the teacher's tokenizer")
    swiftkv: SwiftKV | None = Field(
        None, description="the teacher in SwiftKV form: only its new key/value projections train (SwiftKV)"
    )
    prune: WidthPrune | None = Field(
        None, description="then prune heads, MLP and hidden channels by activation magnitude (Minitron)"
    )
    sparsity: Sparsity | None = Field(
        None, description="then zero the smallest weights of every decoder layer, and keep them zero (fixed mask)"
    )
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> CausalLMStudent:
        if sum(x is not None for x in (self.from_teacher, self.model, self.swiftkv)) != 1:
            raise ValueError(
                "student: give exactly one of from_teacher: {num_layers: N}, model: REF or swiftkv:"
                " {num_key_value_layers: L}"
            )
        if self.swiftkv is not None and (self.prune is not None or self.sparsity is not None):
            raise ValueError(
                "student.swiftkv: trains only new projections of the unchanged teacher; remove prune and sparsity"
            )
        return self


#: how the teacher writes the training responses unless the recipe's ``generation`` section says otherwise
#: (the report's sample generations and the evaluation's answers are as long)
ANSWER_SAMPLING = Sampling(max_new_tokens=64, temperature=1.0, top_p=1.0)


class StepByStep(Strict):
    """Distilling step-by-step: the teacher writes a rationale and an answer; the student learns both tasks."""

    instruction: str = Field(
        "{prompt}\nExplain your reasoning in one or two sentences, then give the final answer"
        " on a last line that starts with 'Answer:'.",
        description="what the teacher is asked ({prompt} is the example's prompt)",
    )
    label_source: Literal["teacher", "data"] = Field(
        "teacher", description="the answer learned: the teacher's, or the file's response field (ground truth)"
    )
    label_prefix: str = Field("label: ", description="prefix of the answer task's prompt (the only one at inference)")
    rationale_prefix: str = Field("rationale: ", description="prefix of the rationale task's prompt")
    answer_tokens: int = Field(16, ge=1, description="tokens generated when the student answers in evaluation")


class HackingMonitor(Strict):
    """Teacher-hacking monitor: distances to the teacher (proxy) and to a golden model on held-out prompts."""

    golden: str | None = Field(None, description="a stronger model than the teacher, with the same tokenizer")
    golden_data: str | None = Field(
        None, description="or: JSONL of held-out prompts with responses written by a golden model"
    )
    examples: int = Field(32, ge=1, description="held-out examples each evaluation scores (more: less noise)")
    patience: int = Field(3, ge=1, description="evaluations after the golden metric's best before a flag")
    tolerance: float = Field(
        0.03,
        ge=0,
        description="relative change that counts as a real rise or fall; with 32 held-out prompts the golden"
        " metric moves 1-2% between evaluations by chance (benchmarks/README.md, teacher hacking)",
    )

    @model_validator(mode="after")
    def _one_golden(self) -> HackingMonitor:
        if (self.golden is None) == (self.golden_data is None):
            raise ValueError("give exactly one of golden (a model) or golden_data (a JSONL file)")
        return self


def _refuse_moved(data: Any) -> Any:
    """The data modes and the settings that became methods (``data.mode: on_policy``, ``data.on_policy``,
    ``data.mode: teacher_generated``, ...) are refused with the new spelling."""
    if not isinstance(data, dict):
        return data
    if "generation" in data:
        raise ValueError(
            "data.generation moved to the recipe's top-level generation section, which says for every method"
            " which model writes and how; move it there unchanged (generation: {max_new_tokens: 64, ...})"
        )
    if "on_policy" in data or data.get("mode") == "on_policy":
        raise ValueError(
            "data.mode on_policy and data.on_policy moved to the recipe's methods list; write methods:"
            " [{name: on_policy, lambda: 0.5, ...}] with data.on_policy's settings, and remove data.mode on_policy"
            " and data.on_policy"
        )
    if "mode" in data:
        mode = data["mode"]
        if mode in ("teacher_generated", "online_generation"):
            raise ValueError(
                f"data.mode {mode} moved to the recipe's methods list; write methods: [{{name: {mode}}}]"
                " and remove data.mode"
            )
        raise ValueError(
            "data.mode is gone: the file's responses are the default, and a teacher writes them through a method"
            " (methods: [{name: teacher_generated}] or [{name: online_generation}]); remove data.mode"
        )
    return refuse_moved_settings(data, {"step_by_step": "step_by_step", "monitor": "teacher_hacking_monitor"})


def records_layout(data: dict[str, Any]) -> bool:
    """Whether a raw ``data`` section gives prompts (records) rather than plain text to pack."""
    if data.get("format") is not None:
        return data["format"] == "jsonl"
    if data.get("source") is None and data.get("files") is None:
        return False  # data.path: plain text unless format says jsonl
    return "text" not in (data.get("columns") or {})


class CausalLMData(SourceFields):
    """A text file (``path``) or any table (``source``/``files``): plain text packed into blocks, or
    records of prompt and response (``prompt``/``response``, TRL's ``prompt``/``completion``, or
    chat ``messages``, whose last assistant turn is the response)."""

    columns: dict[str, str | list[str]] = Field(
        {},
        description="which column holds each role: text (plain text); or prompt with response or completion;"
        " or messages (chat), e.g. {prompt: question, response: answer}",
    )

    format: Literal["text", "jsonl"] | None = Field(
        None,
        description="text: plain text packed into blocks; jsonl: records with a prompt and a response."
        " Default: text for data.path; for source/files, text when columns maps text, else records",
    )
    path: str | None = Field(
        None, description="a text or JSONL file; a relative path is looked for here, then in KDFORGE_DATA_DIR"
    )
    streaming: bool = Field(
        False,
        description="plain text from source/files read as a stream and tokenized into a file under"
        " KDFORGE_CACHE_DIR (memory stays flat however large the data)",
    )
    max_length: int = Field(128, ge=2, description="tokens per example (text: block length; jsonl: cut there)")
    prompt_field: str = Field("prompt", description="jsonl: the prompt's key")
    response_field: str = Field("response", description="jsonl: the response's key")
    chat_template: bool = Field(True, description="jsonl: render with the tokenizer's chat template when it has one")
    test_fraction: float = Field(0.1, gt=0, lt=1)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    split_seed: int = Field(0, description="jsonl: the shuffle before splitting (text splits are contiguous)")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")
    eval_limit: int | None = Field(None, ge=1, description="use only the first N validation and test examples")
    fidelity_positions: int = Field(256, ge=1, description="counted positions whose logits fidelity compares")
    samples: int = Field(3, ge=0, description="held-out prompts whose generations the report shows side by side")

    _moved = model_validator(mode="before")(_refuse_moved)

    def check_files(self) -> None:
        if self.path is not None:
            from kdforge.data.lm import resolve_data_path

            resolve_data_path(self.path)
        super().check_files()

    @model_validator(mode="after")
    def _consistent(self) -> CausalLMData:
        table = self.source is not None or self.files is not None
        if (self.path is None) == (not table):
            raise ValueError(
                "data: give either path (a text or JSONL file) or source and files (any table: columns text, or"
                " prompt and response, prompt and completion, or messages)"
            )
        if self.format is None:
            self.format = "jsonl" if records_layout(self.model_dump()) else "text"
        if self.streaming and (not table or self.format != "text"):
            raise ValueError("data.streaming: streams plain text from source/files only (columns: {text: ...})")
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError("data.test_fraction + data.validation_fraction must be < 1, leaving data to train on")
        return self

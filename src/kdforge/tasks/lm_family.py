"""The Hugging Face causal-LM model family (a :class:`~kdforge.tasks.parts.ModelFamily`).

:class:`CausalLMFamily` holds what the ``causal_lm`` task does with transformers decoder-only
models: the tokenizer (the teacher's, or with no teacher model the student's) and the checks that
every model of the run reads and writes the same tokens; loading the teacher; building the student
from a subset of the teacher's layers (``from_teacher``, see :mod:`kdforge.models.from_teacher`) or
a separate pretrained model; the adapter to named outputs (aligned with ``labels``: the last position
is dropped); saving and loading plain transformers folders (safetensors + config.json + tokenizer);
the files a cache fingerprint hashes; and the forward timed in tokens/s.
"""

from __future__ import annotations

import copy
import functools
import inspect
import shutil
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdforge.console import make_console
from kdforge.data.generate import pad_token_id, stop_token_ids
from kdforge.distributed import is_main
from kdforge.errors import RecipeError
from kdforge.losses.linear import HeadLogits
from kdforge.models.from_teacher import decoder_layers, evenly_spaced_layers, print_sizes, student_from_teacher
from kdforge.models.hf_causal_lm import load_causal_lm, load_config, load_tokenizer, plain_model, tokenizer_files
from kdforge.models.layer_importance import score_blocks, selection_record
from kdforge.models.refs import resolve_model_ref
from kdforge.models.sparsity import keep_masked, magnitude_masks, sparsity_of
from kdforge.models.store import replace_folder
from kdforge.models.swiftkv import group_leaders, to_swiftkv
from kdforge.models.width_pruning import blank_scores, prune_width, width_scores
from kdforge.outputs import HEAD_LOGITS, ModelOutputs
from kdforge.recipe import Recipe
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig, teacher_members
from kdforge.tasks.parts import SafetensorsFolderFamily

console = make_console(stderr=True)

#: logits one evaluation (or timing) batch may hold: [B, L, V] floats, plus the log-softmax's copy
LOGITS_BUDGET = 2**25


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can compute logits for chosen positions only (transformers' LMs can)."""
    return _forward_takes_logits_to_keep(type(model))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


#: configuration settings that change the logits after the LM head (Gemma 2's soft-capping, Cohere's
#: and Granite's scales): a model with any of them set gets its logits computed whole, never by the head alone
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def head_of(model: nn.Module) -> nn.Linear | None:
    """The model's LM head when its logits are exactly ``head(last hidden state)`` and its forward can skip
    computing them (``logits_to_keep``); None otherwise (the logits are then computed whole)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or not _takes_logits_to_keep(model):
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _AFTER_HEAD):
        return None
    return head


class CausalLMFamily(SafetensorsFolderFamily):
    """Model family: transformers causal LMs sharing one tokenizer.

    ``collate`` is the data source's (a timing batch is collated as training batches are);
    ``largest_token_id`` gives the largest token id of the data (every model's vocabulary must hold
    it). The task sets both once its data source is built.
    """

    throughput_unit = "tokens/s"
    card_library = "kdforge"
    load_hint = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained({folder!r})\n"
        "tokenizer = AutoTokenizer.from_pretrained({folder!r})"
    )

    def __init__(self, recipe: Recipe, student_cfg: Any, data_cfg: Any):
        self.recipe, self.student_cfg, self.data_cfg = recipe, student_cfg, data_cfg
        self._student_template: nn.Module | None = None
        #: student.sparsity's masks (True: kept), by linear layer name
        self._masks: dict[str, torch.Tensor] | None = None
        self.collate: Callable[[list[Any]], dict[str, Any]] | None = None
        self.largest_token_id: Callable[[], int] | None = None
        #: the training split's examples (scoring the teacher's layers for student.from_teacher.select)
        self.calibration_examples: Callable[[], Any] | None = None
        #: how the student was built from the teacher, for the run's training info: ``layer_selection`` (what
        #: student.from_teacher.select scored and kept), ``width_pruning`` (student.prune)
        self.construction: dict[str, Any] = {}

    # ----- the models the recipe names, and the tokenizer ---------------------------------

    def teacher_models(self) -> list[tuple[str, str, bool]]:
        """(reference, recipe field, trust_remote_code) of each local teacher model the recipe names."""
        found = []
        for where, member in teacher_members(self.recipe.teacher):
            if isinstance(member, (OnlineTeacherConfig, CacheTeacherConfig)) and member.model:
                found.append((member.model, f"{where}.model", member.trust_remote_code))
        return found

    def _student_source(self) -> tuple[str, str, bool] | None:
        cfg = self.student_cfg
        if cfg.model:
            return cfg.model, "student.model", cfg.trust_remote_code
        if cfg.from_teacher is not None and cfg.from_teacher.model:
            return cfg.from_teacher.model, "student.from_teacher.model", cfg.trust_remote_code
        if getattr(cfg, "swiftkv", None) is not None and cfg.swiftkv.model:
            return cfg.swiftkv.model, "student.swiftkv.model", cfg.trust_remote_code
        return None

    def _tokenizer_source(self) -> tuple[str, str, bool]:
        sources = [*self.teacher_models(), self._student_source()]
        source = next((s for s in sources if s is not None), None)
        if source is None:
            raise RecipeError(
                "teacher.model: the causal_lm task takes its tokenizer from the teacher's model;"
                " name it (or give student.model, or student.from_teacher.model)"
            )
        return source

    @cached_property
    def tokenizer(self):
        ref, field, trust = self._tokenizer_source()
        tokenizer = load_tokenizer(ref, field=field, trust_remote_code=trust)
        # Logit distillation compares vocabulary entries position by position: every other
        # model of the run must read and write the same tokens.
        others = [*self.teacher_models(), self._student_source()]
        for other in others:
            if other is not None and other[0] != ref:
                self._check_same_vocabulary(tokenizer, field, *other)
        return tokenizer

    def _check_same_vocabulary(self, tokenizer, field: str, ref: str, other_field: str, trust: bool) -> None:
        other = load_tokenizer(ref, field=other_field, trust_remote_code=trust)
        if other.get_vocab() != tokenizer.get_vocab():
            raise RecipeError(
                f"{other_field}: its tokenizer ({len(other):,} tokens) differs from the one of {field}"
                f" ({len(tokenizer):,} tokens); token-level distillation needs the same tokenizer on both sides:"
                " choose models that share it, or use a cross-tokenizer method"
            )

    @cached_property
    def pad_id(self) -> int:
        """The id padded positions carry (:func:`~kdforge.data.generate.pad_token_id`)."""
        return pad_token_id(self.tokenizer)

    def stop_ids(self, model: nn.Module) -> list[int]:
        """The token ids that end an answer ``model`` writes (the tokenizer's and the model's end tokens)."""
        return stop_token_ids(self.tokenizer, model)

    def trust(self, ref: str) -> bool:
        return next((trust for r, _, trust in self.teacher_models() if r == ref), False)

    # ----- teacher and student ------------------------------------------------------------

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        model = load_causal_lm(ref, field=field, trust_remote_code=self.trust(ref))
        self.check_vocab_size(model, field)
        return model

    def check_vocab_size(self, model: nn.Module, field: str) -> None:
        """Every token of the data must have a row in the model's embeddings and logits."""
        size = getattr(model.config, "vocab_size", None)
        assert self.largest_token_id is not None, "the task hands the family its data's largest token id"
        largest = self.largest_token_id()
        if size is not None and largest >= size:
            token = self.tokenizer.convert_ids_to_tokens(largest)
            raise RecipeError(
                f"{field}: the data holds token {largest} ({token!r}) but the model's vocabulary has {size:,} entries;"
                " use the tokenizer the model was trained with, or data without that token"
            )

    def build_student(self) -> nn.Module:
        # The student and the baseline start from the same weights: load or cut them once (a
        # GGUF model takes long to load, and a cache run holds no teacher) and hand out
        # copies. The family keeps one student-sized copy for the run.
        if self._student_template is None:
            if self.student_cfg.model:
                template = self._load_student()
            elif getattr(self.student_cfg, "swiftkv", None) is not None:
                template = self._swiftkv_student()
            else:
                template = self._cut_from_teacher()
            if getattr(self.student_cfg, "prune", None) is not None:
                template = self._pruned(template)
            if getattr(self.student_cfg, "sparsity", None) is not None:
                self._masks = self._sparsified(template)
            self._student_template = template
        student = copy.deepcopy(self._student_template)
        if self._masks is not None:  # the gradient hooks that keep the mask are the copy's own
            keep_masked(student, self._masks)
        return student

    def _sparsified(self, template: nn.Module) -> dict[str, torch.Tensor]:
        """Zero the template's smallest weights (student.sparsity); returns the masks every copy keeps."""
        cfg = self.student_cfg.sparsity
        masks = magnitude_masks(template, cfg.target, cfg.pattern)
        keep_masked(template, masks)
        measured = sparsity_of(template)
        self.construction["sparsity"] = {"target": cfg.target, "pattern": cfg.pattern, **measured}
        if is_main():
            console.print(
                f"student: {measured['overall']:.1%} of its decoder layers' weights zeroed by magnitude"
                f" ({cfg.pattern}), kept zero while it trains",
                highlight=False,
            )
        return masks

    def _load_student(self) -> nn.Module:
        cfg = self.student_cfg
        assert cfg.model is not None
        # fresh: never the object a teacher signal holds, even when both name the same model
        model = load_causal_lm(cfg.model, field="student.model", trust_remote_code=cfg.trust_remote_code, fresh=True)
        model = plain_model(model).to(torch.float32)
        self.check_vocab_size(model, "student.model")
        self._check_logit_width(model)
        return model

    def _teacher_source(self, field: str) -> tuple[str, str, bool]:
        """The model a student is made from: the field's own ``model``, else the teacher's."""
        source = self._student_source()
        if source is None:
            teachers = self.teacher_models()
            if not teachers:
                raise RecipeError(
                    f"{field}: the recipe's teacher has no local model to make the student from; set {field}.model"
                )
            source = teachers[0]
        return source

    def _swiftkv_student(self) -> nn.Module:
        """The teacher in SwiftKV form (:mod:`kdforge.models.swiftkv`); only its new modules train."""
        cfg = self.student_cfg.swiftkv
        ref, field, trust = self._teacher_source("student.swiftkv")
        teacher = load_causal_lm(ref, field=field, trust_remote_code=trust)  # the run's teacher: loaded once
        model = plain_model(teacher)  # a GGUF model's plain copy, else the teacher itself
        model = (copy.deepcopy(model) if model is teacher else model).to(torch.float32)
        total = len(decoder_layers(model, "student.swiftkv")[1])
        model = to_swiftkv(model, cfg.num_key_value_layers, cfg.key_value_group_size, field="student.swiftkv")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kv_layers = len(set(group_leaders(total, cfg.num_key_value_layers, cfg.key_value_group_size).values()))
        self.construction["swiftkv"] = {
            "num_key_value_layers": cfg.num_key_value_layers,
            "key_value_group_size": cfg.key_value_group_size,
            "layers": total,
            "trainable_params": trainable,
            "kv_cache_fraction": (cfg.num_key_value_layers + kv_layers) / total,
            "prefill_layers_fraction": cfg.num_key_value_layers / total,
        }
        if is_main():
            console.print(
                f"student: the teacher in SwiftKV form, layers {cfg.num_key_value_layers}-{total - 1} take their keys"
                f" and values from layer {cfg.num_key_value_layers}'s input (groups of {cfg.key_value_group_size});"
                f" {trainable:,} parameters train, the KV cache holds"
                f" {self.construction['swiftkv']['kv_cache_fraction']:.0%} of the teacher's",
                highlight=False,
            )
        return model.train()

    def _cut_from_teacher(self) -> nn.Module:
        cfg = self.student_cfg
        assert cfg.from_teacher is not None
        ref, field, trust = self._teacher_source("student.from_teacher")
        teacher = load_causal_lm(ref, field=field, trust_remote_code=trust)
        total = len(decoder_layers(teacher, "student.from_teacher")[1])
        layers = cfg.from_teacher.layers
        if layers is None:
            assert cfg.from_teacher.num_layers is not None
            if cfg.from_teacher.num_layers > total:
                raise RecipeError(
                    f"student.from_teacher.num_layers: {cfg.from_teacher.num_layers},"
                    f" but the teacher has {total} layers"
                )
            if cfg.from_teacher.select == "even":
                layers = evenly_spaced_layers(total, cfg.from_teacher.num_layers)
            else:
                layers = self._scored_layers(teacher, cfg.from_teacher)
        student = student_from_teacher(teacher, layers, field="student.from_teacher")
        if is_main():
            print_sizes(teacher, student, layers)
        return student

    def _calibration_batches(self, count: int, field: str) -> list[dict[str, Any]]:
        """The first ``count`` training batches (of training.batch_size examples), collated as training's."""
        assert self.calibration_examples is not None and self.collate is not None, "the task hands them over"
        examples = self.calibration_examples()
        size = self.recipe.training.batch_size
        total = min(len(examples), size * count)
        if total == 0:
            raise RecipeError(f"{field}: the training split is empty; nothing to score the teacher's channels on")
        return [self.collate([examples[i] for i in range(s, min(s + size, total))]) for s in range(0, total, size)]

    def _pruned(self, model: nn.Module) -> nn.Module:
        """``model`` cut to student.prune's widths (Minitron), scored on calibration batches."""
        prune = self.student_cfg.prune
        if any(t.is_meta for t in model.parameters()):  # kdforge plan --from-config: only the shapes matter
            batches, scores = [], blank_scores(model)
        else:
            batches = self._calibration_batches(prune.calibration_batches, "student.prune")
            scores = width_scores(model.eval(), batches)
        pruned = prune_width(model, scores, heads=prune.heads, intermediate=prune.intermediate, hidden=prune.hidden)
        before, after = model.config, pruned.config
        sizes = ("num_attention_heads", "intermediate_size", "hidden_size")
        self.construction["width_pruning"] = {
            **{name: [getattr(before, name), getattr(after, name)] for name in sizes},
            "params": [sum(p.numel() for p in model.parameters()), sum(p.numel() for p in pruned.parameters())],
            "calibration_batches": len(batches),
        }
        if is_main():
            console.print(
                "student: pruned by activation (Minitron) to "
                + ", ".join(f"{n} {getattr(before, n)} -> {getattr(after, n)}" for n in sizes)
                + f"; {self.construction['width_pruning']['params'][1]:,} parameters",
                highlight=False,
            )
        return pruned.to(torch.float32).train()

    def _scored_layers(self, teacher: nn.Module, how) -> list[int]:  # noqa: ANN001 - a FromTeacher
        """The layers ``how.select`` keeps, scored on the first ``how.calibration_batches`` training batches;
        what was scored and chosen is kept for the run's training info (``layer_selection``)."""
        batches = self._calibration_batches(how.calibration_batches, "student.from_teacher.select")
        _, blocks = decoder_layers(teacher, "student.from_teacher")
        device = next(teacher.parameters()).device

        def run(batch: dict[str, Any]) -> None:
            teacher.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))

        scores = score_blocks(blocks, batches, run)  # (seconds: a few batches, forward only)
        layers, self.construction["layer_selection"] = selection_record(scores, how.num_layers, how.select)
        if is_main():
            measure = "block influence" if how.select == "importance" else "angular distance"
            console.print(
                f"student: layers {layers} of the teacher's {len(blocks)} kept by {measure}"
                f" on {scores.tokens:,} tokens",
                highlight=False,
            )
        return layers

    def _check_logit_width(self, student: nn.Module) -> None:
        """A separate student must predict over the teacher's vocabulary size (some models pad it)."""
        teachers = self.teacher_models()
        if not teachers:
            return
        ref, field, trust = teachers[0]
        teacher_size = load_config(ref, field=field, trust_remote_code=trust).vocab_size
        if student.config.vocab_size != teacher_size:
            raise RecipeError(
                f"student.model: predicts {student.config.vocab_size:,} vocabulary entries and {field}"
                f" {teacher_size:,}; their logits cannot be compared, choose models with the same vocabulary size"
            )

    def tokenizer_files(self) -> list[Path]:
        ref, field, _ = self._tokenizer_source()
        return tokenizer_files(resolve_model_ref(ref, field=field))

    # ----- running models -----------------------------------------------------------------

    def eval_batch_size(self, vocab: int) -> int:
        """Sequences per evaluation batch: the recipe's, fewer when their logits would exceed the budget."""
        per_sequence = self.data_cfg.max_length * max(vocab, 1)
        return max(1, min(self.recipe.evaluation.batch_size, LOGITS_BUDGET // per_sequence))

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        device = next(model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        head = head_of(model) if HEAD_LOGITS in fields and "logits" in fields else None
        if head is not None:
            return self._head_outputs(model, batch, fields, head)
        hidden_wanted = bool(fields & {"hidden", "hidden_states"})
        # The output at position j predicts token j + 1: drop the last position, whose target
        # lies beyond the sequence, so outputs line up with labels and loss_mask. Where the
        # model can, the LM head runs on those positions only: the logits come out contiguous
        # (a [:, :-1] view of them would be copied by every loss that flattens it, a [B, L, V]
        # copy per side), and a run that needs no logits computes one position's.
        keep: dict[str, Any] = {}
        if _takes_logits_to_keep(model):
            keep["logits_to_keep"] = torch.arange(input_ids.shape[1] - 1, device=device) if "logits" in fields else 1
        out = model(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=hidden_wanted,
            use_cache=False,
            **keep,
        )
        hidden_states = tuple(h[:, :-1] for h in out.hidden_states) if hidden_wanted else None
        logits = None
        if "logits" in fields:
            logits = out.logits if keep else out.logits[:, :-1]
        return ModelOutputs(
            logits=logits,
            hidden=hidden_states[-1] if hidden_states is not None and "hidden" in fields else None,
            hidden_states=hidden_states if "hidden_states" in fields else None,
        )

    def _head_outputs(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str], head: nn.Linear):
        """The outputs with ``logits`` as :class:`HeadLogits`: the model runs without its LM head (one
        position's logits, which transformers' LMs compute at least), the losses apply the head chunk by chunk."""
        device = next(model.parameters()).device
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        hidden_states = tuple(h[:, :-1] for h in out.hidden_states)
        return ModelOutputs(
            logits=HeadLogits(hidden_states[-1], head.weight, head.bias),
            hidden=hidden_states[-1] if "hidden" in fields else None,
            hidden_states=hidden_states if "hidden_states" in fields else None,
        )

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        assert self.collate is not None, "the task hands the family its data source's collate"
        size = min(batch_size, self.eval_batch_size(len(self.tokenizer)), len(dataset))  # type: ignore[arg-type]
        return self.collate([dataset[i] for i in range(size)])

    def forward_for_speed(self, model: nn.Module):
        """The model's forward pass on the batch (full logits, no KV cache), as inference runs it."""
        model.eval()
        device = next(model.parameters()).device

        def forward(batch: dict[str, Any]) -> torch.Tensor:
            return model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits

        return forward

    # ----- saving -------------------------------------------------------------------------

    @cached_property
    def save_dtype(self) -> torch.dtype:
        """The dtype students are saved in (``output.dtype``): auto is the teacher's 16-bit dtype, else bfloat16."""
        name = self.recipe.output.dtype
        if name == "auto":
            teachers = self.teacher_models()
            config = (
                load_config(teachers[0][0], field=teachers[0][1], trust_remote_code=teachers[0][2])
                if teachers
                else None
            )
            teacher_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
            name = "float16" if teacher_dtype.endswith("float16") and "bfloat" not in teacher_dtype else "bfloat16"
        return getattr(torch, name)

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        """Save ``model`` in :attr:`save_dtype`. A student trains in float32; saving in 16 bits rounds its weights,
        and they are rounded in place too, so what the run evaluates next is exactly what is on disk."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        dtype = self.save_dtype
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != dtype:
                    p.copy_(p.to(dtype))
        saved = copy.deepcopy(plain_model(model)).to(dtype)
        saved.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        replace_folder(tmp, folder)
        return folder

    def load_saved(self, folder: Path) -> nn.Module:
        # the run trains and evaluates in float32: a saved 16-bit student is widened (exactly) to it
        return load_causal_lm(str(folder), field=str(folder), fresh=True).to(torch.float32)

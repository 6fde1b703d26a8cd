"""Causal language modelling: distil a decoder-only LM (transformers) into a smaller one.

Teacher: any causal LM reference (folder, ``.gguf`` file, hub id, ``package:NAME``);
the tokenizer is the teacher's (or, with no teacher model, the student's). Student: a
subset of the teacher's layers (``from_teacher``, see :mod:`kdforge.models.from_teacher`)
or a separate pretrained model with the same tokenizer (``model``).

Data: a text file packed into blocks of ``max_length`` tokens, or JSONL prompt/response
pairs where only the response is learned (:mod:`kdforge.data.lm` describes both and the
batch keys). Outputs, aligned with ``labels`` [B, L-1] (``logits[:, j]`` predicts
``labels[:, j]``): ``logits`` [B, L-1, V]; ``hidden_states`` (as transformers returns
them: the embeddings, then each layer's output; [B, L-1, H] each); ``hidden`` (the last
of them, what the LM head reads). The objective masks every term with ``loss_mask``.

Metrics: perplexity (the primary one, lower is better) and mean NLL per counted token
of the split. Fidelity to the teacher is measured on the first ``fidelity_positions``
counted positions of the split, so it never holds every position's logits.
Saved models are plain transformers folders (safetensors + config.json + tokenizer).
"""

from __future__ import annotations

import copy
import math
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.state import PartialState
from pydantic import Field, model_validator
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from kdforge.data.lm import (
    TokenDataset,
    TokenExample,
    collate_causal,
    packed_text_blocks,
    prompt_response_examples,
    resolve_data_path,
)
from kdforge.errors import RecipeError
from kdforge.models.from_teacher import decoder_layers, evenly_spaced_layers, print_sizes, student_from_teacher
from kdforge.models.hf_causal_lm import load_causal_lm, load_config, load_tokenizer, plain_model, tokenizer_files
from kdforge.models.refs import resolve_model_ref
from kdforge.models.store import replace_folder
from kdforge.outputs import ModelOutputs
from kdforge.recipe import CacheTeacherConfig, EnsembleTeacherConfig, OnlineTeacherConfig, Recipe, Strict
from kdforge.tasks.base import TASKS, Evaluation, Splits, Task

console = Console(stderr=True)

#: logits one evaluation (or timing) batch may hold: [B, L, V] floats, plus the log-softmax's copy
LOGITS_BUDGET = 2**25


class FromTeacher(Strict):
    layers: list[int] | None = Field(None, description="teacher layer indices to keep, increasing (0-based)")
    num_layers: int | None = Field(None, ge=2, description="keep this many, evenly spaced, first and last included")
    model: str | None = Field(None, description="the model whose layers are copied; default: teacher.model")

    @model_validator(mode="after")
    def _one_choice(self) -> FromTeacher:
        if (self.layers is None) == (self.num_layers is None):
            raise ValueError("give exactly one of layers (e.g. [0, 6, 12]) or num_layers")
        return self


class CausalLMStudent(Strict):
    from_teacher: FromTeacher | None = Field(None, description="a shallower copy of the teacher")
    model: str | None = Field(None, description="a separate pretrained causal LM with the teacher's tokenizer")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> CausalLMStudent:
        if (self.from_teacher is None) == (self.model is None):
            raise ValueError("student: give exactly one of from_teacher: {num_layers: N} or model: REF")
        return self


class CausalLMData(Strict):
    format: Literal["text", "jsonl"] = "text"
    path: str = Field(description="the file; a relative path is looked for here, then in KDFORGE_DATA_DIR")
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

    @model_validator(mode="after")
    def _fractions(self) -> CausalLMData:
        if self.test_fraction + self.validation_fraction >= 1:
            raise ValueError("data.test_fraction + data.validation_fraction must be < 1, leaving data to train on")
        return self


@TASKS.register("causal_lm")
class CausalLMTask(Task):
    name = "causal_lm"
    student_schema = CausalLMStudent
    data_schema = CausalLMData
    output_fields = ("logits", "hidden", "hidden_states")
    primary_metric = "perplexity"
    higher_is_better = False
    load_hint = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained({folder!r})\n"
        "tokenizer = AutoTokenizer.from_pretrained({folder!r})"
    )

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self._student_template: nn.Module | None = None

    # ----- models and tokenizer ---------------------------------------------------

    def _teacher_models(self) -> list[tuple[str, str, bool]]:
        """(reference, recipe field, trust_remote_code) of each local teacher model the recipe names."""
        teacher = self.recipe.teacher
        if teacher is None:
            return []
        members = teacher.members if isinstance(teacher, EnsembleTeacherConfig) else [teacher]
        found = []
        for i, member in enumerate(members):
            where = "teacher" if member is teacher else f"teacher.members[{i}]"
            if isinstance(member, (OnlineTeacherConfig, CacheTeacherConfig)) and member.model:
                found.append((member.model, f"{where}.model", member.trust_remote_code))
        return found

    def _student_source(self) -> tuple[str, str, bool] | None:
        cfg = self.student_cfg
        if cfg.model:
            return cfg.model, "student.model", cfg.trust_remote_code
        if cfg.from_teacher is not None and cfg.from_teacher.model:
            return cfg.from_teacher.model, "student.from_teacher.model", cfg.trust_remote_code
        return None

    def _tokenizer_source(self) -> tuple[str, str, bool]:
        sources = [*self._teacher_models(), self._student_source()]
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
        others = [*self._teacher_models(), self._student_source()]
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
        """The id padded positions carry: they are masked everywhere, so any id the model can embed will do.

        Tokens added to a tokenizer after its base vocabulary (a new pad token, a GGUF
        conversion's extra end-of-text token) may lie beyond a model's embedding table.
        """
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None and candidate < tok.vocab_size:
                return int(candidate)
        return 0

    def _trust(self, ref: str) -> bool:
        return next((trust for r, _, trust in self._teacher_models() if r == ref), False)

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        model = load_causal_lm(ref, field=field, trust_remote_code=self._trust(ref))
        self._check_vocab_size(model, field)
        return model

    def _check_vocab_size(self, model: nn.Module, field: str) -> None:
        """Every token of the data must have a row in the model's embeddings and logits."""
        size = getattr(model.config, "vocab_size", None)
        largest = self._largest_token_id
        if size is not None and largest >= size:
            token = self.tokenizer.convert_ids_to_tokens(largest)
            raise RecipeError(
                f"{field}: the data holds token {largest} ({token!r}) but the model's vocabulary has {size:,} entries;"
                " use the tokenizer the model was trained with, or data without that token"
            )

    @cached_property
    def _largest_token_id(self) -> int:
        return max(int(example.input_ids.max()) for example in self._examples)

    def build_student(self) -> nn.Module:
        # The student and the baseline start from the same weights: load or cut them once (a
        # GGUF model takes long to load, and a cache run holds no teacher) and hand out
        # copies. The task keeps one student-sized copy for the run.
        if self._student_template is None:
            self._student_template = self._load_student() if self.student_cfg.model else self._cut_from_teacher()
        return copy.deepcopy(self._student_template)

    def _load_student(self) -> nn.Module:
        cfg = self.student_cfg
        assert cfg.model is not None
        # fresh: never the object a teacher signal holds, even when both name the same model
        model = load_causal_lm(cfg.model, field="student.model", trust_remote_code=cfg.trust_remote_code, fresh=True)
        model = plain_model(model).to(torch.float32)
        self._check_vocab_size(model, "student.model")
        self._check_logit_width(model)
        return model

    def _cut_from_teacher(self) -> nn.Module:
        cfg = self.student_cfg
        assert cfg.from_teacher is not None
        source = self._student_source()
        if source is None:
            teachers = self._teacher_models()
            if not teachers:
                raise RecipeError(
                    "student.from_teacher: the recipe's teacher has no local model to copy layers from;"
                    " set student.from_teacher.model"
                )
            source = teachers[0]
        ref, field, trust = source
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
            layers = evenly_spaced_layers(total, cfg.from_teacher.num_layers)
        student = student_from_teacher(teacher, layers, field="student.from_teacher")
        if PartialState().is_main_process:
            print_sizes(teacher, student, layers)
        return student

    def _check_logit_width(self, student: nn.Module) -> None:
        """A separate student must predict over the teacher's vocabulary size (some models pad it)."""
        teachers = self._teacher_models()
        if not teachers:
            return
        ref, field, trust = teachers[0]
        teacher_size = load_config(ref, field=field, trust_remote_code=trust).vocab_size
        if student.config.vocab_size != teacher_size:
            raise RecipeError(
                f"student.model: predicts {student.config.vocab_size:,} vocabulary entries and {field}"
                f" {teacher_size:,}; their logits cannot be compared, choose models with the same vocabulary size"
            )

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return resolve_model_ref(ref, field=field).weight_files()

    def tokenizer_files(self) -> list[Path]:
        ref, field, _ = self._tokenizer_source()
        return tokenizer_files(resolve_model_ref(ref, field=field))

    # ----- data ---------------------------------------------------------------------

    @cached_property
    def data_path(self) -> Path:
        return resolve_data_path(self.data_cfg.path)

    def data_files(self) -> list[Path]:
        return [self.data_path]

    @cached_property
    def _examples(self) -> list[TokenExample]:
        cfg = self.data_cfg
        if cfg.format == "text":
            return packed_text_blocks(self.data_path, self.tokenizer, cfg.max_length)
        examples, dropped = prompt_response_examples(
            self.data_path,
            self.tokenizer,
            cfg.max_length,
            prompt_field=cfg.prompt_field,
            response_field=cfg.response_field,
            chat_template=cfg.chat_template,
        )
        if not examples:
            raise RecipeError(
                f"data.max_length: every prompt of {cfg.path} fills all {cfg.max_length} tokens, leaving no"
                " response to learn; raise data.max_length"
            )
        if dropped and PartialState().is_main_process:
            console.print(
                f"[yellow]data: {dropped} of {dropped + len(examples)} examples of {cfg.path} left out: their"
                f" prompt fills all {cfg.max_length} tokens (data.max_length), leaving no response to learn"
            )
        return examples

    def splits(self) -> Splits:
        cfg = self.data_cfg
        examples = self._examples
        n = len(examples)
        n_test = max(1, round(n * cfg.test_fraction))
        n_val = max(1, round(n * cfg.validation_fraction)) if cfg.validation_fraction > 0 else 0
        n_train = n - n_test - n_val
        if n_train < 1:
            raise RecipeError(
                f"data.path: {cfg.path} gives {n} examples of up to {cfg.max_length} tokens, too few to split into"
                " training, validation and test sets; give more data or lower data.max_length"
            )
        # Neighbouring blocks of a text share their context: contiguous splits keep the test
        # text unseen. Prompt/response pairs are independent, and files are often sorted.
        if cfg.format == "jsonl":
            order = np.random.default_rng(cfg.split_seed).permutation(n).tolist()
        else:
            order = list(range(n))
        train = order[:n_train][: cfg.train_limit]
        val = order[n_train : n_train + n_val][: cfg.eval_limit]
        test = order[n_train + n_val :][: cfg.eval_limit]

        def subset(indices: list[int]) -> TokenDataset:
            return TokenDataset([examples[i] for i in indices])

        if val:
            return Splits(subset(train), subset(val), subset(test), "validation")
        test_set = subset(test)
        return Splits(subset(train), test_set, test_set, "test")

    def collate(self, items: list[TokenExample]) -> dict[str, Any]:
        return collate_causal(items, self.pad_id)

    def _batch_size(self, vocab: int) -> int:
        """Sequences per evaluation batch: the recipe's, fewer when their logits would exceed the budget."""
        per_sequence = self.data_cfg.max_length * max(vocab, 1)
        return max(1, min(self.recipe.evaluation.batch_size, LOGITS_BUDGET // per_sequence))

    # ----- running models -----------------------------------------------------------

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        device = next(model.parameters()).device
        hidden_wanted = bool(fields & {"hidden", "hidden_states"})
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=hidden_wanted,
            use_cache=False,
        )
        # The output at position j predicts token j + 1: drop the last position, whose target
        # lies beyond the sequence, so outputs line up with labels and loss_mask.
        hidden_states = tuple(h[:, :-1] for h in out.hidden_states) if hidden_wanted else None
        return ModelOutputs(
            logits=out.logits[:, :-1] if "logits" in fields else None,
            hidden=hidden_states[-1] if hidden_states is not None and "hidden" in fields else None,
            hidden_states=hidden_states if "hidden_states" in fields else None,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        model.eval()
        keep = self.data_cfg.fidelity_positions
        size = self._batch_size(model.config.vocab_size)
        total_nll = 0.0
        tokens = 0
        kept: list[torch.Tensor] = []
        kept_rows = 0
        for start in range(0, len(dataset), size):
            batch = self.collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            logits = self.adapter(model, batch, frozenset({"logits"})).logits.float()
            mask = batch["loss_mask"].to(logits.device)
            labels = batch["labels"].to(logits.device).clamp_min(0)
            log_probs = F.log_softmax(logits, dim=-1)
            nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            total_nll += float(nll[mask].double().sum())
            tokens += int(mask.sum())
            if kept_rows < keep:
                rows = logits[mask][: keep - kept_rows].cpu()
                kept.append(rows)
                kept_rows += len(rows)
        if tokens == 0:
            raise RecipeError("data: the evaluated split has no token to score; give more data")
        mean_nll = total_nll / tokens
        metrics = {"perplexity": math.exp(mean_nll), "nll": mean_nll}
        return Evaluation(metrics=metrics, logits=torch.cat(kept))

    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        size = min(batch_size, self._batch_size(len(self.tokenizer)), len(dataset))  # type: ignore[arg-type]
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

    # ----- saving -------------------------------------------------------------------

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        plain_model(model).save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        replace_folder(tmp, folder)
        return folder

    def load_saved(self, folder: Path) -> nn.Module:
        return load_causal_lm(str(folder), field=str(folder), fresh=True)

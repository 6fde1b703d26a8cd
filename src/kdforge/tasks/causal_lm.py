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
import functools
import inspect
import math
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from kdforge.data.generate import sample_continuations, stop_token_ids
from kdforge.data.lm import (
    TokenDataset,
    TokenExample,
    collate_causal,
    encode_pairs,
    packed_text_blocks,
    prompt_token_ids,
    read_pairs,
    resolve_data_path,
    uses_chat_template,
)
from kdforge.distributed import is_main, on_main
from kdforge.errors import RecipeError
from kdforge.losses.logits import cross_entropy, forward_kl
from kdforge.models.from_teacher import decoder_layers, evenly_spaced_layers, print_sizes, student_from_teacher
from kdforge.models.hf_causal_lm import load_causal_lm, load_config, load_tokenizer, plain_model, tokenizer_files
from kdforge.models.refs import resolve_model_ref
from kdforge.models.store import replace_folder
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm, Recipe
from kdforge.settings import cache_dir
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig, teacher_members
from kdforge.signals.fingerprint import files_digest
from kdforge.tasks.base import TASKS, Evaluation, Splits, Task
from kdforge.tasks.lm_config import CausalLMData, CausalLMStudent, HackingMonitor, StepByStep
from kdforge.tasks.lm_generated import (
    EpochResponses,
    ResponseSource,
    ResponseWriter,
    prompt_prefixes,
    split_rationale,
)

console = Console(stderr=True)

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


@TASKS.register("causal_lm")
class CausalLMTask(Task):
    name = "causal_lm"
    capabilities = frozenset({"writes_text"})
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
        #: where the training responses come from (None: the data file's), and the teacher-hacking monitor's
        #: settings with the recipe path that gave them: methods set them (:meth:`use_responses`,
        #: :meth:`monitor_teacher_hacking`) before the task makes its splits
        self._source: ResponseSource | None = None
        self._monitor: HackingMonitor | None = None
        self._monitor_where = "methods"

    # ----- what methods hand the task (capability writes_text) ---------------------------

    def use_responses(self, source: ResponseSource) -> None:
        """Train on responses the teacher writes, as ``source`` says (called before :meth:`splits`)."""
        if self._source is not None and self._source != source:
            raise RecipeError(
                f"{source.where}: {source.name} and {self._source.name} ({self._source.where}) both write the"
                " training responses; list one of them"
            )
        self._source = source

    def monitor_teacher_hacking(self, settings: HackingMonitor, where: str) -> None:
        """Add the monitor's proxy and golden distances to every evaluation of a student."""
        self._monitor, self._monitor_where = settings, where

    @property
    def _teacher_writes(self) -> bool:
        return self._source is not None

    @property
    def _sbs(self) -> StepByStep | None:
        return self._source.step_by_step if self._source is not None else None

    # ----- models and tokenizer ---------------------------------------------------

    def _teacher_models(self) -> list[tuple[str, str, bool]]:
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
        if is_main():
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

    def data_identity(self) -> dict[str, Any]:
        """Where the responses come from, when the teacher writes them (a cache is valid only for the same)."""
        if self._source is None:
            return {}
        sbs = self._source.step_by_step
        return {"responses": {"name": self._source.name, "step_by_step": sbs.model_dump() if sbs else None}}

    def data_files(self) -> list[Path]:
        """The data file, and the stored responses the teacher wrote for it (they are the training data)."""
        files = [self.data_path]
        if self.data_cfg.format == "jsonl" and self._teacher_writes:
            self._jsonl_splits  # noqa: B018 (writes the responses when they are not stored yet)
            train, val, test = self._record_splits
            purpose, instruction = self._written_data
            prompt_ids = self._teacher_prompt_ids([*train, *val, *test], instruction)
            files.append(self._writer.store(prompt_ids, purpose).path)
        return files

    @cached_property
    def _largest_token_id(self) -> int:
        if self.data_cfg.format == "text":
            return max(int(example.input_ids.max()) for example in self._text_blocks)
        # the prompts, and the file's responses; what the teacher writes comes from its own vocabulary
        ids = [max(p) for p in self._prompt_ids if p]
        if not self._teacher_writes:
            ids.extend(int(e.input_ids.max()) for examples in self._jsonl_splits for e in examples)
        return max(ids)

    @cached_property
    def _text_blocks(self) -> list[TokenExample]:
        return packed_text_blocks(self.data_path, self.tokenizer, self.data_cfg.max_length)

    @cached_property
    def _records(self) -> list[tuple[str, str | None]]:
        cfg = self.data_cfg
        sbs = self._sbs
        need_response = not self._teacher_writes or (sbs is not None and sbs.label_source == "data")
        records = read_pairs(self.data_path, cfg.prompt_field, cfg.response_field, need_response=need_response)
        if not records:
            raise RecipeError(f"data.path: {self.data_path} holds no JSON lines")
        return records

    def _task_prompt(self, prompt: str, kind: str | None) -> str:
        sbs = self._sbs
        if sbs is None or kind is None:
            return prompt
        return (sbs.label_prefix if kind == "label" else sbs.rationale_prefix) + prompt

    @cached_property
    def _prompt_ids(self) -> list[list[int]]:
        """Each record's prompt as the student reads it (step-by-step: its label task's prompt)."""
        kind = "label" if self._sbs is not None else None
        prompts = [self._task_prompt(p, kind) for p, _ in self._records]
        return prompt_token_ids(self.tokenizer, prompts, chat_template=self.data_cfg.chat_template)

    def _split_order(self, n: int, shuffle: bool) -> tuple[list[int], list[int], list[int]]:
        cfg = self.data_cfg
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
        order = np.random.default_rng(cfg.split_seed).permutation(n).tolist() if shuffle else list(range(n))
        train = order[:n_train][: cfg.train_limit]
        val = order[n_train : n_train + n_val][: cfg.eval_limit]
        test = order[n_train + n_val :][: cfg.eval_limit]
        return train, val, test

    @cached_property
    def _record_splits(self) -> tuple[list[int], list[int], list[int]]:
        """Record indices of each split, over the records whose prompt leaves room for a response."""
        cfg = self.data_cfg
        fits = [i for i, ids in enumerate(self._prompt_ids) if len(ids) < cfg.max_length]
        dropped = len(self._records) - len(fits)
        if not fits:
            raise RecipeError(
                f"data.max_length: every prompt of {cfg.path} fills all {cfg.max_length} tokens, leaving no"
                " response to learn; raise data.max_length"
            )
        if dropped and is_main():
            console.print(
                f"[yellow]data: {dropped} of {len(self._records)} examples of {cfg.path} left out: their"
                f" prompt fills all {cfg.max_length} tokens (data.max_length), leaving no response to learn"
            )
        train, val, test = self._split_order(len(fits), shuffle=True)
        return [fits[i] for i in train], [fits[i] for i in val], [fits[i] for i in test]

    def _encode(self, pairs: list[tuple[str, str]], kind: str | None = None) -> list[TokenExample]:
        cfg = self.data_cfg
        pairs = [(self._task_prompt(p, kind), r) for p, r in pairs]
        encoded = encode_pairs(self.tokenizer, pairs, cfg.max_length, chat_template=cfg.chat_template, kind=kind)
        return [e for e in encoded if e is not None]

    # ----- responses the teacher writes -----------------------------------------------

    def _writer_source(self) -> tuple[str, str, bool]:
        gen = self.data_cfg.generation
        if gen.model:
            return gen.model, "data.generation.model", self._trust(gen.model)
        teachers = self._teacher_models()
        if not teachers:
            raise RecipeError(
                f"data.generation.model: {self._source.name if self._source else 'the task'} needs a model to write"
                " the training responses; name the teacher's model (teacher.model) or data.generation.model"
            )
        return teachers[0]

    @cached_property
    def _writer(self) -> ResponseWriter:
        ref, field, trust = self._writer_source()
        gen = self.data_cfg.generation
        weights = resolve_model_ref(ref, field=field).weight_files()
        identity = {
            "model": files_digest(weights) if weights else ref,
            "tokenizer": files_digest(self.tokenizer_files()),
        }
        return ResponseWriter(
            lambda: load_causal_lm(ref, field=field, trust_remote_code=trust),
            self.tokenizer,
            gen,
            identity=identity,
            store_folder=Path(gen.store).expanduser() if gen.store else cache_dir() / "generations",
            pad_id=self.pad_id,
            stop_ids=lambda model: stop_token_ids(self.tokenizer, model),
            max_length=self.data_cfg.max_length,
            strip=uses_chat_template(self.tokenizer, self.data_cfg.chat_template),
        )

    @property
    def _written_data(self) -> tuple[str, str | None]:
        """(purpose, instruction) of the teacher's answers that make the data of every split."""
        sbs = self._sbs
        return ("step_by_step", sbs.instruction) if sbs is not None else ("responses", None)

    def _teacher_prompt_ids(self, indices: list[int], instruction: str | None = None) -> list[list[int]]:
        prompts = [self._records[i][0] for i in indices]
        if instruction is not None:
            prompts = [instruction.replace("{prompt}", p) for p in prompts]
        return prompt_token_ids(self.tokenizer, prompts, chat_template=self.data_cfg.chat_template)

    def _teacher_texts(self, indices: list[int], purpose: str, description: str, instruction: str | None = None):
        prompt_ids = self._teacher_prompt_ids(indices, instruction)
        # the main process writes (or reads) the store and every process gets its texts: one writer,
        # and the store need not be on storage that every machine sees
        return on_main(lambda: self._writer.responses(prompt_ids, purpose=purpose, description=description))

    def _generated_responses(self, indices: list[int], epoch: int) -> dict[int, str]:
        purpose = self._written_data[0] if epoch == 0 else f"epoch-{epoch}"
        description = "teacher writes responses" + (f" (epoch {epoch})" if epoch else "")
        return dict(zip(indices, self._teacher_texts(indices, purpose, description)))

    def _generated_examples(self, indices: list[int], epoch: int) -> list[TokenExample]:
        responses = self._generated_responses(indices, epoch)
        return self._encode([(self._records[i][0], responses[i]) for i in indices])

    @cached_property
    def _step_by_step(self) -> tuple[list[TokenExample], list[TokenExample], list[TokenExample], dict[str, int]]:
        """Training (both tasks), validation and test examples (label task), and how many answers were usable."""
        sbs = self._sbs
        assert sbs is not None
        train, val, test = self._record_splits
        used = [*train, *val, *test]
        purpose, instruction = self._written_data
        texts = self._teacher_texts(used, purpose, "teacher writes rationales", instruction=instruction)
        parsed = dict(zip(used, (split_rationale(t) for t in texts)))
        missing = 0

        def label(i: int) -> str | None:
            return self._records[i][1] if sbs.label_source == "data" else parsed[i][1]

        def usable(i: int) -> bool:
            nonlocal missing
            ok = bool(parsed[i][0]) and label(i) is not None
            missing += not ok
            return ok

        train_ok = [i for i in train if usable(i)]
        val_ok, test_ok = [i for i in val if usable(i)], [i for i in test if usable(i)]
        if missing and is_main():
            console.print(
                f"[yellow]{self._source.where} (step_by_step): {missing} of {len(used)} teacher responses gave no"
                " rationale or no 'Answer:' line and are left out"
            )
        if not train_ok or not test_ok:
            raise RecipeError(
                f"{self._source.where}.instruction: too few teacher responses have a rationale and an 'Answer:' line;"
                " reword the instruction, use label_source: data, or a stronger teacher"
            )
        counts = {"written": len(used), "usable": len(used) - missing}
        train_examples = self._encode([(self._records[i][0], label(i)) for i in train_ok], "label")
        train_examples += self._encode([(self._records[i][0], parsed[i][0]) for i in train_ok], "rationale")

        def labels_only(indices: list[int]) -> list[TokenExample]:
            return self._encode([(self._records[i][0], label(i)) for i in indices], "label")

        return train_examples, labels_only(val_ok), labels_only(test_ok), counts

    @cached_property
    def _jsonl_splits(self) -> tuple[list[TokenExample], list[TokenExample], list[TokenExample]]:
        train, val, test = self._record_splits
        if self._sbs is not None:
            return self._step_by_step[:3]
        # the teacher answers every prompt used, in one store; the file's responses otherwise
        responses = (
            self._generated_responses([*train, *val, *test], epoch=0)
            if self._teacher_writes
            else {i: r for i, (_, r) in enumerate(self._records)}
        )

        def pairs(indices: list[int]) -> list[tuple[str, str]]:
            return [(self._records[i][0], responses[i]) for i in indices]  # type: ignore[misc]

        return self._encode(pairs(train)), self._encode(pairs(val)), self._encode(pairs(test))

    def splits(self) -> Splits:
        if self.data_cfg.format == "text":
            blocks = self._text_blocks
            train, val, test = self._split_order(len(blocks), shuffle=False)
            train_set = TokenDataset([blocks[i] for i in train])
            val_set = TokenDataset([blocks[i] for i in val])
            test_set = TokenDataset([blocks[i] for i in test])
        else:
            train_examples, val_examples, test_examples = self._jsonl_splits
            train_set = TokenDataset(train_examples)
            if self._source is not None and self._source.fresh_each_epoch:
                indices = self._record_splits[0]
                first = train_examples

                def examples_for(epoch: int) -> list[TokenExample]:
                    return first if epoch == 0 else self._generated_examples(indices, epoch)

                train_set = EpochResponses(examples_for)
            val_set, test_set = TokenDataset(val_examples), TokenDataset(test_examples)
        if len(val_set):
            return Splits(train_set, val_set, test_set, "validation")
        return Splits(train_set, test_set, test_set, "test")

    def baseline_objective(self) -> list[ObjectiveTerm]:
        """Labels only; for step-by-step, the answers only (standard fine-tuning, no rationales)."""
        mask = "label_mask" if self._sbs is not None else "loss_mask"
        return [ObjectiveTerm(loss="cross_entropy", field="logits", weight=1.0, mask=mask)]

    # ----- text the student writes (capability writes_text: the on_policy method) -------------
    # A method that has the student answer the batch's prompts collates its answers as this
    # task does: the tokenizer (``tokenizer``), the id of padded positions (``pad_id``), the
    # ids that end an answer (``stop_ids``), the longest sequence (``max_length``) and the
    # batch's masks (``kinds``); ``collate`` of TokenExamples gives the batch layout.

    def stop_ids(self, model: nn.Module) -> list[int]:
        """The token ids that end an answer ``model`` writes (the tokenizer's and the model's end tokens)."""
        return stop_token_ids(self.tokenizer, model)

    @property
    def max_length(self) -> int:
        """Tokens per example, prompt and answer together (``data.max_length``)."""
        return self.data_cfg.max_length

    def training_info(self, steps: int) -> dict[str, Any]:
        source = self._source
        info: dict[str, Any] = {"data_mode": (source.data_mode or source.name) if source is not None else "offline"}
        if self._sbs is not None:
            info["step_by_step"] = self._step_by_step[3]
        return info

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("label", "rationale") if self._sbs is not None else ()

    def collate(self, items: list[TokenExample]) -> dict[str, Any]:
        return collate_causal(items, self.pad_id, self.kinds)

    def _batch_size(self, vocab: int) -> int:
        """Sequences per evaluation batch: the recipe's, fewer when their logits would exceed the budget."""
        per_sequence = self.data_cfg.max_length * max(vocab, 1)
        return max(1, min(self.recipe.evaluation.batch_size, LOGITS_BUDGET // per_sequence))

    # ----- running models -----------------------------------------------------------

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        device = next(model.parameters()).device
        hidden_wanted = bool(fields & {"hidden", "hidden_states"})
        input_ids = batch["input_ids"].to(device)
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

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        model.eval()
        keep = self.data_cfg.fidelity_positions
        total_nll = 0.0
        tokens = 0
        kept: list[torch.Tensor] = []
        kept_rows = 0
        for batch in self._eval_batches(model, dataset):
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
        if self._sbs is not None:
            metrics["answer_accuracy"] = self._answer_accuracy(model, dataset)
        if self._monitor is not None and model not in self._monitor_references():
            metrics.update(self._monitor_metrics(model, dataset))
        return Evaluation(metrics=metrics, logits=torch.cat(kept))

    def _eval_batches(self, model: nn.Module, dataset: Dataset, limit: int | None = None):
        size = self._batch_size(model.config.vocab_size)
        count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
        for start in range(0, count, size):
            yield self.collate([dataset[i] for i in range(start, min(start + size, count))])

    # ----- generation in evaluation: answers, samples, the teacher-hacking monitor -----

    def _greedy(self, model: nn.Module, batch: dict[str, Any], max_new_tokens: int) -> tuple[list[str], list[str]]:
        """(prompt text, greedy answer text) of each row: the model answers the row's prompt."""
        prompts = prompt_prefixes(batch)
        continuations = sample_continuations(
            model,
            prompts,
            pad_id=self.pad_id,
            stop_ids=stop_token_ids(self.tokenizer, model),
            max_new_tokens=max_new_tokens,
            temperature=0.0,
        )
        decode = self.tokenizer.batch_decode
        return decode(prompts, skip_special_tokens=True), decode(continuations, skip_special_tokens=True)

    def _references(self, batch: dict[str, Any]) -> list[str]:
        """The learned tokens of each row (its response), as text."""
        rows = [ids[mask].tolist() for ids, mask in zip(batch["labels"], batch["loss_mask"])]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _answer_accuracy(self, model: nn.Module, dataset: Dataset) -> float:
        """Step-by-step: the share of label prompts the model answers exactly (spaces and case ignored)."""
        sbs = self._sbs
        assert sbs is not None
        right = total = 0
        for batch in self._eval_batches(model, dataset):
            _, answers = self._greedy(model, batch, sbs.answer_tokens)
            for answer, reference in zip(answers, self._references(batch)):
                right += " ".join(answer.split()).lower() == " ".join(reference.split()).lower()
                total += 1
        return right / max(total, 1)

    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, str]] | None:
        count = min(self.data_cfg.samples, len(dataset))  # type: ignore[arg-type]
        if self.data_cfg.format == "text" or count == 0:
            return None
        items = [dataset[i] for i in range(count)]
        batch = self.collate(items)
        rows = [{"reference": r} for r in self._references(batch)]
        for role, model in models.items():
            prompts, answers = self._greedy(model, batch, self.data_cfg.generation.max_new_tokens)
            for row, item, prompt, answer in zip(rows, items, prompts, answers):
                row["prompt"] = item.prompt if item.prompt is not None else prompt.strip()
                row[role] = answer.strip()
        return rows

    def _monitor_references(self) -> list[nn.Module]:
        """The models the monitor compares against (the teacher, the golden model); they are not monitored."""
        return [m for m in (self._proxy_teacher, self._golden) if m is not None]

    @cached_property
    def _proxy_teacher(self) -> nn.Module | None:
        if self._monitor is None:
            return None
        teachers = self._teacher_models()
        if not teachers:
            raise RecipeError(
                f"{self._monitor_where}: the monitor compares the student with the teacher's model; name teacher.model"
            )
        ref, field, _ = teachers[0]
        return self.load_teacher(ref, field)

    @cached_property
    def _golden(self) -> nn.Module | None:
        monitor = self._monitor
        if monitor is None or monitor.golden is None:
            return None
        field = f"{self._monitor_where}.golden"
        model = load_causal_lm(monitor.golden, field=field)
        self._check_vocab_size(model, field)
        return model

    @cached_property
    def _golden_examples(self) -> TokenDataset | None:
        monitor = self._monitor
        if monitor is None or monitor.golden_data is None:
            return None
        field = f"{self._monitor_where}.golden_data"
        path = resolve_data_path(monitor.golden_data, field=field)
        pairs = read_pairs(path, self.data_cfg.prompt_field, self.data_cfg.response_field, field)
        examples = self._encode(pairs[: monitor.examples])  # type: ignore[arg-type]
        if not examples:
            raise RecipeError(f"{field}: {path} holds no example that fits data.max_length")
        return TokenDataset(examples)

    def _token_mean(self, model: nn.Module, dataset: Dataset, value, limit: int | None = None) -> float:
        """Mean over the learned tokens of ``value(model_logits, batch)`` (a per-batch token mean), batch-weighted."""
        total, count = 0.0, 0
        for batch in self._eval_batches(model, dataset, limit):
            tokens = int(batch["loss_mask"].sum())
            total += float(value(self.adapter(model, batch, frozenset({"logits"})).logits, batch)) * tokens
            count += tokens
        return total / max(count, 1)

    def _mean_kl(self, reference: nn.Module, model: nn.Module, dataset: Dataset, limit: int) -> float:
        """KL(reference || model) per learned token, full vocabulary (the loss library's forward_kl at T = 1)."""

        def kl(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
            target = self.adapter(reference, batch, frozenset({"logits"})).logits
            return forward_kl(logits, target.to(logits.device), mask=batch["loss_mask"].to(logits.device))

        return self._token_mean(model, dataset, kl, limit)

    def _monitor_metrics(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Proxy (to the teacher) and golden (to the golden model, or NLL of golden-written answers) distances."""
        monitor = self._monitor
        assert monitor is not None
        teacher = self._proxy_teacher
        assert teacher is not None
        metrics = {"proxy_kl": self._mean_kl(teacher, model, dataset, monitor.examples)}
        if self._golden is not None:
            metrics["golden_kl"] = self._mean_kl(self._golden, model, dataset, monitor.examples)
        else:
            golden_set = self._golden_examples
            assert golden_set is not None

            def nll(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
                return cross_entropy(logits, batch["labels"].to(logits.device))

            metrics["golden_nll"] = self._token_mean(model, golden_set, nll)
        return metrics

    throughput_unit = "tokens/s"

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

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

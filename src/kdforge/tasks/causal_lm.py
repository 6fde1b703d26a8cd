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

Parts: the causal-LM family (:class:`~kdforge.tasks.lm_family.CausalLMFamily`), the LM data
source (:class:`~kdforge.tasks.lm_data.LMData`), the LM evaluator
(:class:`~kdforge.tasks.lm_eval.LMEvaluator`). The capability ``writes_text`` is theirs: the
task hands it on.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset

from kdforge.errors import RecipeError
from kdforge.recipe import ObjectiveTerm
from kdforge.tasks.base import TASKS
from kdforge.tasks.lm_config import CausalLMData, CausalLMStudent, HackingMonitor
from kdforge.tasks.lm_data import LMData
from kdforge.tasks.lm_eval import LMEvaluator
from kdforge.tasks.lm_family import LOGITS_BUDGET, CausalLMFamily
from kdforge.tasks.lm_generated import ResponseSource
from kdforge.tasks.parts import ComposedTask

__all__ = ["LOGITS_BUDGET", "CausalLMTask"]


@TASKS.register("causal_lm")
class CausalLMTask(ComposedTask):
    name = "causal_lm"
    capabilities = frozenset({"writes_text"})
    saves_dtype = True
    student_schema = CausalLMStudent
    data_schema = CausalLMData
    output_fields = ("logits", "hidden", "hidden_states")
    parts = (CausalLMFamily, LMData, LMEvaluator)

    family: CausalLMFamily
    data: LMData
    evaluator: LMEvaluator

    def build_parts(self):
        family = CausalLMFamily(self.recipe, self.student_cfg, self.data_cfg)
        data = LMData(self.data_cfg, family)
        # every model's vocabulary must hold the data's tokens; a timing batch is collated as training's
        family.largest_token_id = lambda: data.largest_token_id
        family.collate = data.collate
        family.calibration_examples = lambda: data.splits().train
        return family, data, LMEvaluator(self.data_cfg, family, data)

    @classmethod
    def check_sections(cls, recipe, data_cfg) -> None:  # noqa: ANN001
        student = recipe.student if isinstance(recipe.student, dict) else {}
        if student.get("sparsity") is not None and recipe.training.sharding == "fsdp":
            raise RecipeError(
                "student.sparsity: the fixed mask is kept by gradient hooks on the whole weights, which sharding"
                " replaces; use training.sharding: none"
            )
        if student.get("swiftkv") is not None and recipe.training.sharding == "fsdp":
            raise RecipeError(
                "student.swiftkv: its layers share one layer's input through hooks, which sharding does not carry;"
                " use training.sharding: none (only the new projections train, the optimizer state is small)"
            )

    def baseline_objective(self) -> list[ObjectiveTerm]:
        """Labels only; for step-by-step, the answers only (standard fine-tuning, no rationales)."""
        mask = "label_mask" if self.data.sbs is not None else "loss_mask"
        return [ObjectiveTerm(loss="cross_entropy", field="logits", weight=1.0, mask=mask)]

    def data_identity(self) -> dict[str, Any]:
        return self.data.data_identity()

    # ----- capability writes_text -----------------------------------------------------------
    # A method that has the student answer the batch's prompts (on_policy) collates its answers as
    # this task does: the tokenizer (``tokenizer``), the id of padded positions (``pad_id``), the ids
    # that end an answer (``stop_ids``), the longest sequence (``max_length``) and the batch's masks
    # (``kinds``); ``collate`` of TokenExamples gives the batch layout. Methods that have the teacher
    # write the data hand the data source a response source (``use_responses``); the monitor hands
    # the evaluator its settings (``monitor_teacher_hacking``).

    @property
    def tokenizer(self):
        return self.family.tokenizer

    @property
    def pad_id(self) -> int:
        return self.family.pad_id

    def stop_ids(self, model: nn.Module) -> list[int]:
        return self.family.stop_ids(model)

    @property
    def max_length(self) -> int:
        """Tokens per example, prompt and answer together (``data.max_length``)."""
        return self.data_cfg.max_length

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.data.kinds

    def use_responses(self, source: ResponseSource) -> None:
        """Train on responses the teacher writes, as ``source`` says (called before :meth:`splits`)."""
        self.data.use_responses(source)

    def monitor_teacher_hacking(self, settings: HackingMonitor, where: str) -> None:
        """Add the monitor's proxy and golden distances to every evaluation of a student."""
        self.evaluator.monitor_teacher_hacking(settings, where)

    # ----- what tests read: the evaluator's references and answer accuracy -------------------

    def _references(self, batch: dict[str, Any]) -> list[str]:
        return self.evaluator.references(batch)

    def _answer_accuracy(self, model: nn.Module, dataset: Dataset) -> float:
        return self.evaluator.answer_accuracy(model, dataset)

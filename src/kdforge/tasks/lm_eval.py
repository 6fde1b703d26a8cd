"""The causal-LM evaluator (a :class:`~kdforge.tasks.parts.Evaluator`).

:class:`LMEvaluator` measures perplexity (the primary metric, lower is better) and mean NLL per
counted token of the split. Fidelity to the teacher is measured on the first
``fidelity_positions`` counted positions of the split, so it never holds every position's logits.
Step-by-step runs add the share of label prompts answered exactly (``answer_accuracy``); with the
teacher-hacking monitor set (:meth:`LMEvaluator.monitor_teacher_hacking`) every evaluation of a
student adds its proxy (KL to the teacher) and golden (KL to a golden model, or NLL of golden-written
answers) distances. Sample generations put each model's greedy answer next to the reference.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from kdforge.data.generate import sample_continuations, stop_token_ids
from kdforge.data.lm import TokenDataset, read_pairs, resolve_data_path
from kdforge.errors import RecipeError
from kdforge.losses.logits import cross_entropy, forward_kl
from kdforge.models.hf_causal_lm import load_causal_lm
from kdforge.tasks.base import Evaluation
from kdforge.tasks.lm_config import ANSWER_SAMPLING, HackingMonitor
from kdforge.tasks.lm_data import LMData
from kdforge.tasks.lm_family import CausalLMFamily
from kdforge.tasks.lm_generated import prompt_prefixes


class LMEvaluator:
    """Evaluator: perplexity and NLL, fidelity logits, answer accuracy, the monitor's distances, samples."""

    primary_metric = "perplexity"
    higher_is_better = False

    def __init__(self, data_cfg: Any, family: CausalLMFamily, data: LMData):
        self.data_cfg, self.family, self.data = data_cfg, family, data
        #: the teacher-hacking monitor's settings with the recipe path that gave them (a method sets them)
        self.monitor: HackingMonitor | None = None
        self.monitor_where = "methods"

    def monitor_teacher_hacking(self, settings: HackingMonitor, where: str) -> None:
        """Add the monitor's proxy and golden distances to every evaluation of a student."""
        self.monitor, self.monitor_where = settings, where

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        model.eval()
        keep = self.data_cfg.fidelity_positions
        total_nll = 0.0
        tokens = 0
        kept: list[torch.Tensor] = []
        kept_rows = 0
        for batch in self._eval_batches(model, dataset):
            logits = self.family.adapter(model, batch, frozenset({"logits"})).logits.float()
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
        if self.data.sbs is not None:
            metrics["answer_accuracy"] = self.answer_accuracy(model, dataset)
        if self.monitor is not None and model not in self._monitor_references():
            metrics.update(self._monitor_metrics(model, dataset))
        return Evaluation(metrics=metrics, logits=torch.cat(kept))

    def _eval_batches(self, model: nn.Module, dataset: Dataset, limit: int | None = None):
        size = self.family.eval_batch_size(model.config.vocab_size)
        count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
        for start in range(0, count, size):
            yield self.data.collate([dataset[i] for i in range(start, min(start + size, count))])

    # ----- generation in evaluation: answers, samples -------------------------------------

    def _greedy(self, model: nn.Module, batch: dict[str, Any], max_new_tokens: int) -> tuple[list[str], list[str]]:
        """(prompt text, greedy answer text) of each row: the model answers the row's prompt."""
        tokenizer = self.family.tokenizer
        prompts = prompt_prefixes(batch)
        continuations = sample_continuations(
            model,
            prompts,
            pad_id=self.family.pad_id,
            stop_ids=stop_token_ids(tokenizer, model),
            max_new_tokens=max_new_tokens,
            temperature=0.0,
        )
        decode = tokenizer.batch_decode
        return decode(prompts, skip_special_tokens=True), decode(continuations, skip_special_tokens=True)

    def references(self, batch: dict[str, Any]) -> list[str]:
        """The learned tokens of each row (its response), as text."""
        rows = [ids[mask].tolist() for ids, mask in zip(batch["labels"], batch["loss_mask"])]
        return self.family.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def answer_accuracy(self, model: nn.Module, dataset: Dataset) -> float:
        """Step-by-step: the share of label prompts the model answers exactly (spaces and case ignored)."""
        sbs = self.data.sbs
        assert sbs is not None
        right = total = 0
        for batch in self._eval_batches(model, dataset):
            _, answers = self._greedy(model, batch, sbs.answer_tokens)
            for answer, reference in zip(answers, self.references(batch)):
                right += " ".join(answer.split()).lower() == " ".join(reference.split()).lower()
                total += 1
        return right / max(total, 1)

    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, str]] | None:
        count = min(self.data_cfg.samples, len(dataset))  # type: ignore[arg-type]
        if self.data_cfg.format == "text" or count == 0:
            return None
        items = [dataset[i] for i in range(count)]
        batch = self.data.collate(items)
        rows = [{"reference": r} for r in self.references(batch)]
        for role, model in models.items():
            prompts, answers = self._greedy(
                model, batch, ANSWER_SAMPLING.over(self.family.recipe.generation).max_new_tokens
            )
            for row, item, prompt, answer in zip(rows, items, prompts, answers):
                row["prompt"] = item.prompt if item.prompt is not None else prompt.strip()
                row[role] = answer.strip()
        return rows

    # ----- the teacher-hacking monitor ----------------------------------------------------

    def _monitor_references(self) -> list[nn.Module]:
        """The models the monitor compares against (the teacher, the golden model); they are not monitored."""
        return [m for m in (self._proxy_teacher, self._golden) if m is not None]

    @cached_property
    def _proxy_teacher(self) -> nn.Module | None:
        if self.monitor is None:
            return None
        teachers = self.family.teacher_models()
        if not teachers:
            raise RecipeError(
                f"{self.monitor_where}: the monitor compares the student with the teacher's model; name teacher.model"
            )
        ref, field, _ = teachers[0]
        return self.family.load_teacher(ref, field)

    @cached_property
    def _golden(self) -> nn.Module | None:
        monitor = self.monitor
        if monitor is None or monitor.golden is None:
            return None
        field = f"{self.monitor_where}.golden"
        model = load_causal_lm(monitor.golden, field=field)
        self.family.check_vocab_size(model, field)
        return model

    @cached_property
    def _golden_examples(self) -> TokenDataset | None:
        monitor = self.monitor
        if monitor is None or monitor.golden_data is None:
            return None
        field = f"{self.monitor_where}.golden_data"
        path = resolve_data_path(monitor.golden_data, field=field)
        pairs = read_pairs(path, self.data_cfg.prompt_field, self.data_cfg.response_field, field)
        examples = self.data.encode(pairs[: monitor.examples])  # type: ignore[arg-type]
        if not examples:
            raise RecipeError(f"{field}: {path} holds no example that fits data.max_length")
        return TokenDataset(examples)

    def _token_mean(self, model: nn.Module, dataset: Dataset, value, limit: int | None = None) -> float:
        """Mean over the learned tokens of ``value(model_logits, batch)`` (a per-batch token mean), batch-weighted."""
        total, count = 0.0, 0
        for batch in self._eval_batches(model, dataset, limit):
            tokens = int(batch["loss_mask"].sum())
            total += float(value(self.family.adapter(model, batch, frozenset({"logits"})).logits, batch)) * tokens
            count += tokens
        return total / max(count, 1)

    def _mean_kl(self, reference: nn.Module, model: nn.Module, dataset: Dataset, limit: int) -> float:
        """KL(reference || model) per learned token, full vocabulary (the loss library's forward_kl at T = 1)."""

        def kl(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
            target = self.family.adapter(reference, batch, frozenset({"logits"})).logits
            return forward_kl(logits, target.to(logits.device), mask=batch["loss_mask"].to(logits.device))

        return self._token_mean(model, dataset, kl, limit)

    def _monitor_metrics(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Proxy (to the teacher) and golden (to the golden model, or NLL of golden-written answers) distances."""
        monitor = self.monitor
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

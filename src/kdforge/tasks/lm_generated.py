"""Responses written by a model during a causal-LM run: teacher answers, step-by-step rationales, prompts.

The causal-LM task and the methods that write text (:mod:`kdforge.methods.on_policy`,
``teacher_generated``, ``online_generation``, ``step_by_step``) call these; they know
tokenizers and models but nothing of recipes beyond the settings they are handed.

:class:`ResponseSource` is where the training responses come from: a method hands one to
the task (``CausalLMTask.use_responses``) before the task makes its splits, so the task
writes its data as the method says without knowing any method.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch.utils.data import Dataset

from kdforge.data.generate import GenerationStore, TextGenerator
from kdforge.data.lm import TokenExample
from kdforge.recipe import GenerationConfig
from kdforge.signals.fingerprint import value_digest
from kdforge.tasks.lm_config import StepByStep


@dataclass(frozen=True)
class ResponseSource:
    """Where a causal-LM task's training responses come from when the teacher writes them (without one:
    the data file's responses).

    The recipe's writer (``generation``, by default the teacher) answers every prompt once before training; with
    ``fresh_each_epoch`` it answers the training prompts afresh for every later epoch; with
    ``step_by_step`` it writes a rationale and an answer, and the student learns two tasks.
    """

    #: what asked for it (a method's name) and its recipe path (``methods[0]``), which errors name
    name: str
    where: str
    fresh_each_epoch: bool = False
    step_by_step: StepByStep | None = None
    #: what the report's training info calls the data (``data_mode``; default: ``name``): step-by-step's
    #: rationales are one fixed set, written before training, and were reported as ``offline``
    data_mode: str | None = None


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    return int(value_digest(list(parts))[:8], 16) & 0x7FFFFFFF


class ResponseWriter:
    """The recipe's writer answering prompts, with its answers kept in a :class:`GenerationStore`.

    ``identity`` names the writer and the tokenizer the prompts were made with (their
    files' digests, or the endpoint): stored answers are reused only for the same writer,
    prompts and settings.
    """

    def __init__(
        self,
        writer: TextGenerator,
        cfg: GenerationConfig,
        *,
        identity: dict[str, Any],
        store_folder,
        max_length: int,
        strip: bool = True,
    ):
        self.writer = writer
        self.cfg = cfg
        self.identity = identity
        self.store_folder = store_folder
        self.max_length = max_length
        # a chat turn's content is trimmed; a plain continuation keeps its leading space, which
        # belongs to its first token
        self.strip = strip

    def store(self, prompt_ids: list[list[int]], purpose: str) -> GenerationStore:
        settings = {**asdict(self.writer.sampling), "batch_size": self.cfg.batch_size, "seed": self.cfg.seed}
        key = {
            "strip": self.strip,
            "writer": self.identity,
            "prompts": value_digest(prompt_ids),
            "settings": settings,
            "max_length": self.max_length,
            "purpose": purpose,
        }
        return GenerationStore(self.store_folder, key)

    def responses(self, prompt_ids: list[list[int]], *, purpose: str, description: str) -> list[str]:
        """The writer's answer (text) to each prompt, generated once per (prompts, settings, purpose)."""
        store = self.store(prompt_ids, purpose)

        def make_batch(start: int, stop: int) -> list[dict[str, Any]]:
            prompts = prompt_ids[start:stop]
            room = self.max_length - min(len(p) for p in prompts)
            texts = self.writer.continue_ids(
                prompts,
                max_new_tokens=max(1, min(self.writer.sampling.max_new_tokens, room)),
                seed=derived_seed(self.cfg.seed, purpose, start),
            )
            return [{"response": text.strip() if self.strip else text} for text in texts]

        records = store.build(len(prompt_ids), make_batch, batch_size=self.cfg.batch_size, description=description)
        return [r["response"] for r in records]


class EpochResponses(Dataset):
    """Training examples whose responses are written afresh for each epoch (``online_generation``).

    The engine calls :meth:`set_epoch` before each pass over the data; the examples of
    an epoch come from ``examples_for(epoch)``, which generates or reads them back (a
    resumed run reads the stored ones, so it sees the same data).
    """

    def __init__(self, examples_for: Callable[[int], list[TokenExample]]):
        self.examples_for = examples_for
        self.epoch = 0
        self.examples = examples_for(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            examples = self.examples_for(epoch)
            if len(examples) != len(self.examples):
                raise RuntimeError(f"epoch {epoch} has {len(examples)} examples, not {len(self.examples)}")
            self.examples, self.epoch = examples, epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenExample:
        return self.examples[i]


_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def split_rationale(text: str) -> tuple[str, str | None]:
    """A step-by-step response as (rationale, answer): the answer follows the last ``Answer:``.

    Without an ``Answer:`` the whole text is the rationale and the answer is None.
    """
    found = list(_ANSWER.finditer(text))
    if not found:
        return text.strip(), None
    last = found[-1]
    answer = text[last.end() :].strip().splitlines()[0].strip() if text[last.end() :].strip() else ""
    return text[: last.start()].strip(), answer or None


def prompt_prefixes(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's tokens up to its first learned one: the prompt the response answers."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    prompts = []
    for row in range(ids.shape[0]):
        counted = mask[row].nonzero()
        # loss_mask[j] marks input_ids[j + 1] as a target: the prompt ends at j
        end = int(counted[0]) + 1 if len(counted) else int(batch["attention_mask"][row].sum())
        prompts.append(ids[row, :end].tolist())
    return prompts

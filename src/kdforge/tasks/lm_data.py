"""The causal-LM data source (a :class:`~kdforge.tasks.parts.DataSource`).

:class:`LMData` reads a text file packed into blocks of ``max_length`` tokens, or JSONL
prompt/response pairs where only the response is learned (:mod:`kdforge.data.lm` describes both
and the batch keys); it splits them (text blocks contiguously, pairs shuffled), collates them with
their masks, and, when a method sets a :class:`~kdforge.tasks.lm_generated.ResponseSource`
(:meth:`LMData.use_responses`), trains on responses the teacher writes (stored, or fresh each
epoch; step-by-step: rationales and answers).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler, Subset

from kdforge.console import make_console
from kdforge.data.generate import build_generator
from kdforge.data.lm import (
    Prompt,
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
from kdforge.data.lm_table import TokenFileBlocks, joined_ids, pack, read_records, read_texts, streamed_token_file
from kdforge.data.table import data_files as table_files
from kdforge.data.table import given_splits, seeded_split
from kdforge.distributed import is_main, on_main
from kdforge.errors import RecipeError
from kdforge.recipe import GenerationConfig
from kdforge.settings import cache_dir
from kdforge.signals.fingerprint import files_digest
from kdforge.tasks.base import Splits
from kdforge.tasks.lm_config import ANSWER_SAMPLING, StepByStep
from kdforge.tasks.lm_family import CausalLMFamily
from kdforge.tasks.lm_generated import EpochResponses, ResponseSource, ResponseWriter, split_rationale

console = make_console(stderr=True)


class LMData:
    """Data source: text blocks or prompt/response pairs, tokenized with ``family``'s tokenizer."""

    def __init__(self, data_cfg: Any, family: CausalLMFamily):
        self.data_cfg, self.family = data_cfg, family
        #: the split each record came from, when the data gives its own (tables)
        self._given: list[str] | None = None
        #: where the training responses come from (None: the data file's): a method sets it
        #: (:meth:`use_responses`) before the task makes its splits
        self.source: ResponseSource | None = None

    # ----- what methods hand the data source ----------------------------------------------

    def use_responses(self, source: ResponseSource) -> None:
        """Train on responses the teacher writes, as ``source`` says (called before :meth:`splits`)."""
        if self.source is not None and self.source != source:
            raise RecipeError(
                f"{source.where}: {source.name} and {self.source.name} ({self.source.where}) both write the"
                " training responses; list one of them"
            )
        self.source = source

    @property
    def teacher_writes(self) -> bool:
        return self.source is not None

    @property
    def sbs(self) -> StepByStep | None:
        return self.source.step_by_step if self.source is not None else None

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("label", "rationale") if self.sbs is not None else ()

    def collate(self, items: list[TokenExample]) -> dict[str, Any]:
        return collate_causal(items, self.family.pad_id, self.kinds)

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        source = self.source
        info: dict[str, Any] = {"data_mode": (source.data_mode or source.name) if source is not None else "offline"}
        if self.sbs is not None:
            info["step_by_step"] = self._step_by_step[3]
        return info

    # ----- files and identity -------------------------------------------------------------

    @property
    def from_table(self) -> bool:
        """Read through the table reader (``source``/``files``), not from one file at ``path``."""
        return self.data_cfg.path is None

    @cached_property
    def data_path(self) -> Path:
        return resolve_data_path(self.data_cfg.path)

    @property
    def where(self) -> str:
        """The data, as error messages name it."""
        return str(self.data_cfg.path) if not self.from_table else "data.files"

    def data_identity(self) -> dict[str, Any]:
        """Where the responses come from, when the teacher writes them (a cache is valid only for the same)."""
        if self.source is None:
            return {}
        sbs = self.source.step_by_step
        return {"responses": {"name": self.source.name, "step_by_step": sbs.model_dump() if sbs else None}}

    def data_files(self) -> list[Path]:
        """The data file, and the stored responses the teacher wrote for it (they are the training data)."""
        files = table_files(self.data_cfg) if self.from_table else [self.data_path]
        if self.data_cfg.format == "jsonl" and self.teacher_writes:
            self._jsonl_splits  # noqa: B018 (writes the responses when they are not stored yet)
            train, val, test = self._record_splits
            purpose, instruction = self._written_data
            prompt_ids = self._teacher_prompt_ids([*train, *val, *test], instruction)
            files.append(self._writer.store(prompt_ids, purpose).path)
        return files

    @cached_property
    def largest_token_id(self) -> int:
        if self.data_cfg.format == "text":
            return max(
                blocks.largest_token_id()
                if isinstance(blocks, TokenFileBlocks)
                else max(int(example.input_ids.max()) for example in blocks)
                for blocks in self._text_parts.values()
            )
        # the prompts, and the file's responses; what the teacher writes comes from its own vocabulary
        ids = [max(p) for p in self._prompt_ids if p]
        if not self.teacher_writes:
            ids.extend(int(e.input_ids.max()) for examples in self._jsonl_splits for e in examples)
        return max(ids)

    # ----- reading and encoding -----------------------------------------------------------

    @cached_property
    def _text_blocks(self) -> list[TokenExample] | TokenFileBlocks:
        """All the text's blocks (one file at data.path, or a table's single split)."""
        parts = self._text_parts
        return parts["all"] if "all" in parts else parts["train"]

    @cached_property
    def _text_parts(self) -> dict[str, list[TokenExample] | TokenFileBlocks]:
        """The blocks of each split the data gives ({"all": ...} when it gives train only: split by fraction)."""
        cfg, tokenizer = self.data_cfg, self.family.tokenizer
        if not self.from_table:
            return {"all": packed_text_blocks(self.data_path, tokenizer, cfg.max_length)}
        if cfg.streaming:  # tokens go to a file per split that the blocks map: memory stays flat
            given = given_splits(cfg)
            blocks = {s: TokenFileBlocks(streamed_token_file(cfg, tokenizer, s), cfg.max_length) for s in given}
        else:
            texts = read_texts(cfg)
            blocks = {s: pack(joined_ids(tokenizer, t), cfg.max_length) for s, t in texts.items()}
        return blocks if "test" in blocks else {"all": blocks["train"]}

    @cached_property
    def _records(self) -> list[tuple[str, str | None]]:
        cfg = self.data_cfg
        sbs = self.sbs
        need_response = not self.teacher_writes or (sbs is not None and sbs.label_source == "data")
        if self.from_table:
            records, self._given = read_records(cfg, need_response=need_response)
            return records
        records = read_pairs(self.data_path, cfg.prompt_field, cfg.response_field, need_response=need_response)
        if not records:
            raise RecipeError(f"data.path: {self.data_path} holds no JSON lines")
        return records

    def _task_prompt(self, prompt: Prompt, kind: str | None) -> Prompt:
        sbs = self.sbs
        if sbs is None or kind is None:
            return prompt
        if not isinstance(prompt, str):  # a conversation: the task's prefix goes on its last turn
            last = {**prompt[-1], "content": self._task_prompt(str(prompt[-1]["content"]), kind)}
            return [*prompt[:-1], last]
        return (sbs.label_prefix if kind == "label" else sbs.rationale_prefix) + prompt

    @cached_property
    def _prompt_ids(self) -> list[list[int]]:
        """Each record's prompt as the student reads it (step-by-step: its label task's prompt)."""
        kind = "label" if self.sbs is not None else None
        prompts = [self._task_prompt(p, kind) for p, _ in self._records]
        return prompt_token_ids(self.family.tokenizer, prompts, chat_template=self.data_cfg.chat_template)

    def _split_order(self, n: int, shuffle: bool) -> tuple[list[int], list[int], list[int]]:
        cfg = self.data_cfg
        n_test = max(1, round(n * cfg.test_fraction))
        n_val = max(1, round(n * cfg.validation_fraction)) if cfg.validation_fraction > 0 else 0
        n_train = n - n_test - n_val
        if n_train < 1:
            raise RecipeError(
                f"data: {self.where} gives {n} examples of up to {cfg.max_length} tokens, too few to split into"
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
                f"data.max_length: every prompt of {self.where} fills all {cfg.max_length} tokens, leaving no"
                " response to learn; raise data.max_length"
            )
        if dropped and is_main():
            console.print(
                f"[yellow]data: {dropped} of {len(self._records)} examples of {self.where} left out: their"
                f" prompt fills all {cfg.max_length} tokens (data.max_length), leaving no response to learn"
            )
        given = self._given
        if given and "test" in given:  # the data's own splits; validation carved from train where not given
            return self._given_record_splits(fits, given)
        train, val, test = self._split_order(len(fits), shuffle=True)
        return [fits[i] for i in train], [fits[i] for i in val], [fits[i] for i in test]

    def _given_record_splits(self, fits: list[int], given: list[str]) -> tuple[list[int], list[int], list[int]]:
        cfg = self.data_cfg
        train = [i for i in fits if given[i] == "train"]
        val = [i for i in fits if given[i] == "validation"]
        test = [i for i in fits if given[i] == "test"][: cfg.eval_limit]
        if not val and cfg.validation_fraction > 0:
            keep, held = seeded_split(len(train), cfg.validation_fraction, cfg.split_seed)
            train, val = [train[i] for i in keep], [train[i] for i in held]
        if not train:
            raise RecipeError(f"data: {self.where} leaves no training example; give a train split with rows")
        return train[: cfg.train_limit], val[: cfg.eval_limit], test

    def encode(self, pairs: list[tuple[str, str]], kind: str | None = None) -> list[TokenExample]:
        """Prompt/response pairs as examples (those whose prompt fills ``max_length`` left out)."""
        cfg = self.data_cfg
        pairs = [(self._task_prompt(p, kind), r) for p, r in pairs]
        encoded = encode_pairs(self.family.tokenizer, pairs, cfg.max_length, chat_template=cfg.chat_template, kind=kind)
        return [e for e in encoded if e is not None]

    # ----- responses the teacher writes ---------------------------------------------------

    @cached_property
    def _writer(self) -> ResponseWriter:
        """The recipe's writer (``generation``; by default the teacher's model), with its answers stored."""
        cfg = self.family.recipe.generation or GenerationConfig()
        teachers = self.family.teacher_models()
        family = self.family
        writer = build_generator(
            cfg,
            defaults=ANSWER_SAMPLING,
            who=f"{self.source.name} ({self.source.where})" if self.source else "the task",
            default_model=teachers[0] if teachers else None,
            tokenizer=family.tokenizer,  # the prompts are token ids of the task's tokenizer
        )
        identity = {**writer.identity(), "tokenizer": files_digest(family.tokenizer_files())}
        return ResponseWriter(
            writer,
            cfg,
            identity=identity,
            store_folder=Path(cfg.store).expanduser() if cfg.store else cache_dir() / "generations",
            max_length=self.data_cfg.max_length,
            strip=uses_chat_template(family.tokenizer, self.data_cfg.chat_template),
        )

    @property
    def _written_data(self) -> tuple[str, str | None]:
        """(purpose, instruction) of the teacher's answers that make the data of every split."""
        sbs = self.sbs
        return ("step_by_step", sbs.instruction) if sbs is not None else ("responses", None)

    def _teacher_prompt_ids(self, indices: list[int], instruction: str | None = None) -> list[list[int]]:
        prompts = [self._records[i][0] for i in indices]
        if instruction is not None:
            prompts = [instruction.replace("{prompt}", p) for p in prompts]
        return prompt_token_ids(self.family.tokenizer, prompts, chat_template=self.data_cfg.chat_template)

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
        return self.encode([(self._records[i][0], responses[i]) for i in indices])

    @cached_property
    def _step_by_step(self) -> tuple[list[TokenExample], list[TokenExample], list[TokenExample], dict[str, int]]:
        """Training (both tasks), validation and test examples (label task), and how many answers were usable."""
        sbs = self.sbs
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
                f"[yellow]{self.source.where} (step_by_step): {missing} of {len(used)} teacher responses gave no"
                " rationale or no 'Answer:' line and are left out"
            )
        if not train_ok or not test_ok:
            raise RecipeError(
                f"{self.source.where}.instruction: too few teacher responses have a rationale and an 'Answer:' line;"
                " reword the instruction, use label_source: data, or a stronger teacher"
            )
        counts = {"written": len(used), "usable": len(used) - missing}
        train_examples = self.encode([(self._records[i][0], label(i)) for i in train_ok], "label")
        train_examples += self.encode([(self._records[i][0], parsed[i][0]) for i in train_ok], "rationale")

        def labels_only(indices: list[int]) -> list[TokenExample]:
            return self.encode([(self._records[i][0], label(i)) for i in indices], "label")

        return train_examples, labels_only(val_ok), labels_only(test_ok), counts

    @cached_property
    def _jsonl_splits(self) -> tuple[list[TokenExample], list[TokenExample], list[TokenExample]]:
        train, val, test = self._record_splits
        if self.sbs is not None:
            return self._step_by_step[:3]
        # the teacher answers every prompt used, in one store; the file's responses otherwise
        responses = (
            self._generated_responses([*train, *val, *test], epoch=0)
            if self.teacher_writes
            else {i: r for i, (_, r) in enumerate(self._records)}
        )

        def pairs(indices: list[int]) -> list[tuple[str, str]]:
            return [(self._records[i][0], responses[i]) for i in indices]  # type: ignore[misc]

        return self.encode(pairs(train)), self.encode(pairs(val)), self.encode(pairs(test))

    def _text_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        cfg, parts = self.data_cfg, self._text_parts

        def view(blocks: list[TokenExample] | TokenFileBlocks, index: list[int]) -> Dataset:
            if isinstance(blocks, TokenFileBlocks):  # read on demand: a list would hold every block
                return Subset(blocks, index)
            return TokenDataset([blocks[i] for i in index])

        if "all" in parts:
            blocks = parts["all"]
            train, val, test = self._split_order(len(blocks), shuffle=False)
            return view(blocks, train), view(blocks, val), view(blocks, test)
        n_train = len(parts["train"])
        train, val = list(range(n_train)), []
        if "validation" not in parts and cfg.validation_fraction > 0:  # the train text's last blocks
            cut = max(1, round(n_train * cfg.validation_fraction))
            train, val = train[: n_train - cut], train[n_train - cut :]
        validation = (
            view(parts["validation"], list(range(len(parts["validation"])))[: cfg.eval_limit])
            if ("validation" in parts)
            else view(parts["train"], val[: cfg.eval_limit])
        )
        test = view(parts["test"], list(range(len(parts["test"])))[: cfg.eval_limit])
        return view(parts["train"], train[: cfg.train_limit]), validation, test

    def splits(self) -> Splits:
        if self.data_cfg.format == "text":
            train_set, val_set, test_set = self._text_splits()
        else:
            train_examples, val_examples, test_examples = self._jsonl_splits
            train_set = TokenDataset(train_examples)
            if self.source is not None and self.source.fresh_each_epoch:
                indices = self._record_splits[0]
                first = train_examples

                def examples_for(epoch: int) -> list[TokenExample]:
                    return first if epoch == 0 else self._generated_examples(indices, epoch)

                train_set = EpochResponses(examples_for)
            val_set, test_set = TokenDataset(val_examples), TokenDataset(test_examples)
        if len(val_set):
            return Splits(train_set, val_set, test_set, "validation")
        return Splits(train_set, test_set, test_set, "test")

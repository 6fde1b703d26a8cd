"""Sampling continuations from a causal LM, and keeping a teacher's generations on disk.

Three data modes of the causal-LM task generate text: the teacher answers the prompts
once (``teacher_generated``, sequence-level KD) or once per epoch
(``online_generation``), and the student answers them during training (``on_policy``,
GKD). :func:`sample_continuations` is the one sampler all of them use.

A teacher's generations are expensive and must be identical whenever a run (or
``kdforge cache``, or a resumed run) asks for them again, so :class:`GenerationStore`
keeps them in a JSONL file named by the digest of everything they depend on (teacher
weights, prompts, sampling settings, seed). The file grows batch by batch, so an
interrupted generation resumes where it stopped; it gets its final name only when
complete. Each batch is sampled from its own seed, so a resumed generation writes
what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.progress import counting_progress
from kdforge.signals.fingerprint import value_digest


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Each prompt's continuation (token ids, up to and including the first stop token).

    Prompts are left-padded into one batch (a decoder continues from its last real
    token). ``temperature`` 0 decodes greedily. With ``seed`` the sampling is
    reproducible and leaves the global RNG as it found it (training must not depend on
    whether a batch was generated). The model is put in eval mode for the call (no
    dropout while sampling) and returned to its previous mode.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention[row, width - len(prompt) :] = 1
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=list(stop_ids) or None,
                **sampling,
            )
    finally:
        model.train(was_training)
    stops = set(stop_ids)
    continuations = []
    for row in out[:, width:].tolist():
        kept = []
        for token in row:
            kept.append(token)
            if token in stops:
                break
        continuations.append(kept)
    return continuations


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """The ids that end a response: the tokenizer's end of text and the model's own end-of-turn ids."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


class GenerationStore:
    """Generated records (JSON objects), kept in ``folder`` under the digest of what made them.

    ``key`` must hold everything the records depend on; a different key is a different
    file, so a changed prompt set or teacher never reuses stale generations.
    """

    def __init__(self, folder: Path, key: dict[str, Any], *, field: str = "data.generation.store"):
        self.folder = Path(folder).expanduser()
        self.digest = value_digest(key)
        self.key = key
        self.field = field

    @property
    def path(self) -> Path:
        return self.folder / f"{self.digest}.jsonl"

    @property
    def _partial(self) -> Path:
        return self.folder / f"{self.digest}.partial.jsonl"

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _read_partial(self, batch_size: int) -> list[dict[str, Any]]:
        if not self._partial.is_file():
            return []
        records = []
        for line in self._partial.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by the interruption: regenerate from there
        # keep whole batches only, so every batch is regenerated from its own seed
        return records[: len(records) // batch_size * batch_size]

    def build(
        self,
        count: int,
        make_batch: Callable[[int, int], list[dict[str, Any]]],
        *,
        batch_size: int,
        description: str,
    ) -> list[dict[str, Any]]:
        """The ``count`` records, generated ``batch_size`` at a time by ``make_batch(start, stop)`` if not stored."""
        if self.exists():
            records = self.read()
            if len(records) == count:
                return records
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KDForgeError(f"{self.field}: cannot create {self.folder} ({exc.strerror})") from None
        records = self._read_partial(batch_size)
        with self._partial.open("w", encoding="utf-8") as out:
            for record in records:  # rewrite the whole batches kept, dropping a torn tail
                out.write(json.dumps(record) + "\n")
            out.flush()
            with counting_progress() as progress:
                bar = progress.add_task(description, total=count, completed=len(records))
                for start in range(len(records), count, batch_size):
                    batch = make_batch(start, min(start + batch_size, count))
                    for record in batch:
                        out.write(json.dumps(record) + "\n")
                    out.flush()
                    records.extend(batch)
                    progress.update(bar, completed=len(records))
            os.fsync(out.fileno())
        (self.folder / f"{self.digest}.key.json").write_text(json.dumps(self.key, indent=2) + "\n")
        os.replace(self._partial, self.path)
        return records

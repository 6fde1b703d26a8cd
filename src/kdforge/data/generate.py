"""Sampling continuations from a causal LM, and keeping a teacher's generations on disk.

Three data modes of the causal-LM task generate text: the teacher answers the prompts
once (``teacher_generated``, sequence-level KD) or once per epoch
(``online_generation``), and the student answers them during training (``on_policy``,
GKD). :func:`sample_continuations` is the one sampler all of them use. A prompt-in,
text-out :class:`TextGenerator` (a local model, :class:`LocalGenerator`, or a served one,
:class:`ServedGenerator`) writes for methods that ask a teacher in words (PGKD).

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
from typing import Any, Protocol

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


class TextGenerator(Protocol):
    """Anything that answers a prompt with text (the answer only, without the prompt)."""

    def __call__(self, prompt: str) -> str: ...


# ----- prompt in, text out: a local model or a served one ----------------------------


class LocalGenerator:
    """A causal LM on this machine as the teacher (a folder, hub id, ``.gguf`` file or ``package:NAME``).

    The prompt goes through the tokenizer's chat template when it has one (instruct
    models answer far better in their own turn format). Sampling is reproducible: the
    n-th call is seeded with ``seed + n`` (in a forked RNG, so the caller's random state
    is untouched), so a run replays exactly while successive prompts still get
    different samples. ``temperature`` 0 decodes greedily.
    """

    def __init__(
        self,
        ref: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int = 0,
        field: str = "pgkd.teacher",
    ):
        from kdforge.models.hf_causal_lm import load_causal_lm, load_tokenizer

        self.ref = ref
        self.model = load_causal_lm(ref, field=field)
        self.tokenizer = load_tokenizer(ref, field=field)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.calls = 0
        self.field = field

    def __repr__(self) -> str:
        return f"LocalGenerator({self.ref!r}, temperature={self.temperature}, seed={self.seed})"

    def _prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def __call__(self, prompt: str) -> str:
        ids = self._prompt_ids(prompt)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(ids) + self.max_new_tokens > limit:
            raise KDForgeError(
                f"{self.field}: the prompt has {len(ids)} tokens and {self.max_new_tokens} more are asked for,"
                f" beyond the model's {limit}; show fewer mistakes or shorter texts, or lower max_new_tokens"
            )
        stops = stop_token_ids(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        seed = self.seed + self.calls
        self.calls += 1
        [new] = sample_continuations(
            self.model,
            [ids],
            pad_id=pad,
            stop_ids=stops,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
        )
        return self.tokenizer.decode(new, skip_special_tokens=True)


class ServedGenerator:
    """A teacher behind an OpenAI-compatible ``/v1/completions`` endpoint (vLLM, llama.cpp, ``kdforge serve-teacher``).

    The prompt is sent as plain text: a completions endpoint applies no chat template.
    The API key is read from the environment variable ``api_key_env`` by
    :class:`~kdforge.signals.served.CompletionsClient`, which keeps it in the request
    header only; it never appears in this object's repr or in logs. With ``seed`` the
    n-th call asks the server for seed ``seed + n`` (servers that honour it replay).
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key_env: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int | None = None,
        timeout: float = 120.0,
    ):
        from kdforge.signals.served import CompletionsClient

        self.client = CompletionsClient(
            url, model=model, api_key_env=api_key_env, timeout=timeout, field="pgkd.teacher.url"
        )
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.calls = 0

    def __repr__(self) -> str:
        return f"ServedGenerator({self.client!r}, temperature={self.temperature})"

    def __call__(self, prompt: str) -> str:
        from kdforge.signals.served import generate

        seed = None if self.seed is None else self.seed + self.calls
        self.calls += 1
        [text] = generate(self.client, [prompt], max_tokens=self.max_tokens, temperature=self.temperature, seed=seed)
        return text

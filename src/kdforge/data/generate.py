"""Sampling continuations from a causal LM, and keeping a teacher's generations on disk.

Every method that has a model write text uses one writer, built by
:func:`build_generator` from the recipe's one ``generation:`` section
(:class:`~kdforge.recipe.GenerationConfig`): a causal LM on this machine
(:class:`LocalGenerator`) or an OpenAI-compatible endpoint (:class:`ServedGenerator`). Both
answer a prompt in words (``writer(prompt)``: PGKD's examples) and continue prompts
already in token ids (``writer.continue_ids``: the teacher's answers of
``teacher_generated``, ``online_generation`` and ``step_by_step``). The student's own
answers (``on_policy``, GKD) come from the model being trained, through the same sampler,
:func:`sample_continuations`.

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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kdforge.errors import KDForgeError, RecipeError
from kdforge.progress import counting_progress
from kdforge.recipe import GenerationConfig
from kdforge.signals.fingerprint import files_digest, value_digest


@torch.no_grad()
def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are spread over processes (FSDP2 gives them as DTensors)."""
    from kdforge.distributed import world_size

    return world_size() > 1 and any(hasattr(p, "to_local") for p in model.parameters())


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
                # a sharded model (training.sharding: fsdp) gathers each block with every process: all of them
                # take every decoding step until the last one's answers are done, as transformers does for ZeRO-3
                synced_gpus=is_sharded(model),
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


def pad_token_id(tokenizer) -> int:
    """The id padded positions carry: they are masked everywhere, so any id the model can embed will do.

    Tokens added to a tokenizer after its base vocabulary (a new pad token, a GGUF
    conversion's extra end-of-text token) may lie beyond a model's embedding table.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and candidate < tokenizer.vocab_size:
            return int(candidate)
    return 0


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

    def __init__(self, folder: Path, key: dict[str, Any], *, field: str = "generation.store"):
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


@dataclass(frozen=True)
class Sampling:
    """How a writer samples: a method's defaults, overridden by the recipe's ``generation`` fields."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0

    def over(self, cfg: GenerationConfig | None) -> Sampling:
        """These defaults with the fields ``cfg`` gives (temperature 0 is a value, not a gap)."""
        if cfg is None:
            return self
        return Sampling(
            max_new_tokens=self.max_new_tokens if cfg.max_new_tokens is None else cfg.max_new_tokens,
            temperature=self.temperature if cfg.temperature is None else cfg.temperature,
            top_p=self.top_p if cfg.top_p is None else cfg.top_p,
        )


class TextGenerator(Protocol):
    """A model that writes: a prompt answered in words, or token prompts continued."""

    sampling: Sampling

    def __call__(self, prompt: str) -> str:
        """The answer to ``prompt`` (without the prompt); successive calls sample afresh."""
        ...

    def continue_ids(self, prompts: list[list[int]], *, max_new_tokens: int, seed: int) -> list[str]:
        """The text that continues each prompt (token ids, already formatted), sampled from ``seed``."""
        ...

    def identity(self) -> dict[str, Any]:
        """What names the writer in a store's key: stored answers are reused only for the same writer."""
        ...


class LocalGenerator:
    """A causal LM on this machine writes (a folder, hub id, ``.gguf`` file or ``package:NAME``).

    The model loads on the first call (stored answers need none). A prompt in words goes
    through the tokenizer's chat template when it has one (instruct models answer far
    better in their own turn format). Sampling is reproducible: the n-th call is seeded with
    ``seed + n`` (in a forked RNG, so the caller's random state is untouched), so a run
    replays exactly while successive prompts still get different samples. ``tokenizer``
    (default: the model's own) is the one the token prompts were made with.
    """

    def __init__(
        self,
        ref: str,
        *,
        sampling: Sampling,
        seed: int = 0,
        field: str = "generation.model",
        trust_remote_code: bool = False,
        tokenizer=None,
    ):
        self.ref = ref
        self.sampling = sampling
        self.seed = seed
        self.calls = 0
        self.field = field
        self.trust_remote_code = trust_remote_code
        if tokenizer is None:
            from kdforge.models.hf_causal_lm import load_tokenizer

            tokenizer = load_tokenizer(ref, field=field)
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"LocalGenerator({self.ref!r}, temperature={self.sampling.temperature}, seed={self.seed})"

    @cached_property
    def model(self) -> nn.Module:
        from kdforge.models.hf_causal_lm import load_causal_lm

        return load_causal_lm(self.ref, field=self.field, trust_remote_code=self.trust_remote_code)

    def identity(self) -> dict[str, Any]:
        from kdforge.models.refs import resolve_model_ref

        weights = resolve_model_ref(self.ref, field=self.field).weight_files()
        return {"model": files_digest(weights) if weights else self.ref}

    def continue_ids(self, prompts: list[list[int]], *, max_new_tokens: int, seed: int) -> list[str]:
        continuations = sample_continuations(
            self.model,
            prompts,
            pad_id=pad_token_id(self.tokenizer),
            stop_ids=stop_token_ids(self.tokenizer, self.model),
            max_new_tokens=max_new_tokens,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=seed,
        )
        return self.tokenizer.batch_decode(continuations, skip_special_tokens=True)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def __call__(self, prompt: str) -> str:
        ids = self._prompt_ids(prompt)
        wanted = self.sampling.max_new_tokens
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(ids) + wanted > limit:
            raise KDForgeError(
                f"{self.field}: the prompt has {len(ids)} tokens and {wanted} more are asked for,"
                f" beyond the model's {limit}; shorten the prompt or lower generation.max_new_tokens"
            )
        seed = self.seed + self.calls
        self.calls += 1
        [text] = self.continue_ids([ids], max_new_tokens=wanted, seed=seed)
        return text


class ServedGenerator:
    """A model behind an OpenAI-compatible ``/v1/completions`` endpoint writes (vLLM, llama.cpp, serve-teacher).

    A prompt in words is sent as plain text (a completions endpoint applies no chat
    template); token prompts are sent as ids, which the OpenAI API and vLLM accept, so
    the server reads exactly what a local model would. The API key is read from the
    environment variable ``api_key_env`` by :class:`~kdforge.signals.served.CompletionsClient`,
    which keeps it in the request header only; it never appears in this object's repr or
    in logs. The n-th call asks for seed ``seed + n`` (servers that honour it replay).
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        sampling: Sampling,
        api_key_env: str | None = None,
        seed: int | None = None,
        timeout: float = 120.0,
        field: str = "generation.url",
    ):
        from kdforge.signals.served import CompletionsClient

        self.client = CompletionsClient(url, model=model, api_key_env=api_key_env, timeout=timeout, field=field)
        self.sampling = sampling
        self.seed = seed
        self.calls = 0

    def __repr__(self) -> str:
        return f"ServedGenerator({self.client!r}, temperature={self.sampling.temperature})"

    def identity(self) -> dict[str, Any]:
        return {"url": self.client.url, "model": self.client.model}

    def _ask(self, prompts: list[str] | list[list[int]], max_new_tokens: int, seed: int | None) -> list[str]:
        from kdforge.signals.served import generate

        return generate(
            self.client,
            prompts,
            max_tokens=max_new_tokens,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=seed,
        )

    def continue_ids(self, prompts: list[list[int]], *, max_new_tokens: int, seed: int) -> list[str]:
        return self._ask(prompts, max_new_tokens, seed)

    def __call__(self, prompt: str) -> str:
        seed = None if self.seed is None else self.seed + self.calls
        self.calls += 1
        [text] = self._ask([prompt], self.sampling.max_new_tokens, seed)
        return text


def build_generator(
    cfg: GenerationConfig | None,
    *,
    defaults: Sampling,
    who: str,
    default_model: tuple[str, str, bool] | None = None,
    tokenizer=None,
) -> TextGenerator:
    """The writer the recipe's ``generation`` section names, sampling as ``defaults`` say unless it overrides.

    ``default_model`` is (reference, recipe field, trust_remote_code) of the model that
    writes when the section names none (a causal-LM task's teacher); ``who`` names the
    method in the error when neither does.
    """
    cfg = cfg or GenerationConfig()
    sampling = defaults.over(cfg)
    if cfg.url is not None:
        return ServedGenerator(
            cfg.url, cfg.model, sampling=sampling, api_key_env=cfg.api_key_env, seed=cfg.seed, timeout=cfg.timeout
        )
    if cfg.model is not None:
        same_as_default = default_model is not None and default_model[0] == cfg.model and default_model[2]
        return LocalGenerator(
            cfg.model,
            sampling=sampling,
            seed=cfg.seed,
            field="generation.model",
            trust_remote_code=cfg.trust_remote_code or bool(same_as_default),
            tokenizer=tokenizer,
        )
    if default_model is None:
        raise RecipeError(
            f"generation.model: {who} needs a model that writes; name a causal LM (generation: {{model: REF}})"
            " or an endpoint (generation: {url: http://...})"
        )
    ref, field, trust = default_model
    return LocalGenerator(
        ref, sampling=sampling, seed=cfg.seed, field=field, trust_remote_code=trust, tokenizer=tokenizer
    )

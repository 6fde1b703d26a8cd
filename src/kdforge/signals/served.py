"""A teacher behind an OpenAI-compatible completions endpoint (vLLM, llama.cpp, ``kdforge serve-teacher``).

Two uses: the top-k log-probs of given token sequences (``echo`` with ``max_tokens=1``,
so that the last position's next-token distribution comes back too), and generations
(sequence-level KD, synthetic data). The API key is read from the environment
variable the recipe names and is sent only in the ``Authorization`` header: never
logged, never in an error message or a report.

Position alignment: a causal LM's logits at position j predict token j + 1. The API
gives, for each echoed token j >= 1, the distribution that predicted token j, and for
the generated token the one after the prompt; so logits position j is API entry j + 1.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from kdforge.errors import ServedTeacherError
from kdforge.outputs import ModelOutputs
from kdforge.recipe import refuse_password_in_url
from kdforge.signals.base import SIGNALS, Batch, BuiltSignal, SignalConfig, TeacherSignal
from kdforge.signals.cache_reader import pad_topk

#: HTTP statuses worth retrying: rate limits and server-side failures
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class CompletionsClient:
    """A small client for ``POST /v1/completions`` with timeouts and retries with exponential backoff."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        field: str = "teacher.url",
    ):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ServedTeacherError(f"{field}: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
        try:
            password = urllib.parse.urlsplit(self.url).password
        except ValueError as exc:
            raise ServedTeacherError(f"{field}: {url!r} is not a valid URL ({exc})") from None
        if password is not None:
            raise ServedTeacherError(
                f"{field}: holds a password; remove it from the URL, put the key in an environment variable"
                " and name that variable in api_key_env (the URL is written to reports, the key never is)"
            )
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.field = field
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise ServedTeacherError(f"teacher.api_key_env: the environment variable {api_key_env} is not set")

    def __repr__(self) -> str:  # never show the key
        return f"CompletionsClient({self.url!r}, model={self.model!r})"

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.model is not None:
            body = {"model": self.model, **body}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                detail = _error_message(exc)
                if exc.code in (401, 403):  # the key itself is never part of the message
                    where = f"the environment variable {self.api_key_env}" if self.api_key_env else "api_key_env"
                    raise ServedTeacherError(
                        f"{self.field}: {self.url}{path} answered {exc.code}: {detail}; check the key in {where}"
                    ) from None
                if exc.code not in RETRY_STATUSES:
                    raise ServedTeacherError(f"{self.field}: {self.url}{path} answered {exc.code}: {detail}") from None
                last = f"{exc.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = str(reason) or type(reason).__name__
            except json.JSONDecodeError:
                raise ServedTeacherError(f"{self.field}: {self.url}{path} did not answer JSON") from None
        raise ServedTeacherError(
            f"{self.field}: cannot reach {self.url} after {self.retries + 1} tries ({last});"
            " start the server (e.g. kdforge serve-teacher MODEL --port 8000) or fix the URL"
        )

    def completions(self, **body: Any) -> dict[str, Any]:
        return self.post("/v1/completions", body)


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body.get("error", {}).get("message", body))[:200]
    except (ValueError, AttributeError, OSError):
        return exc.reason if isinstance(exc.reason, str) else "error"


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise ServedTeacherError(
            f"teacher.url: the server returned top log-probs keyed by text ({key!r}), not token ids;"
            " it must support return_tokens_as_token_ids (vLLM, kdforge serve-teacher)"
        )
    return int(key.split(":", 1)[1])


def topk_logprobs(
    client: CompletionsClient, sequences: list[list[int]], k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence, the teacher's top-k ``(ids [L, k], logprobs [L, k])`` aligned with causal-LM logits."""
    response = client.completions(
        prompt=sequences, max_tokens=1, echo=True, logprobs=k, temperature=0.0, return_tokens_as_token_ids=True
    )
    choices = sorted(response.get("choices", []), key=lambda c: c.get("index", 0))
    if len(choices) != len(sequences):
        raise ServedTeacherError(f"teacher.url: asked for {len(sequences)} sequences, got {len(choices)} answers")
    out = []
    for sequence, choice in zip(sequences, choices):
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        rows = tops[1 : len(sequence) + 1]
        if len(rows) != len(sequence) or any(not r for r in rows):
            raise ServedTeacherError(
                f"teacher.url: expected top log-probs for {len(sequence)} positions, got {len(rows)}"
                " (does the server support echo with logprobs?)"
            )
        ids, values = [], []
        for row in rows:
            pairs = sorted(((float(v), _token_id(t)) for t, v in row.items()), reverse=True)[:k]
            if len(pairs) < k:
                raise ServedTeacherError(f"teacher.url: asked for {k} top log-probs per position, got {len(pairs)}")
            values.append([v for v, _ in pairs])
            ids.append([t for _, t in pairs])
        out.append((torch.tensor(ids), torch.tensor(values)))
    return out


def generate(
    client: CompletionsClient,
    prompts: list[str] | list[list[int]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """The teacher's completions of ``prompts`` (text only; top-k comes from :func:`topk_logprobs`)."""
    body: dict[str, Any] = {"prompt": prompts, "max_tokens": max_tokens, "temperature": temperature}
    if top_p < 1.0:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    response = client.completions(**body)
    choices = sorted(response.get("choices", []), key=lambda c: c.get("index", 0))
    return [c.get("text", "") for c in choices]


class ServedTeacherConfig(SignalConfig):
    """A causal LM behind an OpenAI-compatible completions endpoint (vLLM, llama.cpp, kdforge serve-teacher)."""

    signal: Literal["served"]
    url: str = Field(description="base URL, e.g. http://127.0.0.1:8000")
    model: str | None = Field(None, description="the model name the server knows, sent with each request")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    k: int = Field(20, ge=1, description="top log-probs per position (vLLM allows 20 by default)")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(3, ge=0)
    temperature: float = Field(1.0, gt=0, description="the temperature of the served log-probs (1 for raw ones)")

    topk_logits_only = True

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str) -> str:
        return refuse_password_in_url(url)

    def label(self) -> str:
        return f"{self.model or 'model'} served at {self.url}"

    def stored_temperature(self) -> float | None:
        return self.temperature


@SIGNALS.register("served")
class ServedTeacher(TeacherSignal):
    """Top-k log-probs of each batch's sequences from a served causal LM.

    ``batch`` needs ``input_ids`` ``[B, L]`` (and ``attention_mask``, right padding);
    ``logits`` comes back as the top-k pair ``(ids [B, L, k], logprobs [B, L, k])``,
    padded positions filled with a uniform top-k that masked losses never count.
    """

    config = ServedTeacherConfig

    def __init__(self, client: CompletionsClient, *, k: int = 64):
        self.client = client
        self.k = k

    @classmethod
    def from_config(
        cls, task, cfg: ServedTeacherConfig, teacher_fields: frozenset[str], where: str = "teacher"
    ) -> BuiltSignal:
        client = CompletionsClient(
            cfg.url,
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            timeout=cfg.timeout,
            retries=cfg.retries,
            field=f"{where}.url",
        )
        return BuiltSignal(cls(client, k=cfg.k), info={"signal": "served", "url": cfg.url, "k": cfg.k})

    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        unsupported = set(fields) - {"logits"}
        if unsupported:
            raise ServedTeacherError(
                f"objective: a served teacher gives top-k logits only, not {', '.join(sorted(unsupported))}"
            )
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [input_ids.shape[1]] * input_ids.shape[0]
        sequences = [input_ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]
        answers = topk_logprobs(self.client, sequences, self.k)
        # a task whose outputs are shifted (a causal LM's logits for positions 0..L-2) says so with position_mask
        positions = batch.get("position_mask")
        length = positions.shape[1] if isinstance(positions, torch.Tensor) else input_ids.shape[1]
        ids, values = pad_topk(answers, length, self.k)
        device = input_ids.device
        return ModelOutputs(logits=(ids.to(device), values.to(device)))

"""``kdforge serve-teacher``: any local causal LM behind the OpenAI completions API.

Only what distillation needs of the API that vLLM and llama.cpp servers expose:

* ``POST /v1/completions`` with ``prompt`` (text, token ids, or a list of either),
  ``max_tokens`` (0 scores the prompt only), ``echo`` (return the prompt's tokens
  and log-probs too), ``logprobs`` (how many top log-probs per token),
  ``temperature`` (0 = greedy), ``seed`` and vLLM's ``return_tokens_as_token_ids``
  (top-log-prob keys written ``token_id:N``, so a client never has to map strings
  back to ids). The response is the legacy completions object: per choice
  ``logprobs.tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``;
  the first prompt token has no log-prob (``null``), as in the API.
* ``GET /v1/models`` and ``GET /health``.

Requests are served one at a time (the model is not thread-safe); the server is
for loopback tests and small set-ups, not a replacement for vLLM.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

MAX_TOP_LOGPROBS = 1000


class BadRequest(ValueError):
    """A request the API would answer with 400."""


class CompletionEngine:
    """Scores and extends prompts with a causal LM; ``complete(request) -> response`` in the API's shapes."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any | None, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.lock = threading.Lock()
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device

    # -- request parsing

    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be a string, a list of token ids, or a non-empty list of either")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise BadRequest("this server has no tokenizer; send token ids")
                out.append(self.tokenizer(p, add_special_tokens=True)["input_ids"])
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < self.vocab for t in p):
                out.append(list(p))
            else:
                raise BadRequest(f"a prompt must be text or a non-empty list of token ids in [0, {self.vocab})")
        return out

    def _token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token])

    # -- scoring and generation

    @torch.no_grad()
    def _run(self, ids: list[int], max_tokens: int, temperature: float, generator: torch.Generator | None):
        """Log-softmaxes predicting each token after the first, and the generated tokens."""
        tokens = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=tokens).logits[0].float().cpu()  # sampling and answers on the CPU
        rows = [torch.log_softmax(logits, -1)]
        generated: list[int] = []
        for _ in range(max_tokens):
            last = rows[-1][-1]
            if temperature <= 0:
                token = int(last.argmax())
            else:
                probs = torch.softmax(last / temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            generated.append(token)
            if self.tokenizer is not None and token == getattr(self.tokenizer, "eos_token_id", None):
                break
            tokens = torch.cat([tokens, torch.tensor([[token]], device=self.device)], 1)
            step = self.model(input_ids=tokens).logits[0, -1:].float().cpu()  # no KV cache: simple and exact
            rows.append(torch.log_softmax(step, -1))
        return torch.cat(rows), generated

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        max_tokens = int(request.get("max_tokens", 16) or 0)
        echo = bool(request.get("echo", False))
        top = request.get("logprobs")
        top = None if top is None else int(top)
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if max_tokens < 0:
            raise BadRequest("max_tokens must be >= 0")
        if max_tokens == 0 and not echo:
            raise BadRequest("max_tokens = 0 returns nothing without echo")
        temperature = float(request.get("temperature", 1.0))
        as_ids = bool(request.get("return_tokens_as_token_ids", False))
        seed = request.get("seed")
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        choices, prompt_tokens, completion_tokens = [], 0, 0
        with self.lock:
            for index, ids in enumerate(self._prompts(request.get("prompt"))):
                log_probs, generated = self._run(ids, max_tokens, temperature, generator)
                prompt_tokens += len(ids)
                completion_tokens += len(generated)
                choices.append(self._choice(index, ids, generated, log_probs, echo, top, as_ids))
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _choice(self, index, ids, generated, log_probs, echo, top, as_ids) -> dict[str, Any]:
        # log_probs[j] predicts token j + 1 of prompt + generated
        sequence = ids + generated
        shown = range(len(sequence)) if echo else range(len(ids), len(sequence))
        name = (lambda t: f"token_id:{t}") if as_ids else self._token_text
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for position in shown:
            token = sequence[position]
            text = name(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(self._token_text(token))
            if position == 0:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            row = log_probs[position - 1]
            token_logprobs.append(float(row[token]))
            if top:
                values, top_ids = row.topk(min(top, row.shape[-1]))
                top_logprobs.append({name(int(t)): float(v) for t, v in zip(top_ids, values)})
            else:
                top_logprobs.append(None)
        text_ids = sequence if echo else generated
        text = self.tokenizer.decode(text_ids) if self.tokenizer is not None else " ".join(map(str, text_ids))
        logprobs = None
        if top is not None:
            logprobs = {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": offsets,
            }
        eos = getattr(self.tokenizer, "eos_token_id", None)
        finish = "stop" if generated and generated[-1] == eos else "length"
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def make_server(
    engine: CompletionEngine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
) -> ThreadingHTTPServer:
    """An HTTP server for ``engine`` (port 0 picks a free one: ``server.server_address[1]``).

    With ``api_key``, completions need ``Authorization: Bearer <api_key>`` (401 otherwise), as
    OpenAI-compatible servers do; the key is compared in constant time and never echoed.
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002  (quiet: requests may carry keys in headers)
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": engine.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):  # noqa: N802
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            if api_key is not None and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(), f"Bearer {api_key}".encode()
            ):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._send(401, {"error": {"message": "missing or wrong API key", "type": "invalid_api_key"}})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise BadRequest("the body must be a JSON object")
                self._send(200, engine.complete(request))
            except (BadRequest, json.JSONDecodeError, TypeError, ValueError) as exc:
                self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def load_engine(
    model_ref: str, *, name: str | None = None, trust_remote_code: bool = False, device: str | None = None
) -> CompletionEngine:
    """A causal LM and its tokenizer from a folder, GGUF file, hub id or package:NAME, on ``device``
    (default: where it loads, the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.errors import ModelRefError
    from kdforge.models.refs import load_with, resolve_model_ref

    location = resolve_model_ref(model_ref, field="MODEL_REF")
    model = load_with(
        AutoModelForCausalLM.from_pretrained, location, field="MODEL_REF", trust_remote_code=trust_remote_code
    )
    try:
        tokenizer = load_with(AutoTokenizer.from_pretrained, location, field="MODEL_REF")
    except (ModelRefError, ValueError, OSError):  # a model without a tokenizer still serves token ids
        tokenizer = None
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:  # no such GPU, or a CPU-only torch
            raise ModelRefError(f"--device {device}: {str(exc).splitlines()[0]}") from None
    return CompletionEngine(model, tokenizer, name or model_ref)

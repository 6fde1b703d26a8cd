import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kdforge.errors import ServedTeacherError
from kdforge.signals.served import CompletionsClient, ServedTeacher, generate, topk_logprobs
from kdforge.signals.server import CompletionEngine, make_server


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def server(tiny_lm):
    srv = make_server(CompletionEngine(tiny_lm, None, "tiny"), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _online_topk(model, sequence, k):
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0].float(), -1)
    values, ids = log_p.topk(k, dim=-1)
    return ids, values


def test_served_topk_equals_the_online_teacher(tiny_lm, server):
    client = CompletionsClient(server, model="tiny")
    sequences = [[5, 17, 3, 90, 41], [7, 7, 2]]
    answers = topk_logprobs(client, sequences, k=8)
    for sequence, (ids, values) in zip(sequences, answers):
        ref_ids, ref_values = _online_topk(tiny_lm, sequence, 8)
        assert ids.shape == (len(sequence), 8)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)


def test_served_signal_fills_a_padded_batch(tiny_lm, server):
    signal = ServedTeacher(CompletionsClient(server), k=4)
    input_ids = torch.tensor([[5, 17, 3, 90], [7, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ids, values = signal.outputs({"input_ids": input_ids, "attention_mask": mask}, frozenset({"logits"})).logits
    assert ids.shape == values.shape == (2, 4, 4)
    ref_ids, _ = _online_topk(tiny_lm, [7, 7], 4)
    assert torch.equal(ids[1, :2], ref_ids)
    assert torch.isfinite(values).all()
    with pytest.raises(ServedTeacherError, match="top-k logits only, not embeddings"):
        signal.outputs({"input_ids": input_ids}, frozenset({"embeddings"}))


def test_greedy_generation_follows_the_argmax(tiny_lm, server):
    client = CompletionsClient(server)
    response = client.completions(prompt=[4, 8, 15], max_tokens=3, temperature=0.0, logprobs=2)
    tokens = [4, 8, 15]
    for _ in range(3):
        with torch.no_grad():
            tokens.append(int(tiny_lm(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    choice = response["choices"][0]
    assert choice["text"] == " ".join(map(str, tokens[3:]))
    assert len(choice["logprobs"]["top_logprobs"]) == 3 and response["usage"]["completion_tokens"] == 3
    assert generate(client, [[4, 8, 15]], max_tokens=3) == [choice["text"]]


def test_bad_requests_are_clear_errors(server):
    client = CompletionsClient(server, retries=0)
    with pytest.raises(ServedTeacherError, match=r"answered 400: a prompt must be text or a non-empty list"):
        client.completions(prompt=[[1000]], max_tokens=1)
    with pytest.raises(ServedTeacherError, match="no tokenizer; send token ids"):
        client.completions(prompt="hello", max_tokens=1)


def test_unreachable_server_after_retries():
    client = CompletionsClient("http://127.0.0.1:9", retries=2, backoff=0.0, timeout=2)
    with pytest.raises(
        ServedTeacherError, match=r"cannot reach http://127.0.0.1:9 after 3 tries .*kdforge serve-teacher"
    ):
        client.completions(prompt=[1], max_tokens=1)
    with pytest.raises(ServedTeacherError, match="not an http"):
        CompletionsClient("127.0.0.1:8000")


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 twice, then a completion; records the Authorization headers it saw."""

    calls: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append(self.headers.get("Authorization"))
        status, body = (503, {"error": {"message": "busy"}}) if len(self.calls) <= 2 else (200, {"choices": []})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_retries_with_backoff_and_the_key_stays_in_the_header(monkeypatch):
    monkeypatch.setenv("KDFORGE_TEST_KEY", "sk-secret-123")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        client = CompletionsClient(url, api_key_env="KDFORGE_TEST_KEY", retries=3, backoff=0.01)
        assert client.completions(prompt=[1], max_tokens=1) == {"choices": []}
        assert _Flaky.calls == ["Bearer sk-secret-123"] * 3
        assert "sk-secret" not in repr(client)
        _Flaky.calls = []
        failing = CompletionsClient(url, api_key_env="KDFORGE_TEST_KEY", retries=1, backoff=0.0)
        with pytest.raises(ServedTeacherError) as info:
            failing.completions(prompt=[1], max_tokens=1)
        assert "503 busy" in str(info.value) and "sk-secret" not in str(info.value)
    finally:
        srv.shutdown()
        srv.server_close()
    monkeypatch.delenv("KDFORGE_TEST_KEY")
    with pytest.raises(ServedTeacherError, match="KDFORGE_TEST_KEY is not set"):
        CompletionsClient(url, api_key_env="KDFORGE_TEST_KEY")

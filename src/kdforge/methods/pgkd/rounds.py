"""PGKD's rounds: train, evaluate, ask the teacher for examples of the weak classes, repeat.

The loop is task-agnostic: the caller supplies ``train_round`` and ``predict`` (any
model, any framework) and a :class:`~kdforge.data.generate.TextGenerator`
(``__call__(prompt) -> str``). Everything here is deterministic given a deterministic
generator and trainer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdforge.data.generate import TextGenerator
from kdforge.methods.pgkd.examples import (
    LOGGER,
    LabelledText,
    Rejection,
    build_prompt,
    class_report,
    confident_mistakes,
    parse_examples,
    weak_classes,
)


@dataclass
class RoundRecord:
    """What one round did and measured.

    ``targeted``: the classes the teacher was asked for before this round's training
    (empty in round 0); ``weak``: the weakest classes found by this round's evaluation
    (the next round's targets). ``generated`` counts non-blank answer lines.
    """

    round: int
    train_size: int
    accuracy: float
    macro_f1: float
    val_loss: float
    weak: list[int]
    targeted: list[int] = field(default_factory=list)
    generated: int = 0
    accepted: int = 0
    rejected: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    added: list[LabelledText] = field(default_factory=list)
    trained: bool = True


@dataclass
class PGKDResult:
    """The model of lowest validation loss, its round, the rounds' records and the final training set."""

    model: Any
    best_round: int
    history: list[RoundRecord]
    training_set: list[LabelledText]
    stop_reason: str

    def summary(self) -> dict[str, Any]:
        """The history as plain data (for JSON), without the model."""
        return {
            "best_round": self.best_round,
            "stop_reason": self.stop_reason,
            "training_set_size": len(self.training_set),
            "rounds": [asdict(r) for r in self.history],
        }


def validation_loss(probs: np.ndarray, labels: Sequence[int]) -> float:
    """Mean cross-entropy of the true classes under ``probs`` ``[N, K]`` (probabilities floored at 1e-12)."""
    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(labels)), np.asarray(labels, dtype=int)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


@dataclass
class _Evaluation:
    probs: np.ndarray
    predicted: np.ndarray
    accuracy: float
    macro_f1: float
    loss: float


def _evaluate(predict, model, validation: Sequence[LabelledText], n_classes: int) -> _Evaluation:
    from sklearn.metrics import f1_score

    texts = [e.text for e in validation]
    y_true = np.asarray([e.label for e in validation], dtype=int)
    probs = np.asarray(predict(model, texts))
    if probs.shape != (len(texts), n_classes):
        raise ValueError(f"predict returned {probs.shape}, expected ({len(texts)}, {n_classes})")
    predicted = probs.argmax(axis=1)
    return _Evaluation(
        probs=probs,
        predicted=predicted,
        accuracy=float((predicted == y_true).mean()),
        # macro over the classes that occur (in truth or prediction), as scikit-learn does by default
        macro_f1=float(f1_score(y_true, predicted, average="macro", zero_division=0)),
        loss=validation_loss(probs, y_true),
    )


def _slice_cyclic(items: list, start: int, size: int) -> list:
    """``size`` items from ``start``, wrapping around; never the same item twice in one slice."""
    if not items:
        return []
    return [items[(start + j) % len(items)] for j in range(min(size, len(items)))]


def _ask_teacher(
    generator: TextGenerator,
    *,
    evaluation: _Evaluation,
    validation: Sequence[LabelledText],
    class_names: Sequence[str],
    task_description: str,
    weak: list[int],
    per_class: int,
    mistakes_per_prompt: int,
    prompts_per_round: int,
    seen: set[str],
    source: str,
) -> tuple[list[LabelledText], list[Rejection]]:
    """Prompt the teacher ``prompts_per_round`` times, each prompt with the next hard negatives.

    With fewer hard negatives than the prompts can show, they come round again (a
    prompt without any would lose the paper's main signal).
    """
    texts = [e.text for e in validation]
    y_true = [e.label for e in validation]
    report = class_report(y_true, evaluation.predicted, class_names)
    mistakes = confident_mistakes(texts, y_true, evaluation.probs, mistakes_per_prompt * prompts_per_round)
    seen = set(seen)
    accepted: list[LabelledText] = []
    rejected: list[Rejection] = []
    for p in range(prompts_per_round):
        shown = _slice_cyclic(mistakes, p * mistakes_per_prompt, mistakes_per_prompt)
        prompt = build_prompt(task_description, class_names, report, shown, weak, per_class)
        new, bad = parse_examples(generator(prompt), class_names, seen=seen, source=source, prompt=prompt)
        seen.update(e.text for e in new)  # the next prompt's answer must not repeat these
        accepted += new
        rejected += bad
    return accepted, rejected


def pgkd_loop(
    *,
    train_round: Callable[[Any, list[LabelledText]], Any],
    predict: Callable[[Any, list[str]], np.ndarray],
    train_set: Sequence[LabelledText],
    validation: Sequence[LabelledText],
    class_names: Sequence[str],
    generator: TextGenerator,
    task_description: str,
    rounds: int,
    per_class: int,
    weak_per_round: int,
    mistakes_per_prompt: int,
    patience: int,
    prompts_per_round: int = 1,
    examples_kept: int = 5,
) -> PGKDResult:
    """Run PGKD: round 0 on ``train_set``, then up to ``rounds`` teacher rounds.

    ``train_round(model_or_None, examples) -> model`` trains on ``examples`` (the whole
    training set so far: the labelled set plus every accepted generation, whose
    ``source`` says which round wrote it); it gets None in round 0 and the latest model
    after, so it may fine-tune or retrain from scratch. ``predict(model, texts)`` returns
    class probabilities ``[N, K]`` (numpy). After each round the model is scored on
    ``validation``; the teacher is then asked for ``per_class`` examples of each of the
    ``weak_per_round`` weakest classes. A round that accepts nothing keeps the model (no
    retraining on unchanged data) and counts as not improving. The loop stops after
    ``rounds`` teacher rounds, or once the validation loss has not improved for
    ``patience`` consecutive rounds. ``history[r].added`` keeps the first
    ``examples_kept`` accepted examples of round r.
    """
    if rounds < 0 or patience < 1 or per_class < 1 or weak_per_round < 1 or prompts_per_round < 1:
        raise ValueError("pgkd_loop: rounds >= 0, and patience, per_class, weak_per_round, prompts_per_round >= 1")
    if not validation:
        raise ValueError("pgkd_loop: the validation set is empty; PGKD needs it to find weak classes and stop")
    n_classes = len(class_names)
    examples = list(train_set)
    seen = {e.text for e in examples} | {e.text for e in validation}
    y_val = [e.label for e in validation]

    model = train_round(None, list(examples))
    evaluation = _evaluate(predict, model, validation, n_classes)
    history = [_record(0, examples, evaluation, weak_classes(y_val, evaluation.predicted, weak_per_round))]
    best_model, best = model, 0
    stop_reason = f"ran all {rounds} teacher rounds"

    for r in range(1, rounds + 1):
        if r - 1 - best >= patience:
            stop_reason = f"validation loss did not improve for {patience} rounds (best: round {best})"
            break
        targeted = history[-1].weak
        added, rejected = _ask_teacher(
            generator,
            evaluation=evaluation,
            validation=validation,
            class_names=class_names,
            task_description=task_description,
            weak=targeted,
            per_class=per_class,
            mistakes_per_prompt=mistakes_per_prompt,
            prompts_per_round=prompts_per_round,
            seen=seen,
            source=f"teacher round {r}",
        )
        if added:
            examples += added
            seen.update(e.text for e in added)
            model = train_round(model, list(examples))
            evaluation = _evaluate(predict, model, validation, n_classes)
        record = _record(r, examples, evaluation, weak_classes(y_val, evaluation.predicted, weak_per_round))
        record.targeted = list(targeted)
        record.generated = len(added) + len(rejected)
        record.accepted = len(added)
        record.rejected = len(rejected)
        record.rejections = dict(sorted(Counter(x.reason for x in rejected).items()))
        record.added = added[:examples_kept]
        record.trained = bool(added)
        history.append(record)
        LOGGER.info(
            "round %d: %d generated, %d accepted; validation loss %.4f, accuracy %.4f",
            r,
            record.generated,
            record.accepted,
            record.val_loss,
            record.accuracy,
        )
        if record.val_loss < history[best].val_loss:
            best_model, best = model, r
    return PGKDResult(
        model=best_model, best_round=best, history=history, training_set=examples, stop_reason=stop_reason
    )


def _record(r: int, examples: list[LabelledText], evaluation: _Evaluation, weak: list[int]) -> RoundRecord:
    return RoundRecord(
        round=r,
        train_size=len(examples),
        accuracy=evaluation.accuracy,
        macro_f1=evaluation.macro_f1,
        val_loss=evaluation.loss,
        weak=weak,
    )

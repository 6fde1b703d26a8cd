"""PGKD's exchange with its teacher: the report and prompt it is shown, and which lines of its answer are kept.

Performance-guided knowledge distillation (PGKD; Di Palo et al., EMNLP 2024, arXiv 2411.05045).

The loop these serve is :mod:`kdforge.methods.pgkd` (steps 3 to 5 of each round happen here).

Generated text is untrusted: every line is checked, and each rejected line is logged
(logger ``kdforge.pgkd``, INFO) with its reason. Validation texts count as already
seen, so a teacher that copies a hard negative from its prompt back into the training
set, word for word or with a word changed, is refused (the copy would leak validation
data into training and make the early-stopping signal optimistic); so is any other
piece of the prompt (a small teacher readily echoes the task's class descriptions).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdforge.data.text_classification import LabelledText

LOGGER = logging.getLogger("kdforge.pgkd")

# Rejection reasons: fixed strings, so that a round's rejections can be counted by reason.
NO_SEPARATOR = "no label separator"
UNKNOWN_LABEL = "unknown label"
EMPTY_TEXT = "empty text"
TOO_SHORT = "too short"
TOO_LONG = "too long"
DUPLICATE_SEEN = "duplicate of a known text"
NEAR_DUPLICATE = "near duplicate of a known text"
DUPLICATE_OUTPUT = "duplicate within the output"
REPEATS_INSTRUCTION = "repeats the prompt"
REPEATS_LABEL = "repeats a label name"

REASONS = (
    NO_SEPARATOR,
    UNKNOWN_LABEL,
    EMPTY_TEXT,
    TOO_SHORT,
    TOO_LONG,
    DUPLICATE_SEEN,
    DUPLICATE_OUTPUT,
    NEAR_DUPLICATE,
    REPEATS_INSTRUCTION,
    REPEATS_LABEL,
)


@dataclass(frozen=True)
class Rejection:
    """A generated line that was not kept, and why (one of :data:`REASONS`)."""

    line: str
    reason: str


# ----- evaluation: report, weak classes, hard negatives ------------------------------


def class_report(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Sequence[str],
    *,
    only: Sequence[int] | None = None,
) -> str:
    """Per-class precision, recall, F1 and support as text (scikit-learn's ``classification_report``).

    Every class in ``class_names`` gets a row, also one absent from ``y_true`` (support 0);
    undefined ratios are 0 (``zero_division=0``), so a class the student never predicts
    reads as precision 0 rather than a warning. ``only``: rows for these classes alone
    (a task with hundreds of classes would not fit a small teacher's context); the
    averages then cover those classes only, and scikit-learn prints "micro avg" instead
    of accuracy.
    """
    from sklearn.metrics import classification_report

    labels = list(range(len(class_names))) if only is None else [int(c) for c in only]
    return classification_report(
        np.asarray(y_true),
        np.asarray(y_pred),
        labels=labels,
        target_names=[class_names[c] for c in labels],
        zero_division=0,
        digits=2,
    )


def _per_class_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """F1 of each class ``0 .. n_classes - 1`` (0 where undefined)."""
    from sklearn.metrics import f1_score

    return f1_score(y_true, y_pred, labels=list(range(n_classes)), average=None, zero_division=0)


def weak_classes(y_true: Sequence[int], y_pred: Sequence[int], n: int) -> list[int]:
    """The ``n`` classes of lowest F1, weakest first; ties go to the lower class index.

    Only classes present in ``y_true`` are ranked: a class without validation examples
    has no measured F1, and calling it weak would steer the teacher on no evidence.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    if y_true.size == 0 or n <= 0:
        return []
    n_classes = int(max(y_true.max(), y_pred.max(initial=0))) + 1
    f1 = _per_class_f1(y_true, y_pred, n_classes)
    present = sorted(set(y_true.tolist()))
    return sorted(present, key=lambda c: (f1[c], c))[:n]


def confident_mistakes(texts: Sequence[str], y_true: Sequence[int], probs: np.ndarray, k: int) -> list[dict[str, Any]]:
    """The ``k`` misclassified examples the student was most confident about (the paper's hard negatives).

    ``probs`` is ``[N, K]`` (each row a distribution); the prediction is its argmax and the
    confidence the probability of that wrong prediction. Sorted by confidence, highest
    first; ties keep the input order. Each item: ``text``, ``true``, ``predicted`` (class
    indices), ``confidence`` (float) and ``index`` (row in ``texts``).
    """
    probs = np.asarray(probs)
    y_true = np.asarray(y_true, dtype=int)
    if probs.ndim != 2 or probs.shape[0] != len(texts) or y_true.shape != (len(texts),):
        raise ValueError(f"probs must be [N, K] and y_true [N] for N={len(texts)} texts; got {probs.shape}")
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(texts)), predicted]
    wrong = np.flatnonzero(predicted != y_true)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][: max(k, 0)]
    return [
        {
            "text": texts[i],
            "true": int(y_true[i]),
            "predicted": int(predicted[i]),
            "confidence": float(confidence[i]),
            "index": int(i),
        }
        for i in order
    ]


# ----- the prompt ------------------------------------------------------------------

#: the format line of the instructions
FORMAT_LINE = "<label>: <text>"
_REPORT_HEADER = "How the current classifier does on validation data:"
_MISTAKES_HEADER = (
    "Examples it got wrong (do not copy them), with their correct label and the classifier's wrong answer:"
)
#: texts that are the format's placeholders rather than examples
_PLACEHOLDERS = ("text", "<text>", "label", "<label>", "example", "new example", "your example")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _instructions(class_names: Sequence[str], weak: Sequence[int], per_class: int) -> list[str]:
    weak_names = ", ".join(class_names[c] for c in weak)
    return [
        f"Write {per_class} new, varied examples for each of these classes: {weak_names}.",
        "Write one example per line, in exactly this form:",
        FORMAT_LINE,
        "The label must be written exactly as in the class list. Write nothing else.",
    ]


def build_prompt(
    task_description: str,
    class_names: Sequence[str],
    report: str,
    mistakes: Sequence[dict[str, Any]],
    weak: Sequence[int],
    per_class: int,
    *,
    max_text_chars: int = 160,
) -> str:
    """The teacher's prompt: the task, the classes, the student's report, its hard negatives, the request.

    Hard negatives are shown in the answer format (``label: text``, the correct label),
    which doubles as a demonstration of the format for a small teacher; their texts are
    cut to ``max_text_chars``. With six classes and eight mistakes the prompt stays well
    under a thousand tokens, small enough for a 135M-parameter instruct model. For tasks
    with hundreds of classes, pass ``class_report(..., only=weak)``.
    """
    if not weak:
        raise ValueError("build_prompt: no weak classes to ask for")
    if per_class < 1:
        raise ValueError(f"build_prompt: per_class must be at least 1, got {per_class}")
    lines = [task_description.strip(), "", "Classes: " + ", ".join(class_names), ""]
    lines += [_REPORT_HEADER, report.rstrip(), ""]
    if mistakes:
        lines.append(_MISTAKES_HEADER)
        for m in mistakes:
            said = f"{class_names[m['predicted']]}, {m['confidence']:.0%} sure"
            lines.append(f"{class_names[m['true']]}: {_shorten(m['text'], max_text_chars)}   (said {said})")
        lines.append("")
    lines += _instructions(class_names, weak, per_class)
    return "\n".join(lines)


# ----- parsing the teacher's answer ------------------------------------------------

# "1." "2)" "(3)" "-" "*" "•" before the label, as list-happy models write
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.)]|[-*•+])\s*")
_QUOTES = "\"'`“”‘’*"
# what small models put around a label: quotes, bold, brackets ("<LOC>" imitates "<label>")
_LABEL_WRAP = _QUOTES + "[]<>()"
# the annotation build_prompt puts after a hard negative; a copied or imitated one is not part of a text
# (SmolLM2 also drops the "said": "(ENTY, 97% sure)")
_SAID = re.compile(r"\s*\((?:said [^()]*|[^()]*\d+\s*% sure)\)\s*$", re.IGNORECASE)


def text_key(text: str) -> str:
    """What two texts must share to count as duplicates: case, spacing and punctuation ignored."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def _without_digits(key: str) -> str:
    return " ".join(re.sub(r"\d+", " ", key).split())


def _split_label(line: str, class_names: Sequence[str]) -> tuple[int | None, str | None]:
    """``(class index, rest)`` of a ``label: text`` line; ``(None, rest)`` for an unknown label;
    ``(None, None)`` when there is no ``label:`` at all."""
    body = _LIST_MARKER.sub("", line, count=1).strip().lstrip(_LABEL_WRAP + " ")
    # longest names first, so that a class named "LOC" never captures "LOCATION: ..."
    for index in sorted(range(len(class_names)), key=lambda i: -len(class_names[i])):
        name = class_names[index]
        if body[: len(name)].casefold() == name.casefold():
            after = body[len(name) :].lstrip(_LABEL_WRAP + " ")
            if after.startswith(":"):
                return index, after[1:]
    if ":" in body:
        return None, body.split(":", 1)[1]
    return None, None


def _clean_text(text: str) -> str:
    text = _SAID.sub("", " ".join(text.split()))
    # models like to quote their examples; a quote on one side only is left alone
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def _instruction_prefixes() -> list[str]:
    """Keys (digits dropped) that the prompt's own sentences start with, up to their first colon.

    Cut at the colon so that the class list and counts of any particular prompt do not matter.
    """
    sentences = [_REPORT_HEADER, _MISTAKES_HEADER, *_instructions(["x"], [0], 1)]
    prefixes = {_without_digits(text_key(s.split(":")[0])) for s in sentences if s != FORMAT_LINE}
    return sorted(p for p in prefixes if len(p.split()) >= 3)


_INSTRUCTION_PREFIXES = _instruction_prefixes()
_PLACEHOLDER_KEYS = {text_key(p) for p in (*_PLACEHOLDERS, FORMAT_LINE)}


def _repeats_instructions(key: str) -> bool:
    if key in _PLACEHOLDER_KEYS:
        return True
    plain = _without_digits(key)
    return any(plain.startswith(p) for p in _INSTRUCTION_PREFIXES)


def _words(key: str) -> frozenset[str]:
    return frozenset(key.split())


def _near(words: frozenset[str], known: Sequence[frozenset[str]], threshold: float) -> bool:
    """Whether some known text shares at least ``threshold`` of the words of both (Jaccard index)."""
    for other in known:
        union = len(words | other)
        if union and len(words & other) >= threshold * union:
            return True
    return False


@dataclass
class _Known:
    """What a generated line is compared with: known texts, earlier lines, the prompt."""

    keys: set[str]
    words: list[frozenset[str]]
    labels: set[str]
    prompt: str
    produced: set[str] = field(default_factory=set)


def _check(label: int | None, text: str | None, known: _Known, *, min_chars, max_chars, near_duplicate) -> str | None:
    """The reason to reject a parsed line, or None to keep it. Exact copies are named before near ones."""
    if text is None:
        return NO_SEPARATOR
    if label is None:
        return UNKNOWN_LABEL
    key = text_key(text)
    if not key:  # nothing but spaces and punctuation ("...")
        return EMPTY_TEXT
    if len(text) < min_chars:
        return TOO_SHORT
    if len(text) > max_chars:
        return TOO_LONG
    if key in known.labels:
        return REPEATS_LABEL
    if _repeats_instructions(key):
        return REPEATS_INSTRUCTION
    if key in known.keys:
        return DUPLICATE_SEEN
    if key in known.produced:
        return DUPLICATE_OUTPUT
    if near_duplicate is not None and _near(_words(key), known.words, near_duplicate):
        return NEAR_DUPLICATE
    if known.prompt and f" {key} " in known.prompt:
        return REPEATS_INSTRUCTION  # a piece of the prompt, e.g. a class description from the task
    return None


def parse_examples(
    output: str,
    class_names: Sequence[str],
    *,
    seen: set[str],
    min_chars: int = 3,
    max_chars: int = 300,
    source: str = "teacher",
    prompt: str | None = None,
    near_duplicate: float | None = 0.8,
) -> tuple[list[LabelledText], list[Rejection]]:
    """The valid ``label: text`` lines of a teacher's answer, and every other line with its reason.

    Tolerated: a leading list marker (``1.``, ``2)``, ``-``, ``*``, ``•``), quotes, ``**``,
    brackets or ``<>`` around the label, quotes around the text, any letter case in the
    label, spaces around the colon, and a copied ``(said ...)`` annotation after the text
    (build_prompt writes one after each hard negative). Blank lines are skipped (layout,
    not attempts). Length limits count characters of the cleaned text.

    Rejected as duplicates: a text equal to one in ``seen`` (training and validation
    texts) or to an earlier line of this output, ignoring case, spacing and punctuation;
    with ``near_duplicate``, also a text whose word set overlaps a ``seen`` text's by at
    least that Jaccard index (small teachers copy a shown hard negative with a word
    dropped, which would leak validation data; one pass over ``seen`` per line). Rejected
    as repeating the prompt: a format placeholder, an instruction sentence, and, when
    ``prompt`` is given, any text found word for word in it. ``seen`` is not modified.
    Each rejection is logged at INFO.
    """
    known = _Known(
        keys={text_key(t) for t in seen},
        words=[_words(text_key(t)) for t in seen] if near_duplicate is not None else [],
        labels={text_key(n) for n in class_names},
        prompt=f" {text_key(prompt)} " if prompt else "",
    )
    accepted: list[LabelledText] = []
    rejected: list[Rejection] = []
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        label, rest = _split_label(line, class_names)
        text = None if rest is None else _clean_text(rest)
        reason = _check(label, text, known, min_chars=min_chars, max_chars=max_chars, near_duplicate=near_duplicate)
        if reason is None:
            known.produced.add(text_key(text))
            accepted.append(LabelledText(text=text, label=label, source=source))
        else:
            LOGGER.info("rejected a generated line (%s): %r", reason, _shorten(line, 120))
            rejected.append(Rejection(line=line, reason=reason))
    return accepted, rejected

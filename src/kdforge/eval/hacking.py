"""Teacher hacking (Tiapkin et al., 2025): the student keeps getting closer to the teacher
(the proxy metric falls) while it drifts from the ground truth the teacher stands in for
(the golden metric, a distance to a stronger model, rises).

:func:`detect_teacher_hacking` reads the periodic evaluations of a run and flags it when,
after the golden metric's best evaluation, the proxy has kept falling while the golden
has risen, both by more than ``tolerance`` (relative), for at least ``patience``
evaluations.
"""

from __future__ import annotations

from typing import Any


def detect_teacher_hacking(
    records: list[dict[str, Any]],
    *,
    proxy: str,
    golden: str,
    patience: int = 2,
    tolerance: float = 0.01,
) -> dict[str, Any]:
    """``records``: ``{"step": int, "eval": {proxy: float, golden: float, ...}}`` in any order (lower = closer).

    Returns ``flagged``, the golden metric's best step, the relative changes of both
    metrics since then, and the curves themselves (for the report's plot).
    """
    points = sorted(
        (r["step"], r["eval"][proxy], r["eval"][golden])
        for r in records
        if proxy in r.get("eval", {}) and golden in r.get("eval", {})
    )
    result: dict[str, Any] = {
        "proxy": proxy,
        "golden": golden,
        "steps": [p[0] for p in points],
        "proxy_values": [p[1] for p in points],
        "golden_values": [p[2] for p in points],
        "flagged": False,
    }
    if len(points) < patience + 1:
        result["reason"] = f"{len(points)} evaluations, fewer than patience + 1 = {patience + 1}"
        return result
    best = min(range(len(points)), key=lambda i: points[i][2])
    after = points[best:]
    proxy_change = (after[-1][1] - after[0][1]) / max(abs(after[0][1]), 1e-12)
    golden_change = (after[-1][2] - after[0][2]) / max(abs(after[0][2]), 1e-12)
    # "keeps falling": the proxy fell over most of the intervals since the golden's best
    falls = sum(b[1] < a[1] for a, b in zip(after, after[1:]))
    steady = falls * 2 >= len(after) - 1
    flagged = len(after) - 1 >= patience and proxy_change < -tolerance and golden_change > tolerance and steady
    result.update(
        {
            "flagged": flagged,
            "golden_best_step": points[best][0],
            "proxy_change": proxy_change,
            "golden_change": golden_change,
            "evaluations_since_best": len(after) - 1,
        }
    )
    return result

"""Exports of a run's model, measured and added to the run's report (``kdforge export``).

A quantized file is only worth shipping if it keeps the model's quality. When the model exported is a
run's ``model/`` folder, the file is read back (transformers de-quantizes a GGUF file to floats, exactly
the values llama.cpp computes with) and evaluated by the run's own task on its test split; the row
(format, size, task metrics next to the saved model's) goes into ``report.json`` under ``exports`` and
into ``report.html``. Speed is not measured: llama.cpp, which runs these files, is not a kdforge
dependency, and the de-quantized floats run at the saved model's speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kdforge.checks import load_recipe
from kdforge.commands import build_task
from kdforge.fsutil import atomic_write_text
from kdforge.models.hf_causal_lm import load_causal_lm, plain_model
from kdforge.report.html import load_report, write_report


def run_of(model: str) -> Path | None:
    """The run folder whose student ``model`` is (``RUN/model``), or None."""
    folder = Path(model)
    if (
        folder.name == "model"
        and (folder.parent / "report.json").is_file()
        and (folder.parent / "recipe.yaml").is_file()
    ):
        return folder.parent
    return None


def record_export(run_dir: Path, file: Path, fmt: str) -> dict[str, Any]:
    """Evaluate the exported ``file`` with the run's task on its test split; add the row to the run's report."""
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    task = build_task(recipe)
    exported = plain_model(load_causal_lm(str(file), field="--gguf", fresh=True)).to(torch.float32)
    metrics = task.evaluate(exported.eval(), task.splits().test).metrics
    report = load_report(run_dir)
    row = {
        "model": "student",
        "format": fmt,
        "file": str(file),
        "size_bytes": file.stat().st_size,
        "metrics": metrics,
        "saved_metrics": report["runs"][0]["models"]["student"]["metrics"],
        "saved_size_bytes": report["runs"][0]["models"]["student"].get("size_bytes"),
    }
    report["exports"] = [e for e in report.get("exports", []) if e["file"] != str(file)] + [row]
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
    write_report(run_dir)
    return row

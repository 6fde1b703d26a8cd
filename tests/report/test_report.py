import json
import re

from conftest import tiny
from kdforge.models.store import load_kdforge_model
from kdforge.runner import run_recipe


def test_report_puts_teacher_student_and_baseline_side_by_side(tmp_path, digits_teacher):
    recipe = tiny("digits_kd", tmp_path, f"teacher.model={digits_teacher}", "training.eval_every=5")
    report = run_recipe(recipe)
    summary = report["summary"]
    assert set(summary) == {"teacher", "student", "baseline"}
    for role in summary:
        assert 0 <= summary[role]["metrics"]["accuracy"]["mean"] <= 1
        assert summary[role]["params"] > 0 and summary[role]["size_bytes"] > 0
        assert summary[role]["throughput"]["mean"] > 0
    assert summary["teacher"]["params"] > summary["student"]["params"]
    assert set(summary["student"]["fidelity"]) == {"top1_agreement", "mean_kl"}
    # the baseline trained on labels only: its log has no distillation term
    log = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {tuple(r["terms"]) for r in log if r["phase"] == "baseline" and "terms" in r} == {("cross_entropy",)}
    assert {tuple(r["terms"]) for r in log if r["phase"] == "student" and "terms" in r} == {
        ("cross_entropy", "hinton_kd")
    }
    assert any("eval" in r for r in log)

    html = (recipe.run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # self-contained plots
    assert not re.search(r"<(img|script|link)[^>]+(src|href)=\"http", html)
    for role in ("teacher", "student", "baseline"):
        assert f"<td>{role}</td>" in html

    saved = load_kdforge_model(recipe.run_dir / "model")
    assert sum(p.numel() for p in saved.parameters()) == summary["student"]["params"]
    card = (recipe.run_dir / "model" / "README.md").read_text()
    assert str(digits_teacher) in card and "hinton_kd" in card and "## Results" in card

"""The model card (README.md) saved next to a trained student.

Its YAML front matter is the Hugging Face Hub's model-card metadata: ``library_name``,
``base_model`` (see :func:`base_model`), ``datasets`` (see :func:`datasets`) and ``tags``
(knowledge-distillation, kdforge, the task and each of the recipe's methods). No
``base_model_relation``: the Hub knows adapter, merge, quantized and finetune, and a
distilled student is none of them. The body ends with the BibTeX of the papers behind
the run: its objective's losses, its methods and its task (:func:`citations`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdforge.provenance import Paper, bibtex_entries
from kdforge.recipe import Recipe

#: the signals whose ``model`` is the teacher's weights (a served teacher's is a name its server knows)
_WEIGHT_SIGNALS = {"online", "cache"}
#: a ``teacher.model`` that names no weights (the ranking tasks' BM25 scorer)
_NOT_A_MODEL = {"bm25"}
_TEACHER = object()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def teacher_models(recipe: Recipe) -> list[str]:
    """The local or hub models behind the teacher (an ensemble's members too), in order, each once.

    A served teacher's model is a name on a server, not weights one can point at, and BM25 has none.
    """
    from kdforge.signals.base import teacher_members

    refs: list[str] = []
    for _, member in teacher_members(recipe.teacher):
        ref = getattr(member, "model", None)
        if member.signal in _WEIGHT_SIGNALS and isinstance(ref, str) and ref not in _NOT_A_MODEL and ref not in refs:
            refs.append(ref)
    return refs


def _student_source(student: dict[str, Any]) -> Any:
    """The model the student's weights start from: a reference, :data:`_TEACHER`, or None (fresh weights)."""
    from_teacher = student.get("from_teacher")
    if isinstance(from_teacher, dict):  # causal_lm: a shallower copy of from_teacher.model, or of the teacher
        return from_teacher.get("model") or _TEACHER
    if isinstance(student.get("model"), str):  # a pretrained model (encoders, sparse, text classifiers, causal_lm)
        return student["model"]
    if student.get("layers") is not None or student.get("num_layers") is not None:  # the teacher's layers
        return _TEACHER
    if isinstance(student.get("init"), str):  # classification: a saved MLP to start from
        return student["init"]
    return None


def base_model(recipe: Recipe, role: str = "student") -> str | None:
    """The card's ``base_model``: for the student, the teacher when one local or hub model stands behind it;
    otherwise (and for the baseline, which never learns from the teacher) the model the student was cut
    from: ``student.from_teacher.model``, ``student.model``, or the teacher for a student made of its layers
    (``from_teacher``, ``layers``, ``num_layers``). None when there is none (a fresh MLP, an index)."""
    teachers = teacher_models(recipe)
    if role == "student" and len(teachers) == 1:
        return teachers[0]
    source = _student_source(recipe.student)
    if source is _TEACHER:
        return teachers[0] if teachers else None
    return source


def datasets(data: dict[str, Any]) -> list[str]:
    """What the recipe trains on, from its ``data`` section: the files (``files``) or the hub id or folder
    (``source``) it reads, else the bundled set (``dataset``) unless ``path`` points at other files with its
    layout (then the path), and the BEIR folder (``beir``) or the text file that replaces it (``text_file``)."""
    found: list[str] = []
    files, source = data.get("files"), data.get("source")
    if files is not None:
        listed = files.values() if isinstance(files, dict) else [files]
        for entry in listed:
            found += [Path(str(p)).name for p in (entry if isinstance(entry, list) else [entry])]
    elif isinstance(source, str):
        found.append(source)
    elif isinstance(data.get("path"), str):
        found.append(data["path"])
    elif isinstance(data.get("dataset"), str) and data["dataset"] != "npz":
        found.append(data["dataset"])
    if isinstance(data.get("text_file"), str):
        found.append(data["text_file"])
    elif isinstance(data.get("beir"), str) and files is None and source is None:
        found.append(data["beir"])
    return list(dict.fromkeys(found))


def citations(recipe: Recipe, task_paper: Paper | None = None) -> list[tuple[Paper, list[str]]]:
    """Each paper behind the run once, with what uses it (``loss `hinton_kd```): the objective's losses,
    the listed methods, then the task."""
    from kdforge.losses import LOSS_MODULES, LOSSES

    uses: list[tuple[Paper, list[str]]] = []

    def add(paper: Paper | None, what: str) -> None:
        if paper is None:
            return
        for known, labels in uses:
            if known.identity() == paper.identity():
                if what not in labels:
                    labels.append(what)
                return
        uses.append((paper, [what]))

    for term in recipe.objective:
        for registry in (LOSSES, LOSS_MODULES):
            if term.loss in registry:
                add(registry.get(term.loss).paper, f"loss `{term.loss}`")
    if recipe.methods:
        from kdforge.docs_tables import method_registry

        methods = method_registry()
        for name in recipe.method_names():
            add(getattr(methods.get(name), "paper", None) if name in methods else None, f"method `{name}`")
    add(task_paper, f"task `{recipe.task}`")
    return uses


def front_matter(
    recipe: Recipe, *, role: str = "student", library: str = "kdforge", data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The card's Hub metadata; ``data`` is the validated data section (with its defaults), else the recipe's."""
    meta: dict[str, Any] = {"library_name": library}
    base = base_model(recipe, role)
    if base:
        meta["base_model"] = base
    trained_on = datasets(recipe.data if data is None else data)
    if trained_on:
        meta["datasets"] = trained_on
    tags = ["knowledge-distillation", "kdforge", *([recipe.task] if recipe.task else []), *recipe.method_names()]
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def render(
    recipe: Recipe,
    models: dict[str, Any],
    *,
    role: str,
    load_hint: str,
    library: str = "kdforge",
    task_paper: Paper | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    """The card of ``role``'s model; ``task_paper`` is the task's :attr:`~kdforge.tasks.base.Task.paper`, ``data``
    the validated data section (the recipe's own when None)."""
    teacher = recipe.teacher_label()
    what = "student"
    if role == "baseline":
        untrained = models.get("baseline", {}).get("train", {}).get("untrained")
        what = (
            "no-distillation baseline ("
            + ("the student as initialised, untrained" if untrained else "labels only")
            + ")"
        )
    meta = front_matter(recipe, role=role, library=library, data=data)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        f"# {recipe.name}: {what}",
        "",
    ]
    if teacher and role == "student":
        lines.append(f"Distilled with kdforge from the teacher `{teacher}` on the `{recipe.task}` task.")
    elif teacher:
        lines.append(f"Trained with kdforge on labels only, as the baseline for distilling `{teacher}`.")
    else:
        lines.append(f"Trained with kdforge on labels only (`{recipe.task}` task); no teacher.")
    lines += ["", "## Data", "", "```yaml", _yaml(recipe.data), "```", "", "## Objective", ""]
    lines += ["| term | loss | field | weight | params |", "|---|---|---|---|---|"]
    for name, term in zip(recipe.term_names(), recipe.objective):
        lines.append(f"| {name} | {term.loss} | {term.field} | {term.weight} | {term.params or ''} |")
    roles = [r for r in ("teacher", "student", "baseline") if r in models]
    metric_names = list(models[role]["metrics"])
    lines += ["", "## Results on the test split", "", "| model | " + " | ".join(metric_names) + " | parameters |"]
    lines.append("|---" * (len(metric_names) + 2) + "|")
    for r in roles:
        m = models[r]
        lines.append(
            f"| {r} | " + " | ".join(_fmt(m["metrics"].get(k)) for k in metric_names) + f" | {m['params']:,} |"
        )
    if "fidelity" in models[role]:
        fid = models[role]["fidelity"]
        lines += [
            "",
            f"Fidelity to the teacher: top-1 agreement {fid['top1_agreement']:.4f}, mean KL {fid['mean_kl']:.4f}.",
        ]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    lines += [
        "## Load",
        "",
        "```python",
        load_hint.format(folder="path/to/this/folder"),
        "```",
        "",
    ]
    cited = citations(recipe, task_paper)
    if cited:
        lines += ["## Citations", "", "The papers behind this run's losses, methods and task:", ""]
        lines += [f"- {paper.markdown()}: {', '.join(labels)}" for paper, labels in cited]
        lines += ["", "```bibtex", bibtex_entries(paper for paper, _ in cited), "```", ""]
    return "\n".join(lines)


def _yaml(section: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(section, sort_keys=False).rstrip()

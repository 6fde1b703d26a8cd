"""The README's tables of losses and methods, generated from the registries.

README.md holds the output of :func:`tables` between the two marker comments
:data:`START` and :data:`END`. After adding or changing a loss, a loss module or a
method, regenerate it::

    python -m kdforge.docs_tables --write README.md

``--check README.md`` exits 1 while the README is out of date (``tests/test_public_api.py``
checks the same), and with neither option the tables are printed. Only kdforge's own
components are listed, never a plugin's (a recipe's ``plugins:`` register their own).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdforge.losses import LOSS_MODULES, LOSSES, LossModuleSpec, LossSpec
from kdforge.provenance import Paper

if TYPE_CHECKING:
    from kdforge.methods.base import Method

START = "<!-- kdforge:methods-table:start -->"
END = "<!-- kdforge:methods-table:end -->"
#: the command that rewrites the README's tables
REGENERATE = "python -m kdforge.docs_tables --write README.md"


def _own(obj: Any) -> bool:
    """Defined in kdforge itself (not in a plugin a recipe or a test registered)."""
    return (getattr(obj, "__module__", "") or "").startswith("kdforge.")


def registered_losses() -> list[tuple[str, LossSpec | LossModuleSpec]]:
    """kdforge's losses, then its loss modules, each by name."""
    losses = [(name, spec) for name, spec in LOSSES.items() if _own(spec.fn)]
    return losses + [(name, spec) for name, spec in LOSS_MODULES.items() if _own(spec.cls)]


def method_registry():
    """:data:`kdforge.methods.base.METHODS`, after importing every method kdforge ships."""
    importlib.import_module("kdforge.methods")  # its __init__ imports (registers) each method
    from kdforge.methods.base import METHODS

    return METHODS


def registered_methods() -> list[tuple[str, type[Method]]]:
    return [(name, cls) for name, cls in method_registry().items() if _own(cls)]


# ----- cells ---------------------------------------------------------------------------


def _signature(fn: Any, *, drop_self: bool = False) -> str:
    """``fn``'s parameters without annotations: ``(student, teacher, *, temperature=4.0, mask=None)``."""
    params = list(inspect.signature(fn).parameters.values())
    if drop_self and params and params[0].name == "self":
        params = params[1:]
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return str(inspect.Signature(bare))


def call(name: str, spec: LossSpec | LossModuleSpec) -> str:
    """How code calls the loss it imports as ``from kdforge.losses import NAME`` (Markdown code spans).

    A loss: ``name(student, teacher, *, ...)``. A loss module: its constructor, then the call of the module built.
    """
    if isinstance(spec, LossModuleSpec):
        init = _signature(spec.cls.__init__, drop_self=True)
        forward = _signature(spec.cls.forward, drop_self=True)
        return f"`{name}{init}`, then `module{forward}`"
    return f"`{name}{_signature(spec.fn)}`"


def compares(spec: LossSpec | LossModuleSpec) -> str:
    """What the loss compares the student's output with (its ``target``)."""
    if spec.target == "teacher":
        return "teacher and labels" if spec.needs_labels else "teacher"
    return "labels" if spec.target == "labels" else "nothing (a regulariser)"


def needs(cls: type[Method]) -> str:
    """What a method asks of the run: a teacher, and the task's capabilities it requires."""
    parts = (["a teacher"] if getattr(cls, "needs_teacher", False) else []) + [
        f"`{c}`" for c in sorted(getattr(cls, "requires", ()))
    ]
    return ", ".join(parts) or "—"


def paper_markdown(paper: Paper | None) -> str:
    return paper.markdown() if paper is not None else "—"


def paper_text(paper: Paper | None) -> str:
    """The paper in plain text, for a terminal: ``Title (year) link``."""
    if paper is None:
        return "—"
    return f"{paper.title} ({paper.year})" + (f" {paper.link}" if paper.link else "")


def cell(text: str) -> str:
    """``text`` as one Markdown table cell: pipes, asterisks and angle brackets are literal, on one line."""
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


# ----- tables ----------------------------------------------------------------------------


def losses_table() -> str:
    lines = [
        "| kind | name | compares with | call | summary | paper |",
        "|---|---|---|---|---|---|",
    ]
    for name, spec in registered_losses():
        kind = "loss module" if isinstance(spec, LossModuleSpec) else "loss"
        # the call is code: only a pipe would break its cell
        lines.append(
            f"| {kind} | `{name}` | {compares(spec)} | {call(name, spec).replace('|', chr(92) + '|')}"
            f" | {cell(spec.summary)} | {paper_markdown(spec.paper)} |"
        )
    return "\n".join(lines)


def methods_table() -> str:
    methods = registered_methods()
    if not methods:
        return "No method is registered yet."
    lines = ["| method | summary | paper | needs |", "|---|---|---|---|"]
    for name, cls in methods:
        summary = cell(getattr(cls, "summary", ""))
        lines.append(f"| `{name}` | {summary} | {paper_markdown(getattr(cls, 'paper', None))} | {needs(cls)} |")
    return "\n".join(lines)


def tables() -> str:
    """What README.md holds between :data:`START` and :data:`END`."""
    return "\n".join(
        [
            f"<!-- generated from the registries by `{REGENERATE}`; edits by hand are overwritten -->",
            "",
            "Losses and loss modules (`from kdforge.losses import NAME`; a recipe term names them in `loss`):",
            "",
            losses_table(),
            "",
            "Methods (a recipe lists them in `methods: [{name: NAME, ...}]`):",
            "",
            methods_table(),
        ]
    )


def replace_tables(text: str, content: str | None = None) -> str:
    """``text`` (a README) with ``content`` (default: :func:`tables`) between its markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {START} and {END} are missing, or in the wrong order")
    content = tables() if content is None else content
    return text[: start + len(START)] + "\n" + content + "\n" + text[end:]


def current_tables(text: str) -> str | None:
    """What ``text`` holds between the markers (None without them)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(START) : end].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdforge.docs_tables", description="the README's tables of losses and methods"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="README", type=Path, help="rewrite the tables between the markers")
    group.add_argument("--check", metavar="README", type=Path, help="exit 1 when the tables are out of date")
    args = parser.parse_args(argv)
    path = args.write or args.check
    if path is None:
        print(tables())
        return 0
    try:
        text = path.read_text(encoding="utf-8")
        updated = replace_tables(text)
    except (OSError, ValueError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{path}: the tables of losses and methods are out of date; run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: tables updated")
    else:
        print(f"{path}: tables already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

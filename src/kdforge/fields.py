"""The fields a recipe can set, for ``kdforge fields TASK``: generated from the pydantic schemas.

Every field appears with its dotted path (what ``--set`` takes), its type, its default and its
description, nested sections expanded. The reference is read off the schemas themselves (the
recipe's, the task's ``student_schema`` and ``data_schema``, each teacher signal's and each
method's settings), so it never falls behind them.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kdforge.recipe import Recipe


@dataclass(frozen=True)
class FieldRow:
    path: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    title: str
    rows: list[FieldRow]


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (alone, optional, or a list of them) and the path suffix of one item."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if a is not type(None)]
        return _nested(models[0]) if len(models) == 1 else (None, "")
    if origin is list and args:
        model, suffix = _nested(args[0])
        return (model, "[i]" + suffix) if model is not None else (None, "")
    return None, ""


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(str(a) if isinstance(a, str) else json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _type_text(info: FieldInfo) -> str:
    text = _type_name(info.annotation)
    for rule in info.metadata:
        for kind, attr, op in _BOUNDS:
            if isinstance(rule, kind):
                text += f", {op} {getattr(rule, attr)}"
        if isinstance(rule, annotated_types.MinLen):
            text += f", at least {rule.min_length}"
    return text


def _value_text(value: Any) -> str:
    """A default as a recipe (YAML) writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value != value.strip() else value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None and not info.default_factory_takes_validated_data:
        return _value_text(info.default_factory())  # type: ignore[call-arg]
    return _value_text(info.default)


def _own_doc(model: type[BaseModel]) -> str:
    """The first line of the model's own docstring (not one it inherits), or nothing."""
    doc = (model.__dict__.get("__doc__") or "").replace("``", "`")  # reST's literals, as Markdown's
    return " ".join(doc.strip().split("\n\n")[0].split())


def field_rows(model: type[BaseModel], prefix: str = "", *, skip: tuple[str, ...] = ()) -> list[FieldRow]:
    """One row per field of ``model`` under ``prefix``; a nested section's row, then its fields'."""
    rows: list[FieldRow] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        path = f"{prefix}.{name}" if prefix else name
        nested, suffix = _nested(info.annotation)
        description = " ".join((info.description or (_own_doc(nested) if nested else "")).split())
        rows.append(FieldRow(path, _type_text(info), _default_text(info), description))
        if nested is not None:
            rows.extend(field_rows(nested, path + suffix))
    return rows


#: what the recipe's own schema leaves to others: the sections of the task, the teacher, the methods
_ELSEWHERE = ("teacher", "student", "data", "methods")


def reference(task: str | None) -> list[Section]:
    """The sections of ``task``'s recipes (every task's common ones only, when None), in recipe order."""
    from kdforge.docs_tables import method_registry
    from kdforge.signals import SIGNALS
    from kdforge.tasks import TASKS

    task_cls = TASKS.get(task, field="TASK") if task is not None else None
    top = [_section_type(row) for row in field_rows(Recipe) if "." not in row.path and "[" not in row.path]
    sections = [Section("recipe (the top level; each section below is one of these)", top)]
    if task_cls is not None:
        sections.append(Section(f"student (task {task})", field_rows(task_cls.student_schema, "student")))
        sections.append(Section(f"data (task {task})", field_rows(task_cls.data_schema, "data")))
    for name, info in Recipe.model_fields.items():
        nested, suffix = _nested(info.annotation)
        if nested is not None and name not in _ELSEWHERE:
            sections.append(Section(name, field_rows(nested, name + suffix)))
    for name, signal in SIGNALS.items():
        if signal.config is not None:
            rows = field_rows(signal.config, "teacher")
            sections.append(Section(f"teacher, with signal: {name} ({_own_doc(signal.config)})", rows))
    for name, cls in method_registry().items():
        if task_cls is not None and not cls.requires <= task_cls.capabilities:
            continue  # a method the task cannot serve
        named = FieldRow("methods[i].name", name, "required", " ".join(getattr(cls, "summary", "").split()))
        sections.append(Section(f"methods[i], with name: {name}", [named, *field_rows(cls.settings, "methods[i]")]))
    return sections


#: the recipe's sections that its own schema keeps as mappings (each validated by another schema, below)
_MAPPING_SECTIONS = {"teacher": "section | null", "student": "section", "data": "section"}


def _section_type(row: FieldRow) -> FieldRow:
    kind = _MAPPING_SECTIONS.get(row.path)
    return row if kind is None else FieldRow(row.path, kind, row.default, row.description)


def render(sections: list[Section]) -> list[str]:
    """Plain lines, columns aligned across every section; nothing is cut, whatever the width."""
    rows = [row for section in sections for row in section.rows]
    # a column is as wide as its longest cell up to a cap: a long type (a list of choices) pushes
    # its own line's next cells along rather than widening every line
    widths = [
        min(max(len(getattr(row, col)) for row in rows), cap)
        for col, cap in (("path", 36), ("type", 24), ("default", 16))
    ]
    lines: list[str] = []
    for section in sections:
        lines += ["", f"{section.title}:"]
        for row in section.rows:
            cells = (row.path.ljust(widths[0]), row.type.ljust(widths[1]), row.default.ljust(widths[2]))
            lines.append(("  " + "  ".join(cells) + "  " + row.description).rstrip())
    return lines[1:]

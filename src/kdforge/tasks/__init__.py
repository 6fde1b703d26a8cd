"""Tasks: one module per kind of distillation, registered in TASKS."""

from kdforge.tasks import causal_lm as _causal_lm  # noqa: F401  (registers the task)
from kdforge.tasks import classification as _classification  # noqa: F401  (registers the task)
from kdforge.tasks import embedding as _embedding  # noqa: F401  (registers the task)
from kdforge.tasks import ranking as _ranking  # noqa: F401  (registers the task)
from kdforge.tasks import sparse_retriever as _sparse_retriever  # noqa: F401  (registers the task)
from kdforge.tasks import text_classification as _text_classification  # noqa: F401  (registers the task)
from kdforge.tasks import vq_index as _vq_index  # noqa: F401  (registers the task)
from kdforge.tasks.base import TASKS, Evaluation, Splits, Task

__all__ = ["TASKS", "Task", "Splits", "Evaluation"]

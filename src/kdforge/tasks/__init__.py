"""Tasks: one module per kind of distillation, registered in TASKS.

Each is registered by name and imported when a recipe names it (``TASKS.get``): a digits
run never loads sentence-transformers or faiss, which the encoder tasks need.
"""

from kdforge.tasks.base import TASKS, Evaluation, Splits, Task

for _name in (
    "causal_lm",
    "classification",
    "embedding",
    "ranking",
    "sparse_retriever",
    "text_classification",
    "vq_index",
):
    TASKS.lazy(_name, f"kdforge.tasks.{_name}")

__all__ = ["TASKS", "Task", "Splits", "Evaluation"]

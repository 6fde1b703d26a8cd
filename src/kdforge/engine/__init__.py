"""The task-agnostic training engine."""

from kdforge.engine.trainer import TrainResult, train

__all__ = ["train", "TrainResult"]

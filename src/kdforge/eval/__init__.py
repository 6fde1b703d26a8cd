"""Evaluation: fidelity to the teacher, speed and size (task metrics live in each task)."""

from kdforge.eval.fidelity import fidelity
from kdforge.eval.speed import Speed, count_parameters, size_on_disk, throughput, timed_throughput

__all__ = ["fidelity", "count_parameters", "size_on_disk", "throughput", "timed_throughput", "Speed"]

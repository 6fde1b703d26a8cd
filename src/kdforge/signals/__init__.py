"""Teacher signals (online now; cached, served and ensembles join the same registry)."""

from kdforge.signals import online as _online  # noqa: F401  (registers "online")
from kdforge.signals.base import SIGNALS, Adapter, TeacherSignal
from kdforge.signals.online import OnlineTeacher

__all__ = ["SIGNALS", "Adapter", "TeacherSignal", "OnlineTeacher"]

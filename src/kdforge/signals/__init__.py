"""Teacher signals: online, cached, served and ensembles, in one registry (``teacher.signal``)."""

from kdforge.signals import cached as _cached  # noqa: F401  (registers "cache")
from kdforge.signals import ensemble as _ensemble  # noqa: F401  (registers "ensemble")
from kdforge.signals import online as _online  # noqa: F401  (registers "online")
from kdforge.signals import served as _served  # noqa: F401  (registers "served")
from kdforge.signals.base import SIGNALS, Adapter, TeacherSignal
from kdforge.signals.cached import CachedTeacher
from kdforge.signals.ensemble import EnsembleTeacher
from kdforge.signals.online import OnlineTeacher
from kdforge.signals.served import ServedTeacher

__all__ = ["SIGNALS", "Adapter", "TeacherSignal", "CachedTeacher", "OnlineTeacher", "ServedTeacher", "EnsembleTeacher"]

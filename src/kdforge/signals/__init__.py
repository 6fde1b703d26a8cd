"""Teacher signals: online, cached, served and ensembles, in one registry (``teacher.signal``).

Each kind is one module that registers its signal with the schema of its recipe section
and how it is built from one (see :mod:`kdforge.signals.base`).
"""

from kdforge.signals import cached as _cached  # noqa: F401  (registers "cache")
from kdforge.signals import ensemble as _ensemble  # noqa: F401  (registers "ensemble")
from kdforge.signals import online as _online  # noqa: F401  (registers "online")
from kdforge.signals import served as _served  # noqa: F401  (registers "served")
from kdforge.signals.base import (
    SIGNALS,
    Adapter,
    BuiltSignal,
    SignalConfig,
    TeacherSignal,
    build_signal,
    signal_names,
    teacher_config,
    teacher_members,
)
from kdforge.signals.cached import CachedTeacher, CacheTeacherConfig
from kdforge.signals.ensemble import EnsembleTeacher, EnsembleTeacherConfig
from kdforge.signals.online import OnlineTeacher, OnlineTeacherConfig
from kdforge.signals.served import ServedTeacher, ServedTeacherConfig

__all__ = [
    "SIGNALS",
    "Adapter",
    "BuiltSignal",
    "SignalConfig",
    "TeacherSignal",
    "build_signal",
    "signal_names",
    "teacher_config",
    "teacher_members",
    "CachedTeacher",
    "CacheTeacherConfig",
    "OnlineTeacher",
    "OnlineTeacherConfig",
    "ServedTeacher",
    "ServedTeacherConfig",
    "EnsembleTeacher",
    "EnsembleTeacherConfig",
]

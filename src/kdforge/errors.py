"""Errors a user can cause and fix.

Every mistake a user can make (a wrong recipe field, a missing file, a model that
cannot be found) raises a subclass of :class:`KDForgeError` whose message names the
field or file and says what to do. The CLI prints that message on one line and
exits with code 2; anything else is a bug in kdforge and keeps its traceback.
"""


class KDForgeError(Exception):
    """A mistake the user can fix; the message says how."""


class RecipeError(KDForgeError):
    """A recipe field is missing, mistyped or inconsistent with another."""


class ModelRefError(KDForgeError):
    """A model reference (folder, hub id, package:NAME) cannot be resolved or loaded."""


class RunDirError(KDForgeError):
    """The output folder is in a state the command cannot work with."""


class CheckpointError(KDForgeError):
    """A checkpoint is missing, incomplete or unsafe to load."""


class Interrupted(KDForgeError):
    """The run was stopped by a signal after saving a checkpoint."""


class CacheError(KDForgeError):
    """A teacher cache is missing, corrupt, incomplete, or was made for another run."""


class ServedTeacherError(KDForgeError):
    """A served teacher cannot be reached or answered something unusable."""


class DataError(RecipeError):
    """A dataset is missing, or a file in it is unreadable or malformed (the message names file and line)."""


def first_line(exc: BaseException) -> str:
    """An exception's message on one line, for a one-line error (torch's messages can run to several)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__

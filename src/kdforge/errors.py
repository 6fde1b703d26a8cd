"""Errors a user can cause and fix.

Every mistake a user can make (a wrong recipe field, a missing file, a model that
cannot be found) raises a subclass of :class:`KDForgeError` whose message names the
field or file and says what to do. The CLI prints that message on one line (a recipe
with several wrong fields: one line for each) and exits with code 2; anything else is a
bug in kdforge and keeps its traceback.
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
    """The run was stopped by a signal after saving its work (a checkpoint, a cache shard)."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 130 if self.signal_name == "SIGINT" else 143


class NonFiniteError(KDForgeError):
    """A loss, a gradient or a teacher output is NaN or inf at some step of training."""

    def __init__(self, message: str, term: str | None = None):
        super().__init__(message)
        #: what produced it: an objective term's name, ``total``, ``gradient`` or ``teacher.<field>``
        self.term = term


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

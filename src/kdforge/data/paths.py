"""Where a recipe's data paths point: as given, else under ``KDFORGE_DATA_DIR``."""

from __future__ import annotations

from pathlib import Path

from kdforge.errors import DataError
from kdforge.settings import data_dir


def resolve_data_path(path: str, field: str = "data.path") -> Path:
    """Where a recipe's dataset path points: file or folder.

    An absolute path, or a relative one that exists from the current folder, is taken as
    it is; any other relative path is looked up under :func:`kdforge.settings.data_dir`
    (``KDFORGE_DATA_DIR``, default ``../shared/data``). Raises :class:`DataError` naming
    ``field`` when neither exists.
    """
    given = Path(path).expanduser()
    if given.exists():
        return given
    if given.is_absolute():
        raise DataError(f"{field}: {path} does not exist; set {field} to the dataset's location")
    under_data_dir = data_dir() / given
    if under_data_dir.exists():
        return under_data_dir
    raise DataError(
        f"{field}: {path} does not exist (looked in the current folder and in KDFORGE_DATA_DIR={data_dir()});"
        f" set KDFORGE_DATA_DIR to the folder holding your datasets or give {field} as a full path"
    )

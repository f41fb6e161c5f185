"""The guard for server-side paths, and the database token of the cached queries.

Where the files live is :mod:`polcore.settings` (one definition for the CLI, training and the dashboard);
the functions here only forward to it.
"""

from __future__ import annotations

from pathlib import Path

from polcore import settings

__all__ = ["ROOT", "data_dir", "db_path", "uploads_dir", "resolve_data_path", "db_token"]

#: Repository root (the folder holding app.py).
ROOT = settings.ROOT


def data_dir() -> Path:
    """The data directory (:func:`polcore.settings.data_dir`)."""
    return settings.data_dir()


def db_path() -> Path:
    """The DuckDB file (:func:`polcore.settings.db_path`)."""
    return settings.db_path()


def uploads_dir() -> Path:
    """Folder that receives browser uploads (:func:`polcore.settings.uploads_dir`)."""
    return settings.uploads_dir()


def resolve_data_path(text: str) -> Path:
    """Resolve a user-given server-side path and refuse anything outside the data directory.

    Parameters
    ----------
    text : path typed by the user, absolute or relative to the data directory.

    Returns
    -------
    The resolved file path (symlinks followed).

    Raises
    ------
    ValueError
        Empty input, a path that resolves outside the data directory (``..``, symlinks, absolute paths
        elsewhere), or one that does not name an existing file.
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("Give a path to a scan file under the data directory.")
    base = data_dir()
    raw = Path(text).expanduser()
    if not raw.is_absolute():
        raw = base / raw
    resolved = raw.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"Refused: {text!r} is outside the data directory {base}.")
    if not resolved.exists():
        raise ValueError(f"No such file under the data directory: {text!r}.")
    if not resolved.is_file():
        raise ValueError(f"{text!r} is not a file (give one scan file).")
    return resolved


def db_token(path: Path | None = None) -> tuple:
    """A value that changes whenever the database file (or its write-ahead log) changes.

    Cached query wrappers take it as an argument so that a write by an ingest (in this process or by the CLI)
    invalidates their entries. Returns ``()`` when the file does not exist.
    """
    path = Path(path) if path is not None else db_path()
    out = []
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(out)

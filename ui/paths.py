"""The guard for server-side paths, and the database token of the cached queries.

Where the files live is :mod:`polcore.settings` (one definition for the CLI, training and the dashboard);
the functions here only forward to it.
"""

from __future__ import annotations

from pathlib import Path

from polcore import settings

__all__ = [
    "ROOT",
    "MAX_PATH_BYTES",
    "MAX_NAME_BYTES",
    "data_dir",
    "db_path",
    "uploads_dir",
    "resolve_data_path",
    "db_token",
]

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


#: Longest path the Upload page accepts [bytes, UTF-8] (Linux PATH_MAX), and longest single name (NAME_MAX).
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


def _shown(text: str, limit: int = 80) -> str:
    """``repr`` of user input, shortened for a message."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 20] + " ... " + text[-15:])


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
        Empty input, a path that is too long (over :data:`MAX_PATH_BYTES`, or a name over
        :data:`MAX_NAME_BYTES`) or holds a NUL character, a path that resolves outside the data directory
        (``..``, symlinks, absolute paths elsewhere), or one that does not name an existing, readable file.
        Never an ``OSError``: the message is meant for the page.
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("Give a path to a scan file under the data directory.")
    if "\x00" in text:
        raise ValueError("Refused: the path contains a NUL character.")
    n_bytes = len(text.encode("utf-8", "surrogateescape"))
    if n_bytes > MAX_PATH_BYTES:
        raise ValueError(
            f"Refused: the path is too long ({n_bytes} bytes; at most {MAX_PATH_BYTES}). Give the path of a "
            "scan file under the data directory."
        )
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in Path(text).parts), default=0)
    if longest > MAX_NAME_BYTES:
        raise ValueError(
            f"Refused: a file or folder name in the path is too long ({longest} bytes; at most "
            f"{MAX_NAME_BYTES}): {_shown(text)}."
        )
    base = data_dir()
    try:
        raw = Path(text).expanduser()
        if not raw.is_absolute():
            raw = base / raw
        resolved = raw.resolve()
        if resolved != base and base not in resolved.parents:
            raise ValueError(f"Refused: {_shown(text)} is outside the data directory {base}.")
        if not resolved.exists():
            raise ValueError(f"No such file under the data directory: {_shown(text)}.")
        if not resolved.is_file():
            raise ValueError(f"{_shown(text)} is not a file (give one scan file).")
    except OSError as exc:  # too long once resolved, permissions, a loop of links, ...
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"Cannot use the path {_shown(text)}: {reason}.") from exc
    except RuntimeError as exc:  # expanduser without a home, a symlink loop on older Pythons
        raise ValueError(f"Cannot use the path {_shown(text)}: {exc}.") from exc
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

"""What may be opened: regular files only, told apart with ``os.lstat`` / ``os.stat`` *before* any ``open``.

A named pipe (FIFO) would block the server's job on ``open``; a device such as ``/dev/zero`` never ends; a
directory, socket, dangling or looping symbolic link is not a scan. :func:`check_regular_file` refuses all of
them with a reason ("not a regular file: named pipe (FIFO)", "symbolic link loop") and never opens the path.
:func:`open_regular` opens for reading with ``O_NONBLOCK`` and re-checks the opened descriptor with ``fstat``
(a path swapped for a pipe between the check and the open is refused, not waited on).

Side files that a format names by convention (Merlin ``.hdr``, DECTRIS data and metadata files) are read only
when :func:`sibling_file` accepts them: a regular file in the same folder as the scan file, also after
resolving symbolic links.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from polcore.io.errors import ScanFormatError

__all__ = ["check_regular_file", "open_regular", "sibling_file", "file_kind"]


def file_kind(mode: int) -> str:
    """Words for the type of an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "unknown file type"


def _stat_error(path, exc: OSError, role: str) -> ScanFormatError:
    prefix = "" if role == "file" else f"{role}: "
    if exc.errno == errno.ELOOP:
        return ScanFormatError(path, f"{prefix}symbolic link loop (the link resolves to itself)")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ScanFormatError(path, f"{prefix}file not found")
    if exc.errno == errno.EACCES:
        return ScanFormatError(path, f"{prefix}permission denied")
    if exc.errno == errno.ENAMETOOLONG:
        return ScanFormatError(path, f"{prefix}file name too long")
    return ScanFormatError(path, f"{prefix}cannot be examined: {exc.strerror or exc}")


def check_regular_file(path, role: str = "file") -> os.stat_result:
    """``os.stat`` of ``path`` when it is a regular file (a symbolic link to one is followed); else refuse.

    Never opens ``path``. ``role`` prefixes the reason for side files (e.g. ``"acquisition header"``).

    Raises
    ------
    ScanFormatError
        "file not found", "dangling symbolic link (its target does not exist)", "symbolic link loop",
        "not a regular file: named pipe (FIFO)" / "character device" / "is a directory" / ...
    """
    prefix = "" if role == "file" else f"{role}: "
    try:
        lst = os.lstat(path)
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL byte
        if isinstance(exc, ValueError):
            raise ScanFormatError(path, f"{prefix}invalid file name ({exc})") from exc
        raise _stat_error(path, exc, role) from exc
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise ScanFormatError(
                    path, f"{prefix}dangling symbolic link (its target does not exist)"
                ) from exc
            raise _stat_error(path, exc, role) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ScanFormatError(path, f"{prefix}not a regular file: {file_kind(st.st_mode)}")
    return st


def open_regular(path, role: str = "file"):
    """Open a regular file for binary reading (unbuffered); refuse anything else without blocking on it."""
    check_regular_file(path, role)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _stat_error(path, exc, role) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            prefix = "" if role == "file" else f"{role}: "
            raise ScanFormatError(path, f"{prefix}not a regular file: {file_kind(st.st_mode)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def sibling_file(scan_path, sibling, role: str) -> Path | None:
    """``sibling`` (a file a format names next to ``scan_path``) when it may be read; None when it is absent.

    It must be a regular file in the folder of ``scan_path``, also after resolving symbolic links (a link
    pointing into another folder is refused). Raises :class:`ScanFormatError` naming the scan file and the
    side file otherwise.
    """
    scan_path, sibling = Path(scan_path), Path(sibling)
    try:
        os.lstat(sibling)
    except FileNotFoundError:
        return None
    except OSError:
        pass  # reported by check_regular_file below
    try:
        check_regular_file(sibling, role)
    except ScanFormatError as exc:
        raise ScanFormatError(scan_path, f"{role} {sibling.name}: {exc.reason}") from exc
    if sibling.parent != scan_path.parent:
        raise ScanFormatError(scan_path, f"{role} {sibling} is not in the folder of the scan file")
    allowed = {Path(os.path.realpath(scan_path)).parent, Path(os.path.realpath(scan_path.parent))}
    if Path(os.path.realpath(sibling)).parent not in allowed:
        raise ScanFormatError(
            scan_path, f"{role} {sibling.name} is a symbolic link out of the scan file's folder; not read"
        )
    return sibling

"""In-process and cross-process locking of the prediction store's DuckDB file, and ingest ownership.

DuckDB refuses a read-write connection next to a read-only one in the same process, so every database
file gets one writer-preferring readers-writer lock per process (:func:`_process_lock`); a lock conflict
with another process is recognised by :func:`_is_lock_conflict` and retried by
:meth:`polcore.store.PredictionStore.connect` (the lock design is described in :mod:`polcore.store.store`).

Ingest ownership
----------------
An ingest holds its scan row ('ingesting') under an *owner* string ``host:pid:start-token``
(:func:`new_owner`): the host name, the process id, and a token made of the process's start time (from
``/proc/<pid>/stat``, so that a reused pid is not mistaken for the owner) and a random nonce (so that two
ingests in one process, e.g. two dashboard threads, are different owners). :func:`owner_alive` decides
whether the owner of a row still lives:

* same host: the process ``pid`` exists, is not a zombie, and (where ``/proc`` tells) started at the
  recorded time; for this very process: the ingest is still running (:func:`release_owner` not called yet),
  so that a row left by a failed rollback in a long-lived process (the dashboard) does not block forever;
* another host (the database on a shared file system): its ``heartbeat_at`` (written every
  :data:`HEARTBEAT_S` seconds by the ingest) is younger than ``stale_after_s`` (:data:`STALE_AFTER_S`);
* no owner recorded (a row written by polbench before schema version 3): its last heartbeat or creation is
  younger than ``stale_after_s``.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from datetime import datetime
from pathlib import Path

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "new_owner", "release_owner", "owner_alive", "pid_alive"]

#: Seconds between two heartbeats of a running ingest.
HEARTBEAT_S = 30.0
#: An 'ingesting' row of another host (or without owner) is stale when its heartbeat is older than this [s].
STALE_AFTER_S = 600.0

#: Fragments of DuckDB's error messages when another process (or connection mode) holds the file.
_LOCK_PATTERNS = ("could not set lock", "conflicting lock", "different configuration")


# --------------------------------------------------------------------------------------------------------
# in-process readers-writer lock (DuckDB refuses mixed read-only / read-write connections in one process)


class _RWLock:
    """Writer-preferring readers-writer lock with timeouts."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire(self, write: bool, timeout: float) -> bool:
        with self._cond:
            if write:
                self._writers_waiting += 1
                try:
                    ok = self._cond.wait_for(lambda: not self._writer and self._readers == 0, timeout)
                finally:
                    self._writers_waiting -= 1
                if ok:
                    self._writer = True
                else:
                    self._cond.notify_all()
                return ok
            ok = self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0, timeout)
            if ok:
                self._readers += 1
            return ok

    def release(self, write: bool) -> None:
        with self._cond:
            if write:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()


_LOCKS: dict[str, _RWLock] = {}
_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> _RWLock:
    key = str(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = _RWLock()
        return lock


def _is_lock_conflict(err: Exception) -> bool:
    msg = str(err).lower()
    return any(p in msg for p in _LOCK_PATTERNS)


# --------------------------------------------------------------------------------------------------------
# ingest ownership (who holds an 'ingesting' scan row, and whether it still lives)


def _hostname() -> str:
    return socket.gethostname().replace(":", "_") or "localhost"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), or None where unavailable."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return text[text.rfind(")") + 1 :].split()


def _start_token(pid: int) -> str:
    """The process's start time in clock ticks since boot ('0' where ``/proc`` is unavailable)."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else "0"


_LIVE_OWNERS: set[str] = set()  # owners of this process whose ingest has not ended
_LIVE_GUARD = threading.Lock()


def new_owner() -> str:
    """A fresh owner string ``host:pid:start.nonce`` for one ingest of this process (live until
    :func:`release_owner`)."""
    pid = os.getpid()
    owner = f"{_hostname()}:{pid}:{_start_token(pid)}.{secrets.token_hex(4)}"
    with _LIVE_GUARD:
        _LIVE_OWNERS.add(owner)
    return owner


def release_owner(owner: str) -> None:
    """The ingest of ``owner`` (from :func:`new_owner`) has ended: a row it left behind is stale now."""
    with _LIVE_GUARD:
        _LIVE_OWNERS.discard(owner)


def pid_alive(pid: int, start: str | None = None) -> tuple[bool, str]:
    """Whether process ``pid`` of this host lives (and, given ``start``, is the one that started then)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False, f"process {pid} is gone"
    except PermissionError:
        pass  # exists, owned by another user
    except (OverflowError, ValueError):
        return False, f"process id {pid!r} is invalid"
    fields = _proc_stat(pid)
    if fields is not None:
        if fields and fields[0] in ("Z", "X"):
            return False, f"process {pid} has exited (zombie)"
        if start not in (None, "", "0") and len(fields) > 19 and fields[19] != start:
            return False, f"process {pid} is gone (the pid now belongs to another process)"
    return True, f"process {pid} is running"


def owner_alive(owner: str | None, heartbeat_at: datetime | None, created_at: datetime | None, *,
                now: datetime, stale_after_s: float = STALE_AFTER_S) -> tuple[bool, str]:
    """(alive, why) for the owner of an 'ingesting' / 'failed' scan row (rules in the module docstring)."""
    last = heartbeat_at or created_at
    age = (now - last).total_seconds() if last is not None else float("inf")
    if not owner:
        return age < stale_after_s, f"no owner recorded; last heartbeat {age:.0f} s ago"
    parts = owner.split(":", 2)
    if len(parts) == 3 and parts[0] == _hostname() and parts[1].isdigit():
        if int(parts[1]) == os.getpid():
            with _LIVE_GUARD:
                live = owner in _LIVE_OWNERS
            return live, f"ingest {owner} of this process has {'not ' if live else ''}ended"
        return pid_alive(int(parts[1]), parts[2].split(".", 1)[0])
    return age < stale_after_s, f"last heartbeat {age:.0f} s ago (stale after {stale_after_s:.0f} s)"

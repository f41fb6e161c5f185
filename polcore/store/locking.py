"""In-process and cross-process locking of the prediction store's DuckDB file.

DuckDB refuses a read-write connection next to a read-only one in the same process, so every database
file gets one writer-preferring readers-writer lock per process (:func:`_process_lock`); a lock conflict
with another process is recognised by :func:`_is_lock_conflict` and retried by
:meth:`polcore.store.PredictionStore.connect` (the lock design is described in :mod:`polcore.store.store`).
"""

from __future__ import annotations

import threading
from pathlib import Path

__all__: list[str] = []

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

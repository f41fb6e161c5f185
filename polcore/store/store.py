"""PredictionStore: the only owner of the DuckDB file that holds scans, models, runs and predictions.

Lock design
-----------
DuckDB locks the database file per *process*: one process may open it read-write, and while it does no other
process can open it at all; several processes may open it read-only at once, but any of them blocks a writer.
Within one process, connections must all use the same mode. So that the dashboard (a long-running process
with many threads) and the CLI (``python -m polcore ingest/bench/demo``, another process) can share one file:

* **No process keeps a connection open.** Every operation opens a short-lived connection with
  :meth:`PredictionStore.connect` and closes it when done (a read takes about 0.01-0.1 s, connection
  included). The store object itself holds no connection, so it is cheap to create and safe to cache
  (``st.cache_resource``) and to share between threads.
* **Readers open read-only**, so any number of them, in any number of processes, run side by side.
* **Writers hold the write lock only for one transaction** (:meth:`PredictionStore.transaction`): a whole
  run (tens of thousands of rows) is written in well under a second, then the connection is closed and the
  file is free again. A long ingest therefore interleaves with the dashboard's reads instead of blocking it.
* **Both retry with backoff.** A lock conflict (``duckdb.IOException: Could not set lock ...``) is retried
  with exponential backoff plus jitter (20 ms doubling to 0.5 s) until ``lock_timeout`` (10 s by default)
  has passed, then :class:`StoreBusyError` is raised with a message that says what holds the file.
* **Inside one process**, a readers-writer lock per database file serialises writers against readers, because
  DuckDB refuses to open a read-write connection next to a read-only one in the same process. It prefers
  writers (new readers wait while a writer waits) and shares the same ``lock_timeout``.

A run is written in one transaction: its ``runs`` row is inserted with ``status = 'running'``, the
predictions are bulk-inserted from an Arrow table (``INSERT ... SELECT``, never ``executemany``), and the row
is set to ``'finished'`` last. An exception or a killed process before ``COMMIT`` leaves the store exactly as
it was (DuckDB writes nothing to its WAL before commit; blocks written optimistically are freed).

An ingest writes all its runs (every model, both layers), the model rows it needs and its scan's change to
'ready' in ONE transaction (:meth:`PredictionStore.write_runs`). Its scan row is claimed first, as
'ingesting' under an owner ``host:pid:start-token`` with a heartbeat (:meth:`PredictionStore.claim_scan`,
:mod:`polcore.store.locking`); a rollback removes the row only while it is still the caller's
(:meth:`PredictionStore.abandon_ingest`), a second ingest of the same file waits while the owner lives, and
rows of dead owners are removed by :meth:`PredictionStore.cleanup_stale_ingests` (logged).

Only polbench's own files are opened: an existing path must be a DuckDB file that carries the
``polbench_store`` marker (or the layout of a version-2 store, migrated in place when opened for writing).
Directories, empty, text, HDF5 and truncated files and other programs' DuckDB databases are refused with a
one-line :class:`StoreError` before anything is written: they are inspected with a read-only connection
only. A new store is built in a temporary file and hard-linked into place, so a path never holds a
half-created store.

Every SQL statement goes through :class:`StoreConnection`, which binds values as ``?`` parameters and
re-raises DuckDB errors as :class:`StoreError` carrying the SQL. This module imports neither torch nor
streamlit.

The pieces live in sibling modules: :mod:`polcore.store.locking` (the in-process readers-writer lock and
lock-conflict detection), :mod:`polcore.store.connection` (:class:`StoreConnection`, the errors, JSON
helpers) and :mod:`polcore.store.frames` (validation of the writers' frames and their conversion to Arrow).
This module holds :class:`PredictionStore` and re-exports the public names of the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from polcore.store.connection import (
    StoreBusyError,
    StoreConnection,
    StoreError,
    StoreNotFoundError,
    _now,
    _to_json,
)
from polcore.store.frames import (
    _SMALLINT_MAX,
    PREDICTION_COLUMNS,
    _check_frame,
    _check_layer,
    _finite,
    _int_column,
    _labels_column,
    _prediction_columns,
    _predictions_arrow,
)
from polcore.store.locking import (
    STALE_AFTER_S,
    _is_lock_conflict,
    _process_lock,
    owner_alive,
    pid_alive,
)
from polcore.store.schema import (
    ADDED_SCAN_COLUMNS,
    DDL,
    EMBEDDING_SPACES,
    IMAGE_KINDS,
    LEGACY_TABLES,
    LEGACY_VERSIONS,
    SCAN_KINDS,
    SCAN_STATUSES,
    SCHEMA_VERSION,
    STORE_MARKER,
    TABLES,
)
from polcore.types import N_CLASSES

__all__ = [
    "PredictionStore",
    "ScanClaim",
    "StoreConnection",
    "StoreError",
    "StoreBusyError",
    "StoreNotFoundError",
    "PREDICTION_COLUMNS",
]

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_DUCKDB_HEADER = 3 * 4096  # main header + two database headers, then the blocks
_SCAN_STATUS_KEEP = ("ingesting", "failed")  # statuses whose rows belong to a (maybe dead) ingest


def _one_line(text: str) -> str:
    """``text`` on one line (DuckDB's messages may span several)."""
    return " ".join(str(text).split())


class ScanClaim(NamedTuple):
    """What :meth:`PredictionStore.claim_scan` found: ``state`` is 'claimed' (a new 'ingesting' row now
    owned by the caller), 'stored' (the scan is stored and ready) or 'busy' (another live process,
    ``holder``, is ingesting it). ``removed``: the id of a row of a dead ingest of the same file that was
    removed first (its feature files are the caller's to remove), else None."""

    scan_id: int
    state: str
    holder: str | None
    removed: int | None = None


class PredictionStore:
    """The DuckDB prediction store (see the module docstring for the lock design).

    Parameters
    ----------
    path : str or PathLike
        Database file. Created (with its parent folder and the schema) on construction unless
        ``read_only``. An existing file must be a polbench store: anything else (another program's DuckDB
        database, a directory, an empty, text, HDF5 or truncated file) raises a one-line
        :class:`StoreError` and is left untouched; a version-2 store is migrated in place.
    read_only : bool
        Only read; write methods raise :class:`StoreError`. The file is not touched on construction: use
        :meth:`exists` before reading; reading a missing file raises :class:`StoreNotFoundError`.
    lock_timeout : float
        Seconds to keep retrying while another process (or thread) holds a conflicting lock, then
        :class:`StoreBusyError`.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False, lock_timeout: float = 10.0):
        if str(path) in ("", ":memory:"):
            raise ValueError(
                "PredictionStore needs a database file path (in-memory databases are not supported)"
            )
        if not (lock_timeout >= 0 and math.isfinite(lock_timeout)):
            raise ValueError(f"lock_timeout must be a finite number of seconds >= 0, got {lock_timeout!r}")
        self.path = Path(path).expanduser().resolve()
        self.read_only = bool(read_only)
        self.lock_timeout = float(lock_timeout)
        self._jitter = random.Random(os.getpid())
        self._schema_ok = False
        if not self.read_only:
            self._open_for_writing()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"PredictionStore({str(self.path)!r}, {mode})"

    # ---------------------------------------------------------------------------------------- connections

    def exists(self) -> bool:
        """True when the file exists and holds a polbench schema (False for a missing or foreign file).

        A store of another schema version exists too (reading it then raises :class:`StoreError`).
        """
        if not self.path.is_file():
            return False
        try:
            self._inspect_file()
            with self._connect(True, check_schema=False) as con:
                self._check_complete(con)
                return self._store_kind(con)[0] != "foreign"
        except StoreBusyError:
            return True  # a writer holds it: it exists
        except StoreError:
            return False

    def _open(self, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        """Open a connection, retrying lock conflicts with backoff until ``deadline`` (monotonic)."""
        delay = 0.02
        attempts = 0
        while True:
            if read_only and not self.path.is_file():
                raise StoreNotFoundError(
                    f"no prediction store at {self.path}: build one with `python -m polcore demo` or "
                    f"`python -m polcore ingest ... --db {self.path}`"
                )
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as err:
                if read_only and "does not exist" in str(err):
                    continue  # removed between the check and the open: reported above
                if not _is_lock_conflict(err):
                    raise StoreError(
                        f"cannot open {self.path} as a prediction store: {_one_line(str(err))}"
                    ) from err
                attempts += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreBusyError(
                        f"prediction store {self.path} stayed locked for {self.lock_timeout:.1f} s "
                        f"({attempts} attempts to open it {'read-only' if read_only else 'for writing'}). "
                        "DuckDB lets one process write at a time and a writer excludes readers; polbench "
                        "holds the file only briefly, so retry, or stop the other program (a `python -m "
                        f"polcore` command or another dashboard) if it is stuck. DuckDB said: {err}"
                    ) from err
                log.debug("store %s locked (%s); retry in %.3f s", self.path, err, delay)
                time.sleep(min(delay * (0.5 + self._jitter.random()), remaining))
                delay = min(delay * 2.0, 0.5)

    def connect(self, read_only: bool = True) -> AbstractContextManager[StoreConnection]:
        """Short-lived connection (closed on exit), opened with the lock retry described above.

        Parameters
        ----------
        read_only : bool
            Open read-only (the default; many readers may run at once) or read-write (exclusive: prefer
            :meth:`transaction`). The first read-only connection checks the schema version.
        """
        return self._connect(read_only, check_schema=True)

    @contextmanager
    def _connect(self, read_only: bool, *, check_schema: bool) -> Iterator[StoreConnection]:
        if not read_only and self.read_only:
            raise StoreError(f"{self!r} was opened read-only: cannot open a read-write connection")
        if check_schema and not self._schema_ok:
            self._inspect_file()  # a directory, text, HDF5 or truncated file: a clear error, nothing opened
        deadline = time.monotonic() + self.lock_timeout
        lock = _process_lock(self.path)
        if not lock.acquire(not read_only, self.lock_timeout):
            raise StoreBusyError(
                f"prediction store {self.path} stayed locked by another thread of this process for "
                f"{self.lock_timeout:.1f} s (a long write, or a connection nested inside another one)"
            )
        try:
            raw = self._open(read_only, deadline)
            try:
                con = StoreConnection(raw, self.path, read_only)
                if read_only and check_schema and not self._schema_ok:
                    self._check_schema(con)
                yield con
            finally:
                raw.close()
        finally:
            lock.release(not read_only)

    @contextmanager
    def transaction(self) -> Iterator[StoreConnection]:
        """Read-write connection inside ``BEGIN ... COMMIT``; any exception rolls back and re-raises."""
        with self.connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                try:
                    con.raw.rollback()
                except duckdb.Error as err:  # the exception being raised matters more
                    log.warning("rollback failed on %s: %s", self.path, err)
                raise
            else:
                con.execute("COMMIT")

    def fetch_df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run one read query on a short-lived read-only connection; result as a DataFrame."""
        with self.connect(read_only=True) as con:
            return con.df(sql, params)

    # ------------------------------------------------------------------------------------------- schema

    def _inspect_file(self) -> None:
        """Refuse, with a one-line :class:`StoreError` and without opening it, a path that exists but cannot
        be a DuckDB database: a directory, an empty, text, HDF5 or truncated file. A missing path passes."""
        p = self.path
        if p.is_dir():
            raise StoreError(
                f"{p} is a directory, not a polbench prediction store (give a database file, e.g. "
                f"{p / 'polbench.duckdb'})"
            )
        if not p.exists():
            if os.path.lexists(p):
                raise StoreError(f"{p} is a broken symbolic link, not a polbench prediction store")
            return
        if not p.is_file():
            raise StoreError(f"{p} is not a regular file, so not a polbench prediction store")
        try:
            with open(p, "rb") as fh:
                head = fh.read(_DUCKDB_HEADER)
                size = os.fstat(fh.fileno()).st_size
        except OSError as err:
            raise StoreError(f"cannot read {p}: {err.strerror or err}") from err
        if size == 0:
            raise StoreError(
                f"{p} is an empty file, not a polbench prediction store (remove it to create a new store there)"
            )
        if head.startswith(_HDF5_MAGIC):
            raise StoreError(f"{p} is an HDF5 file (a scan?), not a polbench prediction store (a DuckDB file)")
        if head[8:12] != b"DUCK":
            raise StoreError(f"{p} is not a DuckDB database, so not a polbench prediction store")
        if size < _DUCKDB_HEADER:
            raise StoreError(f"{p} is a truncated DuckDB file ({size} bytes, less than its headers)")

    def _check_complete(self, con: StoreConnection) -> None:
        """Refuse a truncated file whose headers survived: every block it uses, metadata and each table's data
        (``pragma_storage_info``: about 0.1 s per GB, once per store object), must lie inside the file."""
        try:
            size = os.path.getsize(self.path)
            block = con.scalar("SELECT block_size FROM pragma_database_size()")
            top = con.scalar("SELECT max(block_id) FROM pragma_metadata_info()")
            for (table,) in con.fetchall(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
            ):
                last = con.scalar(
                    "SELECT max(greatest(block_id, coalesce(list_max(additional_block_ids), -1))) "
                    "FROM pragma_storage_info(?)",
                    [table],
                )
                if last is not None and (top is None or last > top):
                    top = last
        except (StoreError, OSError):  # a DuckDB without these functions: nothing to check with
            return
        if block and top is not None and size < _DUCKDB_HEADER + (int(top) + 1) * int(block):
            raise StoreError(
                f"{self.path} is a truncated DuckDB file ({size} bytes; its block {top} lies beyond the end)"
            )

    def _store_kind(self, con: StoreConnection) -> tuple[str, int | None, set[str]]:
        """('polbench' | 'legacy' | 'foreign', schema version, table names) of an open file.

        'polbench': the marker row is there; 'legacy': the layout of a store written before the marker
        existed (``schema_version`` below :data:`SCHEMA_VERSION` and the store's tables); anything else is
        'foreign'.
        """
        tables: set[str] = set()
        try:
            tables = {
                r[0]
                for r in con.fetchall(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                    "AND schema_name = 'main'"
                )
            }
            if "polbench_store" in tables and "schema_version" in tables:
                if con.scalar("SELECT count(*) FROM polbench_store WHERE marker = ?", [STORE_MARKER]):
                    return "polbench", con.scalar("SELECT max(version) FROM schema_version"), tables
                return "foreign", None, tables
            if set(LEGACY_TABLES) <= tables:
                version = con.scalar("SELECT max(version) FROM schema_version")
                if isinstance(version, int) and version < SCHEMA_VERSION:
                    return "legacy", version, tables
        except StoreError:  # a table of that name with other columns: not ours
            pass
        return "foreign", None, tables

    def _foreign(self, tables: set[str]) -> StoreError:
        if not tables:
            return StoreError(
                f"{self.path} is an empty DuckDB database, not a polbench prediction store (no polbench_store "
                "marker); it was left untouched: remove it to create a new store there"
            )
        return StoreError(
            f"{self.path} is a DuckDB database but not a polbench prediction store (no polbench_store "
            "marker); refusing to open it, it was left untouched"
        )

    def _open_for_writing(self) -> None:
        """Check (read-only) an existing file, migrate it in place if it is older, or create a new store."""
        if not os.path.lexists(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._create():
                self._schema_ok = True
                return
        self._inspect_file()
        with self._connect(True, check_schema=False) as con:
            self._check_complete(con)
            kind, version, tables = self._store_kind(con)
        if kind == "foreign":
            raise self._foreign(tables)
        self._check_version(version)
        if kind == "legacy" or not set(TABLES) <= tables:
            with self.transaction() as con:  # another process may have migrated it meanwhile: _apply_schema checks
                kind, version, tables = self._store_kind(con)
                if kind == "foreign":
                    raise self._foreign(tables)
                self._check_version(version)
                self._apply_schema(con, version)
        self._schema_ok = True

    def _create(self) -> bool:
        """Create a new store atomically: the schema is written into a temporary file in the same folder,
        which is then hard-linked to the path (never over an existing file). False when another process
        created the path first (the caller then opens that one)."""
        p = self.path
        for old in p.parent.glob(f".{p.name}.*.creating"):  # left by a creator killed before the link
            pid = old.name[len(p.name) + 2 :].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid))[0]:
                old.unlink(missing_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}-{secrets.token_hex(4)}.creating")
        try:
            try:
                raw = duckdb.connect(str(tmp))
            except duckdb.Error as err:
                raise StoreError(f"cannot create a prediction store at {p}: {_one_line(str(err))}") from err
            try:
                con = StoreConnection(raw, tmp, False)
                con.execute("BEGIN TRANSACTION")
                self._apply_schema(con, None)
                con.execute("COMMIT")
            finally:
                raw.close()
            try:
                os.link(tmp, p)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system: rename, unless another process was first
                if os.path.lexists(p):
                    return False
                os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
            Path(f"{tmp}.wal").unlink(missing_ok=True)
        log.info("created prediction store %s (schema version %d)", p, SCHEMA_VERSION)
        return True

    def _apply_schema(self, con: StoreConnection, version: int | None) -> None:
        """Inside a write transaction: create missing tables and columns, the marker and the version row
        (``version`` None: a new file; an older version: migrate in place with ``ALTER TABLE``)."""
        for stmt in DDL:
            con.execute(stmt)
        have = {r[0] for r in con.fetchall(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = 'scans'"
        )}
        for column, sql_type in ADDED_SCAN_COLUMNS:
            if column not in have:
                con.execute(f"ALTER TABLE scans ADD COLUMN {column} {sql_type}")
        if not con.scalar("SELECT count(*) FROM polbench_store WHERE marker = ?", [STORE_MARKER]):
            con.execute("INSERT INTO polbench_store VALUES (?, ?)", [STORE_MARKER, _now()])
        if version != SCHEMA_VERSION:
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, _now()])
            if version is not None:
                log.info("migrated prediction store %s from schema version %d to %d", self.path, version,
                         SCHEMA_VERSION)

    def _check_version(self, version: int | None) -> None:
        """Accept the current version and the legacy ones (read as they are, migrated when written)."""
        if version is None:
            raise StoreError(f"{self.path} is not a polbench prediction store (schema_version is empty)")
        if version != SCHEMA_VERSION and version not in LEGACY_VERSIONS:
            newer = "a newer" if version > SCHEMA_VERSION else "an older"
            raise StoreError(
                f"{self.path} has schema version {version}, written by {newer} polbench; this one reads "
                f"version {SCHEMA_VERSION}. Rebuild it (`python -m polcore demo`) or use the matching "
                "polbench."
            )

    def _check_schema(self, con: StoreConnection) -> None:
        self._check_complete(con)
        kind, version, _ = self._store_kind(con)
        if kind == "foreign":
            raise StoreError(f"{self.path} is not a polbench prediction store (no polbench_store marker)")
        self._check_version(version)
        self._schema_ok = True

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self!r} was opened read-only: writes are not allowed")

    @staticmethod
    def _next_id(con: StoreConnection, table: str, n: int = 1) -> int:
        """First of ``n`` fresh ids for ``table`` (never reused; rolled back with the transaction)."""
        con.execute("INSERT INTO id_counters VALUES (?, 0) ON CONFLICT DO NOTHING", [table])
        last = con.scalar(
            "UPDATE id_counters SET last_id = last_id + ? WHERE name = ? RETURNING last_id", [n, table]
        )
        return int(last) - n + 1

    def counts(self) -> dict[str, int]:
        """Number of rows of every table (a cheap summary for the CLI and tests); a table that an older store
        read as it is lacks (``scan_images`` before version 4) counts 0."""
        with self.connect(read_only=True) as con:
            have = {r[0] for r in con.fetchall(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "AND schema_name = 'main'"
            )}
            return {t: int(con.scalar(f"SELECT count(*) FROM {t}")) if t in have else 0 for t in TABLES}

    # ------------------------------------------------------------------------------------- scans, models

    def add_scan(
        self,
        *,
        name: str,
        kind: str,
        sha256: str,
        ny: int,
        nx: int,
        ky: int | None = None,
        kx: int | None = None,
        dataset: str | None = None,
        source_file: str | os.PathLike | None = None,
        step_nm: float | None = None,
        thickness_nm: float | None = None,
        cell_px: float | None = None,
        has_ground_truth: bool = False,
        meta: Mapping[str, Any] | None = None,
        status: str = "ready",
    ) -> int:
        """Register a scan; idempotent by ``sha256`` (returns the existing ``scan_id`` unchanged).

        Parameters
        ----------
        name : str
            Display name.
        kind : {'synthetic', 'pseudo_experimental', 'experimental'}
        sha256 : str
            Hex SHA-256 of the scan file (``polcore.io.sha256_file``), 64 characters.
        ny, nx : int
            Probe positions (scan rows, columns).
        ky, kx : int, optional
            Detector pixels.
        dataset : str, optional
            Benchmark row the scan belongs to, e.g. ``'synthetic 20 nm'``.
        source_file : path, optional
        step_nm : float, optional
            Probe step [nm].
        thickness_nm : float, optional
            Nominal thickness [nm]; None when unknown or varying.
        cell_px : float, optional
            Lattice period in scan pixels.
        has_ground_truth : bool
        meta : mapping, optional
            Anything else (calibration, composer config); stored as JSON.
        status : {'ready', 'ingesting', 'failed'}
            Status of a newly inserted scan (an ingest inserts 'ingesting' and sets 'ready' or 'failed'
            with :meth:`set_scan_status` when done). A scan already stored keeps its status.

        Returns
        -------
        int
            scan_id.
        """
        self._require_writable()
        if status not in SCAN_STATUSES:
            raise ValueError(f"status must be one of {SCAN_STATUSES}, got {status!r}")
        values = self._scan_values(
            name=name, kind=kind, sha256=sha256, ny=ny, nx=nx, ky=ky, kx=kx, dataset=dataset,
            source_file=source_file, step_nm=step_nm, thickness_nm=thickness_nm, cell_px=cell_px,
            has_ground_truth=has_ground_truth, meta=meta,
        )
        with self.transaction() as con:
            existing = con.scalar("SELECT scan_id FROM scans WHERE sha256 = ?", [values["sha256"]])
            if existing is not None:
                log.info("scan %r already stored as scan_id %d (same sha256)", name, existing)
                return int(existing)
            scan_id = self._insert_scan(con, values, status, owner=None)
        log.info("stored scan %r as scan_id %d", name, scan_id)
        return scan_id

    @staticmethod
    def _scan_values(*, name, kind, sha256, ny, nx, ky, kx, dataset, source_file, step_nm, thickness_nm,
                     cell_px, has_ground_truth, meta) -> dict[str, Any]:
        """Validated column values of a scan row (see :meth:`add_scan`)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if kind not in SCAN_KINDS:
            raise ValueError(f"kind must be one of {SCAN_KINDS}, got {kind!r}")
        sha = str(sha256).lower()
        if not _SHA256_RE.match(sha):
            raise ValueError(f"sha256 must be 64 hex characters (polcore.io.sha256_file), got {sha256!r}")
        dims = {"ny": ny, "nx": nx, "ky": ky, "kx": kx}
        for key, value in dims.items():
            if value is None and key in ("ky", "kx"):
                continue
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if ny > _SMALLINT_MAX or nx > _SMALLINT_MAX:
            raise ValueError(f"scans up to {_SMALLINT_MAX} positions per axis are supported, got {ny}x{nx}")
        for key, value in {"step_nm": step_nm, "thickness_nm": thickness_nm, "cell_px": cell_px}.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number or None, got {value!r}")
        return {
            "name": name,
            "kind": kind,
            "dataset": dataset,
            "source_file": None if source_file is None else str(source_file),
            "sha256": sha,
            "ny": int(ny),
            "nx": int(nx),
            "ky": None if ky is None else int(ky),
            "kx": None if kx is None else int(kx),
            "step_nm": None if step_nm is None else float(step_nm),
            "thickness_nm": None if thickness_nm is None else float(thickness_nm),
            "cell_px": None if cell_px is None else float(cell_px),
            "has_ground_truth": bool(has_ground_truth),
            "meta_json": _to_json(dict(meta) if meta else None),
        }

    def _insert_scan(self, con: StoreConnection, values: dict[str, Any], status: str, *, owner: str | None) -> int:
        """Insert a validated scan row (inside a transaction); returns its new scan_id."""
        scan_id = self._next_id(con, "scans")
        now = _now()
        row = {"scan_id": scan_id, **values, "created_at": now, "status": status, "owner": owner,
               "heartbeat_at": now if owner else None}
        con.execute(
            f"INSERT INTO scans ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
        )
        return scan_id

    # ------------------------------------------------------------------------------- ingest ownership

    def claim_scan(self, *, owner: str, stale_after_s: float = STALE_AFTER_S, **scan: Any) -> ScanClaim:
        """Start the ingest of a scan: insert its row as 'ingesting', owned by ``owner``, in one transaction.

        Parameters
        ----------
        owner : str
            ``host:pid:start-token`` of the calling ingest (:func:`polcore.store.locking.new_owner`).
        stale_after_s : float
            Heartbeat age after which the owner of a row on another host counts as dead.
        **scan
            The keywords of :meth:`add_scan` (except ``status``).

        Returns
        -------
        ScanClaim
            'claimed' (a new row, now ours), 'stored' (the scan is stored and ready: nothing claimed), or
            'busy' (another live process, ``holder``, holds its row: wait or give up, never delete it). A
            row left by a dead process is removed first (logged as a warning), then claimed.
        """
        self._require_writable()
        if not owner:
            raise ValueError("owner must be a non-empty string (polcore.store.locking.new_owner())")
        values = self._scan_values(**{k: scan.get(k) for k in (
            "name", "kind", "sha256", "ny", "nx", "ky", "kx", "dataset", "source_file", "step_nm",
            "thickness_nm", "cell_px", "meta")}, has_ground_truth=scan.get("has_ground_truth", False))
        unknown = set(scan) - set(values) - {"meta", "has_ground_truth"}
        if unknown:
            raise TypeError(f"claim_scan() got unexpected keywords {sorted(unknown)}")
        removed = []
        with self.transaction() as con:
            row = con.fetchone(
                "SELECT scan_id, status, owner, heartbeat_at, created_at, name FROM scans WHERE sha256 = ?",
                [values["sha256"]],
            )
            if row is not None:
                sid, status, holder, heartbeat, created, name = row
                if status == "ready":
                    return ScanClaim(int(sid), "stored", holder)
                alive, why = owner_alive(holder, heartbeat, created, now=_now(), stale_after_s=stale_after_s)
                if alive:
                    return ScanClaim(int(sid), "busy", holder)
                self._delete_scan_rows(con, int(sid))
                removed.append((int(sid), name, status, holder, why))
            scan_id = self._insert_scan(con, values, "ingesting", owner=owner)
        self._log_removed(removed)
        log.info("scan %r claimed as scan_id %d by %s", values["name"], scan_id, owner)
        return ScanClaim(scan_id, "claimed", owner, removed[0][0] if removed else None)

    def heartbeat(self, scan_id: int, owner: str) -> bool:
        """Say that ``owner`` still ingests ``scan_id``; False when the row is no longer its 'ingesting' row."""
        self._require_writable()
        with self.transaction() as con:
            hit = con.scalar(
                "UPDATE scans SET heartbeat_at = ? WHERE scan_id = ? AND owner = ? AND status = 'ingesting' "
                "RETURNING scan_id",
                [_now(), int(scan_id), owner],
            )
        return hit is not None

    def abandon_ingest(self, scan_id: int, owner: str) -> bool:
        """Roll back a failed ingest: mark its scan 'failed', then remove it with every row that refers to it
        (two transactions), but only while the row is still ``owner``'s: a row another process holds, or a
        scan that became 'ready', is left alone. True when the row was removed."""
        self._require_writable()
        scan_id = int(scan_id)
        with self.transaction() as con:
            row = con.fetchone("SELECT status, owner FROM scans WHERE scan_id = ?", [scan_id])
            if row is None or row[1] != owner or row[0] == "ready":
                state = "gone" if row is None else f"{row[0]!r}, owner {row[1]}"
                log.warning("scan %d is no longer held by this ingest (%s): left as it is", scan_id, state)
                return False
            con.execute("UPDATE scans SET status = 'failed' WHERE scan_id = ?", [scan_id])
        with self.transaction() as con:
            if con.scalar("SELECT owner FROM scans WHERE scan_id = ? AND status = 'failed'", [scan_id]) != owner:
                return False
            out = self._delete_scan_rows(con, scan_id)
        log.info("removed scan %d of a failed ingest: %s", scan_id, out)
        return True

    def cleanup_stale_ingests(self, stale_after_s: float = STALE_AFTER_S) -> list[int]:
        """Remove the 'ingesting' / 'failed' scans whose owner is dead, with their runs (one transaction).

        An owner is dead when, on this host, its process is gone (or the pid belongs to another process
        now), or, for another host or a row without owner, its heartbeat is older than ``stale_after_s``
        (:func:`polcore.store.locking.owner_alive`). Each removal is logged as a warning naming the scan and
        its dead owner. Returns the removed scan ids (the caller removes their feature files).
        """
        self._require_writable()
        with self.connect(read_only=True) as con:
            rows = con.fetchall(
                "SELECT scan_id, owner, heartbeat_at, created_at FROM scans "
                "WHERE status IN ('ingesting', 'failed') ORDER BY scan_id"
            )
        now = _now()
        stale = [r[0] for r in rows if not owner_alive(r[1], r[2], r[3], now=now, stale_after_s=stale_after_s)[0]]
        if not stale:
            return []  # the usual case: no write lock taken
        removed = []
        with self.transaction() as con:
            for sid in stale:
                row = con.fetchone(
                    "SELECT status, owner, heartbeat_at, created_at, name FROM scans WHERE scan_id = ?", [sid]
                )
                if row is None or row[0] not in _SCAN_STATUS_KEEP:
                    continue
                alive, why = owner_alive(row[1], row[2], row[3], now=now, stale_after_s=stale_after_s)
                if not alive:
                    self._delete_scan_rows(con, int(sid))
                    removed.append((int(sid), row[4], row[0], row[1], why))
        self._log_removed(removed)
        return [r[0] for r in removed]

    @staticmethod
    def _log_removed(removed: list[tuple]) -> None:
        for sid, name, status, holder, why in removed:
            log.warning(
                "removed the stale %s scan %d (%r) left by a dead ingest: owner %s, %s",
                status, sid, name, holder or "unknown", why,
            )

    def set_scan_status(self, scan_id: int, status: str) -> None:
        """Set the ``status`` of a stored scan (one transaction).

        Parameters
        ----------
        scan_id : int
            Existing scan.
        status : {'ready', 'ingesting', 'failed'}

        Raises
        ------
        ValueError
            For a status not in :data:`~polcore.store.schema.SCAN_STATUSES` or an unknown ``scan_id``.
        """
        self._require_writable()
        if status not in SCAN_STATUSES:
            raise ValueError(f"status must be one of {SCAN_STATUSES}, got {status!r}")
        scan_id = int(scan_id)
        with self.transaction() as con:
            if con.scalar("SELECT count(*) FROM scans WHERE scan_id = ?", [scan_id]) == 0:
                raise ValueError(f"unknown scan_id {scan_id}")
            con.execute("UPDATE scans SET status = ? WHERE scan_id = ?", [status, scan_id])
        log.info("scan %d status set to %r", scan_id, status)

    def scan_status(self, scan_id: int) -> str | None:
        """Status of the scan ``scan_id`` ('ready', 'ingesting' or 'failed'); None when it is not stored."""
        with self.connect(read_only=True) as con:
            status = con.scalar("SELECT status FROM scans WHERE scan_id = ?", [int(scan_id)])
        return None if status is None else str(status)

    def add_model(
        self,
        *,
        name: str,
        family: str,
        head: str,
        variant: str = "",
        seed: int | None = None,
        config: Mapping[str, Any] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        library_sha256: str | None = None,
        train_seconds: float | None = None,
        n_params: int | None = None,
    ) -> int:
        """Register a trained model; idempotent by ``name`` (returns the existing ``model_id`` unchanged).

        Parameters
        ----------
        name : str
            Unique name, e.g. ``'resnet-cls-s0'``.
        family, head : str
            Model family (custom_cnn, resnet, vgg, pca_knn, ...) and head (cls, reg, proto, ...).
        variant : str
            Training variant (augmentation, CoM filter, ...), '' for the default.
        seed : int, optional
        config : mapping, optional
            Full training configuration, stored as JSON.
        checkpoint_path : path, optional
        library_sha256 : str, optional
            Hash of the pattern library the model was trained on.
        train_seconds : float, optional
            Training wall time [s].
        n_params : int, optional

        Returns
        -------
        int
            model_id.
        """
        self._require_writable()
        values = self._model_values(
            name=name, family=family, head=head, variant=variant, seed=seed, config=config,
            checkpoint_path=checkpoint_path, library_sha256=library_sha256, train_seconds=train_seconds,
            n_params=n_params,
        )
        with self.transaction() as con:
            model_id, new = self._insert_model(con, values)
        if new:
            log.info("stored model %r as model_id %d", name, model_id)
        else:
            log.info("model %r already stored as model_id %d", name, model_id)
        return model_id

    @staticmethod
    def _model_values(*, name, family, head, variant="", seed=None, config=None, checkpoint_path=None,
                      library_sha256=None, train_seconds=None, n_params=None) -> dict[str, Any]:
        """Validated column values of a model row (see :meth:`add_model`)."""
        for key, value in {"name": name, "family": family, "head": head}.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string, got {value!r}")
        if not isinstance(variant, str):
            raise ValueError(f"variant must be a string ('' for the default), got {variant!r}")
        if train_seconds is not None and not (math.isfinite(train_seconds) and train_seconds >= 0):
            raise ValueError(f"train_seconds must be a number >= 0 or None, got {train_seconds!r}")
        return {
            "name": name,
            "family": family,
            "head": head,
            "variant": variant,
            "seed": None if seed is None else int(seed),
            "config_json": _to_json(dict(config) if config else None),
            "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
            "library_sha256": library_sha256,
            "train_seconds": None if train_seconds is None else float(train_seconds),
            "n_params": None if n_params is None else int(n_params),
        }

    def _insert_model(self, con: StoreConnection, values: dict[str, Any]) -> tuple[int, bool]:
        """(model_id, inserted) for validated model values: an existing name keeps its row."""
        existing = con.scalar("SELECT model_id FROM models WHERE name = ?", [values["name"]])
        if existing is not None:
            return int(existing), False
        model_id = self._next_id(con, "models")
        row = {"model_id": model_id, **values, "created_at": _now()}
        con.execute(
            f"INSERT INTO models ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
        )
        return model_id, True

    def delete_models(self, model_ids: Iterable[int], *, only_unused: bool = True) -> int:
        """Remove models by id in one transaction (e.g. to roll back the models of a failed ingest).

        Parameters
        ----------
        model_ids : iterable of int
            Models to remove; ids that are not stored are ignored.
        only_unused : bool
            True: remove only the models that no run, embedding or domain-gap row refers to (the others
            are kept, with their rows). False: remove the models together with their runs, predictions,
            embeddings and domain-gap rows (``bench`` and ``heldout`` rows, keyed by name, are kept).

        Returns
        -------
        int
            Number of ``models`` rows deleted.
        """
        self._require_writable()
        ids = sorted({int(m) for m in model_ids})
        if not ids:
            return 0
        marks = ", ".join(["?"] * len(ids))
        with self.transaction() as con:
            if only_unused:
                n = con.scalar(
                    f"DELETE FROM models WHERE model_id IN ({marks}) "
                    "AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.model_id = models.model_id) "
                    "AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.model_id = models.model_id) "
                    "AND NOT EXISTS (SELECT 1 FROM domain_gap d WHERE d.model_id = models.model_id)",
                    ids,
                )
            else:
                self._delete_runs(con, f"model_id IN ({marks})", ids)
                con.execute(f"DELETE FROM embeddings WHERE model_id IN ({marks})", ids)
                con.execute(f"DELETE FROM domain_gap WHERE model_id IN ({marks})", ids)
                n = con.scalar(f"DELETE FROM models WHERE model_id IN ({marks})", ids)
        n = int(n or 0)
        log.info("deleted %d of %d models (only_unused=%s)", n, len(ids), only_unused)
        return n

    # --------------------------------------------------------------------------------------------- runs

    def find_run(self, model_id: int, scan_id: int, layer: str = "pattern") -> int | None:
        """run_id of the finished run of ``model_id`` on ``scan_id`` in ``layer``, or None."""
        _check_layer(layer)
        with self.connect(read_only=True) as con:
            rid = con.scalar(
                "SELECT run_id FROM runs WHERE model_id = ? AND scan_id = ? AND layer = ? AND status = 'finished'",
                [int(model_id), int(scan_id), layer],
            )
        return None if rid is None else int(rid)

    def has_run(self, model_id: int, scan_id: int, layer: str = "pattern") -> bool:
        """Whether a finished run of ``model_id`` on ``scan_id`` is stored (check before predicting)."""
        return self.find_run(model_id, scan_id, layer) is not None

    def write_run(
        self,
        model_id: int,
        scan_id: int,
        predictions: pd.DataFrame | Mapping[str, Any],
        *,
        seconds: float,
        device: str,
        config: Mapping[str, Any] | None = None,
        replace: bool = False,
        layer: str = "pattern",
    ) -> int:
        """Store one run's per-position predictions in a single transaction.

        Parameters
        ----------
        model_id, scan_id : int
            Existing model and scan.
        predictions : DataFrame or dict of arrays
            Columns from :data:`PREDICTION_COLUMNS`, one row per probe position: ``iy``, ``ix`` (int, scan
            row/column), ``pred`` (int class 0..7) required; ``probs`` (n, 8) float (a DataFrame column of
            length-8 sequences, or a 2-D array in a dict), ``confidence`` (n,) (default: max of ``probs``),
            ``true_label`` (n,) int (-1 or NaN = no label; default -1), ``thickness_nm`` (n,) [nm],
            ``region`` (n,) int, ``is_defect`` (n,) bool, ``irregularity`` (n,) float (NaN/None = unknown).
            A dict without ``iy``/``ix`` may hold (ny, nx) maps (``probs`` (ny, nx, 8)) in raster order,
            e.g. the arrays of ``polcore.infer.ScanPrediction``. Rows are sorted to (iy, ix) order.
        seconds : float
            Inference wall time [s].
        device : str
            Where it ran, e.g. 'cpu' or 'cuda:0'.
        config : mapping, optional
            Inference configuration (batch size, preprocessing, ...), stored as JSON.
        replace : bool
            If a finished run of this (model, scan) exists: False returns its run_id unchanged and writes
            nothing; True deletes it and writes the new one (same transaction).
        layer : {'pattern', 'cell'}
            'pattern': each position's own prediction; 'cell': the pooled prediction of the projected unit
            cell each position belongs to (one run per layer, so every query and page works on either).

        Returns
        -------
        int
            run_id.
        """
        self._require_writable()
        run = self._prepare_run(predictions, seconds=seconds, device=device, config=config, layer=layer)
        with self.transaction() as con:
            run_id = self._insert_run(con, int(model_id), int(scan_id), run, replace=replace)
        return run_id

    def write_runs(
        self,
        scan_id: int,
        runs: Sequence[Mapping[str, Any]],
        *,
        set_status: str | None = "ready",
        owner: str | None = None,
        models: Sequence[Mapping[str, Any]] = (),
        before_commit: Callable[[dict[str, int], list[int]], None] | None = None,
        images: Mapping[str, Any] | None = None,
        images_meta: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Store several runs of one scan, the models they need and the scan's new status in ONE transaction.

        This is how an ingest finishes: every run of every model (both layers) and the change to 'ready'
        become visible together, or, on any exception or a killed process, none of them.

        Parameters
        ----------
        scan_id : int
            Existing scan.
        runs : sequence of dict
            One per run: ``predictions`` and the keywords ``seconds``, ``device``, ``config``, ``layer``,
            ``replace`` of :meth:`write_run`, and the model as ``model_id`` (stored model) or ``model`` (the
            name of an entry of ``models``). Validated before the transaction starts.
        set_status : {'ready', 'ingesting', 'failed'} or None
            The scan's status after the runs (None: unchanged).
        owner : str, optional
            The ingest that holds the scan row: the transaction fails (:class:`StoreError`, nothing written)
            unless the scan is still 'ingesting' under this owner (another process may have judged it dead
            and removed it).
        models : sequence of dict
            :meth:`add_model` keywords of models to register (idempotent by name) in the same transaction.
        before_commit : callable, optional
            ``before_commit(model_ids, run_ids)`` (model name -> id for ``models``; the run ids in order) is
            called inside the transaction after every row is written, just before ``COMMIT`` (an ingest
            moves its feature files into place there); an exception rolls everything back.
        images : dict, optional
            The scan's virtual images (:data:`~polcore.store.schema.IMAGE_KINDS` -> (ny, nx) arrays, from
            :class:`polcore.virtual.VirtualImages`), written in the same transaction unless the scan has them
            already (stored once per scan); ``images_meta`` describes the detectors (JSON-able).

        Returns
        -------
        list of int
            run_id of each run (an existing finished run that is not replaced keeps its id).
        """
        self._require_writable()
        if set_status is not None and set_status not in SCAN_STATUSES:
            raise ValueError(f"status must be one of {SCAN_STATUSES}, got {set_status!r}")
        scan_id = int(scan_id)
        specs = [self._model_values(**m) for m in models]
        names = {m["name"] for m in specs}
        prepared = []
        for i, r in enumerate(runs):
            unknown = set(r) - {"model_id", "model", "predictions", "seconds", "device", "config", "layer",
                                "replace"}
            if unknown:
                raise ValueError(f"run {i}: unknown keys {sorted(unknown)}")
            if ("model_id" in r) == ("model" in r):
                raise ValueError(f"run {i}: give 'model_id' or 'model' (a name from models), not both or neither")
            if "model" in r and r["model"] not in names:
                raise ValueError(f"run {i}: model {r['model']!r} is not among the models to register")
            prep = self._prepare_run(r["predictions"], seconds=r["seconds"], device=r["device"],
                                     config=r.get("config"), layer=r.get("layer", "pattern"))
            prepared.append((r, prep))
        blobs = None if images is None else self._image_blobs(images)
        with self.transaction() as con:
            if owner is not None:
                row = con.fetchone("SELECT status, owner FROM scans WHERE scan_id = ?", [scan_id])
                if row is None or row[0] != "ingesting" or row[1] != owner:
                    state = "removed" if row is None else f"{row[0]!r}, owner {row[1]}"
                    raise StoreError(
                        f"scan {scan_id} is no longer held by this ingest ({owner}): it is {state}; "
                        "nothing was written"
                    )
            model_ids = {m["name"]: self._insert_model(con, m)[0] for m in specs}
            run_ids = [
                self._insert_run(con, model_ids[r["model"]] if "model" in r else int(r["model_id"]), scan_id,
                                 prep, replace=bool(r.get("replace", False)))
                for r, prep in prepared
            ]
            if set_status is not None:
                hit = con.scalar(
                    "UPDATE scans SET status = ?, heartbeat_at = NULL WHERE scan_id = ? RETURNING scan_id",
                    [set_status, scan_id],
                )
                if hit is None:
                    raise ValueError(f"unknown scan_id {scan_id}")
            if blobs is not None:
                self._insert_scan_images(con, scan_id, blobs, images_meta, replace=False)
            if before_commit is not None:
                before_commit(model_ids, run_ids)
        log.info("stored %d run(s) of scan %d in one transaction%s", len(run_ids), scan_id,
                 f", status {set_status!r}" if set_status else "")
        return run_ids

    @staticmethod
    def _image_blobs(images: Mapping[str, Any]) -> dict[str, tuple[int, int, bytes]]:
        """Validate the virtual images (outside any transaction): kind -> (ny, nx, float32 LE bytes)."""
        if not isinstance(images, Mapping):
            raise ValueError(f"images must be a dict of {IMAGE_KINDS} -> (ny, nx) arrays, got {type(images).__name__}")
        missing = [k for k in IMAGE_KINDS if k not in images]
        unknown = sorted(set(images) - set(IMAGE_KINDS))
        if missing or unknown:
            raise ValueError(f"images need exactly the kinds {IMAGE_KINDS}; missing {missing}, unknown {unknown}")
        out, shape = {}, None
        for k in IMAGE_KINDS:
            a = np.asarray(images[k], dtype="<f4")
            if a.ndim != 2 or min(a.shape) < 1:
                raise ValueError(f"image {k!r} must be a 2-D (ny, nx) array, got shape {a.shape}")
            if shape is not None and a.shape != shape:
                raise ValueError(f"image {k!r} has shape {a.shape}, the others {shape}")
            shape = a.shape
            out[k] = (int(a.shape[0]), int(a.shape[1]), np.ascontiguousarray(a).tobytes())
        return out

    @staticmethod
    def _insert_scan_images(con: StoreConnection, scan_id: int, blobs: dict[str, tuple[int, int, bytes]],
                            meta: Mapping[str, Any] | None, *, replace: bool) -> bool:
        """Write a scan's images inside a transaction (checked against the scan's shape); False when the scan
        had them and ``replace`` is off."""
        dims = con.fetchone("SELECT ny, nx FROM scans WHERE scan_id = ?", [scan_id])
        if dims is None:
            raise ValueError(f"unknown scan_id {scan_id}: add the scan first (add_scan)")
        shape = next(iter(blobs.values()))[:2]
        if tuple(shape) != tuple(dims):
            raise ValueError(f"images of shape {shape} do not match scan {scan_id}'s {dims[0]}x{dims[1]} positions")
        if con.scalar("SELECT count(*) FROM scan_images WHERE scan_id = ?", [scan_id]):
            if not replace:
                return False
            con.execute("DELETE FROM scan_images WHERE scan_id = ?", [scan_id])
        now, meta_json = _now(), _to_json(dict(meta) if meta else None)
        for kind, (ny, nx, data) in blobs.items():
            con.execute(
                "INSERT INTO scan_images (scan_id, kind, ny, nx, data, meta_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [scan_id, kind, ny, nx, data, meta_json, now],
            )
        return True

    def write_scan_images(self, scan_id: int, images: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                          *, replace: bool = False) -> bool:
        """Store a scan's virtual images (one transaction); an ingest writes them with its runs instead
        (:meth:`write_runs`). Returns False when the scan has images and ``replace`` is off (kept)."""
        self._require_writable()
        blobs = self._image_blobs(images)
        with self.transaction() as con:
            return self._insert_scan_images(con, int(scan_id), blobs, meta, replace=replace)

    @staticmethod
    def _prepare_run(predictions, *, seconds: float, device: str, config, layer: str) -> dict[str, Any]:
        """Validate one run's inputs (outside any transaction): the flat prediction columns and run fields."""
        _check_layer(layer)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a number >= 0, got {seconds!r}")
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty string, got {device!r}")
        cols = _prediction_columns(predictions)
        n = len(cols["pred"])
        if n == 0:
            raise ValueError("predictions are empty: a run needs at least one probe position")
        return {"cols": cols, "n": n, "seconds": float(seconds), "device": device,
                "config_json": _to_json(dict(config) if config else None), "layer": layer}

    def _insert_run(self, con: StoreConnection, model_id: int, scan_id: int, run: dict[str, Any], *,
                    replace: bool) -> int:
        """Write one prepared run inside a transaction: 'running' row, predictions, then 'finished'."""
        cols, n, seconds, layer = run["cols"], run["n"], run["seconds"], run["layer"]
        dims = con.fetchone("SELECT ny, nx FROM scans WHERE scan_id = ?", [scan_id])
        if dims is None:
            raise ValueError(f"unknown scan_id {scan_id}: add the scan first (add_scan)")
        if con.scalar("SELECT count(*) FROM models WHERE model_id = ?", [model_id]) == 0:
            raise ValueError(f"unknown model_id {model_id}: add the model first (add_model)")
        ny, nx = dims
        if int(cols["iy"].max()) >= ny or int(cols["ix"].max()) >= nx:
            raise ValueError(
                f"positions out of the scan's {ny}x{nx} grid: max iy {int(cols['iy'].max())}, "
                f"max ix {int(cols['ix'].max())}"
            )
        existing = con.fetchone(
            "SELECT run_id, status FROM runs WHERE model_id = ? AND scan_id = ? AND layer = ?",
            [model_id, scan_id, layer],
        )
        if existing is not None:
            if existing[1] == "finished" and not replace:
                log.info("run of model %d on scan %d exists (run_id %d): kept", model_id, scan_id, existing[0])
                return int(existing[0])
            self._delete_runs(con, "run_id = ?", [existing[0]])
        run_id = self._next_id(con, "runs")
        finished = _now()
        started = finished - timedelta(seconds=seconds)
        con.execute(
            "INSERT INTO runs (run_id, model_id, scan_id, started_at, finished_at, status, n_patterns, "
            "seconds, patterns_per_s, device, config_json, layer) "
            "VALUES (?, ?, ?, ?, NULL, 'running', ?, ?, ?, ?, ?, ?)",
            [run_id, model_id, scan_id, started, n, seconds, (n / seconds) if seconds > 0 else None,
             run["device"], run["config_json"], layer],
        )
        self._insert_predictions(con, _predictions_arrow(cols, run_id))
        self._finish_run(con, run_id, finished)
        log.info("stored run %d: model %d on scan %d, %d predictions", run_id, model_id, scan_id, n)
        return run_id

    @staticmethod
    def _insert_predictions(con: StoreConnection, table: pa.Table) -> None:
        """Bulk insert from a registered Arrow table (one ``INSERT ... SELECT``)."""
        name = "_polcore_predictions_in"
        cols = ", ".join(table.column_names)
        con.register(name, table)
        try:
            con.execute(f"INSERT INTO predictions ({cols}) SELECT {cols} FROM {name}")
        finally:
            con.unregister(name)

    @staticmethod
    def _finish_run(con: StoreConnection, run_id: int, finished_at: datetime) -> None:
        """Mark the run finished: the last statement of the run's transaction."""
        con.execute(
            "UPDATE runs SET status = 'finished', finished_at = ? WHERE run_id = ?", [finished_at, run_id]
        )

    @staticmethod
    def _delete_runs(con: StoreConnection, where: str, params: list) -> int:
        """Delete runs matching ``where`` (a constant clause with ``?``) and their predictions."""
        sub = f"SELECT run_id FROM runs WHERE {where}"
        n_pred = con.scalar(f"DELETE FROM predictions WHERE run_id IN ({sub})", params) or 0
        n_runs = con.scalar(f"DELETE FROM runs WHERE {where}", params) or 0
        log.info("deleted %d runs (%d predictions)", n_runs, n_pred)
        return int(n_runs)

    def delete_runs(self, run_ids: Iterable[int]) -> int:
        """Remove runs and their predictions (one transaction); unknown ids are ignored. Returns runs deleted."""
        self._require_writable()
        ids = [int(i) for i in run_ids]
        if not ids:
            return 0
        with self.transaction() as con:
            return self._delete_runs(con, f"run_id IN ({', '.join('?' * len(ids))})", ids)

    def delete_scan(self, scan_id: int) -> dict[str, int]:
        """Remove a scan with its runs, predictions, embeddings, domain-gap rows and virtual images (one
        transaction).

        Returns
        -------
        dict
            Rows deleted per table.
        """
        self._require_writable()
        scan_id = int(scan_id)
        with self.transaction() as con:
            if con.scalar("SELECT count(*) FROM scans WHERE scan_id = ?", [scan_id]) == 0:
                raise ValueError(f"unknown scan_id {scan_id}")
            out = self._delete_scan_rows(con, scan_id)
        log.info("deleted scan %d: %s", scan_id, out)
        return out

    @staticmethod
    def _delete_scan_rows(con: StoreConnection, scan_id: int) -> dict[str, int]:
        """Delete a scan's row and every row that refers to it (inside a transaction); rows deleted per table."""
        out = {
            "predictions": con.scalar(
                "DELETE FROM predictions WHERE run_id IN (SELECT run_id FROM runs WHERE scan_id = ?)", [scan_id]
            ),
            "runs": con.scalar("DELETE FROM runs WHERE scan_id = ?", [scan_id]),
            "embeddings": con.scalar("DELETE FROM embeddings WHERE scan_id = ?", [scan_id]),
            "domain_gap": con.scalar("DELETE FROM domain_gap WHERE scan_a = ? OR scan_b = ?", [scan_id, scan_id]),
            "scan_images": con.scalar("DELETE FROM scan_images WHERE scan_id = ?", [scan_id]),
            "scans": con.scalar("DELETE FROM scans WHERE scan_id = ?", [scan_id]),
        }
        return {k: int(v or 0) for k, v in out.items()}

    # ----------------------------------------------------------------------------- analysis results

    def write_embeddings(self, df: pd.DataFrame) -> int:
        """Store 2-D embeddings, replacing every ``(model_id, method, space)`` set present in ``df``.

        Parameters
        ----------
        df : DataFrame
            One row per embedded probe position: ``method`` (e.g. 'pca', 'umap'), ``space`` ('input' or
            'features'), ``scan_id``, ``iy``, ``ix``, ``e1``, ``e2``; optional ``model_id`` (required for
            'features'; None for model-independent input-space embeddings), ``true_label``, ``thickness_nm``.
            One set may mix scans (synthetic and experimental).

        Returns
        -------
        int
            Rows written.
        """
        self._require_writable()
        required = {"method", "space", "scan_id", "iy", "ix", "e1", "e2"}
        _check_frame(df, required, required | {"model_id", "true_label", "thickness_nm"}, "embeddings")
        n = len(df)
        model = df["model_id"] if "model_id" in df.columns else pd.Series([None] * n, index=df.index)
        model_arr = pa.array(pd.array(model, dtype="Int32"), type=pa.int32(), from_pandas=True)
        space = df["space"].astype(str).to_numpy()
        bad = sorted(set(space) - set(EMBEDDING_SPACES))
        if bad:
            raise ValueError(f"space must be one of {EMBEDDING_SPACES}, got {bad}")
        if np.any((space == "features") & model.isna().to_numpy()):
            raise ValueError("embeddings with space='features' need a model_id")
        method = df["method"].astype(str).to_numpy()
        if np.any(method == ""):
            raise ValueError("method must be a non-empty string such as 'pca' or 'umap'")
        e = np.stack([_finite(df[c], c, np.float32) for c in ("e1", "e2")])
        iy = _int_column(df["iy"], "iy", 0, _SMALLINT_MAX, np.int16)
        ix = _int_column(df["ix"], "ix", 0, _SMALLINT_MAX, np.int16)
        label = (
            _labels_column(df["true_label"].to_numpy())
            if "true_label" in df.columns
            else np.full(n, -1, np.int8)
        )
        thick = (
            df["thickness_nm"].to_numpy(dtype=np.float32)
            if "thickness_nm" in df.columns
            else np.full(n, np.nan)
        )
        table = pa.table(
            {
                "model_id": model_arr,
                "method": pa.array(method, pa.string()),
                "space": pa.array(space, pa.string()),
                "scan_id": pa.array(df["scan_id"].to_numpy(dtype=np.int64).astype(np.int32)),
                "iy": pa.array(iy),
                "ix": pa.array(ix),
                "e1": pa.array(e[0]),
                "e2": pa.array(e[1]),
                "true_label": pa.array(label, mask=label < 0),
                "thickness_nm": pa.array(np.asarray(thick, np.float32), from_pandas=True),
            }
        )
        name = "_polcore_embeddings_in"
        with self.transaction() as con:
            con.register(name, table)
            try:
                missing = con.fetchall(
                    f"SELECT DISTINCT scan_id FROM {name} WHERE scan_id NOT IN (SELECT scan_id FROM scans)"
                )
                if missing:
                    raise ValueError(f"unknown scan_id(s) {sorted(r[0] for r in missing)}")
                missing = con.fetchall(
                    f"SELECT DISTINCT model_id FROM {name} WHERE model_id IS NOT NULL "
                    "AND model_id NOT IN (SELECT model_id FROM models)"
                )
                if missing:
                    raise ValueError(f"unknown model_id(s) {sorted(r[0] for r in missing)}")
                con.execute(
                    f"DELETE FROM embeddings USING (SELECT DISTINCT model_id, method, space FROM {name}) AS "
                    "g "
                    "WHERE embeddings.model_id IS NOT DISTINCT FROM g.model_id AND embeddings.method = "
                    "g.method "
                    "AND embeddings.space = g.space"
                )
                con.execute(
                    "INSERT INTO embeddings (model_id, method, space, scan_id, iy, ix, e1, e2, true_label, "
                    "thickness_nm, created_at) SELECT model_id, method, space, scan_id, iy, ix, e1, e2, "
                    f"true_label, thickness_nm, ? FROM {name} ORDER BY model_id, method, space, scan_id, iy, "
                    "ix",
                    [_now()],
                )
            finally:
                con.unregister(name)
        return n

    def write_domain_gap(
        self,
        model_id: int,
        scan_a: int,
        scan_b: int,
        *,
        auc: float,
        mmd: float | None = None,
        n_a: int | None = None,
        n_b: int | None = None,
    ) -> None:
        """Store (replace) the domain-gap scores of one model between the features of two scans.

        Parameters
        ----------
        model_id, scan_a, scan_b : int
            Typically scan_a synthetic, scan_b experimental(-like).
        auc : float
            Classifier two-sample test ROC-AUC in [0, 1] (0.5 = indistinguishable).
        mmd : float, optional
            Maximum mean discrepancy.
        n_a, n_b : int, optional
            Samples used from each scan.
        """
        self._require_writable()
        if not (math.isfinite(auc) and 0.0 <= auc <= 1.0):
            raise ValueError(f"auc must lie in [0, 1], got {auc!r}")
        if mmd is not None and not math.isfinite(mmd):
            raise ValueError(f"mmd must be finite or None, got {mmd!r}")
        key = [int(model_id), int(scan_a), int(scan_b)]
        with self.transaction() as con:
            if con.scalar("SELECT count(*) FROM models WHERE model_id = ?", [key[0]]) == 0:
                raise ValueError(f"unknown model_id {key[0]}")
            found = con.scalar("SELECT count(*) FROM scans WHERE scan_id IN (?, ?)", key[1:])
            if found != len(set(key[1:])):
                raise ValueError(f"unknown scan_id in {key[1:]}")
            con.execute("DELETE FROM domain_gap WHERE model_id = ? AND scan_a = ? AND scan_b = ?", key)
            con.execute(
                "INSERT INTO domain_gap (model_id, scan_a, scan_b, auc, mmd, n_a, n_b, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [*key, float(auc), None if mmd is None else float(mmd), n_a, n_b, _now()],
            )

    def write_bench(self, df: pd.DataFrame) -> int:
        """Store (replace by ``(model_name, dataset)``) rows of the study's benchmark.

        Parameters
        ----------
        df : DataFrame
            One row per (model, dataset): ``model_name``, ``family``, ``head``, ``dataset``, ``accuracy``,
            ``macro_f1``, ``n`` (patterns evaluated); optional ``model_id``, ``variant`` ('' default),
            ``seed``, ``per_class_recall`` (length-8 sequences, NaN for absent classes).

        Returns
        -------
        int
            Rows written.
        """
        self._require_writable()
        required = {"model_name", "family", "head", "dataset", "accuracy", "macro_f1", "n"}
        _check_frame(df, required, required | {"model_id", "variant", "seed", "per_class_recall"}, "bench")
        if df.duplicated(["model_name", "dataset"]).any():
            raise ValueError("bench rows must be unique by (model_name, dataset)")
        n = len(df)
        for c in ("accuracy", "macro_f1"):
            v = df[c].to_numpy(dtype=float)
            if np.any((v < 0) | (v > 1)):
                raise ValueError(f"{c} must lie in [0, 1] (NaN allowed)")
        if "per_class_recall" in df.columns:
            pcr = np.full((n, N_CLASSES), np.nan, np.float32)
            for i, r in enumerate(df["per_class_recall"]):
                if r is not None and not (np.isscalar(r) and pd.isna(r)):
                    r = np.asarray(r, np.float32)
                    if r.shape != (N_CLASSES,):
                        raise ValueError(
                            f"per_class_recall rows must have {N_CLASSES} values, got shape {r.shape}"
                        )
                    pcr[i] = r
            pcr_arr = pa.FixedSizeListArray.from_arrays(pa.array(pcr.ravel()), N_CLASSES)
        else:
            pcr_arr = pa.nulls(n, pa.list_(pa.float32(), N_CLASSES))

        def opt(col: str, dtype: str, pa_type: pa.DataType) -> pa.Array:
            if col not in df.columns:
                return pa.nulls(n, pa_type)
            return pa.array(pd.array(df[col], dtype=dtype), type=pa_type, from_pandas=True)

        variant = df["variant"].fillna("").astype(str) if "variant" in df.columns else pd.Series([""] * n)
        cols = {
            "model_id": opt("model_id", "Int32", pa.int32()),
            "model_name": pa.array(df["model_name"].astype(str).to_numpy(), pa.string()),
            "family": pa.array(df["family"].astype(str).to_numpy(), pa.string()),
            "head": pa.array(df["head"].astype(str).to_numpy(), pa.string()),
            "variant": pa.array(variant.to_numpy(), pa.string()),
            "seed": opt("seed", "Int32", pa.int32()),
            "dataset": pa.array(df["dataset"].astype(str).to_numpy(), pa.string()),
            "accuracy": pa.array(df["accuracy"].to_numpy(dtype=float), from_pandas=True),
            "macro_f1": pa.array(df["macro_f1"].to_numpy(dtype=float), from_pandas=True),
            "per_class_recall": pcr_arr,
            "n": pa.array(df["n"].to_numpy(dtype=np.int64)),
        }
        name = "_polcore_bench_in"
        with self.transaction() as con:
            base = self._next_id(con, "bench", n)
            table = pa.table({"bench_id": pa.array(np.arange(base, base + n, dtype=np.int32)), **cols})
            con.register(name, table)
            try:
                con.execute(
                    f"DELETE FROM bench USING {name} WHERE bench.model_name = {name}.model_name "
                    f"AND bench.dataset = {name}.dataset"
                )
                names = ", ".join(table.column_names)
                con.execute(
                    f"INSERT INTO bench ({names}, created_at) SELECT {names}, ? FROM {name} ORDER BY "
                    "bench_id",
                    [_now()],
                )
            finally:
                con.unregister(name)
        return n

    def write_heldout(self, df: pd.DataFrame) -> int:
        """Store (replace by ``(name, role, dose, thickness_nm)``) held-out accuracies on the draw library.

        Parameters
        ----------
        df : DataFrame
            ``name`` (a model name, or the limit's version: 'limit: nuisances known' ...), ``kind`` ('model' or
            'limit'), ``role`` (held-out draws: 'test', 'ideal_test'), ``dose`` (electrons per pattern, NaN =
            noise-free), ``thickness_nm``, ``per_pattern``, ``per_cell``; optional ``library_sha256``.

        Returns
        -------
        int
            Rows written.
        """
        self._require_writable()
        required = {"name", "kind", "role", "dose", "thickness_nm", "per_pattern", "per_cell"}
        _check_frame(df, required, required | {"library_sha256"}, "heldout")
        df = df.drop_duplicates(["name", "role", "dose", "thickness_nm"], keep="last")
        if not set(df["kind"]) <= {"model", "limit"}:
            raise ValueError("heldout kind must be 'model' or 'limit'")
        for c in ("per_pattern", "per_cell"):
            v = df[c].to_numpy(dtype=float)
            if np.any((v < 0) | (v > 1)):
                raise ValueError(f"{c} must lie in [0, 1] (NaN allowed)")
        n = len(df)
        tab = pa.table({
            "name": pa.array(df["name"].astype(str).to_numpy(), pa.string()),
            "kind": pa.array(df["kind"].astype(str).to_numpy(), pa.string()),
            "role": pa.array(df["role"].astype(str).to_numpy(), pa.string()),
            "dose": pa.array(df["dose"].to_numpy(dtype=float), from_pandas=True),
            "thickness_nm": pa.array(df["thickness_nm"].to_numpy(dtype=float)),
            "per_pattern": pa.array(df["per_pattern"].to_numpy(dtype=float), from_pandas=True),
            "per_cell": pa.array(df["per_cell"].to_numpy(dtype=float), from_pandas=True),
            "library_sha256": (pa.array(df["library_sha256"].astype(str).to_numpy(), pa.string())
                               if "library_sha256" in df.columns else pa.nulls(n, pa.string())),
        })
        name = "_polcore_heldout_in"
        with self.transaction() as con:
            con.register(name, tab)
            try:
                con.execute(
                    f"DELETE FROM heldout USING {name} WHERE heldout.name = {name}.name AND heldout.role = "
                    f"{name}.role AND heldout.dose IS NOT DISTINCT FROM {name}.dose AND heldout.thickness_nm = "
                    f"{name}.thickness_nm"
                )
                cols = ", ".join(tab.column_names)
                con.execute(f"INSERT INTO heldout ({cols}, created_at) SELECT {cols}, ? FROM {name}", [_now()])
            finally:
                con.unregister(name)
        return n

    def cache_get(self, key: str, default: Any = None) -> Any:
        """Value stored under ``key`` by :meth:`cache_put` (decoded JSON), or ``default``."""
        with self.connect(read_only=True) as con:
            raw = con.scalar("SELECT value_json FROM analysis_cache WHERE key = ?", [str(key)])
        return default if raw is None else json.loads(raw)

    def cache_put(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value (numpy arrays become lists) under ``key`` (replacing it)."""
        self._require_writable()
        text = _to_json(value)
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO analysis_cache VALUES (?, ?, ?)", [str(key), text, _now()])

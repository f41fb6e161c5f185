"""StoreConnection (a short-lived DuckDB connection), the store's errors and JSON helpers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = ["StoreConnection", "StoreError", "StoreBusyError", "StoreNotFoundError"]


class StoreError(RuntimeError):
    """A store operation failed; ``sql`` holds the statement when DuckDB raised it."""

    def __init__(self, message: str, *, sql: str | None = None):
        super().__init__(message)
        self.sql = sql


class StoreBusyError(StoreError):
    """The database file stayed locked by another process (or thread) for longer than ``lock_timeout``."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The database file does not exist (read-only access never creates it)."""


def _now() -> datetime:
    """Current UTC time as a naive datetime (stored in TIMESTAMP columns)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _json_default(obj: Any) -> Any:
    """Make numpy values, paths and dataclasses JSON-serialisable."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _to_json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, default=_json_default, sort_keys=True, allow_nan=True)


class StoreConnection:
    """A short-lived DuckDB connection; every statement's error is re-raised as :class:`StoreError`.

    Obtained from :meth:`PredictionStore.connect` or :meth:`PredictionStore.transaction`; do not keep it
    beyond the ``with`` block. ``raw`` is the underlying ``duckdb.DuckDBPyConnection``.
    """

    def __init__(self, raw: duckdb.DuckDBPyConnection, path: Path, read_only: bool):
        self.raw = raw
        self.path = path
        self.read_only = read_only

    def _fail(self, err: Exception, sql: str) -> StoreError:
        return StoreError(f"{type(err).__name__}: {err}\n  in SQL: {' '.join(sql.split())}", sql=sql)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Execute one statement with ``?`` parameters and run it to completion (results are discarded)."""
        try:
            self.raw.execute(sql, params)
            self.raw.complete()
        except duckdb.Error as err:
            raise self._fail(err, sql) from err

    def fetchall(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """All rows of a query as tuples."""
        try:
            return self.raw.execute(sql, params).fetchall()
        except duckdb.Error as err:
            raise self._fail(err, sql) from err

    def fetchone(self, sql: str, params: Sequence[Any] | None = None) -> tuple | None:
        """First row of a (small) query, or None; the result is read to its end."""
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        """First column of the first row (None when there is no row)."""
        row = self.fetchone(sql, params)
        return None if row is None else row[0]

    def df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Query result as a pandas DataFrame."""
        try:
            return self.raw.execute(sql, params).df()
        except duckdb.Error as err:
            raise self._fail(err, sql) from err

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Query result as a pyarrow Table (no per-row Python objects: fastest for large results)."""
        try:
            return self.raw.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as err:
            raise self._fail(err, sql) from err

    def register(self, name: str, table: pa.Table | pd.DataFrame) -> None:
        """Expose an Arrow table / DataFrame as a view named ``name`` for ``INSERT ... SELECT``."""
        self.raw.register(name, table)

    def unregister(self, name: str) -> None:
        self.raw.unregister(name)

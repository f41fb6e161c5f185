"""The DuckDB prediction store: the only code that talks to DuckDB.

:class:`PredictionStore` owns the file (schema, writes, the lock design described in
:mod:`polcore.store.store`); :mod:`polcore.store.queries` holds the read queries every dashboard page uses.
Neither imports torch or streamlit.
"""

from polcore.store import queries
from polcore.store.schema import EMBEDDING_SPACES, SCAN_KINDS, SCHEMA_VERSION
from polcore.store.store import (
    PREDICTION_COLUMNS,
    PredictionStore,
    StoreBusyError,
    StoreConnection,
    StoreError,
    StoreNotFoundError,
)

__all__ = [
    "PredictionStore",
    "StoreConnection",
    "StoreError",
    "StoreBusyError",
    "StoreNotFoundError",
    "PREDICTION_COLUMNS",
    "SCAN_KINDS",
    "EMBEDDING_SPACES",
    "SCHEMA_VERSION",
    "queries",
]

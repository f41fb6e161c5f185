"""Where polbench keeps its files: one definition, read at call time (never at import time).

| setting | environment | default |
|---|---|---|
| data directory | ``$POLBENCH_DATA`` | ``data/`` in the repository |
| database | ``$POLBENCH_DB`` | ``<data dir>/polbench.duckdb`` |
| model checkpoints | ``$POLBENCH_MODELS`` | ``<data dir>/models`` |
| shipped checkpoints | — | ``data/models/shipped`` in the repository (committed) |
| composed demo scans | — | ``<data dir>/scans`` |
| browser uploads | — | ``<data dir>/uploads`` |
| draw-library cache | ``$POLBENCH_CACHE`` | ``~/.cache/polbench`` |

Relative environment values are taken from the current directory. The CLI, training, the orchestration
(ingest, benchmark, reports, demo) and the dashboard all ask this module, so ``POLBENCH_DB=… python -m
polcore ingest`` and the dashboard agree on the database.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ROOT",
    "data_dir",
    "db_path",
    "models_dir",
    "shipped_models_dir",
    "scans_dir",
    "uploads_dir",
    "features_dir",
    "cache_dir",
]

#: Repository root (the folder holding ``polcore/`` and ``app.py``).
ROOT = Path(__file__).resolve().parents[1]


def _env_path(name: str) -> Path | None:
    v = os.environ.get(name)
    return Path(v).expanduser().resolve() if v else None


def data_dir() -> Path:
    """The data directory (``$POLBENCH_DATA`` or ``data/`` in the repository), absolute."""
    return _env_path("POLBENCH_DATA") or (ROOT / "data").resolve()


def db_path() -> Path:
    """The DuckDB file (``$POLBENCH_DB`` or ``<data dir>/polbench.duckdb``), absolute."""
    return _env_path("POLBENCH_DB") or data_dir() / "polbench.duckdb"


def models_dir() -> Path:
    """Trained checkpoints (``$POLBENCH_MODELS`` or ``<data dir>/models``); training profiles write into
    ``<models dir>/<profile>``."""
    return _env_path("POLBENCH_MODELS") or data_dir() / "models"


def shipped_models_dir() -> Path:
    """The checkpoints committed with the repository (trained with ``train --profile cpu``)."""
    return ROOT / "data" / "models" / "shipped"


def scans_dir() -> Path:
    """Where the demo's composed scans are written."""
    return data_dir() / "scans"


def uploads_dir() -> Path:
    """Folder that receives browser uploads."""
    return data_dir() / "uploads"


def features_dir(db: str | os.PathLike | None = None) -> Path:
    """Where an ingest keeps each run's feature subsample: ``<db stem>_features`` next to the database."""
    db = Path(db) if db is not None else db_path()
    return db.with_name(db.stem + "_features")


def cache_dir() -> Path:
    """Cache for long builds that outlive a checkout (``$POLBENCH_CACHE`` or ``~/.cache/polbench``)."""
    return _env_path("POLBENCH_CACHE") or Path.home() / ".cache" / "polbench"

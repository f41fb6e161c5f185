"""Cached reads for the pages: thin wrappers over ``polcore.store.queries`` and ``polcore.analysis``.

* The store object (no open connection; short-lived read-only connections per query) is a
  ``st.cache_resource``.
* Query results are ``st.cache_data`` keyed by ids, plain tuples and a *database token* (file size and
  modification time of the DuckDB file and its WAL, :func:`ui.paths.db_token`), so a write by an upload in
  this process or by the CLI invalidates them. Arrays are never passed as arguments (Streamlit hashes large
  arrays from a sample).
* Filters travel as ``(thickness, region)`` tuples and become :class:`polcore.types.Filters` inside.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from polcore.types import Filters
from ui import paths

__all__ = [
    "store",
    "store_ready",
    "token",
    "ftuple",
    "scans",
    "models",
    "runs",
    "find_run",
    "bench",
    "demo_summary",
    "filtered_bench",
    "metrics",
    "run_metrics",
    "confusion",
    "grids",
    "errors",
    "prediction_at",
    "embeddings",
    "domain_gaps",
    "thickness_bounds",
    "periodic_analysis",
    "defect_analysis",
    "pattern",
    "scan_images",
    "has_scan_images",
    "cell_run",
    "library_pattern",
    "panel_module",
    "clear_caches",
]

log = logging.getLogger(__name__)
_ENTRIES = 64


@st.cache_resource(show_spinner=False)
def _store(path: str):
    from polcore.store import PredictionStore

    return PredictionStore(path, read_only=True)


def store(path: Path | None = None):
    """The read-only :class:`polcore.store.PredictionStore` of the dashboard's database."""
    return _store(str(path or paths.db_path()))


def store_ready(path: Path | None = None) -> bool:
    """Whether the database file exists and holds a polbench schema."""
    p = Path(path or paths.db_path())
    if not p.is_file():
        return False
    return _store_ready(str(p), paths.db_token(p))


@st.cache_data(show_spinner=False, max_entries=4)
def _store_ready(path: str, tok: tuple) -> bool:
    return _store(path).exists()


def token() -> tuple:
    """The current database token (pass it to every cached query)."""
    return paths.db_token()


def ftuple(filters: Filters | None) -> tuple:
    """Hashable form of a Filters object for cache keys (:meth:`polcore.types.Filters.key`)."""
    return (filters or Filters()).key()


def _filters(ft: tuple) -> Filters:
    return Filters.from_key(ft)


def _q():
    from polcore.store import queries

    return queries


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def scans(tok: tuple) -> pd.DataFrame:
    """All scans (``queries.list_scans``)."""
    return _q().list_scans(store())


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def models(tok: tuple) -> pd.DataFrame:
    """All models (``queries.list_models``)."""
    return _q().list_models(store())


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def runs(tok: tuple) -> pd.DataFrame:
    """All finished runs with model and scan columns (``queries.list_runs``)."""
    return _q().list_runs(store())


def find_run(tok: tuple, scan_id: int | None, model_name: str | None, layer: str = "pattern") -> int | None:
    """run_id of ``model_name`` on ``scan_id`` in ``layer`` ('pattern' or 'cell'), or None."""
    if scan_id is None or model_name is None:
        return None
    r = runs(tok)
    sel = r[(r["scan_id"] == int(scan_id)) & (r["model"] == model_name) & (r["layer"] == layer)]
    return None if sel.empty else int(sel["run_id"].iloc[0])


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def heldout(tok: tuple) -> pd.DataFrame:
    """Held-out accuracy on the draw library, models and the physics limit (``queries.heldout_table``)."""
    return _q().heldout_table(store())


@st.cache_data(show_spinner=False, max_entries=4)
def demo_summary(tok: tuple) -> dict | None:
    """What the demo build stored about itself (elapsed seconds per step), or None."""
    return store().cache_get("demo_summary")


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def bench(tok: tuple) -> pd.DataFrame:
    """The study's benchmark, tidy (``queries.benchmark_table``)."""
    return _q().benchmark_table(store())


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def filtered_bench(tok: tuple, ft: tuple, layer: str) -> pd.DataFrame:
    """The benchmark's model rows under the filters, mean ± std over seeds (``queries.filtered_benchmark``)."""
    return _q().filtered_benchmark(store(), _filters(ft), layer)


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def metrics(tok: tuple, ft: tuple) -> pd.DataFrame:
    """Accuracy / macro-F1 per run after filtering (``queries.metrics_by_run``)."""
    return _q().metrics_by_run(store(), _filters(ft))


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def run_metrics(tok: tuple, run_id: int, ft: tuple) -> pd.Series | None:
    """Accuracy / macro-F1 / counts of one run after filtering (a row of ``queries.metrics_by_run``)."""
    df = _q().metrics_by_run(store(), _filters(ft), run_ids=[int(run_id)])
    return None if df.empty else df.iloc[0]


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def confusion(tok: tuple, run_ids: tuple[int, ...], ft: tuple) -> pd.DataFrame:
    """Long-form confusion counts of several runs (``queries.confusion_counts``)."""
    return _q().confusion_counts(store(), list(run_ids), _filters(ft))


@st.cache_data(show_spinner=False, max_entries=16)
def grids(tok: tuple, run_id: int) -> dict:
    """One run as (ny, nx) maps (``queries.run_grids``)."""
    return _q().run_grids(store(), int(run_id))


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def errors(tok: tuple, run_id: int, ft: tuple) -> pd.DataFrame:
    """Wrong predictions of a run after filtering (``queries.errors``)."""
    return _q().errors(store(), int(run_id), _filters(ft))


def prediction_at(run_id: int, iy: int, ix: int) -> pd.DataFrame:
    """The stored prediction at one position (``queries.prediction_at``; uncached, ~10 ms)."""
    return _q().prediction_at(store(), int(run_id), int(iy), int(ix))


@st.cache_data(show_spinner=False, max_entries=16)
def embeddings(tok: tuple, model_id: int | None, method: str, space: str) -> pd.DataFrame:
    """One stored embedding set joined with predictions (``queries.embeddings``)."""
    return _q().embeddings(store(), model_id, method, space)


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def domain_gaps(tok: tuple) -> pd.DataFrame:
    """Domain-gap scores (``queries.domain_gaps``)."""
    return _q().domain_gaps(store())


@st.cache_data(show_spinner=False, max_entries=_ENTRIES)
def thickness_bounds(tok: tuple) -> tuple[float, float] | None:
    """(min, max) local thickness [nm] over all predictions, or None."""
    return _q().thickness_range(store())


@st.cache_data(show_spinner=False, max_entries=16)
def periodic_analysis(tok: tuple, run_id: int, lattice_period_px: float | None, ft: tuple) -> dict:
    """Periodicity of a run's error map and the error rate folded onto the unit cell, under the filters
    (:func:`polcore.analysis.periodic_errors`, the entry point the CLI report uses too)."""
    from polcore.analysis import periodic_errors

    return periodic_errors(grids(tok, run_id), _filters(ft), lattice_period_px)


@st.cache_data(show_spinner=False, max_entries=16)
def defect_analysis(tok: tuple, run_id: int, period_px: float | None, ft: tuple = (None, None)) -> dict:
    """Irregularity map, defect mask, ROC and candidate regions of one run under the filters
    (:func:`polcore.analysis.defect_evidence`, the entry point the CLI report uses too)."""
    from polcore.analysis import defect_evidence

    return defect_evidence(grids(tok, run_id), _filters(ft), period_px)


@st.cache_data(show_spinner=False, max_entries=32)
def pattern(source_file: str, iy: int, ix: int) -> np.ndarray:
    """One diffraction pattern (ky, kx) read from the scan file (cached per position)."""
    from ui.backend import read_pattern

    return np.asarray(read_pattern(source_file, iy, ix), dtype=np.float32)


def has_scan_images() -> bool:
    """Whether this polcore stores virtual images per scan (``queries.scan_images`` exists)."""
    return callable(getattr(_q(), "scan_images", None))


@st.cache_data(show_spinner=False, max_entries=16)
def scan_images(tok: tuple, scan_id: int) -> dict[str, np.ndarray] | None:
    """Virtual images of a scan stored at ingest (``queries.scan_images``): 'bf', 'adf', 'com_y', 'com_x',
    each (ny, nx) float32; None when the scan has none (or this polcore does not store them)."""
    fn = getattr(_q(), "scan_images", None)
    if fn is None:
        return None
    out = fn(store(), int(scan_id))
    if not out:
        return None
    return {str(k): np.asarray(v, dtype=np.float32) for k, v in out.items() if v is not None}


def cell_run(tok: tuple, scan_id: int | None, model_name: str | None) -> int | None:
    """run_id of the per-unit-cell layer of ``model_name`` on ``scan_id``, or None."""
    return find_run(tok, scan_id, model_name, "cell")


@st.cache_data(show_spinner=False, max_entries=64)
def library_pattern(cls: int, thickness_nm: float, frac_y: float, frac_x: float) -> tuple[np.ndarray, dict]:
    """The committed library's pattern of class ``cls`` at a position in the unit cell
    (:func:`polcore.simulate.library.pattern_at`, one entry read, not the whole library)."""
    from polcore.simulate.library import pattern_at

    return pattern_at(int(cls), float(thickness_nm), float(frac_y), float(frac_x))


def panel_module():
    """``polcore.panel`` (the figure panel for slides: ``panel_figure``, ``FORMATS``, ``DPI``), or None when
    this polcore has none (the page then hides its export button)."""
    try:
        from polcore import panel
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - a broken optional module must not take the page down
        log.exception("polcore.panel could not be imported")
        return None
    ok = callable(getattr(panel, "panel_figure", None)) and hasattr(panel, "FORMATS") and hasattr(panel, "DPI")
    return panel if ok else None


def clear_caches() -> None:
    """Drop every cached query result (after a write whose token change might be missed)."""
    for fn in (
        scans,
        models,
        runs,
        bench,
        demo_summary,
        filtered_bench,
        heldout,
        metrics,
        confusion,
        grids,
        errors,
        embeddings,
        domain_gaps,
        thickness_bounds,
        periodic_analysis,
        defect_analysis,
        scan_images,
        _store_ready,
    ):
        fn.clear()

"""Read queries used by the dashboard pages and the CLI (no SQL lives anywhere else).

Every function takes a :class:`~polcore.store.PredictionStore` (read-only is enough), opens one short-lived
read-only connection, binds all values as ``?`` parameters and returns a pandas DataFrame (a few return a
tuple, dict or arrays where noted). Filters are :class:`polcore.types.Filters` applied in SQL:
``thickness=(lo, hi)`` keeps rows with ``lo <= thickness_nm <= hi`` [nm] (rows of unknown thickness drop
out), ``region=(y0, y1, x0, x1)`` keeps the inclusive scan-pixel rectangle, exactly as
``polcore.analysis.metrics.apply_filters`` does in memory. Only finished runs are ever visible.

Per-run queries select ``run_id = ?`` (or ``IN (?, ...)``); predictions are stored in run order, so DuckDB's
zonemaps skip the other runs' row groups and these queries stay fast at millions of rows.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from polcore.store.schema import EMBEDDING_SPACES, IMAGE_KINDS, SCAN_KINDS
from polcore.types import N_CLASSES, Filters

if TYPE_CHECKING:
    from polcore.store.store import PredictionStore, StoreConnection

__all__ = [
    "BENCH_METRICS",
    "MAJORITY",
    "list_scans",
    "list_models",
    "list_runs",
    "benchmark_table",
    "seed_summary",
    "filtered_benchmark",
    "pivot_benchmark",
    "confusion_counts",
    "confusion_matrix",
    "run_map",
    "run_grids",
    "errors",
    "prediction_at",
    "embeddings",
    "domain_gaps",
    "thickness_range",
    "metrics_by_run",
    "heldout_table",
    "CELL_SUFFIX",
    "scan_info",
    "scan_by_sha256",
    "scored_runs",
    "labelled_predictions",
    "truth_at",
    "mean_accuracy_by_model",
    "scan_images",
    "scan_images_info",
]

log = logging.getLogger(__name__)

#: Metrics :func:`pivot_benchmark` can show.
BENCH_METRICS: tuple[str, ...] = ("accuracy", "macro_f1")
#: ``family`` of the majority-class baseline rows of :func:`benchmark_table`.
MAJORITY = "majority"

_PRED_COLS = "iy, ix, pred, confidence, true_label, thickness_nm, region, is_defect, irregularity"
#: Suffix of a benchmark data set scored on the unit-cell layer (``runs.layer = 'cell'``).
CELL_SUFFIX = " (per cell)"

_RUN_COLS = (
    "r.run_id, r.model_id, m.name AS model, m.family, m.head, m.variant, m.seed, r.scan_id, s.name AS scan, "
    "s.kind, s.dataset, s.ny, s.nx, s.cell_px, s.has_ground_truth, r.n_patterns, r.seconds, "
    "r.patterns_per_s, "
    "r.device, r.started_at, r.finished_at, r.layer"
)


# ----------------------------------------------------------------------------------------------- helpers


def _ids(ids: int | Iterable[int] | None) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(i) for i in ids]


def _ph(n: int) -> str:
    return ", ".join(["?"] * n)


def _filter_sql(filters: Filters | None) -> tuple[list[str], list[Any]]:
    """SQL conditions on predictions columns (``thickness_nm``, ``iy``, ``ix``) and their parameters."""
    if filters is None:
        return [], []
    if not isinstance(filters, Filters):
        raise TypeError(f"filters must be polcore.types.Filters or None, got {type(filters).__name__}")
    conds: list[str] = []
    params: list[Any] = []
    if filters.thickness is not None:  # Filters normalised the bounds (lo <= hi, y0 <= y1, x0 <= x1)
        conds.append("thickness_nm >= ? AND thickness_nm <= ?")
        params += list(filters.thickness)
    if filters.region is not None:
        conds.append("iy BETWEEN ? AND ? AND ix BETWEEN ? AND ?")
        params += list(filters.region)
    return conds, params


def _where(conds: list[str]) -> str:
    return (" WHERE " + " AND ".join(conds)) if conds else ""


def _probs_array(col: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    """FixedSizeList<float>[8] column -> (n, 8) float32 with NaN rows for NULL."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    out = np.full((n, N_CLASSES), np.nan, np.float32)
    if n == 0:
        return out
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    if valid.any():
        out[valid] = arr.flatten().to_numpy().reshape(-1, N_CLASSES)
    return out


_NULLABLE_TYPES = {pa.int16(): pd.Int16Dtype(), pa.bool_(): pd.BooleanDtype()}


def _predictions_frame(con: StoreConnection, where: str, params: list, with_probs: bool) -> pd.DataFrame:
    cols = _PRED_COLS + (", probs" if with_probs else "")
    tab = con.arrow(f"SELECT {cols} FROM predictions WHERE {where} ORDER BY iy, ix", params)
    probs = tab.column("probs") if with_probs else None
    if with_probs:
        tab = tab.drop_columns(["probs"])
    df = tab.to_pandas(types_mapper=_NULLABLE_TYPES.get)
    if with_probs:
        p = _probs_array(probs, len(df))
        df["probs"] = list(p) if len(df) else pd.Series([], dtype=object)
    return df


# ------------------------------------------------------------------------------------ catalogue queries


def list_scans(
    store: PredictionStore, *, kind: str | None = None, dataset: str | None = None, status: str | None = "ready"
) -> pd.DataFrame:
    """Scans with their number of finished runs.

    Parameters
    ----------
    store : PredictionStore
    kind : {'synthetic', 'pseudo_experimental', 'experimental'}, optional
    dataset : str, optional
    status : 'ready' (default: scans whose ingest finished), 'ingesting', 'failed', or None for all.

    Returns
    -------
    DataFrame
        Columns of the ``scans`` table plus ``n_runs``, ordered by scan_id.
    """
    conds, params = [], []
    if status is not None:
        conds.append("s.status = ?")
        params.append(str(status))
    if kind is not None:
        if kind not in SCAN_KINDS:
            raise ValueError(f"kind must be one of {SCAN_KINDS}, got {kind!r}")
        conds.append("s.kind = ?")
        params.append(kind)
    if dataset is not None:
        conds.append("s.dataset = ?")
        params.append(str(dataset))
    return store.fetch_df(
        "SELECT s.*, (SELECT count(*) FROM runs r WHERE r.scan_id = s.scan_id AND r.status = 'finished') AS "
        "n_runs "
        f"FROM scans s{_where(conds)} ORDER BY s.scan_id",
        params,
    )


def list_models(store: PredictionStore, *, family: str | None = None) -> pd.DataFrame:
    """Models with their number of finished runs and mean throughput [patterns/s].

    Returns
    -------
    DataFrame
        Columns of the ``models`` table plus ``n_runs`` and ``patterns_per_s``, ordered by model_id.
    """
    conds, params = [], []
    if family is not None:
        conds.append("m.family = ?")
        params.append(str(family))
    return store.fetch_df(
        "SELECT m.*, coalesce(r.n_runs, 0) AS n_runs, r.patterns_per_s FROM models m LEFT JOIN ("
        "SELECT model_id, count(*) AS n_runs, avg(patterns_per_s) AS patterns_per_s FROM runs "
        "WHERE status = 'finished' GROUP BY model_id) r ON r.model_id = m.model_id"
        f"{_where(conds)} ORDER BY m.model_id",
        params,
    )


def _list_runs(
    con: StoreConnection,
    *,
    run_ids: list[int] | None = None,
    model_ids: list[int] | None = None,
    scan_ids: list[int] | None = None,
    dataset: str | None = None,
    kind: str | None = None,
    layer: str | None = None,
) -> pd.DataFrame:
    conds, params = ["r.status = 'finished'"], []
    if layer is not None:
        conds.append("r.layer = ?")
        params.append(str(layer))
    for col, ids in (("r.run_id", run_ids), ("r.model_id", model_ids), ("r.scan_id", scan_ids)):
        if ids is not None:
            if not ids:
                conds.append("FALSE")
                continue
            conds.append(f"{col} IN ({_ph(len(ids))})")
            params += ids
    if dataset is not None:
        conds.append("s.dataset = ?")
        params.append(str(dataset))
    if kind is not None:
        if kind not in SCAN_KINDS:
            raise ValueError(f"kind must be one of {SCAN_KINDS}, got {kind!r}")
        conds.append("s.kind = ?")
        params.append(kind)
    return con.df(
        f"SELECT {_RUN_COLS} FROM runs r JOIN models m ON m.model_id = r.model_id "
        f"JOIN scans s ON s.scan_id = r.scan_id{_where(conds)} ORDER BY r.run_id",
        params,
    )


def list_runs(
    store: PredictionStore,
    *,
    run_ids: int | Iterable[int] | None = None,
    model_ids: int | Iterable[int] | None = None,
    scan_ids: int | Iterable[int] | None = None,
    dataset: str | None = None,
    kind: str | None = None,
    layer: str | None = None,
) -> pd.DataFrame:
    """Finished runs joined with their model and scan (``layer`` 'pattern' or 'cell'; None = both).

    Returns
    -------
    DataFrame
        run_id, model_id, model, family, head, variant, seed, scan_id, scan, kind, dataset, ny, nx, cell_px,
        has_ground_truth, n_patterns, seconds [s], patterns_per_s, device, started_at, finished_at, layer.
    """
    with store.connect() as con:
        return _list_runs(
            con,
            run_ids=_ids(run_ids),
            model_ids=_ids(model_ids),
            scan_ids=_ids(scan_ids),
            dataset=dataset,
            kind=kind,
            layer=layer,
        )


# -------------------------------------------------------------------------------------------- benchmark


def _model_label(family: str, head: str, variant: str) -> str:
    if family == MAJORITY:
        return MAJORITY
    return "/".join(p for p in (family, head, variant) if p)


def _std(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.std(v, ddof=1)) if v.size >= 2 else float("nan")


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _recall_vector(value: Any) -> np.ndarray:
    """A stored FLOAT[8] value as (8,) float; NULL (None / NA) -> NaN."""
    if value is None or value is pd.NA or (np.isscalar(value) and pd.isna(value)):
        return np.full(N_CLASSES, np.nan)
    return np.asarray(value, float)


def _dataset_label_counts(con: StoreConnection, datasets: list[str]) -> dict[str, np.ndarray]:
    """Ground-truth class counts (8,) per dataset, from one finished run of each of its scans."""
    if not datasets:
        return {}
    one = [
        r[0]
        for r in con.fetchall(
            "SELECT min(r.run_id) FROM runs r JOIN scans s ON s.scan_id = r.scan_id "
            f"WHERE r.status = 'finished' AND s.dataset IN ({_ph(len(datasets))}) GROUP BY r.scan_id",
            datasets,
        )
    ]
    if not one:
        return {}
    rows = con.fetchall(
        "SELECT s.dataset, p.true_label, count(*) FROM predictions p JOIN runs r ON r.run_id = p.run_id "
        f"JOIN scans s ON s.scan_id = r.scan_id WHERE p.run_id IN ({_ph(len(one))}) AND p.true_label >= 0 "
        "GROUP BY s.dataset, p.true_label",
        one,
    )
    out: dict[str, np.ndarray] = {}
    for ds, label, n in rows:
        out.setdefault(ds, np.zeros(N_CLASSES, np.int64))[int(label)] += int(n)
    return out


def _majority_row(dataset: str, counts: np.ndarray) -> dict[str, Any]:
    """Scores of always predicting the most frequent class of ``counts`` (ties -> lowest index)."""
    total = int(counts.sum())
    c = int(np.argmax(counts))
    present = counts > 0
    recall = np.where(present, 0.0, np.nan)
    recall[c] = 1.0
    f1_c = 2.0 * counts[c] / (total + counts[c])  # the other present classes score 0
    return {
        "dataset": dataset,
        "family": MAJORITY,
        "head": "",
        "variant": "",
        "model": MAJORITY,
        "n_seeds": 1,
        "accuracy_mean": counts[c] / total,
        "accuracy_std": float("nan"),
        "macro_f1_mean": f1_c / int(present.sum()),
        "macro_f1_std": float("nan"),
        "per_class_recall": recall.astype(np.float32),
        "n_patterns": total,
        "train_seconds": float("nan"),
        "patterns_per_s": float("nan"),
        "majority_class": c,
    }


_BENCH_COLUMNS = [
    "dataset",
    "family",
    "head",
    "variant",
    "model",
    "n_seeds",
    "accuracy_mean",
    "accuracy_std",
    "macro_f1_mean",
    "macro_f1_std",
    "per_class_recall",
    "n_patterns",
    "train_seconds",
    "patterns_per_s",
    "majority_class",
]


def benchmark_table(store: PredictionStore) -> pd.DataFrame:
    """The study's benchmark as a tidy frame: one row per (dataset, family, head, variant).

    Scores are mean and sample standard deviation over seeds (std NaN for a single seed); per-class recall
    is the mean over seeds. For every dataset a ``family = 'majority'`` row gives the majority-class
    baseline computed from the ground-truth labels of the dataset's stored scans (one run per scan); it is
    absent when no scan of that dataset is stored.

    Returns
    -------
    DataFrame
        dataset, family, head, variant, model (display label 'family/head[/variant]' or 'majority'), n_seeds,
        accuracy_mean, accuracy_std, macro_f1_mean, macro_f1_std, per_class_recall ((8,) arrays),
        n_patterns, train_seconds (mean, from ``models``) [s], patterns_per_s (mean over the models' runs),
        majority_class (class index, majority rows only; -1 otherwise). Datasets keep the order in which
        the benchmark wrote them.
    """
    with store.connect() as con:
        bench = con.df(
            "SELECT b.bench_id, b.family, b.head, b.variant, b.seed, b.dataset, b.accuracy, b.macro_f1, "
            "b.per_class_recall, b.n, m.train_seconds, r.patterns_per_s FROM bench b "
            "LEFT JOIN models m ON m.name = b.model_name LEFT JOIN ("
            "SELECT model_id, avg(patterns_per_s) AS patterns_per_s FROM runs WHERE status = 'finished' "
            "GROUP BY model_id) r ON r.model_id = m.model_id ORDER BY b.bench_id"
        )
        datasets = list(dict.fromkeys(bench["dataset"]))
        base = {ds: ds.removesuffix(CELL_SUFFIX) for ds in datasets}
        base_counts = _dataset_label_counts(con, sorted(set(base.values())))
        label_counts = {ds: base_counts[b] for ds, b in base.items() if b in base_counts}
    rows = seed_summary(bench)
    for ds in datasets:
        counts = label_counts.get(ds)
        if counts is not None and counts.sum() > 0:
            rows.append(_majority_row(ds, counts))
    df = pd.DataFrame(rows, columns=_BENCH_COLUMNS)
    if len(df):
        order = {d: i for i, d in enumerate(datasets)}
        df = df.sort_values("dataset", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return df


def _mean_col(df: pd.DataFrame, col: str) -> float:
    return _nanmean(df[col].to_numpy(float)) if col in df else float("nan")


def seed_summary(scores: pd.DataFrame) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (dataset, family, head, variant) of per-run scores.

    ``scores`` has dataset, family, head, variant, accuracy, macro_f1 and optionally per_class_recall, n,
    train_seconds, patterns_per_s (one row per model and data set). Returns the rows of
    :func:`benchmark_table` (without the majority rows), in first-seen order.
    """
    rows = []
    for (ds, fam, head, var), sub in scores.groupby(["dataset", "family", "head", "variant"], sort=False):
        acc = sub["accuracy"].to_numpy(float)
        f1 = sub["macro_f1"].to_numpy(float)
        pcr = (np.stack([_recall_vector(r) for r in sub["per_class_recall"]]) if "per_class_recall" in sub
               else np.full((len(sub), N_CLASSES), np.nan))

        rows.append(
            {
                "dataset": ds,
                "family": fam,
                "head": head,
                "variant": var,
                "model": _model_label(fam, head, var),
                "n_seeds": len(sub),
                "accuracy_mean": _nanmean(acc),
                "accuracy_std": _std(acc),
                "macro_f1_mean": _nanmean(f1),
                "macro_f1_std": _std(f1),
                "per_class_recall": _nanmean(pcr, axis=0).astype(np.float32),
                "n_patterns": int(sub["n"].max()) if "n" in sub else 0,
                "train_seconds": _mean_col(sub, "train_seconds"),
                "patterns_per_s": _mean_col(sub, "patterns_per_s"),
                "majority_class": -1,
            }
        )
    return rows


def filtered_benchmark(store: PredictionStore, filters: Filters | None, layer: str = "pattern") -> pd.DataFrame:
    """:func:`benchmark_table`'s model rows recomputed from the stored predictions under ``filters`` (region
    and thickness), for the runs of one ``layer``; mean ± std over seeds as in the stored table."""
    met = metrics_by_run(store, filters)
    met = met[(met["n_labelled"] > 0) & (met["layer"] == layer)]
    if met.empty:
        return pd.DataFrame(columns=_BENCH_COLUMNS)
    met = met.assign(variant=met["variant"].fillna(""), n=met["n_labelled"])
    return pd.DataFrame(seed_summary(met), columns=_BENCH_COLUMNS)


def pivot_benchmark(
    df: pd.DataFrame, metric: str = "accuracy", *, digits: int = 3, text: bool = True
) -> pd.DataFrame:
    """Display form of :func:`benchmark_table`: rows = datasets, columns = models (majority last).

    Parameters
    ----------
    df : DataFrame
        Output of :func:`benchmark_table`.
    metric : {'accuracy', 'macro_f1'}
    digits : int
        Decimals shown.
    text : bool
        True gives strings ``'0.912 ± 0.013'`` (``'0.912'`` for a single seed, '' for missing); False the
        mean values as floats.
    """
    if metric not in BENCH_METRICS:
        raise ValueError(f"metric must be one of {BENCH_METRICS}, got {metric!r}")
    models = list(dict.fromkeys(m for m in df["model"] if m != MAJORITY))
    if (df["model"] == MAJORITY).any():
        models.append(MAJORITY)
    datasets = list(dict.fromkeys(df["dataset"]))
    mean = df.pivot(index="dataset", columns="model", values=f"{metric}_mean").reindex(
        index=datasets, columns=models
    )
    if not text:
        return mean
    std = df.pivot(index="dataset", columns="model", values=f"{metric}_std").reindex(
        index=datasets, columns=models
    )

    def fmt(m: float, s: float) -> str:
        if not np.isfinite(m):
            return ""
        return f"{m:.{digits}f}" if not np.isfinite(s) else f"{m:.{digits}f} ± {s:.{digits}f}"

    out = pd.DataFrame(
        [[fmt(m, s) for m, s in zip(mr, sr)] for mr, sr in zip(mean.to_numpy(float), std.to_numpy(float))],
        index=mean.index,
        columns=mean.columns,
    )
    out.columns.name = None
    return out


# ---------------------------------------------------------------------------------------- per-run queries


def confusion_counts(
    store: PredictionStore, run_ids: int | Iterable[int], filters: Filters | None = None
) -> pd.DataFrame:
    """Confusion counts of labelled positions (``true_label >= 0``), long form.

    Returns
    -------
    DataFrame
        run_id, true, pred, n -- one row per non-empty cell, ordered by run, true, pred.
    """
    ids = _ids(run_ids)
    conds, params = _filter_sql(filters)
    if not ids:
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in ("run_id", "true", "pred", "n")})
    conds = [f"run_id IN ({_ph(len(ids))})", "true_label >= 0", *conds]
    df = store.fetch_df(
        'SELECT run_id, true_label AS "true", pred, count(*) AS n '
        f'FROM predictions{_where(conds)} GROUP BY run_id, true_label, pred ORDER BY run_id, "true", pred',
        ids + params,
    )
    return df.astype({"run_id": "int64", "true": "int64", "pred": "int64", "n": "int64"})


def confusion_matrix(counts: pd.DataFrame, run_id: int | None = None) -> np.ndarray:
    """(8, 8) int64 matrix (rows true, columns predicted) from :func:`confusion_counts`.

    Sums over all runs in ``counts`` unless ``run_id`` picks one.
    """
    sub = counts if run_id is None else counts[counts["run_id"] == int(run_id)]
    cm = np.zeros((N_CLASSES, N_CLASSES), np.int64)
    np.add.at(cm, (sub["true"].to_numpy(int), sub["pred"].to_numpy(int)), sub["n"].to_numpy(np.int64))
    return cm


def run_map(store: PredictionStore, run_id: int, *, probs: bool = True) -> pd.DataFrame:
    """Every position of one run, in raster (iy, ix) order.

    Returns
    -------
    DataFrame
        iy, ix, pred (class 0..7), confidence, true_label (-1 = none), thickness_nm [nm] (NaN = unknown),
        region (Int16, NA = unknown), is_defect (boolean, NA = unknown), irregularity (NaN = not computed),
        and with ``probs`` a column of (8,) float32 arrays (NaN when the head gives no probabilities).
    """
    with store.connect() as con:
        return _predictions_frame(con, "run_id = ?", [int(run_id)], probs)


def run_grids(store: PredictionStore, run_id: int) -> dict[str, Any]:
    """One run as (ny, nx) maps for heatmaps and the periodicity / defect analyses.

    Returns
    -------
    dict
        ``pred`` int8 (ny, nx) (-1 where missing), ``confidence`` float32, ``probs`` float32 (ny, nx, 8),
        ``true_label`` int8 (-1 = none), ``thickness_nm`` float32 [nm], ``irregularity`` float32 (NaN =
        unknown), ``is_defect`` bool (unknown -> False), ``error`` float32 (1 wrong, 0 right, NaN
        unlabelled), plus ``ny``, ``nx``, ``cell_px`` and ``run_id``.
    """
    run_id = int(run_id)
    with store.connect() as con:
        dims = con.fetchone(
            "SELECT s.ny, s.nx, s.cell_px FROM runs r JOIN scans s ON s.scan_id = r.scan_id "
            "WHERE r.run_id = ? AND r.status = 'finished'",
            [run_id],
        )
        if dims is None:
            raise ValueError(f"no finished run with run_id {run_id}")
        tab = con.arrow(
            "SELECT iy, ix, pred, confidence, probs, true_label, thickness_nm, is_defect, irregularity "
            "FROM predictions WHERE run_id = ?",
            [run_id],
        )
    ny, nx, cell_px = dims
    n = tab.num_rows
    iy = tab.column("iy").to_numpy().astype(np.intp)
    ix = tab.column("ix").to_numpy().astype(np.intp)

    def grid(name: str, dtype: Any, fill: Any) -> np.ndarray:
        out = np.full((ny, nx), fill, dtype)
        col = tab.column(name)
        if col.null_count:
            col = col.fill_null(fill)
        out[iy, ix] = col.to_numpy(zero_copy_only=False)
        return out

    probs = np.full((ny, nx, N_CLASSES), np.nan, np.float32)
    probs[iy, ix] = _probs_array(tab.column("probs"), n)
    pred = grid("pred", np.int8, -1)
    true = grid("true_label", np.int8, -1)
    error = np.where((true >= 0) & (pred >= 0), (pred != true).astype(np.float32), np.nan).astype(np.float32)
    return {
        "run_id": run_id,
        "ny": int(ny),
        "nx": int(nx),
        "cell_px": cell_px,
        "pred": pred,
        "confidence": grid("confidence", np.float32, np.nan),
        "probs": probs,
        "true_label": true,
        "thickness_nm": grid("thickness_nm", np.float32, np.nan),
        "irregularity": grid("irregularity", np.float32, np.nan),
        "is_defect": grid("is_defect", bool, False),
        "error": error,
    }


def errors(store: PredictionStore, run_id: int, filters: Filters | None = None) -> pd.DataFrame:
    """Wrong predictions of one run (labelled positions only), with positions.

    Returns
    -------
    DataFrame
        iy, ix, pred, true_label, angle_error_deg (45, 90, 135 or 180), confidence, thickness_nm [nm],
        region, is_defect, irregularity; ordered by (iy, ix).
    """
    conds, params = _filter_sql(filters)
    conds = ["run_id = ?", "true_label >= 0", "pred <> true_label", *conds]
    return store.fetch_df(
        "SELECT iy, ix, pred, true_label, 45 * least((CAST(pred AS INTEGER) - true_label + 8) % 8, "
        "(CAST(true_label AS INTEGER) - pred + 8) % 8) AS angle_error_deg, confidence, thickness_nm, region, "
        f"is_defect, irregularity FROM predictions{_where(conds)} ORDER BY iy, ix",
        [int(run_id), *params],
    )


def prediction_at(store: PredictionStore, run_id: int, iy: int, ix: int) -> pd.DataFrame:
    """The stored prediction at one probe position: a one-row frame like :func:`run_map` (empty if absent)."""
    with store.connect() as con:
        return _predictions_frame(
            con, "run_id = ? AND iy = ? AND ix = ?", [int(run_id), int(iy), int(ix)], True
        )


# ----------------------------------------------------------------------------------- analysis results


def embeddings(
    store: PredictionStore, model_id: int | None, method: str, space: str = "features"
) -> pd.DataFrame:
    """One embedding set (all its scans, synthetic and experimental together), joined with predictions.

    Parameters
    ----------
    model_id : int or None
        The model whose features were embedded. For ``space='input'`` the model-independent set
        (stored with model_id NULL) is used when the model has none of its own; predictions of
        ``model_id`` are still joined for colouring by correctness.
    method : str
        'pca', 'umap', ...
    space : {'input', 'features'}

    Returns
    -------
    DataFrame
        scan_id, scan, kind, dataset, iy, ix, e1, e2, true_label (-1 = none), thickness_nm [nm], pred
        (Int8, NA without a run of ``model_id``), confidence, correct (boolean, NA when unknown).
    """
    if space not in EMBEDDING_SPACES:
        raise ValueError(f"space must be one of {EMBEDDING_SPACES}, got {space!r}")
    mid = None if model_id is None else int(model_id)
    with store.connect() as con:
        key = mid
        n = con.scalar(
            "SELECT count(*) FROM embeddings WHERE model_id IS NOT DISTINCT FROM ? AND method = ? AND space "
            "= ?",
            [key, method, space],
        )
        if n == 0 and space == "input" and mid is not None:
            key = None
        runs = (
            []
            if mid is None
            else con.fetchall("SELECT run_id FROM runs WHERE model_id = ? AND status = 'finished'", [mid])
        )
        run_ids = [r[0] for r in runs]
        if run_ids:
            pred_join = (
                "LEFT JOIN runs r ON r.scan_id = e.scan_id AND r.model_id = ? AND r.status = 'finished' "
                "LEFT JOIN (SELECT run_id, iy, ix, pred, confidence, true_label FROM predictions "
                f"WHERE run_id IN ({_ph(len(run_ids))})) p ON p.run_id = r.run_id AND p.iy = e.iy AND p.ix = "
                "e.ix"
            )
            pred_cols = "p.pred, p.confidence, coalesce(e.true_label, p.true_label, -1) AS true_label"
            params: list[Any] = [mid, *run_ids]
        else:
            pred_join = ""
            pred_cols = "CAST(NULL AS TINYINT) AS pred, CAST(NULL AS FLOAT) AS confidence, "
            pred_cols += "coalesce(e.true_label, -1) AS true_label"
            params = []
        df = con.df(
            "SELECT e.scan_id, s.name AS scan, s.kind, s.dataset, e.iy, e.ix, e.e1, e.e2, e.thickness_nm, "
            f"{pred_cols} FROM embeddings e JOIN scans s ON s.scan_id = e.scan_id {pred_join} "
            "WHERE e.model_id IS NOT DISTINCT FROM ? AND e.method = ? AND e.space = ? "
            "ORDER BY e.scan_id, e.iy, e.ix",
            [*params, key, method, space],
        )
    df["pred"] = df["pred"].astype("Int8")
    df["true_label"] = df["true_label"].astype("int8")
    known = df["pred"].notna().to_numpy() & (df["true_label"].to_numpy() >= 0)
    correct = pd.array([pd.NA] * len(df), dtype="boolean")
    correct[known] = (
        df["pred"].to_numpy(dtype=float, na_value=-1)[known] == df["true_label"].to_numpy()[known]
    )
    df["correct"] = correct
    cols = [
        "scan_id",
        "scan",
        "kind",
        "dataset",
        "iy",
        "ix",
        "e1",
        "e2",
        "true_label",
        "thickness_nm",
        "pred",
        "confidence",
        "correct",
    ]
    return df[cols]


def domain_gaps(store: PredictionStore, *, model_ids: int | Iterable[int] | None = None) -> pd.DataFrame:
    """Domain-gap scores joined with model and scan names.

    Returns
    -------
    DataFrame
        model_id, model, family, head, variant, seed, scan_a, scan_a_name, kind_a, dataset_a, scan_b,
        scan_b_name, kind_b, dataset_b, auc, mmd, n_a, n_b, created_at.
    """
    ids = _ids(model_ids)
    conds, params = [], []
    if ids is not None:
        conds.append(f"g.model_id IN ({_ph(len(ids))})" if ids else "FALSE")
        params += ids
    return store.fetch_df(
        "SELECT g.model_id, m.name AS model, m.family, m.head, m.variant, m.seed, g.scan_a, sa.name AS "
        "scan_a_name, "
        "sa.kind AS kind_a, sa.dataset AS dataset_a, g.scan_b, sb.name AS scan_b_name, sb.kind AS kind_b, "
        "sb.dataset AS dataset_b, g.auc, g.mmd, g.n_a, g.n_b, g.created_at FROM domain_gap g "
        "JOIN models m ON m.model_id = g.model_id JOIN scans sa ON sa.scan_id = g.scan_a "
        f"JOIN scans sb ON sb.scan_id = g.scan_b{_where(conds)} ORDER BY g.model_id, g.scan_a, g.scan_b",
        params,
    )


def thickness_range(
    store: PredictionStore, run_ids: int | Iterable[int] | None = None
) -> tuple[float, float] | None:
    """(min, max) local thickness [nm] over the predictions (of ``run_ids``), or None when unknown."""
    ids = _ids(run_ids)
    if ids is not None and not ids:
        return None
    where = "" if ids is None else f" WHERE run_id IN ({_ph(len(ids))})"
    with store.connect() as con:
        lo, hi = con.fetchone(
            f"SELECT min(thickness_nm), max(thickness_nm) FROM predictions{where}", ids or []
        )
    return None if lo is None else (float(lo), float(hi))


def metrics_by_run(
    store: PredictionStore, filters: Filters | None = None, *, run_ids: int | Iterable[int] | None = None
) -> pd.DataFrame:
    """Accuracy and macro-F1 of every finished run (or of ``run_ids``) after filtering, for the overview.

    Metrics follow ``polcore.analysis.metrics`` (unlabelled positions excluded; macro-F1 over the classes
    present in the true or predicted labels).

    Returns
    -------
    DataFrame
        The columns of :func:`list_runs` plus n_rows (positions passing the filters), n_labelled,
        accuracy, macro_f1 (NaN when nothing is labelled) and mean_confidence.
    """
    ids = _ids(run_ids)
    conds, params = _filter_sql(filters)
    with store.connect() as con:
        runs = _list_runs(con, run_ids=ids)
        if ids is not None:
            conds = [f"run_id IN ({_ph(len(ids))})" if ids else "FALSE", *conds]
            params = [*ids, *params]
        counts = con.df(
            "SELECT run_id, true_label AS t, pred AS p, count(*) AS n, sum(confidence) AS conf_sum, "
            f"count(confidence) AS n_conf FROM predictions{_where(conds)} GROUP BY run_id, true_label, pred",
            params,
        )
    index = {int(r): i for i, r in enumerate(runs["run_id"])}
    n_runs = len(runs)
    counts = counts[counts["run_id"].isin(list(index))]
    row = counts["run_id"].map(index).to_numpy(int)
    n = counts["n"].to_numpy(np.int64)
    t = counts["t"].to_numpy(int)
    p = counts["p"].to_numpy(int)
    n_rows = np.bincount(row, weights=n, minlength=n_runs)
    conf_sum = np.bincount(row, weights=counts["conf_sum"].fillna(0).to_numpy(float), minlength=n_runs)
    n_conf = np.bincount(row, weights=counts["n_conf"].to_numpy(float), minlength=n_runs)
    lab = t >= 0
    cm = np.zeros((n_runs, N_CLASSES, N_CLASSES), np.int64)
    np.add.at(cm, (row[lab], t[lab], p[lab]), n[lab])
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(float)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    n_lab = support.sum(axis=1)
    denom = support + predicted
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.maximum(denom, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = runs.copy()
        out["n_rows"] = n_rows.astype(np.int64)
        out["n_labelled"] = n_lab.astype(np.int64)
        out["accuracy"] = np.where(n_lab > 0, tp.sum(axis=1) / np.maximum(n_lab, 1), np.nan)
        out["macro_f1"] = np.where(present.any(axis=1), f1.sum(axis=1) / present.sum(axis=1), np.nan)
        out["mean_confidence"] = np.where(n_conf > 0, conf_sum / np.maximum(n_conf, 1), np.nan)
    return out


# ------------------------------------------------------------------------------------------ held-out draws


def heldout_table(store: PredictionStore, *, role: str | None = None, dose: float | None = None) -> pd.DataFrame:
    """Held-out accuracy on the draw library (models and the physics limit), tidy.

    Returns
    -------
    DataFrame
        name, kind ('model' / 'limit'), role, dose, thickness_nm, per_pattern, per_cell, library_sha256;
        sorted by kind (models first), name and thickness.
    """
    conds, params = [], []
    if role is not None:
        conds.append("role = ?")
        params.append(str(role))
    if dose is not None:
        conds.append("dose = ?")
        params.append(float(dose))
    with store.connect() as con:
        return con.df(
            "SELECT name, kind, role, dose, thickness_nm, per_pattern, per_cell, library_sha256 FROM heldout"
            f"{_where(conds)} ORDER BY kind DESC, name, thickness_nm",
            params,
        )


# ------------------------------------------------------------------------------ reads for the orchestration


def scan_info(store: PredictionStore, scan_id: int) -> dict | None:
    """One scan row as a dict (None for an unknown id); NULLs become None."""
    df = store.fetch_df("SELECT * FROM scans WHERE scan_id = ?", [int(scan_id)])
    if df.empty:
        return None
    return {k: (None if _isnull(v) else v) for k, v in df.iloc[0].to_dict().items()}


def _isnull(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def scan_by_sha256(store: PredictionStore, sha256: str) -> dict | None:
    """The scan stored with this content hash, as :func:`scan_info` returns it, or None."""
    df = store.fetch_df("SELECT scan_id FROM scans WHERE sha256 = ?", [str(sha256).lower()])
    return None if df.empty else scan_info(store, int(df["scan_id"].iloc[0]))


def scored_runs(store: PredictionStore) -> pd.DataFrame:
    """Finished runs on scans with ground truth, one row each, for the benchmark: run_id, model_id,
    model_name, family, head, variant, seed and dataset (a cell-layer run's dataset carries
    :data:`CELL_SUFFIX`)."""
    return store.fetch_df(
        """SELECT r.run_id, m.model_id, m.name AS model_name, m.family, m.head, m.variant, m.seed,
                  CASE WHEN r.layer = 'cell' THEN s.dataset || ? ELSE s.dataset END AS dataset
           FROM runs r JOIN models m USING (model_id) JOIN scans s USING (scan_id)
           WHERE r.status = 'finished' AND s.has_ground_truth AND s.status = 'ready'
           ORDER BY s.dataset, m.name""",
        [CELL_SUFFIX],
    )


def labelled_predictions(store: PredictionStore, run_ids: Iterable[int]) -> pd.DataFrame:
    """pred and true_label of the labelled positions of these runs."""
    ids = _ids(run_ids) or []
    if not ids:
        return pd.DataFrame({"pred": pd.Series([], dtype=int), "true_label": pd.Series([], dtype=int)})
    return store.fetch_df(
        f"SELECT pred, true_label FROM predictions WHERE run_id IN ({_ph(len(ids))}) AND true_label >= 0", ids
    )


def truth_at(store: PredictionStore, scan_id: int) -> pd.DataFrame:
    """Ground truth of every position of a scan (from its first finished per-pattern run): scan_id, iy, ix,
    true_label, thickness_nm."""
    return store.fetch_df(
        """SELECT ?::INTEGER AS scan_id, iy, ix, true_label, thickness_nm FROM predictions
           WHERE run_id = (SELECT min(run_id) FROM runs WHERE scan_id = ? AND status = 'finished'
                           AND layer = 'pattern')""",
        [int(scan_id), int(scan_id)],
    )


def mean_accuracy_by_model(store: PredictionStore, kind: str = "pseudo_experimental") -> dict[str, float]:
    """model name -> mean benchmark accuracy over the data sets of scans of this kind."""
    df = store.fetch_df(
        """SELECT b.model_name, avg(b.accuracy) AS acc FROM bench b
           WHERE b.dataset IN (SELECT dataset FROM scans WHERE kind = ?) GROUP BY b.model_name""",
        [kind],
    )
    return dict(zip(df["model_name"], df["acc"].astype(float)))


def run_config(store: PredictionStore, run_id: int) -> dict | None:
    """One run's config (``runs.config_json``) as a dict: batch size, preprocessing, cell period, the scan
    geometry used (``"geometry"``, see :func:`polcore.infer.trusted_geometry`); {} when none was stored, None for
    an unknown run."""
    df = store.fetch_df("SELECT config_json FROM runs WHERE run_id = ?", [int(run_id)])
    if df.empty:
        return None
    raw = df["config_json"].iloc[0]
    if raw is None or _isnull(raw) or raw == "":
        return {}
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


# ------------------------------------------------------------------------------------------ scan images


def _read_con(store: Any):
    """A read-only connection context for a PredictionStore, or the open StoreConnection itself."""
    from contextlib import nullcontext

    return store.connect() if hasattr(store, "connect") else nullcontext(store)


def _has_table(con: StoreConnection, name: str) -> bool:
    return bool(con.scalar(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main' "
        "AND table_name = ?", [name]))


def scan_images(store: PredictionStore | StoreConnection, scan_id: int) -> dict[str, np.ndarray] | None:
    """The virtual images of a scan, stored once by its ingest (:mod:`polcore.virtual`).

    Parameters
    ----------
    store : a PredictionStore (read-only is enough) or an open StoreConnection.
    scan_id : the scan.

    Returns
    -------
    dict or None
        ``'bf'`` (virtual bright field), ``'adf'`` (annular dark field) [counts], ``'com_y'``, ``'com_x'``
        (centre-of-mass shift [detector px], rows down / columns right, relative to the scan mean): each float32
        (ny, nx). None when the scan has no images (unknown scan, a scan ingested before schema version 4, or
        a version-3 store read as it is).
    """
    with _read_con(store) as con:
        if not _has_table(con, "scan_images"):
            return None
        rows = con.fetchall("SELECT kind, ny, nx, data FROM scan_images WHERE scan_id = ?", [int(scan_id)])
    got = {str(k): np.frombuffer(bytes(d), dtype="<f4").reshape(int(ny), int(nx)).astype(np.float32)
           for k, ny, nx, d in rows}
    if not got or any(k not in got for k in IMAGE_KINDS):
        return None
    return {k: got[k] for k in IMAGE_KINDS}


def scan_images_info(store: PredictionStore | StoreConnection, scan_id: int) -> dict | None:
    """The detectors behind :func:`scan_images` (``center_px`` (cy, cx), ``disc_radius_px``, ``adf_radii`` in
    disc radii, ``sig_shape``; detector pixels of the geometry-corrected patterns), or None without images."""
    with _read_con(store) as con:
        if not _has_table(con, "scan_images"):
            return None
        raw = con.scalar("SELECT any_value(meta_json) FROM scan_images WHERE scan_id = ?", [int(scan_id)])
    return None if raw is None else json.loads(raw)

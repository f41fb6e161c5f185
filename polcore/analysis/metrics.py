"""Classification metrics for the 8 polarization classes, filterable by thickness range and region.

All functions take integer class indices 0..7 (``polcore.types``). Positions whose true label is negative
(-1 = no label) are excluded everywhere. The results agree with scikit-learn's ``accuracy_score``,
``f1_score(average="macro")``, ``recall_score(average=None)`` and ``confusion_matrix``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from polcore.types import CLASS_NAMES, N_CLASSES, Filters, circular_class_distance

__all__ = [
    "CIRCULAR_ERROR_DEG",
    "accuracy",
    "macro_f1",
    "per_class_recall",
    "confusion",
    "circular_error_hist",
    "apply_filters",
    "metrics_table",
]

log = logging.getLogger(__name__)

#: Angular error [deg] of each bin of :func:`circular_error_hist`.
CIRCULAR_ERROR_DEG: tuple[int, ...] = (0, 45, 90, 135, 180)

_NORMALIZE_OPTIONS = (None, "true")


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate, flatten and drop unlabelled (y_true < 0) entries."""
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same size, got {t.size} and {p.size}")
    if t.size and not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"labels must be numeric class indices, got dtype {t.dtype}")
    keep = t >= 0
    t = t[keep].astype(np.int64)
    p = p[keep].astype(np.int64)
    bad = (t >= N_CLASSES) | (p < 0) | (p >= N_CLASSES)
    if np.any(bad):
        raise ValueError(
            f"class indices must lie in 0..{N_CLASSES - 1} (true label -1 = unlabelled); "
            f"found true {np.unique(t[bad]).tolist()} / pred {np.unique(p[bad]).tolist()}"
        )
    return t, p


def confusion(y_true, y_pred, normalize: str | None = None) -> np.ndarray:
    """8x8 confusion matrix, rows = true class, columns = predicted class.

    Parameters
    ----------
    y_true, y_pred : array_like of int, any shape (same size)
        Class indices 0..7; entries with ``y_true < 0`` are ignored.
    normalize : {None, "true"}
        None gives counts (int64); "true" divides each row by its support (rows without support are 0,
        as in scikit-learn).

    Returns
    -------
    np.ndarray, shape (8, 8)
    """
    if normalize not in _NORMALIZE_OPTIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZE_OPTIONS}, got {normalize!r}")
    t, p = _labels(y_true, y_pred)
    cm = np.bincount(t * N_CLASSES + p, minlength=N_CLASSES * N_CLASSES).reshape(N_CLASSES, N_CLASSES)
    if normalize == "true":
        support = cm.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            cm = np.where(support > 0, cm / np.maximum(support, 1), 0.0)
    return cm


def accuracy(y_true, y_pred) -> float:
    """Fraction of labelled positions predicted correctly (NaN when nothing is labelled)."""
    t, p = _labels(y_true, y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def per_class_recall(y_true, y_pred) -> np.ndarray:
    """Recall of each class, shape (8,); NaN for classes absent from ``y_true``."""
    cm = confusion(y_true, y_pred)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def macro_f1(y_true, y_pred) -> float:
    """Macro-averaged F1 over the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default).

    A class with no true positive scores 0. NaN when nothing is labelled.
    """
    cm = confusion(y_true, y_pred)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    if not np.any(present):
        return float("nan")
    denom = support + predicted
    f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return float(np.mean(f1[present]))


def circular_error_hist(y_true, y_pred) -> np.ndarray:
    """Counts of angular errors of 0, 45, 90, 135 and 180 degrees (see ``CIRCULAR_ERROR_DEG``).

    Returns
    -------
    np.ndarray of int64, shape (5,)
    """
    t, p = _labels(y_true, y_pred)
    return np.bincount(circular_class_distance(t, p), minlength=N_CLASSES // 2 + 1).astype(np.int64)


def apply_filters(df: pd.DataFrame, filters: Filters | None = None) -> pd.DataFrame:
    """Rows of a predictions DataFrame that pass ``filters``.

    Parameters
    ----------
    df : DataFrame with columns iy, ix and (for a thickness filter) thickness_nm [nm].
    filters : polcore.types.Filters or None
        ``thickness=(lo, hi)`` inclusive [nm] (rows with unknown thickness are dropped when it is set);
        ``region=(y0, y1, x0, x1)`` inclusive scan-pixel rectangle.
    """
    if filters is None or not filters.active:
        return df
    if filters.thickness is not None and "thickness_nm" not in df.columns:
        raise ValueError("a thickness filter needs a 'thickness_nm' column")
    th = df["thickness_nm"].to_numpy(dtype=float) if filters.thickness is not None else None
    return df.loc[filters.keep(df["iy"].to_numpy(), df["ix"].to_numpy(), th)]


def metrics_table(df: pd.DataFrame, filters: Filters | None = None) -> dict:
    """All metrics of one run's predictions after filtering.

    Parameters
    ----------
    df : DataFrame
        One row per probe position with columns iy, ix, pred, true_label (-1 = no label, excluded) and
        thickness_nm [nm] (needed only for a thickness filter).
    filters : polcore.types.Filters or None

    Returns
    -------
    dict with keys
        n_rows (rows after filtering), n_labelled, accuracy, macro_f1, per_class_recall (8,),
        per_class_support (8,), confusion (8, 8) counts, confusion_norm (8, 8) row-normalised,
        circular_error_hist (5,) counts, circular_error_deg (the bin angles), mean_abs_error_deg,
        class_names.
    """
    missing = {"iy", "ix", "pred", "true_label"} - set(df.columns)
    if missing:
        raise ValueError(f"predictions DataFrame lacks columns {sorted(missing)}")
    sub = apply_filters(df, filters)
    t = sub["true_label"].to_numpy()
    p = sub["pred"].to_numpy()
    cm = confusion(t, p)
    hist = circular_error_hist(t, p)
    n_lab = int(cm.sum())
    if n_lab == 0:
        log.info("metrics_table: no labelled rows after filtering (%d rows)", len(sub))
    return {
        "n_rows": int(len(sub)),
        "n_labelled": n_lab,
        "accuracy": accuracy(t, p),
        "macro_f1": macro_f1(t, p),
        "per_class_recall": per_class_recall(t, p),
        "per_class_support": cm.sum(axis=1),
        "confusion": cm,
        "confusion_norm": confusion(t, p, normalize="true"),
        "circular_error_hist": hist,
        "circular_error_deg": CIRCULAR_ERROR_DEG,
        "mean_abs_error_deg": float(np.dot(hist, CIRCULAR_ERROR_DEG) / n_lab) if n_lab else float("nan"),
        "class_names": CLASS_NAMES,
    }

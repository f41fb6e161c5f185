"""Defect correlation: an irregularity score per probe position, its agreement with a defect mask, and a
ranked list of candidate regions for scans without ground truth.

The score combines (a) disagreement with the neighbourhood beyond the periodic pattern, (b) the entropy of the
predicted class probabilities and (c) optionally the distance of the feature vector to its class prototype.
Each term is normalised robustly (ranks, or median/MAD) before the weighted mean is taken.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from polcore.types import N_CLASSES, circular_class_distance

__all__ = [
    "IRREGULARITY_TERMS",
    "NORMALIZATIONS",
    "neighbour_disagreement",
    "prediction_entropy",
    "prototype_distance",
    "robust_normalize",
    "irregularity",
    "defect_auc",
    "precision_at_k",
    "roc_curve_points",
    "candidate_regions",
]

log = logging.getLogger(__name__)

IRREGULARITY_TERMS: tuple[str, ...] = ("neighbour", "entropy", "prototype")
NORMALIZATIONS: tuple[str, ...] = ("rank", "mad")
REGION_COLUMNS: tuple[str, ...] = (
    "rank", "y0", "y1", "x0", "x1", "cy", "cx", "n_px", "mean_score", "max_score", "mass",
)


def _pred(pred_map) -> np.ndarray:
    p = np.asarray(pred_map)
    if p.ndim != 2:
        raise ValueError(f"pred_map must be 2-D (ny, nx), got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        if not np.all(np.isfinite(p) & (p == np.round(p))):
            raise ValueError("pred_map must hold integer class indices (-1 = invalid)")
        p = p.astype(np.int64)
    if np.any(p >= N_CLASSES):
        raise ValueError(f"pred_map values must be < {N_CLASSES} (negative = invalid)")
    return p.astype(np.int64)


def _offsets(window: int, period_px) -> list[tuple[int, int]]:
    if window not in (3, 5, 7):
        raise ValueError(f"window must be one of (3, 5, 7), got {window}")
    if period_px is None:
        py = px = 1.0
    else:
        per = np.broadcast_to(np.asarray(period_px, dtype=float), (2,))
        if not np.all(per >= 1):
            raise ValueError(f"period_px must be >= 1 scan px (scalar or (py, px)), got {period_px}")
        py, px = float(per[0]), float(per[1])
    h = window // 2
    out = {(int(round(my * py)), int(round(mx * px)))
           for my in range(-h, h + 1) for mx in range(-h, h + 1) if (my, mx) != (0, 0)}
    out.discard((0, 0))
    return sorted(out)


def neighbour_disagreement(pred_map, *, period_px=None, window: int = 3) -> np.ndarray:
    """Circular class distance (0..4 steps of 45 deg) between each prediction and its neighbourhood's mode.

    Parameters
    ----------
    pred_map : array_like of int, shape (ny, nx)
        Predicted class 0..7; negative = invalid (ignored as a neighbour, NaN in the output).
    period_px : float or (float, float), optional
        Lattice period [scan px]. When given, the neighbours are the positions whole lattice periods away
        (offsets round(m * period) for |m| <= window // 2), which sit at the same place inside the unit cell,
        so an error pattern that repeats with the lattice is not counted as disagreement.
    window : {3, 5, 7}
        Neighbourhood size in units of the neighbour step (1 px, or one period).

    Returns
    -------
    np.ndarray, shape (ny, nx), float
        Distance to the nearest of the most frequent neighbour classes (0 when the prediction is one of them
        or there are no valid neighbours); NaN at invalid positions.
    """
    p = _pred(pred_map)
    ny, nx = p.shape
    valid = p >= 0
    onehot = np.zeros((N_CLASSES, ny, nx), dtype=np.int16)
    onehot[np.where(valid, p, 0), np.arange(ny)[:, None], np.arange(nx)[None, :]] = valid
    counts = np.zeros_like(onehot)
    for dy, dx in _offsets(window, period_px):
        if abs(dy) >= ny or abs(dx) >= nx:
            continue
        # counts[:, y, x] += onehot[:, y + dy, x + dx] where both lie inside the map
        dst_y = slice(max(0, -dy), ny - max(0, dy))
        src_y = slice(max(0, dy), ny - max(0, -dy))
        dst_x = slice(max(0, -dx), nx - max(0, dx))
        src_x = slice(max(0, dx), nx - max(0, -dx))
        counts[:, dst_y, dst_x] += onehot[:, src_y, src_x]
    top = counts.max(axis=0)
    dist = circular_class_distance(p[None], np.arange(N_CLASSES)[:, None, None]).astype(float)
    dist = np.where((counts == top[None]) & (top[None] > 0), dist, np.inf).min(axis=0)
    dist[~np.isfinite(dist)] = 0.0
    dist[~valid] = np.nan
    return dist


def prediction_entropy(probs) -> np.ndarray:
    """Shannon entropy of class probabilities, normalised to [0, 1] by log(8).

    Parameters
    ----------
    probs : array_like, shape (..., 8)

    Returns
    -------
    np.ndarray, shape (...)
    """
    q = np.asarray(probs, dtype=float)
    if q.shape[-1] != N_CLASSES:
        raise ValueError(f"probs must have a last axis of {N_CLASSES}, got shape {q.shape}")
    q = np.clip(q, 0.0, None)
    s = q.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = q / s
        h = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)
    return h / np.log(N_CLASSES)


def prototype_distance(features, pred, prototypes) -> np.ndarray:
    """Euclidean distance between each feature vector and the prototype of its predicted class.

    Parameters
    ----------
    features : array_like, shape (..., d)
    pred : array_like of int, shape (...)
        Predicted class; negative = invalid (NaN out).
    prototypes : array_like, shape (8, d)

    Returns
    -------
    np.ndarray, shape (...)
    """
    f = np.asarray(features, dtype=float)
    p = np.asarray(pred).astype(np.int64)
    proto = np.asarray(prototypes, dtype=float)
    if proto.ndim != 2 or proto.shape[0] != N_CLASSES:
        raise ValueError(f"prototypes must have shape ({N_CLASSES}, d), got {proto.shape}")
    if f.shape[:-1] != p.shape or f.shape[-1] != proto.shape[1]:
        raise ValueError(f"features {f.shape} must be pred.shape {p.shape} + (d={proto.shape[1]},)")
    valid = (p >= 0) & (p < N_CLASSES)
    d = np.linalg.norm(f - proto[np.where(valid, p, 0)], axis=-1)
    return np.where(valid, d, np.nan)


def average_ranks(v) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing their average rank (``scipy.stats.rankdata(v, "average")``,
    whose module takes about a second to import: that second was 7 % of a 256 x 256 ingest in a fresh process)."""
    v = np.asarray(v).ravel()
    order = np.argsort(v, kind="stable")
    s = v[order]
    first = np.r_[True, s[1:] != s[:-1]] if s.size else np.zeros(0, bool)
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(v.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(first) - 1]
    return ranks


def robust_normalize(values, method: str = "rank") -> np.ndarray:
    """Robust normalisation of a score map (NaN kept).

    ``"rank"``: average rank / n, in (0, 1]. ``"mad"``: (x - median) / (1.4826 MAD), falling back to the mean
    absolute deviation (and then to 1) when the MAD is zero.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; valid: {NORMALIZATIONS}")
    x = np.asarray(values, dtype=float)
    out = np.full(x.shape, np.nan)
    ok = np.isfinite(x)
    v = x[ok]
    if v.size == 0:
        return out
    if method == "rank":
        out[ok] = average_ranks(v) / v.size
    else:
        med = np.median(v)
        scale = 1.4826 * np.median(np.abs(v - med))
        if scale <= 0:
            scale = 1.2533 * np.mean(np.abs(v - med))
        out[ok] = (v - med) / (scale if scale > 0 else 1.0)
    return out


def _nan_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    ok = np.isfinite(x)
    num = ndimage.gaussian_filter(np.where(ok, x, 0.0), sigma, mode="nearest")
    den = ndimage.gaussian_filter(ok.astype(float), sigma, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[~ok] = np.nan
    return out


def irregularity(pred_map, probs=None, *, period_px=None, weights: Mapping[str, float] | None = None,
                 window: int = 3, features=None, prototypes=None, normalize: str = "rank",
                 smooth_px: float = 0.0, return_terms: bool = False):
    """Irregularity score per probe position: high where the prediction does not fit the regular pattern.

    Parameters
    ----------
    pred_map : array_like of int, shape (ny, nx)
        Predicted class 0..7, negative = invalid.
    probs : array_like, shape (ny, nx, 8), optional
        Class probabilities (for the entropy term).
    period_px : float or (float, float), optional
        Lattice period [scan px]; see :func:`neighbour_disagreement`.
    weights : mapping, optional
        Weight per term, keys from ``IRREGULARITY_TERMS`` ("neighbour", "entropy", "prototype"); default 1 for
        every term whose inputs are given.
    window : {3, 5, 7}
        Neighbourhood size for the disagreement term.
    features : array_like, shape (ny, nx, d), optional, and prototypes : (8, d), optional
        For the prototype-distance term (both or neither).
    normalize : {"rank", "mad"}
        Robust normalisation applied to each term before the weighted mean.
    smooth_px : float
        Gaussian sigma [scan px] applied to the combined score (0 = none).
    return_terms : bool
        Also return the raw terms as a dict name -> (ny, nx).

    Returns
    -------
    score : np.ndarray, shape (ny, nx), float
        Weighted mean of the normalised terms; NaN at invalid positions.
    terms : dict (only with ``return_terms``)
    """
    p = _pred(pred_map)
    if (features is None) != (prototypes is None):
        raise ValueError("give both features and prototypes for the prototype term, or neither")
    terms: dict[str, np.ndarray] = {
        "neighbour": neighbour_disagreement(p, period_px=period_px, window=window),
    }
    if probs is not None:
        q = np.asarray(probs)
        if q.shape != p.shape + (N_CLASSES,):
            raise ValueError(f"probs must have shape {p.shape + (N_CLASSES,)}, got {q.shape}")
        terms["entropy"] = np.where(p >= 0, prediction_entropy(q), np.nan)
    if features is not None:
        terms["prototype"] = prototype_distance(features, p, prototypes)
    if weights is None:
        w = {k: 1.0 for k in terms}
    else:
        unknown = set(weights) - set(IRREGULARITY_TERMS)
        if unknown:
            raise ValueError(f"unknown irregularity terms {sorted(unknown)}; valid: {IRREGULARITY_TERMS}")
        missing = [k for k, v in weights.items() if v and k not in terms]
        if missing:
            raise ValueError(f"weights given for terms without inputs: {missing} (pass probs / features)")
        w = {k: float(v) for k, v in weights.items() if v}
    if not w or sum(w.values()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    score = sum(wk * robust_normalize(terms[k], normalize) for k, wk in w.items()) / sum(w.values())
    score = np.where(p >= 0, score, np.nan)
    if smooth_px > 0:
        score = _nan_gaussian(score, smooth_px)
    return (score, terms) if return_terms else score


def _scores_mask(scores, mask) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    m = np.asarray(mask)
    if s.shape != m.shape:
        raise ValueError(f"scores and mask must have the same shape, got {s.shape} and {m.shape}")
    ok = np.isfinite(s)
    return s[ok], m[ok].astype(bool)


def defect_auc(scores, mask) -> float:
    """ROC-AUC of the scores against a boolean defect mask (finite scores only).

    Returns NaN when the mask (over finite scores) holds a single value.
    """
    from sklearn.metrics import roc_auc_score

    s, m = _scores_mask(scores, mask)
    if m.size == 0 or m.all() or not m.any():
        return float("nan")
    return float(roc_auc_score(m, s))


def precision_at_k(scores, mask, k: int) -> float:
    """Fraction of the ``k`` highest-scoring positions that lie in the defect mask (k capped at n)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s, m = _scores_mask(scores, mask)
    if s.size == 0:
        return float("nan")
    k = min(int(k), s.size)
    top = np.argsort(-s, kind="stable")[:k]
    return float(m[top].mean())


def roc_curve_points(scores, mask, *, max_points: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (false-positive rate, true-positive rate), thinned to at most ``max_points`` points.

    Returns empty arrays when the mask holds a single value.
    """
    from sklearn.metrics import roc_curve

    s, m = _scores_mask(scores, mask)
    if m.size == 0 or m.all() or not m.any():
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=True)
    if fpr.size > max_points:
        idx = np.unique(np.r_[np.linspace(0, fpr.size - 1, max_points).astype(int), fpr.size - 1])
        fpr, tpr = fpr[idx], tpr[idx]
    return fpr, tpr


def candidate_regions(scores, *, top: int = 10, min_size: int = 4, quantile: float = 0.98,
                      smooth_px: float = 0.0) -> pd.DataFrame:
    """Ranked connected regions of high irregularity (for scans without ground truth).

    The score map (optionally Gaussian-smoothed) is thresholded at its ``quantile``; 8-connected regions of at
    least ``min_size`` positions are ranked by their mass, the summed excess of the score over the threshold
    (a large and strongly irregular region ranks above a single outlier).

    Parameters
    ----------
    scores : array_like, shape (ny, nx)
        Irregularity score (NaN = invalid).
    top : int
        Number of regions returned at most.
    min_size : int
        Smallest region [positions].
    quantile : float in (0, 1)
    smooth_px : float
        Gaussian sigma [scan px] applied before thresholding.

    Returns
    -------
    pandas.DataFrame
        Columns rank (1 = most irregular), y0, y1, x0, x1 (inclusive bounding box), cy, cx (centroid),
        n_px, mean_score, max_score, mass.
    """
    from scipy import ndimage

    s = np.asarray(scores, dtype=float)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (ny, nx), got shape {s.shape}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    if smooth_px > 0:
        s = _nan_gaussian(s, smooth_px)
    ok = np.isfinite(s)
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in REGION_COLUMNS})
    if not ok.any():
        return empty
    thr = float(np.quantile(s[ok], quantile))
    binary = ok & (s >= thr)
    if binary.sum() > 2 * (1 - quantile) * ok.sum() + 1:  # ties at the threshold (e.g. rank plateaus)
        binary = ok & (s > thr)
    labels, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return empty
    lab = labels.ravel()
    sv = np.where(ok, s, 0.0).ravel()
    iy, ix = np.indices(s.shape)
    n_px = np.bincount(lab, minlength=n + 1)[1:]
    sums = np.bincount(lab, weights=sv, minlength=n + 1)[1:]
    cy = np.bincount(lab, weights=iy.ravel(), minlength=n + 1)[1:] / n_px
    cx = np.bincount(lab, weights=ix.ravel(), minlength=n + 1)[1:] / n_px
    mx = ndimage.maximum(np.where(ok, s, -np.inf), labels, index=np.arange(1, n + 1))
    boxes = ndimage.find_objects(labels)
    df = pd.DataFrame({
        "y0": [b[0].start for b in boxes], "y1": [b[0].stop - 1 for b in boxes],
        "x0": [b[1].start for b in boxes], "x1": [b[1].stop - 1 for b in boxes],
        "cy": cy, "cx": cx, "n_px": n_px, "mean_score": sums / n_px, "max_score": np.asarray(mx, float),
        "mass": sums - thr * n_px,
    })
    df = df[df["n_px"] >= min_size].sort_values("mass", ascending=False, kind="stable").head(int(top))
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df.reset_index(drop=True)[list(REGION_COLUMNS)]

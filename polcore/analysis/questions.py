"""One entry point per question the study asks of a run, used by the CLI report and by the dashboard pages.

Both take a run's grids (``polcore.store.queries.run_grids``: (ny, nx) maps of pred, true_label, error,
thickness_nm, irregularity, is_defect, probs) and a :class:`polcore.types.Filters`, whose region is a mask
(never a crop) and whose thickness is a range, exactly as in every query.

* :func:`periodic_errors`: are the errors periodic, with the lattice's period, and where in the cell?
* :func:`defect_evidence`: does the irregularity of the predictions mark the defects?

Metrics under filters (accuracy, macro-F1, counts) are SQL aggregates: ``queries.metrics_by_run``.
"""

from __future__ import annotations

import numpy as np

from polcore.types import Filters

__all__ = ["periodic_errors", "defect_evidence"]


def periodic_errors(grids: dict, filters: Filters | None = None, lattice_period_px: float | None = None) -> dict:
    """Dominant period of a run's error map and the error rate folded onto the unit cell.

    Returns
    -------
    dict with ``result`` (``periodicity`` summary plus peaks and spectrum arrays; None when no labelled
    position passes the filters), ``cell`` (nby, nbx) error rate inside the cell and ``cell_counts`` (None
    without a lattice period), ``n_valid`` (positions analysed).
    """
    from polcore.analysis.periodic import fold_to_cell, periodicity

    filters = filters or Filters()
    err = filters.apply(grids["error"], grids.get("thickness_nm"))
    if not np.isfinite(err).any():
        return {"result": None, "cell": None, "cell_counts": None, "n_valid": 0}
    res = periodicity(err, lattice_period_px=lattice_period_px)
    out = {
        "result": {**res.summary(), "peaks": list(res.peaks), "spectrum": res.spectrum, "freq_y": res.freq_y,
                   "freq_x": res.freq_x},
        "cell": None,
        "cell_counts": None,
        "n_valid": int(np.isfinite(err).sum()),
    }
    if lattice_period_px:
        out["cell"], out["cell_counts"] = fold_to_cell(err, float(lattice_period_px), return_counts=True)
    return out


def defect_evidence(grids: dict, filters: Filters | None = None, period_px: float | None = None, *,
                    top: int = 10) -> dict:
    """Irregularity map (stored, else computed from the predictions), defect mask, ROC and candidate regions.

    Positions that do not pass the filters get a NaN score, so the map, the ROC-AUC and the candidates cover
    the filtered positions only.

    Returns
    -------
    dict with ``score`` (ny, nx), ``mask`` (ny, nx) bool, ``has_mask``, ``auc`` (NaN without both classes),
    ``fpr``, ``tpr``, ``candidates`` (DataFrame), ``computed`` (True when the score was computed here) and
    ``n_scored`` (positions with a finite score).
    """
    from polcore.analysis.defects import candidate_regions, defect_auc, irregularity, roc_curve_points

    filters = filters or Filters()
    score = np.array(grids["irregularity"], dtype=float)
    computed = False
    if not np.isfinite(score[grids["pred"] >= 0]).any():
        probs = grids["probs"] if np.isfinite(grids["probs"]).all() else None
        score = irregularity(grids["pred"], probs, period_px=period_px)
        computed = True
    score = filters.apply(score, grids.get("thickness_nm"))
    mask = np.asarray(grids["is_defect"], dtype=bool)
    ok = np.isfinite(score)
    has_mask = bool(mask.any())
    auc, fpr, tpr = float("nan"), np.zeros(0), np.zeros(0)
    if has_mask and mask[ok].any() and not mask[ok].all():
        auc = float(defect_auc(score, mask))
        fpr, tpr = roc_curve_points(score, mask)
    return {
        "score": score,
        "mask": mask,
        "has_mask": has_mask,
        "auc": auc,
        "fpr": np.asarray(fpr),
        "tpr": np.asarray(tpr),
        "candidates": candidate_regions(score, top=top, smooth_px=1.0),
        "computed": computed,
        "n_scored": int(ok.sum()),
    }

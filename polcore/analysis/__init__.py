"""Analyses behind the dashboard: metrics, periodic errors, embeddings and the domain gap, defect correlation.

Pure numpy / scipy / scikit-learn (umap imported inside :func:`embed_2d`); inputs are arrays or pandas
DataFrames, never database handles. The names below are imported from their submodules on first use.
"""

from __future__ import annotations

import importlib

#: Public name -> submodule that defines it. The submodules load on first use (PEP 562 ``__getattr__``), so
#: that ``from polcore.analysis import accuracy`` does not import scipy.stats, scipy.optimize and the rest
#: that only the defect and periodicity analyses need (about a second cold, paid by every dashboard page).
_SOURCES: dict[str, str] = {
    **dict.fromkeys(("cell_blocks", "estimate_cell_px", "pool_scan"), "cells"),
    **dict.fromkeys(
        (
            "IRREGULARITY_TERMS",
            "candidate_regions",
            "defect_auc",
            "irregularity",
            "neighbour_disagreement",
            "precision_at_k",
            "prediction_entropy",
            "prototype_distance",
            "robust_normalize",
            "roc_curve_points",
        ),
        "defects",
    ),
    **dict.fromkeys(("EMBED_METHODS", "domain_gap", "embed_2d", "mmd_rbf"), "embedding"),
    **dict.fromkeys(
        (
            "CIRCULAR_ERROR_DEG",
            "accuracy",
            "apply_filters",
            "circular_error_hist",
            "confusion",
            "macro_f1",
            "metrics_table",
            "per_class_recall",
        ),
        "metrics",
    ),
    **dict.fromkeys(("PeriodicityResult", "com_relation", "fold_to_cell", "periodicity"), "periodic"),
    **dict.fromkeys(("defect_evidence", "periodic_errors"), "questions"),
}


def __getattr__(name: str):
    """Load the submodule that defines ``name`` on first access and keep the name here."""
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = [
    "cell_blocks",
    "estimate_cell_px",
    "pool_scan",
    # metrics
    "CIRCULAR_ERROR_DEG",
    "accuracy",
    "macro_f1",
    "per_class_recall",
    "confusion",
    "circular_error_hist",
    "apply_filters",
    "metrics_table",
    # periodic errors
    "PeriodicityResult",
    "periodicity",
    "fold_to_cell",
    "com_relation",
    # embeddings and domain gap
    "EMBED_METHODS",
    "embed_2d",
    "domain_gap",
    "mmd_rbf",
    # defects
    "IRREGULARITY_TERMS",
    "neighbour_disagreement",
    "prediction_entropy",
    "prototype_distance",
    "robust_normalize",
    "irregularity",
    "defect_auc",
    "precision_at_k",
    "roc_curve_points",
    "candidate_regions",
    # one entry point per question (CLI report and pages)
    "periodic_errors",
    "defect_evidence",
]

"""Analyses behind the dashboard: metrics, periodic errors, embeddings and the domain gap, defect correlation.

Pure numpy / scipy / scikit-learn (umap imported inside :func:`embed_2d`); inputs are arrays or pandas
DataFrames, never database handles.
"""

from polcore.analysis.cells import cell_blocks, estimate_cell_px, pool_scan
from polcore.analysis.defects import (
    IRREGULARITY_TERMS,
    candidate_regions,
    defect_auc,
    irregularity,
    neighbour_disagreement,
    precision_at_k,
    prediction_entropy,
    prototype_distance,
    robust_normalize,
    roc_curve_points,
)
from polcore.analysis.embedding import EMBED_METHODS, domain_gap, embed_2d, mmd_rbf
from polcore.analysis.metrics import (
    CIRCULAR_ERROR_DEG,
    accuracy,
    apply_filters,
    circular_error_hist,
    confusion,
    macro_f1,
    metrics_table,
    per_class_recall,
)
from polcore.analysis.periodic import PeriodicityResult, com_relation, fold_to_cell, periodicity
from polcore.analysis.questions import defect_evidence, periodic_errors

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

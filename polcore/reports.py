"""Reports over the stored runs: embeddings and the domain gap, and the per-run analysis report.

* :func:`compute_embeddings`: PCA/UMAP of the preprocessed inputs (model independent) and of each model's
  features over all scans together, and the domain gap (synthetic against experimental-like features) per
  model and pair of scans.
* :func:`analysis_report`: per finished run with ground truth, the study's questions answered by
  ``polcore.analysis.periodic_errors`` and ``defect_evidence``, the same entry points the pages use.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from polcore import settings
from polcore.progress import Progress, report
from polcore.types import Filters

__all__ = ["compute_embeddings", "analysis_report"]


def _features(db_path, scans: pd.DataFrame, model_id: int) -> list[tuple]:
    """(scan_id, kind, pos, features, inputs) of every scan with a stored feature subsample of this model."""
    parts = []
    for sid, kind in zip(scans["scan_id"], scans["kind"]):
        f = settings.features_dir(db_path) / f"scan{sid}_model{model_id}.npz"
        if f.exists():
            with np.load(f, allow_pickle=False) as z:
                parts.append((int(sid), kind, z["pos"], z["features"], z["inputs"]))
    return parts


def compute_embeddings(db_path=None, *, methods=("pca", "umap"), n_max=4000, seed=0,
                       progress: Progress | None = None) -> dict:
    """Embeddings of the feature subsamples saved by the ingest, and the domain gap per model.

    The gap is scored for every pair (synthetic scan, experimental or experimental-like scan) and stored per
    pair. Returns {model name: mean gap ROC-AUC over the pairs}.
    """
    from polcore.analysis import domain_gap, embed_2d, mmd_rbf
    from polcore.store import PredictionStore, queries

    progress = report(progress)
    db_path = db_path or settings.db_path()
    store = PredictionStore(db_path)
    scans = queries.list_scans(store)
    models = queries.list_models(store)
    gaps = {}
    inputs_done = False
    for j, (mid, mname) in enumerate(zip(models["model_id"], models["name"])):
        parts = _features(db_path, scans, int(mid))
        if not parts:
            continue
        labels = pd.concat([queries.truth_at(store, p[0]) for p in parts], ignore_index=True)
        for space in (("input", "features") if not inputs_done else ("features",)):
            X = np.concatenate([p[4] if space == "input" else p[3] for p in parts])
            meta = pd.DataFrame({
                "scan_id": np.concatenate([np.full(len(p[2]), p[0]) for p in parts]),
                "iy": np.concatenate([p[2][:, 0] for p in parts]),
                "ix": np.concatenate([p[2][:, 1] for p in parts]),
            }).merge(labels, on=["scan_id", "iy", "ix"], how="left")
            for method in methods:
                emb, idx = embed_2d(X, method=method, n_max=n_max, seed=seed)
                df = meta.iloc[idx].reset_index(drop=True).copy()
                df["e1"], df["e2"] = emb[:, 0], emb[:, 1]
                df["method"], df["space"] = method, space
                df["model_id"] = None if space == "input" else int(mid)
                store.write_embeddings(df)
        inputs_done = True
        syn = [p for p in parts if p[1] == "synthetic"]
        exp = [p for p in parts if p[1] != "synthetic"]
        aucs = []
        for a in syn:  # one row per (synthetic scan, experimental(-like) scan) pair, as the table keys it
            for b in exp:
                auc = float(domain_gap(a[3], b[3], rng=seed))
                store.write_domain_gap(int(mid), a[0], b[0], auc=auc, mmd=float(mmd_rbf(a[3], b[3])),
                                       n_a=len(a[3]), n_b=len(b[3]))
                aucs.append(auc)
        if aucs:
            gaps[mname] = float(np.mean(aucs))
        progress((j + 1) / len(models), f"embeddings of {mname}")
    return gaps


def analysis_report(db_path=None, filters: Filters | None = None) -> pd.DataFrame:
    """Per finished run with ground truth: accuracy, the dominant error period against the lattice period, the
    periodic fraction of the errors, the defect ROC-AUC of the irregularity score and the model's domain gap,
    under ``filters``."""
    from polcore.analysis import defect_evidence, periodic_errors
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db_path or settings.db_path())
    gaps = queries.domain_gaps(store)
    gap_by_model = dict(zip(gaps["model_id"], gaps["auc"])) if not gaps.empty else {}
    rows = []
    for r in queries.list_runs(store).itertuples():
        if not r.has_ground_truth:
            continue
        g = queries.run_grids(store, int(r.run_id))
        cell = None if pd.isna(r.cell_px) else float(r.cell_px)
        per = periodic_errors(g, filters, cell)
        res = per["result"] or {}
        err = (filters or Filters()).apply(g["error"], g["thickness_nm"])
        dfx = defect_evidence(g, filters, cell)
        rows.append(dict(
            model=r.model, scan=r.scan, layer=r.layer,
            accuracy=float(1 - np.nanmean(err)) if np.isfinite(err).any() else np.nan,
            error_period_px=res.get("period_px", np.nan), lattice_period_px=cell,
            angle_deg=res.get("angle_deg", np.nan), periodic_fraction=res.get("periodic_fraction", np.nan),
            defect_auc=dfx["auc"], domain_gap_auc=gap_by_model.get(r.model_id, np.nan),
        ))
    return pd.DataFrame(rows)

"""Ingest: one scan file in, its predictions (per pattern and per unit cell) in the store.

The path of a scan, from upload to map::

    ui/backend.save_upload ──(file + sha256 of the bytes, hashed while they were written)──┐
    python -m polcore ingest FILE ──(sha256: one sequential read, see below)───────────────┤
                                                                                            v
    ingest_scan: open_scan (metadata only) → load the CHOSEN checkpoints → scan row 'ingesting'
      → polcore.infer.predict_scan_many: ONE pass over the file; the preprocessing of each group of models
        is fitted on the first patterns of that pass, then every batch goes through every model
      → per model: features (npz) → per-pattern run → per-cell run (pooled log-probabilities)
      → scan row 'ready'.   On any failure: 'failed', then everything this call wrote is removed
        (runs, the scan row when it was new, model rows it registered), so the store is as it was.

Why the CLI hashes in a separate pass: the sha256 decides, before any model runs, whether this file is already
stored (a re-ingest then costs nothing). Hashing reads the file sequentially at disk speed (~1 GB/s), which is
a small fraction of the inference time; an upload never pays it, because its bytes were hashed while they were
saved.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polcore import settings
from polcore.naming import model_name, model_variant
from polcore.progress import Progress, report

__all__ = ["CHECKPOINT_SUFFIXES", "checkpoints", "available_models", "load_models", "register_models",
           "ingest_scan", "IngestResult"]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".npz")
#: Pseudo-cubic lattice constant of KNN [nm]: the cell period of a calibrated scan is this over the step.
KNN_LATTICE_NM = 0.395


def checkpoints(model_dir=None) -> list[Path]:
    """Checkpoint files under ``model_dir`` (recursively, default :func:`polcore.settings.models_dir`), sorted."""
    d = Path(model_dir) if model_dir is not None else settings.models_dir()
    return sorted(p for p in d.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()) if d.is_dir() else []


def available_models(model_dir=None) -> dict[str, Path]:
    """model name -> checkpoint path, from the metadata alone (nothing is loaded). Unreadable files are
    skipped with a warning."""
    from polcore.models import read_checkpoint_meta

    out: dict[str, Path] = {}
    for p in checkpoints(model_dir):
        try:
            out[model_name(read_checkpoint_meta(p))] = p
        except Exception:  # noqa: BLE001 - a foreign file in the folder is skipped, not fatal
            log.warning("skipping %s: not a readable polbench checkpoint", p, exc_info=True)
    return out


def load_models(paths) -> dict:
    """name -> (model, meta, path) for checkpoint paths (each one loaded)."""
    from polcore.models import load_checkpoint

    out = {}
    for p in paths:
        model = load_checkpoint(p, device=None)
        out[model_name(model.meta)] = (model, model.meta, Path(p))
    return out


def _choose(model_names, model_dir, models) -> dict:
    """The chosen models, loading only their checkpoints."""
    if models is None:
        found = available_models(model_dir)
        names = sorted(found) if model_names is None else list(model_names)
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"unknown models {missing}; available in {model_dir or settings.models_dir()}: "
                             f"{sorted(found)}")
        models = load_models([found[n] for n in names])
    elif model_names is not None:
        missing = sorted(set(model_names) - set(models))
        if missing:
            raise ValueError(f"unknown models {missing}; available: {sorted(models)}")
        models = {k: models[k] for k in model_names}
    if not models:
        raise ValueError(f"no trained models in {model_dir or settings.models_dir()}: run "
                         "`python -m polcore train --profile cpu` or build the demo")
    return models


def register_models(store, models: dict) -> dict[str, int]:
    """Add the models to the store (an existing name keeps its row); name -> model_id."""
    ids = {}
    for name, (model, meta, path) in models.items():
        cfg = meta.get("train_config") or meta.get("config") or {}
        ids[name] = store.add_model(
            name=name, family=meta["family"], head=meta["head"], variant=model_variant(meta), seed=cfg.get("seed"),
            config={k: meta.get(k) for k in ("train_config", "model_cfg", "preprocessing", "versions",
                                                "library_sha256", "best_epoch") if k in meta},
            checkpoint_path=str(path), library_sha256=meta.get("library_sha256"),
            train_seconds=meta.get("train_seconds"),
            n_params=int(model.n_parameters()) if hasattr(model, "n_parameters") else None,
        )
    return ids


def _scan_row(path: Path, scan, gt: dict | None, gt_attrs: dict, *, name, kind, dataset, sha256) -> dict:
    """The ``add_scan`` keywords of a scan: shape, calibration, thickness and lattice period."""
    ny, nx = scan.nav_shape
    ky, kx = scan.sig_shape
    thickness = None
    if gt is not None:
        t = np.asarray(gt["thickness_nm"], float)
        thickness = float(t.mean()) if np.ptp(t) < 1e-6 else None
    cell_px = gt_attrs.get("cell_px")
    if cell_px is None and scan.meta.step_nm:
        cell_px = KNN_LATTICE_NM / float(scan.meta.step_nm)
    meta = dict(calibration={k: getattr(scan.meta, k) for k in ("step_nm", "mrad_per_px", "voltage_kv",
                                                                "convergence_mrad", "rotation_deg", "flip")},
                dataset_in_file=getattr(scan, "dataset", None), dtype=str(np.dtype(scan.dtype)))
    return dict(name=name or path.stem, kind=kind, sha256=sha256, ny=int(ny), nx=int(nx), ky=int(ky), kx=int(kx),
                dataset=dataset or name or path.stem, source_file=str(path.resolve()), step_nm=scan.meta.step_nm,
                thickness_nm=thickness, cell_px=None if cell_px is None else float(cell_px),
                has_ground_truth=gt is not None, meta=meta)


@dataclass
class IngestResult:
    """What an ingest did: the scan id, whether its row is new, and the runs written (pattern and cell)."""

    scan_id: int
    new_scan: bool
    run_ids: list[int]


def ingest_scan(path, model_names=None, db_path=None, *, progress: Progress | None = None, name=None,
                kind="experimental", dataset=None, model_dir=None, models=None, batch_size=256,
                sha256: str | None = None) -> int:
    """Read a scan once, run the chosen models, store their predictions; returns the scan id.

    Parameters
    ----------
    path : scan file (any format ``polcore.io`` reads).
    model_names : model names (:func:`polcore.naming.model_name`); None = every checkpoint in ``model_dir``.
    db_path : DuckDB file (default :func:`polcore.settings.db_path`).
    progress : optional ``progress(fraction, message)``.
    name, kind, dataset : how the scan is listed (default name and dataset: the file's stem).
    model_dir : where checkpoints are looked up (default :func:`polcore.settings.models_dir`).
    models : preloaded :func:`load_models` dict (nothing is loaded then).
    sha256 : the file's sha256 when the caller already has it (an upload hashes while saving); None = hash
        the file here.

    Re-ingesting a stored file with stored models adds nothing. A failure leaves the store as it was.
    """
    return ingest(path, model_names, db_path, progress=progress, name=name, kind=kind, dataset=dataset,
                  model_dir=model_dir, models=models, batch_size=batch_size, sha256=sha256).scan_id


def ingest(path, model_names=None, db_path=None, *, progress: Progress | None = None, name=None,
           kind="experimental", dataset=None, model_dir=None, models=None, batch_size=256,
           sha256: str | None = None) -> IngestResult:
    """:func:`ingest_scan` returning an :class:`IngestResult`."""
    from polcore.io import open_scan, read_ground_truth, sha256_file
    from polcore.io.ground_truth import ground_truth_attrs
    from polcore.store import PredictionStore, queries

    progress = report(progress)
    path = Path(path)
    db_path = Path(db_path) if db_path is not None else settings.db_path()
    scan = open_scan(path)  # header and metadata only
    models = _choose(model_names, model_dir, models)
    gt = read_ground_truth(path)
    row = _scan_row(path, scan, gt, ground_truth_attrs(path), name=name, kind=kind, dataset=dataset,
                    sha256=(sha256 or sha256_file(path)).lower())
    store = PredictionStore(db_path)
    known_models = set(queries.list_models(store)["name"])
    existing = queries.scan_by_sha256(store, row["sha256"])
    ids = register_models(store, models)
    new_models = [ids[n] for n in models if n not in known_models]
    scan_id = int(existing["scan_id"]) if existing else store.add_scan(**row, status="ingesting")
    written: list[int] = []
    try:
        _run_models(store, scan_id, scan, gt, path, models, ids, db_path, progress, batch_size, written)
        if not existing:
            store.set_scan_status(scan_id, "ready")
    except BaseException:
        _roll_back(store, scan_id, new_scan=not existing, run_ids=written, model_ids=new_models, path=path)
        raise
    return IngestResult(scan_id=scan_id, new_scan=not existing, run_ids=written)


def _roll_back(store, scan_id: int, *, new_scan: bool, run_ids: list[int], model_ids: list[int], path) -> None:
    """Undo what a failed ingest wrote; the scan row is marked 'failed' first, so that a rollback that fails in
    turn leaves a row the pages never show."""
    try:
        if new_scan:
            store.set_scan_status(scan_id, "failed")
            store.delete_scan(scan_id)
        elif run_ids:
            store.delete_runs(run_ids)
        if model_ids:
            store.delete_models(model_ids, only_unused=True)
        log.info("rolled back the failed ingest of %s (scan %d)", path, scan_id)
    except Exception:  # noqa: BLE001 - report the original failure, not the rollback's
        log.exception("rollback of the failed ingest of %s (scan %d) failed", path, scan_id)


def _run_models(store, scan_id, scan, gt, path, models, ids, db_path, progress, batch_size, written):
    from polcore.analysis import estimate_cell_px, irregularity, pool_scan
    from polcore.infer import predict_scan_many
    from polcore.store import queries

    info = queries.scan_info(store, scan_id)
    period = info.get("cell_px")
    # a cell run is owed only where the lattice period is known before inference (calibration); for an
    # uncalibrated scan whose periodicity shows no lattice, a re-ingest must not rerun the models every time
    todo = [n for n in models
            if not store.has_run(ids[n], scan_id) or (period is not None and not store.has_run(ids[n], scan_id, "cell"))]
    if not todo:
        progress(1.0, "already ingested")
        return
    progress(0.0, f"running {len(todo)} model(s) on {Path(path).name}")
    results = predict_scan_many(scan, [models[n][0] for n in todo], batch_size=batch_size,
                                progress=lambda f, m: progress(0.9 * f, m))
    period_source = "calibration" if period is not None else None
    if period is None:
        period, prominence = estimate_cell_px(results[0].com)
        period_source = f"scan periodicity (prominence {prominence:.0f})" if period else None
        if period is None:
            log.warning("%s: no lattice period (no calibration, no clear periodicity): no unit-cell layer", path)
    fdir = settings.features_dir(db_path)
    fdir.mkdir(parents=True, exist_ok=True)
    for i, (n, res) in enumerate(zip(todo, results)):
        irr = irregularity(res.pred, res.probs, period_px=period)
        cfg = dict(batch_size=batch_size, preprocessing=res.preprocess, cell_px=period, cell_px_source=period_source)
        # the features first: a run that exists always has its features
        np.savez(fdir / f"scan{scan_id}_model{ids[n]}.npz", pos=res.sample_pos, features=res.features,
                 inputs=res.inputs)
        if not store.has_run(ids[n], scan_id):
            written.append(store.write_run(ids[n], scan_id, _prediction_frame(res, gt, irr), seconds=res.seconds,
                                           device=res.device, config=cfg))
        if period is not None and not store.has_run(ids[n], scan_id, "cell"):
            cells = pool_scan(res.probs, period)
            cres = copy.copy(res)
            cres.pred, cres.probs, cres.confidence = cells["pred"], cells["probs"], cells["confidence"]
            cirr = irregularity(cres.pred, cres.probs, period_px=period)
            written.append(store.write_run(
                ids[n], scan_id, _prediction_frame(cres, gt, cirr), seconds=res.seconds, device=res.device,
                config={**cfg, "pooling": "sum of log-probabilities per cell block", "n_cells": cells["n_cells"]},
                layer="cell"))
        progress(0.9 + 0.1 * (i + 1) / len(todo), f"stored {n}")
    progress(1.0, f"stored {len(todo)} model(s) for scan {scan_id}")


def _prediction_frame(res, gt, irregular: np.ndarray) -> dict:
    d = dict(pred=res.pred, probs=res.probs, confidence=res.confidence, irregularity=irregular)
    if gt is not None:
        d.update(true_label=np.asarray(gt["label"]), thickness_nm=np.asarray(gt["thickness_nm"]),
                 is_defect=np.asarray(gt["defect"]))
        if "region" in gt:
            d["region"] = np.asarray(gt["region"])
    return d

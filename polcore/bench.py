"""Orchestration: ingest scans, the study's benchmark protocol, and the self-building demo.

* ``ingest_scan``: open a scan (any format ``polcore.io`` reads), run the chosen models through
  ``polcore.infer`` (one pass), score irregularity, and store everything with ``PredictionStore`` (one
  transaction per run; re-ingesting the same file with the same model adds nothing).
* ``run_bench``: the study's table: rows = data sets (synthetic at the training thickness, other thicknesses
  and cell sizes, experimental-like scans), columns = family x head (+ PCA+kNN and the majority class),
  mean +- std over seeds; stored in DuckDB (table ``bench``) and returned as a DataFrame.
* ``build_demo``: from a fresh clone, everything the dashboard shows, built from the committed library:
  train the quick profile, compose the default scans, run every model on every scan, embeddings and domain
  gaps. Idempotent: every step skips what exists.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "DATA_DIR",
    "DEFAULT_DB",
    "model_name",
    "load_models",
    "register_scan",
    "ingest_scan",
    "run_bench",
    "compute_embeddings",
    "build_demo",
]

log = logging.getLogger(__name__)

DATA_DIR = Path(os.environ.get("POLBENCH_DATA", Path(__file__).resolve().parents[1] / "data"))
DEFAULT_DB = Path(os.environ.get("POLBENCH_DB", DATA_DIR / "polbench.duckdb"))
MODELS_DIR = DATA_DIR / "models"
#: Checkpoints committed with the repository (trained on the draw library with ``train --profile cpu``).
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "shipped"
SCANS_DIR = DATA_DIR / "scans"
CHECKPOINT_SUFFIXES = (".pt", ".npz")


def features_dir(db_path) -> Path:
    """Where ``ingest_scan`` keeps each run's feature subsample (next to the database file)."""
    return Path(db_path).with_name(Path(db_path).stem + "_features")


def _noop(*_a, **_k):
    return None


def model_name(meta: dict) -> str:
    """Stable model name from checkpoint metadata: the training run's name (e.g. ``resnet-resnet18-cls-s888``),
    else family[:arch]-head-s<seed>."""
    name = (meta.get("train_result") or {}).get("name")
    if name:
        return str(name)
    cfg = meta.get("train_config") or meta.get("config") or {}
    seed = cfg.get("seed", meta.get("seed"))
    arch = (meta.get("model_cfg") or {}).get("arch")
    fam = meta["family"] if not arch or arch in (meta["family"],) else f"{meta['family']}:{arch}"
    return f"{fam}-{meta['head']}-s{seed}"


def checkpoints(model_dir: Path) -> list[Path]:
    """Checkpoint files in ``model_dir`` (recursively), sorted."""
    return sorted(p for p in Path(model_dir).rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())


def load_models(paths) -> dict:
    """name -> (model, meta) for checkpoint paths."""
    from polcore.models import load_checkpoint

    out = {}
    for p in paths:
        model = load_checkpoint(p, device=None)
        out[model_name(model.meta)] = (model, model.meta, Path(p))
    return out


def register_models(store, models: dict) -> dict:
    """Add the models to the store; name -> model_id."""
    ids = {}
    for name, (model, meta, path) in models.items():
        cfg = meta.get("train_config") or meta.get("config") or {}
        # variant: the architecture and the training tag (e.g. 'binned-ideal20'), so that models of one family
        # and head trained differently are never averaged as if they were seeds of one recipe
        variant = "-".join(str(v) for v in ((meta.get("model_cfg") or {}).get("arch"), cfg.get("tag")) if v)
        ids[name] = store.add_model(
            name=name, family=meta["family"], head=meta["head"], variant=variant, seed=cfg.get("seed"),
            config={k: meta.get(k) for k in ("train_config", "model_cfg", "preprocessing", "versions",
                                                "library_sha256", "best_epoch") if k in meta},
            checkpoint_path=str(path), library_sha256=meta.get("library_sha256"),
            train_seconds=meta.get("train_seconds"),
            n_params=int(model.n_parameters()) if hasattr(model, "n_parameters") else None,
        )
    return ids


def register_scan(store, path, *, name=None, kind="experimental", dataset=None) -> tuple[int, object, dict | None]:
    """Open ``path`` with polcore.io (raises ScanFormatError on bad input) and add it to the store.

    Returns (scan_id, scan, ground_truth or None).
    """
    from polcore.io import open_scan, read_ground_truth, sha256_file

    path = Path(path)
    scan = open_scan(path)
    gt = read_ground_truth(path)
    ny, nx = scan.nav_shape
    ky, kx = scan.sig_shape
    thickness = None
    if gt is not None:
        t = np.asarray(gt["thickness_nm"], float)
        thickness = float(t.mean()) if np.ptp(t) < 1e-6 else None
    cell_px = _ground_truth_attr(path, "cell_px")
    if cell_px is None and scan.meta.step_nm:
        cell_px = 0.395 / float(scan.meta.step_nm)  # KNN pseudo-cubic lattice constant [nm] / step
    meta = dict(calibration={k: getattr(scan.meta, k) for k in ("step_nm", "mrad_per_px", "voltage_kv",
                                                                "convergence_mrad", "rotation_deg", "flip")},
                dataset_in_file=getattr(scan, "dataset", None), dtype=str(np.dtype(scan.dtype)))
    scan_id = store.add_scan(
        name=name or path.stem, kind=kind, sha256=sha256_file(path), ny=ny, nx=nx, ky=ky, kx=kx,
        dataset=dataset or name or path.stem, source_file=str(path.resolve()), step_nm=scan.meta.step_nm,
        thickness_nm=thickness, cell_px=cell_px, has_ground_truth=gt is not None, meta=meta,
    )
    return scan_id, scan, gt


def _ground_truth_attr(path: Path, key: str):
    """An attribute of the composer's /ground_truth group, or None (not HDF5, no such group)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            v = f["ground_truth"].attrs.get(key) if "ground_truth" in f else None
    except (OSError, KeyError):
        return None
    return None if v is None else float(v)


def _prediction_frame(res, gt, irregular: np.ndarray) -> dict:
    ny, nx = res.pred.shape
    d = dict(pred=res.pred, probs=res.probs, confidence=res.confidence, irregularity=irregular)
    if gt is not None:
        d.update(true_label=np.asarray(gt["label"]), thickness_nm=np.asarray(gt["thickness_nm"]),
                 is_defect=np.asarray(gt["defect"]))
        if "region" in gt:
            d["region"] = np.asarray(gt["region"])
    return d


def ingest_scan(path, model_names=None, db_path=DEFAULT_DB, *, progress=None, name=None, kind="experimental",
                dataset=None, model_dir=MODELS_DIR, models=None, batch_size=256) -> int:
    """Read a scan, run the chosen models, store predictions. Returns the scan id.

    Parameters
    ----------
    path : scan file (any format polcore.io reads).
    model_names : names as stored (``model_name``); None = every checkpoint in ``model_dir``.
    db_path : DuckDB file.
    progress : optional ``progress(fraction, message)``.
    models : preloaded ``load_models`` dict (skips loading checkpoints).
    """
    from polcore.store import PredictionStore

    progress = progress or _noop
    store = PredictionStore(db_path)
    if models is None:
        models = load_models(checkpoints(model_dir))
    if model_names is not None:
        missing = sorted(set(model_names) - set(models))
        if missing:
            raise ValueError(f"unknown models {missing}; available: {sorted(models)}")
        models = {k: models[k] for k in model_names}
    if not models:
        raise ValueError(f"no trained models in {model_dir}: run `python -m polcore train --profile quick`")
    ids = register_models(store, models)
    known = set(store.fetch_df("SELECT scan_id FROM scans")["scan_id"].astype(int))
    scan_id, scan, gt = register_scan(store, path, name=name, kind=kind, dataset=dataset)
    try:
        _run_models(store, scan_id, scan, gt, path, models, ids, db_path, progress, batch_size)
    except BaseException:
        # a failed ingest leaves the database as it was: runs are written in one transaction each, and a
        # scan row this call added is removed again when no run of it was stored
        if scan_id not in known and not store.fetch_df(
                "SELECT 1 FROM runs WHERE scan_id = ? AND status = 'finished'", [scan_id]).shape[0]:
            store.delete_scan(scan_id)
            log.info("rolled back scan %d after a failed ingest of %s", scan_id, path)
        raise
    return scan_id


def _run_models(store, scan_id, scan, gt, path, models, ids, db_path, progress, batch_size):
    from polcore.analysis import estimate_cell_px, irregularity, pool_scan
    from polcore.infer import predict_scan_many

    # a cell run is owed only where the lattice period is known before inference (calibration); for an
    # uncalibrated scan whose periodicity shows no lattice, a re-ingest must not rerun the models every time
    calibrated = not pd.isna(store.fetch_df("SELECT cell_px FROM scans WHERE scan_id = ?", [scan_id])["cell_px"].iloc[0])
    todo = [n for n in models
            if not store.has_run(ids[n], scan_id) or (calibrated and not store.has_run(ids[n], scan_id, "cell"))]
    if not todo:
        progress(1.0, "already ingested")
        return
    progress(0.0, f"running {len(todo)} model(s) on {Path(path).name}")
    results = predict_scan_many(
        scan, [models[n][0] for n in todo], batch_size=batch_size,
        progress=lambda d, t, m: progress(0.9 * d / t, f"{d}/{t} patterns x {len(todo)} models"),
    )
    cell_px = store.fetch_df("SELECT cell_px FROM scans WHERE scan_id = ?", [scan_id])["cell_px"].iloc[0]
    period = None if pd.isna(cell_px) else float(cell_px)
    period_source = "calibration" if period is not None else None
    if period is None and results:
        period, prominence = estimate_cell_px(results[0].com)
        period_source = f"scan periodicity (prominence {prominence:.0f})" if period else None
        if period is None:
            log.warning("%s: no lattice period (no calibration, no clear periodicity): no unit-cell layer", path)
    fdir = features_dir(db_path)
    fdir.mkdir(parents=True, exist_ok=True)
    for n, res in zip(todo, results):
        irr = irregularity(res.pred, res.probs, period_px=period)
        cfg = dict(batch_size=batch_size, preprocessing=res.preprocess, cell_px=period, cell_px_source=period_source)
        store.write_run(ids[n], scan_id, _prediction_frame(res, gt, irr), seconds=res.seconds, device=res.device,
                        config=cfg)
        if period is not None:
            cells = pool_scan(res.probs, period)
            cres = copy.copy(res)
            cres.pred, cres.probs, cres.confidence = cells["pred"], cells["probs"], cells["confidence"]
            cirr = irregularity(cres.pred, cres.probs, period_px=period)
            store.write_run(ids[n], scan_id, _prediction_frame(cres, gt, cirr), seconds=res.seconds,
                            device=res.device, config={**cfg, "pooling": "sum of log-probabilities per cell block",
                                                       "n_cells": cells["n_cells"]}, layer="cell")
        np.savez(fdir / f"scan{scan_id}_model{ids[n]}.npz", pos=res.sample_pos, features=res.features,
                 inputs=res.inputs)
    progress(1.0, f"stored {len(todo)} run(s) for scan {scan_id}")


def run_bench(db_path=DEFAULT_DB) -> pd.DataFrame:
    """Compute the benchmark rows from stored runs (every model x data set with ground truth) and store them.

    Returns the tidy frame (one row per model x data set); ``queries.benchmark_table`` adds the majority-class
    baseline and the mean +- std over seeds.
    """
    from polcore.analysis import accuracy, macro_f1, per_class_recall
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db_path)
    runs = store.fetch_df(
        """SELECT r.run_id, m.model_id, m.name AS model_name, m.family, m.head, m.variant, m.seed,
                  CASE WHEN r.layer = 'cell' THEN s.dataset || ? ELSE s.dataset END AS dataset
           FROM runs r JOIN models m USING (model_id) JOIN scans s USING (scan_id)
           WHERE r.status = 'finished' AND s.has_ground_truth ORDER BY s.dataset, m.name""", [queries.CELL_SUFFIX]
    )
    rows = []
    for (mid, name, fam, head, var, seed, ds), g in runs.groupby(
        ["model_id", "model_name", "family", "head", "variant", "seed", "dataset"], dropna=False
    ):
        ids = [int(r) for r in g["run_id"]]
        p = store.fetch_df(
            f"SELECT pred, true_label FROM predictions WHERE run_id IN ({','.join('?' * len(ids))}) "
            "AND true_label >= 0", ids,
        )
        if p.empty:
            continue
        yt, yp = p["true_label"].to_numpy(), p["pred"].to_numpy()
        rows.append(dict(model_id=int(mid), model_name=name, family=fam, head=head, variant=var or "",
                         seed=None if pd.isna(seed) else int(seed), dataset=ds, accuracy=accuracy(yt, yp),
                         macro_f1=macro_f1(yt, yp), per_class_recall=list(per_class_recall(yt, yp)), n=len(p)))
    df = pd.DataFrame(rows)  # the majority-class row is derived from the labels by queries.benchmark_table
    if not df.empty:
        store.write_bench(df)
    return df


def compute_embeddings(db_path=DEFAULT_DB, *, methods=("pca", "umap"), n_max=4000, seed=0, progress=None) -> dict:
    """PCA/UMAP embeddings of preprocessed inputs (model independent) and of each model's features over all
    scans together, plus the domain gap (synthetic vs experimental-like features) per model.

    Uses the feature subsamples saved by ``ingest_scan`` (``features_dir(db_path)``). Returns {model: gap auc}.
    """
    from polcore.analysis import domain_gap, embed_2d, mmd_rbf
    from polcore.store import PredictionStore

    progress = progress or _noop
    store = PredictionStore(db_path)
    scans = store.fetch_df("SELECT scan_id, kind, dataset FROM scans WHERE status = 'ready'")
    models = store.fetch_df("SELECT model_id, name FROM models ORDER BY model_id")
    gaps = {}
    inputs_done = False
    for j, (mid, mname) in enumerate(zip(models["model_id"], models["name"])):
        parts = []
        for sid, kind in zip(scans["scan_id"], scans["kind"]):
            f = features_dir(db_path) / f"scan{sid}_model{mid}.npz"
            if f.exists():
                with np.load(f, allow_pickle=False) as z:
                    parts.append((int(sid), kind, z["pos"], z["features"], z["inputs"]))
        if not parts:
            continue
        labels = _labels_at(store, parts)
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
        if syn and exp:
            a = np.concatenate([p[3] for p in syn])
            b = np.concatenate([p[3] for p in exp])
            auc = float(domain_gap(a, b, seed=seed) if _accepts_seed(domain_gap) else domain_gap(a, b))
            store.write_domain_gap(int(mid), syn[0][0], exp[0][0], auc=auc, mmd=float(mmd_rbf(a, b)),
                                   n_a=len(a), n_b=len(b))
            gaps[mname] = auc
        progress((j + 1) / len(models), f"embeddings of {mname}")
    return gaps


def _accepts_seed(fn) -> bool:
    import inspect

    return "seed" in inspect.signature(fn).parameters


def _labels_at(store, parts) -> pd.DataFrame:
    """true_label and thickness_nm of the sampled positions (from any finished run of each scan)."""
    frames = []
    for sid, _, pos, _, _ in parts:
        df = store.fetch_df(
            """SELECT ?::INTEGER AS scan_id, iy, ix, true_label, thickness_nm FROM predictions
               WHERE run_id = (SELECT min(run_id) FROM runs WHERE scan_id = ? AND status = 'finished')""",
            [sid, sid],
        )
        keep = pd.DataFrame({"iy": pos[:, 0], "ix": pos[:, 1]})
        frames.append(df.merge(keep, on=["iy", "ix"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["scan_id", "iy", "ix", "true_label", "thickness_nm"])


def build_demo(db_path=DEFAULT_DB, *, profile=None, progress=None, library=None) -> dict:
    """Build everything the dashboard shows from the committed library; idempotent.

    Parameters
    ----------
    profile : 'shipped' (the committed checkpoints, no training), 'quick' or 'paper' (train on the committed
        library first); None = 'shipped' when ``data/models/shipped`` holds checkpoints, else 'quick'.
    progress : optional ``progress(fraction, message)``; fractions: training 0-0.55, scans 0.55-0.6,
        inference 0.6-0.9, bench + embeddings 0.9-1.
    Returns a summary dict with the elapsed time per step [s].
    """
    from polcore.simulate import load_library
    from polcore.simulate.composer import DEFAULT_SCANS, build_default_scans
    from polcore.train import train_profile

    progress = progress or _noop
    t0 = time.perf_counter()
    summary = {}
    if profile is None:  # the shipped checkpoints when the checkout has them, else train the quick profile
        profile = "shipped" if checkpoints(SHIPPED_MODELS_DIR) else "quick"
    lib = library if library is not None else load_library()
    if profile == "shipped":
        out = SHIPPED_MODELS_DIR
        if not checkpoints(out):
            raise FileNotFoundError(f"{out}: no shipped checkpoints; use --profile quick to train the demo models")
        progress(0.55, f"using the shipped models in {out}")
    else:
        out = MODELS_DIR / profile
        progress(0.0, f"training the '{profile}' profile")
        train_profile(profile, lib, out, progress=lambda f, m="": progress(0.55 * float(f), f"train: {m}"))
    summary["train_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    paths = build_default_scans(SCANS_DIR, lib, progress=lambda d, t, m: progress(0.55 + 0.05 * d / t, m))
    summary["scans_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    models = load_models(checkpoints(out))
    for i, (name, path) in enumerate(paths.items()):
        kind, row, _ = DEFAULT_SCANS[name]
        ingest_scan(path, None, db_path, name=name, kind=kind, dataset=row, models=models,
                    progress=lambda f, m, i=i, name=name: progress(0.6 + 0.3 * (i + f) / len(paths), f"{name}: {m}"))
    summary["inference_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    progress(0.9, "benchmark table")
    bench = run_bench(db_path)
    from polcore.heldout import load_results

    summary["heldout_rows"] = load_results(db_path, [out])
    progress(0.92, "embeddings and domain gap (UMAP compiles on first use)")
    summary["domain_gap_auc"] = compute_embeddings(db_path, progress=lambda f, m: progress(0.92 + 0.08 * f, m))
    summary["bench_rows"] = len(bench)
    summary["analysis_s"] = time.perf_counter() - t3
    summary["total_s"] = time.perf_counter() - t0
    from polcore.store import PredictionStore

    PredictionStore(db_path).cache_put("demo_summary", json.loads(json.dumps(summary, default=float)))
    progress(1.0, f"demo ready in {summary['total_s']:.0f} s")
    return summary


def training_table(db_path=DEFAULT_DB) -> pd.DataFrame:
    """Per stored model: held-out accuracy at the training thickness and at another thickness (library 'test'
    configurations, from the checkpoint), accuracy on the experimental-like scans (stored runs), train seconds.
    """
    from polcore.models import read_checkpoint_meta
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db_path)
    models = queries.list_models(store)
    bench = store.fetch_df(
        """SELECT b.model_name, avg(b.accuracy) AS acc FROM bench b JOIN scans s ON s.dataset = b.dataset
           WHERE s.kind = 'pseudo_experimental' GROUP BY b.model_name""")
    exp = dict(zip(bench["model_name"], bench["acc"]))
    rows = []
    for m in models.itertuples():
        try:
            res = read_checkpoint_meta(m.checkpoint_path).get("train_result") or {}
        except (OSError, ValueError):
            res = {}
        by_t = res.get("test_acc_by_thickness") or {}
        train_t = (res.get("config") or {}).get("train_thickness_nm") or [20.0]
        t0 = f"{float(train_t[0]):g}"
        other = {k: v for k, v in by_t.items() if k != t0}
        rows.append(dict(
            model=m.name, family=m.family, head=m.head, n_train=res.get("n_train"),
            heldout_train_thickness=by_t.get(t0), other_thickness=", ".join(f"{k} nm: {v:.3f}" for k, v in other.items()),
            experimental_like=exp.get(m.name), train_seconds=m.train_seconds,
        ))
    return pd.DataFrame(rows)


def analysis_report(db_path=DEFAULT_DB) -> pd.DataFrame:
    """Per finished run with ground truth: the dominant error period against the lattice period, the
    periodic fraction of the errors, the defect ROC-AUC of the irregularity score, and the model's domain gap.
    """
    from polcore.analysis import defect_auc, periodicity
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db_path)
    runs = queries.list_runs(store)
    gaps = queries.domain_gaps(store)
    gap_by_model = dict(zip(gaps["model_id"], gaps["auc"])) if not gaps.empty else {}
    scans = store.fetch_df("SELECT scan_id, cell_px, has_ground_truth FROM scans")
    rows = []
    for r in runs.itertuples():
        sc = scans[scans["scan_id"] == r.scan_id].iloc[0]
        if not sc["has_ground_truth"]:
            continue
        m = queries.run_map(store, int(r.run_id))
        ny, nx = int(m["iy"].max()) + 1, int(m["ix"].max()) + 1
        err = np.full((ny, nx), np.nan)
        lab = m["true_label"].to_numpy()
        ok = lab >= 0
        err[m["iy"][ok], m["ix"][ok]] = (m["pred"][ok] != lab[ok]).astype(float)
        cell = None if pd.isna(sc["cell_px"]) else float(sc["cell_px"])
        per = periodicity(err, lattice_period_px=cell)
        irr = np.full((ny, nx), np.nan)
        irr[m["iy"], m["ix"]] = m["irregularity"].to_numpy(float)
        mask = np.zeros((ny, nx), bool)
        mask[m["iy"], m["ix"]] = m["is_defect"].fillna(False).to_numpy(bool)
        rows.append(dict(
            model=r.model, scan=r.scan, layer=r.layer, accuracy=float(1 - np.nanmean(err)), error_period_px=per["period_px"],
            lattice_period_px=cell, angle_deg=per["angle_deg"], periodic_fraction=per["periodic_fraction"],
            defect_auc=defect_auc(irr, mask) if mask.any() else np.nan,
            domain_gap_auc=gap_by_model.get(r.model_id, np.nan),
        ))
    return pd.DataFrame(rows)

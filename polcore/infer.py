"""The one loop over scan positions: stream batches from a Scan, preprocess, predict, collect.

``predict_scan`` owns batching, device, progress and reshaping (LiberTEM's UDF idea): models only see
``(n, 64, 64)`` preprocessed batches through their ``infer(X) -> (pred, proba, embedding)``. Memory stays
bounded by the batch size whatever the scan size: the per-position outputs are (ny, nx) maps, and features
are kept only for a seeded subsample of positions (``embed_sample``) for the embedding and domain-gap
analyses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from polcore.types import N_CLASSES

__all__ = ["ScanPrediction", "predict_scan", "predict_scan_many", "make_preprocessor"]

log = logging.getLogger(__name__)


@dataclass
class ScanPrediction:
    """Per-position results of one model on one scan.

    Attributes
    ----------
    pred : int8 (ny, nx) class index; probs : float32 (ny, nx, 8); confidence : float32 (ny, nx) (max prob).
    com : float32 (ny, nx) centre-of-mass shift magnitude of the preprocessed pattern [px] (which positions
        carry information).
    sample_pos : int (m, 2) positions (iy, ix) of the feature subsample; features : float32 (m, d);
        inputs : float32 (m, 64 * 64 // 16) 4x4-binned preprocessed patterns of the same subsample.
    seconds : wall time [s] of the loop; n_patterns : ny * nx; device : 'cpu' or 'cuda'.
    preprocess : the fitted preprocessor's state (dict).
    """

    pred: np.ndarray
    probs: np.ndarray
    confidence: np.ndarray
    com: np.ndarray
    sample_pos: np.ndarray
    features: np.ndarray
    inputs: np.ndarray
    seconds: float
    n_patterns: int
    device: str
    preprocess: dict = field(default_factory=dict)

    @property
    def patterns_per_s(self) -> float:
        return self.n_patterns / max(self.seconds, 1e-9)


def make_preprocessor(model, scan=None):
    """The preprocessor stored with ``model`` (its meta 'preprocessing'), unfitted; fitted on ``scan`` when
    given (a full pass over the scan: prefer :func:`predict_scan_many`, which fits inside its single pass)."""
    from polcore.preprocess import Preprocessor

    meta = getattr(model, "meta", {}) or {}
    d = meta.get("preprocessing")
    if d is None:
        raise ValueError(f"model {model!r} has no 'preprocessing' in its metadata; train it with polcore.train")
    pre = Preprocessor.from_dict(d).unfitted_copy()
    if scan is not None:
        pre.fit_scan(scan)
    return pre


def _device_of(model) -> str:
    dev = getattr(model, "device", None)
    return str(getattr(dev, "type", dev or "cpu"))


def _groups(models, preprocessor) -> tuple[list, list[int]]:
    """Preprocessors shared by models whose preprocessing settings agree, and each model's group index."""
    if preprocessor is not None:
        return [preprocessor], [0] * len(models)
    pres, keys, index = [], [], []
    for model in models:
        pre = make_preprocessor(model)
        key = pre.settings_key()
        if key not in keys:
            keys.append(key)
            pres.append(pre)
        index.append(keys.index(key))
    return pres, index


def predict_scan_many(scan, models, *, batch_size: int = 256, progress=None, preprocessor=None,
                      fit_patterns: int = 4096, embed_sample: int = 2000, seed: int = 0) -> list[ScanPrediction]:
    """Run several models over one scan in ONE pass over the file.

    Models whose preprocessing settings agree (target sampling, convergence, size) share one preprocessor;
    models that differ each get their own, so no model is fed another's input. Unless a fitted
    ``preprocessor`` is given, each preprocessor is fitted on the first ``fit_patterns`` patterns of the same
    pass (held in memory until the fit, then predicted), so the file is read exactly once.

    Parameters
    ----------
    scan : a ``polcore.io`` Scan (``nav_shape``, ``iter_batches``, ``meta``).
    models : objects with ``infer(X) -> (pred (n,), proba (n, 8), embedding (n, d))`` and ``meta``.
    batch_size : patterns per batch [-].
    progress : optional ``progress(fraction, message)``.
    preprocessor : a fitted Preprocessor used for every model; None = fit from the pass (see above).
    fit_patterns : how many leading patterns the preprocessing fit uses [-].
    embed_sample : number of positions whose features and inputs are kept (seeded subsample).
    seed : seed of the subsample.
    """
    from polcore.preprocess import com_magnitude

    if not models:
        raise ValueError("no models given")
    ny, nx = scan.nav_shape
    n_total = ny * nx
    pres, group_of = _groups(models, preprocessor)
    rng = np.random.default_rng(seed)
    keep = np.zeros(n_total, bool)
    keep[rng.choice(n_total, size=min(embed_sample, n_total), replace=False)] = True
    outs = [dict(pred=np.full(n_total, -1, np.int8), probs=np.zeros((n_total, N_CLASSES), np.float32),
                 feats=[]) for _ in models]
    com = np.zeros(n_total, np.float32)
    inputs, sample_idx = [], []
    seconds = np.zeros(len(models))
    t_read = 0.0
    done = 0
    t0 = time.perf_counter()

    def run(pos, batch):
        nonlocal t_read, done
        t1 = time.perf_counter()
        Xs = [pre.transform(batch) for pre in pres]
        flat = pos[:, 0] * nx + pos[:, 1]
        com[flat] = com_magnitude(Xs[0])
        sel = keep[flat]
        if sel.any():
            sample_idx.append(flat[sel])
            n_s = int(sel.sum())
            inputs.append(Xs[0][sel].reshape(n_s, 16, 4, 16, 4).mean(axis=(2, 4)).reshape(n_s, -1))
        t_read += time.perf_counter() - t1
        for m, (model, o) in enumerate(zip(models, outs)):
            t2 = time.perf_counter()
            pred, proba, emb = model.infer(Xs[group_of[m]])
            seconds[m] += time.perf_counter() - t2
            o["pred"][flat] = pred
            o["probs"][flat] = proba
            if sel.any():
                o["feats"].append(np.asarray(emb, np.float32)[sel])
        done += len(flat)
        if progress is not None:
            progress(done / n_total, f"{done}/{n_total} patterns x {len(models)} model(s)")

    pending = [] if preprocessor is None else None  # batches held until the fit
    n_pending = 0
    meta = getattr(scan, "meta", None)
    for pos, batch in scan.iter_batches(batch_size):
        if pending is None:
            run(pos, batch)
            continue
        pending.append((pos, np.asarray(batch)))
        n_pending += len(pos)
        if n_pending >= fit_patterns:
            _fit_all(pres, pending, meta)
            for p, b in pending:
                run(p, b)
            pending = None
    if pending:
        _fit_all(pres, pending, meta)
        for p, b in pending:
            run(p, b)
    wall = time.perf_counter() - t0
    if done != n_total:
        raise RuntimeError(f"scan yielded {done} patterns, expected {n_total}")
    sample_flat = np.concatenate(sample_idx) if sample_idx else np.zeros(0, int)
    sample_pos = np.stack([sample_flat // nx, sample_flat % nx], axis=1)
    inp = np.concatenate(inputs) if inputs else np.zeros((0, 256), np.float32)
    results = []
    share = t_read / len(models)
    for m, (model, o) in enumerate(zip(models, outs)):
        probs = o["probs"].reshape(ny, nx, N_CLASSES)
        feats = np.concatenate(o["feats"]) if o["feats"] else np.zeros((0, 1), np.float32)
        results.append(
            ScanPrediction(
                pred=o["pred"].reshape(ny, nx), probs=probs, confidence=probs.max(axis=-1),
                com=com.reshape(ny, nx), sample_pos=sample_pos, features=feats, inputs=inp,
                seconds=float(seconds[m] + share), n_patterns=n_total, device=_device_of(model),
                preprocess=pres[group_of[m]].to_dict(),
            )
        )
    log.info("predicted %d patterns with %d model(s) (%d preprocessing group(s)) in %.1f s", n_total,
             len(models), len(pres), wall)
    return results


def _fit_all(pres, pending, meta) -> None:
    first = np.concatenate([b for _, b in pending])
    for pre in pres:
        pre.fit_patterns(first, meta)


def predict_scan(scan, model, *, batch_size: int = 256, progress=None, preprocessor=None,
                 embed_sample: int = 2000, seed: int = 0) -> ScanPrediction:
    """Predict every position of ``scan`` with ``model``; see :func:`predict_scan_many`."""
    return predict_scan_many(scan, [model], batch_size=batch_size, progress=progress, preprocessor=preprocessor,
                             embed_sample=embed_sample, seed=seed)[0]

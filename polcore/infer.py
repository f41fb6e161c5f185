"""The one loop over scan positions: stream batches from a Scan, preprocess, predict, collect.

``predict_scan`` owns batching, device, progress and reshaping (LiberTEM's UDF idea): models only see
``(n, 64, 64)`` preprocessed batches through their ``infer(X) -> (pred, proba, embedding)``. Memory stays
bounded by the batch size whatever the scan size: the per-position outputs are (ny, nx) maps, and features
are kept only for a seeded subsample of positions (``embed_sample``) for the embedding and domain-gap
analyses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from polcore.geometry import Geometry, apply_geometry, estimate_geometry_from
from polcore.types import N_CLASSES

__all__ = ["ScanPrediction", "predict_scan", "predict_scan_many", "make_preprocessor", "trusted_geometry"]

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
    geometry : the scan geometry actually applied before the preprocessor (``polcore.geometry.Geometry.to_dict``
        plus ``warnings``: the parts estimated but not trusted, left at identity; and ``estimate``: what the
        data alone said), see :func:`trusted_geometry`.
    virtual : the scan's virtual images from the same pass (:class:`polcore.virtual.VirtualImages`: 'bf',
        'adf', 'com_y', 'com_x', float32 (ny, nx)); virtual_info : their detectors. Shared by every model.
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
    geometry: dict = field(default_factory=dict)
    virtual: dict | None = None
    virtual_info: dict | None = None

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
                      fit_patterns: int = 4096, embed_sample: int = 2000, seed: int = 0, geometry=None,
                      geometry_overrides: dict | None = None, on_batch=None,
                      refine: bool = True, workers: int | None = None) -> list[ScanPrediction]:
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
    geometry : the scan geometry (``polcore.geometry.Geometry``) applied to every batch before the
        preprocessors (:func:`polcore.geometry.apply_geometry`), as given. None = find it: the file's
        calibration (``scan.meta``), ``geometry_overrides`` (user values: ``rotation_deg``, ``flip``, ...) and
        estimates from the same first ``fit_patterns`` patterns that fit the preprocessors
        (:func:`polcore.geometry.estimate_geometry_from`), then only the trusted parts are applied
        (:func:`trusted_geometry`). No strided sample over the whole scan exists before inference (the file is
        read once), so on a large scan the descan surface rests on the leading rows only; it is then 'low'
        (coverage) and left out rather than extrapolated. With a fitted ``preprocessor`` and no ``geometry``
        nothing is applied (that preprocessor was fitted on the raw patterns).
    geometry_overrides : user values for the estimate (ignored when ``geometry`` is given).
    refine : refine an estimated, trusted rotation with the first model (:func:`polcore.refine.refine_rotation`:
        the angle within 2 deg at which the model is surest); file and user values are never changed.
    workers : threads that each take whole batches (geometry, resampling, CoM, virtual detectors, every model);
        None = :func:`_workers_default`. The same results with any number (up to float rounding of the torch
        kernels, which run on the cores divided by the workers).
    on_batch : optional ``on_batch(flat, preds)`` after each batch: ``flat`` (n,) flat scan indices
        (``iy * nx + ix``) of the batch and ``preds`` one (n,) int8 class array per model, in ``models`` order
        (progressive maps; an exception raised there stops the pass, like one raised in ``progress``).

    The preprocessors are fitted on the geometry-corrected patterns, so their centre fit sees each disc where
    the geometry put it.
    """
    from polcore.preprocess import _repair, block_mean, com_magnitude, find_hot_pixels

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
    virt = None  # polcore.virtual.VirtualImages, made in the first run() (the preprocessors are fitted then)
    inputs, sample_idx = [], []
    seconds = np.zeros(len(models))
    t_read = 0.0
    done = 0
    t0 = time.perf_counter()

    applied = None if geometry is None else _as_applied(geometry)
    hot = np.zeros((0, 2), int)  # detector-fixed hot pixels: repaired BEFORE a geometry moves them around

    def correct(pos, batch):
        if applied is None or applied["identity"]:
            return batch
        if len(hot):
            batch = _repair(np.asarray(batch, np.float32), hot)
        return apply_geometry(batch, pos, applied["geometry"])

    blas_one = _blas_one_thread()

    def prepare(pos, batch, corrected: bool = False):
        """Geometry, preprocessing, CoM and virtual detectors of one batch. Reads the fitted state and writes only
        this batch's rows of the shared maps, so workers may run it on different batches at once."""
        nonlocal virt
        t1 = time.perf_counter()
        if not corrected:
            batch = correct(pos, batch)
        flat = pos[:, 0] * nx + pos[:, 1]
        Xs = [pre.transform(batch) for pre in pres]
        if virt is None:  # virtual detectors on the geometry-corrected raw batch, about the fitted disc
            from polcore.virtual import VirtualImages

            made = VirtualImages.from_preprocessor(pres[0], (ny, nx), np.shape(batch)[1:])
            with made_lock:
                virt = made if virt is None else virt
        com[flat] = com_magnitude(Xs[0], exact=False)
        virt.add(flat, batch)
        return flat, Xs, time.perf_counter() - t1

    def work(pos, batch, corrected: bool = False):
        """One batch on a worker: :func:`prepare`, then every model on it. Returns what :func:`collect` keeps."""
        flat, Xs, t_prep = prepare(pos, batch, corrected)
        sel = keep[flat]
        inp = block_mean(Xs[0][sel], 4).reshape(int(sel.sum()), -1) if sel.any() else None
        secs, feats = [], []
        for m, (model, o) in enumerate(zip(models, outs)):
            t2 = time.perf_counter()
            pred, proba, emb = model.infer(Xs[group_of[m]])
            secs.append(time.perf_counter() - t2)
            o["pred"][flat] = pred
            o["probs"][flat] = proba
            feats.append(np.asarray(emb, np.float32)[sel] if inp is not None else None)
        return flat, t_prep, secs, sel, inp, feats

    def collect(result):
        """On the calling thread, in batch order: the feature subsample, timings, ``on_batch`` and progress."""
        nonlocal done, t_read
        flat, t_prep, secs, sel, inp, feats = result
        t_read += t_prep
        seconds[:] += secs
        if inp is not None:
            sample_idx.append(flat[sel])
            inputs.append(inp)
            for o, f in zip(outs, feats):
                o["feats"].append(f)
        done += len(flat)
        if on_batch is not None:
            on_batch(flat, [o["pred"][flat] for o in outs])
        if progress is not None:
            progress(done / n_total, f"{done}/{n_total} patterns x {len(models)} model(s)")

    made_lock = threading.Lock()
    meta = getattr(scan, "meta", None)
    if preprocessor is not None and applied is None:
        applied = _as_applied(Geometry(notes=("a fitted preprocessor was given: no geometry applied",)))
    pending = [] if applied is None or preprocessor is None else None  # batches held until the fits
    n_pending = 0
    n_workers = _workers_default(models) if workers is None else max(1, int(workers))

    def flush(pool):
        nonlocal applied, hot
        first = np.concatenate([b for _, b in pending])
        hot = find_hot_pixels(first.mean(axis=0, dtype=np.float64))
        if applied is None:
            pos_all = np.concatenate([p for p, _ in pending])
            if len(hot):
                first = _repair(first.astype(np.float32), hot)
            est = estimate_geometry_from(first, pos_all, (ny, nx), meta, geometry_overrides,
                                         convergence_mrad=pres[0].convergence_mrad,
                                         centre_every=_centre_every(pos_all, (ny, nx)))
            applied = trusted_geometry(est, pos_all)
            if refine and models:
                applied = _refine_rotation(applied, models[0], first, pos_all)
            for w in applied["warnings"]:
                log.warning("geometry: %s", w)
        fixed = [(p, correct(p, b)) for p, b in pending]
        if preprocessor is None:
            _fit_all(pres, fixed, meta)
        for p, b in fixed:
            pool.submit(p, b, True)

    # the reader thread reads and decompresses the next batches; the workers each take a whole batch (geometry,
    # resampling, CoM, virtual detectors, every model) while this thread hands them out and collects in order
    with blas_one(), _torch_threads(models, n_workers), _Prefetch(scan.iter_batches(batch_size)) as reader, \
            _Workers(n_workers, work, collect) as pool:
        for pos, batch in reader:
            if pending is None:
                pool.submit(pos, batch)
                continue
            pending.append((pos, np.asarray(batch)))
            n_pending += len(pos)
            if n_pending >= fit_patterns:
                flush(pool)
                pending = None
        if pending:
            flush(pool)
        pool.drain()
    wall = time.perf_counter() - t0
    if done != n_total:
        raise RuntimeError(f"scan yielded {done} patterns, expected {n_total}")
    sample_flat = np.concatenate(sample_idx) if sample_idx else np.zeros(0, int)
    sample_pos = np.stack([sample_flat // nx, sample_flat % nx], axis=1)
    inp = np.concatenate(inputs) if inputs else np.zeros((0, 256), np.float32)
    results = []
    vimages = None if virt is None else virt.result()
    share = t_read / len(models)
    for m, (model, o) in enumerate(zip(models, outs)):
        probs = o["probs"].reshape(ny, nx, N_CLASSES)
        feats = np.concatenate(o["feats"]) if o["feats"] else np.zeros((0, 1), np.float32)
        results.append(
            ScanPrediction(
                pred=o["pred"].reshape(ny, nx), probs=probs, confidence=probs.max(axis=-1),
                com=com.reshape(ny, nx), sample_pos=sample_pos, features=feats, inputs=inp,
                seconds=float(seconds[m] + share), n_patterns=n_total, device=_device_of(model),
                preprocess=pres[group_of[m]].to_dict(), geometry=_geometry_record(applied),
                virtual=vimages, virtual_info=None if virt is None else virt.info(),
            )
        )
    log.info("predicted %d patterns with %d model(s) (%d preprocessing group(s)) in %.1f s", n_total,
             len(models), len(pres), wall)
    return results


#: Worker threads of a pass on the CPU at most (each takes whole batches; the reader is one more thread).
MAX_WORKERS = 2


def _workers_default(models) -> int:
    """Worker threads of a pass: one per core up to :data:`MAX_WORKERS`; one when a model runs on a GPU or
    prefers all cores on one batch (``batch_parallel`` False: ResNet, VGG).

    Why whole batches per worker rather than one model using every core: on this 2-core machine the default
    model (thickness experts) ran at 6,000 patterns/s with one ONNX Runtime session on 2 threads and at
    7,900/s as two single-thread sessions on alternate batches (the gate, the head and the numpy steps between
    the kernels run on one core, so one batch's numpy fills the other batch's gaps), and the resampling,
    CoM and virtual detectors of a batch then run beside the other worker's model instead of in series
    with it. Each worker's torch / ONNX Runtime threads are the cores divided by the workers
    (:func:`_torch_threads`)."""
    if any(_device_of(m) != "cpu" or not getattr(m, "batch_parallel", True) for m in models):
        return 1
    return max(1, min(MAX_WORKERS, _cores()))


def _cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_THREADS_LOCK = threading.Lock()
_THREADS_HELD = [0, None]  # passes inside _torch_threads now, the thread count to restore when the last leaves


@contextlib.contextmanager
def _torch_threads(models, workers: int):
    """torch's intra-op threads (and so each ONNX Runtime session built in the pass) at the cores divided by
    the workers while a pass runs, restored when the last pass of the process leaves (two uploads at once must
    not leave torch on one thread); nothing without torch models or with one worker."""
    if workers <= 1 or not any(getattr(m, "is_torch", False) for m in models):
        yield
        return
    import torch

    with _THREADS_LOCK:
        if _THREADS_HELD[0] == 0:
            _THREADS_HELD[1] = torch.get_num_threads()
            torch.set_num_threads(max(1, _THREADS_HELD[1] // workers))
        _THREADS_HELD[0] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_HELD[0] -= 1
            if _THREADS_HELD[0] == 0:
                torch.set_num_threads(_THREADS_HELD[1])


class _Workers:
    """Run ``fn(*args)`` for each submitted batch on ``n`` threads and hand each result to ``collect`` on the
    calling thread, in submission order. The first batch runs on the calling thread before any worker starts
    (it builds each model's runner once, not once per worker); at most ``n + 1`` batches wait for collection,
    so memory stays bounded. Leaving the block cancels the batches not started and waits for the running ones
    (an error or a cancel then leaves no worker writing)."""

    def __init__(self, n: int, fn, collect):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._n, self._fn, self._collect = int(n), fn, collect
        self._pool = ThreadPoolExecutor(self._n, thread_name_prefix="polbench-batch") if self._n > 1 else None
        self._queue = deque()
        self._warm = False

    def submit(self, *args) -> None:
        if self._pool is None or not self._warm:
            self._collect(self._fn(*args))
            self._warm = True
            return
        self._queue.append(self._pool.submit(self._fn, *args))
        while len(self._queue) > self._n + 1 or (self._queue and self._queue[0].done()):
            self._collect(self._queue.popleft().result())

    def drain(self) -> None:
        while self._queue:
            self._collect(self._queue.popleft().result())

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _blas_one_thread():
    """A factory of contexts that run numpy's BLAS on one thread (``threadpoolctl``; no-op without it).

    The per-batch numpy work of a pass (resampling GEMMs, virtual detectors) is small; with BLAS on several
    threads its workers keep spinning after each call and take the cores from the model that runs next
    (ONNX Runtime / torch pools): on 2 cores the custom CNN's ``infer`` took 1.8x as long inside the pass as
    alone. One thread gives the same numbers (the GEMMs split output blocks, not sums). The models themselves
    run with the default threads."""
    try:
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
    except Exception:  # noqa: BLE001 - no threadpoolctl, or it cannot inspect this process: leave threads as they are
        return contextlib.nullcontext
    if not controller.select(user_api="blas").lib_controllers:
        return contextlib.nullcontext
    return lambda: controller.limit(limits=1, user_api="blas")


#: Disc centres measured on every this many of the leading patterns when they cannot carry a trusted descan
#: surface anyway (they span less than ``DESCAN_COVERAGE_HIGH`` of the rows or columns), see :func:`_centre_every`.
CENTRE_EVERY_PARTIAL = 4


def _centre_every(positions, nav_shape) -> int:
    """Stride of the disc-centre measurement for the geometry estimate on the leading patterns of a pass.

    The centres (most of the estimate's time) feed the descan surface; an estimated surface is applied only when
    the centres span at least ``DESCAN_COVERAGE_HIGH`` of the scan's rows and columns (its confidence is 'low'
    otherwise, see :func:`trusted_geometry`). Leading rows of a large scan never do, so there every
    :data:`CENTRE_EVERY_PARTIAL`-th pattern is measured; the rotation (from the CoM field of every pattern, with
    an affine trend removed) is the same. Scans whose leading patterns cover enough keep every centre.
    """
    from polcore.geometry import DESCAN_COVERAGE_HIGH

    p = np.asarray(positions)
    if len(p) < 64 * CENTRE_EVERY_PARTIAL:
        return 1
    ny, nx = (int(v) for v in nav_shape)
    cov = min((np.ptp(p[:, 0]) + 1) / ny, (np.ptp(p[:, 1]) + 1) / nx)
    return CENTRE_EVERY_PARTIAL if cov < DESCAN_COVERAGE_HIGH else 1


_TRUSTED = ("file", "user")
#: An estimated descan surface that moves the disc by less than this across the scan [px] is not applied: the
#: preprocessor's single centre fit covers the constant part, and the rest is below the per-pattern centre error.
MIN_DESCAN_PX = 0.5


def trusted_geometry(est: Geometry, positions=None) -> dict:
    """The part of an estimated geometry that is applied, and why the rest is not.

    The trust rule: values from the file's calibration or from the user are always applied; an estimated
    rotation and flip only when the estimator's confidence is 'high' (an estimated flip only together with a
    trusted rotation, an estimated rotation only with a trusted flip); an estimated descan surface only when its
    confidence is 'high' (and it moves the disc by at least :data:`MIN_DESCAN_PX` across the scan). Every other part stays at identity (rotation 0, no flip, no descan: the
    preprocessor's single centre fit then places the disc) and a warning says so. When the rotation or flip is
    applied without a descan surface, the patterns turn about the median disc centre of ``positions`` (a
    constant, not a surface) so that the disc stays where the preprocessor finds it.

    Returns ``{'geometry': Geometry applied, 'identity': bool, 'warnings': [str], 'estimate': est}``.
    """
    src, conf = dict(est.sources), dict(est.confidence)
    warnings: list[str] = []

    def trusted(key):
        return src.get(key) in _TRUSTED or (src.get(key) == "estimated" and conf.get(key) == "high")

    rot_ok, flip_ok = trusted("rotation_deg"), trusted("flip")
    if src.get("rotation_deg") == "estimated" and not flip_ok:
        rot_ok = False
    if src.get("flip") == "estimated" and not rot_ok:
        flip_ok = False
    new_src, new_conf = dict(src), dict(conf)
    rotation, flip = (est.rotation_deg if rot_ok else 0.0), (est.flip if flip_ok else False)
    if not rot_ok:
        new_src["rotation_deg"] = "default"
        if src.get("rotation_deg") == "estimated":
            why = ("known modulo 180 deg only at this thickness"
                   if est.details.get("rotation", {}).get("half_turn_confidence") not in (None, "high")
                   else f"confidence {conf.get('rotation_deg')}")
            warnings.append(f"rotation: estimated {est.rotation_deg:.1f} deg ({why}) NOT applied, 0 deg used; "
                            f"give the rotation if you know it (e.g. from a calibration scan)")
        else:
            reason = est.details.get("rotation", {}).get("reason") or "no estimate"
            warnings.append(f"rotation: could not be estimated ({reason}); 0 deg used, give it if you know it")
    if not flip_ok:
        new_src["flip"] = "default"
        if src.get("flip") == "estimated" and est.flip:
            warnings.append(f"flip: estimated {est.flip} (confidence {conf.get('flip')}) NOT applied, no flip used")
    dy, dx = est.descan_y, est.descan_x
    d_ok = src.get("descan") == "user" or (src.get("descan") == "estimated" and conf.get("descan") == "high")
    d_fit = est.details.get("descan") or {}
    d_range = max(d_fit.get("range_y_px") or 0.0, d_fit.get("range_x_px") or 0.0)
    small = d_ok and src.get("descan") == "estimated" and d_range < MIN_DESCAN_PX
    notes_extra: list[str] = []
    if small:
        notes_extra.append(f"descan: the estimated surface moves the disc by {d_range:.2f} px across the scan "
                           f"(< {MIN_DESCAN_PX} px): not applied, one disc centre for the whole scan")
    if not d_ok or small:
        if small:
            pass  # a note, not a warning: nothing worth applying was found
        elif src.get("descan") == "estimated":
            d = est.details.get("descan", {})
            warnings.append(
                f"descan: estimated range {d.get('range_y_px', float('nan')):.1f} x {d.get('range_x_px', float('nan')):.1f}"
                f" px (confidence {conf.get('descan')}; e.g. fitted on the first rows only) NOT applied: one disc "
                f"centre for the whole scan")
        elif src.get("descan") == "default":
            warnings.append("descan: no disc centres found; one disc centre for the whole scan")
        new_src["descan"] = "default"
        dy = dx = None
        if (rotation != 0.0 or flip) and est.descan_y is not None and positions is not None and len(positions):
            c = np.median(est.disc_centre(positions), axis=0)
            dy, dx = (float(c[0]), 0.0, 0.0), (float(c[1]), 0.0, 0.0)
    warnings += [n for n in est.notes if "disagrees" in n]
    notes = tuple(est.notes) + tuple(notes_extra) + tuple(f"NOT APPLIED: {w}" for w in warnings if "NOT applied" in w)
    geom = Geometry(rotation_deg=rotation, flip=flip, descan_y=dy, descan_x=dx, mrad_per_px=est.mrad_per_px,
                    sources=new_src, confidence=new_conf, notes=notes, details=est.details)
    identity = geom.rotation_deg == 0.0 and not geom.flip and geom.descan_y is None
    return dict(geometry=geom, identity=identity, warnings=warnings, estimate=est)


def _refine_rotation(applied: dict, model, patterns, positions) -> dict:
    """``applied`` with its estimated (trusted) rotation refined by ``model`` (:mod:`polcore.refine`)."""
    from polcore.refine import refine_rotation

    g = applied["geometry"]
    if g.sources.get("rotation_deg") != "estimated" or not len(patterns):
        return applied
    rot, info = refine_rotation(model, lambda: make_preprocessor(model), patterns, positions, g, max_patterns=768)
    details = dict(g.details)
    details["rotation_refined"] = info
    notes = tuple(g.notes) + (f"rotation refined by the model from {info['from_deg']:.2f} to {rot:.2f} deg "
                              f"(minimum prediction entropy)",)
    return {**applied, "geometry": g.replace(rotation_deg=rot, details=details, notes=notes)}


def _as_applied(geom: Geometry) -> dict:
    identity = geom.rotation_deg == 0.0 and not geom.flip and geom.descan_y is None
    return dict(geometry=geom, identity=identity, warnings=[], estimate=None)


def _geometry_record(applied: dict | None) -> dict:
    """JSON-able record of the applied geometry (for the run's config)."""
    if applied is None:
        return {}
    d = applied["geometry"].to_dict()
    d["warnings"] = list(applied["warnings"])
    d["applied"] = not applied["identity"]
    d["sampling"] = "mrad_per_px is for display: the preprocessor resamples (calibration or disc radius)"
    est = applied.get("estimate")
    if est is not None:
        e = est.to_dict()
        e.pop("details", None)
        d["estimate"] = e
    return d


def _fit_all(pres, pending, meta) -> None:
    total = sum(b.sum(axis=0, dtype=np.float64) for _, b in pending)  # no float64 copy of the patterns
    count = sum(len(b) for _, b in pending)
    for pre in pres:
        pre.fit_sum(total, count, meta)


class _Prefetch:
    """Iterate a scan's ``iter_batches`` in a background thread, up to ``depth`` batches ahead, so reading and
    decompressing the next batch overlaps the models on this one (their torch / ONNX Runtime kernels and
    numpy's release the GIL while they compute). Used as a context manager: leaving the block early (an error,
    a cancel) stops the reader and closes the file before the exception goes on; a reader error is raised in
    the consuming loop."""

    _END = object()

    def __init__(self, batches, depth: int = 2):
        import queue

        self._batches = batches
        self._q = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="polbench-prefetch", daemon=True)

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        it = iter(self._batches)
        try:
            for item in it:
                if not self._put((None, item)):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((exc, None))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # the reader's generator closes its file in this thread
            self._put((None, self._END))

    def __enter__(self):
        self._thread.start()
        return self

    def __iter__(self):
        while True:
            exc, item = self._q.get()
            if exc is not None:
                raise exc
            if item is self._END:
                return
            yield item

    def __exit__(self, *exc_info) -> None:
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def predict_scan(scan, model, *, batch_size: int = 256, progress=None, preprocessor=None,
                 embed_sample: int = 2000, seed: int = 0, geometry=None,
                 geometry_overrides: dict | None = None) -> ScanPrediction:
    """Predict every position of ``scan`` with ``model``; see :func:`predict_scan_many`."""
    return predict_scan_many(scan, [model], batch_size=batch_size, progress=progress, preprocessor=preprocessor,
                             embed_sample=embed_sample, seed=seed, geometry=geometry,
                             geometry_overrides=geometry_overrides)[0]

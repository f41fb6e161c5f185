"""Predictions on a Dask cluster: one task per scan, or the row blocks of one large scan.

The workers only compute: each task opens the scan file, loads the checkpoints (once per worker process) and
returns arrays (:class:`polcore.infer.ScanPrediction`). The store is written by ONE process, the client, in the
same single transaction per scan as a local ingest (:func:`polcore.ingest.ingest`, ``executor=``); a worker
never opens the database. Dask is the engine abTEM, HyperSpy and LiberTEM already use.

Two ways to spread the work (:func:`polcore.ingest.ingest_many` picks one):

* **several scans**: one task per scan (:func:`predict_file`), the same :func:`polcore.infer.predict_scan_many`
  call a local ingest makes, so the predictions are the local ones;
* **one large scan**: the client reads the first :data:`FIT_PATTERNS` patterns and fits what the local pass
  fits on them (hot pixels, the scan geometry and its trust rule, every preprocessing group), exactly as
  :func:`polcore.infer.predict_scan_many` does; then one task per block of whole rows (:data:`BLOCK_PATTERNS`
  patterns or more) corrects its patterns with that geometry and predicts them with those fitted
  preprocessors (:func:`predict_block`); the client puts the blocks together (:func:`predict_blocks`). The
  class and probability of every position are the local ones (up to float rounding of a different batch
  split); the seeded subsample of positions whose features are kept is drawn per block (the same number of
  positions, other positions), and the first patterns are read twice (by the client for the fit, by the
  first block's worker).

Files: the scan and the checkpoints must be readable by every worker under the same path (a shared file
system), as for LiberTEM or HyperSpy on a cluster.

Simulation: :func:`build_draws_distributed` builds a draw library with one task per draw (abTEM's own dask
graph must run with the synchronous scheduler, see there); the client writes the draw files.

Cluster: :func:`connect` gives a ``distributed.Client`` for ``"tcp://host:8786"`` (a running ``dask
scheduler`` with ``dask worker tcp://host:8786`` processes), or a ``LocalCluster`` on this machine for
``"local"`` (the default when ``--dask`` is given without an address). Dask imports happen inside the
functions, so importing this module is cheap and needs no Dask.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from polcore.io.base import Scan
from polcore.types import N_CLASSES

__all__ = ["FIT_PATTERNS", "BLOCK_PATTERNS", "TASK_WORKERS", "LOCAL", "connect", "dask_executor", "n_workers", "predict_file",
           "predict_block", "predict_blocks", "fit_pass", "row_blocks", "RowBlockScan", "load_model_cached",
           "simulate_draw", "build_draws_distributed"]

log = logging.getLogger(__name__)

#: Patterns at the start of a scan that fit the preprocessing and the geometry (the same number for the local
#: pass: :func:`polcore.ingest.ingest` passes it to :func:`polcore.infer.predict_scan_many`).
FIT_PATTERNS = 4096
#: Patterns per task when the rows of one scan are spread over the workers (whole rows: at least one row).
BLOCK_PATTERNS = 8192
#: The address that means "a LocalCluster on this machine".
LOCAL = "local"
#: Worker threads of the pass inside one Dask task: the cluster already runs one task per worker thread, so a
#: task does not spread its batches over further threads (``polcore.infer._workers_default``).
TASK_WORKERS = 1


# ------------------------------------------------------------------------------------------------ cluster


@contextmanager
def connect(address: str | None = LOCAL, *, n_workers: int | None = None, threads_per_worker: int = 1,
            processes: bool = True) -> Iterator:
    """A ``distributed.Client``: to the scheduler at ``address``, or to a new ``LocalCluster`` for ``"local"``
    (or None), closed on exit.

    Parameters
    ----------
    address : ``"tcp://host:8786"`` (a ``dask scheduler`` already running, with workers), or ``"local"``.
    n_workers : LocalCluster only: worker processes (default: the CPU cores, at most 4).
    threads_per_worker : LocalCluster only: threads per worker (each worker's numpy/torch then use one thread:
        Dask sets OMP_NUM_THREADS=1 in the worker processes it starts).
    processes : LocalCluster only: worker processes (True) or threads of this process (False).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
        raise ValueError("--dask needs the 'distributed' package: pip install -r requirements.txt") from exc

    if address in (None, "", LOCAL):
        n = n_workers or max(1, min(os.cpu_count() or 1, 4))
        with contextlib.ExitStack() as stack:
            # TCP even for thread workers, so that another process (the command line) can use the same cluster
            cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=threads_per_worker,
                                                       processes=processes, protocol="tcp://",
                                                       host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster, set_as_default=False))
            log.info("Dask LocalCluster: %d worker(s) x %d thread(s) (%s)", n, threads_per_worker,
                     "processes" if processes else "threads")
            yield client
        return
    if not str(address).startswith(("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")):
        raise ValueError(f"--dask {address!r}: give the scheduler's address, e.g. tcp://host:8786, or 'local'")
    try:
        client = Client(str(address), set_as_default=False, timeout="20s")
    except OSError as exc:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    try:
        workers = client.scheduler_info().get("workers", {})
        if workers:
            log.info("Dask scheduler %s: %d worker(s)", address, len(workers))
        else:
            log.warning("the Dask scheduler %s has no worker yet: the tasks wait until `dask worker %s` runs "
                        "somewhere", address, address)
        yield client
    finally:
        client.close()


@contextmanager
def dask_executor(address: str | None = LOCAL, **kw) -> Iterator:
    """A ``concurrent.futures.Executor`` whose tasks run on the Dask cluster of :func:`connect` (what
    :func:`polcore.ingest.ingest_many` takes); ``kw`` goes to :func:`connect`."""
    with connect(address, **kw) as client:
        ex = client.get_executor(pure=False)
        ex.dask_client = client  # for the record: how many workers did the work
        yield ex


def n_workers(executor) -> int | None:
    """Workers of a Dask executor's cluster (None for another executor)."""
    client = getattr(executor, "dask_client", None)
    if client is None:
        return None
    try:
        return len(client.scheduler_info().get("workers", {}))
    except Exception:  # noqa: BLE001 - only for the record
        return None


# ------------------------------------------------------------------------------------------------ on a worker

_MODEL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int):
    from polcore.models import load_checkpoint

    return load_checkpoint(path, device=None)


def load_model_cached(path) -> object:
    """A checkpoint loaded once per worker process (keyed by path, modification time and size)."""
    p = Path(path)
    st = p.stat()
    with _MODEL_LOCK:
        return _load(str(p), st.st_mtime_ns, st.st_size)


def predict_file(path, model_paths, *, batch_size: int = 256, fit_patterns: int = FIT_PATTERNS,
                 geometry_overrides: dict | None = None) -> list:
    """One task per scan: :func:`polcore.infer.predict_scan_many` on the whole file, as a local ingest calls it.

    Returns one :class:`polcore.infer.ScanPrediction` per checkpoint of ``model_paths``, in that order.
    """
    from polcore.infer import predict_scan_many
    from polcore.io import open_scan

    scan = open_scan(Path(path))
    models = [load_model_cached(p) for p in model_paths]
    return predict_scan_many(scan, models, batch_size=batch_size, fit_patterns=fit_patterns,
                             geometry_overrides=geometry_overrides or None, workers=TASK_WORKERS)


class RowBlockScan(Scan):
    """Rows ``y0:y1`` of a scan as a scan of its own (nav shape ``(y1 - y0, nx)``), read through the parent's
    reader; positions it yields start at row 0 of the block."""

    def __init__(self, parent: Scan, y0: int, y1: int):
        ny, nx = parent.nav_shape
        if not (0 <= y0 < y1 <= ny):
            raise ValueError(f"row block {y0}:{y1} outside the scan's {ny} rows")
        super().__init__(path=None, name=f"{parent.name}[{y0}:{y1}]", shape=(y1 - y0, nx) + tuple(parent.sig_shape),
                         dtype=parent.dtype, meta=parent.meta, dataset=parent.dataset)
        self.parent, self.y0, self.y1 = parent, int(y0), int(y1)

    @contextmanager
    def _reading(self, light: bool = False):
        with self.parent._reading(light) as read_block:
            y0 = self.y0
            yield lambda a, b, c, d: read_block(a + y0, b + y0, c, d)


class _Batches:
    """A scan held as its (positions, patterns) batches in memory: what :func:`predict_block` predicts, once per
    preprocessing group, after reading the block once."""

    def __init__(self, nav_shape, batches, meta):
        self.nav_shape, self._batches, self.meta = tuple(nav_shape), batches, meta

    def iter_batches(self, batch_size: int = 256):
        yield from self._batches


def predict_block(path, model_paths, y0: int, y1: int, fitted: list[dict], group_of: list[int], geometry,
                  hot, *, batch_size: int = 256, embed_sample: int = 0, seed: int = 0) -> dict:
    """One task of a spread scan: rows ``y0:y1``, corrected and preprocessed as the whole-scan pass does.

    Parameters
    ----------
    path : the scan file; model_paths : checkpoints, in the order of the results.
    y0, y1 : the rows of this block.
    fitted : the fitted preprocessors (``Preprocessor.to_dict``), one per preprocessing group.
    group_of : each model's group index.
    geometry : the applied ``polcore.geometry.Geometry``, or None when the pass applies none (identity).
    hot : (k, 2) detector hot pixels repaired before the geometry (as the whole-scan pass does).
    batch_size : patterns per batch; embed_sample, seed : this block's share of the feature subsample.

    Returns
    -------
    dict: ``y0``, ``y1``, ``results`` (one ``ScanPrediction`` of the block per model), ``seconds`` (wall time of
    the task [s]) and ``worker`` (host:pid).
    """
    from polcore.geometry import Geometry, apply_geometry
    from polcore.infer import predict_scan_many
    from polcore.io import open_scan
    from polcore.preprocess import Preprocessor, _repair

    t0 = time.perf_counter()
    scan = open_scan(Path(path))
    block = RowBlockScan(scan, y0, y1)
    hot = np.asarray(hot, int).reshape(-1, 2)
    batches = []
    for pos, b in block.iter_batches(batch_size):
        if geometry is not None:  # the whole-scan pass: hot pixels repaired, then the geometry (absolute rows)
            if len(hot):
                b = _repair(np.asarray(b, np.float32), hot)
            b = apply_geometry(b, pos + np.array([y0, 0]), geometry)
        batches.append((pos, b))
    data = _Batches(block.nav_shape, batches, scan.meta)
    models = [load_model_cached(p) for p in model_paths]
    out: list = [None] * len(models)
    com = inputs = None
    for g, d in enumerate(fitted):
        members = [m for m, gm in enumerate(group_of) if gm == g]
        res = predict_scan_many(data, [models[m] for m in members], batch_size=batch_size,
                                preprocessor=Preprocessor.from_dict(d), geometry=Geometry(),
                                embed_sample=embed_sample, seed=seed, workers=TASK_WORKERS)
        if g == 0:  # the pass keeps the CoM and the binned inputs of the first group's preprocessing
            com, inputs = res[0].com, res[0].inputs
        for m, r in zip(members, res):
            out[m] = r
    first = out[group_of.index(0)]
    virtual, virtual_info = getattr(first, "virtual", None), getattr(first, "virtual_info", None)
    for r in out:  # the pass keeps these once per scan, from the first group's preprocessing
        r.com, r.inputs = com, inputs
        if hasattr(r, "virtual"):
            r.virtual, r.virtual_info = virtual, virtual_info
    return dict(y0=int(y0), y1=int(y1), results=out, seconds=time.perf_counter() - t0, worker=_worker_id())


def _worker_id() -> str:
    """The Dask worker running this task (its address), else host:pid:thread."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{os.uname().nodename}:{os.getpid()}:{threading.get_ident()}"


# ------------------------------------------------------------------------------------------------ on the client


def row_blocks(ny: int, nx: int, block_patterns: int = BLOCK_PATTERNS) -> list[tuple[int, int]]:
    """Row ranges ``(y0, y1)`` of about ``block_patterns`` patterns each (whole rows, at least one)."""
    rows = max(1, int(block_patterns) // max(1, int(nx)))
    return [(y, min(y + rows, ny)) for y in range(0, ny, rows)]


def fit_pass(scan, models, *, batch_size: int = 256, fit_patterns: int = FIT_PATTERNS,
             geometry_overrides: dict | None = None, refine: bool = True) -> dict:
    """What the whole-scan pass fits on the first patterns, without predicting anything.

    Reads batches until at least ``fit_patterns`` patterns are in (the same batches as
    :func:`polcore.infer.predict_scan_many`), finds the hot pixels, estimates the geometry, applies the trust
    rule (:func:`polcore.infer.trusted_geometry`) and, with ``refine``, the first model's refinement of an
    estimated rotation, and fits every preprocessing group on the corrected patterns. This mirrors the fit step
    of :func:`polcore.infer.predict_scan_many` (its ``flush``), which has no entry point of its own;
    ``tests/test_distributed.py`` checks that both give the same predictions.

    Returns
    -------
    dict: ``fitted`` (list of ``Preprocessor.to_dict``), ``group_of``, ``geometry`` (the applied Geometry or
    None for identity), ``hot`` ((k, 2) int), ``record`` (the geometry record stored with each run).
    """
    from polcore.geometry import apply_geometry, estimate_geometry_from
    from polcore.infer import _geometry_record, trusted_geometry
    from polcore.preprocess import _repair, find_hot_pixels

    ny, nx = scan.nav_shape
    from polcore.infer import _groups

    pres, group_of = _groups(models, None)
    pending, n = [], 0
    gen = scan.iter_batches(batch_size)
    try:
        for pos, b in gen:
            pending.append((pos, np.asarray(b)))
            n += len(pos)
            if n >= fit_patterns:
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    first = np.concatenate([b for _, b in pending])
    hot = find_hot_pixels(first.astype(np.float64).mean(axis=0))
    pos_all = np.concatenate([p for p, _ in pending])
    est_input = _repair(first.astype(np.float32), hot) if len(hot) else first
    est = estimate_geometry_from(est_input, pos_all, (ny, nx), scan.meta, geometry_overrides or None,
                                 convergence_mrad=pres[0].convergence_mrad)
    applied = trusted_geometry(est, pos_all)
    if refine and models:
        from polcore.infer import _refine_rotation

        applied = _refine_rotation(applied, models[0], est_input, pos_all)
    for w in applied["warnings"]:
        log.warning("geometry: %s", w)

    def correct(p, b):
        if applied["identity"]:
            return b
        if len(hot):
            b = _repair(np.asarray(b, np.float32), hot)
        return apply_geometry(b, p, applied["geometry"])

    fixed = np.concatenate([correct(p, b) for p, b in pending])
    for pre in pres:
        pre.fit_patterns(fixed, scan.meta)
    return dict(fitted=[pre.to_dict() for pre in pres], group_of=group_of,
                geometry=None if applied["identity"] else applied["geometry"], hot=np.asarray(hot, int),
                record=_geometry_record(applied))


def predict_blocks(executor, scan, path, models, model_paths, *, batch_size: int = 256,
                   block_patterns: int = BLOCK_PATTERNS, fit_patterns: int = FIT_PATTERNS,
                   geometry_overrides: dict | None = None, embed_sample: int = 2000, seed: int = 0,
                   progress=None, on_batch=None, stats: dict | None = None) -> list:
    """Predict one scan with its row blocks spread over ``executor`` (a Dask executor); the local results.

    Parameters
    ----------
    executor : ``concurrent.futures.Executor`` (:func:`dask_executor`).
    scan : the opened scan (the client reads its first patterns for the fit); path : its file, for the workers.
    models : the loaded models (for their preprocessing settings); model_paths : their checkpoints.
    batch_size, block_patterns, fit_patterns : patterns per batch, per task, for the fit.
    geometry_overrides : the user's geometry (``rotation_deg``, ``flip``).
    embed_sample, seed : the feature subsample (spread over the blocks in proportion to the subsample of the
        whole scan).
    progress : ``progress(fraction, message)`` after each finished block (an exception there cancels the tasks
        not yet finished and propagates).
    on_batch : ``on_batch(flat, preds)`` after each finished block, as :func:`polcore.infer.predict_scan_many`
        calls it after each batch.
    stats : a dict that receives ``blocks``, ``workers`` (distinct worker processes that ran a block) and
        ``wall_s`` (for the run's config).

    Returns
    -------
    list of ``ScanPrediction``, one per model, as :func:`polcore.infer.predict_scan_many` returns them.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    from polcore.infer import ScanPrediction

    ny, nx = scan.nav_shape
    n_total = ny * nx
    t0 = time.perf_counter()
    fit = fit_pass(scan, models, batch_size=batch_size, fit_patterns=fit_patterns,
                   geometry_overrides=geometry_overrides)
    blocks = row_blocks(ny, nx, block_patterns)
    keep = np.zeros(n_total, bool)  # how many subsample positions each block keeps
    keep[np.random.default_rng(seed).choice(n_total, size=min(embed_sample, n_total), replace=False)] = True
    paths = [str(p) for p in model_paths]
    futures = {}
    for i, (y0, y1) in enumerate(blocks):
        k = int(keep[y0 * nx:y1 * nx].sum())
        f = executor.submit(predict_block, str(path), paths, y0, y1, fit["fitted"], fit["group_of"],
                            fit["geometry"], fit["hot"], batch_size=batch_size, embed_sample=k, seed=seed + i)
        futures[f] = (y0, y1)
    M = len(models)
    pred = np.full((M, n_total), -1, np.int8)
    probs = np.zeros((M, n_total, N_CLASSES), np.float32)
    com = np.zeros(n_total, np.float32)
    parts: dict[int, dict] = {}
    seconds = np.zeros(M)
    device = ["cpu"] * M
    workers: set[str] = set()
    done = 0
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                out = f.result()
                y0, y1 = out["y0"], out["y1"]
                flat = np.arange(y0 * nx, y1 * nx)
                workers.add(out["worker"])
                for m, r in enumerate(out["results"]):
                    pred[m, flat] = r.pred.ravel()
                    probs[m, flat] = r.probs.reshape(-1, N_CLASSES)
                    seconds[m] += r.seconds
                    device[m] = r.device
                com[flat] = out["results"][0].com.ravel()
                parts[y0] = out
                done += len(flat)
                if on_batch is not None:
                    on_batch(flat, [pred[m, flat] for m in range(M)])
                if progress is not None:
                    progress(done / n_total, f"{done}/{n_total} patterns x {M} model(s) on {len(workers)} "
                                             f"Dask worker(s)")
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    order = sorted(parts)
    virtual = virtual_info = None
    blocks_virtual = [(y0, getattr(parts[y0]["results"][0], "virtual", None),
                       getattr(parts[y0]["results"][0], "virtual_info", None)) for y0 in order]
    if all(v is not None for _, v, _ in blocks_virtual):
        from polcore.virtual import stitch_rows

        virtual, virtual_info = stitch_rows(blocks_virtual)
    results = []
    for m in range(M):
        sp, feats, inp = [], [], []
        for y0 in order:
            r = parts[y0]["results"][m]
            sp.append(np.asarray(r.sample_pos, int).reshape(-1, 2) + np.array([y0, 0]))
            feats.append(np.asarray(r.features, np.float32))
            inp.append(np.asarray(r.inputs, np.float32))
        p = probs[m].reshape(ny, nx, N_CLASSES)
        res = ScanPrediction(
            pred=pred[m].reshape(ny, nx), probs=p, confidence=p.max(axis=-1), com=com.reshape(ny, nx),
            sample_pos=np.concatenate(sp), features=_stack(feats), inputs=_stack(inp), seconds=float(seconds[m]),
            n_patterns=n_total, device=device[m], preprocess=fit["fitted"][fit["group_of"][m]],
            geometry=fit["record"])
        if virtual is not None:  # the virtual images of the whole scan, stitched from the blocks'
            res.virtual, res.virtual_info = virtual, virtual_info
        results.append(res)
    wall = time.perf_counter() - t0
    if stats is not None:
        stats.update(blocks=len(blocks), workers=len(workers), wall_s=round(wall, 3))
    log.info("predicted %d patterns with %d model(s) in %d block(s) on %d Dask worker(s) in %.1f s", n_total, M,
             len(blocks), len(workers), wall)
    return results


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate the blocks' subsample rows (a block without subsample positions adds nothing)."""
    arrays = [a for a in arrays if len(a)]
    return np.concatenate(arrays) if arrays else np.zeros((0, 1), np.float32)


# ------------------------------------------------------------------------------------------------ simulation

#: abTEM runs its own dask graph with the synchronous scheduler (``polcore.simulate.build.configure_abtem``: the
#: threaded one gave wrong thickness series; ``simulate_cell_scan`` names it in its compute call, so that a
#: worker's client never takes the graph); thread workers of one process take turns on it.
_ABTEM_LOCK = threading.Lock()


def simulate_draw(cfg, role: str, index: int) -> dict:
    """One task of a distributed draw-library build: draw ``index`` of ``role``, both base variants, simulated
    with abTEM on this worker as :func:`polcore.simulate.draws.build_draws` simulates it; the client writes it.

    Returns dict ``role``, ``index``, ``patterns`` float32 (2, T, N, N, K, K), ``nuisance``, ``seconds``.
    """
    from polcore.simulate.build import _structure_for, simulate_cell_scan
    from polcore.simulate.draws import DRAW_BASES, draw_nuisance

    nu = draw_nuisance(cfg, role, index)
    sim = cfg.sim_config(role)
    with _ABTEM_LOCK:
        t0 = time.perf_counter()
        pats = np.stack([simulate_cell_scan(_structure_for(b, nu), sim, nu) for b in DRAW_BASES])
        seconds = time.perf_counter() - t0
    return dict(role=role, index=int(index), patterns=pats, nuisance=nu, seconds=seconds)


def build_draws_distributed(executor, cfg="train", out_dir=None, *, limit: int | None = None,
                            progress=None) -> list[Path]:
    """:func:`polcore.simulate.draws.build_draws` with one task per draw on a Dask executor.

    abTEM's own dask graph cannot be spread here: it must run with the synchronous scheduler (a measured
    pitfall, :func:`polcore.simulate.build.configure_abtem`), so the unit of work is a whole draw, simulated on
    a worker exactly as the single-process build simulates it (:func:`simulate_draw`). This process claims the
    draws (the same claim files as the single-process build, so both kinds of builders can share a folder),
    writes each returned draw (temporary name, renamed) and releases its claim; workers write nothing.

    Returns the paths of the draws this call wrote.
    """
    from concurrent.futures import as_completed

    from polcore.progress import report
    from polcore.simulate.draws import _claim, _draw_path, _write_draw, prepare_draws_dir

    progress = report(progress)
    cfg, out_dir = prepare_draws_dir(cfg, out_dir)
    jobs = cfg.jobs()
    futures: dict = {}
    made: list[Path] = []
    t0 = time.perf_counter()
    try:
        for role, index in jobs:
            if limit is not None and len(futures) >= limit:
                break
            path = _draw_path(out_dir, role, index)
            if path.exists() or not _claim(path):
                continue
            if path.exists():
                path.with_suffix(".claim").unlink(missing_ok=True)
                continue
            futures[executor.submit(simulate_draw, cfg, role, index)] = path
        log.info("submitted %d draw(s) of %s to the Dask cluster", len(futures), out_dir)
        for f in as_completed(futures):
            out, path = f.result(), futures[f]
            _write_draw(path, out["patterns"], cfg, out["nuisance"], out["seconds"])
            path.with_suffix(".claim").unlink(missing_ok=True)
            made.append(path)
            n_done = sum(_draw_path(out_dir, r, i).exists() for r, i in jobs)
            progress(n_done / len(jobs), f"{out['role']} draw {out['index']}: {out['seconds']:.0f} s on a worker; "
                                         f"{n_done}/{len(jobs)} on disk, {time.perf_counter() - t0:.0f} s")
    finally:
        for f, path in futures.items():
            f.cancel()
            if path not in made:
                path.with_suffix(".claim").unlink(missing_ok=True)
    return made

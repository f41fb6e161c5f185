"""Ingest: one scan file in, its predictions (per pattern and per unit cell) in the store.

The path of a scan, from upload to map::

    ui/backend.save_upload ──(file + sha256 of the bytes, hashed while they were written)──┐
    python -m polcore ingest FILE ──(sha256: one sequential read, see below)───────────────┤
                                                                                            v
    ingest_scan: open_scan (metadata only) → load the CHOSEN checkpoints → scan row 'ingesting'
      → polcore.infer.predict_scan_many: ONE pass over the file; the preprocessing of each group of models
        is fitted on the first patterns of that pass, then every batch goes through every model
      → per model: features (npz, to a temporary name) and the per-pattern and per-cell runs (pooled
        log-probabilities)
      → ONE transaction: the new model rows, every run of every model (both layers), the features moved to
        their names, the scan row 'ready'.   On any failure: 'failed', then the scan row is removed if this
        ingest created it; nothing else was committed, so the store is as it was.

Atomic across processes and crashes
-----------------------------------
* The scan row is claimed ('ingesting') under an owner ``host:pid:start-token`` (:mod:`polcore.store.locking`)
  and kept alive by a heartbeat thread (every :data:`~polcore.store.locking.HEARTBEAT_S` s). Runs and model
  rows are written only in the final transaction (:meth:`PredictionStore.write_runs`), which also checks that
  the row is still this ingest's, so a ``kill -9`` at any moment leaves either the store as it was plus an
  'ingesting' row of a dead owner, or the finished ingest. Feature files are written before that commit;
  orphans of a crash are harmless (the next ingest removes them with their scan, or overwrites them).
* Every ingest starts with :func:`cleanup_stale_ingests`: 'ingesting' / 'failed' rows whose owner is dead
  (same host: the pid is gone; another host: heartbeat older than
  :data:`~polcore.store.locking.STALE_AFTER_S` s) are removed with their runs and feature files, logged as a
  warning.
* A rollback removes a scan row only while this ingest still owns it. A second ingest of the same file while
  the first one lives waits for it (polling; ``wait_s``, then a one-line :class:`StoreBusyError` naming the
  other process) and never touches its row; when the first finishes it finds the scan stored, when the first
  dies it cleans up and ingests the file itself.
* Tests stop a child ingest at a given moment with ``POLBENCH_TEST_PAUSE_AT=<moment>`` and
  ``POLBENCH_TEST_PAUSE_FILE=<path>`` (see :data:`PAUSE_MOMENTS`): the first process to reach the moment
  creates the file (with its pid) and sleeps there, so that the test can ``kill -9`` it exactly there.

Why the CLI hashes in a separate pass: the sha256 decides, before any model runs, whether this file is already
stored (a re-ingest then costs nothing). Hashing reads the file sequentially at disk speed (~1 GB/s), which is
a small fraction of the inference time; an upload never pays it, because its bytes were hashed while they were
saved.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polcore import settings
from polcore.naming import model_name, model_variant
from polcore.progress import Progress, report

__all__ = ["CHECKPOINT_SUFFIXES", "checkpoints", "available_models", "load_models", "register_models",
           "ingest_scan", "ingest", "ingest_many", "IngestResult", "LiveMap", "cleanup_stale_ingests",
           "PAUSE_MOMENTS", "INGEST_WAIT_S"]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".npz")
#: Pseudo-cubic lattice constant of KNN [nm]: the cell period of a calibrated scan is this over the step.
KNN_LATTICE_NM = 0.395
#: Seconds a second ingest of the same file waits for the live process that is ingesting it.
INGEST_WAIT_S = 3600.0
#: Where ``POLBENCH_TEST_PAUSE_AT`` can stop an ingest: after the scan row is claimed, after inference, after
#: the feature files are written (temporary names), inside the final transaction (runs written, features
#: moved, not committed), after the commit.
PAUSE_MOMENTS = ("scan_row", "inference", "features", "transaction", "commit")


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
        except Exception as err:  # noqa: BLE001 - a foreign file in the folder is skipped, not fatal
            log.warning("skipping %s: not a readable polbench checkpoint (%s: %s)", p, type(err).__name__, err)
            log.debug("reading %s failed", p, exc_info=True)
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


def _model_spec(name: str, model, meta: dict, path) -> dict:
    """The :meth:`PredictionStore.add_model` keywords of a loaded checkpoint."""
    cfg = meta.get("train_config") or meta.get("config") or {}
    return dict(
        name=name, family=meta["family"], head=meta["head"], variant=model_variant(meta), seed=cfg.get("seed"),
        config={k: meta.get(k) for k in ("train_config", "model_cfg", "preprocessing", "versions",
                                            "library_sha256", "best_epoch") if k in meta},
        checkpoint_path=str(path), library_sha256=meta.get("library_sha256"),
        train_seconds=meta.get("train_seconds"),
        n_params=int(model.n_parameters()) if hasattr(model, "n_parameters") else None,
    )


def register_models(store, models: dict) -> dict[str, int]:
    """Add the models to the store (an existing name keeps its row); name -> model_id. (An ingest registers
    its models in its final transaction instead.)"""
    return {name: store.add_model(**_model_spec(name, *entry)) for name, entry in models.items()}


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
    #: the geometry applied to the patterns (``ScanPrediction.geometry``), None when no model ran
    geometry: dict | None = None


class LiveMap:
    """The predicted-class map of one model filling in while an ingest runs, with its rate (thread-safe).

    The ingest thread calls :meth:`begin` (once the models to run are known) and :meth:`update` after every
    batch (``predict_scan_many``'s ``on_batch``); a page reads :meth:`snapshot` from another thread at any time.

    Parameters
    ----------
    model : the model whose map is shown (the first chosen one); when it does not run (already stored), the
        first model that runs is shown instead.
    window_s : the patterns/s rate is measured over the last ``window_s`` seconds [s].
    """

    def __init__(self, model: str | None = None, *, window_s: float = 10.0):
        self.wanted = model
        self.window_s = float(window_s)
        self._lock = threading.Lock()
        self._pred: np.ndarray | None = None
        self._shape: tuple[int, int] = (0, 0)
        self._model: str | None = None
        self._index = 0
        self._done = 0
        self._t0: float | None = None
        self._marks: list[tuple[float, int]] = []

    def begin(self, nav_shape, models: list[str]) -> None:
        """A pass over a scan of ``nav_shape`` (ny, nx) starts with ``models`` (names, in the order of
        ``update``'s ``preds``); every position is -1 (not predicted yet)."""
        ny, nx = (int(v) for v in nav_shape)
        names = list(models)
        index = names.index(self.wanted) if self.wanted in names else 0
        now = time.monotonic()
        with self._lock:
            self._pred, self._shape = np.full(ny * nx, -1, np.int8), (ny, nx)
            self._model, self._index = (names[index] if names else None), index
            self._done, self._t0, self._marks = 0, now, [(now, 0)]

    def update(self, flat, preds) -> None:
        """``flat`` (n,) flat positions ``iy * nx + ix`` just predicted; ``preds`` one (n,) class array per model."""
        now = time.monotonic()
        with self._lock:
            if self._pred is None:
                return
            p = np.asarray(preds[self._index])
            self._pred[np.asarray(flat)] = p
            self._done = min(self._done + len(p), self._pred.size)
            self._marks.append((now, self._done))
            while len(self._marks) > 2 and self._marks[1][0] < now - self.window_s:
                self._marks.pop(0)

    def snapshot(self) -> dict | None:
        """A copy of the map so far, or None before :meth:`begin`.

        Returns
        -------
        dict: ``pred`` int8 (ny, nx) (-1 where not predicted yet), ``model``, ``done`` and ``total`` [patterns],
        ``elapsed_s`` [s] since :meth:`begin`, ``rate`` [patterns/s over the last ``window_s``; None before the
        first batch], ``eta_s`` [s; None while the rate is unknown].
        """
        now = time.monotonic()
        with self._lock:
            if self._pred is None:
                return None
            pred = self._pred.copy().reshape(self._shape)
            done, total, t0, model = self._done, self._pred.size, self._t0, self._model
            first = self._marks[0]
        elapsed = now - t0
        rate = None
        if done > first[1] and now > first[0]:
            rate = (done - first[1]) / (now - first[0])
        eta = (total - done) / rate if rate else (0.0 if done >= total else None)
        return dict(pred=pred, model=model, done=done, total=total, elapsed_s=elapsed, rate=rate, eta_s=eta)


def ingest_scan(path, model_names=None, db_path=None, *, progress: Progress | None = None, name=None,
                kind="experimental", dataset=None, model_dir=None, models=None, batch_size=256,
                sha256: str | None = None, wait_s: float = INGEST_WAIT_S, rotation_deg: float | None = None,
                flip: bool | None = None, live: LiveMap | None = None, executor=None,
                block_patterns: int | None = None) -> int:
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
    wait_s : while another live process ingests the same file, wait up to this many seconds for it (then
        :class:`polcore.store.StoreBusyError`; 0 = refuse at once).
    rotation_deg, flip : the user's detector rotation [deg] and flip (py4DSTEM ``QR_rotation_degrees`` /
        ``QR_flip`` convention, :mod:`polcore.geometry`); they win over the file's calibration and the estimate.
        None = the file's value, else the estimate from the data (applied only when its confidence is 'high',
        see :func:`polcore.infer.trusted_geometry`). The geometry used, with its sources and warnings, is stored
        in every run's config (``config["geometry"]``).
    live : a :class:`LiveMap` that receives the predicted classes of the models batch by batch while the pass
        runs (the Upload page's progressive map).
    executor : a ``concurrent.futures.Executor`` on a Dask cluster (:func:`polcore.distributed.dask_executor`):
        the rows of the scan are predicted in blocks of ``block_patterns`` patterns (default
        :data:`polcore.distributed.BLOCK_PATTERNS`) on its workers (:func:`polcore.distributed.predict_blocks`);
        this process alone writes the store, in the same one transaction. None = here, in one pass.

    Re-ingesting a stored file with stored models adds nothing. A failure, or a killed process, leaves the
    store as it was (after the next ingest's cleanup, see the module docstring).
    """
    return ingest(path, model_names, db_path, progress=progress, name=name, kind=kind, dataset=dataset,
                  model_dir=model_dir, models=models, batch_size=batch_size, sha256=sha256,
                  wait_s=wait_s, rotation_deg=rotation_deg, flip=flip, live=live, executor=executor,
                  block_patterns=block_patterns).scan_id


def ingest(path, model_names=None, db_path=None, *, progress: Progress | None = None, name=None,
           kind="experimental", dataset=None, model_dir=None, models=None, batch_size=256,
           sha256: str | None = None, wait_s: float = INGEST_WAIT_S, rotation_deg: float | None = None,
           flip: bool | None = None, live: LiveMap | None = None, executor=None, block_patterns: int | None = None,
           _predict=None) -> IngestResult:
    """:func:`ingest_scan` returning an :class:`IngestResult` (with the geometry used, ``geometry``).

    ``wait_s``: how long to wait while another live process ingests the same file (0: refuse at once).
    ``_predict``: how the predictions are made (internal: :func:`ingest_many` passes a task's result).
    """
    from polcore.io import open_scan, read_ground_truth, sha256_file
    from polcore.io.ground_truth import ground_truth_attrs
    from polcore.store import PredictionStore
    from polcore.store.locking import new_owner, release_owner

    progress = report(progress)
    path = Path(path)
    db_path = Path(db_path) if db_path is not None else settings.db_path()
    scan = open_scan(path)  # header and metadata only
    models = _choose(model_names, model_dir, models)
    gt = read_ground_truth(path)
    row = _scan_row(path, scan, gt, ground_truth_attrs(path), name=name, kind=kind, dataset=dataset,
                    sha256=(sha256 or sha256_file(path)).lower())
    store = PredictionStore(db_path)
    cleanup_stale_ingests(db_path, store=store)
    owner = new_owner()
    overrides = {k: v for k, v in (("rotation_deg", rotation_deg), ("flip", flip)) if v is not None}
    predict = _predict
    if predict is None:
        predict = _predict_local if executor is None else _PredictBlocks(executor, block_patterns)
    try:
        return _ingest_owned(store, row, owner, path, db_path, scan, gt, models, progress, batch_size, wait_s,
                             overrides, predict=predict, live=live)
    finally:
        release_owner(owner)


def ingest_many(paths, model_names=None, db_path=None, *, executor=None, progress: Progress | None = None,
                name=None, kind="experimental", dataset=None, model_dir=None, models=None, batch_size=256,
                wait_s: float = INGEST_WAIT_S, rotation_deg: float | None = None, flip: bool | None = None,
                block_patterns: int | None = None) -> list[IngestResult]:
    """Ingest several scan files with the same models (loaded once); one :class:`IngestResult` per file.

    Without ``executor`` the files are ingested one after the other, each in one pass (:func:`ingest`). With a
    Dask executor (:func:`polcore.distributed.dask_executor`):

    * one file: its row blocks are spread over the workers (:func:`polcore.distributed.predict_blocks`);
    * several files: one task per file (:func:`polcore.distributed.predict_file`), all submitted at once.

    Either way the workers only return arrays; this process alone writes the store, each scan in the same one
    transaction as a local ingest (claimed row, heartbeat, rollback on failure, all as in :func:`ingest`), in
    the order of ``paths``. A file that fails (unreadable, a worker error) stops the rest: the scans stored
    before it stay stored, the others' tasks are cancelled. ``name`` (the listed name) needs a single file; the
    other keywords are :func:`ingest`'s.
    """
    from polcore.io import sha256_file
    from polcore.progress import scaled

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no scan files given")
    if name is not None and len(paths) > 1:
        raise ValueError(f"a name names one scan; {len(paths)} scan files were given")
    from polcore.io import open_scan

    for p in paths:  # a bad file is refused before any model is loaded or any task starts
        open_scan(p)
    progress = report(progress)
    models = _choose(model_names, model_dir, models)
    common = dict(name=name, kind=kind, dataset=dataset, models=models, batch_size=batch_size, wait_s=wait_s,
                  rotation_deg=rotation_deg, flip=flip)
    n = len(paths)

    def part(i: int, p: Path):
        return scaled(progress, i / n, (i + 1) / n, f"[{i + 1}/{n}] {p.name}: " if n > 1 else "")

    if executor is None or n == 1:
        return [ingest(p, None, db_path, progress=part(i, p), executor=executor, block_patterns=block_patterns,
                       **common) for i, p in enumerate(paths)]

    from polcore.distributed import FIT_PATTERNS, predict_file
    from polcore.store import PredictionStore, queries

    db_path = Path(db_path) if db_path is not None else settings.db_path()
    shas = [sha256_file(p).lower() for p in paths]
    overrides = {k: v for k, v in (("rotation_deg", rotation_deg), ("flip", flip)) if v is not None}
    store = PredictionStore(db_path)
    tasks: dict[int, _PredictFromTask] = {}
    try:
        for i, (p, sha) in enumerate(zip(paths, shas)):
            known = queries.scan_by_sha256(store, sha)
            names = list(models) if known is None else _todo(store, int(known["scan_id"]), list(models))[0]
            if not names or any(t.names == names and shas[j] == sha for j, t in tasks.items()):
                continue  # stored already, or the same bytes under another name: nothing to compute twice
            fut = executor.submit(predict_file, str(p.resolve()), [str(models[m][2]) for m in names],
                                  batch_size=batch_size, fit_patterns=FIT_PATTERNS, geometry_overrides=overrides or None)
            tasks[i] = _PredictFromTask(names, fut)
        log.info("submitted %d scan(s) to the Dask cluster (%d already stored)", len(tasks), n - len(tasks))
        return [ingest(p, None, db_path, progress=part(i, p), sha256=shas[i], _predict=tasks.get(i), **common)
                for i, p in enumerate(paths)]
    finally:
        for t in tasks.values():
            t.future.cancel()


def _ingest_owned(store, row, owner, path, db_path, scan, gt, models, progress, batch_size, wait_s, overrides=None,
                  *, predict=None, live=None):
    claim = _claim(store, row, owner, path, db_path, wait_s, progress)
    new_scan = claim.state == "claimed"
    scan_id = claim.scan_id
    heartbeat = _Heartbeat(store, scan_id, owner) if new_scan else None
    temps: list[Path] = []
    geometry: dict = {}
    try:
        _pause("scan_row")
        written = _run_models(store, scan_id, scan, gt, path, models, db_path, progress, batch_size, temps,
                              owner=owner if new_scan else None, overrides=overrides, geometry_out=geometry,
                              predict=predict or _predict_local, live=live)
    except BaseException:
        if heartbeat is not None:
            heartbeat.stop()
        for t in temps:
            t.unlink(missing_ok=True)
        if new_scan:
            _roll_back(store, scan_id, owner, db_path, path)
        raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    _pause("commit")
    progress(1.0, f"stored {len(written)} run(s) for scan {scan_id}" if written else "already ingested")
    return IngestResult(scan_id=scan_id, new_scan=new_scan, run_ids=written, geometry=geometry or None)


def cleanup_stale_ingests(db_path=None, *, store=None) -> list[int]:
    """Remove what dead ingests left: their 'ingesting' / 'failed' scan rows with their runs
    (:meth:`PredictionStore.cleanup_stale_ingests`, logged), those scans' feature files, and temporary feature
    files of dead processes of this host. Returns the removed scan ids. Runs at the start of every ingest."""
    from polcore.store import PredictionStore

    db_path = Path(db_path) if db_path is not None else settings.db_path()
    store = store if store is not None else PredictionStore(db_path)
    removed = store.cleanup_stale_ingests()
    _remove_features(db_path, removed)
    return removed


def _remove_features(db_path: Path, scan_ids) -> None:
    """Remove the feature files of scans that are no longer stored, and the temporary feature files of dead
    processes of this host."""
    from polcore.store.locking import pid_alive

    fdir = settings.features_dir(db_path)
    if not fdir.is_dir():
        return
    for sid in scan_ids:
        for f in fdir.glob(f"scan{int(sid)}_model*.npz"):
            f.unlink(missing_ok=True)
    host = socket.gethostname()
    for f in fdir.glob(".scan*.tmp"):  # .scan<S>~<host>~<pid>~<nonce>~<i>.tmp
        parts = f.name.split("~")
        if len(parts) == 5 and parts[1] == host and parts[2].isdigit() and int(parts[2]) != os.getpid() \
                and not pid_alive(int(parts[2]))[0]:
            f.unlink(missing_ok=True)


def _claim(store, row: dict, owner: str, path: Path, db_path: Path, wait_s: float, progress):
    """Claim the scan row, waiting (polling) while another live process holds it."""
    from polcore.store import StoreBusyError

    deadline = time.monotonic() + max(0.0, float(wait_s))
    delay, told = 0.2, None
    while True:
        try:
            claim = store.claim_scan(owner=owner, **row)
        except StoreBusyError as err:  # the other ingest is inside its final transaction
            claim, holder = None, f"a process holding the database ({err.__class__.__name__})"
        else:
            if claim.removed is not None:  # a dead ingest of this file, removed just now
                _remove_features(db_path, [claim.removed])
            if claim.state != "busy":
                return claim
            holder = claim.holder
        if time.monotonic() >= deadline:
            waited = f"; gave up after waiting {wait_s:.0f} s" if wait_s > 0 else ""
            raise StoreBusyError(
                f"{path.name} is being ingested by another process ({holder}) into {store.path}{waited}: "
                "retry when it has finished"
            )
        if told != holder:
            log.warning("%s is being ingested by another process (%s): waiting up to %.0f s for it",
                        path.name, holder, max(0.0, deadline - time.monotonic()))
            progress(0.0, f"waiting: {holder} is ingesting this file")
            told = holder
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 1.0)


class _Heartbeat:
    """A daemon thread that refreshes the claimed scan row's ``heartbeat_at`` every HEARTBEAT_S seconds."""

    def __init__(self, store, scan_id: int, owner: str):
        from polcore.store.locking import HEARTBEAT_S

        self._store, self._scan_id, self._owner, self._every = store, scan_id, owner, HEARTBEAT_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ingest-heartbeat-{scan_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._store.heartbeat(self._scan_id, self._owner):
                    log.warning("scan %d is no longer held by this ingest (%s)", self._scan_id, self._owner)
                    return
            except Exception as err:  # noqa: BLE001 - a missed heartbeat is not fatal; the next one retries
                log.debug("heartbeat of scan %d failed: %s", self._scan_id, err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


def _pause(moment: str) -> None:
    """Test hook: with POLBENCH_TEST_PAUSE_AT=<moment> and POLBENCH_TEST_PAUSE_FILE=<path>, the first process to
    reach ``moment`` creates the file (its pid inside) and sleeps, so that a test can kill it exactly here."""
    if os.environ.get("POLBENCH_TEST_PAUSE_AT") != moment:
        return
    flag = os.environ.get("POLBENCH_TEST_PAUSE_FILE")
    if not flag:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another process paused here already
    os.write(fd, f"{os.getpid()} {moment}".encode())
    os.close(fd)
    while True:
        time.sleep(60)


def _roll_back(store, scan_id: int, owner: str, db_path: Path, path) -> None:
    """Undo a failed ingest: remove its scan row (marked 'failed' first) while this ingest still owns it, and
    that scan's feature files. Nothing else was committed (runs and model rows are written only by the final
    transaction)."""
    try:
        if store.abandon_ingest(scan_id, owner):
            _remove_features(db_path, [scan_id])
            log.info("rolled back the failed ingest of %s (scan %d)", path, scan_id)
    except Exception as err:  # noqa: BLE001 - report the original failure, not the rollback's
        log.error("rollback of the failed ingest of %s (scan %d) failed: %s (the next ingest removes it)",
                  path, scan_id, err)


def _todo(store, scan_id, names) -> tuple[list[str], dict[str, int], float | None, object]:
    """The models of ``names`` that lack a run on the scan; the stored model ids by name, the scan's lattice period
    (None: unknown before inference) and ``has(name, layer)``."""
    from polcore.store import queries

    info = queries.scan_info(store, scan_id)
    period = info.get("cell_px")
    stored = queries.list_models(store)
    known = {str(n): int(m) for n, m in zip(stored["name"], stored["model_id"])}

    def has(n, layer="pattern"):
        return n in known and store.has_run(known[n], scan_id, layer)

    # a cell run is owed only where the lattice period is known before inference (calibration); for an
    # uncalibrated scan whose periodicity shows no lattice, a re-ingest must not rerun the models every time
    todo = [n for n in names if not has(n) or (period is not None and not has(n, "cell"))]
    return todo, known, period, has


def _predict_local(scan, path, names, entries, *, batch_size, progress, overrides, on_batch):
    """The predictions of one scan in this process: ONE pass (:func:`polcore.infer.predict_scan_many`)."""
    from polcore.distributed import FIT_PATTERNS
    from polcore.infer import predict_scan_many

    results = predict_scan_many(scan, [e[0] for e in entries], batch_size=batch_size, progress=progress,
                                geometry_overrides=overrides or None, on_batch=on_batch, fit_patterns=FIT_PATTERNS)
    return results, None


class _PredictBlocks:
    """The predictions of one scan, its row blocks spread over a Dask executor
    (:func:`polcore.distributed.predict_blocks`)."""

    def __init__(self, executor, block_patterns: int | None):
        self.executor, self.block_patterns = executor, block_patterns

    def __call__(self, scan, path, names, entries, *, batch_size, progress, overrides, on_batch):
        from polcore.distributed import BLOCK_PATTERNS, predict_blocks

        stats: dict = {}
        results = predict_blocks(self.executor, scan, path, [e[0] for e in entries], [e[2] for e in entries],
                                 batch_size=batch_size, block_patterns=self.block_patterns or BLOCK_PATTERNS,
                                 geometry_overrides=overrides or None, progress=progress, on_batch=on_batch,
                                 stats=stats)
        return results, dict(mode="row blocks", **stats)


class _PredictFromTask:
    """The predictions of one scan from a task submitted earlier (:func:`ingest_many`: one task per scan), or in
    this process when the task does not cover the models still owed (the store changed meanwhile)."""

    def __init__(self, names: list[str], future):
        self.names, self.future = list(names), future

    def __call__(self, scan, path, names, entries, *, batch_size, progress, overrides, on_batch):
        from concurrent.futures import TimeoutError as FutureTimeout

        if not set(names) <= set(self.names):
            self.future.cancel()
            log.info("%s: the models owed changed since the task was submitted; predicting here", path)
            return _predict_local(scan, path, names, entries, batch_size=batch_size, progress=progress,
                                  overrides=overrides, on_batch=on_batch)
        t0 = time.monotonic()
        while True:
            try:
                res = self.future.result(timeout=1.0)
                break
            except FutureTimeout:  # a progress call lets a cancel through while the worker computes
                progress(0.0, f"predicting on a Dask worker ({time.monotonic() - t0:.0f} s)")
        by = dict(zip(self.names, res))
        results = [by[n] for n in names]
        n_total = int(np.prod(scan.nav_shape))
        if on_batch is not None:
            on_batch(np.arange(n_total), [r.pred.ravel() for r in results])
        progress(1.0, f"{n_total} patterns x {len(names)} model(s) predicted on a Dask worker")
        return results, dict(mode="one task per scan")


def _run_models(store, scan_id, scan, gt, path, models, db_path, progress, batch_size, temps, *, owner,
                overrides=None, geometry_out: dict | None = None, predict=None, live=None):
    """Run the models that lack a run on the scan and commit all their runs in one transaction; the run ids."""
    from polcore.analysis import estimate_cell_px, irregularity, pool_scan

    todo, known, period, has = _todo(store, scan_id, list(models))
    if not todo:
        if owner is not None:  # a claimed row with nothing to run: just mark it ready
            store.write_runs(scan_id, [], owner=owner, set_status="ready")
        return []
    progress(0.0, f"running {len(todo)} model(s) on {Path(path).name}")
    if live is not None:
        live.begin(scan.nav_shape, todo)
    results, where = (predict or _predict_local)(
        scan, path, todo, [models[n] for n in todo], batch_size=batch_size,
        progress=lambda f, m: progress(0.9 * f, m), overrides=overrides,
        on_batch=None if live is None else live.update)
    if geometry_out is not None:
        geometry_out.update(results[0].geometry)
    _pause("inference")
    period_source = "calibration" if period is not None else None
    if period is None:
        period, prominence = estimate_cell_px(results[0].com)
        period_source = f"scan periodicity (prominence {prominence:.0f})" if period else None
        if period is None:
            log.warning("%s: no lattice period (no calibration, no clear periodicity): no unit-cell layer", path)
    fdir = settings.features_dir(db_path)
    fdir.mkdir(parents=True, exist_ok=True)
    tag = f"{socket.gethostname()}~{os.getpid()}~{os.urandom(4).hex()}"
    runs, feature_tmp = [], {}
    for i, (n, res) in enumerate(zip(todo, results)):
        # the features go to a temporary name now and to their own name inside the final transaction
        tmp = fdir / f".scan{scan_id}~{tag}~{i}.tmp"
        temps.append(tmp)
        with open(tmp, "wb") as fh:
            np.savez(fh, pos=res.sample_pos, features=res.features, inputs=res.inputs)
        feature_tmp[n] = tmp
        irr = irregularity(res.pred, res.probs, period_px=period)
        cfg = dict(batch_size=batch_size, preprocessing=res.preprocess, cell_px=period, cell_px_source=period_source,
                   geometry=res.geometry)
        if where is not None:  # predicted on a Dask cluster: how
            cfg["dask"] = where
        model = {"model_id": known[n]} if n in known else {"model": n}
        if not has(n):
            runs.append(dict(model, predictions=_prediction_frame(res, gt, irr), seconds=res.seconds,
                             device=res.device, config=cfg))
        if period is not None and not has(n, "cell"):
            cells = pool_scan(res.probs, period)
            cres = copy.copy(res)
            cres.pred, cres.probs, cres.confidence = cells["pred"], cells["probs"], cells["confidence"]
            cirr = irregularity(cres.pred, cres.probs, period_px=period)
            runs.append(dict(model, predictions=_prediction_frame(cres, gt, cirr), seconds=res.seconds,
                             device=res.device, layer="cell",
                             config={**cfg, "pooling": "sum of log-probabilities per cell block",
                                     "n_cells": cells["n_cells"]}))
        progress(0.9 + 0.09 * (i + 1) / len(todo), f"prepared {n}")
    _pause("features")
    specs = [_model_spec(n, *models[n]) for n in todo if n not in known]

    def move_features(model_ids: dict[str, int], run_ids: list[int]) -> None:
        # inside the transaction, before COMMIT: a committed run always has its features
        for n, tmp in feature_tmp.items():
            os.replace(tmp, fdir / f"scan{scan_id}_model{known.get(n, model_ids.get(n))}.npz")
        _pause("transaction")

    progress(0.995, f"writing {len(runs)} run(s) of {len(todo)} model(s) in one transaction")
    return store.write_runs(scan_id, runs, models=specs, owner=owner, set_status="ready" if owner else None,
                            before_commit=move_features, images=getattr(results[0], "virtual", None),
                            images_meta=getattr(results[0], "virtual_info", None))  # once per scan


def _prediction_frame(res, gt, irregular: np.ndarray) -> dict:
    d = dict(pred=res.pred, probs=res.probs, confidence=res.confidence, irregularity=irregular)
    if gt is not None:
        d.update(true_label=np.asarray(gt["label"]), thickness_nm=np.asarray(gt["thickness_nm"]),
                 is_defect=np.asarray(gt["defect"]))
        if "region" in gt:
            d["region"] = np.asarray(gt["region"])
    return d

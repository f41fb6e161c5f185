"""The demo: everything the dashboard shows, built from a fresh clone; idempotent (every step skips what
exists).

Steps: models (the shipped checkpoints, or train the 'quick'/'paper' profile on the committed library; the
classical CoM-direction baseline, shipped, is in every demo) →
compose the default scans → ingest every scan with every model (:mod:`polcore.ingest`) → the benchmark table
(:mod:`polcore.benchmark`) and the held-out rows (:mod:`polcore.heldout`) → embeddings and domain gaps
(:mod:`polcore.reports`).

A build beside the dashboard
----------------------------
``make run`` starts ``python -m polcore demo --if-needed`` in the background and serves the dashboard at once;
the Overview page can start the same command (:func:`start_build_process`). Three files next to the database
(``<db folder>/``) coordinate them:

* ``demo_build.lock``: held (``flock``) by the one running build for its whole life. A second build finds it
  held and leaves (``--if-needed``) or waits; the kernel drops the lock when the process dies however it dies,
  so a build that was killed can simply be started again (every step skips what exists).
* ``demo_status.json`` (:class:`StatusWriter`): ``fraction``, ``message``, ``step``, ``started``,
  ``updated`` (epoch seconds), ``pid``, ``done``, ``error`` and ``db``, rewritten atomically (temp file +
  rename) at most every :data:`STATUS_INTERVAL_S` and at every step; :func:`build_state` reads it and adds
  whether the build runs, finished, failed or died, and the time left.
* ``demo_build.log``: the build's output.

The scans are committed one by one (each ingest is its own transactions), so the dashboard's pages show them as
they land; the benchmark and the embeddings come last.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from polcore import settings
from polcore.progress import Progress, report, scaled

__all__ = [
    "build_demo",
    "demo_models_dir",
    "baseline_checkpoints",
    "scan_table",
    "SCAN_TABLES",
    "status_path",
    "lock_path",
    "log_path",
    "StatusWriter",
    "write_status",
    "read_status",
    "BuildLock",
    "build_running",
    "build_state",
    "needs_build",
    "run_build",
    "start_build_process",
]

#: Fractions of the demo's work after the models: composing the scans, ingesting them, the benchmark and
#: held-out rows, embeddings (UMAP compiles on first use). From a build from the shipped models by `make run` on
#: the 2-core CPU beside a training job (scans 22 s, inference 96 s, benchmark 3 s, embeddings 97 s), so that
#: elapsed time / fraction predicts the time left.
LAYOUT = (("scans", 0.10), ("ingest", 0.44), ("benchmark", 0.02), ("embeddings", 0.44))
#: Points per embedding (PCA and UMAP, per model and space) in the demo, about 220 per default scan. UMAP's time
#: grows faster than the points: one fit took 12 s at 2000 points and 32 s at 4000 on the loaded 2-core CPU
#: (plus about 30 s of numba compilation in each new process), and the demo fits four.
EMBED_POINTS = 2000
#: Share of the whole build taken by training when a profile is trained first ('quick', 'paper').
TRAIN_SHARE = 0.55
#: The status file is rewritten at most this often [s] (and at every new step).
STATUS_INTERVAL_S = 0.5
STATUS_NAME, LOCK_NAME, LOG_NAME = "demo_status.json", "demo_build.lock", "demo_build.log"


def _tiny_scans() -> dict:
    from polcore.simulate.composer import ScanComposerConfig

    return {"tiny_20nm": ("synthetic", "synthetic 20 nm, tiny",
                          ScanComposerConfig(layout="stripes", ny=16, nx=16, thickness_nm=20, domain_cells=1,
                                             seed=4))}


def _default_scans() -> dict:
    from polcore.simulate.composer import DEFAULT_SCANS

    return DEFAULT_SCANS


#: name -> (scan table factory, embedding methods): 'default' = the 9 default scans, PCA and UMAP; 'tiny' = one
#: 16 x 16 scan and PCA only (seconds; for tests and a quick look).
SCAN_TABLES = {"default": (_default_scans, ("pca", "umap")), "tiny": (_tiny_scans, ("pca",))}


def scan_table(name: str) -> tuple[dict, tuple[str, ...]]:
    """(scan table, embedding methods) of a named demo size (:data:`SCAN_TABLES`)."""
    if name not in SCAN_TABLES:
        raise ValueError(f"unknown demo scan table {name!r}; valid: {', '.join(SCAN_TABLES)}")
    factory, methods = SCAN_TABLES[name]
    return factory(), methods


def baseline_checkpoints() -> list:
    """The shipped checkpoints of the untrained baselines (the CoM direction, :mod:`polcore.models.com_direction`):
    every demo compares its models with them."""
    from polcore.ingest import checkpoints
    from polcore.models import UNTRAINED_FAMILIES, read_checkpoint_meta

    return [p for p in checkpoints(settings.shipped_models_dir())
            if read_checkpoint_meta(p).get("family") in UNTRAINED_FAMILIES]


def demo_models_dir(profile: str | None = None) -> tuple[str, object]:
    """(profile, checkpoint folder) of the demo: 'shipped' when the checkout has shipped checkpoints (the
    default), else the folder a training profile writes."""
    from polcore.ingest import checkpoints

    if profile is None:
        profile = "shipped" if checkpoints(settings.shipped_models_dir()) else "quick"
    if profile == "shipped":
        return profile, settings.shipped_models_dir()
    return profile, settings.models_dir() / profile


def _layout(train_share: float) -> dict[str, tuple[float, float]]:
    """step -> (lo, hi) fractions of the whole build after ``train_share`` for training."""
    out, lo = {}, train_share
    for name, share in LAYOUT:
        hi = lo + (1.0 - train_share) * share
        out[name] = (lo, hi)
        lo = hi
    out["embeddings"] = (out["embeddings"][0], 1.0)
    return out


def build_demo(db_path=None, *, profile: str | None = None, progress: Progress | None = None,
               library=None, models_dir=None, scans: dict | None = None, scans_dir=None,
               embed_methods=("pca", "umap"), embed_points: int = EMBED_POINTS) -> dict:
    """Build the demo database; returns a summary with the elapsed time per step [s].

    Parameters
    ----------
    profile : 'shipped' (the committed checkpoints, no training), 'quick' or 'paper' (train on the committed
        library first); None = 'shipped' when ``data/models/shipped`` holds checkpoints, else 'quick'.
    progress : optional ``progress(fraction, message)``; every message starts with its step (``scans: ``,
        ``ingest 3/9: ``, ``benchmark: ``, ``embeddings: ``, and ``train: `` when a profile is trained).
        Training takes 0-0.55 of the fraction; the rest is shared as :data:`LAYOUT` says (from measured
        times, so that the fraction grows about evenly with time).
    library : the pattern library the scans are composed from (default: the committed one).
    models_dir : use the checkpoints in this folder instead (no training).
    scans : name -> (kind, benchmark row, ScanComposerConfig); default ``composer.DEFAULT_SCANS``.
    scans_dir : where the scans are composed (default :func:`polcore.settings.scans_dir`).
    embed_methods : embedding methods of the Embeddings page.
    embed_points : points per embedding (a random subsample of the stored feature subsamples).
    """
    from polcore.benchmark import run_bench
    from polcore.heldout import load_results
    from polcore.ingest import checkpoints, ingest_scan, load_models
    from polcore.reports import compute_embeddings
    from polcore.simulate import load_library
    from polcore.simulate.composer import DEFAULT_SCANS, build_default_scans
    from polcore.store import PredictionStore

    progress = report(progress)
    db_path = db_path or settings.db_path()
    t0 = time.perf_counter()
    summary: dict = {}
    profile, out = ("given", models_dir) if models_dir is not None else demo_models_dir(profile)
    scans = DEFAULT_SCANS if scans is None else scans
    trained = profile not in ("shipped", "given")
    lay = _layout(TRAIN_SHARE if trained else 0.0)
    if not trained:
        if not checkpoints(out):
            raise FileNotFoundError(f"{out}: no checkpoints; use --profile quick to train the demo models")
        progress(0.0, f"models: using the shipped models in {out}")
    lib = library if library is not None else load_library()
    if trained:
        from polcore.train import train_profile

        progress(0.0, f"train: training the '{profile}' profile")
        train_profile(profile, lib, out, progress=scaled(progress, 0.0, TRAIN_SHARE, "train: "))
    summary["train_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    paths = build_default_scans(scans_dir or settings.scans_dir(), lib,
                                progress=scaled(progress, *lay["scans"], "scans: "), table=scans)
    summary["scans_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    models = load_models(checkpoints(out))
    if trained:  # the classical CoM baseline is in every demo: shipped (nothing to train), added to trained profiles
        models.update(load_models([p for p in baseline_checkpoints() if p not in checkpoints(out)]))
    lo, hi = lay["ingest"]
    for i, (name, path) in enumerate(paths.items()):
        kind, row, _ = scans[name]
        ingest_scan(path, None, db_path, name=name, kind=kind, dataset=row, models=models,
                    progress=scaled(progress, lo + (hi - lo) * i / len(paths), lo + (hi - lo) * (i + 1) / len(paths),
                                    f"ingest {i + 1}/{len(paths)}: {name}: "))
    summary["inference_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    progress(lay["benchmark"][0], "benchmark: the benchmark table")
    bench = run_bench(db_path)
    progress((lay["benchmark"][0] + lay["benchmark"][1]) / 2, "benchmark: held-out rows of the models")
    summary["heldout_rows"] = load_results(db_path, [out])
    summary["bench_s"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    umap = " (UMAP compiles on first use)" if "umap" in embed_methods else ""
    progress(lay["embeddings"][0], f"embeddings: embeddings and domain gap{umap}")
    summary["domain_gap_auc"] = compute_embeddings(db_path, methods=embed_methods, n_max=embed_points,
                                                   progress=scaled(progress, *lay["embeddings"], "embeddings: "))
    summary["embeddings_s"] = time.perf_counter() - t4
    summary["bench_rows"] = len(bench)
    summary["analysis_s"] = time.perf_counter() - t3
    summary["total_s"] = time.perf_counter() - t0
    PredictionStore(db_path).cache_put("demo_summary", json.loads(json.dumps(summary, default=float)))
    progress(1.0, f"done: demo ready in {summary['total_s']:.0f} s")
    return summary


# ------------------------------------------------------------------------------- a build beside the dashboard


def _db(db=None) -> Path:
    return Path(db).expanduser().resolve() if db is not None else settings.db_path()


def status_path(db=None) -> Path:
    """The status file of the demo build of ``db``: ``<db folder>/demo_status.json``."""
    return _db(db).parent / STATUS_NAME


def lock_path(db=None) -> Path:
    """The lock file held by the running demo build of ``db``: ``<db folder>/demo_build.lock``."""
    return _db(db).parent / LOCK_NAME


def log_path(db=None) -> Path:
    """Where a background demo build writes its output: ``<db folder>/demo_build.log``."""
    return _db(db).parent / LOG_NAME


def write_status(path, status: dict) -> None:
    """Write ``status`` as JSON atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, default=str))
    os.replace(tmp, path)


def read_status(path) -> dict | None:
    """The status dict, or None when the file is missing or not a status (never raises)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "fraction" in data else None


class StatusWriter:
    """A ``progress(fraction, message)`` that also keeps the build's status file up to date.

    The status: ``fraction`` (0-1), ``message``, ``step`` (the message's text before its first ``": "``),
    ``started`` and ``updated`` (epoch seconds), ``pid``, ``done``, ``error`` (None or one line), ``db``.
    Written at once when created, then at most every ``interval`` seconds and at every change of step.
    """

    def __init__(self, path, db, *, progress: Progress | None = None, interval: float = STATUS_INTERVAL_S,
                 **extra):
        self.path = Path(path)
        self.progress = progress
        self.interval = interval
        now = time.time()
        self.status = {"fraction": 0.0, "message": "starting: loading the models and the library",
                       "step": "starting", "started": now, "updated": now, "pid": os.getpid(), "done": False,
                       "error": None, "db": str(_db(db)), **extra}
        self._written = 0.0
        self._write()

    def _write(self) -> None:
        self.status["updated"] = time.time()
        write_status(self.path, self.status)
        self._written = time.monotonic()

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.progress is not None:
            self.progress(fraction, message)
        step = message.split(": ", 1)[0] if ": " in message else self.status["step"]
        new_step = step != self.status["step"]
        self.status.update(fraction=min(max(float(fraction), 0.0), 1.0), message=message, step=step)
        if new_step or time.monotonic() - self._written >= self.interval:
            self._write()

    def finish(self, summary: dict | None = None) -> None:
        """Mark the build done (fraction 1)."""
        self.status.update(fraction=1.0, step="done", done=True, error=None,
                           total_s=None if not summary else summary.get("total_s"))
        if summary is not None:
            self.status["message"] = f"done: demo ready in {summary.get('total_s', 0):.0f} s"
        self._write()

    def fail(self, error: BaseException | str) -> None:
        """Mark the build failed with a one-line error."""
        if isinstance(error, BaseException):
            text = " ".join(str(error).split()) or type(error).__name__
            error = text if isinstance(error, Exception) else f"{type(error).__name__}: {text}"
        self.status.update(error=str(error)[:500], done=False)
        self._write()


class BuildLock:
    """The exclusive ``flock`` of one demo build on :func:`lock_path` (released when the process ends).

    ``acquire(wait=False)`` returns False at once while another build holds it; with ``wait=True`` it blocks.
    A very short miss is retried for ``retry_s`` (a dashboard's :func:`build_running` probe takes a shared
    lock for an instant).
    """

    def __init__(self, db=None):
        self.path = lock_path(db)
        self._fd: int | None = None

    def acquire(self, wait: bool = False, retry_s: float = 0.5) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """The pid written by the holder (or '?')."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def __enter__(self) -> BuildLock:
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def build_running(db=None) -> bool:
    """Whether a demo build of ``db`` runs now (its lock is held). Creates nothing."""
    path = lock_path(db)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


_CHILDREN: list[subprocess.Popen] = []


def build_state(db=None, status_file=None, now: float | None = None) -> dict | None:
    """The demo build of ``db`` as the dashboard shows it, or None when no status file describes it.

    The status (see :class:`StatusWriter`) plus ``state`` ('running', 'done', 'failed', or 'died': the
    process is gone without finishing), ``elapsed_s`` and ``eta_s`` (time left from the elapsed time and the
    fraction; None until 2 % and 3 s are reached).
    """
    for child in list(_CHILDREN):  # reap builds this process started
        if child.poll() is not None:
            _CHILDREN.remove(child)
    db = _db(db)
    status = read_status(status_file or status_path(db))
    if status is None or status.get("db") != str(db):
        return None
    now = time.time() if now is None else now
    running = build_running(db)
    if status.get("done"):
        state = "done"
    elif running:
        state = "running"
    elif status.get("error"):
        state = "failed"
    else:
        state = "died"
    started = float(status.get("started") or now)
    end = now if state == "running" else float(status.get("updated") or now)
    elapsed = max(0.0, end - started)
    f = float(status.get("fraction") or 0.0)
    eta = elapsed * (1.0 - f) / f if state == "running" and f >= 0.02 and elapsed >= 3.0 else None
    return {**status, "state": state, "elapsed_s": elapsed, "eta_s": eta}


def needs_build(db=None, status_file=None) -> bool:
    """Whether ``--if-needed`` builds: the database is missing, or the status file records an unfinished build
    of it (one that failed or was killed: its steps resume)."""
    db = _db(db)
    if not db.exists():
        return True
    status = read_status(status_file or status_path(db))
    return status is not None and status.get("db") == str(db) and not status.get("done")


def run_build(db=None, *, status_file=None, if_needed: bool = False, profile: str | None = None,
              scans: str = "default", progress: Progress | None = None, say=print) -> dict | None:
    """One demo build under the lock, reporting to the status file; the CLI's ``demo`` command.

    Returns the build's summary, or None when nothing was built: ``if_needed`` and another build runs, or the
    database is complete (:func:`needs_build`). Without ``if_needed`` it waits for a running build, then
    builds (every step skips what exists). A failure is written to the status file and raised.
    """
    db = _db(db)
    status_file = Path(status_file) if status_file else status_path(db)
    lock = BuildLock(db)
    if not lock.acquire(wait=False):
        if if_needed:
            say(f"a demo build of {db} is already running (pid {lock.holder()}); its progress: {status_file}")
            return None
        say(f"waiting for the running demo build of {db} (pid {lock.holder()}) to finish")
        lock.acquire(wait=True)
    try:
        if if_needed and not needs_build(db, status_file):
            say(f"{db} exists and no unfinished demo build is recorded: nothing to build")
            return None
        table, methods = scan_table(scans)
        writer = StatusWriter(status_file, db, progress=progress, scans=scans)
        try:
            summary = build_demo(db, profile=profile, progress=writer, scans=table, embed_methods=methods)
        except BaseException as exc:
            writer.fail(exc)
            raise
        writer.finish(summary)
        return summary
    finally:
        lock.release()


def start_build_process(db=None, *, status_file=None, scans: str | None = None, profile: str | None = None):
    """Start ``python -m polcore demo --if-needed`` for ``db`` in its own session (it outlives the caller),
    output appended to :func:`log_path`; returns the Popen. A second start while one runs exits at once
    (the lock), so two dashboard sessions never build twice. ``scans`` defaults to ``$POLBENCH_DEMO_SCANS``
    or 'default'."""
    db = _db(db)
    scans = scans or os.environ.get("POLBENCH_DEMO_SCANS") or "default"
    cmd = [sys.executable, "-m", "polcore", "demo", "--db", str(db), "--if-needed", "--scans", scans,
           "--status-file", str(status_file or status_path(db))]
    if profile:
        cmd += ["--profile", profile]
    log = log_path(db)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen(cmd, cwd=settings.ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.append(child)
    return child

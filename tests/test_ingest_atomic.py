"""Ingest is atomic across processes and crashes (issue 12, A).

A child process runs ``python -m polcore ingest`` on a small real scan with two real PCA+kNN checkpoints (one
already in the store, one new) and is stopped with ``POLBENCH_TEST_PAUSE_AT=<moment>`` at a known moment, then
killed with SIGKILL there. After the next start's cleanup every table (except ``id_counters``) must equal the
snapshot taken before, or that snapshot plus exactly the finished ingest (scan 'ready', the new model, both
layers of both models, their features) -- nothing half-made. A race: two processes ingest the same new file at
once, the one that got the scan row is killed mid-way, the other must finish the ingest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest
from app_fixtures import make_labels, write_checkpoint, write_scan

from polcore import settings
from polcore.ingest import PAUSE_MOMENTS, cleanup_stale_ingests, ingest_scan
from polcore.io import sha256_file
from polcore.store import PredictionStore, StoreBusyError, StoreError, queries
from polcore.store.locking import new_owner

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("pca_knn-cls-s0", "pca_knn-cls-s1")  # s0 is in the store before, s1 is new
NY = NX = 12
TRIALS = int(os.environ.get("POLBENCH_KILL_TRIALS", "2"))  # kills per moment (5 x 2 fit the time budget)
#: moment -> the only outcome allowed after a kill there (and the cleanup)
EXPECTED = {"scan_row": "before", "inference": "before", "features": "before", "transaction": "before",
            "commit": "finished"}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Checkpoints, the victim scan, and a store that already holds another scan ingested with s0."""
    root = tmp_path_factory.mktemp("atomic")
    rng = np.random.default_rng(21)
    models = root / "models"
    write_checkpoint(models, rng)
    with np.load(models / "pca_knn-cls-s0.npz", allow_pickle=False) as z:  # the same model as seed 1
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta_json"]))
    meta["train_config"], meta["seed"] = {"seed": 1}, 1
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez(models / "pca_knn-cls-s1.npz", **arrays)
    (models / "pca_knn-cls-s1.json").write_text(json.dumps(meta))
    lab = make_labels(NY, NX, rng)
    scan = write_scan(root / "scans" / "victim.h5", lab, np.full(lab.shape, 20.0, np.float32),
                      np.zeros(lab.shape, bool), rng)
    lab2 = make_labels(10, 10, rng)
    other = write_scan(root / "scans" / "other.h5", lab2, np.full(lab2.shape, 35.0, np.float32),
                       np.zeros(lab2.shape, bool), rng)
    db = root / "base" / "db.duckdb"
    ingest_scan(other, ["pca_knn-cls-s0"], db, kind="synthetic", model_dir=models)
    return dict(root=root, models=models, scan=scan, db=db, sha=sha256_file(scan))


def _copy_store(base: dict, dest: Path) -> Path:
    """A private copy of the base store (database and feature files)."""
    dest.mkdir(parents=True)
    db = dest / "db.duckdb"
    shutil.copy2(base["db"], db)
    shutil.copytree(settings.features_dir(base["db"]), settings.features_dir(db))
    return db


def _child(base: dict, db: Path, log: Path, moment: str | None = None, flag: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "POLBENCH_DATA": str(db.parent)}
    for k in ("POLBENCH_DB", "POLBENCH_MODELS", "POLBENCH_TEST_PAUSE_AT", "POLBENCH_TEST_PAUSE_FILE"):
        env.pop(k, None)
    if moment is not None:
        env.update(POLBENCH_TEST_PAUSE_AT=moment, POLBENCH_TEST_PAUSE_FILE=str(flag))
    cmd = [sys.executable, "-m", "polcore", "ingest", str(base["scan"]), "--db", str(db), "--model-dir",
           str(base["models"]), "--kind", "synthetic", "--name", "victim", "--models", *MODELS]
    out = open(log, "w")  # a file, not a pipe: a paused child never blocks on a full pipe
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def _wait_for_flag(flag: Path, procs: list, log: Path, timeout: float = 90.0) -> int:
    """The pid written into ``flag`` by the child that paused."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if flag.is_file() and flag.read_text().strip():
            return int(flag.read_text().split()[0])
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    pytest.fail(f"no child paused at {flag.name}; log:\n{log.read_text()[-3000:]}")


def _kill(pid: int, procs: list) -> None:
    os.kill(pid, signal.SIGKILL)
    for p in procs:
        if p.pid == pid:
            p.wait(timeout=30)  # reaped: no zombie left


# ------------------------------------------------------------------------------------------------ checks


def _snapshot(db: Path) -> dict[str, list[str]]:
    """Every table's rows (as sorted reprs) except ``id_counters`` (a sequence: it only ever grows)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in tables
                if t != "id_counters"}
    finally:
        con.close()


def _features(db: Path) -> set[str]:
    d = settings.features_dir(db)
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def _outcome(db: Path, before: dict, before_files: set[str], sha: str) -> str:
    """'before' (the store as it was) or 'finished' (as it was plus exactly the finished ingest); fails on
    anything else."""
    after = _snapshot(db)
    assert after.keys() == before.keys()
    files = _features(db)
    if after == before:
        assert files == before_files, f"feature files left behind: {sorted(files - before_files)}"
        return "before"
    extra = {}
    for t in before:
        missing = Counter(before[t]) - Counter(after[t])
        assert not missing, f"{t}: rows of the snapshot before are gone: {list(missing)[:3]}"
        extra[t] = sum((Counter(after[t]) - Counter(before[t])).values())
    con = duckdb.connect(str(db), read_only=True)
    try:
        (sid, status), = con.execute("SELECT scan_id, status FROM scans WHERE sha256 = ?", [sha]).fetchall()
        runs = con.execute(
            "SELECT r.run_id, m.name, m.model_id, r.layer, r.status, r.n_patterns FROM runs r "
            "JOIN models m USING (model_id) WHERE r.scan_id = ?", [sid]).fetchall()
        run_ids = [r[0] for r in runs]
        n_pred = con.execute(f"SELECT count(*) FROM predictions WHERE run_id IN ({','.join('?' * len(runs))})",
                             run_ids).fetchone()[0]
    finally:
        con.close()
    assert status == "ready"
    assert sorted((r[1], r[3]) for r in runs) == sorted((m, la) for m in MODELS for la in ("cell", "pattern"))
    assert all(r[4] == "finished" and r[5] == NY * NX for r in runs)
    assert n_pred == len(MODELS) * 2 * NY * NX
    assert extra == {**{t: 0 for t in before}, "scans": 1, "models": 1, "runs": 4, "predictions": n_pred,
                     "scan_images": 4}, extra  # the virtual images (bf, adf, com_y, com_x), in the same transaction
    want = {f"scan{sid}_model{m}.npz" for m in {r[2] for r in runs}}
    assert files == before_files | want, sorted(files ^ (before_files | want))
    for name in want:
        with np.load(settings.features_dir(db) / name) as z:
            assert z["features"].shape[0] == z["pos"].shape[0] > 0
    return "finished"


# --------------------------------------------------------------------------------------------- kill tests


def test_kill_at_every_moment_leaves_before_or_finished(base, tmp_path, caplog):
    """kill -9 at each moment of an ingest, TRIALS times (the moments of one trial run side by side), then
    the next start's cleanup, then a new ingest that must finish."""
    outcomes: Counter = Counter()
    for trial in range(TRIALS):
        runs = {}
        for moment in PAUSE_MOMENTS:
            d = tmp_path / f"t{trial}-{moment}"
            db = _copy_store(base, d)
            flag, log = d / "paused", d / "child.log"
            before, files = _snapshot(db), _features(db)
            runs[moment] = (db, flag, log, before, files, _child(base, db, log, moment, flag))
        for _db, flag, log, _before, _files, proc in runs.values():
            pid = _wait_for_flag(flag, [proc], log)
            assert pid == proc.pid
            _kill(pid, [proc])
            assert proc.returncode == -signal.SIGKILL
        for moment, (db, _flag, _log, before, files, proc) in runs.items():
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="polcore.store.store"):
                removed = cleanup_stale_ingests(db)  # what the next start does first
            if EXPECTED[moment] == "before":
                assert len(removed) == 1
                assert any(f"scan {removed[0]}" in r.getMessage() and f":{proc.pid}:" in r.getMessage()
                           for r in caplog.records), caplog.text  # names the scan and the dead owner
            else:
                assert removed == []
            got = _outcome(db, before, files, base["sha"])
            assert got == EXPECTED[moment], (moment, trial)
            outcomes[(moment, got)] += 1
            # and the store works on: a new ingest of the same file finishes (or finds it finished)
            ingest_scan(base["scan"], list(MODELS), db, kind="synthetic", name="victim",
                        model_dir=base["models"], wait_s=0)
            assert _outcome(db, before, files, base["sha"]) == "finished"
    print("kill outcomes:", dict(outcomes))
    assert sum(outcomes.values()) == TRIALS * len(PAUSE_MOMENTS)


def test_two_processes_ingest_the_same_new_file_and_one_is_killed(base, tmp_path):
    """Both start at once; the one that got the scan row pauses (at a different moment each trial) and is
    killed; the other, waiting for it, must clean up and finish with a 'ready' scan and complete runs."""
    finished = 0
    for trial, moment in enumerate(("scan_row", "features", "transaction")):
        d = tmp_path / f"race{trial}"
        db = _copy_store(base, d)
        before, files = _snapshot(db), _features(db)
        flag = d / "paused"
        procs = [_child(base, db, d / f"child{i}.log", moment, flag) for i in range(2)]
        victim = _wait_for_flag(flag, procs, d / "child0.log")
        time.sleep(0.3 * trial)  # let the other one wait a little (or still be starting)
        _kill(victim, procs)
        (survivor,) = [p for p in procs if p.pid != victim]
        assert survivor.wait(timeout=120) == 0, (d / f"child{procs.index(survivor)}.log").read_text()[-3000:]
        assert _outcome(db, before, files, base["sha"]) == "finished"
        text = (d / f"child{procs.index(survivor)}.log").read_text()
        assert f":{victim}:" in text and "removed the stale" in text  # it cleaned up the killed one's row
        assert "Traceback" not in text
        finished += 1
    print(f"race: {finished}/3 finished by the surviving process")


# ---------------------------------------------------------------------------------- in-process behaviour


def _claimed_by_someone_else(base, tmp_path) -> tuple[Path, int, str]:
    db = _copy_store(base, tmp_path / "s")
    store = PredictionStore(db)
    owner = new_owner()  # this (live) process, another ingest
    claim = store.claim_scan(owner=owner, name="victim", kind="synthetic", sha256=base["sha"], ny=NY, nx=NX)
    assert claim.state == "claimed"
    return db, claim.scan_id, owner


def test_a_second_ingest_refuses_or_times_out_and_never_touches_the_live_row(base, tmp_path):
    db, sid, owner = _claimed_by_someone_else(base, tmp_path)
    before = _snapshot(db)
    with pytest.raises(StoreBusyError) as info:
        ingest_scan(base["scan"], list(MODELS), db, kind="synthetic", model_dir=base["models"], wait_s=0)
    msg = str(info.value)
    assert owner in msg and "\n" not in msg
    t0 = time.monotonic()
    with pytest.raises(StoreBusyError, match="gave up after waiting"):
        ingest_scan(base["scan"], list(MODELS), db, kind="synthetic", model_dir=base["models"], wait_s=0.6)
    assert time.monotonic() - t0 >= 0.6
    assert _snapshot(db) == before  # the other ingest's row is untouched, nothing else written
    store = PredictionStore(db)
    assert store.cleanup_stale_ingests() == []  # its owner lives
    assert store.abandon_ingest(sid, new_owner()) is False  # a rollback removes only its own row
    assert store.scan_status(sid) == "ingesting"
    assert store.abandon_ingest(sid, owner) is True
    assert store.scan_status(sid) is None


def test_write_runs_commits_everything_or_nothing(base, tmp_path):
    db, sid, owner = _claimed_by_someone_else(base, tmp_path)
    store = PredictionStore(db)
    before = _snapshot(db)
    rng = np.random.default_rng(0)
    probs = rng.random((NY, NX, 8)).astype(np.float32)
    runs = [dict(model="new-model", predictions={"pred": probs.argmax(-1), "probs": probs}, seconds=1.0,
                 device="cpu", layer=layer) for layer in ("pattern", "cell")]
    spec = [dict(name="new-model", family="pca_knn", head="cls")]

    def boom(model_ids, run_ids):
        assert len(run_ids) == 2
        raise RuntimeError("killed before commit")

    with pytest.raises(RuntimeError, match="killed before commit"):
        store.write_runs(sid, runs, models=spec, owner=owner, before_commit=boom)
    assert _snapshot(db) == before
    with pytest.raises(StoreError, match="no longer held by this ingest"):
        store.write_runs(sid, runs, models=spec, owner=new_owner())
    assert _snapshot(db) == before
    ids = store.write_runs(sid, runs, models=spec, owner=owner)
    assert len(ids) == 2 and store.scan_status(sid) == "ready"
    assert sorted(queries.list_runs(store).query("scan_id == @sid")["layer"]) == ["cell", "pattern"]


def _set(db: Path, sid: int, **cols) -> None:
    con = duckdb.connect(str(db))
    try:
        for k, v in cols.items():
            con.execute(f"UPDATE scans SET {k} = ? WHERE scan_id = ?", [v, sid])
    finally:
        con.close()


def test_cleanup_removes_only_rows_of_dead_owners(base, tmp_path, caplog):
    from datetime import UTC, datetime, timedelta

    from polcore.store.locking import _hostname, release_owner

    db = _copy_store(base, tmp_path / "c")
    store = PredictionStore(db)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    now = datetime.now(UTC).replace(tzinfo=None)
    old = now - timedelta(hours=1)
    ended = new_owner()
    release_owner(ended)  # an ingest of this process that ended (its rollback failed, say)
    cases = {  # name -> (owner, heartbeat_at, status, removed?)
        "dead-pid": (f"{_hostname()}:{dead_pid}:0.abcd", now, "ingesting", True),
        "dead-failed": (f"{_hostname()}:{dead_pid}:0.abce", now, "failed", True),
        "alive-here": (new_owner(), old, "ingesting", False),
        "ended-here": (ended, now, "failed", True),
        "pid-reused": (f"{_hostname()}:{os.getpid()}:1.abcd", now, "ingesting", True),  # wrong start time
        "other-host-fresh": ("elsewhere:1:0.abcd", now, "ingesting", False),
        "other-host-stale": ("elsewhere:1:0.abce", old, "ingesting", True),
        "no-owner-stale": (None, old, "ingesting", True),
    }
    ids = {}
    for i, (name, (owner, hb, status, _)) in enumerate(cases.items()):
        sid = store.add_scan(name=name, kind="synthetic", sha256=f"{i:064x}", ny=2, nx=2, status="ingesting")
        _set(db, sid, owner=owner, heartbeat_at=hb, created_at=hb, status=status)
        ids[name] = sid
    with caplog.at_level(logging.WARNING, logger="polcore.store.store"):
        removed = store.cleanup_stale_ingests()
    assert sorted(removed) == sorted(ids[n] for n, c in cases.items() if c[3])
    left = set(queries.list_scans(store, status=None)["name"])
    assert {n for n, c in cases.items() if not c[3]} <= left
    assert not {n for n, c in cases.items() if c[3]} & left
    warned = caplog.text
    assert f":{dead_pid}:" in warned and "elsewhere:1:0.abce" in warned and f"scan {ids['dead-pid']}" in warned

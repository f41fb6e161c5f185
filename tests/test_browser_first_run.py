"""A fresh clone's first run: the dashboard serves at once and the demo database is built beside it.

On an EMPTY data directory the server starts, the Overview says there is no database; the build starts in its
own process exactly as ``make run`` starts it (``python -m polcore demo --profile shipped --if-needed
--status-file ...``, here with ``--scans tiny``: one real 16x16 scan composed from the committed library, run
through the three shipped models, benchmark and PCA embeddings, about 10 s). The open Overview picks the build
up by itself and shows its step, per cent and time left, a second browser session sees the same build (and no
button to start another), a second start leaves at once (the lock), and when the build is done the Overview
shows the benchmark without a reload. No fakes: the build, the status file and the database are real.

Without a browser: the lock, the status file's states, and every page on a database that has scans but no
benchmark rows yet (what a page meets while the build runs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import (
    StreamlitServer,
    launch_chromium,
    make_labels,
    open_page,
    page_problems,
    wait_idle,
    write_scan,
)

from polcore import demo

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^Step .* \d+ % \u00b7 .* elapsed \u00b7 ")


def _env(data: Path) -> dict[str, str]:
    return {"POLBENCH_DATA": str(data), "POLBENCH_DB": str(data / "polbench.duckdb"), "POLBENCH_DEMO_SCANS": "tiny",
            "OMP_NUM_THREADS": "1"}


def _make_run_build(data: Path) -> subprocess.Popen:
    """The demo build as ``make run`` starts it (tiny scan table)."""
    db = data / "polbench.duckdb"
    cmd = [sys.executable, "-m", "polcore", "demo", "--db", str(db), "--profile", "shipped", "--if-needed",
           "--scans", "tiny", "--status-file", str(demo.status_path(db))]
    log = open(demo.log_path(db), "ab")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **_env(data)}, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log = log
    return proc


# ------------------------------------------------------------------------------------------- no browser


def test_a_second_build_leaves_at_once_while_one_holds_the_lock(tmp_path):
    data = tmp_path / "data"
    db = data / "polbench.duckdb"
    lock = demo.BuildLock(db)
    assert lock.acquire() and demo.build_running(db)
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "polcore", "demo", "--db", str(db), "--if-needed", "--scans",
                              "tiny"], cwd=ROOT, env={**os.environ, **_env(data)}, capture_output=True, text=True,
                             timeout=60)
        took = time.perf_counter() - t0
    finally:
        lock.release()
    assert out.returncode == 0 and "already running" in out.stdout, out.stdout + out.stderr
    assert took < 20, took  # python start-up and the lock's 0.5 s retry; nothing built
    assert not db.exists() and not demo.status_path(db).exists()
    assert not demo.build_running(db)


def test_status_file_states_and_time_left(tmp_path):
    db = tmp_path / "polbench.duckdb"
    assert demo.build_state(db) is None and demo.needs_build(db)
    lock = demo.BuildLock(db)
    assert lock.acquire()
    w = demo.StatusWriter(demo.status_path(db), db, interval=0.0)
    w(0.25, "ingest 2/9: syn_10nm: running 3 model(s)")
    raw = json.loads(demo.status_path(db).read_text())
    assert {"fraction", "message", "step", "started", "updated", "pid", "done", "error"} <= set(raw)
    assert raw["step"] == "ingest 2/9" and raw["pid"] == os.getpid() and not raw["done"]
    st = demo.build_state(db, now=raw["started"] + 60)
    assert st["state"] == "running" and st["eta_s"] == pytest.approx(180.0)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file is renamed, never left behind"
    lock.release()
    assert demo.build_state(db)["state"] == "died" and demo.needs_build(db) is True  # no db yet
    db.write_bytes(b"")  # a database exists, its build did not finish: --if-needed resumes it
    assert demo.needs_build(db)
    w.fail(RuntimeError("disk full"))
    assert demo.build_state(db)["state"] == "failed" and demo.build_state(db)["error"] == "disk full"
    w.finish({"total_s": 12.0})
    assert demo.build_state(db)["state"] == "done" and not demo.needs_build(db)
    assert demo.build_state(tmp_path / "other.duckdb") is None  # a status of another database is ignored
    demo.status_path(db).write_text("{not json")
    assert demo.build_state(db) is None


def test_a_killed_build_is_seen_as_died_and_restarts(tmp_path):
    """SIGKILL leaves no chance to write anything: the status still says 'running', the lock is gone with the
    process, so the build counts as died; `--if-needed` (make run, or the Overview's restart button) builds it."""
    import signal

    data = tmp_path / "data"
    data.mkdir()
    db = data / "polbench.duckdb"
    first = _make_run_build(data)
    try:
        deadline = time.monotonic() + 60
        while demo.build_state(db) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert demo.build_state(db)["state"] == "running"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.log.close()
    state = demo.build_state(db)
    assert state["state"] == "died" and not state["done"] and demo.needs_build(db)
    second = _make_run_build(data)
    try:
        assert second.wait(timeout=120) == 0
    finally:
        second.log.close()
    state = demo.build_state(db)
    assert state["state"] == "done" and state["pid"] == second.pid and not demo.needs_build(db)
    from polcore.store import PredictionStore, queries

    assert not queries.benchmark_table(PredictionStore(db, read_only=True)).empty


def test_pages_on_a_database_with_scans_but_no_benchmark_yet(tmp_path, monkeypatch):
    """What every page meets while the build runs: a scan stored with its runs, no benchmark, held-out rows,
    embeddings or demo summary yet (one real ingest with the shipped PCA+kNN model)."""
    from streamlit.testing.v1 import AppTest

    from polcore.ingest import available_models, ingest_scan, load_models
    from polcore.settings import shipped_models_dir
    from polcore.store import PredictionStore, queries

    data = tmp_path / "data"
    rng = np.random.default_rng(3)
    labels = make_labels(16, 16, rng)
    path = write_scan(data / "scans" / "first.h5", labels, np.full((16, 16), 20.0, np.float32),
                      np.zeros((16, 16), bool), rng)
    db = data / "polbench.duckdb"
    pca = available_models(shipped_models_dir())["pca_knn-cls-s888"]
    ingest_scan(path, None, db, name="first", kind="synthetic", dataset="synthetic 20 nm",
                models=load_models([pca]))
    store = PredictionStore(db, read_only=True)
    assert queries.benchmark_table(store).empty and len(queries.list_runs(store))
    for k, v in _env(data).items():
        monkeypatch.setenv(k, v)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    problems = [e.value for e in at.exception] + [str(e.value) for e in at.error]
    assert not problems, problems
    assert any("No benchmark rows yet" in i.value for i in at.info)
    for page in ("pages/1_Benchmark.py", "pages/2_Confusion.py", "pages/3_Error_maps.py", "pages/4_Embeddings.py",
                 "pages/5_Defects.py", "pages/6_Upload.py"):
        at.switch_page(page).run()
        problems = [e.value for e in at.exception] + [str(e.value) for e in at.error]
        assert not problems, (page, problems)


# ---------------------------------------------------------------------------------------------- browser


@pytest.mark.browser
def test_first_run_shows_the_build_then_the_benchmark(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    data = tmp_path / "data"
    data.mkdir()
    db = data / "polbench.duckdb"
    with StreamlitServer(_env(data)) as srv, playwright_api.sync_playwright() as p:
        browser = launch_chromium(p)
        a = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
        open_page(a, srv.url, "overview")
        a.get_by_role("button", name="Build the demo database").wait_for(timeout=30000)
        assert not page_problems(a)

        build = _make_run_build(data)  # make run: the build beside the dashboard
        try:
            progress = a.get_by_text(PROGRESS)
            progress.first.wait_for(timeout=30000)
            assert a.get_by_text("Building the demo database").count() >= 1
            pid = json.loads(demo.status_path(db).read_text())["pid"]
            assert pid == build.pid

            # a second session sees the same build and is offered no second one; a second start leaves at once
            b = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
            open_page(b, srv.url, "overview")
            assert b.get_by_role("button", name="Build the demo database").count() == 0
            again = demo.start_build_process(db, scans="tiny")  # what the Overview's button runs
            assert again.wait(timeout=60) == 0

            # no reload: the fragment reruns the page at each step; when the build ends the progress goes and
            # the benchmark (the headline chart, only drawn from benchmark rows) and the build summary come
            assert build.wait(timeout=180) == 0
            progress.first.wait_for(state="detached", timeout=20000)
            built = a.get_by_text(re.compile(r"^Demo database built in \d+ s"))
            built.first.wait_for(timeout=20000)
            a.locator('[data-testid="stPlotlyChart"] .main-svg').first.wait_for(timeout=30000)
        finally:
            if build.poll() is None:
                build.kill()
                build.wait()
            build.log.close()
        wait_idle(a)
        assert built.count() == 1  # (while the page reruns, the old element may linger a moment)
        status = json.loads(demo.status_path(db).read_text())
        assert status["done"] and status["pid"] == pid and status["error"] is None
        assert a.get_by_text("Building the demo database").count() == 0
        assert not page_problems(a) and not page_problems(b)
        log = demo.log_path(db).read_text()
        built = [line for line in log.splitlines() if line.startswith("demo database ") and "ready in" in line]
        assert len(built) == 1 and "already running" in log, log[-2000:]

        open_page(b, srv.url, "benchmark")
        from polcore.train import SHIPPED_MODELS

        b.get_by_text(f"Provenance of the {len(SHIPPED_MODELS)} shipped models").wait_for(timeout=30000)
        assert not page_problems(b)
        browser.close()

"""Progressive maps during an ingest, and a cancel mid-way (issue 15, item 3).

No browser: a real :class:`ui.jobs.JobRegistry` runs the Upload page's work function (``ui.backend.ingest_scan``)
in its background thread on a real 24 x 24 HDF5 scan (three batches of 256) with real PCA+kNN checkpoints,
filling a real :class:`polcore.ingest.LiveMap` that the test reads from its own thread, as the page's fragment
does. To see the map *between* batches, the test subclasses the map so that it records a snapshot after each
batch; to cancel exactly mid-way, the subclass presses Cancel (``JobRegistry.cancel``) after the first batch, as
the page's button does, and the ingest stops at its next progress call.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from app_fixtures import MRAD_PER_PX, disc_patterns, write_checkpoint, write_plain_scan

from polcore import settings
from polcore.ingest import LiveMap, ingest_scan
from polcore.io import sha256_file
from polcore.store import PredictionStore, queries

N = 24  # 576 positions: batches of 256, 256, 64
MODELS = ["pca_knn-cls-s1", "pca_knn-cls-s0"]  # s1 first: its map is the one shown


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two checkpoints (s1 fitted on other patterns), the scan, and a store holding another scan already."""
    from polcore.models import build_model, save_checkpoint
    from polcore.preprocess import Preprocessor

    root = tmp_path_factory.mktemp("progressive")
    models = root / "models"
    write_checkpoint(models, np.random.default_rng(5))
    # s1: a real PCA+kNN fitted with every label turned by 45 deg, so that its map differs from s0's everywhere
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(8), 40).astype(np.int8)
    pats = disc_patterns(labels, rng)
    pre = Preprocessor(target_mrad_per_px=0.5, convergence_mrad=6.0).fit_mean(pats.mean(axis=0), MRAD_PER_PX)
    s1 = build_model("pca_knn", "cls", n_components=8, n_neighbors=3).fit(pre.transform(pats), (labels + 1) % 8)
    save_checkpoint(s1, models / "pca_knn-cls-s1", meta={"preprocessing": pre.unfitted_copy().to_dict(),
                                                          "train_config": {"seed": 1}, "seed": 1})
    scan = write_plain_scan(root / "scans" / "live.h5", N, N, seed=3)
    first = write_plain_scan(root / "scans" / "first.h5", 10, 10, seed=4)
    base = root / "base.duckdb"
    ingest_scan(first, ["pca_knn-cls-s0"], base, kind="synthetic", model_dir=models)
    return dict(root=root, models=models, scan=scan, base=base)


@pytest.fixture
def store(env, tmp_path, monkeypatch):
    """A private copy of the base store; the dashboard's model folder points at the test checkpoints."""
    import shutil

    db = tmp_path / "db.duckdb"
    shutil.copy2(env["base"], db)
    shutil.copytree(settings.features_dir(env["base"]), settings.features_dir(db))
    monkeypatch.setenv("POLBENCH_MODELS", str(env["models"]))
    return db


def _registry():
    from ui.jobs import JobRegistry

    return JobRegistry(max_running={"ingest": 1}, max_queued={"ingest": 3})


def _wait(cond, timeout: float = 120.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _tables(db: Path) -> dict[str, list]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in names
                if t != "id_counters"}
    finally:
        con.close()


def _files(db: Path) -> set[str]:
    d = settings.features_dir(db)
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


class RecordingMap(LiveMap):
    """The page's map, plus a snapshot after every batch (what a poll at that moment would see)."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[dict] = []

    def update(self, flat, preds):
        super().update(flat, preds)
        self.seen.append(self.snapshot())


def test_the_map_fills_in_batch_by_batch_and_ends_as_the_stored_map(env, store):
    from ui.backend import ingest_scan as page_ingest

    reg = _registry()
    live = RecordingMap(MODELS[0])
    job = reg.start("ingest", "live", page_ingest, env["scan"], MODELS, store, kind="synthetic", live=live)
    job.live = live
    polls = []
    while job.status in ("queued", "running"):  # the page's fragment, polling from another thread
        snap = job.live.snapshot()
        if snap is not None:
            polls.append(snap)
        time.sleep(0.02)
    assert job.status == "done", job.error
    s = PredictionStore(store, read_only=True)
    runs = queries.list_runs(s)
    mine = runs[(runs["scan_id"] == job.result) & (runs["layer"] == "pattern")].set_index("model")
    stored = {m: queries.run_grids(s, int(mine.loc[m, "run_id"]))["pred"] for m in MODELS}
    assert not np.array_equal(stored[MODELS[0]], stored[MODELS[1]]), "the two models must differ for this test"

    seen = live.seen
    assert [x["done"] for x in seen] == [256, 512, 576]
    assert all(x["model"] == MODELS[0] and x["total"] == N * N for x in seen)
    for x in seen:
        filled = x["pred"] >= 0
        assert filled.sum() == x["done"]  # the rest is -1: not predicted yet
        np.testing.assert_array_equal(x["pred"][filled], stored[MODELS[0]][filled])
        assert x["rate"] is not None and x["rate"] > 0 and x["eta_s"] is not None
    assert seen[0]["eta_s"] > 0 and seen[-1]["eta_s"] == 0
    np.testing.assert_array_equal(seen[-1]["pred"], stored[MODELS[0]])  # the map shown last is the stored one
    assert polls, "the polling thread saw the map while the job ran"
    for p in polls:  # whatever a poll saw was consistent: a prefix of the final map
        filled = p["pred"] >= 0
        assert filled.sum() == p["done"]
        np.testing.assert_array_equal(p["pred"][filled], stored[MODELS[0]][filled])


def test_cancel_mid_way_leaves_nothing_in_the_store(env, store):
    from ui.backend import ingest_scan as page_ingest

    reg = _registry()
    before, before_files = _tables(store), _files(store)
    ready = threading.Event()
    box: dict = {}

    class CancelAfterFirstBatch(RecordingMap):
        def update(self, flat, preds):
            super().update(flat, preds)
            if len(self.seen) == 1:  # the user presses Cancel while the map is a third filled
                assert ready.wait(30)
                reg.cancel(box["job"].job_id)

    live = CancelAfterFirstBatch(MODELS[0])
    job = reg.start("ingest", "cancel me", page_ingest, env["scan"], MODELS, store, kind="synthetic", live=live)
    job.live, box["job"] = live, job
    ready.set()
    assert _wait(lambda: job.status not in ("queued", "running"))
    assert job.status == "cancelled" and job.error is None and job.result is None
    assert [x["done"] for x in live.seen] == [256], "the pass stopped at the first progress call after the cancel"
    # the store is exactly as before: no scan row, no run, no model row, no feature or temporary file
    assert _tables(store) == before
    assert _files(store) == before_files
    s = PredictionStore(store, read_only=True)
    assert queries.scan_by_sha256(s, sha256_file(env["scan"])) is None
    # and the same scan ingests normally afterwards
    done = reg.start("ingest", "again", page_ingest, env["scan"], MODELS, store, kind="synthetic")
    assert _wait(lambda: done.status not in ("queued", "running")) and done.status == "done", done.error


def test_live_map_shows_the_wanted_model_and_its_rate():
    """The map of the wanted model (not the first that runs), positions in raster order, the rate over a window."""
    live = LiveMap("b", window_s=60.0)
    assert live.snapshot() is None  # before the pass starts
    live.begin((2, 3), ["a", "b"])
    snap = live.snapshot()
    assert snap["pred"].shape == (2, 3) and (snap["pred"] == -1).all() and snap["rate"] is None and snap["eta_s"] is None
    live.update(np.array([5, 0]), [np.array([1, 1], np.int8), np.array([7, 2], np.int8)])
    time.sleep(0.05)
    snap = live.snapshot()
    assert snap["model"] == "b" and snap["done"] == 2 and snap["total"] == 6
    np.testing.assert_array_equal(snap["pred"], [[2, -1, -1], [-1, -1, 7]])
    assert 0 < snap["rate"] < 2 / 0.05 + 1e-9 and snap["eta_s"] == pytest.approx(4 / snap["rate"])
    snap["pred"][0, 0] = 5  # a copy: the page cannot change the map
    assert live.snapshot()["pred"][0, 0] == 2
    live.begin((1, 2), ["a"])  # the wanted model does not run (already stored): the first that runs is shown
    live.update(np.array([0, 1]), [np.array([3, 4], np.int8)])
    snap = live.snapshot()
    assert snap["model"] == "a" and snap["pred"].tolist() == [[3, 4]] and snap["eta_s"] == 0

"""PredictionStore: schema, idempotent writes, atomic runs, lock retry across processes and threads.

Every test uses a real DuckDB file in a tmp dir; the cross-process tests start small Python subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from polcore.io import sha256_file
from polcore.store import (
    PredictionStore,
    StoreBusyError,
    StoreError,
    StoreNotFoundError,
    queries,
)
from polcore.store.schema import SCHEMA_VERSION, TABLES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SHA_A = "a" * 64
SHA_B = "b" * 64


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _snapshot(path: Path) -> dict[str, pd.DataFrame]:
    """Every table's full content, in a canonical row order."""
    out = {}
    con = duckdb.connect(str(path), read_only=True)
    try:
        for t in TABLES:
            df = con.execute(f"SELECT * FROM {t}").df()
            df = df.map(lambda v: tuple(v) if isinstance(v, np.ndarray) else v)
            out[t] = df.sort_values(list(df.columns)[:3]).reset_index(drop=True)
    finally:
        con.close()
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for t in a:
        pd.testing.assert_frame_equal(a[t], b[t], obj=t)


def _preds(rng, ny=3, nx=4, label_offset=0):
    probs = rng.random((ny, nx, 8)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    return {
        "pred": probs.argmax(-1),
        "probs": probs,
        "true_label": (probs.argmax(-1) + label_offset) % 8,
        "thickness_nm": np.full((ny, nx), 20.0),
    }


@pytest.fixture
def store(tmp_path):
    return PredictionStore(tmp_path / "db" / "p.duckdb")


@pytest.fixture
def scan_model(store):
    sid = store.add_scan(
        name="s", kind="synthetic", sha256=SHA_A, ny=3, nx=4, dataset="syn", has_ground_truth=True
    )
    mid = store.add_model(name="resnet-cls-0", family="resnet", head="cls", seed=0)
    return sid, mid


def test_store_imports_neither_torch_nor_streamlit():
    code = """
        import sys
        import polcore.store, polcore.store.queries
        print(sorted(m for m in ("torch", "streamlit", "torchvision", "umap") if m in sys.modules))
    """
    p = _python(code)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.strip() == "[]"


def test_schema_is_idempotent_and_versioned(tmp_path):
    path = tmp_path / "p.duckdb"
    s1 = PredictionStore(path)
    sid = s1.add_scan(name="s", kind="synthetic", sha256=SHA_A, ny=2, nx=2)
    s2 = PredictionStore(path)  # second open: schema statements run again, data stays
    assert s2.counts()["schema_version"] == 1
    assert s2.counts()["scans"] == 1
    assert queries.list_scans(PredictionStore(path, read_only=True))["scan_id"].tolist() == [sid]
    con = duckdb.connect(str(path))
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    con.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(StoreError, match="newer polbench"):
        PredictionStore(path)
    ro = PredictionStore(path, read_only=True)
    assert ro.exists()  # it is a store, just not one this version reads
    with pytest.raises(StoreError, match="newer polbench"):
        queries.list_scans(ro)


def test_read_only_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "missing.duckdb"
    ro = PredictionStore(path, read_only=True)
    assert not ro.exists()
    with pytest.raises(StoreNotFoundError, match="no prediction store at"):
        queries.list_scans(ro)
    with pytest.raises(FileNotFoundError):
        ro.has_run(1, 1)
    assert not path.exists()  # read-only access never creates the file
    with pytest.raises(StoreError, match="read-only"):
        ro.add_model(name="m", family="f", head="cls")


def test_exists_rejects_a_foreign_duckdb_file(tmp_path):
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    ro = PredictionStore(path, read_only=True)
    assert not ro.exists()
    with pytest.raises(StoreError, match="not a polbench prediction store"):
        queries.list_runs(ro)
    assert PredictionStore(tmp_path / "new.duckdb").exists()


def test_errors_carry_the_sql(store):
    with pytest.raises(StoreError) as info:
        with store.connect() as con:
            con.df("SELECT no_such_column FROM scans WHERE scan_id = ?", [1])
    assert "no_such_column" in info.value.sql
    assert "in SQL: SELECT no_such_column" in str(info.value)


def test_add_scan_and_model_are_idempotent(store, tmp_path):
    f = tmp_path / "scan.bin"
    f.write_bytes(b"4D-STEM" * 1000)
    sha = sha256_file(f)
    sid = store.add_scan(
        name="s", kind="experimental", sha256=sha, ny=5, nx=6, source_file=f, meta={"a": np.int64(3)}
    )
    assert store.add_scan(name="renamed", kind="synthetic", sha256=sha.upper(), ny=5, nx=6) == sid
    assert store.add_scan(name="other", kind="synthetic", sha256=SHA_B, ny=1, nx=1) == sid + 1
    m = store.add_model(name="vgg-cls-0", family="vgg", head="cls", config={"lr": 0.1})
    assert store.add_model(name="vgg-cls-0", family="vgg", head="reg") == m
    counts = store.counts()
    assert (counts["scans"], counts["models"]) == (2, 1)
    scans = queries.list_scans(store)
    assert scans.loc[0, "name"] == "s" and scans.loc[0, "meta_json"] == '{"a": 3}'
    with pytest.raises(ValueError, match="pseudo_experimental"):
        store.add_scan(name="x", kind="simulated", sha256=SHA_B, ny=1, nx=1)
    with pytest.raises(ValueError, match="64 hex"):
        store.add_scan(name="x", kind="synthetic", sha256="/data/scan.h5", ny=1, nx=1)
    with pytest.raises(ValueError, match="ny must be a positive integer"):
        store.add_scan(name="x", kind="synthetic", sha256="c" * 64, ny=0, nx=1)


def test_duplicate_run_is_not_duplicated_and_replace_rewrites(store, scan_model, rng):
    sid, mid = scan_model
    assert not store.has_run(mid, sid)
    p1 = _preds(rng)
    rid = store.write_run(mid, sid, p1, seconds=0.5, device="cpu", config={"batch_size": 4})
    assert store.has_run(mid, sid) and store.find_run(mid, sid) == rid
    again = store.write_run(mid, sid, _preds(rng), seconds=0.1, device="cpu")
    assert again == rid
    assert store.counts()["predictions"] == 12 and store.counts()["runs"] == 1
    stored = queries.run_map(store, rid)
    np.testing.assert_array_equal(stored["pred"].to_numpy(), p1["pred"].ravel())  # first write kept
    p2 = _preds(rng)
    new = store.write_run(mid, sid, p2, seconds=0.2, device="cuda:0", replace=True)
    assert new != rid
    assert store.counts()["predictions"] == 12 and store.counts()["runs"] == 1
    np.testing.assert_array_equal(queries.run_map(store, new)["pred"].to_numpy(), p2["pred"].ravel())
    run = queries.list_runs(store).iloc[0]
    assert (
        run["device"] == "cuda:0" and run["n_patterns"] == 12 and run["patterns_per_s"] == pytest.approx(60.0)
    )


def test_dataframe_input_is_sorted_and_matches_map_input(store, scan_model, rng, tmp_path):
    sid, mid = scan_model
    p = _preds(rng)
    iy, ix = np.indices((3, 4))
    df = pd.DataFrame(
        {
            "iy": iy.ravel(),
            "ix": ix.ravel(),
            "pred": p["pred"].ravel(),
            "probs": list(p["probs"].reshape(-1, 8)),
            "true_label": np.where(np.arange(12) == 5, np.nan, p["true_label"].ravel()),
            "region": [1.0, np.nan] * 6,
            "is_defect": [True, False, None] * 4,
        }
    ).sample(frac=1.0, random_state=3)
    mid2 = store.add_model(name="m2", family="vgg", head="cls")
    r_df = store.write_run(mid2, sid, df, seconds=1.0, device="cpu")
    r_map = store.write_run(mid, sid, p, seconds=1.0, device="cpu")
    a = queries.run_map(store, r_df)
    b = queries.run_map(store, r_map)
    np.testing.assert_array_equal(a["pred"], b["pred"])
    np.testing.assert_allclose(np.stack(a["probs"]), np.stack(b["probs"]))
    np.testing.assert_allclose(a["confidence"], p["probs"].max(-1).ravel())
    assert a["true_label"].iloc[5] == -1 and a["true_label"].iloc[4] == b["true_label"].iloc[4]
    assert a["region"].isna().sum() == 6 and a["region"].iloc[0] == 1
    assert a["is_defect"].isna().sum() == 4 and bool(a["is_defect"].iloc[0]) is True
    # physical order of the rows is (run, iy, ix): what keeps per-run queries fast
    con = duckdb.connect(str(store.path), read_only=True)
    rows = con.execute("SELECT run_id, iy, ix FROM predictions").fetchall()
    con.close()
    assert rows == sorted(rows)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"pred": np.full((3, 4), 8)}, "pred must lie in 0..7"),
        ({"bogus": np.zeros((3, 4))}, "unknown prediction columns"),
        ({"probs": np.ones((3, 4, 7))}, "expected \\(3, 4, 8\\)"),
        ({"probs": np.full((3, 4, 8), np.nan)}, "probs must be finite"),
        ({"true_label": np.full((3, 4), 9)}, "true_label must lie in -1..7"),
    ],
)
def test_write_run_rejects_bad_input_and_writes_nothing(store, scan_model, rng, change, match):
    sid, mid = scan_model
    before = store.counts()
    with pytest.raises(ValueError, match=match):
        store.write_run(mid, sid, {**_preds(rng), **change}, seconds=1.0, device="cpu")
    assert store.counts() == before


def test_write_run_checks_positions_and_ids(store, scan_model, rng):
    sid, mid = scan_model
    dup = pd.DataFrame({"iy": [0, 0], "ix": [1, 1], "pred": [0, 1]})
    with pytest.raises(ValueError, match="duplicate position \\(iy=0, ix=1\\)"):
        store.write_run(mid, sid, dup, seconds=1.0, device="cpu")
    with pytest.raises(ValueError, match="out of the scan's 3x4 grid"):
        store.write_run(
            mid, sid, pd.DataFrame({"iy": [3], "ix": [0], "pred": [0]}), seconds=1.0, device="cpu"
        )
    with pytest.raises(ValueError, match="unknown scan_id 99"):
        store.write_run(mid, 99, _preds(rng), seconds=1.0, device="cpu")
    with pytest.raises(ValueError, match="unknown model_id 99"):
        store.write_run(99, sid, _preds(rng), seconds=1.0, device="cpu")
    with pytest.raises(ValueError, match="predictions are empty"):
        store.write_run(mid, sid, pd.DataFrame({"iy": [], "ix": [], "pred": []}), seconds=1.0, device="cpu")
    assert store.counts()["runs"] == 0


def test_exception_inside_the_run_transaction_leaves_store_as_before(store, scan_model, rng, monkeypatch):
    sid, mid = scan_model
    other = store.add_model(name="other", family="vgg", head="cls")
    store.write_run(other, sid, _preds(rng), seconds=1.0, device="cpu")
    before = _snapshot(store.path)
    seen = {}

    def crash(con, run_id, finished_at):  # replaces the last step: predictions are in, not yet finished
        seen["rows"] = con.scalar("SELECT count(*) FROM predictions WHERE run_id = ?", [run_id])
        seen["status"] = con.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id])
        raise RuntimeError("simulated crash mid-run")

    monkeypatch.setattr(store, "_finish_run", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.write_run(mid, sid, _preds(rng), seconds=1.0, device="cpu")
    assert seen == {"rows": 12, "status": "running"}
    _assert_same(before, _snapshot(store.path))
    assert not store.has_run(mid, sid)
    monkeypatch.undo()
    assert store.write_run(mid, sid, _preds(rng), seconds=1.0, device="cpu") > 0
    assert store.counts()["predictions"] == 24


def test_killed_process_mid_write_leaves_store_as_before(store, scan_model, rng):
    sid, mid = scan_model
    store.write_run(mid, sid, _preds(rng), seconds=1.0, device="cpu")
    mid2 = store.add_model(name="victim", family="vgg", head="cls")
    before = _snapshot(store.path)
    code = """
        import os, sys
        import numpy as np
        from polcore.store import PredictionStore

        class Dying(PredictionStore):
            @staticmethod
            def _finish_run(con, run_id, finished_at):
                n = con.scalar("SELECT count(*) FROM predictions WHERE run_id = ?", [run_id])
                print("inserted", n, flush=True)
                os._exit(3)  # no rollback, no close: like a kill -9

        s = Dying(sys.argv[1])
        rng = np.random.default_rng(0)
        n = 3 * 4
        pred = {"pred": rng.integers(0, 8, (3, 4))}
        s.write_run(int(sys.argv[2]), int(sys.argv[3]), pred, seconds=1, device="cpu")
    """
    p = _python(code, str(store.path), str(mid2), str(sid))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, err
    assert out.strip() == "inserted 12"
    _assert_same(before, _snapshot(store.path))
    assert not store.has_run(mid2, sid)
    rid = store.write_run(mid2, sid, _preds(rng), seconds=1.0, device="cpu")
    assert len(queries.run_map(store, rid)) == 12


def test_delete_scan_removes_only_its_rows(store, scan_model, rng):
    sid, mid = scan_model
    sid2 = store.add_scan(name="exp", kind="experimental", sha256=SHA_B, ny=3, nx=4)
    store.write_run(mid, sid, _preds(rng), seconds=1.0, device="cpu")
    keep = store.write_run(mid, sid2, _preds(rng), seconds=1.0, device="cpu")
    emb = pd.DataFrame(
        {
            "model_id": mid,
            "method": "pca",
            "space": "features",
            "scan_id": [sid, sid2],
            "iy": 0,
            "ix": 0,
            "e1": [0.0, 1.0],
            "e2": [0.0, 1.0],
        }
    )
    store.write_embeddings(emb)
    store.write_domain_gap(mid, sid, sid2, auc=0.9)
    out = store.delete_scan(sid)
    assert out == {"predictions": 12, "runs": 1, "embeddings": 1, "domain_gap": 1, "scan_images": 0, "scans": 1}
    counts = store.counts()
    assert (counts["scans"], counts["runs"], counts["predictions"], counts["embeddings"]) == (1, 1, 12, 1)
    assert queries.list_runs(store)["run_id"].tolist() == [keep]
    with pytest.raises(ValueError, match="unknown scan_id"):
        store.delete_scan(sid)
    assert (
        store.add_scan(name="again", kind="synthetic", sha256=SHA_A, ny=3, nx=4) == sid2 + 1
    )  # ids not reused


def test_embeddings_sets_are_replaced_and_validated(store, scan_model):
    sid, mid = scan_model
    base = {
        "method": "umap",
        "space": "input",
        "scan_id": sid,
        "iy": [0, 1, 2],
        "ix": [0, 1, 2],
        "e1": [0.0, 1.0, 2.0],
        "e2": [2.0, 1.0, 0.0],
    }
    assert store.write_embeddings(pd.DataFrame(base)) == 3
    assert store.write_embeddings(pd.DataFrame({**base, "iy": [0, 1, 1], "ix": [0, 0, 1]})) == 3
    assert store.write_embeddings(pd.DataFrame({**base, "model_id": mid, "space": "features"})) == 3
    assert store.counts()["embeddings"] == 6  # the second input set replaced the first
    with pytest.raises(ValueError, match="need a model_id"):
        store.write_embeddings(pd.DataFrame({**base, "space": "features"}))
    with pytest.raises(ValueError, match="space must be one of"):
        store.write_embeddings(pd.DataFrame({**base, "space": "latent"}))
    with pytest.raises(ValueError, match="unknown scan_id"):
        store.write_embeddings(pd.DataFrame({**base, "scan_id": 42}))
    assert store.counts()["embeddings"] == 6


def test_bench_upsert_and_cache(store):
    rows = pd.DataFrame(
        {
            "model_name": ["a", "b"],
            "family": "resnet",
            "head": "cls",
            "dataset": "syn",
            "accuracy": [0.5, 0.6],
            "macro_f1": [0.4, 0.5],
            "n": 10,
        }
    )
    assert store.write_bench(rows) == 2
    store.write_bench(rows.assign(accuracy=[0.7, 0.8]))
    bench = store.fetch_df("SELECT model_name, accuracy FROM bench ORDER BY model_name")
    assert bench["accuracy"].tolist() == [0.7, 0.8]
    with pytest.raises(ValueError, match="unique by"):
        store.write_bench(pd.concat([rows, rows]))
    with pytest.raises(ValueError, match="lacks columns \\['n'\\]"):
        store.write_bench(rows.drop(columns="n"))
    assert store.cache_get("period/1") is None
    store.cache_put("period/1", {"period_px": np.float64(4.5), "spectrum": np.arange(3)})
    store.cache_put("period/1", {"period_px": 5.0})
    assert store.cache_get("period/1") == {"period_px": 5.0}


# ------------------------------------------------------------------------------------------- locking

_HOLDER = """
    import sys, time
    from polcore.store import PredictionStore
    mode, path, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    s = PredictionStore(path, read_only=(mode == "read"))
    with (s.connect(read_only=True) if mode == "read" else s.transaction()) as con:
        con.scalar("SELECT count(*) FROM scans")
        print("held", flush=True)
        time.sleep(hold)
"""


def _hold(store: PredictionStore, mode: str, seconds: float) -> subprocess.Popen:
    p = _python(_HOLDER, mode, str(store.path), str(seconds))
    line = p.stdout.readline().strip()
    assert line == "held", p.stderr.read()
    return p


def test_writer_waits_for_a_reader_in_another_process(store):
    p = _hold(store, "read", 1.0)
    t0 = time.monotonic()
    sid = store.add_scan(
        name="s", kind="synthetic", sha256=SHA_A, ny=2, nx=2
    )  # retries until the reader leaves
    waited = time.monotonic() - t0
    assert p.wait(timeout=30) == 0
    assert waited > 0.3
    assert queries.list_scans(store)["scan_id"].tolist() == [sid]


def test_reader_waits_for_a_writer_in_another_process_and_readers_share(store):
    store.add_scan(name="s", kind="synthetic", sha256=SHA_A, ny=2, nx=2)
    ro = PredictionStore(store.path, read_only=True)
    p = _hold(store, "write", 1.0)
    t0 = time.monotonic()
    assert len(queries.list_scans(ro)) == 1
    waited = time.monotonic() - t0
    assert p.wait(timeout=30) == 0
    assert waited > 0.3
    p = _hold(store, "read", 2.0)  # two readers in two processes: no waiting
    t0 = time.monotonic()
    assert len(queries.list_scans(ro)) == 1
    assert time.monotonic() - t0 < 1.0
    p.wait(timeout=30)


def test_busy_store_raises_store_busy_error_after_the_timeout(store):
    impatient = PredictionStore(store.path, read_only=True, lock_timeout=0.3)
    p = _hold(store, "write", 3.0)
    t0 = time.monotonic()
    with pytest.raises(StoreBusyError, match="stayed locked for 0.3 s"):
        queries.list_scans(impatient)
    assert 0.25 < time.monotonic() - t0 < 2.5
    p.kill()
    p.wait(timeout=30)


def test_threads_of_one_process_share_the_file(store, scan_model, rng):
    """A write from one thread while another holds a read connection (DuckDB forbids mixing modes)."""
    sid, mid = scan_model
    ro = PredictionStore(store.path, read_only=True)
    result = {}

    def writer():
        t0 = time.monotonic()
        result["run"] = store.write_run(mid, sid, _preds(rng), seconds=1.0, device="cpu")
        result["waited"] = time.monotonic() - t0

    with ro.connect() as con:
        assert con.scalar("SELECT count(*) FROM runs") == 0
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.4)
        assert "run" not in result  # the writer waits for this reader
    t.join(timeout=15)
    assert result["waited"] > 0.3
    assert queries.list_runs(ro)["run_id"].tolist() == [result["run"]]

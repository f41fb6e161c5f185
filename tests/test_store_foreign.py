"""The store opens only its own databases (issue 12, B), and the CLI reports every error in one line.

A DuckDB file without polbench's marker (someone else's database) is refused with a one-line StoreError
naming the file and left byte-for-byte untouched (bytes and mtime); text, truncated, empty, directory and
HDF5 paths given as the database are refused the same way, through ``PredictionStore``, through
``polcore.cli.main`` and through ``python -m polcore bench --db X`` (no traceback on stderr). A path that
does not exist is still created; read-only access never creates anything; a version-2 store (written before
the marker existed) stays readable and is migrated in place when opened for writing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
from app_fixtures import make_labels, write_scan

from polcore.store import PredictionStore, StoreError, StoreNotFoundError, queries
from polcore.store.schema import SCHEMA_VERSION, STORE_MARKER

ROOT = Path(__file__).resolve().parents[1]
BAD = ("foreign", "foreign-schema-version", "fake-marker", "empty-duckdb", "text", "truncated-header",
       "truncated-half", "empty", "directory", "hdf5")


def _polbench_store(path: Path) -> Path:
    """A small real store: one scan, one model, two runs."""
    store = PredictionStore(path)
    sid = store.add_scan(name="s", kind="synthetic", sha256="a" * 64, ny=16, nx=16, has_ground_truth=True)
    mid = store.add_model(name="resnet-cls-s0", family="resnet", head="cls", seed=0)
    rng = np.random.default_rng(0)
    for layer in ("pattern", "cell"):
        probs = rng.random((16, 16, 8)).astype(np.float32)
        store.write_run(mid, sid, {"pred": probs.argmax(-1), "probs": probs}, seconds=1.0, device="cpu",
                        layer=layer)
    store.cache_put("k", {"v": 1})
    return path


def _make_bad(kind: str, tmp: Path) -> Path:
    path = tmp / f"{kind}.duckdb"
    if kind.startswith("foreign") or kind == "fake-marker":
        con = duckdb.connect(str(path))
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR)")
        con.execute("INSERT INTO customers VALUES (1, 'ada'), (2, 'grace')")
        if kind == "foreign-schema-version":  # someone's own migration table, even at version 2
            con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
            con.execute("INSERT INTO schema_version VALUES (2, now())")
        if kind == "fake-marker":
            con.execute("CREATE TABLE polbench_store (marker VARCHAR, created_at TIMESTAMP)")
            con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
            con.execute("INSERT INTO schema_version VALUES (3, now())")
        con.close()
    elif kind == "empty-duckdb":  # a DuckDB database without any table
        duckdb.connect(str(path)).close()
        assert path.stat().st_size > 0
    elif kind == "text":
        path.write_text("scan_id,name\n1,not a database\n")
    elif kind.startswith("truncated"):
        data = _polbench_store(tmp / f"src-{kind}.duckdb").read_bytes()
        path.write_bytes(data[:100] if kind == "truncated-header" else data[: len(data) // 2])
    elif kind == "empty":
        path.touch()
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("x")
    elif kind == "hdf5":
        rng = np.random.default_rng(1)
        lab = make_labels(4, 4, rng)
        path = write_scan(tmp / "scan.h5", lab, np.full(lab.shape, 20.0, np.float32), np.zeros(lab.shape, bool),
                          rng)
    return path


def _state(path: Path) -> tuple:
    """What must not change: bytes and mtime (a directory: its listing and mtime)."""
    st = os.stat(path)
    if path.is_dir():
        return ("dir", st.st_mtime_ns, sorted(os.listdir(path)))
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("kind", BAD)
def test_a_path_that_is_not_a_polbench_store_is_refused_and_left_untouched(kind, tmp_path, capsys):
    from polcore.cli import main

    path = _make_bad(kind, tmp_path)
    before = _state(path)
    siblings = sorted(os.listdir(path.parent))
    with pytest.raises(StoreError) as info:
        PredictionStore(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    ro = PredictionStore(path, read_only=True)
    assert not ro.exists()
    with pytest.raises(StoreError) as info:
        queries.list_scans(ro)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert main(["bench", "--db", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(path) in err, err
    assert "Traceback" not in err
    assert _state(path) == before  # bytes and mtime: untouched
    assert sorted(os.listdir(path.parent)) == siblings  # no WAL, no temporary file beside it


@pytest.mark.parametrize("kind", ["foreign", "text", "truncated-half", "empty", "directory", "hdf5"])
def test_cli_subprocess_prints_one_line_and_no_traceback(kind, tmp_path):
    path = _make_bad(kind, tmp_path)
    before = _state(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POLBENCH_DATA": str(tmp_path / "data")}
    env.pop("POLBENCH_DB", None)
    p = subprocess.run([sys.executable, "-m", "polcore", "bench", "--db", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], p.stderr
    assert _state(path) == before


def test_ingest_into_a_foreign_database_changes_nothing(tmp_path, capsys):
    from app_fixtures import write_checkpoint

    from polcore.cli import main

    rng = np.random.default_rng(2)
    write_checkpoint(tmp_path / "models", rng)
    lab = make_labels(6, 6, rng)
    scan = write_scan(tmp_path / "s.h5", lab, np.full(lab.shape, 20.0, np.float32), np.zeros(lab.shape, bool), rng)
    path = _make_bad("foreign", tmp_path)
    before = _state(path)
    rc = main(["ingest", str(scan), "--db", str(path), "--model-dir", str(tmp_path / "models"), "--kind",
               "synthetic"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "not a polbench prediction store" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert _state(path) == before
    assert not (tmp_path / "foreign_features").exists()


def test_a_new_path_is_created_and_read_only_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "p.duckdb"
    ro = PredictionStore(missing, read_only=True)
    assert not ro.exists()
    with pytest.raises(StoreNotFoundError):
        queries.list_scans(ro)
    assert not missing.parent.exists()  # neither the file nor its folder
    store = PredictionStore(missing)
    assert store.exists() and PredictionStore(missing, read_only=True).exists()
    con = duckdb.connect(str(missing), read_only=True)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert con.execute("SELECT marker FROM polbench_store").fetchall() == [(STORE_MARKER,)]
    con.close()
    assert sorted(os.listdir(missing.parent)) == ["p.duckdb"]  # no temporary file left


def test_concurrent_creation_makes_one_store(tmp_path):
    path = tmp_path / "new.duckdb"
    errors, barrier = [], threading.Barrier(4)

    def make():
        try:
            barrier.wait()
            PredictionStore(path).add_model(name="m", family="f", head="cls")
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counts = PredictionStore(path).counts()
    assert (counts["schema_version"], counts["polbench_store"], counts["models"]) == (1, 1, 1)
    assert sorted(os.listdir(tmp_path)) == ["new.duckdb"]


def _downgrade_to_v2(path: Path) -> None:
    """Turn a store into the layout polbench wrote before schema version 3 (no marker, no owner columns)."""
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE scans DROP COLUMN owner")
    con.execute("ALTER TABLE scans DROP COLUMN heartbeat_at")
    con.execute("DROP TABLE polbench_store")
    con.execute("DELETE FROM schema_version")
    con.execute("INSERT INTO schema_version VALUES (2, now())")
    con.close()


def test_a_version_2_store_stays_readable_and_is_migrated_in_place(tmp_path):
    path = _polbench_store(tmp_path / "v2.duckdb")
    _downgrade_to_v2(path)
    before = _state(path)
    ro = PredictionStore(path, read_only=True)
    assert ro.exists()
    assert len(queries.list_scans(ro)) == 1 and len(queries.list_runs(ro)) == 2
    assert _state(path) == before  # reading does not migrate
    store = PredictionStore(path)  # writing does: ALTER TABLE ADD COLUMN, the marker, version 3
    con = duckdb.connect(str(path), read_only=True)
    cols = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'scans'")
            .fetchall()}
    versions = sorted(r[0] for r in con.execute("SELECT version FROM schema_version").fetchall())
    marker = con.execute("SELECT marker FROM polbench_store").fetchall()
    con.close()
    assert {"owner", "heartbeat_at"} <= cols
    assert versions == [2, SCHEMA_VERSION] and marker == [(STORE_MARKER,)]
    assert len(queries.list_runs(store)) == 2 and store.cache_get("k") == {"v": 1}
    PredictionStore(path)  # idempotent
    assert PredictionStore(path).counts()["schema_version"] == 2


# ------------------------------------------------------------------------------------------ CLI errors


def test_cli_unexpected_error_interrupt_and_verbose(monkeypatch, capsys, tmp_path):
    import polcore.cli as cli

    monkeypatch.setenv("POLBENCH_DB", str(tmp_path / "p.duckdb"))

    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "_cmd_analyze", boom)
    assert cli.main(["analyze"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unexpected error: RuntimeError: boom second line (run with -v for the traceback)"]
    assert cli.main(["-v", "analyze"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("unexpected error: RuntimeError")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_analyze", interrupted)
    assert cli.main(["analyze"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"

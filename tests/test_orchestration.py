"""The glue between the library and the app: ingest (one pass, rollback), the CLI, settings, the demo steps."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from app_fixtures import (
    DET,
    MRAD_PER_PX,
    STEP_NM,
    disc_patterns,
    make_labels,
    write_checkpoint,
    write_plain_scan,
    write_scan,
)


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A data directory with one real PCA+kNN checkpoint and one small scan with ground truth."""
    data = tmp_path / "data"
    monkeypatch.setenv("POLBENCH_DATA", str(data))
    monkeypatch.delenv("POLBENCH_DB", raising=False)
    monkeypatch.delenv("POLBENCH_MODELS", raising=False)
    rng = np.random.default_rng(11)
    write_checkpoint(data / "models", rng)
    lab = make_labels(12, 12, rng)
    scan = write_scan(data / "scans" / "small.h5", lab, np.full(lab.shape, 20.0, np.float32),
                      np.zeros(lab.shape, bool), rng)
    return data, scan


def _snapshot(db) -> dict:
    """Every table's rows (sorted), to compare a database before and after. ``id_counters`` is left out: like
    a sequence, it only ever grows, so that an id is never given twice."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in tables
                if t != "id_counters"}
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------ settings


def test_settings_are_read_at_call_time(tmp_path, monkeypatch):
    from polcore import settings

    monkeypatch.setenv("POLBENCH_DATA", str(tmp_path / "d1"))
    monkeypatch.delenv("POLBENCH_DB", raising=False)
    assert settings.db_path() == (tmp_path / "d1" / "polbench.duckdb").resolve()
    assert settings.models_dir() == (tmp_path / "d1" / "models").resolve()
    monkeypatch.setenv("POLBENCH_DB", str(tmp_path / "other.duckdb"))
    assert settings.db_path() == (tmp_path / "other.duckdb").resolve()
    assert settings.features_dir() == (tmp_path / "other_features").resolve()
    from ui import paths

    assert paths.db_path() == settings.db_path() and paths.data_dir() == settings.data_dir()


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_ingest_bench_analyze_follow_the_environment(env, monkeypatch, capsys):
    """``POLBENCH_DB=… python -m polcore ingest`` writes where the dashboard reads (the database of the
    environment), and bench / analyze read it back."""
    from polcore.cli import main
    from polcore.store import PredictionStore, queries

    data, scan = env
    db = data.parent / "elsewhere.duckdb"
    monkeypatch.setenv("POLBENCH_DB", str(db))
    assert main(["ingest", str(scan), "--kind", "synthetic", "--name", "small"]) == 0
    assert db.is_file() and not (data / "polbench.duckdb").exists()
    runs = queries.list_runs(PredictionStore(db))
    assert set(runs["model"]) == {"pca_knn-cls-s0"} and set(runs["layer"]) == {"pattern", "cell"}
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "small" in out and "pca_knn" in out
    assert main(["analyze"]) == 0
    assert "pca_knn-cls-s0" in capsys.readouterr().out
    assert main(["ingest", str(data / "missing.h5")]) == 2  # a clear error, no traceback


# ------------------------------------------------------------------------------------------------- ingest


def test_ingest_loads_only_the_chosen_checkpoints(env, monkeypatch):
    from polcore import ingest
    from polcore.models import load_checkpoint

    data, scan = env
    (data / "models" / "broken.npz").write_bytes(b"not a checkpoint")  # listed by nothing, loaded by nothing
    loaded = []

    def counting(path, device=None):
        loaded.append(Path(path).name)
        return load_checkpoint(path, device)

    monkeypatch.setattr("polcore.models.load_checkpoint", counting)
    write_checkpoint(data / "models" / "second", np.random.default_rng(3))  # same name, other folder
    ingest.ingest_scan(scan, ["pca_knn-cls-s0"], data / "db.duckdb", kind="synthetic")
    assert loaded == ["pca_knn-cls-s0.npz"]


def test_failed_ingest_leaves_the_database_exactly_as_it_was(env):
    """A failure after the scan row and a NEW model row were written removes both, and every run."""
    from polcore.ingest import ingest_scan
    from polcore.store import PredictionStore, queries

    data, scan = env
    db = data / "db.duckdb"
    other = write_plain_scan(data / "scans" / "other.h5", 10, 10, thickness_nm=35.0, seed=5)
    ingest_scan(other, None, db, kind="synthetic")  # the store is not empty
    # a second model under another name: copy the checkpoint with another seed in its metadata
    import json

    src = data / "models" / "pca_knn-cls-s0.npz"
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta_json"]))
    meta["train_config"] = {"seed": 1}
    meta["seed"] = 1
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez(data / "models" / "pca_knn-cls-s1.npz", **arrays)
    if src.with_suffix(".json").is_file():
        (data / "models" / "pca_knn-cls-s1.json").write_text(json.dumps(meta))
    before = _snapshot(db)
    seen = []

    def fail_late(fraction, message):
        seen.append(fraction)
        if fraction >= 0.95:  # after the first model's runs were stored
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        ingest_scan(scan, ["pca_knn-cls-s0", "pca_knn-cls-s1"], db, kind="synthetic", progress=fail_late)
    assert max(seen) >= 0.95
    assert _snapshot(db) == before
    assert "pca_knn-cls-s1" not in set(queries.list_models(PredictionStore(db))["name"])


def test_scan_status_goes_from_ingesting_to_ready(env):
    from polcore.ingest import ingest_scan
    from polcore.store import PredictionStore, queries

    data, scan = env
    db = data / "db.duckdb"
    statuses = []

    def watch(fraction, message):
        if fraction > 0.5 and not statuses:
            store = PredictionStore(db, read_only=True)
            statuses.append(queries.list_scans(store, status=None)["status"].tolist())
            statuses.append(len(queries.list_scans(store)))  # the pages never list an ingesting scan

    sid = ingest_scan(scan, None, db, kind="synthetic", progress=watch)
    assert statuses == [["ingesting"], 0]
    assert PredictionStore(db).scan_status(sid) == "ready"


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _big_scan(path: Path, ny: int, nx: int, det: int) -> Path:
    """An EMD 1.0 scan of (ny, nx) uint16 patterns of det x det px, written row by row."""
    rng = np.random.default_rng(0)
    lab = make_labels(ny, 1, rng)[:, 0]
    base = disc_patterns(np.arange(8), rng, det=det, radius=det / 5.3)
    with h5py.File(path, "w") as f:
        f.attrs.update(emd_group_type="file", version_major=1, version_minor=0)
        root = f.create_group("polbench_root")
        root.attrs.update(emd_group_type="root")
        dc = root.create_group("datacube")
        dc.attrs.update(emd_group_type="array")
        ds = dc.create_dataset("data", shape=(ny, nx, det, det), dtype=np.uint16, chunks=(1, nx, det, det))
        for iy in range(ny):
            row = np.repeat(base[lab[iy] % 8][None], nx, axis=0) * 1000
            ds[iy] = (row + rng.poisson(2.0, row.shape)).astype(np.uint16)
        for i, (name, size, units) in enumerate([("Rx", STEP_NM, "nm"), ("Ry", STEP_NM, "nm"),
                                                 ("Qx", MRAD_PER_PX * DET / det, "mrad"),
                                                 ("Qy", MRAD_PER_PX * DET / det, "mrad")]):
            n = (ny, nx, det, det)[i]
            d = dc.create_dataset(f"dim{i + 1}", data=np.arange(n) * size)
            d.attrs.update(name=name, units=units)
    return path


def _upload_reads(tmp: Path, data: Path, ny: int, nx: int, det: int) -> tuple[int, int]:
    """(file size, bytes this process read during the ingest) for one upload of a scan of that size."""
    from ui.backend import ingest_scan, save_upload

    src = _big_scan(tmp / "scan.h5", ny, nx, det)
    with open(src, "rb") as fh:  # the browser's bytes (Streamlit holds them in memory)
        saved = save_upload(fh, "scan.h5", "upload-1", data / "uploads")
    from polcore.ingest import available_models, load_models

    load_models(available_models(data / "models").values())  # imports and first load outside the count
    before = _rchar()
    ingest_scan(saved, ["pca_knn-cls-s0"], data / "db.duckdb", kind="experimental")
    return saved.stat().st_size, _rchar() - before


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io (read-byte counter)")
def test_one_upload_is_read_once(env, tmp_path):
    """An upload is hashed while it is saved and read once by the ingest (preprocessing fit and inference
    share the pass): the bytes this process reads during the ingest stay within 1.15x the file size."""
    data, _ = env
    size, read = _upload_reads(tmp_path, data, 96, 96, 64)  # 75 MB
    ck = sum(p.stat().st_size for p in (data / "models").rglob("*") if p.is_file())
    assert size > 70e6
    assert read < 1.15 * size + ck, (size, read)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io (read-byte counter)")
def test_one_upload_of_2gb_is_read_once(env, tmp_path):
    data, _ = env
    size, read = _upload_reads(tmp_path, data, 128, 128, 256)  # 2.1 GB
    ck = sum(p.stat().st_size for p in (data / "models").rglob("*") if p.is_file())
    print(f"2 GB upload: file {size / 1e9:.3f} GB, read during ingest {read / 1e9:.3f} GB ({read / size:.3f}x)")
    assert size > 2e9
    assert read < 1.15 * size + ck, (size, read)


# --------------------------------------------------------------------------------------------------- demo


def test_demo_steps_on_a_tiny_table(tiny_library, tmp_path, monkeypatch):
    """The demo's steps (compose, ingest every scan with every model, benchmark, held-out rows, embeddings)
    on a tiny library and one small scan."""
    from polcore.demo import build_demo
    from polcore.simulate.composer import ScanComposerConfig
    from polcore.store import PredictionStore, queries
    from polcore.train import TrainConfig, train_model

    monkeypatch.setenv("POLBENCH_DATA", str(tmp_path / "data"))
    models = tmp_path / "models"
    train_model(TrainConfig(family="pca_knn", train_thickness_nm=None, augment=False, seed=3), tiny_library,
                out_dir=models)
    table = {"tiny": ("synthetic", "tiny row", ScanComposerConfig(layout="stripes", ny=16, nx=16, roles=("val",),
                                                                  domain_cells=1, det_px=72, thickness_nm=8.0,
                                                                  seed=4))}
    db = tmp_path / "demo.duckdb"
    seen = []
    summary = build_demo(db, library=tiny_library, models_dir=models, scans=table, embed_methods=("pca",),
                         progress=lambda f, m: seen.append(f))
    assert (tmp_path / "data" / "scans" / "tiny.h5").is_file()
    store = PredictionStore(db)
    assert set(queries.list_runs(store)["layer"]) == {"pattern", "cell"}
    assert summary["bench_rows"] == 2 and seen[-1] == 1.0 and seen == sorted(seen)
    assert store.cache_get("demo_summary")["bench_rows"] == 2
    assert not queries.embeddings(store, None, "pca", "input").empty
    again = build_demo(db, library=tiny_library, models_dir=models, scans=table, embed_methods=("pca",))
    assert again["bench_rows"] == 2 and store.counts()["runs"] == 2  # idempotent

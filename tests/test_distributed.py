"""Ingest on a Dask cluster (issue 15, item 4): the same predictions as the single-process path.

A real ``LocalCluster`` of two workers (:func:`polcore.distributed.dask_executor`), real HDF5 scans written by the
test helpers (``app_fixtures.write_plain_scan``; one recorded by a detector turned by 30 deg with a +-3 px descan
ramp, ``tests/test_geometry._record``), and two real checkpoints with different preprocessing (a fitted PCA+kNN
and an untrained custom CNN), so that both preprocessing groups and a position-dependent geometry go through the
row blocks. The workers are threads of this process (``processes=False``): worker processes cost ~10 s to start
and ~25 s to import torch on the loaded 2-core CI machine; the scheduler still talks TCP, so the command line
connects to it by address as it would to a real cluster. Every comparison is against the single-process path
on the same files: the same class everywhere, probabilities within float rounding.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import DET, disc_patterns, make_labels, write_checkpoint, write_plain_scan, write_scan

from polcore import settings
from polcore.distributed import FIT_PATTERNS, dask_executor, predict_blocks, row_blocks
from polcore.infer import predict_scan_many
from polcore.ingest import checkpoints, ingest_many, load_models
from polcore.io import open_scan
from polcore.store import PredictionStore, queries

NY, NX = 12, 14  # the turned, descanned scan


def _write_turned_scan(path: Path, rng) -> Path:
    """A scan whose detector is turned by 30 deg and whose disc moves by +-3 px across the scan."""
    import h5py

    from tests.test_geometry import _ramp, _record

    lab = make_labels(NY, NX, rng)
    write_scan(path, lab, np.full(lab.shape, 20.0, np.float32), np.zeros(lab.shape, bool), rng)
    rec = _record(disc_patterns(lab, rng), 30.0, False, _ramp(NY, NX, 3.0), centre=(DET - 1) / 2)
    with h5py.File(path, "r+") as f:
        f["polbench_root/datacube/data"][...] = rec
    return path


#: the user's geometry of that scan: the turn and the descan surface over (1, iy, ix) [detector px]
TURNED = dict(rotation_deg=30.0, flip=False,
              descan_y=((DET - 1) / 2 - 3.0, 6.0 / (NY - 1), 0.0),
              descan_x=((DET - 1) / 2 - 0.6, -2.4 / (NY - 1), 3.6 / (NX - 1)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import torch

    from polcore.models import build_model, save_checkpoint
    from polcore.preprocess import Preprocessor

    root = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(15)
    models = root / "models"
    write_checkpoint(models, rng)  # pca_knn-cls-s0: 0.5 mrad/px
    torch.manual_seed(0)
    cnn = build_model("custom_cnn", "cls", device="cpu")  # untrained but real; another preprocessing group
    save_checkpoint(cnn, models / "custom_cnn-cls-s0", meta={
        "preprocessing": Preprocessor(target_mrad_per_px=0.4, convergence_mrad=6.0).to_dict(),
        "train_config": {"seed": 0}, "seed": 0})
    scans = [write_plain_scan(root / "a.h5", 14, 16, seed=1), write_plain_scan(root / "b.h5", 12, 12, seed=2)]
    local = root / "local" / "db.duckdb"
    ingest_many(scans, None, local, model_dir=models, kind="synthetic")  # the single-process reference
    return dict(root=root, models=models, scans=scans, local=local,
                turned=_write_turned_scan(root / "turned.h5", rng))


@pytest.fixture(scope="module")
def cluster():
    with dask_executor("local", n_workers=2, processes=False) as ex:
        yield ex


def _grids(db: Path) -> dict:
    """(scan name, model, layer) -> the stored grids and config of that run."""
    store = PredictionStore(db, read_only=True)
    runs = queries.list_runs(store)
    scans = queries.list_scans(store, status=None).set_index("scan_id")
    assert set(scans["status"]) == {"ready"}
    out = {}
    for r in runs.itertuples():
        key = (scans.loc[r.scan_id, "name"], r.model, r.layer)
        out[key] = dict(queries.run_grids(store, int(r.run_id)), config=queries.run_config(store, int(r.run_id)))
    return out


def _same_store(dask_db: Path, local_db: Path, mode: str, n_scans: int = 2) -> None:
    got, ref = _grids(dask_db), _grids(local_db)
    ref = {k: v for k, v in ref.items() if k in got}
    assert got.keys() == ref.keys() and len(got) == 4 * n_scans  # scans x 2 models x (pattern, cell)
    for key, g in got.items():
        r = ref[key]
        np.testing.assert_array_equal(g["pred"], r["pred"], err_msg=str(key))
        np.testing.assert_allclose(g["confidence"], r["confidence"], rtol=1e-5, atol=1e-6, err_msg=str(key))
        assert g["config"]["dask"]["mode"] == mode and "dask" not in r["config"]
        assert g["config"]["preprocessing"] == r["config"]["preprocessing"]
        assert json.dumps(g["config"]["geometry"], sort_keys=True) == json.dumps(r["config"]["geometry"], sort_keys=True)
    got_s, ref_s = (queries.list_scans(PredictionStore(d, read_only=True), status=None) for d in (dask_db, local_db))
    for name, sid in zip(got_s["name"], got_s["scan_id"]):  # the virtual images stored with each scan
        rid = int(ref_s.loc[ref_s["name"] == name, "scan_id"].iloc[0])
        gi = queries.scan_images(PredictionStore(dask_db, read_only=True), int(sid))
        ri = queries.scan_images(PredictionStore(local_db, read_only=True), rid)
        assert (gi is None) == (ri is None)
        for k in ri or {}:
            np.testing.assert_allclose(gi[k], ri[k], rtol=1e-5, atol=1e-5, err_msg=f"{name} {k}")
    files = sorted(p.name for p in settings.features_dir(dask_db).iterdir())
    assert len(files) == 2 * n_scans and all(f.endswith(".npz") and f.startswith("scan") for f in files)
    assert set(files) <= {p.name for p in settings.features_dir(local_db).iterdir()}


def test_row_blocks_match_the_single_pass_with_a_position_dependent_geometry(data, cluster):
    """One scan spread over the workers in row blocks: the geometry (turn + descan surface, which depends on the
    absolute row) and both preprocessing groups give the single pass's classes and probabilities."""
    found = load_models(checkpoints(data["models"]))
    models = [m for m, _, _ in found.values()]
    paths = [p for _, _, p in found.values()]
    scan = open_scan(data["turned"])
    ref = predict_scan_many(scan, models, batch_size=64, geometry_overrides=TURNED, fit_patterns=FIT_PATTERNS)
    seen, stats = [], {}
    got = predict_blocks(cluster, scan, data["turned"], models, paths, batch_size=64, block_patterns=2 * NX,
                         geometry_overrides=TURNED, on_batch=lambda flat, preds: seen.append((flat, preds)),
                         stats=stats)
    assert ref[0].geometry["applied"] and ref[0].geometry["descan_y"] is not None  # a real correction ran
    assert ref[0].preprocess != ref[1].preprocess  # two preprocessing groups
    assert stats["blocks"] == len(row_blocks(NY, NX, 2 * NX)) == 6
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g.pred, r.pred)
        np.testing.assert_allclose(g.probs, r.probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g.com, r.com, rtol=1e-5, atol=1e-6)
        assert g.preprocess == r.preprocess and g.geometry == r.geometry
        assert g.features.shape == r.features.shape and g.inputs.shape == r.inputs.shape
        assert (g.pred >= 0).all()
        if getattr(r, "virtual", None) is not None:  # the scan's virtual images, stitched from the blocks'
            assert g.virtual.keys() == r.virtual.keys()
            for k in r.virtual:
                np.testing.assert_allclose(g.virtual[k], r.virtual[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # every block reached on_batch once, with its positions and each model's classes
    flat = np.concatenate([f for f, _ in seen])
    assert len(seen) == 6 and np.array_equal(np.sort(flat), np.arange(NY * NX))
    for f, preds in seen:
        for m, p in enumerate(preds):
            np.testing.assert_array_equal(p, ref[m].pred.ravel()[f])
    assert pickle.loads(pickle.dumps(got[1])).pred.tolist() == got[1].pred.tolist()  # what a worker sends back


def test_ingest_of_one_scan_in_row_blocks_writes_what_the_single_process_writes(data, cluster, tmp_path):
    db = tmp_path / "db.duckdb"
    ingest_many(data["scans"][:1], None, db, executor=cluster, model_dir=data["models"], kind="synthetic",
                block_patterns=64)
    _same_store(db, data["local"], "row blocks", n_scans=1)
    cfg = next(iter(_grids(db).values()))["config"]["dask"]
    assert cfg["blocks"] >= 3 and cfg["workers"] >= 1


def test_cli_ingests_a_list_of_scans_one_task_per_scan_on_a_cluster_address(data, cluster, tmp_path, capsys):
    """``python -m polcore ingest A B --dask tcp://...``: one task per scan; this process writes the store."""
    from polcore.cli import main

    address = cluster.dask_client.scheduler.address
    assert address.startswith("tcp://")
    db = tmp_path / "db.duckdb"
    rc = main(["ingest", *map(str, data["scans"]), "--db", str(db), "--model-dir", str(data["models"]), "--kind",
               "synthetic", "--dask", address])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "one task per scan" in out and "2 worker(s)" in out
    _same_store(db, data["local"], "one task per scan")
    # a second run finds both scans stored: nothing is submitted, nothing is written
    before = _grids(db).keys()
    assert main(["ingest", *map(str, data["scans"]), "--db", str(db), "--model-dir", str(data["models"]),
                 "--dask", address]) == 0
    assert _grids(db).keys() == before


def test_cli_refuses_a_bad_dask_address_in_one_line(data, tmp_path, capsys):
    from polcore.cli import main

    rc = main(["ingest", str(data["scans"][0]), "--db", str(tmp_path / "db.duckdb"), "--model-dir",
               str(data["models"]), "--dask", "my-cluster:8786"])
    err = capsys.readouterr().err
    assert rc == 2 and "tcp://host:8786" in err and "Traceback" not in err


def test_draw_library_built_one_task_per_draw_equals_the_single_process_build(tiny_draws, cluster, tmp_path):
    """``simulate library --profile draws-tiny --dask``: every draw simulated on a worker, written by the client,
    holds the same patterns and nuisances as the single-process build (the session's ``tiny_draws``)."""
    import h5py

    from polcore.distributed import build_draws_distributed

    out = tmp_path / "tiny"
    made = build_draws_distributed(cluster, "tiny", out)
    ref = Path(tiny_draws.path)
    names = sorted(p.name for p in ref.glob("*.h5"))
    assert sorted(p.name for p in made) == names and len(names) == 7
    assert not list(out.glob("*.claim")) and not list(out.glob("*.tmp"))
    for name in names:
        with h5py.File(out / name, "r") as a, h5py.File(ref / name, "r") as b:
            np.testing.assert_array_equal(a["patterns"][...], b["patterns"][...], err_msg=name)
            assert json.loads(a.attrs["nuisance"]) == json.loads(b.attrs["nuisance"])
            assert a.attrs["recipe"] == b.attrs["recipe"]
    assert build_draws_distributed(cluster, "tiny", out) == []  # resumable: nothing left to do

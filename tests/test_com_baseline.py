"""The classical CoM-direction baseline (issue 16): no training, a model like the others (checkpoint, ingest,
benchmark row), and its pooled cell class is the direction of the cell-summed centre-of-mass shift."""

from __future__ import annotations

import json

import numpy as np
import pytest
from app_fixtures import disc_patterns, write_checkpoint, write_plain_scan

from polcore.analysis import pool_scan
from polcore.ingest import available_models, checkpoints, ingest
from polcore.models import (
    ALL_FAMILIES,
    FAMILIES,
    UNTRAINED_FAMILIES,
    build_model,
    checkpoint_suffix,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from polcore.models.com_direction import NAME, ComDirectionModel, class_directions
from polcore.naming import model_name
from polcore.settings import shipped_models_dir
from polcore.types import class_to_vector


def test_class_directions_follow_the_on_screen_convention():
    u = class_directions()  # (row down, column right)
    np.testing.assert_allclose(u[0], [0, 1], atol=1e-12)  # RM: right
    np.testing.assert_allclose(u[2], [-1, 0], atol=1e-12)  # MU: up the screen = towards row 0
    v = class_to_vector(np.arange(8))  # (x right, y up)
    np.testing.assert_allclose(u, np.stack([-v[:, 1], v[:, 0]], axis=1), atol=1e-12)


def test_a_disc_brighter_towards_a_direction_is_read_as_that_class(rng):
    """The test scans' discs lean towards their class direction (app_fixtures.disc_patterns): the CoM moves
    that way, and with sign +1 (CoM along P) the baseline reads every class; sign -1 reads the opposite one."""
    from polcore.preprocess import Preprocessor

    labels = np.repeat(np.arange(8), 6)
    raw = disc_patterns(labels, rng, noise=0.01)
    pre = Preprocessor(target_mrad_per_px=0.5, convergence_mrad=6.0).fit_mean(raw.mean(axis=0), 1.0)
    pats = pre.transform(raw)  # the disc centre of the mean on the input's optical axis (32, 32)
    model = ComDirectionModel()
    pred, proba, emb = model.infer(pats)
    assert (pred == labels).all()
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    assert (proba.argmax(1) == pred).all() and proba.dtype == np.float32 and emb.shape == (48, 2)
    assert (ComDirectionModel(sign=-1).predict(pats) == (labels + 4) % 8).all()
    # the embedding is the on-screen CoM vector: along the class vector
    cos = (emb * class_to_vector(labels)).sum(1) / np.linalg.norm(emb, axis=1)
    assert (cos > 0.9).all()


def test_pooled_cell_class_is_the_direction_of_the_cell_summed_com(rng):
    """ingest pools log-probabilities per cell (pool_scan): for this model that is argmax_k (sum_i c_i) . u_k."""
    ny = nx = 12
    period = 4.0
    pats = rng.gamma(2.0, 1.0, size=(ny * nx, 16, 16)).astype(np.float32)
    model = ComDirectionModel(input_size=16)
    probs = model.predict_proba(pats).reshape(ny, nx, 8)
    cells = pool_scan(probs, period)
    c = model.com(pats).reshape(3, 4, 3, 4, 2).sum(axis=(1, 3))  # (cell y, cell x, 2)
    want = (c @ class_directions().T).argmax(-1)
    np.testing.assert_array_equal(cells["cell_pred"], want)
    assert probs.min() > 1e-6  # above the pooling floor: the identity is exact


def test_registry_checkpoint_round_trip_and_name(tmp_path, rng):
    assert "com_direction" in ALL_FAMILIES and "com_direction" in UNTRAINED_FAMILIES
    assert "com_direction" not in FAMILIES  # nothing to train: no training config accepts it
    from polcore.train import TrainConfig

    with pytest.raises(ValueError, match="unknown model family 'com_direction'"):
        TrainConfig(family="com_direction", head="cls")
    assert checkpoint_suffix("com_direction") == ".npz"
    m = build_model("com_direction", "cls", kappa=0.25, sign=-1, input_size=32)
    assert isinstance(m, ComDirectionModel) and m.fit(None, None) is m
    with pytest.raises(ValueError, match="unknown com_direction options"):
        build_model("com_direction", "cls", hidden=3)
    with pytest.raises(ValueError, match="no head 'reg'"):
        build_model("com_direction", "reg")
    with pytest.raises(ValueError, match="sign"):
        ComDirectionModel(sign=0)
    path = save_checkpoint(m, tmp_path / "whatever", meta={"preprocessing": {"size": 32}})
    assert path.suffix == ".npz" and path.with_suffix(".json").is_file()
    back = load_checkpoint(path)
    assert isinstance(back, ComDirectionModel) and back.cfg == m.cfg
    x = disc_patterns(np.arange(8), rng)
    np.testing.assert_allclose(back.predict_proba(x), m.predict_proba(x), rtol=1e-6)
    assert model_name(read_checkpoint_meta(path)) == NAME == "com_direction-cls"
    assert available_models(tmp_path) == {NAME: path}


def test_the_baseline_is_shipped_with_held_out_rows_and_the_networks_preprocessing():
    found = available_models(shipped_models_dir())
    assert NAME in found, f"{NAME} is not in {shipped_models_dir()}"
    meta = read_checkpoint_meta(found[NAME])
    assert meta["family"] == "com_direction" and meta["model_cfg"]["sign"] == 1
    rows = meta["heldout"]
    assert {r["role"] for r in rows} == {"test"} and len({r["thickness_nm"] for r in rows}) >= 4
    assert all(0 <= r["per_pattern"] <= 1 and 0 <= r["per_cell"] <= 1 for r in rows)
    assert found[NAME].stat().st_size < 20_000
    # the same preprocessing as the shipped networks: one preprocessing group at ingest, the same input
    others = [p for p in checkpoints(shipped_models_dir()) if p != found[NAME]]
    assert others
    net = read_checkpoint_meta(others[0])["preprocessing"]
    for k in ("target_mrad_per_px", "convergence_mrad", "size"):
        assert meta["preprocessing"][k] == net[k]
    assert isinstance(load_checkpoint(found[NAME]), ComDirectionModel)


def test_ingest_and_benchmark_give_the_baseline_a_row_beside_the_majority_class(tmp_path):
    from polcore.benchmark import run_bench
    from polcore.store import PredictionStore, queries

    models = tmp_path / "models"
    write_checkpoint(models, np.random.default_rng(3))
    meta = json.loads((models / "pca_knn-cls-s0.json").read_text())
    save_checkpoint(ComDirectionModel(), models / NAME, meta={"preprocessing": meta["preprocessing"]})
    scan = write_plain_scan(tmp_path / "scan.h5", 18, 18, seed=4)
    res = ingest(scan, None, tmp_path / "p.duckdb", kind="synthetic", model_dir=models)
    store = PredictionStore(tmp_path / "p.duckdb", read_only=True)
    runs = queries.list_runs(store, scan_ids=[res.scan_id])
    mine = runs[runs["model"] == NAME]
    assert sorted(mine["layer"]) == ["cell", "pattern"] and (mine["family"] == "com_direction").all()
    bench = run_bench(tmp_path / "p.duckdb")
    row = bench[(bench["model_name"] == NAME) & ~bench["dataset"].str.endswith(queries.CELL_SUFFIX)]
    assert len(row) == 1
    # the test scan's discs lean towards their class: the CoM direction reads them (measured 1.0 here)
    assert float(row["accuracy"].iloc[0]) > 0.9
    table = queries.benchmark_table(store)
    assert {"com_direction", "majority"} <= set(table["family"])
    cols = queries.pivot_benchmark(table).columns
    assert any(c.startswith("com_direction") for c in cols) and cols[-1] == "majority"

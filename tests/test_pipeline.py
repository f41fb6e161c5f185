"""End to end on a tiny real library: train, compose, ingest, benchmark, embeddings, analysis report."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("abtem")


@pytest.fixture(scope="module")
def pipeline(tiny_library, tmp_path_factory):
    from types import SimpleNamespace

    from polcore.benchmark import run_bench
    from polcore.ingest import ingest_scan
    from polcore.reports import analysis_report, compute_embeddings
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd
    from polcore.train import TrainConfig, train_model

    tmp = tmp_path_factory.mktemp("pipe")
    models_dir = tmp / "models"
    for cfg in (TrainConfig(family="pca_knn", train_thickness_nm=None, augment=False, seed=3),
                TrainConfig(family="custom_cnn", head="cls", epochs=2, patience=1, train_thickness_nm=None, seed=3)):
        train_model(cfg, tiny_library, out_dir=models_dir)
    scans = {}
    for name, kind, extra in (("syn", "synthetic", {}),
                              ("exp", "pseudo_experimental", dict(dose=3e4, blur_px=0.7, descan_px=2,
                                                                  defects=2, defect_types=("nonpolar",)))):
        cfg = ScanComposerConfig(layout="stripes", ny=16, nx=16, roles=("val",), domain_cells=1, det_px=72,
                                 thickness_nm=8.0, seed=4, **extra)
        truth, blocks = compose_scan(cfg, tiny_library)
        scans[name] = (write_emd(tmp / f"{name}.h5", truth, blocks, cfg), kind)
    bench = SimpleNamespace(ingest_scan=ingest_scan, run_bench=run_bench, compute_embeddings=compute_embeddings,
                            analysis_report=analysis_report)
    db = tmp / "pb.duckdb"
    ids = {}
    for name, (path, kind) in scans.items():
        ids[name] = bench.ingest_scan(path, None, db, name=name, kind=kind, dataset=f"{name} row",
                                      model_dir=models_dir)
    return bench, db, scans, ids, models_dir


def test_ingest_stores_every_model_and_is_idempotent(pipeline):
    from polcore.store import PredictionStore, queries

    bench, db, scans, ids, models_dir = pipeline
    store = PredictionStore(db)
    runs = queries.list_runs(store, layer="pattern")
    assert len(runs) == 4 and set(runs["n_patterns"]) == {256}
    # the unit-cell layer: one more run per (model, scan), the cell's class at every position of the cell
    cells = queries.list_runs(store, layer="cell")
    assert len(cells) == 4 and set(cells["n_patterns"]) == {256}
    cm = queries.run_map(store, int(cells["run_id"].iloc[0]))
    period = float(cells["cell_px"].iloc[0])
    block = (np.floor(cm["iy"] / period + 1e-9).astype(int) * 100 + np.floor(cm["ix"] / period + 1e-9).astype(int))
    assert cm.groupby(block)["pred"].nunique().max() == 1
    before = store.counts()
    path, kind = scans["syn"]
    assert bench.ingest_scan(path, None, db, name="syn", kind=kind, model_dir=models_dir) == ids["syn"]
    assert store.counts() == before  # same file (sha256) + same models: nothing added
    m = queries.run_map(store, int(runs["run_id"].iloc[0]))
    assert len(m) == 256 and m["irregularity"].notna().all()


def test_bench_table_has_every_row_and_column(pipeline):
    from polcore.store import PredictionStore, queries

    bench, db, *_ = pipeline
    df = bench.run_bench(db)
    assert set(df["dataset"]) == {"syn row", "exp row", "syn row (per cell)", "exp row (per cell)"}
    table = queries.pivot_benchmark(queries.benchmark_table(PredictionStore(db)))
    assert set(table.index) == set(df["dataset"])
    assert any("pca_knn" in c for c in table.columns) and any("custom_cnn" in c for c in table.columns)
    assert any("majority" in c for c in table.columns)
    # the stored benchmark row is what the stored predictions say
    row = df[(df["dataset"] == "syn row") & (df["family"] == "pca_knn")].iloc[0]
    runs = queries.list_runs(PredictionStore(db), layer="pattern")
    run = runs[(runs["family"] == "pca_knn") & (runs["dataset"] == "syn row")]["run_id"].iloc[0]
    m = queries.run_map(PredictionStore(db), int(run))
    ok = m["true_label"] >= 0
    assert row["accuracy"] == pytest.approx(float((m["pred"][ok] == m["true_label"][ok]).mean()))
    assert row["n"] == int(ok.sum())


def test_embeddings_domain_gap_and_report(pipeline):
    from polcore.store import PredictionStore, queries

    bench, db, *_ = pipeline
    gaps = bench.compute_embeddings(db, methods=("pca",), n_max=500)
    assert set(gaps) and all(0.5 <= v <= 1.0 for v in gaps.values())
    store = PredictionStore(db)
    models = queries.list_models(store)
    emb = queries.embeddings(store, int(models["model_id"].iloc[0]), "pca", "features")
    assert {"synthetic", "pseudo_experimental"} <= set(emb["kind"])
    report = bench.analysis_report(db)
    assert len(report) == 8 and report["layer"].value_counts().to_dict() == {"pattern": 4, "cell": 4}
    assert np.allclose(report["lattice_period_px"], 4.0)
    assert report["defect_auc"].notna().sum() == 4  # only the experimental-like scan has defects (2 layers)

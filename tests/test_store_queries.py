"""polcore.store.queries return what the rows say: small hand-made predictions with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from polcore.analysis.metrics import metrics_table
from polcore.store import PredictionStore, queries
from polcore.types import Filters

# 4x4 scan: ground truth, one model's predictions (3 errors + 1 unlabelled position), thickness by row.
TRUE = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, -1]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 5], [2, 2, 3, 3], [6, 2, 3, 3]])
THICK = np.array([10.0, 10.0, 30.0, 30.0])[:, None].repeat(4, axis=1)
# (true, pred) -> count over the 15 labelled positions
FULL = {(0, 0): 3, (0, 1): 1, (1, 1): 3, (1, 5): 1, (2, 2): 3, (2, 6): 1, (3, 3): 3}
THIN = {(0, 0): 3, (0, 1): 1, (1, 1): 3, (1, 5): 1}  # rows 0-1, thickness 10 nm
LOWER_LEFT = {(2, 2): 3, (2, 6): 1}  # region rows 2-3, columns 0-1


def _probs(pred: np.ndarray) -> np.ndarray:
    p = np.full(pred.shape + (8,), 0.05, np.float32)
    np.put_along_axis(p, pred[..., None], 0.65, axis=-1)
    return p


@pytest.fixture
def db(tmp_path):
    s = PredictionStore(tmp_path / "q.duckdb")
    syn = s.add_scan(
        name="syn A",
        kind="synthetic",
        sha256="1" * 64,
        ny=4,
        nx=4,
        dataset="synthetic 20 nm",
        cell_px=2.0,
        has_ground_truth=True,
    )
    exp = s.add_scan(name="exp B", kind="experimental", sha256="2" * 64, ny=2, nx=2, dataset="experimental")
    m1 = s.add_model(name="resnet-cls-0", family="resnet", head="cls", seed=0, train_seconds=30.0)
    m2 = s.add_model(name="resnet-cls-1", family="resnet", head="cls", seed=1, train_seconds=50.0)
    m3 = s.add_model(name="vgg-reg-0", family="vgg", head="reg", seed=0)
    irr = np.zeros((4, 4))
    irr[3, 0] = 5.0
    r1 = s.write_run(
        m1,
        syn,
        {
            "pred": PRED,
            "probs": _probs(PRED),
            "true_label": TRUE,
            "thickness_nm": THICK,
            "is_defect": irr > 1,
            "irregularity": irr,
        },
        seconds=2.0,
        device="cpu",
    )
    perfect = np.where(TRUE >= 0, TRUE, 0)
    r2 = s.write_run(
        m2,
        syn,
        {"pred": perfect, "probs": _probs(perfect), "true_label": TRUE, "thickness_nm": THICK},
        seconds=4.0,
        device="cpu",
    )
    r3 = s.write_run(m1, exp, {"pred": np.array([[4, 4], [5, 4]])}, seconds=1.0, device="cpu")
    return {"store": s, "syn": syn, "exp": exp, "m1": m1, "m2": m2, "m3": m3, "r1": r1, "r2": r2, "r3": r3}


def _as_dict(df: pd.DataFrame, run_id: int) -> dict:
    sub = df[df["run_id"] == run_id]
    return {(int(t), int(p)): int(n) for t, p, n in zip(sub["true"], sub["pred"], sub["n"])}


def test_catalogue_queries(db):
    s = db["store"]
    scans = queries.list_scans(s)
    assert scans["name"].tolist() == ["syn A", "exp B"] and scans["n_runs"].tolist() == [2, 1]
    assert queries.list_scans(s, kind="experimental")["scan_id"].tolist() == [db["exp"]]
    with pytest.raises(ValueError, match="kind must be one of"):
        queries.list_scans(s, kind="real")
    models = queries.list_models(s)
    assert models["n_runs"].tolist() == [2, 1, 0]
    assert models["patterns_per_s"].iloc[0] == pytest.approx((16 / 2.0 + 4 / 1.0) / 2)
    runs = queries.list_runs(s)
    assert runs["run_id"].tolist() == [db["r1"], db["r2"], db["r3"]]
    assert runs.set_index("run_id").loc[db["r3"], ["model", "scan", "kind"]].tolist() == [
        "resnet-cls-0",
        "exp B",
        "experimental",
    ]
    assert queries.list_runs(s, dataset="synthetic 20 nm", model_ids=db["m2"])["run_id"].tolist() == [
        db["r2"]
    ]
    assert queries.list_runs(s, run_ids=[])["run_id"].tolist() == []


def test_confusion_counts_with_thickness_and_region_filters(db):
    s, r1, r2 = db["store"], db["r1"], db["r2"]
    both = queries.confusion_counts(s, [r1, r2])
    assert _as_dict(both, r1) == FULL
    assert _as_dict(both, r2) == {(0, 0): 4, (1, 1): 4, (2, 2): 4, (3, 3): 3}
    assert _as_dict(queries.confusion_counts(s, r1, Filters(thickness=(0.0, 20.0))), r1) == THIN
    assert _as_dict(queries.confusion_counts(s, r1, Filters(region=(2, 3, 0, 1))), r1) == LOWER_LEFT
    assert _as_dict(queries.confusion_counts(s, r1, Filters(region=(3, 2, 1, 0))), r1) == LOWER_LEFT
    both_filters = Filters(thickness=(25.0, 35.0), region=(0, 3, 0, 0))  # rows 2-3 of column 0
    assert _as_dict(queries.confusion_counts(s, r1, both_filters), r1) == {(2, 2): 1, (2, 6): 1}
    cm = queries.confusion_matrix(both, r1)
    assert cm.shape == (8, 8) and cm.sum() == 15 and cm[1, 5] == 1 and np.trace(cm) == 12
    assert queries.confusion_matrix(both).sum() == 30
    assert queries.confusion_counts(s, []).empty
    with pytest.raises(TypeError, match="Filters"):
        queries.confusion_counts(s, r1, {"thickness": (0, 1)})


def test_run_map_grids_and_prediction_at(db):
    s, r1 = db["store"], db["r1"]
    ro = PredictionStore(s.path, read_only=True)  # as the dashboard: first call on a fresh read-only store
    np.testing.assert_array_equal(queries.run_map(ro, r1)["pred"], PRED.ravel())
    m = queries.run_map(s, r1)
    assert list(zip(m["iy"], m["ix"])) == [(y, x) for y in range(4) for x in range(4)]
    np.testing.assert_array_equal(m["pred"], PRED.ravel())
    np.testing.assert_array_equal(m["true_label"], TRUE.ravel())
    np.testing.assert_allclose(m["thickness_nm"], THICK.ravel())
    np.testing.assert_allclose(np.stack(m["probs"]), _probs(PRED).reshape(-1, 8))
    np.testing.assert_allclose(m["confidence"], 0.65)
    assert m["is_defect"].tolist() == [False] * 12 + [True, False, False, False]
    g = queries.run_grids(s, r1)
    np.testing.assert_array_equal(g["pred"], PRED)
    expected_error = np.zeros((4, 4))
    expected_error[0, 1] = expected_error[1, 3] = expected_error[3, 0] = 1
    expected_error[3, 3] = np.nan
    np.testing.assert_array_equal(g["error"], expected_error)
    assert g["probs"].shape == (4, 4, 8) and g["cell_px"] == 2.0 and g["is_defect"][3, 0]
    one = queries.prediction_at(s, r1, 1, 3)
    assert len(one) == 1 and one["pred"].iloc[0] == 5 and one["true_label"].iloc[0] == 1
    assert np.argmax(one["probs"].iloc[0]) == 5
    assert queries.prediction_at(s, r1, 9, 9).empty
    no_probs = queries.run_map(s, db["r3"])  # a run stored without probabilities or labels
    assert np.isnan(np.stack(no_probs["probs"])).all() and (no_probs["true_label"] == -1).all()
    assert np.isnan(queries.run_grids(s, db["r3"])["error"]).all()
    with pytest.raises(ValueError, match="no finished run"):
        queries.run_grids(s, 999)


def test_errors_lists_only_wrong_labelled_positions(db):
    s, r1 = db["store"], db["r1"]
    e = queries.errors(s, r1)
    assert list(zip(e["iy"], e["ix"], e["angle_error_deg"])) == [(0, 1, 45), (1, 3, 180), (3, 0, 180)]
    e = queries.errors(s, r1, Filters(thickness=(25.0, 35.0)))
    assert list(zip(e["iy"], e["ix"])) == [(3, 0)]
    assert queries.errors(s, r1, Filters(region=(0, 1, 0, 0))).empty
    assert queries.errors(s, db["r2"]).empty


def test_metrics_by_run_agrees_with_the_analysis_metrics(db):
    s, r1, r2, r3 = db["store"], db["r1"], db["r2"], db["r3"]
    for filters in (None, Filters(thickness=(0.0, 20.0)), Filters(region=(1, 3, 1, 3))):
        got = queries.metrics_by_run(s, filters).set_index("run_id")
        for rid in (r1, r2):
            ref = metrics_table(queries.run_map(s, rid, probs=False), filters)
            assert got.loc[rid, "n_rows"] == ref["n_rows"]
            assert got.loc[rid, "n_labelled"] == ref["n_labelled"]
            assert got.loc[rid, "accuracy"] == pytest.approx(ref["accuracy"])
            assert got.loc[rid, "macro_f1"] == pytest.approx(ref["macro_f1"])
    got = queries.metrics_by_run(s).set_index("run_id")
    assert got.loc[r1, "accuracy"] == pytest.approx(12 / 15)
    assert got.loc[r1, "macro_f1"] == pytest.approx((6 / 7 + 6 / 8 + 6 / 7 + 1 + 0 + 0) / 6)
    assert got.loc[r1, "mean_confidence"] == pytest.approx(0.65)
    assert got.loc[r3, "n_rows"] == 4 and np.isnan(got.loc[r3, "accuracy"])
    thin = queries.metrics_by_run(s, Filters(thickness=(0.0, 20.0)), run_ids=[r1]).set_index("run_id")
    assert list(thin.index) == [r1] and thin.loc[r1, "accuracy"] == pytest.approx(6 / 8)


def test_benchmark_table_mean_std_and_majority_baseline(db):
    s = db["store"]
    s.write_bench(
        pd.DataFrame(
            {
                "model_name": ["resnet-cls-0", "resnet-cls-1", "vgg-reg-0", "resnet-cls-0", "resnet-cls-1"],
                "family": ["resnet", "resnet", "vgg", "resnet", "resnet"],
                "head": ["cls", "cls", "reg", "cls", "cls"],
                "seed": [0, 1, 0, 0, 1],
                "dataset": ["synthetic 20 nm"] * 3 + ["cells 4x4"] * 2,
                "accuracy": [0.8, 0.9, 0.7, 0.5, 0.7],
                "macro_f1": [0.6, 0.8, 0.5, 0.4, 0.4],
                "per_class_recall": [np.full(8, 0.5), np.full(8, 1.0), None, None, None],
                "n": [16, 16, 16, 100, 100],
            }
        )
    )
    t = queries.benchmark_table(s)
    assert t["dataset"].tolist() == ["synthetic 20 nm"] * 3 + ["cells 4x4"]
    assert t["model"].tolist() == ["resnet/cls", "vgg/reg", "majority", "resnet/cls"]
    res = t.iloc[0]
    assert res["n_seeds"] == 2 and res["accuracy_mean"] == pytest.approx(0.85)
    assert res["accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert res["macro_f1_mean"] == pytest.approx(0.7)
    np.testing.assert_allclose(res["per_class_recall"], 0.75)
    assert res["train_seconds"] == pytest.approx(40.0)
    assert np.isnan(t.iloc[1]["accuracy_std"])
    # labels of 'syn A': classes 0, 1, 2 four times each, class 3 three times -> always predict class 0
    maj = t.iloc[2]
    assert maj["majority_class"] == 0 and maj["n_patterns"] == 15
    assert maj["accuracy_mean"] == pytest.approx(4 / 15)
    assert maj["macro_f1_mean"] == pytest.approx((2 * 4 / (15 + 4)) / 4)
    np.testing.assert_array_equal(maj["per_class_recall"][:4], [1, 0, 0, 0])
    assert np.isnan(maj["per_class_recall"][4:]).all()
    p = queries.pivot_benchmark(t)
    assert p.index.tolist() == ["synthetic 20 nm", "cells 4x4"]
    assert p.columns.tolist() == ["resnet/cls", "vgg/reg", "majority"]
    assert p.loc["synthetic 20 nm", "resnet/cls"] == "0.850 ± 0.071"
    assert p.loc["synthetic 20 nm", "vgg/reg"] == "0.700"
    assert p.loc["synthetic 20 nm", "majority"] == "0.267"
    assert p.loc["cells 4x4", "majority"] == ""  # no stored scan for that dataset
    f1 = queries.pivot_benchmark(t, "macro_f1", text=False)
    assert f1.loc["cells 4x4", "resnet/cls"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="metric must be one of"):
        queries.pivot_benchmark(t, "speed")


def test_embeddings_show_synthetic_and_experimental_together(db):
    s, m1, syn, exp = db["store"], db["m1"], db["syn"], db["exp"]
    feats = pd.DataFrame(
        {
            "model_id": m1,
            "method": "pca",
            "space": "features",
            "scan_id": [syn, syn, exp, exp],
            "iy": [0, 3, 0, 1],
            "ix": [1, 3, 0, 0],
            "e1": [0.1, 0.2, 0.3, 0.4],
            "e2": [1.0, 2.0, 3.0, 4.0],
        }
    )
    s.write_embeddings(feats)
    s.write_embeddings(feats.drop(columns="model_id").assign(space="input", e1=[9.0, 8.0, 7.0, 6.0]))
    e = queries.embeddings(s, m1, "pca", "features")
    assert e["kind"].tolist() == ["synthetic", "synthetic", "experimental", "experimental"]
    assert e["pred"].tolist() == [1, 3, 4, 5]  # joined from the model's runs on each scan
    assert e["true_label"].tolist() == [0, -1, -1, -1]
    assert e["correct"].tolist() == [False, pd.NA, pd.NA, pd.NA]
    inp = queries.embeddings(s, m1, "pca", "input")  # model-independent set, coloured by m1's predictions
    assert inp["e1"].tolist() == [9.0, 8.0, 7.0, 6.0] and inp["pred"].tolist() == [1, 3, 4, 5]
    assert queries.embeddings(s, None, "pca", "input")["pred"].isna().all()
    assert queries.embeddings(s, db["m2"], "umap", "features").empty
    with pytest.raises(ValueError, match="space must be one of"):
        queries.embeddings(s, m1, "pca", "pixels")


def test_domain_gaps_and_thickness_range(db):
    s = db["store"]
    assert queries.domain_gaps(s).empty
    s.write_domain_gap(db["m1"], db["syn"], db["exp"], auc=0.93, mmd=0.4, n_a=16, n_b=4)
    s.write_domain_gap(db["m1"], db["syn"], db["exp"], auc=0.91)  # replaces
    g = queries.domain_gaps(s)
    assert len(g) == 1
    assert g.loc[0, ["model", "scan_a_name", "kind_b", "auc"]].tolist() == [
        "resnet-cls-0",
        "syn A",
        "experimental",
        0.91,
    ]
    assert queries.domain_gaps(s, model_ids=[db["m2"]]).empty
    with pytest.raises(ValueError, match="auc must lie in"):
        s.write_domain_gap(db["m1"], db["syn"], db["exp"], auc=1.5)
    assert queries.thickness_range(s) == (10.0, 30.0)
    assert queries.thickness_range(s, run_ids=db["r3"]) is None

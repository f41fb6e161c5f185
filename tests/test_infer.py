"""predict_scan: the streaming loop equals whole-array prediction; memory-bounded bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from polcore.infer import make_preprocessor, predict_scan, predict_scan_many
from polcore.models import build_model
from polcore.preprocess import Preprocessor

pytest.importorskip("abtem")


@pytest.fixture(scope="module")
def scan_and_models(tiny_library):
    from polcore.io import ArrayScan
    from polcore.simulate.composer import ScanComposerConfig, compose_scan

    lib = tiny_library
    X, y, _ = lib.select("train")
    pre = Preprocessor(lib.meta["mrad_per_px"], lib.meta["convergence_mrad"], size=lib.size)
    pca = build_model("pca_knn", n_components=8, input_size=lib.size).fit(X, y)
    cnn = build_model("custom_cnn", "cls", input_size=lib.size, device="cpu")  # untrained but real
    for m in (pca, cnn):
        m.meta["preprocessing"] = pre.to_dict()
    cfg = ScanComposerConfig(layout="checker", ny=13, nx=11, roles=("val",), det_px=lib.size + 6,
                             thickness_nm=float(lib.thickness_nm[0]), dose=5e4, seed=2)
    truth, blocks = compose_scan(cfg, lib)
    arr = np.concatenate([b for _, b in blocks])
    return ArrayScan(arr), arr, (pca, cnn), truth


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_streaming_equals_whole_array(scan_and_models, batch_size):
    scan, arr, models, _ = scan_and_models
    pre = make_preprocessor(models[0], scan)
    whole = pre.transform(arr.reshape(-1, *arr.shape[2:]))
    for model in models:
        pred, proba, _ = model.infer(whole)
        res = predict_scan(scan, model, batch_size=batch_size, preprocessor=pre, embed_sample=20)
        np.testing.assert_array_equal(res.pred.ravel(), pred)
        np.testing.assert_allclose(res.probs.reshape(-1, 8), proba, rtol=1e-5, atol=1e-6)
        assert res.pred.shape == scan.nav_shape and res.confidence.shape == scan.nav_shape
        assert res.features.shape[0] == 20 and res.sample_pos.shape == (20, 2)
        assert res.n_patterns == arr.shape[0] * arr.shape[1] and res.seconds > 0


def test_many_models_share_one_pass_and_progress(scan_and_models):
    scan, _, models, _ = scan_and_models
    seen = []
    res = predict_scan_many(scan, list(models), batch_size=32, progress=lambda d, t, m: seen.append((d, t)))
    assert len(res) == 2 and seen[-1] == (143, 143) and len(seen) == 5
    np.testing.assert_array_equal(res[0].com, res[1].com)
    single = predict_scan(scan, models[1], batch_size=50)
    np.testing.assert_array_equal(res[1].pred, single.pred)  # one pass for many = each on its own
    assert res[0].com.max() > 0 and np.all(np.isfinite(res[0].com))


def test_model_without_preprocessing_is_refused(scan_and_models):
    scan, *_ = scan_and_models
    m = build_model("pca_knn")
    with pytest.raises(ValueError, match="preprocessing"):
        predict_scan(scan, m)

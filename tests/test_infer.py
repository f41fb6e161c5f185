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


class CountingScan:
    """A Scan wrapper that counts every pattern read through it (iter_batches and pattern)."""

    def __init__(self, scan):
        self._scan = scan
        self.nav_shape, self.sig_shape, self.meta = scan.nav_shape, scan.sig_shape, scan.meta
        self.patterns_read = 0

    def iter_batches(self, batch_size):
        for pos, batch in self._scan.iter_batches(batch_size):
            self.patterns_read += len(pos)
            yield pos, batch

    def pattern(self, iy, ix):
        self.patterns_read += 1
        return self._scan.pattern(iy, ix)


def test_many_models_share_one_pass_and_progress(scan_and_models):
    scan, arr, models, _ = scan_and_models
    counting = CountingScan(scan)
    seen = []
    res = predict_scan_many(counting, list(models), batch_size=32, fit_patterns=40,
                            progress=lambda f, m: seen.append(f))
    # the preprocessing fit and the inference share ONE pass: every pattern is read exactly once
    assert counting.patterns_read == 143
    assert len(res) == 2 and seen[-1] == 1.0 and len(seen) == 5 and seen == sorted(seen)
    np.testing.assert_array_equal(res[0].com, res[1].com)
    # the fit used the first 64 patterns (two batches of 32 >= fit_patterns); an independent path: fit those
    # patterns by hand, transform the whole array at once, infer
    flat = arr.reshape(-1, *arr.shape[2:])
    pre = make_preprocessor(models[1]).fit_patterns(flat[:64])
    assert res[1].preprocess["center"] == pytest.approx(list(pre.center_))
    pred, proba, _ = models[1].infer(pre.transform(flat))
    np.testing.assert_array_equal(res[1].pred.ravel(), pred)
    np.testing.assert_allclose(res[1].probs.reshape(-1, 8), proba, rtol=1e-5, atol=1e-6)
    assert res[0].com.max() > 0 and np.all(np.isfinite(res[0].com))


def test_models_with_different_preprocessing_each_get_their_own(scan_and_models, tiny_library):
    scan, arr, models, _ = scan_and_models
    lib = tiny_library
    other = build_model("pca_knn", n_components=8, input_size=lib.size)
    X, y, _ = lib.select("train")
    other.fit(X, y)
    other.meta["preprocessing"] = Preprocessor(0.8 * lib.meta["mrad_per_px"], lib.meta["convergence_mrad"],
                                               size=lib.size).to_dict()
    counting = CountingScan(scan)
    res = predict_scan_many(counting, [models[0], other], batch_size=50)
    assert counting.patterns_read == 143  # two preprocessing groups, still one pass
    a, b = (r.preprocess for r in res)
    assert a["target_mrad_per_px"] != b["target_mrad_per_px"]
    assert b["target_mrad_per_px"] == pytest.approx(0.8 * lib.meta["mrad_per_px"])
    flat = arr.reshape(-1, *arr.shape[2:])
    pre_b = make_preprocessor(other).fit_patterns(flat)
    np.testing.assert_array_equal(res[1].pred.ravel(), other.infer(pre_b.transform(flat))[0])


def test_model_without_preprocessing_is_refused(scan_and_models):
    scan, *_ = scan_and_models
    m = build_model("pca_knn")
    with pytest.raises(ValueError, match="preprocessing"):
        predict_scan(scan, m)

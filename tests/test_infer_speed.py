"""The fast inference routes keep predictions (issue 15): each kept route against its reference on real inputs.

Tolerance of every kept route: the same class on >= 99.9 % of patterns and probabilities within 1e-3 of eager
PyTorch (the feature vectors too, relative to their scale). Speed itself is measured by
``benchmarks/infer_bench.py`` and ``benchmarks/preprocess_bench.py``, never asserted here.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from polcore.infer import predict_scan
from polcore.io import ScanFormatError, open_scan
from polcore.models import build_model, load_checkpoint
from polcore.models.base import BACKENDS, FAST_MIN_PATTERNS, onnxruntime_available
from polcore.preprocess import Preprocessor, _repair, minmax

SHIPPED = "data/models/shipped/custom_cnn-binned-cls-s888.pt"
ROUTES = ["channels_last"] + (["onnxruntime"] if onnxruntime_available() else [])


def _agree(fast, ref, what: str) -> None:
    """The stated tolerance: same class on >= 99.9 %, probabilities within 1e-3, features within 1e-4 x scale."""
    (p1, q1, e1), (p0, q0, e0) = fast, ref
    assert np.mean(p1 == p0) >= 0.999, f"{what}: same class on {np.mean(p1 == p0):.4f} of patterns"
    assert np.abs(q1 - q0).max() <= 1e-3, f"{what}: probabilities differ by {np.abs(q1 - q0).max():.2e}"
    np.testing.assert_allclose(e1, e0, rtol=0, atol=1e-4 * (1 + np.abs(e0).max()), err_msg=what)


@pytest.fixture(scope="module")
def real_inputs(default_library):
    """Model inputs (n, 64, 64): library patterns of every class at 20 nm (real abTEM simulations)."""
    X, y, _ = default_library.select("test", thickness=20)
    idx = np.random.default_rng(0).permutation(len(X))[:384]
    return np.ascontiguousarray(X[idx], np.float32), np.asarray(y)[idx]


def _composed(tmp_path, lib, ny, nx, det, mrad, hot=2, seed=0):
    """A small composed scan of real library patterns (uint16 counts, gzip EMD file, hot pixels)."""
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd

    cfg = ScanComposerConfig(layout="random_domains", ny=ny, nx=nx, step_nm=0.045, thickness_nm=20, dose=3e4,
                             det_px=det, det_mrad_per_px=mrad, descan_px=1, hot_pixels=hot, seed=seed, n_domains=3)
    truth, blocks = compose_scan(cfg, lib)
    return write_emd(tmp_path / f"scan_{det}_{mrad}.h5", truth, blocks, cfg)


# ------------------------------------------------------------------------------------------------ preprocessing
def _per_pattern_reference(pre: Preprocessor, x: np.ndarray) -> np.ndarray:
    """The previous implementation: hot-pixel repair on the whole frame, binning, then one
    ``ndimage.map_coordinates(order=1, mode='nearest')`` call per pattern."""
    x = np.asarray(x, np.float32)
    if len(pre.hot_pixels_):
        x = _repair(x, pre.hot_pixels_)
    x, rows, cols = pre.reference_grid(x)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    out = np.stack([ndimage.map_coordinates(p, [rr, cc], order=1, mode="nearest") for p in x])
    return minmax(out)


@pytest.mark.parametrize("det, mrad", [(96, 1.0), (160, 0.45), (64, 1.2698400228125573)])
def test_batched_resampling_equals_per_pattern_interpolation(tmp_path, default_library, det, mrad):
    """Upsampling, downsampling (2x2 binning first) and the exact-crop path, with hot pixels on the detector."""
    scan = open_scan(_composed(tmp_path, default_library, 4, 5, det, mrad))
    x = np.concatenate([b for _, b in scan.iter_batches(64)])
    if det == 64:  # the library's own grid: an exact crop about the optical axis
        pre = Preprocessor(mrad, 24.0).fit_mean(x.mean(axis=0), mrad_per_px=mrad, center=(32.0, 32.0))
    else:
        pre = Preprocessor(1.2698400228125573, 24.0).fit_patterns(x, scan.meta)
    assert len(pre.hot_pixels_) > 0  # the composer's hot pixels were found: the repair path runs
    np.testing.assert_allclose(pre.transform(x), _per_pattern_reference(pre, x), rtol=0, atol=2e-6)
    # a batch of one and the whole batch give the same patterns
    np.testing.assert_allclose(pre.transform(x[3]), pre.transform(x)[3:4], rtol=0, atol=1e-6)


def test_fit_sum_equals_fit_patterns(tmp_path, default_library):
    scan = open_scan(_composed(tmp_path, default_library, 3, 4, 96, 1.0))
    x = np.concatenate([b for _, b in scan.iter_batches(64)])
    a = Preprocessor(1.27, 24.0).fit_patterns(x, scan.meta)
    b = Preprocessor(1.27, 24.0).fit_sum(x[:5].sum(axis=0, dtype=np.float64) + x[5:].sum(axis=0, dtype=np.float64),
                                         len(x), scan.meta)
    np.testing.assert_allclose(a.center_, b.center_, rtol=1e-9)
    assert a.source_mrad_per_px_ == pytest.approx(b.source_mrad_per_px_, rel=1e-12)
    np.testing.assert_array_equal(a.hot_pixels_, b.hot_pixels_)
    with pytest.raises(ValueError, match="fit_sum"):
        Preprocessor(1.27, 24.0).fit_sum(np.zeros((4, 4)), 0)


# ----------------------------------------------------------------------------------------------- torch backends
@pytest.mark.parametrize("family, arch", [("custom_cnn", "study"), ("custom_cnn", "binned"), ("resnet", "resnet18"),
                                          ("vgg", "vgg11_bn")])
def test_every_kept_backend_agrees_with_eager(real_inputs, family, arch):
    X, _ = real_inputs
    X = X[: 32 if family in ("resnet", "vgg") else 96]
    torch.manual_seed(0)
    model = build_model(family, "cls", arch=arch, device="cpu")
    model.net.input_norm.fit(X)
    for mod in model.net.modules():  # batch-norm statistics that are not the identity
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    model.backend = "eager"
    ref = model.infer(X)
    for route in ROUTES:
        model.backend = route
        _agree(model.infer(X), ref, f"{family}/{arch} {route}")
        assert model.active_backend == route


@pytest.mark.parametrize("head", ["reg", "proto"])
def test_backends_keep_the_other_heads(real_inputs, head):
    X, y = real_inputs
    torch.manual_seed(1)
    model = build_model("custom_cnn", head, arch="binned", device="cpu")
    model.net.input_norm.fit(X)
    if head == "proto":
        model.set_prototypes(X[:128], y[:128])
    model.backend = "eager"
    ref = model.infer(X[:64])
    for route in ROUTES:
        model.backend = route
        _agree(model.infer(X[:64]), ref, f"custom_cnn/{head} {route}")


def test_shipped_model_same_predictions_on_every_route(real_inputs):
    """The default recommended model (trained weights) on real patterns: the tolerance of the issue."""
    X, _ = real_inputs
    model = load_checkpoint(SHIPPED, device="cpu")
    model.backend = "eager"
    ref = model.infer(X)
    for route in ROUTES:
        model.backend = route
        _agree(model.infer(X), ref, f"shipped {route}")
    model.backend = "auto"
    _agree(model.infer(X), ref, "shipped auto")
    assert model.active_backend == ROUTES[-1]  # >= FAST_MIN_PATTERNS patterns: the fastest installed route


def test_auto_waits_for_a_large_call_and_rebuilds_after_the_weights_change(real_inputs):
    X, _ = real_inputs
    assert len(X) >= FAST_MIN_PATTERNS
    torch.manual_seed(2)
    model = build_model("custom_cnn", "cls", arch="binned", device="cpu")
    model.net.input_norm.fit(X)
    model.infer(X[:8])
    assert model.active_backend == "eager"  # a small call builds nothing
    model.infer(X[:FAST_MIN_PATTERNS])
    assert model.active_backend == ROUTES[-1]
    with torch.no_grad():  # weights changed in place (as an optimizer step does): the runner is stale
        model.net.backbone[1].weight.mul_(1.5)
    small = model.infer(X[: FAST_MIN_PATTERNS // 4])
    assert model.active_backend == "eager"  # the stale runner was dropped, a small call builds none
    got = model.infer(X[:FAST_MIN_PATTERNS])
    assert model.active_backend == ROUTES[-1]  # rebuilt from the new weights
    model.backend = "eager"
    ref = model.infer(X[:FAST_MIN_PATTERNS])
    _agree(got, ref, "after an in-place weight change")
    _agree(small, tuple(a[: FAST_MIN_PATTERNS // 4] for a in ref), "eager after an in-place weight change")
    other = build_model("custom_cnn", "cls", arch="binned", device="cpu")
    model.backend = "auto"
    model.infer(X[:FAST_MIN_PATTERNS])
    model.load_state_dict(other.state_dict())  # and after load_state_dict
    got = model.infer(X[:FAST_MIN_PATTERNS])
    model.backend = "eager"
    _agree(got, model.infer(X[:FAST_MIN_PATTERNS]), "after load_state_dict")


def test_backend_names_are_checked():
    model = build_model("custom_cnn", "cls", arch="binned", device="cpu")
    with pytest.raises(ValueError, match=", ".join(BACKENDS)):
        model.backend = "tensorrt"
    import copy

    model.infer(np.zeros((FAST_MIN_PATTERNS, 64, 64), np.float32))
    clone = copy.deepcopy(model)  # the runner (an ONNX session) is not copied, the model is
    assert clone._runner == {} and clone.backend == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_runs_eager(real_inputs):
    X, _ = real_inputs
    model = build_model("custom_cnn", "cls", arch="binned", device="cuda")
    model.net.input_norm.fit(X)
    pred, proba, _ = model.infer(X)
    assert model.active_backend == "eager" and proba.shape == (len(X), 8)
    cpu = model.to("cpu")
    cpu.backend = "eager"
    np.testing.assert_allclose(cpu.infer(X)[1], proba, atol=1e-3)


# --------------------------------------------------------------------------------------------------- PCA + kNN
def test_pca_knn_infer_is_predict_proba_and_embed(real_inputs):
    X, y = real_inputs
    model = build_model("pca_knn", n_components=8).fit(X[:256], y[:256])
    pred, proba, emb = model.infer(X[256:], batch_size=50)  # the same batches: BLAS sums in the same order
    np.testing.assert_array_equal(proba, model.predict_proba(X[256:], batch_size=50))
    np.testing.assert_array_equal(emb, model.embed(X[256:], batch_size=50))
    np.testing.assert_array_equal(pred, model.predict(X[256:], batch_size=50))


# ------------------------------------------------------------------------------------------- the read-ahead loop
def test_cancel_stops_the_reader_thread(tmp_path, default_library):
    scan = open_scan(_composed(tmp_path, default_library, 6, 8, 96, 1.0, hot=0))
    model = build_model("pca_knn", n_components=4).fit(*_inputs_for(scan))

    def cancel(fraction, message):
        if fraction > 0.2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        predict_scan(scan, model, batch_size=8, progress=cancel, preprocessor=_fitted(scan))
    assert not [t for t in threading.enumerate() if t.name == "polbench-prefetch"]


def test_a_reader_error_reaches_the_caller(tmp_path, default_library):
    """A corrupt compressed chunk near the end of a real HDF5 file: the reader thread's ScanFormatError is
    raised by predict_scan, naming the file, and the thread is gone."""
    import h5py

    path = _composed(tmp_path, default_library, 6, 8, 96, 1.0, hot=0)
    with h5py.File(path, "r+") as f:
        ds = f["polbench_root/datacube/data"]
        chunk = ds.chunks
        ds.id.write_direct_chunk((5, 0, 0, 0), b"\x78\x01 not a deflate stream" * 4)
    assert chunk[0] == 1
    scan = open_scan(path)
    model = build_model("pca_knn", n_components=4).fit(*_inputs_for(scan))
    with pytest.raises(ScanFormatError, match=path.name):
        predict_scan(scan, model, batch_size=8, preprocessor=_fitted(scan))
    assert not [t for t in threading.enumerate() if t.name == "polbench-prefetch"]


def _fitted(scan) -> Preprocessor:
    return Preprocessor(1.2698400228125573, 24.0).fit_patterns(next(iter(scan.iter_batches(16)))[1], scan.meta)


def _inputs_for(scan):
    x = _fitted(scan).transform(next(iter(scan.iter_batches(16)))[1])
    return x, np.arange(len(x)) % 8


@pytest.mark.parametrize("family", ["pca_knn", "custom_cnn"])
def test_the_worker_threads_change_nothing(tmp_path, default_library, family):
    """Two workers (each takes whole batches: geometry, resampling, CoM, virtual sums, the model) give the same
    maps, probabilities, features and virtual images as one, including the leading batches held for the
    geometry estimate and the preprocessing fit; only the torch kernels' rounding may differ (each worker's
    kernels run on half the threads)."""
    from polcore.infer import predict_scan_many

    scan = open_scan(_composed(tmp_path, default_library, 12, 10, 96, 1.0, hot=2))
    if family == "pca_knn":
        model = build_model("pca_knn", n_components=4).fit(*_inputs_for(scan))
    else:
        torch.manual_seed(0)
        model = build_model("custom_cnn", "cls", device="cpu", arch="binned")
    model.meta["preprocessing"] = Preprocessor(1.2698400228125573, 24.0).to_dict()
    ran = {}
    infer = model.infer

    def traced(X, *a, **k):
        ran.setdefault(workers, set()).add(threading.current_thread().name.split("_")[0])
        return infer(X, *a, **k)

    model.infer = traced
    out = {}
    for workers in (1, 2):
        out[workers] = predict_scan_many(scan, [model], batch_size=16, fit_patterns=40, embed_sample=50,
                                         workers=workers)[0]
    a, b = out[1], out[2]
    assert ran == {1: {"MainThread"}, 2: {"MainThread", "polbench-batch"}}  # the pool really ran batches
    exact = ("pred", "probs", "com", "features", "inputs", "sample_pos") if family == "pca_knn" else \
        ("com", "inputs", "sample_pos")
    for key in exact:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    if family != "pca_knn":
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
        top2 = np.sort(a.probs, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4  # no near-tie: the class cannot flip with the rounding
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(a.pred[clear], b.pred[clear])
    assert a.virtual.keys() == b.virtual.keys()
    for key in a.virtual:
        np.testing.assert_array_equal(a.virtual[key], b.virtual[key], err_msg=key)
    assert a.geometry == b.geometry

"""The ingest's speed-ups give the same numbers: the sort-based plateau / floor of the rough disc, the
disc centres of every k-th leading pattern for the geometry estimate, and one BLAS thread for the per-batch work."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from polcore.geometry import _plateau_and_floor, estimate_geometry_from
from polcore.infer import CENTRE_EVERY_PARTIAL, _blas_one_thread, _centre_every


def test_plateau_and_floor_equal_nanmedian_and_percentile():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for m in (11, 50, 4096):
            f = (rng.random((6, m)) * 100).astype(dtype)
            f[0] = 3.0  # all equal: nothing above the mean
            f[1] = np.round(f[1] / 10)  # many ties
            f[2, : m // 2] = 0.0
            mean = f.mean(axis=1, keepdims=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                want_p = np.nanmedian(np.where(f > mean, f, np.nan), axis=1)
            want_b = np.percentile(f, 5, axis=1)
            got_p, got_b = _plateau_and_floor(f, mean)
            assert got_p.dtype == want_p.dtype and got_b.dtype == want_b.dtype
            np.testing.assert_array_equal(got_p, want_p)
            np.testing.assert_array_equal(got_b, want_b)


def test_centre_every_only_where_the_descan_cannot_be_trusted():
    pos = np.stack(np.mgrid[0:128, 0:128], -1).reshape(-1, 2)
    assert _centre_every(pos[:4096], (128, 128)) == CENTRE_EVERY_PARTIAL  # leading 32 of 128 rows
    assert _centre_every(pos[:4096], (64, 64)) == 1  # the whole scan
    assert _centre_every(pos[:100], (128, 128)) == 1  # too few patterns to thin out


def test_blas_one_thread_limits_and_restores():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    before = blas_threads()
    with _blas_one_thread()():
        inside = blas_threads()
    assert all(n == 1 for n in inside)
    assert blas_threads() == before


def _record(data, theta, flip, dose, rng):
    """Patterns (ny, nx, K, K) as a detector turned by ``theta`` (with ``flip``) and an affine descan records them."""
    ny, nx, K, _ = data.shape
    t = math.radians(theta)
    m = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    if flip:
        m = m @ np.array([[0.0, 1.0], [1.0, 0.0]])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    M = swap @ m @ swap
    c = np.full(2, K // 2, float)
    out = np.empty(data.shape, np.float32)
    for iy in range(ny):
        for ix in range(nx):
            d = np.array([3.0 * (2 * iy / (ny - 1) - 1), 1.5 * (2 * ix / (nx - 1) - 1)])
            out[iy, ix] = ndimage.affine_transform(np.asarray(data[iy, ix], np.float32), M, offset=c - M @ (c + d),
                                                   order=1, mode="constant", cval=0.0)
    return rng.poisson(out / out.sum((2, 3), keepdims=True).mean() * dose).astype(np.uint16)


@pytest.mark.parametrize("flip", [False, True])
def test_rotation_is_the_same_from_every_fourth_centre(default_library, flip):
    """With an affine descan surface the rotation comes from the CoM field of every pattern whichever centres fit
    the surface: on the leading rows (as the ingest sees a large scan) it is the same to 1e-6 deg."""
    from polcore.simulate.composer import ScanComposerConfig, compose_scan

    n = 32
    cfg = ScanComposerConfig(layout="random_domains", ny=n, nx=n, thickness_nm=10.0, det_px=default_library.size,
                             seed=3, n_domains=4)
    _, blocks = compose_scan(cfg, default_library, block_rows=n)
    data = np.concatenate([b for _, b in blocks], axis=0)
    rec = _record(data, 30.0, flip, 2e4, np.random.default_rng(5 + flip))
    K = rec.shape[-1]
    rows = 14  # leading rows only: the descan surface cannot be trusted there
    x = rec[:rows].reshape(-1, K, K)
    pos = np.stack(np.mgrid[0:rows, 0:n], -1).reshape(-1, 2)
    assert _centre_every(pos, (n, n)) == CENTRE_EVERY_PARTIAL
    g1 = estimate_geometry_from(x, pos, (n, n))
    g4 = estimate_geometry_from(x, pos, (n, n), centre_every=CENTRE_EVERY_PARTIAL)
    assert g1.sources["rotation_deg"] == "estimated"
    assert abs((g1.rotation_deg - 30.0 + 90.0) % 180.0 - 90.0) < 3.0  # the turn, modulo the half-turn
    assert g4.rotation_deg == pytest.approx(g1.rotation_deg, abs=1e-6)
    assert g4.flip == g1.flip == flip
    assert g4.confidence["rotation_deg"] == g1.confidence["rotation_deg"]
    assert g4.confidence["flip"] == g1.confidence["flip"]
    assert g4.confidence["descan"] == g1.confidence["descan"] == "low"
    assert g4.details["disc_radius_px"] == pytest.approx(g1.details["disc_radius_px"], abs=0.1)


def test_torch_threads_are_restored_when_the_last_pass_leaves():
    """Two passes overlapping in one process (two uploads): torch runs on the cores / workers while either is
    inside, and on its own count again only when both have left, whatever order they leave in."""
    import torch

    from polcore.infer import _torch_threads

    class Net:
        is_torch = True

    n = torch.get_num_threads()
    a, b = _torch_threads([Net()], 2), _torch_threads([Net()], 2)
    a.__enter__()
    b.__enter__()
    assert torch.get_num_threads() == max(1, n // 2)
    a.__exit__(None, None, None)
    assert torch.get_num_threads() == max(1, n // 2)
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == n
    with _torch_threads([object()], 2):  # no torch model: nothing changes
        assert torch.get_num_threads() == n


def test_workers_default_follows_the_models():
    """Whole batches side by side for the custom CNN and numpy models; one batch on every core as soon as a
    pass holds a ResNet / VGG (they measured slower side by side) or a GPU model."""
    import os

    from polcore.infer import _workers_default
    from polcore.models import build_model

    cores = min(2, len(os.sched_getaffinity(0)))
    cnn = build_model("custom_cnn", "cls", device="cpu", arch="binned")
    res = build_model("resnet", "cls", device="cpu")
    pca = build_model("pca_knn")
    assert cnn.batch_parallel and not res.batch_parallel
    assert _workers_default([cnn, pca]) == cores
    assert _workers_default([cnn, res, pca]) == 1

    class OnGpu:
        device = "cuda"

    assert _workers_default([pca, OnGpu()]) == 1

"""polcore.preprocess: disc centre and radius, resampling to the library sampling, CoM filter, augmentations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polcore.preprocess import (
    Augmenter,
    Preprocessor,
    com_filter_mask,
    com_magnitude,
    find_disc_center,
    measure_disc_radius,
    minmax,
)

TARGET = 1.27  # mrad/px, about the library's sampling
ALPHA = 24.0  # mrad


def disc(shape, cy, cx, r, *, level=1.0, bg=0.02, noise=0.0, rng=None, supersample=4):
    """Uniform disc (anti-aliased by supersampling) on a flat background, optional Gaussian noise."""
    ky, kx = shape
    s = supersample
    yy, xx = np.mgrid[0 : ky * s, 0 : kx * s]
    yy = (yy + 0.5) / s - 0.5
    xx = (xx + 0.5) / s - 0.5
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.float64)
    img = inside.reshape(ky, s, kx, s).mean(axis=(1, 3)) * (level - bg) + bg
    if noise:
        img = img + rng.normal(0.0, noise, img.shape)
    return img


@pytest.mark.parametrize("cy, cx", [(30.3, 35.7), (36.6, 27.2), (52.4, 75.1), (75.9, 49.6)])
def test_find_disc_center_off_centre_both_directions(cy, cx):
    rng = np.random.default_rng(1)
    img = disc((128, 128), cy, cx, 19.0, noise=0.03, rng=rng)
    fy, fx = find_disc_center(img)
    assert abs(fy - cy) < 0.15 and abs(fx - cx) < 0.15


def test_find_disc_center_ignores_hot_pixels_and_stray_spots():
    rng = np.random.default_rng(2)
    img = disc((96, 96), 40.2, 55.8, 15.0, noise=0.02, rng=rng)
    img[5, 5] = 50.0  # hot pixel
    img += disc((96, 96), 85.0, 10.0, 3.0, level=0.6, bg=0.0)  # a small stray spot
    fy, fx = find_disc_center(img)
    assert abs(fy - 40.2) < 0.2 and abs(fx - 55.8) < 0.2


@pytest.mark.parametrize("r", [12.0, 19.0, 31.5])
def test_measure_disc_radius(r):
    img = disc((128, 128), 63.3, 64.6, r, noise=0.02, rng=np.random.default_rng(3))
    assert measure_disc_radius(img) == pytest.approx(r, abs=0.3)


def test_flat_pattern_raises():
    with pytest.raises(ValueError, match="flat"):
        find_disc_center(np.ones((32, 32)))
    with pytest.raises(ValueError, match="2-D"):
        find_disc_center(np.ones((4, 32, 32)))


def _centre_and_radius(out):
    m = out.mean(axis=0)
    return find_disc_center(m), measure_disc_radius(m)


@pytest.mark.parametrize("use_calibration", [True, False])
def test_preprocessor_rescales_and_centres(use_calibration):
    """A scan sampled twice as finely (0.635 mrad/px) with the disc off centre comes out like the library:
    disc centre on pixel (32, 32), radius alpha / 1.27 mrad/px = 18.9 px."""
    src = TARGET / 2
    r_src = ALPHA / src
    cy, cx = 70.4, 88.7
    rng = np.random.default_rng(4)
    pats = np.stack([disc((160, 176), cy, cx, r_src, noise=0.01, rng=rng) for _ in range(3)])
    pre = Preprocessor(TARGET, ALPHA, size=64)
    pre.fit_mean(pats.mean(axis=0), mrad_per_px=src if use_calibration else None)
    assert pre.info["scale_source"] == ("calibration" if use_calibration else "disc_radius")
    assert pre.source_mrad_per_px_ == pytest.approx(src, rel=0.02)
    out = pre.transform(pats)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    (oy, ox), r = _centre_and_radius(out)
    # not mirrored: the study's crop would put this disc tens of pixels off
    assert abs(oy - 32) < 0.3 and abs(ox - 32) < 0.3
    assert r == pytest.approx(ALPHA / TARGET, abs=0.5)


def test_preprocessor_downsamples_coarse_factor():
    """4x finer source (integer binning then interpolation) still lands centred with the right radius."""
    src = TARGET / 4.3
    pats = disc((300, 300), 160.2, 139.7, ALPHA / src)[None]
    pre = Preprocessor(TARGET, ALPHA).fit_mean(pats[0], mrad_per_px=src)
    (oy, ox), r = _centre_and_radius(pre.transform(pats))
    assert abs(oy - 32) < 0.3 and abs(ox - 32) < 0.3
    assert r == pytest.approx(ALPHA / TARGET, abs=0.5)


def test_identity_on_library_geometry():
    """Library patterns (64 px, optical axis at pixel 32, target sampling) pass through: only min-max."""
    rng = np.random.default_rng(5)
    x = rng.random((4, 64, 64)).astype(np.float32) * 3 + 1
    pre = Preprocessor(TARGET, ALPHA).fit_mean(disc((64, 64), 32, 32, 19), mrad_per_px=TARGET, center=(32, 32))
    np.testing.assert_array_equal(pre.transform(x), minmax(x))


def test_to_dict_round_trip_is_json_and_same_output():
    pats = disc((100, 100), 47.3, 52.9, 30.0, noise=0.01, rng=np.random.default_rng(6))[None]
    pre = Preprocessor(TARGET, ALPHA).fit_mean(pats[0])
    d = json.loads(json.dumps(pre.to_dict()))
    pre2 = Preprocessor.from_dict(d)
    np.testing.assert_array_equal(pre.transform(pats), pre2.transform(pats))
    assert pre2.info["scale_source"] == "disc_radius"


def test_transform_requires_fit_and_validates():
    with pytest.raises(RuntimeError, match="not fitted"):
        Preprocessor(TARGET, ALPHA).transform(np.zeros((1, 64, 64)))
    with pytest.raises(ValueError):
        Preprocessor(0.0, ALPHA)


def test_fit_scan_uses_calibration_or_disc_radius():
    io = pytest.importorskip("polcore.io")
    from polcore.types import ScanMeta

    src = TARGET * 0.8
    d = disc((80, 80), 41.3, 37.9, ALPHA / src, noise=0.01, rng=np.random.default_rng(7))
    arr = np.broadcast_to(d, (6, 5, 80, 80)).astype(np.float32)
    pre = Preprocessor(TARGET, ALPHA).fit_scan(io.ArrayScan(arr, meta=ScanMeta(mrad_per_px=src)), max_patterns=8)
    assert pre.info["scale_source"] == "calibration" and pre.source_mrad_per_px_ == src
    assert pre.center_ == pytest.approx((41.3, 37.9), abs=0.15)
    assert pre.info["n_mean_patterns"] <= 10
    pre2 = Preprocessor(TARGET, ALPHA).fit_scan(io.ArrayScan(arr, meta=ScanMeta()))
    assert pre2.info["scale_source"] == "disc_radius"
    assert pre2.source_mrad_per_px_ == pytest.approx(src, rel=0.02)


def test_com_magnitude_and_filter():
    base = disc((64, 64), 32.0, 32.0, 10.0, bg=0.0)
    shifted = disc((64, 64), 35.0, 36.0, 10.0, bg=0.0)  # shift (3, 4) -> 5 px
    com = com_magnitude(np.stack([base, shifted]))
    assert com[0] == pytest.approx(0.0, abs=1e-6)
    assert com[1] == pytest.approx(5.0, abs=0.02)
    assert com_magnitude(shifted[None], center=(35.0, 36.0))[0] == pytest.approx(0.0, abs=0.02)
    np.testing.assert_array_equal(com_filter_mask([0.1, 0.5, 0.2, 0.9]), [False, True, False, True])


def test_augmenter_changes_training_data_reproducibly():
    x = minmax(np.stack([disc((64, 64), 32, 32, 19)] * 16)).astype(np.float32)
    x0 = x.copy()
    a1 = Augmenter(np.random.default_rng(11))(x)
    a2 = Augmenter(np.random.default_rng(11))(x)
    np.testing.assert_array_equal(x, x0)  # input untouched
    np.testing.assert_array_equal(a1, a2)  # seeded
    assert a1.shape == x.shape and a1.dtype == np.float32
    changed = np.any(np.abs(a1 - x) > 1e-4, axis=(1, 2))
    assert 0 < changed.sum() <= 16
    off = Augmenter(np.random.default_rng(0), p_blur=0, p_brightness_contrast=0, p_noise=0, p_dose=0, p_shift=0)
    np.testing.assert_array_equal(off(x), x)
    with pytest.raises(ValueError, match="Generator"):
        Augmenter(0)


def test_augmenter_ops_each_apply():
    x = minmax(disc((64, 64), 32, 32, 19)[None]).astype(np.float32)
    only = dict(p_blur=0, p_brightness_contrast=0, p_noise=0, p_dose=0, p_shift=0)
    for op in only:
        out = Augmenter(np.random.default_rng(3), **{**only, op: 1.0})(x)
        assert np.abs(out - x).max() > 1e-3, op


def test_fast_com_and_block_mean_agree_with_the_plain_forms():
    """The scan pass's float32 forms: CoM shifts from one matrix product, block means by column sums."""
    from polcore.preprocess import block_mean

    rng = np.random.default_rng(5)
    x = rng.random((7, 64, 64), dtype=np.float32) ** 4
    x[3] = 0.0  # an empty pattern: no shift
    np.testing.assert_allclose(com_magnitude(x, exact=False), com_magnitude(x), rtol=0, atol=1e-4)
    assert com_magnitude(x, exact=False)[3] == 0.0
    np.testing.assert_allclose(block_mean(x, 4), x.reshape(7, 16, 4, 16, 4).mean((2, 4)), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 5"):
        block_mean(x, 5)

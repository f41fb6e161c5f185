"""Scan geometry (polcore.geometry): conventions, disc centres, descan, rotation/flip estimation, refusals.

Distorted scans are made here with an independent forward model (``scipy.ndimage.affine_transform`` per
pattern), tied to numpy's own ``rot90`` / ``.T`` by a test, from scans composed out of the committed library.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from polcore.geometry import (
    Geometry,
    apply_geometry,
    centre_of_mass,
    estimate_geometry,
    estimate_geometry_from,
    estimate_rotation,
    fit_descan,
    measure_disc_centres,
    rotate_vectors,
    rotation_matrix,
)
from polcore.types import CLASS_NAMES, ScanMeta

DOSE = 2e4


# ---------------------------------------------------------------------------------------------------------------
# helpers: composed scans and an independent forward model of a rotated / flipped detector with descan
# ---------------------------------------------------------------------------------------------------------------
def _compose(lib, *, n=32, thickness=10.0, layout="random_domains", seed=3, **kw):
    from polcore.simulate.composer import ScanComposerConfig, compose_scan

    cfg = ScanComposerConfig(layout=layout, ny=n, nx=n, thickness_nm=thickness, det_px=lib.size, seed=seed,
                             n_domains=4, **kw)
    truth, blocks = compose_scan(cfg, lib, block_rows=n)
    return truth, np.concatenate([b for _, b in blocks], axis=0)


def _rc_matrix(theta, flip):
    """The detector->scan map R(theta) F written on (row, col) coordinates, built from first principles."""
    t = math.radians(theta)
    c, s = math.cos(t), math.sin(t)
    # on (x right, y down): counter-clockwise on screen turns +x towards -y
    m = np.array([[c, s], [-s, c]])
    if flip:
        m = m @ np.array([[0.0, 1.0], [1.0, 0.0]])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    return swap @ m @ swap


def _ramp(ny, nx, amp=3.0):
    """Descan: the disc centre offset (dy, dx) [px], a linear ramp of +-amp across the scan."""
    iy, ix = np.mgrid[0:ny, 0:nx]
    u, v = 2 * iy / (ny - 1) - 1, 2 * ix / (nx - 1) - 1
    return np.stack([amp * u, amp * (0.6 * v - 0.4 * u)], -1)


def _record(data, theta, flip, descan=None, dose=None, rng=None, centre=None):
    """Patterns (ny, nx, K, K) in the scan frame (disc at K//2) as a detector rotated by ``theta`` (detector->scan,
    counter-clockwise) with ``flip`` and the disc offset by ``descan`` records them."""
    ny, nx, K, _ = data.shape
    M = _rc_matrix(theta, flip)
    c = np.full(2, K // 2 if centre is None else centre, float)
    out = np.empty(data.shape, np.float32)
    for iy in range(ny):
        for ix in range(nx):
            d = np.zeros(2) if descan is None else descan[iy, ix]
            out[iy, ix] = ndimage.affine_transform(np.asarray(data[iy, ix], np.float32), M, offset=c - M @ (c + d),
                                                   order=1, mode="constant", cval=0.0)
    if dose is not None:
        out = rng.poisson(out / out.sum((2, 3), keepdims=True).mean() * dose).astype(np.uint16)
    return out


def default_library_mrad():
    """The committed library's detector sampling [mrad/px] (24 mrad semi-angle over a 18.9 px disc)."""
    import h5py

    from polcore.simulate import DEFAULT_LIBRARY

    with h5py.File(DEFAULT_LIBRARY, "r") as f:
        return float(f.attrs["mrad_per_px"])


def _positions(ny, nx):
    return np.stack(np.mgrid[0:ny, 0:nx], -1).reshape(-1, 2)


def _flat(x):
    return x.reshape(-1, *x.shape[-2:])


def _angle(com_rel):
    """On-screen angle [deg] of CoM shifts (..., 2) given as (dy, dx)."""
    return np.degrees(np.arctan2(-com_rel[..., 0], com_rel[..., 1])) % 360


def _disc(K=64, centre=(31.3, 32.6), R=19.0, grad=0.4, grad_deg=45.0, blur=0.7, ss=4):
    """A bright-field disc with an anti-aliased edge and an internal intensity tilt towards ``grad_deg``."""
    o = (np.arange(ss) + 0.5) / ss - 0.5
    yy = (np.arange(K)[:, None] + o[None, :]).ravel()
    xx = yy.copy()
    Y, X = np.meshgrid(yy, xx, indexing="ij")
    a = math.radians(grad_deg)
    inside = (Y - centre[0]) ** 2 + (X - centre[1]) ** 2 <= R * R
    inten = 1 + grad * ((X - centre[1]) * math.cos(a) - (Y - centre[0]) * math.sin(a)) / R
    img = (inside * inten).reshape(K, ss, K, ss).mean(axis=(1, 3)) + 0.01
    return ndimage.gaussian_filter(img, blur) if blur else img


# ---------------------------------------------------------------------------------------------------------------
# conventions
# ---------------------------------------------------------------------------------------------------------------
def test_rotation_matrix_is_counter_clockwise_on_screen_and_flips_first():
    # +x (right) turned by +90 deg points up (-y); the on-screen angle grows by 90
    np.testing.assert_allclose(rotation_matrix(90) @ [1, 0], [0, -1], atol=1e-12)
    np.testing.assert_allclose(rotation_matrix(0, flip=True) @ [1, 2], [2, 1])
    np.testing.assert_allclose(rotation_matrix(30, flip=True), rotation_matrix(30) @ rotation_matrix(0, True))
    # py4DSTEM: with (qx, qy) along (rows, cols), calibrated = R @ (qx, qy), or R @ (qy, qx) when QR_flip,
    # R = [[cos, -sin], [sin, cos]]. Same numbers in polcore's (x = cols, y = rows) components:
    rng = np.random.default_rng(0)
    for theta in (30.0, -75.0, 120.0):
        for flip in (False, True):
            t = math.radians(theta)
            Rp = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
            vx, vy = rng.normal(size=2)  # detector vector: vx along kx (columns), vy along ky (rows)
            qx, qy = vy, vx  # py4DSTEM components
            cal = Rp @ (np.array([qy, qx]) if flip else np.array([qx, qy]))
            ours = rotation_matrix(theta, flip) @ [vx, vy]
            np.testing.assert_allclose([ours[1], ours[0]], cal, atol=1e-12)


def test_forward_model_matches_numpy_rot90_and_transpose():
    """The test's detector model agrees with numpy: rotation_deg = -90 records np.rot90(p), flip records p.T."""
    p = np.random.default_rng(1).random((1, 1, 33, 33)).astype(np.float32)  # odd: the centre pixel is exact
    np.testing.assert_allclose(_record(p, -90, False)[0, 0], np.rot90(p[0, 0], 1), atol=1e-6)
    np.testing.assert_allclose(_record(p, 0, True)[0, 0], p[0, 0].T, atol=1e-6)
    np.testing.assert_allclose(_record(p, 90, True)[0, 0], np.rot90(p[0, 0].T, 1), atol=1e-6)


@pytest.mark.parametrize("recorded, geom", [
    (lambda p: np.rot90(p, 1), Geometry(rotation_deg=-90)),
    (lambda p: np.rot90(p, -1), Geometry(rotation_deg=90)),
    (lambda p: p.T, Geometry(flip=True)),
    (lambda p: np.rot90(p.T, 1), Geometry(rotation_deg=90, flip=True)),  # transpose first, then rotate
])
def test_apply_geometry_undoes_numpy_rotations_exactly(recorded, geom):
    p = np.random.default_rng(2).random((33, 33)).astype(np.float32)
    back = apply_geometry(recorded(p)[None], [[0, 0]], geom)
    np.testing.assert_allclose(back[0], p, atol=1e-5)


def test_rotate_vectors_matches_the_com_of_applied_patterns():
    p = _disc(K=64, centre=(32.0, 32.0), grad=0.5, grad_deg=20.0)
    for theta, flip in ((35.0, False), (-110.0, True)):
        g = Geometry(rotation_deg=theta, flip=flip)
        com0 = centre_of_mass(p[None])[0] - 32
        out = apply_geometry(p[None], [[0, 0]], g)
        com1 = centre_of_mass(out)[0] - 32
        vx, vy = rotate_vectors(com0[1], com0[0], g)
        np.testing.assert_allclose([vy, vx], com1, atol=0.05)
        back = rotate_vectors(vx, vy, g, inverse=True)
        np.testing.assert_allclose([back[1], back[0]], com0, atol=1e-9)


def test_geometry_dict_round_trip_and_validation():
    g = Geometry(rotation_deg=-190.0, flip=True, descan_y=(32, 0.01, 0.0), descan_x=(31, 0.0, -0.02),
                 mrad_per_px=1.27, sources={"rotation_deg": "estimated"}, confidence={"rotation_deg": "high"},
                 notes=("n",), details={"a": 1})
    assert g.rotation_deg == pytest.approx(170.0)
    g2 = Geometry.from_dict(json.loads(json.dumps(g.to_dict())))
    assert g2 == g
    np.testing.assert_allclose(g.disc_centre([[10, 20]]), [[32.1, 30.6]])
    np.testing.assert_allclose(Geometry().disc_centre([[3, 4]], (64, 65)), [[32, 32]])
    with pytest.raises(ValueError):
        Geometry(descan_y=(1, 2), descan_x=(1, 2))
    with pytest.raises(ValueError):
        Geometry(sources={"flip": "guess"})


# ---------------------------------------------------------------------------------------------------------------
# disc centres and descan
# ---------------------------------------------------------------------------------------------------------------
def test_disc_centre_from_the_edge_ignores_the_internal_gradient():
    """A disc with a strong internal intensity gradient (the polarization signal) is found at its geometric
    centre within 0.1 px while its centre of mass moves by more than 0.5 px."""
    rng = np.random.default_rng(3)
    pats, true = [], []
    for k in range(8):
        c = (30.0 + rng.uniform(-2, 2), 33.0 + rng.uniform(-2, 2))
        pats.append(_disc(centre=c, grad=0.4, grad_deg=45.0 * k))
        true.append(c)
    pats, true = np.stack(pats), np.array(true)
    cen, info = measure_disc_centres(pats, _positions(1, 8))
    com = centre_of_mass(pats)
    assert np.all(info["ok"])
    assert np.abs(cen - true).max() < 0.1
    assert np.linalg.norm(com - true, axis=1).min() > 0.5
    assert np.median(info["radius"]) == pytest.approx(19.0, abs=0.3)
    # at a finite dose the edge stays unbiased (scatter only)
    noisy = rng.poisson(pats / pats.sum((1, 2), keepdims=True) * DOSE).astype(np.uint16)
    cen_n, _ = measure_disc_centres(noisy)
    assert np.abs(cen_n - true).max() < 0.35


def test_fit_descan_is_robust_and_reports_range():
    rng = np.random.default_rng(4)
    pos = _positions(24, 30)
    true = np.stack([31.0 + 0.1 * pos[:, 0] - 0.05 * pos[:, 1], 33.0 + 0.08 * pos[:, 1]], 1)
    meas = true + rng.normal(0, 0.5, true.shape)
    bad = rng.choice(len(pos), 40, replace=False)
    meas[bad] += rng.normal(0, 8, (40, 2))  # 5 % wild centres
    fit = fit_descan(meas, pos, 1, nav_shape=(24, 30))
    assert fit.n_outliers >= 30
    np.testing.assert_allclose(fit.evaluate(pos), true, atol=0.12)
    assert fit.range_y_px == pytest.approx(0.1 * 23 + 0.05 * 29, abs=0.1)
    assert fit.range_x_px == pytest.approx(0.08 * 29, abs=0.1)
    assert fit.residual_px == pytest.approx(0.5, rel=0.2)
    q = fit_descan(meas, pos, 2, nav_shape=(24, 30))
    assert len(q.coeffs_y) == 6 and np.abs(q.evaluate(pos) - true).max() < 0.25
    # leading rows only: the surface is extrapolated and the coverage says so
    lead = fit_descan(meas[:120], pos[:120], 1, nav_shape=(24, 30))
    assert lead.coverage[0] < 0.25


# ---------------------------------------------------------------------------------------------------------------
# rotation, flip and descan on composed scans
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scan10(default_library):
    return _compose(default_library, thickness=10.0)


@pytest.mark.parametrize("theta", [30.0, -75.0, 120.0])
@pytest.mark.parametrize("flip", [False, True])
def test_rotation_flip_and_descan_are_recovered(scan10, theta, flip):
    _, data = scan10
    ny, nx, K, _ = data.shape
    d = _ramp(ny, nx)
    rec = _record(data, theta, flip, d, DOSE, np.random.default_rng(int(theta) + 7 * flip + 100))
    g = estimate_geometry_from(_flat(rec), _positions(ny, nx), (ny, nx))
    err = (g.rotation_deg - theta + 180) % 360 - 180
    assert abs(err) < 2.0, (g.rotation_deg, g.details["rotation"])
    assert g.flip == flip
    assert g.sources["rotation_deg"] == "estimated" and g.confidence["rotation_deg"] == "high"
    assert g.confidence["flip"] == "high"
    fit = g.details["descan"]
    assert fit["range_y_px"] == pytest.approx(6.0, abs=0.3)
    assert fit["range_x_px"] == pytest.approx(6.0, abs=0.3)
    surf = g.disc_centre(_positions(ny, nx)) - K // 2
    assert np.abs(surf - d.reshape(-1, 2)).max() < 0.3
    assert g.confidence["descan"] == "high"


def test_applied_geometry_restores_the_undistorted_patterns(default_library):
    """Estimated from the noisy distorted scan, applied to it noise-free: the patterns come back much closer to
    the undistorted ones than two classes at the same probe positions are to each other."""
    lib = default_library
    ru, lu, ld = (int(np.flatnonzero(lib.variant_class == CLASS_NAMES.index(c))[0]) for c in ("RU", "LU", "LD"))
    _, p_ru = _compose(lib, layout="single", variants=(ru,), seed=9)
    _, p_lu = _compose(lib, layout="single", variants=(lu,), seed=9)
    _, p_ld = _compose(lib, layout="single", variants=(ld,), seed=9)
    ny, nx, K, _ = p_ru.shape
    d = _ramp(ny, nx)
    noisy = _record(p_ru, -75.0, True, d, DOSE, np.random.default_rng(5))
    clean = _record(p_ru, -75.0, True, d)
    pos = _positions(ny, nx)
    g = estimate_geometry_from(_flat(noisy), pos, (ny, nx))
    assert abs((g.rotation_deg + 75.0 + 180) % 360 - 180) < 2.0 and g.flip
    back = apply_geometry(_flat(clean), pos, g)
    ref = _flat(p_ru)

    def nl2(a, b):
        return np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)

    geom_err = np.median(nl2(back, ref))
    class_diff = min(np.median(nl2(_flat(p_lu), ref)), np.median(nl2(_flat(p_ld), ref)))
    assert geom_err < 0.4 * class_diff, (geom_err, class_diff)
    # without the geometry the distorted patterns are far off
    assert np.median(nl2(_flat(clean), ref)) > class_diff


def test_ru_pattern_survives_a_90_degree_detector_and_back(default_library):
    """A pattern simulated for RU, recorded on a detector turned by 90 deg (np.rot90) and brought back with the
    geometry estimated from the scan, keeps its CoM direction: a right-up CoM stays right-up."""
    # the synthetic polarization signal: an intensity tilt towards RU (45 deg) moves the CoM to 45 deg
    p = _disc(K=65, centre=(32.0, 32.0), grad=0.3, grad_deg=45.0)
    assert _angle(centre_of_mass(p[None])[0] - 32) == pytest.approx(45.0, abs=0.5)
    back = apply_geometry(np.rot90(p, 1)[None], [[0, 0]], Geometry(rotation_deg=-90))
    assert _angle(centre_of_mass(back)[0] - 32) == pytest.approx(45.0, abs=0.5)
    # library RU patterns through a composed RU scan, np.rot90 on every pattern, estimation, application
    lib = default_library
    ru = int(np.flatnonzero(lib.variant_class == CLASS_NAMES.index("RU"))[0])
    assert tuple(lib.variant_vector[ru][:2]) == (1, -1)
    _, data = _compose(lib, layout="single", variants=(ru,), seed=4)
    ny, nx, K, _ = data.shape
    rot = np.rot90(data, 1, axes=(2, 3))  # about (K-1)/2: the disc lands at (K//2 - 1, K//2), found as descan
    rng = np.random.default_rng(6)
    noisy = rng.poisson(rot / rot.sum((2, 3), keepdims=True).mean() * DOSE).astype(np.uint16)
    pos = _positions(ny, nx)
    g = estimate_geometry_from(_flat(noisy), pos, (ny, nx))
    assert abs((g.rotation_deg + 90.0 + 180) % 360 - 180) < 2.0 and not g.flip
    assert g.confidence["rotation_deg"] == "high"
    a0 = _angle(centre_of_mass(_flat(data)) - K // 2)
    mag = np.linalg.norm(centre_of_mass(_flat(data)) - K // 2, axis=1)
    a1 = _angle(centre_of_mass(apply_geometry(_flat(rot), pos, g)) - K // 2)
    right_up = (a0 > 10) & (a0 < 80) & (mag > 1.0)
    assert right_up.sum() >= 20
    diff = (a1 - a0 + 180) % 360 - 180
    assert np.abs(diff[right_up]).max() < 5.0
    assert np.all((a1[right_up] > 0) & (a1[right_up] < 90))


def test_thick_scan_reports_the_half_turn_honestly(default_library):
    """At 20 nm the dark-field rule is not reliable (channelling); the rotation is right modulo 180 deg, and the
    half-turn is either right or reported as ambiguous (confidence 'low'), never wrong with 'high'."""
    _, data = _compose(default_library, thickness=20.0, seed=8)
    ny, nx, K, _ = data.shape
    rec = _record(data, 30.0, False, _ramp(ny, nx), DOSE, np.random.default_rng(8))
    g = estimate_geometry_from(_flat(rec), _positions(ny, nx), (ny, nx))
    err = (g.rotation_deg - 30.0 + 180) % 360 - 180
    # modulo 180 deg; at 20 nm the CoM field carries a systematic error of about 1 deg (geometry_bench.py)
    assert abs((err + 90) % 180 - 90) < 2.5 and g.flip is False
    half = g.details["rotation"]["half_turn_confidence"]
    if half == "high":
        assert abs(err) < 2.0
    else:
        assert g.confidence["rotation_deg"] == "low"
        assert any("modulo 180" in n for n in g.notes)


# ---------------------------------------------------------------------------------------------------------------
# refusals, sources, overrides, the scan path
# ---------------------------------------------------------------------------------------------------------------
def test_refuses_small_scans_and_scans_without_contrast(scan10):
    _, data = scan10
    ny, nx, K, _ = data.shape
    rng = np.random.default_rng(10)
    rec = _record(data, 30.0, False, _ramp(ny, nx), DOSE, rng)
    small = rec[:4, :4]
    g = estimate_geometry_from(_flat(small), _positions(4, 4), (4, 4))
    assert g.confidence["rotation_deg"] == "none" and g.sources["rotation_deg"] == "default"
    assert g.rotation_deg == 0.0 and any("too small" in n for n in g.notes)
    rot, flip, conf, info = estimate_rotation(np.zeros((4, 4)), np.zeros((4, 4)))
    assert (rot, flip, conf) == (None, None, "none") and "too small" in info["reason"]
    # identical patterns: Poisson noise only, and noise-free
    same = np.broadcast_to(data[5, 7], data.shape)
    noisy = rng.poisson(same / same.sum((2, 3), keepdims=True) * DOSE).astype(np.uint16)
    for pats in (noisy, same):
        g = estimate_geometry_from(_flat(pats), _positions(ny, nx), (ny, nx))
        assert g.confidence["rotation_deg"] == "none" and g.confidence["flip"] == "none"
        assert any("no atomic-resolution contrast" in n or "no contrast" in n for n in g.notes)
    # a white-noise CoM field of unknown noise level is refused by the shuffle test
    w = rng.normal(size=(2, 32, 32))
    _, _, conf, info = estimate_rotation(w[0], w[1])
    assert conf == "none" and "shuffled" in info["reason"]


def test_sources_file_user_and_the_scan_path(scan10):
    from polcore.io import ArrayScan

    _, data = scan10
    ny, nx, K, _ = data.shape
    rec = _record(data, -75.0, True, _ramp(ny, nx), DOSE, np.random.default_rng(11))
    scan = ArrayScan(rec, meta=ScanMeta(convergence_mrad=24.0))
    g = estimate_geometry(scan, max_patterns=700)  # central window + strided grid
    assert g.details["n_patterns"] <= 700
    assert abs((g.rotation_deg + 75.0 + 180) % 360 - 180) < 2.0 and g.flip
    assert g.sources == {"descan": "estimated", "rotation_deg": "estimated", "flip": "estimated",
                         "mrad_per_px": "estimated"}
    assert g.mrad_per_px == pytest.approx(float(default_library_mrad()), rel=0.05)
    # the file's calibration wins over the estimate (and a disagreement is noted); the user wins over both
    meta = ScanMeta(rotation_deg=10.0, flip=True, mrad_per_px=1.1)
    g = estimate_geometry_from(_flat(rec), _positions(ny, nx), (ny, nx), meta)
    assert (g.rotation_deg, g.flip, g.mrad_per_px) == (10.0, True, 1.1)
    assert g.sources["rotation_deg"] == g.sources["flip"] == g.sources["mrad_per_px"] == "file"
    assert any("disagrees" in n for n in g.notes)
    g = estimate_geometry_from(_flat(rec), _positions(ny, nx), (ny, nx), meta,
                               overrides={"rotation_deg": -75.0, "descan_y": (32, 0, 0), "descan_x": (32, 0, 0)})
    assert g.rotation_deg == -75.0 and g.sources["rotation_deg"] == "user" and g.sources["descan"] == "user"
    assert g.sources["flip"] == "file" and not any("disagrees" in n for n in g.notes)
    # rotation known from the file, flip not: the flip is chosen at that rotation
    g = estimate_geometry_from(_flat(rec), _positions(ny, nx), (ny, nx), ScanMeta(rotation_deg=-75.0))
    assert g.flip is True and g.sources["flip"] == "estimated" and g.confidence["flip"] == "high"
    with pytest.raises(ValueError, match="unknown geometry override"):
        estimate_geometry_from(_flat(rec[:2]), _positions(2, nx), (ny, nx), overrides={"angle": 3})

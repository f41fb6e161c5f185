"""polcore.analysis.periodic: planted periods and angles, folding onto the unit cell, CoM relation."""

import numpy as np
import pytest

from polcore.analysis import com_relation, fold_to_cell, periodicity


def _stripes(rng, period, angle_deg, shape=(96, 128), duty=0.4, flip=0.1, masked=0.1):
    """Binary error map: stripes with wave vector |k| = 1/period at angle_deg (on screen), noise, NaN mask."""
    a = np.deg2rad(angle_deg)
    ky, kx = -np.sin(a) / period, np.cos(a) / period  # rows go down: angle = atan2(-ky, kx)
    iy, ix = np.indices(shape)
    err = (((ky * iy + kx * ix + rng.uniform()) % 1.0) < duty).astype(float)
    f = rng.random(shape) < flip
    err[f] = 1.0 - err[f]
    err[rng.random(shape) < masked] = np.nan
    return err


def _angle_diff(a, b):
    return abs((a - b + 90.0) % 180.0 - 90.0)


CASES = [(2.0, 0.0), (2.0, 63.0), (3.0, 90.0), (4.5, 17.0), (6.3, 135.0), (9.0, 45.0), (12.7, 101.0),
         (17.0, 160.0), (24.0, 30.0), (32.0, 90.0), (32.0, 4.0)]


@pytest.mark.parametrize("period,angle", CASES)
def test_planted_period_and_angle_recovered(period, angle):
    rng = np.random.default_rng(int(period * 100 + angle))
    r = periodicity(_stripes(rng, period, angle), lattice_period_px=period)
    assert abs(r["period_px"] - period) < 1.0
    assert abs(r.period_px - period) < 0.05 * period  # in fact far better than a pixel
    assert _angle_diff(r["angle_deg"], angle) < 2.0
    assert 0.0 <= r["angle_deg"] < 180.0
    assert r.significant and r.periodic_fraction > 0.4
    assert r["lattice_match"] < 0.02


def test_random_map_has_low_periodic_fraction():
    rng = np.random.default_rng(7)
    for _ in range(3):
        r = periodicity((rng.random((80, 100)) < 0.2).astype(float))
        assert r["periodic_fraction"] < 0.02
        assert not r["significant"]
    planted = periodicity(_stripes(rng, 8.0, 20.0, shape=(80, 100), flip=0.2))
    assert planted["periodic_fraction"] > 10 * r["periodic_fraction"]


def test_angle_convention_rows_go_down():
    iy, ix = np.indices((64, 64))
    assert _angle_diff(periodicity((ix % 8 < 3).astype(float))["angle_deg"], 0.0) < 0.5
    assert _angle_diff(periodicity((iy % 8 < 3).astype(float))["angle_deg"], 90.0) < 0.5
    # constant along ix + iy = const lines running down-left to up-right... wave vector along (x right, y up)
    r = periodicity((((ix - iy) % 8) < 3).astype(float))
    assert _angle_diff(r["angle_deg"], 45.0) < 0.5
    assert r["period_px"] == pytest.approx(8 / np.sqrt(2), abs=0.05)
    r = periodicity((((ix + iy) % 8) < 3).astype(float))
    assert _angle_diff(r["angle_deg"], 135.0) < 0.5


def test_square_lattice_of_error_blobs():
    rng = np.random.default_rng(11)
    a = 7.4
    iy, ix = np.indices((100, 90))
    fy, fx = (iy % a) / a, (ix % a) / a
    d = np.hypot(np.minimum(fy, 1 - fy), np.minimum(fx, 1 - fx))
    err = (rng.random(iy.shape) < np.where(d < 0.25, 0.6, 0.05)).astype(float)
    r = periodicity(err, lattice_period_px=a)
    assert abs(r.period_px - a) < 0.2 and min(_angle_diff(r.angle_deg, 0), _angle_diff(r.angle_deg, 90)) < 1
    assert r.n_fundamentals == 2
    assert r.lattice_fraction == pytest.approx(r.periodic_fraction, abs=0.05)
    assert 0.2 < r.periodic_fraction < 0.6
    orders = {p["order"] for p in r.peaks}
    assert {(1, 0), (0, 1)} <= orders and len(orders) > 2  # harmonics / combinations used
    assert r.spectrum.shape == (r.freq_y.size, r.freq_x.size)


def test_result_mapping_and_constant_map():
    r = periodicity(np.zeros((20, 30)))
    assert np.isnan(r["period_px"]) and r["periodic_fraction"] == 0.0
    keys = set(dict(r))
    assert {"period_px", "angle_deg", "periodic_fraction", "peaks", "lattice_match", "spectrum"} <= keys
    with pytest.raises(KeyError):
        r["nope"]
    with pytest.raises(ValueError, match="2-D"):
        periodicity(np.zeros(50))
    with pytest.raises(ValueError, match="finite"):
        periodicity(np.full((10, 10), np.nan))


def test_fold_to_cell_integer_and_fractional_periods():
    iy, ix = np.indices((40, 60))
    v = (iy % 4) * 10 + (ix % 5)
    cell, counts = fold_to_cell(v.astype(float), (4, 5), return_counts=True)
    np.testing.assert_allclose(cell, np.add.outer(np.arange(4) * 10, np.arange(5)))
    assert counts.sum() == v.size and (counts == 40 * 60 / 20).all()

    a = 6.5  # non-integer: bin by (iy mod a) / a
    frac_y = (iy % a) / a
    errors = (frac_y < 0.25).astype(float)
    errors[0, 0] = np.nan
    cell = fold_to_cell(errors, a, n_bins=4)
    assert cell.shape == (4, 4)
    np.testing.assert_allclose(cell[0], 1.0)
    np.testing.assert_allclose(cell[1:], 0.0)
    assert np.isnan(fold_to_cell(np.full((5, 5), np.nan), 2.0)).all()
    with pytest.raises(ValueError, match="period_px"):
        fold_to_cell(errors, 0.0)


def test_com_relation_negative_when_low_com_means_errors():
    rng = np.random.default_rng(5)
    com = rng.uniform(0.1, 1.0, (8, 8))
    err = 0.5 - 0.4 * com + rng.normal(0, 0.02, com.shape)
    err[0, 0] = np.nan
    out = com_relation(err, com)
    assert out["pearson_r"] < -0.9 and out["spearman_r"] < -0.9
    assert out["slope"] == pytest.approx(-0.4, abs=0.05)
    assert out["n"] == 63
    assert np.isnan(com_relation(np.zeros((2, 2)), com[:2, :2])["pearson_r"])
    with pytest.raises(ValueError, match="shape"):
        com_relation(err, com[:4])

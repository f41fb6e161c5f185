"""polcore.analysis.defects: irregularity on a periodic prediction map with a planted defect."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from polcore.analysis import (
    candidate_regions,
    defect_auc,
    irregularity,
    neighbour_disagreement,
    precision_at_k,
    prediction_entropy,
    prototype_distance,
    robust_normalize,
    roc_curve_points,
)

A = 6.0  # lattice period [scan px]


def _scan(rng, ny=72, nx=96, defect=(30, 40, 20, 30)):
    """Two domains (RU | LD) with errors that repeat on every A column, plus one defect region."""
    pred = np.full((ny, nx), 1)
    pred[:, nx // 2:] = 5
    iy, ix = np.indices((ny, nx))
    acol = ((iy % A) < 1) & ((ix % A) < 2)
    pred[acol] = (pred[acol] + 2) % 8  # the model is consistently 90 deg off on A columns
    probs = 0.3 * rng.dirichlet(np.full(8, 0.3), size=(ny, nx))
    probs[iy, ix, pred] += 0.7
    probs[acol] = 0.5 * probs[acol] + 0.5 / 8  # and unsure there
    mask = np.zeros((ny, nx), bool)
    y0, y1, x0, x1 = defect
    mask[y0:y1, x0:x1] = True
    pred[mask] = rng.integers(0, 8, mask.sum())
    probs[mask] = rng.dirichlet(np.ones(8), size=mask.sum())
    return pred, probs, mask


def test_planted_defect_ranked_first():
    rng = np.random.default_rng(0)
    pred, probs, mask = _scan(rng)
    score = irregularity(pred, probs, period_px=A)
    assert score.shape == pred.shape
    regions = candidate_regions(score, top=5, smooth_px=1.0)
    assert list(regions.columns[:9]) == ["rank", "y0", "y1", "x0", "x1", "cy", "cx", "n_px", "mean_score"]
    first = regions.iloc[0]
    assert first["rank"] == 1
    assert 30 <= first["cy"] < 40 and 20 <= first["cx"] < 30
    assert first["y0"] <= 31 and first["y1"] >= 38 and first["x0"] <= 21 and first["x1"] >= 28
    assert (regions["mass"].diff().dropna() <= 0).all()
    auc = defect_auc(score, mask)
    assert auc > 0.95
    assert precision_at_k(score, mask, 50) > 0.8


def test_lattice_period_removes_periodic_errors():
    rng = np.random.default_rng(1)
    pred, probs, mask = _scan(rng)
    naive = neighbour_disagreement(pred)  # 3x3: every A column disagrees with its neighbours
    lattice = neighbour_disagreement(pred, period_px=A)
    outside = ~mask
    outside[:, 40:56] = False  # away from the domain wall
    assert np.mean(naive[outside] > 0) > 0.05
    assert np.mean(lattice[outside] > 0) < 0.01
    with_period = defect_auc(irregularity(pred, probs, period_px=A), mask)
    assert with_period > defect_auc(irregularity(pred, probs), mask)


def test_neighbour_disagreement_values_and_invalid():
    pred = np.full((7, 7), 2)
    pred[3, 3] = 6  # 180 degrees off its neighbours
    pred[0, 0] = -1
    d = neighbour_disagreement(pred)
    assert d[3, 3] == 4 and np.isnan(d[0, 0])
    assert np.nansum(d) == 4
    d5 = neighbour_disagreement(pred, window=5)
    assert d5[3, 3] == 4
    with pytest.raises(ValueError, match="window"):
        neighbour_disagreement(pred, window=4)
    with pytest.raises(ValueError, match="< 8"):
        neighbour_disagreement(pred + 8)


def test_entropy_prototype_and_normalisation():
    p = np.zeros((2, 8))
    p[0, 3] = 1.0
    p[1] = 1 / 8
    np.testing.assert_allclose(prediction_entropy(p), [0.0, 1.0], atol=1e-12)
    protos = np.eye(8, 3)
    feats = np.array([[[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    np.testing.assert_allclose(prototype_distance(feats, np.array([[0, 1]]), protos), [[0.0, 2.0]])
    assert np.isnan(prototype_distance(feats, np.array([[-1, 1]]), protos)[0, 0])
    x = np.array([0.0, 0.0, 0.0, 1.0, 5.0, np.nan])
    r = robust_normalize(x, "rank")
    assert np.isnan(r[-1]) and r[4] == 1.0 and r[0] == r[1] == r[2]
    m = robust_normalize(x, "mad")  # MAD is 0 here: falls back to the mean absolute deviation
    assert np.all(np.isfinite(m[:5])) and m[4] > m[3] > m[0]
    with pytest.raises(ValueError, match="valid"):
        robust_normalize(x, "zscore")


def test_irregularity_with_prototypes_and_weights():
    rng = np.random.default_rng(2)
    pred, probs, mask = _scan(rng, ny=36, nx=48, defect=(10, 16, 10, 16))
    protos = rng.normal(size=(8, 4))
    feats = protos[pred] + 0.1 * rng.normal(size=pred.shape + (4,))
    feats[mask] += 2.0  # defect patterns lie far from every prototype
    score, terms = irregularity(pred, probs, period_px=A, features=feats, prototypes=protos,
                                return_terms=True)
    assert set(terms) == {"neighbour", "entropy", "prototype"}
    assert defect_auc(terms["prototype"], mask) > 0.95
    only_proto = irregularity(pred, probs, features=feats, prototypes=protos, weights={"prototype": 1.0})
    np.testing.assert_allclose(only_proto, robust_normalize(terms["prototype"]))
    with pytest.raises(ValueError, match="valid"):
        irregularity(pred, probs, weights={"colour": 1.0})
    with pytest.raises(ValueError, match="without inputs"):
        irregularity(pred, weights={"entropy": 1.0})
    with pytest.raises(ValueError, match="both"):
        irregularity(pred, probs, features=feats)


def test_auc_precision_roc_against_sklearn():
    rng = np.random.default_rng(3)
    s = rng.random((20, 20))
    m = rng.random((20, 20)) < 0.2
    s[m] += 0.3
    s[0, 0] = np.nan
    ok = np.isfinite(s)
    assert defect_auc(s, m) == pytest.approx(roc_auc_score(m[ok], s[ok]))
    assert np.isnan(defect_auc(s, np.zeros_like(m)))
    assert np.isnan(defect_auc(s, np.ones_like(m)))
    order = np.argsort(-s[ok])
    assert precision_at_k(s, m, 25) == pytest.approx(m[ok][order[:25]].mean())
    assert precision_at_k(s, m, 10_000) == pytest.approx(m[ok].mean())
    fpr, tpr = roc_curve_points(s, m, max_points=20)
    assert fpr.size <= 21 and fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert roc_curve_points(s, np.zeros_like(m))[0].size == 0


def test_candidate_regions_empty_and_min_size():
    assert candidate_regions(np.full((5, 5), np.nan)).empty
    s = np.zeros((30, 30))
    s[5, 5] = 10.0  # single-pixel outlier
    s[20:24, 10:15] = 5.0
    df = candidate_regions(s, min_size=4, quantile=0.9)
    assert isinstance(df, pd.DataFrame) and len(df) == 1
    assert df.loc[0, ["y0", "y1", "x0", "x1", "n_px"]].tolist() == [20, 23, 10, 14, 20]


def test_average_ranks_match_scipy():
    """The numpy ranks (ties share their average rank) equal scipy.stats.rankdata's, ties and all."""
    from scipy import stats

    from polcore.analysis.defects import average_ranks

    rng = np.random.default_rng(3)
    for v in (rng.normal(size=200), rng.integers(0, 7, size=300).astype(float), np.array([2.0]), np.zeros(5),
              np.array([3.0, 1.0, 3.0, -np.inf, 1.0])):
        np.testing.assert_array_equal(average_ranks(v), stats.rankdata(v, method="average"))
    assert average_ranks(np.zeros(0)).shape == (0,)

"""polcore.analysis.metrics against scikit-learn, filters and edge cases."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from polcore.analysis import (
    CIRCULAR_ERROR_DEG,
    accuracy,
    circular_error_hist,
    confusion,
    macro_f1,
    metrics_table,
    per_class_recall,
)
from polcore.types import Filters

LABELS = list(range(8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = 500
    t = rng.integers(0, 8, n)
    # a biased predictor: correct 60 % of the time, otherwise random
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, 8, n))
    assert accuracy(t, p) == pytest.approx(accuracy_score(t, p))
    assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro"))
    np.testing.assert_allclose(per_class_recall(t, p), recall_score(t, p, average=None, labels=LABELS))
    np.testing.assert_array_equal(confusion(t, p), confusion_matrix(t, p, labels=LABELS))
    np.testing.assert_allclose(confusion(t, p, normalize="true"),
                               confusion_matrix(t, p, labels=LABELS, normalize="true"))


def test_absent_classes_and_unlabelled_entries():
    rng = np.random.default_rng(3)
    t = rng.choice([0, 2, 5], size=300)
    p = rng.choice([0, 1, 2, 5, 7], size=300)
    # sklearn's macro F1 averages over the classes seen in either array
    assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
    rec = per_class_recall(t, p)
    assert rec.shape == (8,)
    assert np.isnan(rec[[1, 3, 4, 6, 7]]).all() and np.isfinite(rec[[0, 2, 5]]).all()
    # unlabelled (-1) positions are excluded everywhere
    t2 = np.r_[t, -np.ones(50, int)]
    p2 = np.r_[p, np.zeros(50, int)]
    assert accuracy(t2, p2) == pytest.approx(accuracy_score(t, p))
    assert confusion(t2, p2).sum() == 300
    assert np.isnan(accuracy([-1, -1], [0, 1]))


def test_circular_error_hist_counts_steps():
    t = np.array([0, 0, 0, 0, 0, 7, 1, 3])
    p = np.array([0, 1, 7, 4, 6, 0, 5, 6])
    #            0  45 45 180 90 45 180 135
    np.testing.assert_array_equal(circular_error_hist(t, p), [1, 3, 1, 1, 2])
    assert CIRCULAR_ERROR_DEG == (0, 45, 90, 135, 180)


def test_invalid_input_raises():
    with pytest.raises(ValueError, match="normalize"):
        confusion([0], [0], normalize="all")
    with pytest.raises(ValueError, match="same size"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="0..7"):
        accuracy([0, 8], [0, 1])


def _frame(rng, ny=20, nx=30):
    iy, ix = np.indices((ny, nx))
    t = rng.integers(0, 8, (ny, nx))
    t[:2] = -1
    p = np.where(rng.random((ny, nx)) < 0.7, np.maximum(t, 0), rng.integers(0, 8, (ny, nx)))
    th = np.where(ix < nx // 2, 10.0, 30.0)
    return pd.DataFrame({"iy": iy.ravel(), "ix": ix.ravel(), "pred": p.ravel(), "true_label": t.ravel(),
                         "thickness_nm": th.ravel()})


def test_metrics_table_filters():
    df = _frame(np.random.default_rng(4))
    full = metrics_table(df)
    lab = df[df.true_label >= 0]
    assert full["n_rows"] == len(df) and full["n_labelled"] == len(lab)
    assert full["accuracy"] == pytest.approx(accuracy_score(lab.true_label, lab.pred))
    assert full["circular_error_hist"].sum() == len(lab)
    assert full["confusion"].shape == (8, 8) and full["confusion_norm"].shape == (8, 8)

    thick = metrics_table(df, Filters(thickness=(20.0, 40.0)))
    sub = lab[lab.thickness_nm >= 20]
    assert thick["n_labelled"] == len(sub)
    assert thick["macro_f1"] == pytest.approx(f1_score(sub.true_label, sub.pred, average="macro"))

    reg = metrics_table(df, Filters(region=(5, 9, 3, 12)))
    sub = lab[(lab.iy >= 5) & (lab.iy <= 9) & (lab.ix >= 3) & (lab.ix <= 12)]
    assert reg["n_rows"] == 5 * 10 and reg["n_labelled"] == len(sub)
    np.testing.assert_array_equal(reg["confusion"], confusion_matrix(sub.true_label, sub.pred, labels=LABELS))

    both = metrics_table(df, Filters(thickness=(0, 15), region=(0, 1, 0, 29)))  # only unlabelled rows
    assert both["n_labelled"] == 0 and np.isnan(both["accuracy"]) and np.isnan(both["mean_abs_error_deg"])


def test_metrics_table_missing_columns():
    with pytest.raises(ValueError, match="true_label"):
        metrics_table(pd.DataFrame({"iy": [0], "ix": [0], "pred": [1]}))

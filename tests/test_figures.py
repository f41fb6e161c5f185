"""polcore.figures: trace types, colours and orientation of the Plotly figure builders."""

import colorsys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from polcore import figures
from polcore.analysis import fold_to_cell, periodicity, roc_curve_points
from polcore.types import CLASS_NAMES


def _types(fig):
    return [t.type for t in fig.data]


def _row0_on_top(fig):
    return fig.layout.yaxis.autorange == "reversed"


def test_class_wheel_colors_hue_is_angle():
    cols = figures.class_wheel_colors()
    assert len(cols) == 8 and len(set(cols)) == 8
    for k, c in enumerate(cols):
        r, g, b = (int(c[i:i + 2], 16) / 255 for i in (1, 3, 5))
        h, _, _ = colorsys.rgb_to_hsv(r, g, b)
        assert abs(((h * 360 - 45 * k) + 180) % 360 - 180) < 1.5


def test_class_map_figure():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 8, (12, 20))
    pred[0, :3] = -1
    fig = figures.class_map_figure(pred, "pred")
    assert isinstance(fig, go.Figure)
    assert _types(fig)[0] == "heatmap" and set(_types(fig)[1:]) == {"scatter"}
    assert _row0_on_top(fig) and fig.layout.yaxis.scaleanchor == "x"
    hm = fig.data[0]
    np.testing.assert_array_equal(np.asarray(hm.z), np.where(pred < 0, -1, pred))
    assert hm.zmin == -1.5 and hm.zmax == 7.5 and hm.showscale is False
    names = [t.name for t in fig.data[1:]]
    assert all(any(n.startswith(c) for n in names) for c in CLASS_NAMES) and "no label" in names
    assert "\u2197" in names[1]  # RU drawn pointing right-up
    # the colour band of class k (value k) is the wheel colour k; -1 is grey
    scale = hm.colorscale
    band = lambda v: scale[2 * int(v + 1)][1]  # noqa: E731
    assert band(-1) == figures.NO_LABEL_COLOR and band(1) == figures.class_wheel_colors()[1]


def test_scalar_map_figure_with_mask():
    v = np.random.default_rng(1).random((10, 15))
    v[0, 0] = np.nan
    mask = np.zeros((10, 15), bool)
    mask[3:6, 4:8] = True
    fig = figures.scalar_map_figure(v, "conf", "Viridis", mask=mask)
    assert _types(fig) == ["heatmap", "contour"] and _row0_on_top(fig)
    assert _types(figures.scalar_map_figure(v, "conf")) == ["heatmap"]
    with pytest.raises(ValueError, match="mask shape"):
        figures.scalar_map_figure(v, mask=mask[:5])


def test_confusion_and_circular_error_figures():
    cm = np.diag(np.arange(1, 9)) + 1
    fig = figures.confusion_figure(cm, "cm")
    assert _types(fig) == ["heatmap"] and _row0_on_top(fig)
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z.sum(axis=1), 1.0)
    assert fig.data[0].texttemplate == "%{text}" and fig.data[0].text[0][0].endswith("%")
    hist = np.array([80, 10, 5, 3, 2])
    fig = figures.circular_error_figure(hist)
    assert _types(fig) == ["bar"]
    np.testing.assert_allclose(fig.data[0].y, hist / 100)
    assert list(fig.data[0].x) == ["0\u00b0", "45\u00b0", "90\u00b0", "135\u00b0", "180\u00b0"]


def test_spectrum_and_cell_figures():
    iy, ix = np.indices((48, 64))
    err = (((ix % 6) < 2) | ((iy % 6) < 2)).astype(float)
    res = periodicity(err, lattice_period_px=6.0)
    fig = figures.spectrum_figure(res, 6.0)
    assert _types(fig) == ["heatmap", "scatter", "scatter", "scatter"]
    names = [t.name for t in fig.data]
    assert "detected peaks" in names and "lattice (scan-aligned)" in names
    lat = fig.data[names.index("lattice (scan-aligned)")]
    assert np.isclose(np.max(np.abs(lat.x)), 1 / 6)
    assert _row0_on_top(fig)
    assert _types(figures.spectrum_figure(dict(res))) == _types(fig)  # a plain dict works too
    cell = fold_to_cell(err, 6.0)
    fig = figures.cell_fold_figure(cell)
    assert _types(fig) == ["heatmap"] and _row0_on_top(fig)
    assert np.asarray(fig.data[0].z).shape == (6, 6)


def test_embedding_figure_colourings():
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"e1": rng.normal(size=200), "e2": rng.normal(size=200),
                       "pred": rng.integers(0, 8, 200),
                       "source": rng.choice(["synthetic", "experimental"], 200),
                       "thickness_nm": rng.uniform(5, 40, 200), "correct": rng.random(200) < 0.8})
    fig = figures.embedding_figure(df, "pred")
    assert set(_types(fig)) == {"scattergl"} and len(fig.data) == df["pred"].nunique()
    assert fig.data[0].marker.color == figures.class_wheel_colors()[int(sorted(df["pred"].unique())[0])]
    assert len(figures.embedding_figure(df, "source").data) == 2
    assert len(figures.embedding_figure(df, "correct").data) == 2
    cont = figures.embedding_figure(df, "thickness_nm", hover=("source",))
    assert len(cont.data) == 1 and cont.data[0].marker.colorbar.title.text == "thickness_nm"
    small = figures.embedding_figure(df, None, max_points=50)
    assert len(small.data[0].x) == 50
    with pytest.raises(ValueError, match="column"):
        figures.embedding_figure(df, "nope")


def test_roc_pattern_probs_figures():
    rng = np.random.default_rng(3)
    s = rng.random(300)
    m = rng.random(300) < 0.3
    fpr, tpr = roc_curve_points(s, m)
    fig = figures.roc_figure(fpr, tpr, 0.71)
    assert _types(fig) == ["scatter", "scatter"] and "0.710" in fig.data[0].name
    fig = figures.pattern_figure(rng.random((32, 32)), log_scale=True)
    assert _types(fig) == ["heatmap"] and _row0_on_top(fig)
    p = rng.dirichlet(np.ones(8))
    fig = figures.probs_figure(p)
    assert _types(fig) == ["barpolar"]
    np.testing.assert_allclose(fig.data[0].theta, np.arange(8) * 45.0)
    assert fig.layout.polar.angularaxis.direction == "counterclockwise"
    with pytest.raises(ValueError, match="8 entries"):
        figures.probs_figure(p[:7])

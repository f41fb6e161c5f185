"""Issue 16, the pages: sidebar filters only where they apply, the region as four number fields, the link
that restores a view, polarization arrows per unit cell, the readable probe viewer beside the library
patterns, and two models compared on one scan.

AppTest against the small real store of tests/app_fixtures.py (one cell-layer run added, as the ingest
writes it), plus the figure builders and the library reader on their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pytest
from app_fixtures import build_store
from streamlit.testing.v1 import AppTest

from polcore import figures
from polcore.types import class_to_angle

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
ERROR_MAPS = "pages/3_Error_maps.py"
SIDEBAR_KEYS = ("w_dataset", "w_scan", "w_model", "w_layer", "w_th", "w_ry0", "w_ry1", "w_rx0", "w_rx1")


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    """The test store with a per-unit-cell run of resnet-cls-s0 on exp_wedge (pooled as the ingest pools)."""
    from polcore.analysis import pool_scan
    from polcore.store import PredictionStore, queries

    info = build_store(tmp_path_factory.mktemp("v16data"), checkpoint=False)
    store = PredictionStore(info.db)
    g = queries.run_grids(store, info.run_ids[("resnet-cls-s0", "exp_wedge")])
    cells = pool_scan(g["probs"], 6.0)
    info.cell_run = store.write_run(
        info.model_ids["resnet-cls-s0"], info.scan_ids["exp_wedge"],
        dict(pred=cells["pred"], probs=cells["probs"], confidence=cells["confidence"], true_label=g["true_label"]),
        seconds=1.0, device="cpu", layer="cell", config={"cell_px": 6.0, "cell_px_source": "calibration"},
    )
    info.images = _virtual_images(info.scans["exp_wedge"])
    store.write_scan_images(info.scan_ids["exp_wedge"], info.images)  # syn_* scans keep none
    with pytest.MonkeyPatch.context() as mp:
        for k, v in info.env().items():
            mp.setenv(k, v)
        yield info


def _virtual_images(path: Path) -> dict[str, np.ndarray]:
    """Virtual BF / ADF / CoM of a scan file, computed as the ingest computes them (one pass, mean-pattern
    detectors)."""
    from polcore.io import open_scan
    from polcore.virtual import VirtualImages

    scan = open_scan(path)
    ny, nx = scan.nav_shape
    data = np.concatenate([np.asarray(b, np.float32) for _, b in scan.iter_batches(256)])
    acc = VirtualImages.from_mean_pattern(data.mean(axis=0), (ny, nx))
    acc.add(np.arange(ny * nx), data)
    return acc.result()


def _page(page: str | None, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    if query:
        at.query_params.update(query)
    at.run()
    return at if page is None else at.switch_page(page).run()


def _problems(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [str(e.value) for e in at.error]


def _sidebar_keys(at: AppTest) -> set[str]:
    widgets = [*at.sidebar.selectbox, *at.sidebar.radio, *at.sidebar.slider, *at.sidebar.number_input]
    return {w.key for w in widgets if w.key in SIDEBAR_KEYS}


def _charts(at: AppTest) -> dict[str, dict]:
    """Plotly figures on the page by title."""
    out = {}
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        out[(spec["layout"].get("title") or {}).get("text") or ""] = spec
    return out


def _arr(v) -> np.ndarray:
    """A figure JSON array: a list, or Plotly's typed array ``{"dtype", "bdata", "shape"}``."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if shape:
            a = a.reshape([int(n) for n in str(shape).split(",")])
        return a.astype(float)
    return np.asarray([np.nan if x is None else x for x in v] if isinstance(v, list) and v
                      and not isinstance(v[0], list) else v, dtype=float)


def _chart(at: AppTest, prefix: str) -> dict:
    """The one figure whose title starts with ``prefix``."""
    found = [spec for title, spec in _charts(at).items() if title.startswith(prefix)]
    assert len(found) == 1, (prefix, list(_charts(at)))
    return found[0]


def _trace(spec: dict, name: str) -> dict:
    found = [t for t in spec["data"] if t.get("name") == name]
    assert found, (name, [t.get("name") for t in spec["data"]])
    return found[0]


def _grids(info, model: str, scan: str = "exp_wedge", layer: str = "pattern") -> dict:
    from polcore.store import PredictionStore, queries

    rid = info.cell_run if layer == "cell" else info.run_ids[(model, scan)]
    return queries.run_grids(PredictionStore(info.db, read_only=True), rid)


# ---------------------------------------------------------------------------------------------- sidebar


def test_sidebar_filters_only_where_they_apply(info):
    at = _page(None, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0", "th": "20-30",
                      "tab": "errors"})
    assert not _problems(at)
    assert _sidebar_keys(at) == set() and not at.sidebar.code  # Overview: a summary of everything
    expected = {
        "pages/6_Upload.py": set(),
        "pages/1_Benchmark.py": {"w_dataset", "w_layer", "w_th", "w_ry0", "w_ry1", "w_rx0", "w_rx1"},
        "pages/4_Embeddings.py": {"w_model", "w_th", "w_ry0", "w_ry1", "w_rx0", "w_rx1"},
        ERROR_MAPS: set(SIDEBAR_KEYS),
    }
    for page, keys in expected.items():
        at.switch_page(page).run()
        assert not _problems(at), (page, _problems(at))
        assert _sidebar_keys(at) == keys, page
        assert bool(at.sidebar.code) == bool(keys), page  # the link to the view, where there is a view
        # hidden filters are kept for the pages where they apply, and in the URL
        assert at.session_state["f_th"] == (20.0, 30.0) and at.query_params["th"] == "20-30"
    # ... and they apply again there: every wrong prediction listed lies in the thickness range
    errs = [df.value for df in at.dataframe if "angle_error_deg" in df.value.columns][0]
    assert len(errs) and errs["thickness_nm"].between(20, 30).all()


def test_copy_link_restores_the_view(info):
    query = {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s1", "th": "15-40",
             "region": "2,20,3,30", "point": "7,20", "compare": "pca_knn-cls-s0", "tab": "compare"}
    at = _page(ERROR_MAPS, query)
    assert not _problems(at)
    link = at.sidebar.code[0].value
    params = dict(parse_qsl(link.split("?", 1)[1]))
    assert params == query
    again = _page(ERROR_MAPS, params)
    for key in ("f_scan", "f_model", "f_th", "f_region", "f_point", "f_compare", "f_tab"):
        assert again.session_state[key] == at.session_state[key], key
    assert again.session_state["f_point"] == (7, 20)
    assert again.selectbox(key="w_compare").value == "pca_knn-cls-s0"  # the comparison tab is open
    assert not [h for h in again.subheader if h.value.startswith("Probe")]  # lazy tabs: the probe tab is not
    again.session_state["f_tab"] = None  # what a click on the probe tab sets (the browser test clicks it)
    again.run()
    assert again.session_state["f_tab"] is None and "tab" not in again.query_params
    assert [h.value for h in again.subheader if h.value.startswith("Probe")] == ["Probe position iy=7, ix=20"]
    # another scan drops the region and the probe position, which belong to a scan
    again.sidebar.selectbox(key="w_scan").set_value(info.scan_ids["syn_35nm"]).run()
    assert again.session_state["f_region"] is None and again.session_state["f_point"] is None
    assert "point" not in again.query_params and "region" not in again.query_params


def test_region_fields_clear_to_the_whole_scan(info):
    at = _page(ERROR_MAPS, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0",
                            "region": "4,15,6,25"})
    assert [n.value for n in at.sidebar.number_input] == [4, 15, 6, 25]
    for key, value in (("w_ry0", 0), ("w_ry1", 29), ("w_rx0", 0)):
        at.sidebar.number_input(key=key).set_value(value).run()
    assert at.session_state["f_region"] == (0, 29, 0, 25)
    at.sidebar.number_input(key="w_rx1").set_value(None).run()  # empty: to the edge -> the whole scan
    assert at.session_state["f_region"] is None and "region" not in at.query_params
    assert [n.value for n in at.sidebar.number_input] == [None] * 4


# ---------------------------------------------------------------------------------------------- arrows


def _arrow_ends(spec: dict, k: int) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) of every shaft of class k's arrow trace (shaft, None, two barbs, None per arrow)."""
    t = _trace(spec, figures.class_label(k))
    xs, ys = t["x"], t["y"]
    return [(xs[i], ys[i], xs[i + 1], ys[i + 1]) for i in range(0, len(xs), 7)]


def test_arrow_map_from_the_cell_layer(info):
    at = _page(ERROR_MAPS, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0"})
    assert not _problems(at)
    spec = _chart(at, "Polarization per unit cell")
    cg = _grids(info, "resnet-cls-s0", layer="cell")
    ref = figures.cell_arrows(cg["pred"], cg["confidence"], 6.0)
    assert len(ref["cls"]) == 5 * 6  # 30 x 36 positions, 6 px cells
    cells = _trace(spec, "cells")
    np.testing.assert_allclose(_arr(cells["x"]), ref["x"])
    np.testing.assert_allclose(_arr(cells["y"]), ref["y"])
    assert _arr(cells["customdata"])[:, 0].astype(int).tolist() == ref["cls"].tolist()
    for k in np.unique(ref["cls"]):
        a = np.deg2rad(class_to_angle(int(k)))
        for x0, y0, x1, y1 in _arrow_ends(spec, int(k)):
            d = np.array([x1 - x0, -(y1 - y0)])  # on screen, y up
            np.testing.assert_allclose(d / np.linalg.norm(d), [np.cos(a), np.sin(a)], atol=1e-9)
    assert any("from the per-unit-cell layer" in c.value for c in at.caption)
    # without a cell run the arrows come from this run pooled per cell, as the ingest would pool it
    at.sidebar.selectbox(key="w_model").set_value("resnet-cls-s1").run()
    assert any("pooled per unit cell" in c.value for c in at.caption)
    np.testing.assert_allclose(_arr(_trace(_chart(at, "Polarization per unit cell"), "cells")["x"]), ref["x"])


def test_arrow_length_follows_confidence():
    pred = np.full((12, 12), 2, np.int8)  # MU everywhere: arrows point up
    conf = np.full((12, 12), 0.9, np.float32)
    conf[:6, :6] = 0.3
    arrows = figures.cell_arrows(pred, conf, 6.0)
    np.testing.assert_allclose(arrows["confidence"], [0.3, 0.9, 0.9, 0.9], rtol=1e-6)
    adf = np.random.default_rng(0).random((12, 12))
    fig = figures.arrow_map_figure(arrows, (12, 12), 6.0, base=adf)
    shaft = next(t for t in fig.data if t.name == figures.class_label(2))
    lengths = [abs(shaft.y[i + 1] - shaft.y[i]) for i in range(0, len(shaft.y), 7)]
    np.testing.assert_allclose(lengths, 0.9 * 6 * np.array([0.3, 0.9, 0.9, 0.9]), rtol=1e-6)
    assert all(shaft.y[i + 1] < shaft.y[i] for i in range(0, len(shaft.y), 7))  # row 0 on top: up = smaller y
    assert fig.data[0].type == "heatmap" and fig.data[0].name == "virtual ADF"  # the structure under the arrows
    np.testing.assert_array_equal(fig.data[0].z, adf)


# ----------------------------------------------------------------------------------------- probe viewer


def test_probe_viewer_robust_log_marks_and_library(info):
    from polcore.simulate.library import pattern_at
    from ui.backend import read_pattern

    g = _grids(info, "resnet-cls-s0")
    iy, ix = 7, 20
    assert g["true_label"][iy, ix] >= 0
    at = _page(ERROR_MAPS, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0",
                            "point": f"{iy},{ix}"})
    assert not _problems(at)
    charts = _charts(at)
    pat = np.asarray(read_pattern(str(info.scans["exp_wedge"]), iy, ix), dtype=float)
    hm = _trace(charts["Measured pattern"], "pattern")
    z = np.log10(np.maximum(pat, 0) + 1)  # log display and percentile contrast by default
    np.testing.assert_allclose(_arr(hm["z"]), z, rtol=1e-5)
    np.testing.assert_allclose([hm["zmin"], hm["zmax"]], np.percentile(z, [0.5, 99.5]), rtol=1e-5)
    # the disc outline and the CoM arrow: the fixture's disc is brighter towards the polarization
    disc = _trace(charts["Measured pattern"], "bright-field disc")
    cx, cy = np.mean(_arr(disc["x"])), np.mean(_arr(disc["y"]))
    assert abs(cx - 15.5) < 1 and abs(cy - 15.5) < 1  # the 32 px detector's centre
    arrow = charts["Measured pattern"]["layout"]["annotations"][0]
    a = np.deg2rad(class_to_angle(int(g["true_label"][iy, ix])))
    d = np.array([arrow["x"] - arrow["ax"], -(arrow["y"] - arrow["ay"])])
    assert np.dot(d / np.linalg.norm(d), [np.cos(a), np.sin(a)]) > 0.9
    # beside it the library patterns of the predicted and the true class at the same place in the cell
    pred, true = int(g["pred"][iy, ix]), int(g["true_label"][iy, ix])
    frac = ((iy / 6.0) % 1.0, (ix / 6.0) % 1.0)
    for title, k in ((f"Library, predicted: {figures.class_label(pred)}", pred),
                     (f"Library, true: {figures.class_label(true)}", true)):
        lib, _ = pattern_at(k, float(g["thickness_nm"][iy, ix]), *frac)
        np.testing.assert_allclose(_arr(_trace(charts[title], "pattern")["z"]),
                                   np.log10(np.maximum(lib.astype(float), 0) + 1), rtol=1e-5)
    # linear display, full range: the raw pattern and no colour limits
    at.radio(key="em_disp").set_value("linear").run()
    at.toggle(key="em_robust").set_value(False).run()
    hm = _trace(_charts(at)["Measured pattern"], "pattern")
    np.testing.assert_allclose(_arr(hm["z"]), pat, rtol=1e-5)
    assert hm.get("zmin") is None and hm.get("zmax") is None


def test_robust_limits_ignore_hot_pixels():
    rng = np.random.default_rng(2)
    img = rng.random((64, 64))
    img[3, 5] = img[40, 60] = 1e6
    lo, hi = figures.robust_limits(img)
    assert hi < 1.0 and lo >= 0.0
    fig = figures.pattern_figure(img)
    assert fig.data[0].zmax < 1 and fig.data[0].zmax == pytest.approx(np.percentile(np.log10(img + 1), 99.5))
    assert figures.robust_limits(np.full((4, 4), 3.0)) == (3.0, 4.0)
    assert figures.robust_limits(np.full((4, 4), np.nan)) == (0.0, 1.0)


def test_pattern_marks_find_disc_and_com():
    ky, kx = np.mgrid[0:48, 0:48].astype(float)
    disc = ((ky - 20.0) ** 2 + (kx - 26.0) ** 2 <= 8.0**2).astype(float)
    p = disc * (1.0 + 0.4 * (kx - 26.0) / 8.0)  # brighter towards +kx
    p[2, 2] = 500.0  # a hot pixel far out
    m = figures.pattern_marks(p)
    cy, cx, r = m["disc"]
    assert abs(cy - 20) < 0.2 and abs(cx - 26) < 0.2 and abs(r - 8) < 0.5
    assert m["com"][1] - cx > 0.3 and abs(m["com"][0] - cy) < 0.1
    assert figures.pattern_marks(np.zeros((8, 8))) is None


def test_library_pattern_at_is_the_library_entry(default_library):
    from polcore.simulate.library import pattern_at

    lib = default_library
    for k, th, fy, fx in ((1, 20.0, 0.25, 0.5), (4, 12.0, 0.0, 0.0), (6, 48.0, 0.9, 0.1), (7, 35.0, 0.5, 0.99)):
        pat, meta = pattern_at(k, th, fy, fx)
        assert lib.variant_class[meta["variant"]] == k and lib.configs["role"].iloc[meta["config"]] == "test"
        t = int(np.argmin(np.abs(lib.thickness_nm - th)))
        assert meta["thickness_nm"] == lib.thickness_nm[t]
        n = lib.patterns.shape[3]
        assert (meta["py"], meta["px"]) == (round(fy * n) % n, round(fx * n) % n)
        np.testing.assert_allclose(pat, lib.patterns[meta["variant"], meta["config"], t, meta["py"], meta["px"]],
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="class"):
        pattern_at(8, 20.0, 0, 0)


# ---------------------------------------------------------------------------------- structure and export


def test_virtual_adf_under_the_maps(info):
    at = _page(ERROR_MAPS, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0"})
    assert not _problems(at)
    assert at.radio(key="em_base").options == ["virtual ADF", "virtual BF", "none"]
    charts = _charts(at)
    pred = charts["Predicted class \u2014 drag a box to set the region"]
    assert [t["name"] for t in pred["data"][:2]] == ["virtual ADF", "classes"]
    np.testing.assert_allclose(_arr(pred["data"][0]["z"]), info.images["adf"], rtol=1e-6)
    assert pred["data"][1]["opacity"] == pytest.approx(0.55)
    arrows = charts["Polarization per unit cell over the virtual ADF"]
    np.testing.assert_allclose(_arr(arrows["data"][0]["z"]), info.images["adf"], rtol=1e-6)
    assert "Errors (1 = wrong)" in charts  # beside the arrows by default; a virtual image on demand
    at.radio(key="em_side").set_value("adf").run()
    assert "Virtual image: ADF" in _charts(at) and "Errors (1 = wrong)" not in _charts(at)
    at.radio(key="em_side").set_value("com").run()
    assert "Virtual image: |CoM| shift" in _charts(at)
    # more structure, less class colour; then the bright field; then the classes alone
    at.slider(key="em_alpha").set_value(0.2).run()
    pred = _charts(at)["Predicted class \u2014 drag a box to set the region"]
    assert pred["data"][1]["opacity"] == pytest.approx(0.2)
    at.radio(key="em_base").set_value("bf").run()
    pred = _charts(at)["Predicted class \u2014 drag a box to set the region"]
    np.testing.assert_allclose(_arr(pred["data"][0]["z"]), info.images["bf"], rtol=1e-6)
    at.radio(key="em_base").set_value("none").run()
    assert _charts(at)["Predicted class \u2014 drag a box to set the region"]["data"][0]["name"] == "classes"
    # a scan without stored images: the maps alone, and the arrows over the class map
    at.sidebar.selectbox(key="w_scan").set_value(info.scan_ids["syn_20nm"]).run()
    assert not _problems(at)
    assert any("No virtual images are stored" in c.value for c in at.caption)
    assert "Polarization per unit cell" in _charts(at)  # the title without "over the virtual ADF"


def test_export_figure_panel_from_the_page(info):
    from PIL import Image

    from polcore import panel

    at = _page(ERROR_MAPS, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0"})
    at.button(key="em_panel_make").click().run()
    assert not _problems(at)
    files = at.session_state["em_panel"]["files"]
    assert set(files) == {"png", "svg", "pdf"}, at.session_state["em_panel"]["problems"]
    import io

    img = Image.open(io.BytesIO(files["png"]))
    img.verify()
    assert Image.open(io.BytesIO(files["png"])).size == panel.panel_size_px(True)
    assert b"<svg" in files["svg"][:2000] and files["pdf"].startswith(b"%PDF")
    assert {b.key for b in at.get("download_button")} >= {"em_panel_png", "em_panel_svg", "em_panel_pdf"}


# -------------------------------------------------------------------------------------------- compare


def test_compare_two_models(info):
    at = _page(ERROR_MAPS, {"scan": str(info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0", "th": "20-40",
                            "tab": "compare"})
    assert not _problems(at)
    ga = _grids(info, "resnet-cls-s0")
    for other in ("resnet-cls-s1", "pca_knn-cls-s0"):
        at.selectbox(key="w_compare").set_value(other).run()
        assert at.session_state["f_compare"] == other and at.query_params["compare"] == other
        gb = _grids(info, other)
        keep = (ga["thickness_nm"] >= 20) & (ga["thickness_nm"] <= 40) & (ga["pred"] >= 0) & (gb["pred"] >= 0)
        rate = float((ga["pred"][keep] == gb["pred"][keep]).mean())
        shown = [m.value for m in at.metric if m.label == "Agreement rate"]
        assert shown == [f"{rate:.1%}"]
        charts = _charts(at)
        assert {"A: resnet-cls-s0", f"B: {other}", "Where they disagree"} <= set(charts)
        z = _arr(_trace(charts["Where they disagree"], "agreement")["z"])
        inside = (ga["thickness_nm"] >= 20) & (ga["thickness_nm"] <= 40)
        assert np.array_equal(np.isfinite(z), inside)
        assert np.array_equal(z[inside] == 0, (ga["pred"] == gb["pred"])[inside])
        t = ga["true_label"]
        only_a = inside & (ga["pred"] != gb["pred"]) & (t >= 0) & (ga["pred"] == t)
        assert np.all(z[only_a] == 2)


def test_agreement_map_categories():
    a = np.array([[0, 1, 2, 3]])
    b = np.array([[0, 2, 1, 4]])
    t = np.array([[0, 1, 1, 5]])
    fig = figures.agreement_map_figure(a, b, t)
    np.testing.assert_array_equal(fig.data[0].z, [[0, 2, 3, 4]])
    np.testing.assert_array_equal(figures.agreement_map_figure(a, b).data[0].z, [[0, 1, 1, 1]])

"""Dashboard tests with Streamlit's AppTest against a small real store (tests/app_fixtures.py).

Every page renders without an exception or error; URL query parameters set the filters and widget changes
write them back; a region injected through session_state (AppTest cannot drive Plotly selections) changes the
error table exactly as the store's query says; an invalid upload shows the reader's own message; server paths
outside the data directory are refused; a failed ingest leaves the database as it was.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import build_store, make_labels, write_plain_scan, write_scan
from streamlit.testing.v1 import AppTest

from polcore.types import Filters

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGES = [
    "pages/1_Benchmark.py",
    "pages/2_Confusion.py",
    "pages/3_Error_maps.py",
    "pages/4_Embeddings.py",
    "pages/5_Defects.py",
    "pages/6_Upload.py",
]
TIMEOUT = 60


@pytest.fixture(scope="module")
def store_info(tmp_path_factory):
    info = build_store(tmp_path_factory.mktemp("appdata"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in info.env().items():
            mp.setenv(k, v)
        yield info


def _page(page: str | None = None, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if query:
        at.query_params.update(query)
    if page is None:
        return at.run()
    at.run()
    return at.switch_page(page).run()


def _problems(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [str(e.value) for e in at.error]


def _errors_table(at: AppTest):
    tables = [df for df in at.dataframe if "angle_error_deg" in df.value.columns]
    assert len(tables) == 1, [list(df.value.columns) for df in at.dataframe]
    return tables[0].value


# ------------------------------------------------------------------------------------------------ render


def test_overview_renders(store_info):
    at = _page()
    assert not _problems(at)
    assert [m.value for m in at.metric][:3] == ["4", "4", "4"]  # data sets, scans, models of the fixture
    assert any("Best on experimental-like data" in s.value for s in at.success)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(store_info, page):
    t0 = time.perf_counter()
    at = _page(page)
    assert not _problems(at), _problems(at)
    assert time.perf_counter() - t0 < 30
    if page in (PAGES[1], PAGES[2], PAGES[4]):  # the pages where the scan filter applies
        assert at.sidebar.selectbox(key="w_scan").value == store_info.scan_ids["syn_20nm"]
    else:
        assert not [s for s in at.sidebar.selectbox if s.key == "w_scan"]
    assert at.session_state["f_scan"] == store_info.scan_ids["syn_20nm"]  # kept for the other pages


@pytest.mark.parametrize("page", [PAGES[1], PAGES[2], PAGES[3], PAGES[4]])
def test_scan_without_ground_truth(store_info, page):
    at = _page(page, {"scan": str(store_info.scan_ids["exp_nogt"]), "model": "pca_knn-cls-s0", "tab": "errors"})
    assert not _problems(at), _problems(at)
    assert at.session_state["f_scan"] == store_info.scan_ids["exp_nogt"]
    if page == PAGES[2]:
        assert len(_errors_table(at)) == 0
        assert any("no ground truth" in i.value for i in at.info)
    if page == PAGES[4]:
        assert any("no defect mask" in i.value for i in at.info)
        assert any("rank" in df.value.columns for df in at.dataframe)  # ranked candidate regions


def test_pages_with_empty_database(tmp_path, monkeypatch):
    from polcore.store import PredictionStore

    PredictionStore(tmp_path / "empty.duckdb")  # schema only
    monkeypatch.setenv("POLBENCH_DB", str(tmp_path / "empty.duckdb"))
    monkeypatch.setenv("POLBENCH_DATA", str(tmp_path))
    at = _page()
    assert not _problems(at)
    for page in PAGES:
        at.switch_page(page).run()
        assert not _problems(at), (page, _problems(at))


def test_benchmark_shows_study_rows_and_majority(store_info):
    at = _page(PAGES[0])
    pivot = at.dataframe[0].value
    assert list(pivot.index) == ["synthetic 20 nm", "synthetic 35 nm", "experimental-like wedge"]
    assert {"resnet/cls", "custom_cnn/proto", "pca_knn/cls", "majority"} <= set(pivot.columns)
    assert "\u00b1" in pivot.loc["synthetic 20 nm", "resnet/cls"]  # two seeds -> mean +- std


def test_error_maps_render_all_maps(store_info):
    at = _page(PAGES[2], {"scan": str(store_info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0",
                          "tab": "periodic"})
    assert not _problems(at)
    charts = at.get("plotly_chart")
    assert len(charts) >= 6  # class, confidence, arrows, errors (one map beside the arrows), spectrum, unit cell
    labels = [m.label for m in at.metric]
    assert "Error period [scan px]" in labels and "Lattice period [scan px]" in labels
    # beside the arrows, one map at a time: the errors first, then the ground truth or a virtual image
    side = at.radio(key="em_side")
    assert side.options[:2] == ["errors", "ground truth"] and side.value == "errors"

    def titles() -> set[str]:
        return {(json.loads(c.proto.spec)["layout"].get("title") or {}).get("text") for c in at.get("plotly_chart")}

    assert "Errors (1 = wrong)" in titles() and "Ground truth" not in titles()
    side.set_value("truth").run()
    assert not _problems(at)
    assert "Ground truth" in titles() and "Errors (1 = wrong)" not in titles()


def test_defects_page_with_mask(store_info):
    at = _page(PAGES[4], {"scan": str(store_info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0"})
    assert not _problems(at)
    aucs = [df.value for df in at.dataframe if "auc" in df.value.columns]
    assert len(aucs) == 1 and len(aucs[0]) == 4  # one ROC-AUC per model on this scan
    assert np.all((aucs[0]["auc"] > 0.5) & (aucs[0]["auc"] <= 1.0))  # defects are scrambled: detectable


# ------------------------------------------------------------------------------------- filters and URL


def test_query_params_set_filters(store_info):
    sid = store_info.scan_ids["exp_wedge"]
    at = _page(PAGES[2], {"scan": str(sid), "model": "resnet-cls-s1", "th": "20-30", "region": "12,2,3,20",
                          "tab": "errors"})
    assert not _problems(at)
    ss = at.session_state
    assert ss["f_scan"] == sid and ss["f_model"] == "resnet-cls-s1"
    assert ss["f_th"] == (20.0, 30.0)
    assert ss["f_region"] == (2, 12, 3, 20)  # sorted
    assert at.sidebar.selectbox(key="w_model").value == "resnet-cls-s1"
    assert at.sidebar.slider(key="w_th").value == (20.0, 30.0)
    table = _errors_table(at)
    assert len(table) > 0
    assert table["iy"].between(2, 12).all() and table["ix"].between(3, 20).all()
    assert table["thickness_nm"].between(20, 30).all()
    # the URL keeps the (normalised) filters
    assert at.query_params["region"] == "2,12,3,20" and at.query_params["th"] == "20-30"


def test_bad_query_params_are_ignored_with_a_warning(store_info):
    at = _page(None, {"th": "thick", "region": "1,2,3", "scan": "x"})
    assert not _problems(at)
    assert len(at.sidebar.warning) == 3  # shown once, on the page the link opened
    at.switch_page(PAGES[2]).run()
    assert not _problems(at)
    assert at.session_state["f_th"] is None and at.session_state["f_region"] is None


def test_widget_change_updates_url_and_survives_page_switch(store_info):
    at = _page(PAGES[2])
    at.sidebar.selectbox(key="w_model").set_value("custom_cnn-proto-s0").run()
    assert not _problems(at)
    assert at.query_params["model"] == "custom_cnn-proto-s0"
    at.switch_page(PAGES[4]).run()
    assert at.sidebar.selectbox(key="w_model").value == "custom_cnn-proto-s0"
    assert at.query_params["model"] == "custom_cnn-proto-s0"


def test_region_selection_changes_error_table(store_info):
    from polcore.store import PredictionStore, queries

    sid = store_info.scan_ids["exp_wedge"]
    at = _page(PAGES[2], {"scan": str(sid), "model": "resnet-cls-s0", "tab": "errors"})
    full = _errors_table(at)
    region = (4, 15, 6, 25)
    at.session_state["f_region"] = region  # what a box selection on the class map sets
    at.run()
    assert not _problems(at)
    sub = _errors_table(at)
    expected = queries.errors(
        PredictionStore(store_info.db, read_only=True),
        store_info.run_ids[("resnet-cls-s0", "exp_wedge")],
        Filters(region=region),
    )
    assert 0 < len(sub) < len(full)
    assert len(sub) == len(expected)
    assert at.query_params["region"] == "4,15,6,25"
    # the sidebar's clear button removes it again, from the state and the URL
    at.sidebar.button(key="b_clear_region").click().run()
    assert at.session_state["f_region"] is None and "region" not in at.query_params
    assert len(_errors_table(at)) == len(full)


def test_region_typed_in_sidebar(store_info):
    """Four number fields (y0, y1, x0, x1); an empty field means 'to the edge of the scan'."""
    at = _page(PAGES[2], {"scan": str(store_info.scan_ids["exp_wedge"]), "model": "resnet-cls-s0"})
    assert [n.value for n in at.sidebar.number_input] == [None] * 4
    at.sidebar.number_input(key="w_ry1").set_value(3).run()
    assert at.session_state["f_region"] == (0, 3, 0, 35)  # exp_wedge is 30 x 36
    at.sidebar.number_input(key="w_rx0").set_value(9).run()
    at.sidebar.number_input(key="w_ry0").set_value(1).run()
    assert at.session_state["f_region"] == (1, 3, 9, 35)
    assert [n.value for n in at.sidebar.number_input] == [1, 3, 9, 35]
    assert at.query_params["region"] == "1,3,9,35"
    assert not at.exception


# ------------------------------------------------------------------------------------------------ upload


def test_invalid_upload_shows_reader_message(store_info, tmp_path):
    from polcore.io import ScanFormatError, open_scan

    content = b"this is a text file, not a scan\n" * 4
    at = _page(PAGES[5])
    at.file_uploader[0].set_value(("notes.h5", content, "application/octet-stream")).run()
    assert not at.exception
    ref = tmp_path / "notes.h5"
    ref.write_bytes(content)
    with pytest.raises(ScanFormatError) as exc:
        open_scan(ref)
    shown = [e.value for e in at.error]
    assert len(shown) == 1 and exc.value.reason in shown[0] and "notes.h5" in shown[0]
    uploads = store_info.data_dir / "uploads"
    assert not any(uploads.glob("notes*")), "a refused upload must not stay on disk"


def test_valid_upload_is_validated_and_offers_models(store_info):
    rng = np.random.default_rng(3)
    lab = make_labels(10, 12, rng)
    src = write_scan(
        store_info.data_dir / "tmp_src" / "good.h5",
        lab,
        np.full(lab.shape, 25.0, np.float32),
        np.zeros(lab.shape, bool),
        rng,
    )
    at = _page(PAGES[5])
    at.file_uploader[0].set_value(("good.h5", src.read_bytes(), "application/octet-stream")).run()
    assert not _problems(at)
    assert any("10\u00d712 positions" in s.value for s in at.success)
    assert at.multiselect(key="up_models").options == ["pca_knn-cls-s0"]
    saved = list((store_info.data_dir / "uploads").glob("good-*.h5"))
    assert len(saved) == 1 and saved[0].read_bytes() == src.read_bytes()


def test_server_path_outside_data_dir_is_refused(store_info, tmp_path):
    outside = tmp_path / "secret.h5"
    outside.write_bytes(b"x")
    link = store_info.data_dir / "link.h5"
    link.symlink_to(outside)
    try:
        at = _page(PAGES[5])
        at.radio(key="up_mode").set_value("Path on the server").run()
        for text in (str(outside), "../" + outside.name, "link.h5"):
            at.text_input(key="up_path").input(text).run()
            assert not at.exception
            assert any("outside the data directory" in e.value for e in at.error), text
        at.text_input(key="up_path").input("scans/syn_35nm.h5").run()
        assert not _problems(at)
        assert any("24\u00d724 positions" in s.value for s in at.success)
    finally:
        link.unlink()


def test_failed_ingest_leaves_database_unchanged(store_info):
    """An ingest that fails after the scan was registered (here: cancelled from its progress callback, as a
    crash mid-way would) leaves every table as it was."""
    from polcore.store import PredictionStore
    from ui.backend import ingest_scan

    path = write_plain_scan(store_info.data_dir / "uploads" / "cancel.h5", 8, 8, seed=4)
    store = PredictionStore(store_info.db)
    before = store.counts()
    calls = []

    def progress(*args):
        calls.append(args)
        raise RuntimeError("cancelled by the test")

    with pytest.raises(RuntimeError, match="cancelled by the test"):
        ingest_scan(path, ["pca_knn-cls-s0"], store_info.db, name="cancel", progress=progress)
    assert calls, "the failure must come after the scan was registered"
    assert store.counts() == before


# -------------------------------------------------------------------------------------- no database


def test_pages_without_database(tmp_path, monkeypatch):
    monkeypatch.setenv("POLBENCH_DB", str(tmp_path / "missing.duckdb"))
    monkeypatch.setenv("POLBENCH_DATA", str(tmp_path))
    at = _page()
    assert not _problems(at)
    assert at.button(key="b_build_demo").label == "Build the demo database"
    for page in PAGES:
        at.switch_page(page).run()
        assert not _problems(at), (page, _problems(at))
    assert not (tmp_path / "missing.duckdb").exists(), "reading must never create the database"


# ---------------------------------------------------------------------------------- helpers (no app)


def test_state_parsers_round_trip():
    from ui import state

    assert state.parse_thickness("40-10") == (10.0, 40.0)
    assert state.parse_thickness("25") == (25.0, 25.0)
    assert state.format_thickness((10.0, 40.5)) == "10-40.5"
    assert state.parse_region(state.format_region((1, 5, 2, 9))) == (1, 5, 2, 9)
    for bad in ("a-b", "1-2-3", "nan"):
        with pytest.raises(ValueError):
            state.parse_thickness(bad)
    for bad in ("1,2,3", "1,2,3,x", "-1,2,3,4"):
        with pytest.raises(ValueError):
            state.parse_region(bad)


def test_selection_to_region_and_point():
    from ui.maps import selection_to_point, selection_to_region

    box = {"selection": {"points": [], "box": [{"x": [2.6, 7.2], "y": [9.4, 0.8]}], "lasso": []}}
    assert selection_to_region(box, 20, 30) == (1, 9, 3, 7)
    clipped = {"selection": {"box": [{"x": [-5, 100], "y": [-3, 4.4]}], "points": []}}
    assert selection_to_region(clipped, 20, 30) == (0, 4, 0, 29)
    click = {"selection": {"points": [{"x": 4, "y": 11}], "box": []}}
    assert selection_to_point(click, 20, 30) == (11, 4)
    assert selection_to_region(click, 20, 30) is None and selection_to_point(box, 20, 30) is None


def test_background_job_reports_progress_and_errors():
    from ui import jobs

    def work(n, kind, progress=None):
        for i in range(n):
            progress((i + 1) / n, f"step {i + 1}")
        return f"{n * 2}{kind}"

    def broken(progress=None):
        progress(0.5)
        raise ValueError("bad input file")

    ok = jobs.start_job("test", "work", work, 3, kind="x2")  # 'kind' reaches the work function
    bad = jobs.start_job("test", "broken", broken)
    deadline = time.time() + 10
    while time.time() < deadline and "running" in (ok.status, bad.status):
        time.sleep(0.02)
    assert (ok.status, ok.result, ok.fraction) == ("done", "6x2", 1.0)
    assert (bad.status, bad.error, bad.fraction) == ("failed", "bad input file", 0.5)


def test_resolve_data_path(tmp_path, monkeypatch):
    from ui import paths

    monkeypatch.setenv("POLBENCH_DATA", str(tmp_path / "data"))
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "a.h5").write_bytes(b"x")
    (tmp_path / "b.h5").write_bytes(b"x")
    assert paths.resolve_data_path("sub/a.h5") == (tmp_path / "data" / "sub" / "a.h5").resolve()
    for bad in ("", "../b.h5", str(tmp_path / "b.h5"), "sub", "sub/missing.h5"):
        with pytest.raises(ValueError):
            paths.resolve_data_path(bad)
    assert os.environ["POLBENCH_DATA"].endswith("data")

"""The unit-cell layer in the dashboard: chosen from the sidebar or the URL (``?layer=cell``), it selects the
cell runs on every page; AppTest against a small real store with one cell run added."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from app_fixtures import build_store
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
ERROR_MAPS = "pages/3_Error_maps.py"


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    from polcore.analysis import pool_scan
    from polcore.store import PredictionStore, queries

    info = build_store(tmp_path_factory.mktemp("celldata"))
    store = PredictionStore(info.db)
    (model, scan), run_id = next(iter(info.run_ids.items()))
    m = queries.run_map(store, run_id)
    ny, nx = int(m["iy"].max()) + 1, int(m["ix"].max()) + 1
    probs = np.stack(m["probs"].to_numpy()).reshape(ny, nx, 8)
    cells = pool_scan(probs, 4.0)
    store.write_run(info.model_ids[model], info.scan_ids[scan],
                    dict(pred=cells["pred"], probs=cells["probs"], confidence=cells["confidence"],
                         true_label=m["true_label"].to_numpy().reshape(ny, nx)),
                    seconds=1.0, device="cpu", layer="cell")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in info.env().items():
            mp.setenv(k, v)
        yield info, scan, model


def _page(query: dict) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(query)
    at.run()
    return at.switch_page(ERROR_MAPS).run()


def test_cell_layer_from_the_url(info):
    info, scan, model = info
    at = _page({"scan": str(info.scan_ids[scan]), "model": model, "layer": "cell"})
    assert not at.exception and not at.error
    assert at.session_state["f_layer"] == "cell"
    assert at.sidebar.radio(key="w_layer").value == "cell"
    assert any("Unit-cell layer" in i.value for i in at.info)
    assert at.query_params["layer"] == "cell"
    # back to the per-pattern layer: the default, absent from the URL
    at.sidebar.radio(key="w_layer").set_value("pattern").run()
    assert at.session_state["f_layer"] == "pattern" and "layer" not in at.query_params
    assert not any("Unit-cell layer" in i.value for i in at.info)


def test_cell_layer_without_cell_runs_says_so(info):
    info, scan, _ = info
    other = [m for m in info.model_ids if (m, scan) in info.run_ids][-1]
    assert (other, scan) != next(iter(info.run_ids))  # only the first model has a cell run
    at = _page({"scan": str(info.scan_ids[scan]), "model": other, "layer": "cell"})
    assert not at.exception and not at.error
    assert any("No stored run" in i.value for i in at.info)


def test_bad_layer_is_ignored_with_a_warning(info):
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"layer": "cells"})
    at.run()
    assert not at.exception
    assert any("layer" in w.value for w in at.sidebar.warning)
    assert at.session_state["f_layer"] is None
    at.switch_page(ERROR_MAPS).run()  # the Overview page shows no filters; the maps page does
    assert not at.exception and at.sidebar.radio(key="w_layer").value == "pattern"

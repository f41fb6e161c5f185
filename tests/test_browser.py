"""End-to-end tests in headless Chromium (Playwright, Debian's chromium) against ``streamlit run app.py``.

One server on a free port serves a small real store (tests/app_fixtures.py) for the whole module. Every page
renders without an exception or traceback (screenshots go to a tmp dir, or to ``$POLBENCH_SHOTS`` when set);
a box drawn with the mouse on the class map sets the region filter (URL and sidebar) and changes the error
table; a click on a probe position shows its pattern; a small scan uploads through the file input, is
ingested in the background while a second session browses, and its map appears.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import (
    PAGE_PATHS,
    StreamlitServer,
    build_store,
    full_screenshot,
    launch_chromium,
    make_labels,
    open_page,
    page_problems,
    wait_idle,
    write_scan,
)

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_pages_v16 import _virtual_images

    from polcore.store import PredictionStore

    info = build_store(tmp_path_factory.mktemp("browserdata"))
    # the structure under the maps: virtual images of exp_wedge, computed as the ingest computes them
    PredictionStore(info.db).write_scan_images(info.scan_ids["exp_wedge"], _virtual_images(info.scans["exp_wedge"]))
    with StreamlitServer(info.env()) as srv:
        srv.info = info
        yield srv


@pytest.fixture(scope="module")
def browser(server):
    with playwright_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    yield pg
    ctx.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("POLBENCH_SHOTS")
    out = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wrong_count(page) -> int:
    text = page.get_by_text(re.compile(r"wrong predictions")).first.inner_text()
    return int(re.search(r"([\d,]+) wrong predictions", text).group(1).replace(",", ""))


def test_every_page_renders(server, page, shots):
    exp = server.info.scan_ids["exp_wedge"]
    times = {}
    for name in PAGE_PATHS:
        query = f"scan={exp}&model=resnet-cls-s0" if name in ("error_maps", "defects") else ""
        times[name] = open_page(page, server.url, name, query)
        assert not page_problems(page), (name, page_problems(page))
        if name not in ("benchmark", "upload"):
            page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=30000)
        full_screenshot(page, shots / f"{name}.png")
    assert max(times.values()) < 30, times


def test_deep_link_keeps_filters_across_pages(server, page):
    exp = server.info.scan_ids["exp_wedge"]
    open_page(page, server.url, "defects", f"scan={exp}&model=resnet-cls-s1&th=20-40")
    page.get_by_role("link", name="Error maps").first.click()
    wait_idle(page)
    assert "th=20-40" in page.url and "model=resnet-cls-s1" in page.url
    assert not page_problems(page)


def test_box_selection_sets_region_and_changes_error_table(server, page):
    exp = server.info.scan_ids["exp_wedge"]
    open_page(page, server.url, "error_maps", f"scan={exp}&model=resnet-cls-s0&tab=errors")
    before = _wrong_count(page)
    assert "region=" not in page.url
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    chart.locator(".main-svg").first.wait_for(timeout=30000)
    drag = chart.locator(".nsewdrag").first
    for _ in range(3):  # a drag landing during a re-render is lost: retry
        box = drag.bounding_box()
        x0, y0 = box["x"] + 0.25 * box["width"], box["y"] + 0.25 * box["height"]
        x1, y1 = box["x"] + 0.65 * box["width"], box["y"] + 0.70 * box["height"]
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
        page.mouse.move(x1, y1, steps=5)
        page.mouse.up()
        deadline = time.monotonic() + 10
        while "region=" not in page.url and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        if "region=" in page.url:
            break
    wait_idle(page)
    m = re.search(r"region=(\d+)%2C(\d+)%2C(\d+)%2C(\d+)|region=(\d+),(\d+),(\d+),(\d+)", page.url)
    assert m, page.url
    y_0, y_1, x_0, x_1 = (int(v) for v in (g for g in m.groups() if g is not None))
    assert 0 < y_0 < y_1 < 29 and 0 < x_0 < x_1 < 35  # roughly the dragged part of the 30x36 scan
    after = _wrong_count(page)
    assert after < before
    assert page.get_by_text(f"rows {y_0}\u2013{y_1}, columns {x_0}\u2013{x_1}").count() >= 1
    assert not page_problems(page)


def test_click_shows_probe_pattern(server, page):
    exp = server.info.scan_ids["exp_wedge"]
    open_page(page, server.url, "error_maps", f"scan={exp}&model=resnet-cls-s0")
    chart = page.locator('[data-testid="stPlotlyChart"]').nth(1)  # the confidence map takes clicks
    chart.locator(".main-svg").first.wait_for(timeout=30000)
    # wait until Streamlit has switched the chart to click-to-select (it re-renders once after mounting)
    chart.locator(".js-plotly-plot").first.evaluate(
        """d => new Promise(ok => { const t = setInterval(() => {
               const m = d._fullLayout && d._fullLayout.clickmode;
               if (m && m.includes('select')) { clearInterval(t); ok(); } }, 100); })"""
    )
    target = page.get_by_text("Probe position iy=7, ix=20")
    for _ in range(3):  # a click landing during a re-render is lost: retry (only then: a second click on the
        # same point would unselect it)
        # pixel position of probe (iy=7, ix=20) from the chart's own axes
        x, y = chart.evaluate("""el => { const d = el.querySelector('.js-plotly-plot');
            const r = d.querySelector('.nsewdrag').getBoundingClientRect();
            return [r.left + d._fullLayout.xaxis.d2p(20), r.top + d._fullLayout.yaxis.d2p(7)]; }""")
        page.mouse.move(x, y)
        page.wait_for_timeout(300)
        page.mouse.click(x, y)
        deadline = time.monotonic() + 30
        while "point=" not in page.url and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        if "point=" in page.url:
            break
    target.wait_for(timeout=60000)
    wait_idle(page)
    for title in ("Measured pattern", "Library, predicted", "Class probabilities"):
        page.locator('[data-testid="stPlotlyChart"]').filter(has_text=title).first.wait_for()
    assert "point=7%2C20" in page.url or "point=7,20" in page.url
    assert not page_problems(page)


def test_error_maps_for_a_projector(server, browser, page, shots):
    """Maps side by side with the arrows over the virtual ADF; a real click on the comparison tab opens it (and
    puts it in the URL); the sidebar's link opens the same view in a new session; no filters on Upload."""
    exp = server.info.scan_ids["exp_wedge"]
    open_page(page, server.url, "error_maps", f"scan={exp}&model=resnet-cls-s0&th=20-40&point=7,20")
    charts = page.locator('[data-testid="stPlotlyChart"]')
    charts.filter(has_text="Polarization per unit cell over the virtual ADF").first.wait_for(timeout=30000)
    charts.filter(has_text="Measured pattern").first.wait_for(timeout=30000)
    a, b = (charts.nth(i).bounding_box() for i in (0, 1))
    assert abs(a["y"] - b["y"]) < 5 and b["x"] > a["x"] + a["width"] - 5  # two columns
    page.get_by_role("tab", name="Compare two models").click()
    page.get_by_text("Agreement rate").first.wait_for(timeout=30000)
    wait_idle(page)
    assert "tab=compare" in page.url and not page_problems(page)
    full_screenshot(page, shots / "error_maps_compare.png")
    page.get_by_text("Copy link to this view").first.click()
    link = page.locator('[data-testid="stCode"] code').last.inner_text().strip()
    assert link.startswith(server.url + "/Error_maps?") and "tab=compare" in link and "point=7,20" in link
    other = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        op = other.new_page()
        op.goto(link, wait_until="domcontentloaded")
        wait_idle(op)
        op.get_by_text("Agreement rate").first.wait_for(timeout=30000)
        assert op.get_by_role("tab", name="Compare two models").get_attribute("aria-selected") == "true"
        assert "th=20-40" in op.url and not page_problems(op)
    finally:
        other.close()
    open_page(page, server.url, "upload")
    sidebar = page.locator('[data-testid="stSidebar"]')
    assert sidebar.get_by_text("Filters").count() == 0 and sidebar.locator("input").count() == 0
    assert not page_problems(page)


def test_upload_small_scan_shows_its_map(server, browser, page, tmp_path):
    """Upload through the file input, ingest in the background while a second session browses, see the map."""
    rng = np.random.default_rng(11)
    lab = make_labels(12, 14, rng)
    src = write_scan(
        tmp_path / "my_scan.h5", lab, np.full(lab.shape, 25.0, np.float32), np.zeros(lab.shape, bool), rng
    )
    open_page(page, server.url, "upload")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(src))
    page.get_by_text(re.compile(r"12\u00d714 positions")).wait_for(timeout=30000)
    wait_idle(page)
    page.get_by_role("button", name="Ingest").click()
    other = browser.new_context(viewport={"width": 1200, "height": 900})
    try:  # a second session browses while the first one ingests
        op = other.new_page()
        for name in ("benchmark", "error_maps"):
            open_page(op, server.url, name)
            assert not page_problems(op), name
    finally:
        other.close()
    page.get_by_text(re.compile(r"Stored scan")).wait_for(timeout=60000)
    wait_idle(page)
    page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=30000)
    assert page.get_by_text(re.compile(r"Predicted class \u2014 pca_knn-cls-s0")).count() >= 1
    assert not page_problems(page)
    assert list((server.info.data_dir / "uploads").glob("my_scan-*.h5"))


def test_upload_page_shows_the_scan_geometry(server, page, shots, default_library):
    """A scan recorded by a detector turned by 30 deg and flipped, with a +-3 px descan and no rotation in its
    calibration: the Upload page shows the estimated rotation, flip, descan range and sampling before the run
    (screenshot ``upload_geometry.png``, kept in docs/screenshots when ``POLBENCH_SHOTS`` points there)."""
    from tests.test_geometry import _compose, _ramp, _record
    from tests.test_geometry_ingest import _write

    truth, data = _compose(default_library, n=24, thickness=10.0, seed=5)
    rec = _record(data, 30.0, True, _ramp(24, 24, 3.0), 2e4, np.random.default_rng(4))
    src = _write(server.info.data_dir / "rotated_detector.h5", truth, rec, calibrated_rotation=False)
    open_page(page, server.url, "upload")
    page.get_by_role("radiogroup", name="Source").get_by_text("Path on the server").click()
    wait_idle(page)
    box = page.get_by_label(re.compile("Path of the scan file"))
    box.fill(str(src))
    box.press("Enter")
    page.get_by_text("Scan geometry").first.wait_for(timeout=60000)
    page.get_by_text(re.compile(r"Use the file's / estimated values")).wait_for(timeout=60000)
    wait_idle(page)
    text = page.locator('[data-testid="stMain"]').inner_text()
    m = re.search(r"Rotation\s+(-?[\d.]+)\u00b0", text)
    assert m and abs(float(m.group(1)) - 30.0) < 2.0, text
    assert "estimated, high confidence" in text and re.search(r"Flip\s+flip", text)
    assert not page_problems(page)
    full_screenshot(page, shots / "upload_geometry.png")

"""Screenshots of every dashboard page from the demo database, for the README.

Usage (from the repository root, after ``make run`` or ``python -m polcore demo`` built the database)::

    .venv/bin/python tests/take_screenshots.py [--db data/polbench.duckdb] [--out docs/screenshots]

Starts ``streamlit run app.py`` on a free port against the database, opens every page in headless Chromium
(Debian's chromium through Playwright), clicks a probe position on the Error maps page so its pattern shows,
writes ``<out>/<page>.png`` and prints the time each page took to render (script run finished and charts
drawn), then stops the server.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _choose_view(db: Path) -> tuple[int | None, str | None]:
    """An experimental-like scan and the model with the best accuracy on it (for the map pages)."""
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db, read_only=True)
    scans = queries.list_scans(store)
    if scans.empty:
        return None, None
    exp = scans[scans["kind"] != "synthetic"]
    scan = exp.iloc[0] if len(exp) else scans.iloc[0]
    met = queries.metrics_by_run(store)
    met = met[met["scan_id"] == int(scan["scan_id"])].sort_values("accuracy", ascending=False)
    return int(scan["scan_id"]), (str(met["model"].iloc[0]) if len(met) else None)


def _click_probe(page, chart_index: int = 1, frac: tuple[float, float] = (0.4, 0.55)) -> None:
    """Click a position on the confidence map (the chart that takes clicks) and wait for its pattern."""
    from app_fixtures import wait_idle

    chart = page.locator('[data-testid="stPlotlyChart"]').nth(chart_index)
    chart.locator(".main-svg").first.wait_for(timeout=30000)
    for _ in range(3):
        box = chart.locator(".nsewdrag").first.bounding_box()
        x, y = box["x"] + frac[1] * box["width"], box["y"] + frac[0] * box["height"]
        page.mouse.move(x, y)
        page.wait_for_timeout(300)
        page.mouse.click(x, y)
        try:
            page.get_by_text("Probe position").first.wait_for(timeout=10000)
            break
        except Exception:  # noqa: BLE001 - retry a click lost during a re-render
            continue
    wait_idle(page)


def main(argv=None) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run as a script: polcore and app_fixtures importable
    from app_fixtures import (
        PAGE_PATHS,
        StreamlitServer,
        full_screenshot,
        launch_chromium,
        open_page,
        page_problems,
    )
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, default=ROOT / "data" / "polbench.duckdb")
    p.add_argument("--data", type=Path, default=None, help="data directory (default: the database's folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    p.add_argument("--width", type=int, default=1400)
    args = p.parse_args(argv)
    db = args.db.resolve()
    if not db.is_file():
        print(
            f"no database at {db}: build it with `make run` or `python -m polcore demo` first",
            file=sys.stderr,
        )
        return 2
    data = (args.data or db.parent).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    scan_id, model = _choose_view(db)
    query = "&".join(f"{k}={v}" for k, v in (("scan", scan_id), ("model", model)) if v is not None)
    times = {}
    with StreamlitServer({"POLBENCH_DB": str(db), "POLBENCH_DATA": str(data)}, root=ROOT) as srv:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            open_page(page, srv.url, "overview")  # warm the server's caches and imports once
            for name in PAGE_PATHS:
                t0 = time.perf_counter()
                open_page(page, srv.url, name, query)
                if name not in ("benchmark", "upload"):
                    page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=60000)
                times[name] = time.perf_counter() - t0
                if name == "error_maps":
                    _click_probe(page)
                page.wait_for_timeout(1000)
                problems = page_problems(page)
                if problems:
                    print(f"{name}: PROBLEM {problems}", file=sys.stderr)
                out = args.out / f"{name}.png"
                full_screenshot(page, out)
                print(f"{name:12s} rendered in {times[name]:5.1f} s -> {out}")
            # the unit-cell layer of the same view (the sidebar's "Prediction layer", here from the URL)
            t0 = time.perf_counter()
            open_page(page, srv.url, "error_maps", query + "&layer=cell")
            page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=60000)
            times["error_maps_cells"] = time.perf_counter() - t0
            page.wait_for_timeout(1000)
            out = args.out / "error_maps_cells.png"
            full_screenshot(page, out)
            print(f"{'error_maps (cell layer)':12s} rendered in {times['error_maps_cells']:5.1f} s -> {out}")
            browser.close()
    print(f"total {sum(times.values()):.1f} s for {len(times)} pages (database {db})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

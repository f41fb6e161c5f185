"""Screenshots of every dashboard page from the demo database, for the README, and the pages' render times.

Usage (from the repository root, after ``make run`` or ``python -m polcore demo`` built the database)::

    .venv/bin/python tests/take_screenshots.py [--db data/polbench.duckdb] [--out docs/screenshots] [--visits 2]

Starts ``streamlit run app.py`` on a free port against the database, opens every page in headless Chromium
(Debian's chromium through Playwright) ``--visits`` times, clicks a probe position on the Error maps page so
that the probe viewer shows, opens its comparison tab for a second shot, writes ``<out>/<page>.png`` and prints
the time each page took to render. The first visit of a page runs with its cached queries cold (imports and
reads); later visits are warm (a user coming back, or a second user), and the table prints both. Then it
stops the server.

What is timed (:func:`timed_visit`): from just before ``page.goto`` to the first moment at which the page is
finished, that is, all at once: the app's script run has started and ended (``stApp``
``data-test-script-state`` went to ``running`` and is back at ``notRunning``), the page's ``h1`` is there and
every visible Plotly chart has drawn its SVG. The clock stops there. Only then, untimed, the page is watched
for :data:`SETTLE_MS` more to confirm that it stays finished (no new script run started, e.g. a rerun the
page asked for); if one did start, the page is waited for again and its time runs to the end of that later
run, from the same start. So the time is what a user waits for the finished page, without the fixed settle
pauses of :func:`app_fixtures.wait_idle` (which the earlier version of this script counted: about 0.3 to 0.6 s
more per page). The ``script`` column is the share of it the server's last script run took (from its start to
its end, as the browser saw the state change), the rest being the connection, the transfer and the drawing.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = '[data-testid="stPlotlyChart"]'


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


#: Untimed wait after a page is finished, to confirm that no new script run starts [ms].
SETTLE_MS = 300
#: Init script of every document: counts the app's script runs and notes when the last one started and
#: ended (``performance.now()`` ms since the navigation), from the changes of ``data-test-script-state``.
_RUN_TRACKER = """
(() => {
  const t = window.__pbRuns = {runs: 0, started: null, ended: null};
  new MutationObserver(records => {
    for (const r of records) {
      const s = r.target.getAttribute('data-test-script-state');
      if (s === 'running' && r.oldValue !== 'running') { t.runs += 1; t.started = performance.now(); }
      else if (s === 'notRunning' && r.oldValue !== 'notRunning') { t.ended = performance.now(); }
    }
  }).observe(document, {subtree: true, attributes: true, attributeOldValue: true,
                        attributeFilter: ['data-test-script-state']});
})();
"""
#: True when the page is finished: a script run started and ended, the h1 is there, no element still loading
#: its code (Streamlit shows an ``stSkeleton`` while a lazy component such as the Plotly chart loads) and
#: every visible chart has drawn its SVG.
_FINISHED = """sel => { const t = window.__pbRuns, app = document.querySelector('[data-testid="stApp"]');
    if (!t || !app || t.runs === 0 || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
    if (!document.querySelector('h1')) return false;
    const shown = s => [...document.querySelectorAll(s)].filter(e => e.offsetParent !== null);
    if (shown('[data-testid="stSkeleton"]').length) return false;
    return shown(sel).every(e => e.querySelector('.main-svg')); }"""


def timed_visit(page, url: str, timeout_ms: int = 60000) -> tuple[float, float]:
    """Open ``url`` and wait until the page is finished; returns (seconds, seconds of its last script run).

    The page needs :data:`_RUN_TRACKER` as an init script (``page.add_init_script``). See the module doc for
    what is timed: the clock stops when the page is first seen finished, and the stability check after it
    (:data:`SETTLE_MS`, no new script run) is not timed unless a new run did start.
    """
    t0 = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded")
    while True:
        page.wait_for_function(_FINISHED, arg=CHART, timeout=timeout_ms)
        elapsed = time.perf_counter() - t0
        t = page.evaluate("() => window.__pbRuns")
        page.wait_for_timeout(SETTLE_MS)  # untimed: does the page stay finished?
        again = page.evaluate("() => window.__pbRuns")
        state = page.get_attribute('[data-testid="stApp"]', "data-test-script-state")
        if again["runs"] == t["runs"] and state == "notRunning":
            return elapsed, (t["ended"] - t["started"]) / 1000.0
        # a new run started after the first finish: the page was not finished yet; time it to the end


def _charts_drawn(page, timeout_ms: int = 60000) -> None:
    """Wait until every visible Plotly chart of the page has drawn its SVG."""
    page.wait_for_function(
        """sel => { const c = [...document.querySelectorAll(sel)].filter(e => e.offsetParent !== null);
                    return c.every(e => e.querySelector('.main-svg')); }""",
        arg=CHART,
        timeout=timeout_ms,
    )


def _click_probe(page, chart_index: int = 1, frac: tuple[float, float] = (0.4, 0.55)) -> None:
    """Click a position on the confidence map (the chart that takes clicks) and wait for its pattern."""
    from app_fixtures import wait_idle

    chart = page.locator(CHART).nth(chart_index)
    chart.locator(".main-svg").first.wait_for(timeout=30000)
    for _ in range(3):
        box = chart.locator(".nsewdrag").first.bounding_box()
        x, y = box["x"] + frac[1] * box["width"], box["y"] + frac[0] * box["height"]
        page.mouse.move(x, y)
        page.wait_for_timeout(300)
        page.mouse.click(x, y)
        deadline = time.monotonic() + 30
        while "point=" not in page.url and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        if "point=" in page.url:  # retry only a click lost during a re-render (a second one would unselect)
            break
    page.get_by_text(re.compile(r"Probe position iy=\d+")).first.wait_for(timeout=60000)
    wait_idle(page)
    _charts_drawn(page)


def main(argv=None) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run as a script: polcore and app_fixtures importable
    from app_fixtures import (
        PAGE_PATHS,
        StreamlitServer,
        full_screenshot,
        launch_chromium,
        open_page,
        page_problems,
        wait_idle,
    )
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, default=ROOT / "data" / "polbench.duckdb")
    p.add_argument("--data", type=Path, default=None, help="data directory (default: the database's folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--visits", type=int, default=2, help="visits per page: the first cold, the others warm")
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
    views = [(name, name, query) for name in PAGE_PATHS]
    views.append(("error_maps_cells", "error_maps", query + "&layer=cell"))  # the unit-cell layer of the view
    times: dict[str, list[float]] = {}
    scripts: dict[str, list[float]] = {}
    with StreamlitServer({"POLBENCH_DB": str(db), "POLBENCH_DATA": str(data)}, root=ROOT) as srv:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            page.add_init_script(_RUN_TRACKER)
            open_page(page, srv.url, "overview")  # start the server's Python once (imports of app.py)
            for visit in range(max(1, args.visits)):
                for shot, name, q in views:
                    url = f"{srv.url}/{PAGE_PATHS[name]}{('?' + q) if q else ''}"
                    seconds, script = timed_visit(page, url)
                    times.setdefault(shot, []).append(seconds)
                    scripts.setdefault(shot, []).append(script)
                    if visit < args.visits - 1:
                        continue
                    if shot == "error_maps":
                        _click_probe(page)
                    page.wait_for_timeout(1000)
                    problems = page_problems(page)
                    if problems:
                        print(f"{shot}: PROBLEM {problems}", file=sys.stderr)
                    full_screenshot(page, args.out / f"{shot}.png")
                    if shot == "error_maps" and page.get_by_role("tab", name="Compare two models").count():
                        page.get_by_role("tab", name="Compare two models").click()
                        page.get_by_text("Agreement rate").first.wait_for(timeout=60000)
                        wait_idle(page)
                        _charts_drawn(page)
                        full_screenshot(page, args.out / "error_maps_compare.png")
            browser.close()
    print(f"{'page':18s} {'first visit':>12s} {'later visits':>13s}   (script run: first, later)")
    for shot, ts in times.items():
        sc = scripts[shot]
        later = f"{sum(ts[1:]) / len(ts[1:]):10.2f} s" if len(ts) > 1 else f"{'-':>12s}"
        sc_later = f"{sum(sc[1:]) / len(sc[1:]):.2f} s" if len(sc) > 1 else "-"
        print(f"{shot:18s} {ts[0]:10.2f} s {later}   ({sc[0]:.2f} s, {sc_later})")
    print(f"screenshots in {args.out}; database {db}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

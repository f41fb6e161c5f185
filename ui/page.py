"""The helper every page starts with: page config, URL -> filters, the sidebar filters, filters -> URL.

app.py does not run before a page (each page of the legacy ``pages/`` folder runs on its own), so every page
calls :func:`init_page` first and wraps its body in :func:`guard`, which turns any exception into a short
``st.error`` (the traceback goes to the server log, never to the browser).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from polcore.types import Filters
from ui import data, paths, state, warmup

__all__ = [
    "PageContext",
    "init_page",
    "guard",
    "short_error",
    "require_db",
    "require_run",
    "download_table",
    "scan_label",
    "NAV",
    "FILTERS",
    "PAGE_FILTERS",
]

log = logging.getLogger(__name__)

ALL_DATASETS = "\u2014 all data sets \u2014"
_ALL = "__all__"  # option value of "all data sets" (a None option would show as an empty selectbox)

#: Every sidebar filter, in the order they are drawn.
FILTERS: tuple[str, ...] = ("dataset", "scan", "model", "layer", "thickness", "region")
#: The sidebar filters that apply on each page (by title); a page not listed shows all of them.
PAGE_FILTERS: dict[str, tuple[str, ...]] = {
    "Overview": (),
    "Benchmark": ("dataset", "layer", "thickness", "region"),
    "Confusion": ("dataset", "scan", "layer", "thickness", "region"),
    "Error maps": FILTERS,
    "Embeddings": ("model", "thickness", "region"),
    "Defects": FILTERS,
    "Upload": (),
}

#: Pages of the app in menu order: (script path, label, Material icon).
NAV: tuple[tuple[str, str, str], ...] = (
    ("app.py", "Overview", ":material/insights:"),
    ("pages/1_Benchmark.py", "Benchmark", ":material/leaderboard:"),
    ("pages/2_Confusion.py", "Confusion", ":material/grid_on:"),
    ("pages/3_Error_maps.py", "Error maps", ":material/map:"),
    ("pages/4_Embeddings.py", "Embeddings", ":material/scatter_plot:"),
    ("pages/5_Defects.py", "Defects", ":material/report:"),
    ("pages/6_Upload.py", "Upload", ":material/upload_file:"),
)


@dataclass
class PageContext:
    """What a page needs after :func:`init_page`.

    Attributes
    ----------
    title : page title.
    db : database path; ready : whether it exists with a polbench schema.
    tok : database token for cached queries (see :mod:`ui.data`).
    scans, models : catalogue frames (empty without a database).
    filters : thickness / region :class:`polcore.types.Filters`; ft : their hashable form.
    dataset : selected dataset or None (all).
    scan : selected scan row (pd.Series) or None; model : selected model row or None.
    run_id : the run of the selected model on the selected scan, or None.
    """

    title: str
    db: Path
    ready: bool = False
    tok: tuple = ()
    scans: pd.DataFrame = field(default_factory=pd.DataFrame)
    models: pd.DataFrame = field(default_factory=pd.DataFrame)
    filters: Filters = field(default_factory=Filters)
    ft: tuple = (None, None)
    dataset: str | None = None
    scan: pd.Series | None = None
    model: pd.Series | None = None
    run_id: int | None = None
    layer: str = "pattern"


def short_error(exc: BaseException) -> str:
    """One-paragraph message for a user (no traceback)."""
    name = type(exc).__name__
    if name == "StoreBusyError":
        return "the database is busy (another program is writing to it); reload the page in a moment."
    if name == "StoreNotFoundError":
        return "there is no database yet: build the demo on the Overview page or run `make run`."
    text = str(exc).strip() or name
    if len(text) > 400:
        text = text[:400] + " ..."
    if isinstance(exc, ValueError | FileNotFoundError | OSError | KeyError):
        return text
    return f"{name}: {text}"


@contextmanager
def guard(what: str = "This page") -> Iterator[None]:
    """Show any exception raised in the block as ``st.error`` and log its traceback.

    Streamlit's control-flow exceptions (``st.stop``, ``st.rerun``) derive from BaseException: they pass.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the user must never see a traceback
        log.exception("%s failed", what)
        st.error(f"{what} could not be shown: {short_error(exc)}")


def _setup_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def scan_label(row) -> str:
    """Display label of a scan row: ``name (kind, ny x nx)``."""
    kind = str(row["kind"]).replace("_", "-")
    return f"{row['name']} ({kind}, {int(row['ny'])}\u00d7{int(row['nx'])})"


def _bind(
    widget_key: str, state_key: str, convert: Callable | None = None, after: Callable[[], None] | None = None
) -> Callable[[], None]:
    """on_change callback copying a widget's value into its plain state key."""

    def _cb() -> None:
        value = st.session_state.get(widget_key)
        st.session_state[state_key] = convert(value) if convert else value
        if after is not None:
            after()

    return _cb


def _select(
    container,
    label: str,
    options: list,
    state_key: str,
    widget_key: str,
    *,
    format_func=str,
    after=None,
    help: str | None = None,
):
    """A selectbox rebuilt from a plain state key (invalid or missing values -> the first option)."""
    cur = st.session_state.get(state_key)
    if cur not in options:
        cur = options[0] if options else None
        st.session_state[state_key] = cur
    st.session_state[widget_key] = cur
    container.selectbox(
        label,
        options,
        key=widget_key,
        format_func=format_func,
        on_change=_bind(widget_key, state_key, after=after),
        help=help,
    )
    return cur


def _resolve(options: list, state_key: str):
    """The state key's value if it is one of ``options``, else the first option (stored back)."""
    cur = st.session_state.get(state_key)
    if cur not in options:
        cur = options[0] if options else None
        st.session_state[state_key] = cur
    return cur


def _region_bounds(ctx: PageContext) -> tuple[int, int]:
    """(ny, nx) the region fields refer to: the selected scan's, else the largest stored scan's."""
    if ctx.scan is not None:
        return int(ctx.scan["ny"]), int(ctx.scan["nx"])
    if len(ctx.scans):
        return int(ctx.scans["ny"].max()), int(ctx.scans["nx"].max())
    return 1, 1


#: The four region fields: widget key -> (label, index in (y0, y1, x0, x1)).
REGION_FIELDS: dict[str, tuple[str, int]] = {
    "w_ry0": ("first row y0", 0),
    "w_ry1": ("last row y1", 1),
    "w_rx0": ("first column x0", 2),
    "w_rx1": ("last column x1", 3),
}


def _region_changed(ny: int, nx: int) -> None:
    """on_change of a region field: empty fields mean 'to the edge'; the whole scan (or all empty) = none."""
    vals = [st.session_state.get(k) for k in REGION_FIELDS]
    if all(v is None for v in vals):
        state.set_region(None)
        return
    full = (0, ny - 1, 0, nx - 1)
    region = tuple(int(v) if v is not None else full[i] for i, v in enumerate(vals))
    state.set_region(None if region == full else region)


def _region_fields(sb, ctx: PageContext) -> None:
    """The region as four number fields (inclusive scan pixels), plus its summary and a clear button."""
    region = st.session_state.get("f_region")
    ny, nx = _region_bounds(ctx)
    sb.markdown("**Region** (scan pixels, inclusive)")
    cols = [*sb.columns(2), *sb.columns(2)]
    for col, (key, (label, i)) in zip(cols, REGION_FIELDS.items()):
        st.session_state[key] = None if region is None else int(region[i])
        col.number_input(
            label,
            min_value=0,
            value=None,
            step=1,
            key=key,
            placeholder="edge" if i % 2 else "0",
            on_change=_region_changed,
            args=(ny, nx),
            help="Empty = to the edge of the scan. Or drag a box on the class map (Error maps page).",
        )
    if region is None:
        sb.caption("Region: whole scan.")
    else:
        y0, y1, x0, x1 = region
        sb.caption(
            f"Region: rows {y0}\u2013{y1}, columns {x0}\u2013{x1} "
            f"({(y1 - y0 + 1) * (x1 - x0 + 1)} positions)."
        )
    sb.button("Clear region", on_click=state.clear_region, disabled=region is None, key="b_clear_region")


def _sidebar_filters(ctx: PageContext, show: frozenset[str]) -> None:
    """Resolve every filter from its state key (so links and other pages keep them) and draw the widgets of
    the filters in ``show`` (the ones that apply to this page)."""
    sb = st.sidebar
    if show:
        sb.header("Filters")
    scans = ctx.scans
    datasets = list(dict.fromkeys(scans["dataset"].dropna().astype(str))) if len(scans) else []
    if st.session_state.get("f_dataset") is None:
        st.session_state["f_dataset"] = _ALL
    ds_opts = [_ALL, *datasets]
    if "dataset" in show:
        ds = _select(
            sb,
            "Data set",
            ds_opts,
            "f_dataset",
            "w_dataset",
            format_func=lambda v: ALL_DATASETS if v == _ALL else v,
            after=state.clear_scan_view,
            help="A benchmark row: scans of one kind, thickness and cell size.",
        )
    else:
        ds = _resolve(ds_opts, "f_dataset")
    if ds == _ALL:
        ds = None
        st.session_state["f_dataset"] = None
    ctx.dataset = ds
    pool = scans if ds is None else scans[scans["dataset"] == ds]
    labels = {int(r.scan_id): scan_label(r._asdict()) for r in pool.itertuples()}
    if "scan" in show:
        scan_id = _select(
            sb,
            "Scan",
            list(labels),
            "f_scan",
            "w_scan",
            format_func=lambda v: labels.get(v, str(v)),
            after=state.clear_scan_view,
        )
    else:
        scan_id = _resolve(list(labels), "f_scan")
    ctx.scan = None if scan_id is None else scans[scans["scan_id"] == scan_id].iloc[0]

    runs = data.runs(ctx.tok)
    models = ctx.models
    names = list(models["name"]) if len(models) else []
    if scan_id is not None and len(runs) and "scan" in show:
        on_scan = set(runs.loc[runs["scan_id"] == scan_id, "model"])
        if on_scan:
            names = [n for n in names if n in on_scan]
    from polcore.train import RECOMMENDED_MODEL

    if RECOMMENDED_MODEL in names:  # the recommended model is the default choice (first option)
        names = [RECOMMENDED_MODEL] + [n for n in names if n != RECOMMENDED_MODEL]
    if "model" in show:
        _select(sb, "Model", names, "f_model", "w_model", help="Models with a stored run on the selected scan.")
    elif st.session_state.get("f_model") not in names:
        _resolve(names, "f_model")
    name = st.session_state.get("f_model")
    ctx.model = None if name is None else models[models["name"] == name].iloc[0]
    if "layer" in show:
        st.session_state["w_layer"] = state.current_layer()
        sb.radio(
            "Prediction layer",
            list(state.LAYER_LABELS),
            key="w_layer",
            format_func=state.LAYER_LABELS.get,
            horizontal=True,
            on_change=_bind("w_layer", "f_layer"),
            help="Per pattern: each probe position's own class. Per unit cell: the class log-probabilities of "
                 "the positions in each projected unit cell summed, the cell's class shown at each of its "
                 "positions.",
        )
    ctx.layer = state.current_layer()
    ctx.run_id = data.find_run(ctx.tok, scan_id, name, ctx.layer)

    if "thickness" in show:
        bounds = data.thickness_bounds(ctx.tok)
        if bounds is not None and bounds[1] > bounds[0]:
            lo, hi = math.floor(bounds[0]), math.ceil(bounds[1])
            th = st.session_state.get("f_th")
            value = (float(lo), float(hi)) if th is None else (max(float(lo), min(th)), min(float(hi), max(th)))
            if value[0] > value[1]:
                value = (float(lo), float(hi))
            st.session_state["w_th"] = value

            def _th(v, lo=float(lo), hi=float(hi)):
                v = (float(v[0]), float(v[1]))
                return None if v == (lo, hi) else v

            sb.slider(
                "Thickness [nm]",
                min_value=float(lo),
                max_value=float(hi),
                step=0.5,
                key="w_th",
                on_change=_bind("w_th", "f_th", _th),
                help="Local sample thickness of each probe position (ground truth of the scan).",
            )
        else:
            sb.caption("Thickness: not known for the stored scans.")
    if "region" in show:
        _region_fields(sb, ctx)


def _link_button(ctx: PageContext) -> None:
    """'Copy link to this view': the page's URL with the view's query parameters, in a code box with a copy
    button (Streamlit's own; no clipboard script needed)."""
    try:
        base = st.context.url or ""
    except Exception:  # noqa: BLE001 - no browser context (bare script runs)
        base = ""
    link = state.view_link(base)
    with st.sidebar.popover("Copy link to this view", icon=":material/link:", width="stretch"):
        st.caption("The copy icon at the right of the box copies the link: it opens this page with the same "
                   "scan, model, filters and probe position.")
        st.code(link, language=None, wrap_lines=True)


def init_page(title: str, icon: str | None = None, filters: tuple[str, ...] | None = None) -> PageContext:
    """Set up a page: config, filters from the URL (once per session), sidebar filters, filters to the URL.

    Parameters
    ----------
    title : page title (also the browser tab's).
    icon : optional emoji or Material icon for the tab.
    filters : the sidebar filters that apply to this page (names in :data:`FILTERS`); default
        :data:`PAGE_FILTERS` of the title (every filter for a page not listed there). Filters that do not
        apply are not shown and not applied (``ctx.filters`` leaves them out), but they stay in the state
        and the URL for the other pages.

    Returns
    -------
    PageContext
    """
    st.set_page_config(page_title=f"{title} \u00b7 polbench", page_icon=icon, layout="wide")
    _setup_logging()
    warmup.start()  # once per process: the heavy imports of the other pages, in the background
    problems = state.load_query_params()
    show = frozenset(PAGE_FILTERS.get(title, FILTERS) if filters is None else filters)
    unknown = show - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown sidebar filters {sorted(unknown)}; valid: {', '.join(FILTERS)}")
    ctx = PageContext(title=title, db=paths.db_path())
    if not st.get_option("client.showSidebarNavigation"):
        for path, label, nav_icon in NAV:
            st.sidebar.page_link(path, label=label, icon=nav_icon)
    try:
        ctx.ready = data.store_ready(ctx.db)
        if ctx.ready:
            ctx.tok = data.token()
            ctx.scans = data.scans(ctx.tok)
            ctx.models = data.models(ctx.tok)
            _sidebar_filters(ctx, show)
        else:
            st.sidebar.info("No database yet. Build the demo on the Overview page or run `make run`.")
    except Exception as exc:  # noqa: BLE001 - never a traceback
        log.exception("sidebar filters failed")
        st.sidebar.error(f"Filters unavailable: {short_error(exc)}")
    for p in problems:
        st.sidebar.warning(p)
    applied = state.current_filters()
    ctx.filters = Filters(
        thickness=applied.thickness if "thickness" in show else None,
        region=applied.region if "region" in show else None,
    )
    ctx.ft = data.ftuple(ctx.filters)
    try:
        state.write_query_params()
    except Exception:  # noqa: BLE001 - the URL mirror is a convenience
        log.exception("could not write query parameters")
    if show and ctx.ready:
        _link_button(ctx)
    st.sidebar.caption(f"Database: `{ctx.db.name}` in `{ctx.db.parent}`")
    return ctx


def require_db(ctx: PageContext) -> None:
    """Stop the page with a pointer to the Overview page when there is no database."""
    if not ctx.ready:
        st.info(
            "There is no database yet. Build the demo database on the Overview page (one button) or run "
            "`make run` from a terminal, then come back."
        )
        st.page_link("app.py", label="Go to the Overview page", icon=":material/home:")
        st.stop()


def require_run(ctx: PageContext) -> int:
    """The selected run id, or stop with a message saying what to select."""
    require_db(ctx)
    if ctx.scan is None:
        st.info("No scan is stored yet: upload one on the Upload page.")
        st.stop()
    if ctx.model is None or ctx.run_id is None:
        st.info(
            f"No stored run for the selected model on scan {ctx.scan['name']!r}: choose another model in "
            "the sidebar, or ingest the scan with this model on the Upload page."
        )
        st.stop()
    return int(ctx.run_id)


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Copy with array cells turned into lists / strings so CSV and Parquet writers accept it."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object and len(out) and isinstance(out[c].iloc[0], np.ndarray):
            out[c] = [None if v is None else np.asarray(v).tolist() for v in out[c]]
    return out


def download_table(df: pd.DataFrame, name: str, *, key: str) -> None:
    """CSV and Parquet download buttons for a table (generated only when clicked)."""

    def _csv() -> bytes:
        return _plain(df).to_csv(index=False).encode()

    def _parquet() -> bytes:
        buf = io.BytesIO()
        _plain(df).to_parquet(buf, index=False)
        return buf.getvalue()

    c1, c2, _ = st.columns([1, 1, 4])
    c1.download_button(
        "CSV",
        _csv,
        file_name=f"{name}.csv",
        mime="text/csv",
        key=f"{key}_csv",
        on_click="ignore",
        icon=":material/download:",
    )
    c2.download_button(
        "Parquet",
        _parquet,
        file_name=f"{name}.parquet",
        mime="application/octet-stream",
        key=f"{key}_parquet",
        on_click="ignore",
        icon=":material/download:",
    )

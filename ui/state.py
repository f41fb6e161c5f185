"""Filter state shared by every page, and its mirror in the URL query parameters.

Filters live in ``st.session_state`` under plain (non-widget) keys, because a widget's own state is dropped
when a page that does not render it runs. Each page rebuilds its widgets from these keys and writes them back
to ``st.query_params`` so that a URL reproduces the view.

=============  ==========  ===========================================================
state key      URL param   value
=============  ==========  ===========================================================
``f_dataset``  dataset     dataset name (a benchmark row) or None for all
``f_scan``     scan        scan_id (int)
``f_model``    model       model name
``f_th``       th          thickness range (lo, hi) [nm], URL ``lo-hi``; None = all
``f_region``   region      (y0, y1, x0, x1) inclusive scan pixels, URL ``y0,y1,x0,x1``
``f_layer``    layer       'pattern' (per probe position) or 'cell' (pooled per unit cell)
``f_point``    point       (iy, ix) probe position shown on the Error maps page, URL ``iy,ix``
``f_compare``  compare     second model of the Error maps page's comparison
``f_tab``      tab         the Error maps page's open tab: probe, compare, periodic or errors
=============  ==========  ===========================================================

:func:`view_link` turns the current state into a link that restores the view (the sidebar's "Copy link to
this view").
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import streamlit as st

from polcore.types import Filters

__all__ = [
    "STATE_KEYS",
    "PARAM_OF",
    "parse_thickness",
    "format_thickness",
    "parse_region",
    "format_region",
    "load_query_params",
    "write_query_params",
    "current_filters",
    "set_region",
    "clear_region",
    "LAYER_LABELS",
    "parse_layer",
    "current_layer",
    "parse_point",
    "TABS",
    "parse_tab",
    "set_point",
    "current_point",
    "clear_scan_view",
    "view_query",
    "view_link",
]

log = logging.getLogger(__name__)

#: Plain session-state keys of the shared filters.
STATE_KEYS: tuple[str, ...] = (
    "f_dataset", "f_scan", "f_model", "f_th", "f_region", "f_layer", "f_point", "f_compare", "f_tab",
)
#: URL parameter of each state key.
PARAM_OF: dict[str, str] = {
    "f_dataset": "dataset",
    "f_scan": "scan",
    "f_model": "model",
    "f_th": "th",
    "f_region": "region",
    "f_layer": "layer",
    "f_point": "point",
    "f_compare": "compare",
    "f_tab": "tab",
}
#: The Error maps page's tabs: URL value -> label (the first is open by default).
TABS: dict[str, str] = {
    "probe": "Probe position",
    "compare": "Compare two models",
    "periodic": "Do the errors repeat with the lattice?",
    "errors": "Wrong predictions",
}
#: The prediction layers (``runs.layer``) and their labels.
LAYER_LABELS: dict[str, str] = {"pattern": "per pattern", "cell": "per unit cell"}
_LOADED = "_qp_loaded"


def _num(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"not a finite number: {text!r}")
    return v


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_THICKNESS_RE = re.compile(rf"^\s*({_NUMBER})\s*(?:(?:-|,|~|\.\.)\s*({_NUMBER})\s*)?$")


def parse_thickness(text: str | None) -> tuple[float, float] | None:
    """``"lo-hi"`` (or ``"lo,hi"``, ``"lo~hi"``, ``"lo..hi"``, or one value ``"v"``) -> (lo, hi) [nm];
    empty -> None. A reversed range is put in order (``"40-10"`` -> (10, 40)).

    Raises ValueError for anything else, with a message for the page: a negative thickness (``"-5--3"``,
    ``"-5"``, ``"10--3"``), a number that is not finite, or text that is not one or two numbers.
    """
    if text is None or not str(text).strip():
        return None
    m = _THICKNESS_RE.match(str(text))
    if m is None:
        raise ValueError(f"thickness range must look like 10-40 [nm], got {text!r}")
    values = [_num(g) for g in m.groups() if g is not None]
    if any(v < 0 for v in values):
        raise ValueError(f"thickness cannot be negative, got {text!r} (use lo-hi in nm, e.g. 10-40)")
    values = [v + 0.0 for v in values]  # -0.0 -> 0.0
    lo, hi = (values[0], values[0]) if len(values) == 1 else sorted(values)
    return (lo, hi)


def format_thickness(th: tuple[float, float] | None) -> str | None:
    """(lo, hi) -> ``"lo-hi"`` with compact numbers; None -> None."""
    if th is None:
        return None
    return "-".join(f"{float(v):g}" for v in th)


def parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    """``"y0,y1,x0,x1"`` -> inclusive (y0, y1, x0, x1) with y0 <= y1, x0 <= x1, all >= 0; empty -> None.

    Raises ValueError for anything else.
    """
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise ValueError(f"region must be y0,y1,x0,x1 (4 integers), got {text!r}")
    try:
        y0, y1, x0, x1 = (int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"region must be y0,y1,x0,x1 (4 integers), got {text!r}") from exc
    y0, y1 = sorted((y0, y1))
    x0, x1 = sorted((x0, x1))
    if y0 < 0 or x0 < 0:
        raise ValueError(f"region bounds must be >= 0, got {text!r}")
    return (y0, y1, x0, x1)


def format_region(region: tuple[int, int, int, int] | None) -> str | None:
    """(y0, y1, x0, x1) -> ``"y0,y1,x0,x1"``; None -> None."""
    if region is None:
        return None
    return ",".join(str(int(v)) for v in region)


def _parse_scan(text: str | None) -> int | None:
    if text is None or not str(text).strip():
        return None
    return int(str(text).strip())


def _parse_str(text: str | None) -> str | None:
    return str(text) if text is not None and str(text).strip() else None


def parse_layer(text: str | None) -> str | None:
    """'pattern' or 'cell'; empty -> None (= 'pattern'). Raises ValueError for anything else."""
    v = _parse_str(text)
    if v is not None and v not in LAYER_LABELS:
        raise ValueError(f"layer must be one of {', '.join(LAYER_LABELS)}, got {text!r}")
    return v


def parse_point(text: str | None) -> tuple[int, int] | None:
    """``"iy,ix"`` -> (iy, ix), both >= 0; empty -> None. Raises ValueError for anything else."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        iy, ix = (int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"point must be iy,ix (2 integers), got {text!r}") from exc
    if iy < 0 or ix < 0:
        raise ValueError(f"point must be iy,ix >= 0, got {text!r}")
    return (iy, ix)


def parse_tab(text: str | None) -> str | None:
    """One of :data:`TABS`; empty -> None (the first tab). Raises ValueError for anything else."""
    v = _parse_str(text)
    if v is not None and v not in TABS:
        raise ValueError(f"tab must be one of {', '.join(TABS)}, got {text!r}")
    return v


_PARSERS = {
    "f_dataset": _parse_str,
    "f_scan": _parse_scan,
    "f_model": _parse_str,
    "f_th": parse_thickness,
    "f_region": parse_region,
    "f_layer": parse_layer,
    "f_point": parse_point,
    "f_compare": _parse_str,
    "f_tab": parse_tab,
}
_FORMATTERS = {
    "f_dataset": lambda v: None if v is None else str(v),
    "f_scan": lambda v: None if v is None else str(int(v)),
    "f_model": lambda v: None if v is None else str(v),
    "f_th": format_thickness,
    "f_region": format_region,
    "f_layer": lambda v: None if v in (None, "pattern") else str(v),
    "f_point": lambda v: None if v is None else f"{int(v[0])},{int(v[1])}",
    "f_compare": lambda v: None if v is None else str(v),
    "f_tab": lambda v: None if v in (None, next(iter(TABS))) else str(v),
}
_POINT_SCAN = "_point_scan"  # the scan a point belongs to


def load_query_params(params: Mapping[str, str] | None = None, state=None) -> list[str]:
    """Copy URL query parameters into the filter keys, once per session.

    Parameters
    ----------
    params : mapping param -> value (default ``st.query_params``).
    state : session-state mapping (default ``st.session_state``).

    Returns
    -------
    Messages about parameters that could not be read (they are ignored).
    """
    state = st.session_state if state is None else state
    if state.get(_LOADED):
        return []
    params = st.query_params if params is None else params
    problems = []
    for key in STATE_KEYS:
        state.setdefault(key, None)
        name = PARAM_OF[key]
        if name not in params:
            continue
        try:
            state[key] = _PARSERS[key](params[name])
        except ValueError as exc:
            problems.append(f"URL parameter {name}={params[name]!r} ignored: {exc}")
            log.info(problems[-1])
    if state.get("f_point") is not None:
        state[_POINT_SCAN] = state.get("f_scan")
    state[_LOADED] = True
    return problems


def write_query_params(state=None) -> None:
    """Mirror the filter keys into ``st.query_params`` (only the parameters that changed)."""
    state = st.session_state if state is None else state
    qp = st.query_params
    for key in STATE_KEYS:
        name = PARAM_OF[key]
        value = _FORMATTERS[key](state.get(key))
        if value is None:
            if name in qp:
                del qp[name]
        elif qp.get(name) != value:
            qp[name] = value


def current_filters(state=None) -> Filters:
    """The thickness and region filters as a :class:`polcore.types.Filters`."""
    state = st.session_state if state is None else state
    th = state.get("f_th")
    region = state.get("f_region")
    return Filters(
        thickness=None if th is None else (float(th[0]), float(th[1])),
        region=None if region is None else tuple(int(v) for v in region),
    )


def set_region(region: tuple[int, int, int, int] | None, state=None) -> None:
    """Set the region filter (sorted, inclusive) or clear it with None."""
    state = st.session_state if state is None else state
    if region is None:
        state["f_region"] = None
        return
    y0, y1, x0, x1 = (int(v) for v in region)
    state["f_region"] = (min(y0, y1), max(y0, y1), min(x0, x1), max(x0, x1))


def clear_region(state=None) -> None:
    """Clear the region filter (callback of the sidebar's 'clear region' button)."""
    set_region(None, state)


def current_layer(state=None) -> str:
    """The selected prediction layer: 'pattern' (default) or 'cell'."""
    state = st.session_state if state is None else state
    v = state.get("f_layer")
    return v if v in LAYER_LABELS else "pattern"


def set_point(point: tuple[int, int] | None, scan_id: int | None, state=None) -> None:
    """Set the probe position shown on the Error maps page (it belongs to ``scan_id``), or clear it."""
    state = st.session_state if state is None else state
    if point is None:
        state["f_point"] = None
        state[_POINT_SCAN] = None
        return
    state["f_point"] = (int(point[0]), int(point[1]))
    state[_POINT_SCAN] = None if scan_id is None else int(scan_id)


def current_point(scan_id: int | None, shape: tuple[int, int], state=None) -> tuple[int, int] | None:
    """The probe position of ``scan_id`` inside ``shape`` (ny, nx), or None (none set, another scan's, or
    outside the scan)."""
    state = st.session_state if state is None else state
    p = state.get("f_point")
    if p is None or scan_id is None or state.get(_POINT_SCAN) != int(scan_id):
        return None
    iy, ix = int(p[0]), int(p[1])
    return (iy, ix) if 0 <= iy < shape[0] and 0 <= ix < shape[1] else None


def clear_scan_view(state=None) -> None:
    """Clear what belongs to one scan (region and probe position): after another scan or data set is chosen."""
    state = st.session_state if state is None else state
    set_region(None, state)
    set_point(None, None, state)


def view_query(state=None) -> dict[str, str]:
    """The URL query parameters of the current view (the filters as :func:`write_query_params` writes them)."""
    state = st.session_state if state is None else state
    out = {}
    for key in STATE_KEYS:
        value = _FORMATTERS[key](state.get(key))
        if value is not None:
            out[PARAM_OF[key]] = value
    return out


def view_link(base_url: str | None, state=None) -> str:
    """A link to ``base_url`` (the page's URL without its query) with the current view's parameters."""
    from urllib.parse import urlencode

    query = urlencode(view_query(state), safe=",")
    base = (base_url or "").split("?", 1)[0]
    return f"{base}?{query}" if query else base

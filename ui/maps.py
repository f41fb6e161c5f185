"""Interactive scan maps: box select -> region filter, click on a probe position -> its pattern.

Plotly box selection on a heatmap returns the rectangle (``selection.box``) but no points, and clicking a
heatmap cell returns nothing. :func:`add_click_grid` lays an invisible scatter with one point per probe
position (subsampled for large scans; SVG text points without text for small grids, WebGL beyond) over the
map so that clicks return a point; :func:`selection_to_region`
turns a box into an inclusive scan-pixel rectangle. Every figure made after this module is imported uses
:data:`FAST_TEMPLATE` (Streamlit's template plus cheaper tick labels, :func:`_fast_template`).

Measured with Streamlit 1.67 in Chromium: when a figure sets ``layout.dragmode``, Streamlit forces
``clickmode='event'`` and a click no longer selects a point; without it, Streamlit picks ``dragmode='pan'``
for charts with point selection. So one chart takes box selections (:func:`box_select_layout`, dragging draws
the box at once) and another takes clicks (:func:`add_click_grid`, no dragmode set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = [
    "PNG_CONFIG",
    "png_config",
    "add_click_grid",
    "box_select_layout",
    "add_region_outline",
    "add_marker",
    "selection_to_region",
    "selection_to_point",
]

#: Modebar configuration of every chart: the camera button downloads a PNG at twice the screen resolution.
PNG_CONFIG: dict = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "png", "filename": "polbench", "scale": 2},
}


#: Largest click grid (points) drawn as an SVG text scatter; larger ones are WebGL (:func:`add_click_grid`).
SVG_GRID_MAX = 4096

#: Name of the Plotly template layered over Streamlit's on every figure of the dashboard (:func:`_fast_template`).
FAST_TEMPLATE = "polbench_fast"


def _fast_template() -> None:
    """Register :data:`FAST_TEMPLATE` (the current default template plus ``ticklabeloverflow="allow"``) and
    make it the default of every new figure.

    Plotly's default ``ticklabeloverflow="hide past div"`` measures every tick label of every axis and colour
    bar (``getBoundingClientRect``) after drawing, to hide labels that stick out of the chart's own div: on a
    Streamlit page each measurement forces a layout of the whole page (about a quarter fewer layouts on the
    Error maps page without it). Our labels stay inside the chart (margins are set), so ``"allow"`` draws the
    same picture without the measuring. The two templates are merged once here: a ``"a+b"`` default would be
    merged again, slowly, for every figure made.
    """
    import plotly.io as pio

    default = pio.templates.default
    if default == FAST_TEMPLATE:
        return
    bar = {"colorbar": {"ticklabeloverflow": "allow"}}
    fast = go.layout.Template(
        layout={"xaxis": {"ticklabeloverflow": "allow"}, "yaxis": {"ticklabeloverflow": "allow"}, "coloraxis": bar},
        data={
            "heatmap": [bar],
            "contour": [bar],
            "histogram2d": [bar],
            "scatter": [{"marker": bar}],
            "scattergl": [{"marker": bar}],
            "bar": [{"marker": bar}],
        },
    )
    pio.templates[FAST_TEMPLATE] = pio.templates.merge_templates(pio.templates[default], fast) if default else fast
    pio.templates.default = FAST_TEMPLATE


_fast_template()


def png_config(filename: str) -> dict:
    """:data:`PNG_CONFIG` with the PNG file name set (no extension)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in filename)[:80] or "polbench"
    return {**PNG_CONFIG, "toImageButtonOptions": {**PNG_CONFIG["toImageButtonOptions"], "filename": safe}}


def add_click_grid(fig: go.Figure, ny: int, nx: int, *, max_points: int = 40000,
                   max_svg_points: int = SVG_GRID_MAX) -> go.Figure:
    """Add an invisible scatter point on every probe position (every ``s``-th one for large scans).

    Up to ``max_svg_points`` positions the points are an SVG scatter in ``mode="text"`` with empty texts:
    Plotly hovers and selects them (a click returns the position) but draws nothing for them, which costs the
    browser far less than a WebGL scatter (a WebGL context and its shaders per chart, about a quarter of a
    second in headless Chromium for the demo's 40 x 40 scans) or SVG markers (one styled path per point).
    Larger grids use the WebGL scatter, whose cost does not grow with the number of points.

    Parameters
    ----------
    fig : map figure whose x/y data coordinates are scan pixels (ix, iy).
    ny, nx : scan size [positions].
    max_points : more positions than this are decimated by a common stride ``s`` (clicks then hit the
        nearest grid point).
    max_svg_points : the largest grid drawn as the SVG text scatter.
    """
    stride = max(1, math.ceil(math.sqrt(ny * nx / max_points)))
    iy, ix = np.mgrid[0:ny:stride, 0:nx:stride]
    common = dict(x=ix.ravel(), y=iy.ravel(), name="probe positions", showlegend=False,
                  hovertemplate="iy=%{y}, ix=%{x}<extra>click: pattern</extra>")
    if iy.size <= max_svg_points:
        fig.add_trace(go.Scatter(mode="text", text=[""] * iy.size, **common))
        return fig
    fig.add_trace(
        go.Scattergl(
            mode="markers",
            marker=dict(size=max(4, 8 * stride), color="rgba(0,0,0,0)"),
            selected=dict(marker=dict(opacity=0)),
            unselected=dict(marker=dict(opacity=0)),
            **common,
        )
    )
    return fig


def box_select_layout(fig: go.Figure) -> go.Figure:
    """Make dragging on the figure draw a selection box (use with ``selection_mode="box"``)."""
    fig.update_layout(dragmode="select", selectdirection="any")
    return fig


def add_region_outline(
    fig: go.Figure, region: tuple[int, int, int, int] | None, *, color: str = "black"
) -> go.Figure:
    """Draw the inclusive region (y0, y1, x0, x1) as a dashed rectangle on a map."""
    if region is not None:
        y0, y1, x0, x1 = region
        fig.add_shape(
            type="rect",
            x0=x0 - 0.5,
            x1=x1 + 0.5,
            y0=y0 - 0.5,
            y1=y1 + 0.5,
            line=dict(color=color, width=2, dash="dash"),
            fillcolor="rgba(0,0,0,0)",
        )
    return fig


def add_marker(fig: go.Figure, iy: int, ix: int, *, name: str = "selected position") -> go.Figure:
    """Mark one probe position with a cross."""
    fig.add_trace(
        go.Scatter(
            x=[ix],
            y=[iy],
            mode="markers",
            name=name,
            showlegend=False,
            hoverinfo="skip",
            marker=dict(symbol="x-thin-open", size=14, color="black", line=dict(width=3)),
        )
    )
    return fig


def _sel(event: Any) -> Mapping | None:
    if event is None:
        return None
    try:
        return event["selection"]
    except (KeyError, TypeError):
        return None


def selection_to_region(event: Any, ny: int, nx: int) -> tuple[int, int, int, int] | None:
    """Inclusive (y0, y1, x0, x1) of the pixels whose centres lie in the last box selected, or None.

    Parameters
    ----------
    event : the value returned by ``st.plotly_chart(..., on_select="rerun")`` (or its ``selection``).
    ny, nx : scan size; the result is clipped to it.
    """
    sel = _sel(event)
    if sel is None and isinstance(event, Mapping):
        sel = event
    boxes = list((sel or {}).get("box") or [])
    if not boxes:
        return None
    box = boxes[-1]
    xs = [float(v) for v in box.get("x", []) if v is not None]
    ys = [float(v) for v in box.get("y", []) if v is not None]
    if len(xs) < 2 or len(ys) < 2:
        return None

    def span(vals: list[float], n: int) -> tuple[int, int] | None:
        lo, hi = min(vals), max(vals)
        a, b = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
        if a > b:  # box inside one pixel: take that pixel
            a = b = int(round((lo + hi) / 2))
        a, b = max(a, 0), min(b, n - 1)
        return (a, b) if a <= b else None

    sy, sx = span(ys, ny), span(xs, nx)
    if sy is None or sx is None:
        return None
    return (sy[0], sy[1], sx[0], sx[1])


def selection_to_point(event: Any, ny: int, nx: int) -> tuple[int, int] | None:
    """(iy, ix) of a single clicked point (no box in the selection), or None."""
    sel = _sel(event)
    if sel is None and isinstance(event, Mapping):
        sel = event
    if not sel or sel.get("box"):
        return None
    points = list(sel.get("points") or [])
    if len(points) != 1:
        return None
    p = points[0]
    try:
        iy, ix = int(round(float(p["y"]))), int(round(float(p["x"])))
    except (KeyError, TypeError, ValueError):
        return None
    if 0 <= iy < ny and 0 <= ix < nx:
        return (iy, ix)
    return None

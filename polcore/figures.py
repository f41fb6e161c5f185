"""Plotly figure builders for the dashboard (no Streamlit here).

Maps follow the microscopist's view: row 0 at the top (y axis reversed), equal aspect. Class colours lie on a
colour wheel whose hue is the polarization angle (class k at 45 deg * k), so neighbouring classes have
neighbouring hues and opposite classes opposite hues.
"""

from __future__ import annotations

import colorsys
import logging

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from polcore.types import CLASS_NAMES, N_CLASSES, class_to_angle

__all__ = [
    "CLASS_ARROWS",
    "NO_LABEL_COLOR",
    "class_wheel_colors",
    "class_map_figure",
    "scalar_map_figure",
    "confusion_figure",
    "circular_error_figure",
    "spectrum_figure",
    "cell_fold_figure",
    "embedding_figure",
    "roc_figure",
    "pattern_figure",
    "probs_figure",
    "robust_limits",
    "image_figure",
    "cell_arrows",
    "arrow_map_figure",
    "pattern_marks",
    "agreement_map_figure",
    "AGREEMENT_LABELS",
]

log = logging.getLogger(__name__)

#: Arrow of each class as drawn on screen (k -> 45 deg * k counter-clockwise from +x).
CLASS_ARROWS: tuple[str, ...] = (
    "\u2192", "\u2197", "\u2191", "\u2196", "\u2190", "\u2199", "\u2193", "\u2198",
)
NO_LABEL_COLOR = "#9e9e9e"
_MAX_HEATMAP_PX = 512 * 512  # larger spectra are decimated before plotting


def class_wheel_colors(saturation: float = 0.85, value: float = 0.9) -> list[str]:
    """Eight hex colours, class k with hue 45 deg * k (red = RM/0 deg, then counter-clockwise)."""
    out = []
    for k in range(N_CLASSES):
        r, g, b = colorsys.hsv_to_rgb(float(class_to_angle(k)) / 360.0, saturation, value)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def class_label(k: int) -> str:
    """Legend label of class ``k``, e.g. ``"RU \u2197 (45\u00b0)"``."""
    return f"{CLASS_NAMES[k]} {CLASS_ARROWS[k]} ({int(class_to_angle(k))}\u00b0)"


def _map_layout(fig: go.Figure, title: str, ny: int, nx: int, *, x_title: str = "ix (scan px)",
                y_title: str = "iy (scan px)") -> go.Figure:
    fig.update_layout(title=title, margin=dict(l=40, r=20, t=50, b=40), plot_bgcolor="white")
    fig.update_xaxes(title=x_title, constrain="domain", showgrid=False)
    fig.update_yaxes(title=y_title, autorange="reversed", scaleanchor="x", scaleratio=1, constrain="domain",
                     showgrid=False)
    return fig


def _clip_axes(fig: go.Figure, ny: int, nx: int) -> go.Figure:
    """Keep the axes on the image (overlays such as arrows or a disc outline may reach past its edges); row 0
    stays on top (autorange reversed, bounded)."""
    fig.update_xaxes(autorangeoptions=dict(minallowed=-0.5, maxallowed=nx - 0.5))
    fig.update_yaxes(autorangeoptions=dict(minallowed=-0.5, maxallowed=ny - 0.5))
    return fig


def class_map_figure(pred_map, title: str = "", *, base=None, opacity: float = 1.0,
                     base_name: str = "virtual ADF") -> go.Figure:
    """Heatmap of class indices with wheel colours, -1 (no label / invalid) in grey.

    Parameters
    ----------
    pred_map : array_like of int, shape (ny, nx)
        Class 0..7 or -1.
    title : str
    base : array_like, shape (ny, nx), optional
        A structure image (e.g. the virtual ADF) drawn in grey under the classes, robust contrast
        (:func:`robust_limits`).
    opacity : float in [0, 1]
        Opacity of the class colours over ``base`` (1 hides it; without ``base`` the classes stay opaque).
    base_name : hover label of the base image.

    Returns
    -------
    plotly.graph_objects.Figure
        [base Heatmap,] one class Heatmap (discrete colours, no colour bar) plus one legend entry (empty
        Scatter) per class.
    """
    p = np.asarray(pred_map)
    if p.ndim != 2:
        raise ValueError(f"pred_map must be 2-D (ny, nx), got shape {p.shape}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}")
    z = np.where(p < 0, -1, p).astype(float)
    colors = [NO_LABEL_COLOR, *class_wheel_colors()]
    n = len(colors)  # values -1..7 -> 9 bands over zmin=-1.5 .. zmax=7.5
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure()
    if base is not None:
        b = np.asarray(base, dtype=float)
        if b.shape != p.shape:
            raise ValueError(f"base image shape {b.shape} differs from the class map shape {p.shape}")
        lo, hi = robust_limits(b)
        fig.add_trace(go.Heatmap(z=b, zmin=lo, zmax=hi, colorscale="Gray", showscale=False, name=base_name,
                                 hovertemplate=f"iy=%{{y}}, ix=%{{x}}<br>{base_name} %{{z:.4g}}<extra></extra>"))
    fig.add_trace(go.Heatmap(
        z=z, zmin=-1.5, zmax=N_CLASSES - 0.5, colorscale=scale, showscale=False,
        opacity=float(opacity) if base is not None else 1.0,
        hovertemplate="iy=%{y}, ix=%{x}<br>class %{z}<extra></extra>", name="classes"))
    present = set(np.unique(p[p >= 0]).astype(int).tolist())
    for k in range(N_CLASSES):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=class_label(k),
                                 marker=dict(color=colors[k + 1], size=12, symbol="square"),
                                 showlegend=True, visible=True if k in present else "legendonly"))
    if np.any(p < 0):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="no label",
                                 marker=dict(color=NO_LABEL_COLOR, size=12, symbol="square")))
    return _map_layout(fig, title, *p.shape)


def scalar_map_figure(values, title: str = "", colorscale: str = "Viridis", *, zmin=None, zmax=None,
                      mask=None, colorbar_title: str = "") -> go.Figure:
    """Heatmap of a scalar map (confidence, error rate, irregularity, thickness ...), row 0 on top.

    Parameters
    ----------
    values : array_like, shape (ny, nx) (NaN shown blank)
    colorscale : any Plotly colour-scale name
    zmin, zmax : colour limits (default: data range)
    mask : array_like of bool, shape (ny, nx), optional
        Outline drawn over the map (e.g. the ground-truth defect mask).
    colorbar_title : str
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (ny, nx), got shape {v.shape}")
    fig = go.Figure(go.Heatmap(z=v, zmin=zmin, zmax=zmax, colorscale=colorscale,
                               colorbar=dict(title=colorbar_title), name=title or "value",
                               hovertemplate="iy=%{y}, ix=%{x}<br>%{z:.4g}<extra></extra>"))
    if mask is not None:
        m = np.asarray(mask, dtype=float)
        if m.shape != v.shape:
            raise ValueError(f"mask shape {m.shape} differs from values shape {v.shape}")
        fig.add_trace(go.Contour(z=m, contours=dict(start=0.5, end=0.5, size=1, coloring="none"),
                                 line=dict(color="white", width=2), showscale=False, name="defect mask",
                                 hoverinfo="skip", showlegend=True))
    return _map_layout(fig, title, *v.shape)


def confusion_figure(cm, title: str = "") -> go.Figure:
    """Row-normalised confusion matrix (true class down, predicted across), annotated with percentages."""
    c = np.asarray(cm, dtype=float)
    if c.shape != (N_CLASSES, N_CLASSES):
        raise ValueError(f"cm must have shape ({N_CLASSES}, {N_CLASSES}), got {c.shape}")
    support = c.sum(axis=1, keepdims=True)
    if np.all((np.abs(support - 1) < 1e-6) | (support == 0)):
        norm = c
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = np.where(support > 0, c / np.maximum(support, 1e-300), np.nan)
    text = np.where(np.isfinite(norm), np.char.mod("%.0f%%", np.nan_to_num(norm) * 100), "")
    names = [f"{n} {a}" for n, a in zip(CLASS_NAMES, CLASS_ARROWS)]
    fig = go.Figure(go.Heatmap(z=norm, x=names, y=names, zmin=0, zmax=1, colorscale="Blues", text=text,
                               texttemplate="%{text}", colorbar=dict(title="fraction"),
                               hovertemplate="true %{y}<br>pred %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, margin=dict(l=60, r=20, t=50, b=60))
    fig.update_xaxes(title="predicted", side="bottom", type="category")
    fig.update_yaxes(title="true", autorange="reversed", type="category", scaleanchor="x", scaleratio=1)
    return fig


def circular_error_figure(hist, title: str = "Angular error") -> go.Figure:
    """Bar chart of the fraction of predictions 0, 45, 90, 135 and 180 degrees off."""
    h = np.asarray(hist, dtype=float)
    if h.shape != (N_CLASSES // 2 + 1,):
        raise ValueError(f"hist must have shape ({N_CLASSES // 2 + 1},), got {h.shape}")
    total = h.sum()
    frac = h / total if total > 0 else np.zeros_like(h)
    labels = [f"{45 * i}\u00b0" for i in range(len(h))]
    fig = go.Figure(go.Bar(x=labels, y=frac, text=[f"{f:.1%}" for f in frac], textposition="outside",
                           customdata=h, hovertemplate="%{x}: %{y:.2%} (%{customdata:.0f})<extra></extra>",
                           marker_color=["#2e7d32", "#f9a825", "#ef6c00", "#d84315", "#b71c1c"]))
    fig.update_layout(title=title, yaxis=dict(title="fraction", tickformat=".0%", rangemode="tozero"),
                      xaxis=dict(title="angular error"), margin=dict(l=50, r=20, t=50, b=40))
    return fig


def _decimate(spec: np.ndarray, fy: np.ndarray, fx: np.ndarray):
    step = int(np.ceil(np.sqrt(spec.size / _MAX_HEATMAP_PX))) if spec.size > _MAX_HEATMAP_PX else 1
    return spec[::step, ::step], fy[::step], fx[::step]


def spectrum_figure(result, lattice_period_px: float | None = None, title: str = "Error power spectrum"
                    ) -> go.Figure:
    """Log power spectrum of a :func:`polcore.analysis.periodicity` result with peaks and lattice marked.

    Axes are frequencies [cycles/px] (ky down, as on the map). Detected peaks (and their mirror images) are
    circles; with ``lattice_period_px`` (default: the one in ``result``) the ring |k| = 1/a is drawn and the
    reciprocal lattice points (+-1/a, 0), (0, +-1/a), (+-1/a, +-1/a) of a scan-aligned square lattice are
    crosses.
    """
    spec = np.asarray(result["spectrum"], dtype=float)
    fy, fx = np.asarray(result["freq_y"]), np.asarray(result["freq_x"])
    spec, fy, fx = _decimate(spec, fy, fx)
    pos = spec[spec > 0]
    floor = float(pos.min()) if pos.size else 1.0
    logp = np.log10(np.maximum(spec, floor))
    fig = go.Figure(go.Heatmap(z=logp, x=fx, y=fy, colorscale="Magma", colorbar=dict(title="log10 P"),
                               name="spectrum",
                               hovertemplate="kx=%{x:.4f}, ky=%{y:.4f}<br>log10 P=%{z:.2f}<extra></extra>"))
    peaks = list(result.get("peaks", []) or [])
    if peaks:
        ky = np.array([p["ky"] for p in peaks])
        kx = np.array([p["kx"] for p in peaks])
        txt = [f"period {p['period_px']:.2f} px, {p['angle_deg']:.1f}\u00b0, order {p['order']}"
               for p in peaks]
        fig.add_trace(go.Scatter(x=np.r_[kx, -kx], y=np.r_[ky, -ky], mode="markers", name="detected peaks",
                                 text=txt + txt, hovertemplate="%{text}<extra></extra>",
                                 marker=dict(symbol="circle-open", size=14, color="cyan",
                                             line=dict(width=2))))
    a = lattice_period_px if lattice_period_px is not None else result.get("lattice_period_px")
    if a:
        g = 1.0 / float(a)
        t = np.linspace(0, 2 * np.pi, 181)
        fig.add_trace(go.Scatter(x=g * np.cos(t), y=g * np.sin(t), mode="lines", name=f"|k| = 1/{a:.2f} px",
                                 line=dict(color="lime", dash="dot", width=1), hoverinfo="skip"))
        pts = np.array([(0, g), (0, -g), (g, 0), (-g, 0), (g, g), (g, -g), (-g, g), (-g, -g)])
        fig.add_trace(go.Scatter(x=pts[:, 1], y=pts[:, 0], mode="markers", name="lattice (scan-aligned)",
                                 marker=dict(symbol="x-thin-open", size=12, color="lime", line=dict(width=2)),
                                 hovertemplate="kx=%{x:.4f}, ky=%{y:.4f}<extra>lattice</extra>"))
    fig.update_layout(title=title, margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=-0.15))
    fig.update_xaxes(title="kx (cycles/px)", constrain="domain", range=[fx.min(), fx.max()])
    fig.update_yaxes(title="ky (cycles/px)", autorange="reversed", scaleanchor="x", scaleratio=1,
                     constrain="domain")
    return fig


def cell_fold_figure(cell_map, title: str = "Error rate inside the unit cell", colorscale: str = "Reds",
                     colorbar_title: str = "error rate") -> go.Figure:
    """Heatmap of a folded unit-cell map (:func:`polcore.analysis.fold_to_cell`), axes in cell fractions."""
    c = np.asarray(cell_map, dtype=float)
    if c.ndim != 2:
        raise ValueError(f"cell_map must be 2-D, got shape {c.shape}")
    nby, nbx = c.shape
    y = (np.arange(nby) + 0.5) / nby
    x = (np.arange(nbx) + 0.5) / nbx
    fig = go.Figure(go.Heatmap(z=c, x=x, y=y, colorscale=colorscale, colorbar=dict(title=colorbar_title),
                               hovertemplate="y=%{y:.2f}, x=%{x:.2f} (cell)<br>%{z:.3f}<extra></extra>"))
    return _map_layout(fig, title, nby, nbx, x_title="x / a", y_title="y / a")


def embedding_figure(df: pd.DataFrame, color: str | None = None, *, x: str = "e1", y: str = "e2",
                     title: str = "", max_points: int = 50000, seed: int = 0, hover: tuple[str, ...] = ()
                     ) -> go.Figure:
    """WebGL scatter of a 2-D embedding.

    Parameters
    ----------
    df : DataFrame with columns ``x``, ``y`` and optionally ``color`` and ``hover`` columns.
    color : str, optional
        Column to colour by. Columns named like a class (pred, true_label, class, label) use the class wheel
        colours and names; other non-numeric, boolean or low-cardinality (<= 12 values) columns get one trace
        per value; numeric columns a continuous colour scale.
    max_points : int
        Larger frames are subsampled (seeded) to keep the browser responsive.
    """
    for col in (x, y) + ((color,) if color else ()) + tuple(hover):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in DataFrame (columns: {list(df.columns)})")
    d = df
    if len(d) > max_points:
        d = d.sample(n=max_points, random_state=seed)
        log.info("embedding_figure: showing %d of %d points", max_points, len(df))
    fig = go.Figure()
    hover_cols = list(hover)
    custom = d[hover_cols].to_numpy() if hover_cols else None
    htmpl = "".join(f"<br>{c}=%{{customdata[{i}]}}" for i, c in enumerate(hover_cols))
    if color is None:
        fig.add_trace(go.Scattergl(x=d[x], y=d[y], mode="markers", marker=dict(size=4, opacity=0.7),
                                   customdata=custom, name="points",
                                   hovertemplate=f"{x}=%{{x:.3g}}, {y}=%{{y:.3g}}{htmpl}<extra></extra>"))
    else:
        col = d[color]
        is_class = color.lower() in ("pred", "true_label", "class", "label", "true", "pred_class")
        categorical = (is_class or not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
                       or col.nunique() <= 12)
        if categorical:
            wheel = class_wheel_colors()
            for val in sorted(col.dropna().unique(), key=lambda v: (str(type(v)), v)):
                sel = (col == val).to_numpy()
                if is_class:
                    k = int(val)
                    name, mcolor = (class_label(k), wheel[k]) if 0 <= k < N_CLASSES else ("no label",
                                                                                          NO_LABEL_COLOR)
                else:
                    name, mcolor = str(val), None
                fig.add_trace(go.Scattergl(
                    x=d[x][sel], y=d[y][sel], mode="markers", name=name,
                    marker=dict(size=4, opacity=0.7, color=mcolor),
                    customdata=None if custom is None else custom[sel],
                    hovertemplate=f"{color}={name}{htmpl}<extra></extra>"))
        else:
            fig.add_trace(go.Scattergl(
                x=d[x], y=d[y], mode="markers", name=color, customdata=custom,
                marker=dict(size=4, opacity=0.7, color=col, colorscale="Viridis", colorbar=dict(title=color)),
                hovertemplate=f"{color}=%{{marker.color:.3g}}{htmpl}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(itemsizing="constant"))
    return fig


def roc_figure(fpr, tpr, auc: float | None = None, title: str = "Defect ROC") -> go.Figure:
    """ROC curve with the chance diagonal; ``auc`` is shown in the legend."""
    f, t = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    if f.shape != t.shape:
        raise ValueError(f"fpr and tpr must have the same shape, got {f.shape} and {t.shape}")
    name = "ROC" if auc is None or not np.isfinite(auc) else f"ROC (AUC = {auc:.3f})"
    fig = go.Figure([
        go.Scatter(x=f, y=t, mode="lines", name=name, line=dict(width=2)),
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dash", color="grey")),
    ])
    fig.update_layout(title=title, margin=dict(l=50, r=20, t=50, b=40))
    fig.update_xaxes(title="false-positive rate", range=[0, 1], constrain="domain")
    fig.update_yaxes(title="true-positive rate", range=[0, 1], scaleanchor="x", scaleratio=1)
    return fig


def robust_limits(image, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """Colour limits of an image from its ``lo`` and ``hi`` percentiles (finite values only).

    A few hot pixels or one bright Bragg disc then no longer set the scale. Returns (0, 1) for an image
    without finite values and widens a flat image's range so that zmin < zmax.
    """
    v = np.asarray(image, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = (float(x) for x in np.percentile(v, [lo, hi]))
    if not b > a:
        a, b = float(v.min()), float(v.max())
        if not b > a:
            b = a + 1.0
    return a, b


def image_figure(image, title: str = "", *, colorscale: str = "Gray", colorbar_title: str = "",
                 clip: tuple[float, float] = (0.5, 99.5)) -> go.Figure:
    """A scan image (virtual BF / ADF, CoM component ...) (ny, nx), row 0 on top, robust contrast."""
    v = np.asarray(image, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"image must be 2-D (ny, nx), got shape {v.shape}")
    lo, hi = robust_limits(v, *clip)
    return scalar_map_figure(v, title, colorscale, zmin=lo, zmax=hi, colorbar_title=colorbar_title)


def cell_arrows(pred_map, confidence, cell_px: float) -> dict:
    """One arrow per unit-cell block of a class map: the block's majority class and mean confidence.

    Parameters
    ----------
    pred_map : int (ny, nx), class 0..7 or -1 (a cell-layer run holds one class per block already).
    confidence : float (ny, nx), NaN where unknown.
    cell_px : block size [scan px] (the lattice period), >= 1.

    Returns
    -------
    dict with ``y``, ``x`` (n,) block centres [scan px], ``cls`` int (n,) and ``confidence`` float (n,) of
    the blocks holding at least one classified position.
    """
    from polcore.analysis.cells import cell_blocks

    p = np.asarray(pred_map)
    c = np.asarray(confidence, dtype=float)
    if p.ndim != 2 or c.shape != p.shape:
        raise ValueError(f"pred_map and confidence must be 2-D of one shape, got {p.shape} and {c.shape}")
    ny, nx = p.shape
    by, bx = cell_blocks(ny, nx, float(cell_px))
    ncy, ncx = int(by[-1]) + 1, int(bx[-1]) + 1
    block = (by[:, None] * ncx + bx[None, :]).ravel()
    pv, cv = p.ravel().astype(int), c.ravel()
    ok = pv >= 0
    counts = np.zeros((ncy * ncx, N_CLASSES))
    np.add.at(counts, (block[ok], pv[ok]), 1.0)
    n = counts.sum(axis=1)
    cls = counts.argmax(axis=1)
    okc = ok & np.isfinite(cv)
    csum = np.bincount(block[okc], weights=cv[okc], minlength=ncy * ncx)
    cnum = np.bincount(block[okc], minlength=ncy * ncx)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(cnum > 0, csum / np.maximum(cnum, 1), np.nan)
    iy = np.arange(ny, dtype=float)
    ix = np.arange(nx, dtype=float)
    cy = np.bincount(by, weights=iy, minlength=ncy) / np.bincount(by, minlength=ncy)
    cx = np.bincount(bx, weights=ix, minlength=ncx) / np.bincount(bx, minlength=ncx)
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    keep = n > 0
    return {"y": yy.ravel()[keep], "x": xx.ravel()[keep], "cls": cls[keep].astype(int),
            "confidence": conf[keep]}


def arrow_map_figure(arrows: dict, shape: tuple[int, int], cell_px: float, *, base=None,
                     base_name: str = "virtual ADF", base_classes=None, title: str = "Polarization",
                     base_opacity: float = 0.45) -> go.Figure:
    """Per-unit-cell polarization arrows over a structure image, as ferroelectric domain maps are drawn.

    Each arrow starts behind and ends ahead of its cell centre along the class angle (45 deg * k,
    counter-clockwise on screen, so it points up for MU), is coloured with the class wheel and is as long
    as ``0.9 * cell_px * confidence`` (a confident cell fills its cell; confidence unknown: full length).

    Parameters
    ----------
    arrows : :func:`cell_arrows` result.
    shape : (ny, nx) of the scan.
    cell_px : lattice period [scan px] (arrow length scale).
    base : (ny, nx) image drawn in grey under the arrows (virtual ADF), optional.
    base_classes : (ny, nx) class map drawn faintly (opacity ``base_opacity``) when there is no ``base``.
    """
    ny, nx = (int(v) for v in shape)
    fig = go.Figure()
    if base is not None:
        b = np.asarray(base, dtype=float)
        if b.shape != (ny, nx):
            raise ValueError(f"base image shape {b.shape} differs from the scan shape {(ny, nx)}")
        lo, hi = robust_limits(b)
        fig.add_trace(go.Heatmap(z=b, zmin=lo, zmax=hi, colorscale="Gray", showscale=False, name=base_name,
                                 hovertemplate=f"iy=%{{y}}, ix=%{{x}}<br>{base_name} %{{z:.4g}}<extra></extra>"))
    elif base_classes is not None:
        cm = class_map_figure(base_classes)
        hm = cm.data[0]
        hm.opacity = base_opacity
        fig.add_trace(hm)
    else:
        fig.add_trace(go.Heatmap(z=np.zeros((ny, nx)), colorscale=[[0, "#ffffff"], [1, "#ffffff"]],
                                 showscale=False, hoverinfo="skip", name="scan"))
    y, x = np.asarray(arrows["y"], float), np.asarray(arrows["x"], float)
    cls = np.asarray(arrows["cls"], int)
    conf = np.asarray(arrows["confidence"], float)
    length = 0.9 * float(cell_px) * np.where(np.isfinite(conf), np.clip(conf, 0.15, 1.0), 1.0)
    ang = np.deg2rad(class_to_angle(cls).astype(float))
    ux, uy = np.cos(ang), -np.sin(ang)  # on screen: y grows downwards
    x0, y0 = x - 0.5 * length * ux, y - 0.5 * length * uy
    x1, y1 = x + 0.5 * length * ux, y + 0.5 * length * uy
    head = 0.35 * length
    wheel = class_wheel_colors(saturation=0.95, value=0.95)
    width = 2.0 if len(x) > 400 else 3.0
    shafts = {}
    for k in range(N_CLASSES):
        sel = np.flatnonzero(cls == k)
        if sel.size == 0:
            continue
        xs, ys = [], []
        for i in sel:
            # shaft, then the two barbs of the head (25 deg off the shaft)
            bx1 = x1[i] - head[i] * (ux[i] * np.cos(0.45) - uy[i] * np.sin(0.45))
            by1 = y1[i] - head[i] * (uy[i] * np.cos(0.45) + ux[i] * np.sin(0.45))
            bx2 = x1[i] - head[i] * (ux[i] * np.cos(0.45) + uy[i] * np.sin(0.45))
            by2 = y1[i] - head[i] * (uy[i] * np.cos(0.45) - ux[i] * np.sin(0.45))
            xs += [x0[i], x1[i], None, bx1, x1[i], bx2, None]
            ys += [y0[i], y1[i], None, by1, y1[i], by2, None]
        shafts[k] = (xs, ys)
    if shafts:  # a dark outline under every arrow keeps it readable over any base image
        fig.add_trace(go.Scatter(x=[v for xs, _ in shafts.values() for v in xs],
                                 y=[v for _, ys in shafts.values() for v in ys], mode="lines",
                                 hoverinfo="skip", showlegend=False, name="outline",
                                 line=dict(color="rgba(0,0,0,0.75)", width=width + 2.5)))
    for k, (xs, ys) in shafts.items():
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=class_label(k), hoverinfo="skip",
                                 line=dict(color=wheel[k], width=width)))
    # hover: one invisible point per cell
    fig.add_trace(go.Scatter(
        x=x, y=y, mode="markers", marker=dict(size=max(4.0, 2.0 * float(cell_px)), color="rgba(0,0,0,0)"),
        showlegend=False, name="cells", customdata=np.stack([cls, np.nan_to_num(conf, nan=-1)], axis=-1),
        text=[class_label(int(k)) for k in cls],
        hovertemplate="cell at iy=%{y:.1f}, ix=%{x:.1f}<br>%{text}<br>confidence %{customdata[1]:.2f}"
                      "<extra></extra>"))
    _map_layout(fig, title, ny, nx)
    fig.update_xaxes(range=[-0.5, nx - 0.5])  # the scan, whatever arrows reach past its edges
    fig.update_yaxes(range=[ny - 0.5, -0.5], autorange=False)  # row 0 on top
    return fig


def pattern_marks(pattern, disc: tuple[float, float, float] | None = None) -> dict | None:
    """Bright-field disc (centre, radius) and centre of mass of one diffraction pattern, for drawing.

    The disc is the component above a quarter of the way from background to peak of the 3 x 3
    median-filtered pattern (:func:`polcore.preprocess.disc_mask` at threshold 0.25: low enough that the
    dim side of a disc whose intensity the polarization tilts still counts, so the outline does not follow
    the tilt); the centre of mass is taken over the hot-pixel-free (median filtered) pattern inside 1.5 disc
    radii, so that a hot pixel or a Bragg disc far out cannot drag it.

    Parameters
    ----------
    pattern : (ky, kx) intensities.
    disc : (cy, cx, r) [px] when the disc is known (a simulation: the optical axis and the convergence
        semi-angle over the sampling); then nothing is detected. Bright features inside a noise-free
        simulated disc would fool a threshold.

    Returns
    -------
    dict with ``disc`` (cy, cx, r) [px], ``com`` (cy, cx) [px] and ``gain``, the magnification that draws
    the CoM shift half a disc radius long (at least 1), or None for a flat or invalid pattern.
    """
    from scipy import ndimage

    from polcore.preprocess import disc_mask

    p = np.asarray(pattern, dtype=float)
    if p.ndim != 2 or min(p.shape) < 3 or not np.all(np.isfinite(p)):
        return None
    if disc is not None:
        cy, cx, r = (float(v) for v in disc)
    else:
        try:
            mask = disc_mask(p, threshold=0.25)
        except ValueError:
            return None
        yy, xx = np.nonzero(mask)
        cy, cx = float(yy.mean()), float(xx.mean())
        r = float(np.sqrt(mask.sum() / np.pi))
    clean = np.maximum(ndimage.median_filter(p, size=3, mode="nearest"), 0.0)
    ky, kx = np.indices(p.shape)
    inside = (ky - cy) ** 2 + (kx - cx) ** 2 <= (1.5 * r) ** 2
    w = np.where(inside, clean, 0.0)
    tot = w.sum()
    if tot <= 0:
        return None
    my, mx = float((w * ky).sum() / tot), float((w * kx).sum() / tot)
    shift = float(np.hypot(my - cy, mx - cx))
    gain = max(1.0, float(np.round(0.5 * r / shift))) if shift > 1e-9 else 1.0
    return {"disc": (cy, cx, r), "com": (my, mx), "gain": gain}


def pattern_figure(pattern, title: str = "Diffraction pattern", *, log_scale: bool = True,
                   colorscale: str = "Gray", clip: tuple[float, float] | None = (0.5, 99.5),
                   gamma: float | None = None, marks: dict | None = None, com_gain: float | None = None
                   ) -> go.Figure:
    """Heatmap of one diffraction pattern (ky, kx), ky down (row 0 on top), equal aspect.

    Parameters
    ----------
    pattern : (ky, kx) intensities.
    log_scale : show log10(1 + I) (default), so the dark field next to the disc is visible.
    clip : (lo, hi) percentiles that set the colour limits (robust contrast: a few hot pixels no longer
        make the pattern black); None = the full range.
    gamma : show I ** gamma instead of the log (e.g. 0.5), when ``log_scale`` is False.
    marks : :func:`pattern_marks` result: the disc outline (dashed circle) and the centre-of-mass shift
        (arrow from the disc centre to the CoM, drawn ``com_gain`` times longer, default ``marks["gain"]``,
        which makes it half a disc radius long) are drawn on the pattern.
    """
    p = np.asarray(pattern, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"pattern must be 2-D (ky, kx), got shape {p.shape}")
    if log_scale:
        z = np.log10(np.maximum(p, 0) + 1.0)
    elif gamma is not None:
        z = np.maximum(p, 0) ** float(gamma)
    else:
        z = p
    lo, hi = robust_limits(z, *clip) if clip is not None else (None, None)
    fig = go.Figure(go.Heatmap(z=z, zmin=lo, zmax=hi, colorscale=colorscale, showscale=False, name="pattern",
                               customdata=p,
                               hovertemplate="ky=%{y}, kx=%{x}<br>I=%{customdata:.4g}<extra></extra>"))
    if marks:
        cy, cx, r = marks["disc"]
        t = np.linspace(0, 2 * np.pi, 121)
        fig.add_trace(go.Scatter(x=cx + r * np.cos(t), y=cy + r * np.sin(t), mode="lines",
                                 name="bright-field disc", hoverinfo="skip",
                                 line=dict(color="#ff4081", width=2, dash="dash")))
        my, mx = marks["com"]
        dy, dx = my - cy, mx - cx
        shift = float(np.hypot(dy, dx))
        gain = float(com_gain if com_gain is not None else marks.get("gain", 1.0))
        ey, ex = cy + gain * dy, cx + gain * dx
        fig.add_annotation(x=ex, y=ey, ax=cx, ay=cy, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=3, arrowsize=1.2, arrowwidth=2.5, arrowcolor="#ffab00",
                           text="")
        fig.add_trace(go.Scatter(x=[cx], y=[cy], mode="markers", name=f"CoM shift {shift:.2f} px (\u00d7{gain:.0f})",
                                 marker=dict(color="#ffab00", size=7, symbol="circle"),
                                 hovertemplate=f"disc centre ({cy:.1f}, {cx:.1f}) px<br>CoM shift {shift:.3f} px "
                                               f"(drawn \u00d7{gain:.0f})<extra></extra>"))
        fig.update_layout(showlegend=False)
    _map_layout(fig, title, *p.shape, x_title="kx (px)", y_title="ky (px)")
    _clip_axes(fig, *p.shape)
    return fig


def probs_figure(probs8, title: str = "Class probabilities") -> go.Figure:
    """Polar bar chart of the 8 class probabilities, each bar at its class angle (0 deg = +x, CCW)."""
    q = np.asarray(probs8, dtype=float).ravel()
    if q.shape != (N_CLASSES,):
        raise ValueError(f"probs8 must have {N_CLASSES} entries, got shape {np.shape(probs8)}")
    fig = go.Figure(go.Barpolar(
        r=q, theta=class_to_angle(np.arange(N_CLASSES)).astype(float), width=[40] * N_CLASSES,
        marker_color=class_wheel_colors(), text=[class_label(k) for k in range(N_CLASSES)],
        hovertemplate="%{text}<br>p=%{r:.3f}<extra></extra>", name="probability"))
    ticks = [f"{n} {a}" for n, a in zip(CLASS_NAMES, CLASS_ARROWS)]
    fig.update_layout(title=title, margin=dict(l=30, r=30, t=50, b=30), showlegend=False,
                      polar=dict(angularaxis=dict(direction="counterclockwise", rotation=0, ticktext=ticks,
                                                  tickvals=[45 * k for k in range(N_CLASSES)]),
                                 radialaxis=dict(range=[0, max(1e-9, float(q.max()))])))
    return fig


#: Categories of :func:`agreement_map_figure` (value -> label, colour).
AGREEMENT_LABELS: dict[int, tuple[str, str]] = {
    0: ("agree", "#e0e0e0"),
    1: ("disagree", "#c62828"),
    2: ("disagree, only A right", "#1565c0"),
    3: ("disagree, only B right", "#ef6c00"),
    4: ("disagree, both wrong", "#8e24aa"),
}


def agreement_map_figure(pred_a, pred_b, truth=None, *, names: tuple[str, str] = ("A", "B"),
                         mask=None, title: str = "Where the two models disagree") -> go.Figure:
    """Where two class maps of one scan differ; with ``truth`` the disagreements say which model is right.

    Parameters
    ----------
    pred_a, pred_b : int (ny, nx), classes 0..7 or -1 (missing: blank).
    truth : int (ny, nx) or None; -1 = unlabelled (those disagreements are plain "disagree").
    names : the two models' names for the legend.
    mask : bool (ny, nx) of the positions that pass the filters (others blank), optional.
    """
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"the two class maps must be 2-D of one shape, got {a.shape} and {b.shape}")
    valid = (a >= 0) & (b >= 0)
    if mask is not None:
        valid &= np.asarray(mask, bool)
    cat = np.where(a == b, 0, 1).astype(float)
    if truth is not None:
        t = np.asarray(truth)
        lab = (t >= 0) & (a != b)
        cat = np.where(lab & (a == t), 2, cat)
        cat = np.where(lab & (b == t), 3, cat)
        cat = np.where(lab & (a != t) & (b != t), 4, cat)
    cat = np.where(valid, cat, np.nan)
    colors = [AGREEMENT_LABELS[k][1] for k in range(5)]
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / 5, c], [(i + 1) / 5, c]]
    text = {0: "agree", 1: "disagree" if truth is None else "disagree, no label", 2: f"only {names[0]} right",
            3: f"only {names[1]} right", 4: "both wrong"}
    fig = go.Figure(go.Heatmap(z=cat, zmin=-0.5, zmax=4.5, colorscale=scale, showscale=False, name="agreement",
                               customdata=np.stack([a, b], axis=-1),
                               hovertemplate="iy=%{y}, ix=%{x}<br>A: class %{customdata[0]}, "
                                             "B: class %{customdata[1]}<extra></extra>"))
    present = set(np.unique(cat[np.isfinite(cat)]).astype(int).tolist())
    for k in range(5):
        if k in present or k == 0:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=text[k],
                                     marker=dict(color=colors[k], size=12, symbol="square")))
    return _map_layout(fig, title, *a.shape)

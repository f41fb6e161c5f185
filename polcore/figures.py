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


def class_map_figure(pred_map, title: str = "") -> go.Figure:
    """Heatmap of class indices with wheel colours, -1 (no label / invalid) in grey.

    Parameters
    ----------
    pred_map : array_like of int, shape (ny, nx)
        Class 0..7 or -1.
    title : str

    Returns
    -------
    plotly.graph_objects.Figure
        One Heatmap (discrete colours, no colour bar) plus one legend entry (empty Scatter) per class.
    """
    p = np.asarray(pred_map)
    if p.ndim != 2:
        raise ValueError(f"pred_map must be 2-D (ny, nx), got shape {p.shape}")
    z = np.where(p < 0, -1, p).astype(float)
    colors = [NO_LABEL_COLOR, *class_wheel_colors()]
    n = len(colors)  # values -1..7 -> 9 bands over zmin=-1.5 .. zmax=7.5
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure(go.Heatmap(
        z=z, zmin=-1.5, zmax=N_CLASSES - 0.5, colorscale=scale, showscale=False,
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


def pattern_figure(pattern, title: str = "Diffraction pattern", *, log_scale: bool = False,
                   colorscale: str = "Gray") -> go.Figure:
    """Heatmap of one diffraction pattern (ky, kx), ky down (row 0 on top), equal aspect."""
    p = np.asarray(pattern, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"pattern must be 2-D (ky, kx), got shape {p.shape}")
    z = np.log10(np.maximum(p, 0) + 1.0) if log_scale else p
    fig = go.Figure(go.Heatmap(z=z, colorscale=colorscale, showscale=False,
                               hovertemplate="ky=%{y}, kx=%{x}<br>%{z:.4g}<extra></extra>"))
    return _map_layout(fig, title, *p.shape, x_title="kx (px)", y_title="ky (px)")


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

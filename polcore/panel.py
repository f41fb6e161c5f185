"""One figure panel per scan and model, ready for slides: PNG, SVG or PDF (matplotlib, no browser engine).

Panels, left to right:

1. the virtual ADF image (:mod:`polcore.virtual`, stored at ingest) with one polarization arrow per unit cell
   (from the model's per-cell run when it exists, else per block of one lattice period of the per-pattern run):
   colour = the class's hue on the colour wheel (as on the dashboard), length = confidence;
2. the class map of the chosen layer;
3. the error map (right / wrong / no label), when the scan has ground truth;
4. the confusion matrix (rows true, columns predicted, row-normalised, counts annotated), with ground truth.

Legends: the eight classes with their arrows, the arrow length of confidence 1, error colours; a scale bar in nm
from the scan's calibration (probe step), else in scan pixels, said so. Maps show row 0 at the top.

``panel_figure`` returns the ``matplotlib.figure.Figure`` (no pyplot state: safe in the dashboard's threads);
``export_panel`` writes it (the format from the suffix) at :data:`DPI`, so a PNG is exactly
:func:`panel_size_px` pixels.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from polcore.types import CLASS_NAMES, N_CLASSES, class_to_angle

__all__ = ["FORMATS", "DPI", "panel_figure", "export_panel", "save_panel", "panel_size_in", "panel_size_px",
           "resolve_scan", "nice_length"]

log = logging.getLogger(__name__)

#: suffix -> MIME type of the formats written.
FORMATS = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}
#: Resolution of the exported raster [dots per inch].
DPI = 150
_PANEL_W, _PANEL_H = 4.0, 4.8  # inches per panel
_WRONG, _RIGHT, _NOLABEL = "#d62728", "#d9d9d9", "#ffffff"


def panel_size_in(has_truth: bool) -> tuple[float, float]:
    """Figure size [inches]: four panels with ground truth, two without."""
    return (_PANEL_W * (4 if has_truth else 2), _PANEL_H)


def panel_size_px(has_truth: bool, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) [px] of the exported PNG."""
    w, h = panel_size_in(has_truth)
    return int(round(w * dpi)), int(round(h * dpi))


def nice_length(target: float) -> float:
    """The 1-2-5 round number closest below ``target`` (> 0)."""
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target must be > 0, got {target!r}")
    e = math.floor(math.log10(target))
    for m in (5.0, 2.0, 1.0):
        if m * 10**e <= target:
            return m * 10**e
    return 10.0**e


def resolve_scan(store, scan) -> dict:
    """The stored scan named ``scan`` (or with id ``scan``), as :func:`polcore.store.queries.scan_info` gives it.

    An int is an id; a string is a name first (it must name one scan) and an id when it is all digits and names
    none. Raises ValueError naming the scans there are."""
    from polcore.store import queries

    scans = queries.list_scans(store)
    if isinstance(scan, (int, np.integer)):
        hit = scans[scans["scan_id"] == int(scan)]
    else:
        hit = scans[scans["name"] == str(scan)]
        if hit.empty and str(scan).strip().isdigit():
            hit = scans[scans["scan_id"] == int(str(scan).strip())]
    if hit.empty:
        names = ", ".join(f"{n} (id {i})" for n, i in zip(scans["name"], scans["scan_id"])) or "none"
        raise ValueError(f"no ready scan {scan!r} in {store.path}; scans: {names}")
    if len(hit) > 1:
        raise ValueError(f"{len(hit)} scans are named {scan!r} in {store.path} (ids {hit['scan_id'].tolist()}): "
                         "give the id")
    return queries.scan_info(store, int(hit["scan_id"].iloc[0]))


def _runs(store, scan_id: int, model: str) -> dict[str, int]:
    from polcore.store import queries

    runs = queries.list_runs(store, scan_ids=[scan_id])
    mine = runs[runs["model"] == str(model)]
    if mine.empty:
        have = sorted(set(runs["model"])) or ["none"]
        raise ValueError(f"model {model!r} has no run on scan {scan_id}; models with runs there: {', '.join(have)}")
    return {str(layer): int(rid) for layer, rid in zip(mine["layer"], mine["run_id"])}


def _colors() -> list[str]:
    from polcore.figures import class_wheel_colors

    return class_wheel_colors()


def _rgb(hexes: list[str]) -> np.ndarray:
    return np.array([[int(h[i:i + 2], 16) / 255.0 for i in (1, 3, 5)] for h in hexes])


def _class_rgb(pred: np.ndarray) -> np.ndarray:
    lut = np.vstack([_rgb(_colors()), _rgb([_NOLABEL])[0] * 0.62])  # index -1 -> grey
    return lut[np.where(pred >= 0, pred, N_CLASSES).astype(int)]


def _robust(img: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> tuple[float, float]:
    v = img[np.isfinite(img)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    return (float(a), float(b)) if b > a else (float(a), float(a) + 1.0)


def _scale_bar(ax, nx: int, step_nm: float | None, color: str) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    if step_nm and step_nm > 0:
        length_nm = nice_length(0.25 * nx * step_nm)
        size, label = length_nm / step_nm, f"{length_nm:g} nm"
    else:
        size = nice_length(0.25 * nx)
        label = f"{size:g} px (no calibration)"
    framed = color != "white"  # on a colour map: a light box behind the bar and its label
    bar = AnchoredSizeBar(ax.transData, size, label, "lower right", pad=0.3, borderpad=0.3, color=color,
                          frameon=framed, size_vertical=max(nx / 120.0, 0.4), sep=3, fontproperties={"size": 8})
    if framed:
        bar.patch.set(facecolor="white", alpha=0.75, edgecolor="none")
    ax.add_artist(bar)


def _arrows(grids: dict, period: float | None) -> tuple[np.ndarray, ...]:
    """Per block of one lattice period: centre (y, x), class and mean confidence of the block's class."""
    from polcore.analysis import cell_blocks

    ny, nx = grids["pred"].shape
    p = float(period) if period and period >= 1.0 else max(2.0, max(ny, nx) / 16.0)
    by, bx = cell_blocks(ny, nx, p)
    block = (by[:, None] * (int(bx[-1]) + 1) + bx[None, :]).ravel()
    pred = grids["pred"].ravel().astype(int)
    conf = np.nan_to_num(grids["confidence"].ravel().astype(float), nan=0.0)
    iy, ix = np.divmod(np.arange(ny * nx), nx)
    nb = int(block.max()) + 1
    ok = pred >= 0
    counts = np.zeros((nb, N_CLASSES))
    np.add.at(counts, (block[ok], pred[ok]), 1.0)
    cls = counts.argmax(axis=1)
    has = counts.sum(axis=1) > 0
    inb = ok & (pred == cls[block])
    n = np.bincount(block[inb], minlength=nb)
    c = np.bincount(block[inb], weights=conf[inb], minlength=nb) / np.maximum(n, 1)
    size = np.bincount(block, minlength=nb)
    cy = np.bincount(block, weights=iy, minlength=nb) / np.maximum(size, 1)
    cx = np.bincount(block, weights=ix, minlength=nb) / np.maximum(size, 1)
    return cy[has], cx[has], cls[has], c[has], p


def panel_figure(db_path=None, scan=None, model: str | None = None, *, layer: str = "pattern", title: str | None = None):
    """The figure panel of ``model`` on ``scan`` (a name or an id), read from the store at ``db_path``.

    Parameters
    ----------
    db_path : the DuckDB store (default :func:`polcore.settings.db_path`); read-only.
    scan : scan name or id; model : model name (``polcore.naming``).
    layer : 'pattern' or 'cell': the layer of the class map, error map and confusion matrix (the arrows use the
        cell layer whenever it exists).
    title : figure title (default: scan, data set and model).

    Returns
    -------
    matplotlib.figure.Figure of :func:`panel_size_in` inches.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from polcore import settings
    from polcore.store import PredictionStore, queries

    if model is None or scan is None:
        raise ValueError("give a scan (name or id) and a model name")
    if layer not in ("pattern", "cell"):
        raise ValueError(f"layer must be 'pattern' or 'cell', got {layer!r}")
    store = PredictionStore(db_path if db_path is not None else settings.db_path(), read_only=True)
    info = resolve_scan(store, scan)
    sid = int(info["scan_id"])
    runs = _runs(store, sid, model)
    if layer not in runs:
        raise ValueError(f"model {model!r} has no {layer} run on scan {info['name']!r} (layers: {sorted(runs)})")
    g = queries.run_grids(store, runs[layer])
    arrow_layer = "cell" if "cell" in runs else "pattern"
    ga = g if arrow_layer == layer else queries.run_grids(store, runs[arrow_layer])
    period = (queries.run_config(store, runs[arrow_layer]) or {}).get("cell_px") or info.get("cell_px")
    images = queries.scan_images(store, sid)
    ny, nx = g["pred"].shape
    truth = bool((g["true_label"] >= 0).any())
    step = info.get("step_nm")
    colors = _colors()

    fig = Figure(figsize=panel_size_in(truth), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 4 if truth else 2, squeeze=True)
    where = f"{ny} x {nx} positions, " + (f"step {step:.4g} nm" if step else "uncalibrated")
    fig.suptitle(title or f"{info['name']}  ({info.get('dataset') or info.get('kind')}, {where})  -  {model}",
                 fontsize=11)

    # 1. virtual ADF + arrows
    ax = axes[0]
    if images is not None:
        lo, hi = _robust(images["adf"])
        ax.imshow(images["adf"], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        base = "virtual ADF"
    else:
        ax.imshow(np.zeros((ny, nx)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        base = "no virtual images stored"
    cy, cx, cls, conf, p = _arrows(ga, period)
    if len(cls):
        ang = np.deg2rad(class_to_angle(cls))
        length = 0.9 * p * conf
        # image axes point down: the on-screen vector (cos a, sin a) is (cos a, -sin a) in (x, row)
        q = ax.quiver(cx, cy, length * np.cos(ang), -length * np.sin(ang), color=[colors[k] for k in cls],
                      angles="xy", scale_units="xy", scale=1.0, pivot="middle", width=0.006, headwidth=3.5,
                      headlength=4, headaxislength=3.5)
        ax.quiverkey(q, 0.3, -0.06, 0.9 * p, "arrow length: confidence 1", labelpos="E", coordinates="axes",
                     color="k", fontproperties={"size": 8})
    how = "per unit cell" if arrow_layer == "cell" else f"per {p:.1f}-px block"
    ax.set_title(f"{base}, arrows {how}", fontsize=9)
    _scale_bar(ax, nx, step, "white" if images is not None else "black")

    # 2. class map
    ax = axes[1]
    ax.imshow(_class_rgb(g["pred"]), interpolation="nearest")
    ax.set_title(f"class map ({layer} layer)", fontsize=9)
    _scale_bar(ax, nx, step, "black")
    arrows = ("\u2192", "\u2197", "\u2191", "\u2196", "\u2190", "\u2199", "\u2193", "\u2198")
    handles = [Patch(facecolor=colors[k], label=f"{CLASS_NAMES[k]} {arrows[k]} {int(class_to_angle(k))}\u00b0")
               for k in range(N_CLASSES)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=4, fontsize=7, frameon=False,
              handlelength=1.0, columnspacing=0.8)

    if truth:
        # 3. error map
        ax = axes[2]
        err = g["error"]
        rgb = np.where(np.isnan(err)[..., None], _rgb([_NOLABEL])[0],
                       np.where((err > 0.5)[..., None], _rgb([_WRONG])[0], _rgb([_RIGHT])[0]))
        ax.imshow(rgb, interpolation="nearest")
        lab = g["true_label"] >= 0
        acc = float(np.mean(g["pred"][lab] == g["true_label"][lab]))
        ax.set_title(f"errors ({layer} layer): accuracy {acc:.3f}", fontsize=9)
        _scale_bar(ax, nx, step, "black")
        ax.legend(handles=[Patch(facecolor=_RIGHT, label="right"), Patch(facecolor=_WRONG, label="wrong"),
                           Patch(facecolor=_NOLABEL, edgecolor="#999999", label="no label")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7, frameon=False)
        # 4. confusion matrix
        ax = axes[3]
        cm = np.zeros((N_CLASSES, N_CLASSES), np.int64)
        np.add.at(cm, (g["true_label"][lab].astype(int), g["pred"][lab].astype(int)), 1)
        rows = cm.sum(axis=1, keepdims=True)
        frac = np.where(rows > 0, cm / np.maximum(rows, 1), np.nan)
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(N_CLASSES):
            for j in range(N_CLASSES):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(N_CLASSES), CLASS_NAMES, fontsize=7)
        ax.set_yticks(range(N_CLASSES), CLASS_NAMES, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"confusion ({int(lab.sum())} labelled positions)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    for a in axes[: 3 if truth else 2]:
        a.set_xticks([])
        a.set_yticks([])
    return fig


def _format(out: Path) -> str:
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{out}: unsupported figure format {out.suffix or '(none)'!r}; use one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    return fmt


def export_panel(db_path, scan, model: str, out_path, *, layer: str = "pattern") -> Path:
    """Write the panel of ``model`` on ``scan`` to ``out_path`` (.png, .svg or .pdf; folders are created) and
    return the path. Written to a temporary name and renamed, so a failure leaves no partial file."""
    _format(Path(out_path))  # refuse a bad suffix before any work
    return save_panel(panel_figure(db_path, scan, model, layer=layer), out_path)


def save_panel(fig, out_path) -> Path:
    """Write a :func:`panel_figure` to ``out_path`` (format from the suffix, :data:`DPI`), atomically."""
    out = Path(out_path)
    fmt = _format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote the figure panel %s", out)
    return out

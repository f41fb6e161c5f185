"""Error maps: one run's maps over the structure, polarization arrows, the probe viewer, two models compared,
periodic error analysis and the wrong predictions.

Layout for a projector: a two-column grid of maps (predicted class | confidence, arrows | one of errors,
ground truth or a virtual image, chosen above it), then tabs (probe position, comparison, periodic errors,
wrong predictions). Drag a box on the predicted-class map to set the region filter (shared with every page
and the URL); click a position on the confidence map to see its diffraction pattern beside the library
patterns the model compared it with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from polcore.figures import (
    agreement_map_figure,
    arrow_map_figure,
    cell_arrows,
    cell_fold_figure,
    class_label,
    class_map_figure,
    image_figure,
    pattern_figure,
    pattern_marks,
    probs_figure,
    scalar_map_figure,
    spectrum_figure,
)
from polcore.types import CLASS_NAMES
from ui import data as D
from ui import download_table, guard, init_page, require_run, state
from ui.maps import (
    add_click_grid,
    add_marker,
    add_region_outline,
    box_select_layout,
    png_config,
    selection_to_point,
    selection_to_region,
)

ctx = init_page("Error maps", icon=":material/map:")
st.title("Error maps")
MAP_H = 400
PATTERN_H = 400
PATTERN_MARGIN = dict(l=40, r=10, t=40, b=30)
#: Base images that can lie under the class maps: key in ``queries.scan_images`` -> label.
BASES = {"adf": "virtual ADF", "bf": "virtual BF"}
#: Pattern display modes of the probe viewer.
DISPLAY = {"log": "log", "gamma": "gamma 0.5", "linear": "linear"}
#: The maps that can lie beside the arrow map (one at a time): key -> radio label.
SIDE_MAPS = {"errors": "errors", "truth": "ground truth", "adf": "virtual ADF", "bf": "virtual BF",
             "com": "|CoM|"}


@st.cache_data(show_spinner=False, max_entries=32)
def _geometry_caption(tok: tuple, run_id: int) -> str:
    """One line: the scan geometry this run's patterns went through (the run's config, ``queries.run_config``)."""
    g = (_run_config(tok, run_id) or {}).get("geometry")
    if not g:
        return "Scan geometry: not recorded for this run (ingested before the geometry was applied)."
    src, conf = g.get("sources") or {}, g.get("confidence") or {}

    def tag(k):
        return src.get(k, "?") + (f", {conf[k]}" if src.get(k) == "estimated" and conf.get(k) else "")

    d = (g.get("details") or {}).get("descan") or {}
    descan = (f"descan {d.get('range_y_px', 0):.1f}\u00d7{d.get('range_x_px', 0):.1f} px applied ({tag('descan')})"
              if src.get("descan") in ("estimated", "user") and g.get("descan_y") else "no descan applied")
    mrad = g.get("mrad_per_px")
    warn = f" \u26a0 {len(g['warnings'])} warning(s): " + "; ".join(g["warnings"]) if g.get("warnings") else ""
    return (f"Scan geometry applied: rotation {g.get('rotation_deg', 0.0):.1f}\u00b0 ({tag('rotation_deg')}), "
            f"{'flip' if g.get('flip') else 'no flip'} ({tag('flip')}), {descan}, "
            f"{'?' if mrad is None else f'{mrad:.3f}'} mrad/px ({tag('mrad_per_px')}).{warn}")


@st.cache_data(show_spinner=False, max_entries=64)
def _run_config(tok: tuple, run_id: int) -> dict | None:
    from polcore.store import queries

    return queries.run_config(D.store(), int(run_id))


def _mask(g: dict, *, region: bool = True) -> np.ndarray:
    """(ny, nx) bool: the positions that pass the sidebar's thickness and (unless told not to) region filters.

    The maps drop the positions outside the thickness range but keep the whole scan around the region (drawn
    as a dashed outline), so a box can be drawn anew; counts and rates use both filters.
    """
    f = ctx.filters if region else type(ctx.filters)(thickness=ctx.filters.thickness)
    return f.mask((g["ny"], g["nx"]), g["thickness_nm"] if f.thickness else None)


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


# ---------------------------------------------------------------------------------------------- the maps


def _base_controls(images: dict | None) -> tuple[np.ndarray | None, str, float]:
    """The structure image under the class maps and the class colours' opacity (widgets)."""
    if not images:
        st.caption(
            "No virtual images are stored for this scan (it was ingested before they were computed): the class "
            "maps are drawn alone and the arrows over the class map."
        )
        return None, "", 1.0
    keys = [k for k in BASES if k in images]
    c1, c2 = st.columns(2)
    base = c1.radio("Structure under the maps", [*keys, "none"], horizontal=True, key="em_base",
                    format_func=lambda k: BASES.get(k, "none"),
                    help="Virtual detectors computed in the ingest pass: annular dark field (atom columns "
                         "bright) and bright field.")
    alpha = c2.slider("Class colours over the structure (opacity)", 0.0, 1.0, 0.55, 0.05, key="em_alpha",
                      disabled=base == "none", help="0: only the structure image; 1: only the classes.")
    if base == "none":
        return None, "", 1.0
    return images[base], BASES[base], float(alpha)


def _arrows(g: dict, cell: float | None, mask: np.ndarray) -> tuple[dict | None, str, float | None]:
    """Per-unit-cell arrows: from the model's cell-layer run when stored, else pooled here from this run."""
    cell_id = D.cell_run(ctx.tok, int(ctx.scan["scan_id"]), str(ctx.model["name"]))
    if cell_id is not None:
        cg = D.grids(ctx.tok, cell_id)
        period = _finite((_run_config(ctx.tok, cell_id) or {}).get("cell_px")) or cell
        if period is not None and period >= 1:
            pred = np.where(mask, cg["pred"], -1)
            return cell_arrows(pred, cg["confidence"], period), "the per-unit-cell layer", period
    if cell is None or cell < 1:
        return None, "", None
    src = "this run pooled per unit cell"
    if np.all(np.isfinite(g["probs"][g["pred"] >= 0])):
        from polcore.analysis import pool_scan

        pooled = pool_scan(np.nan_to_num(g["probs"], nan=1.0 / 8), cell)
        pred, conf = pooled["pred"], pooled["confidence"]
    else:
        pred, conf, src = g["pred"], g["confidence"], "the majority class of each unit cell"
    return cell_arrows(np.where(mask & (g["pred"] >= 0), pred, -1), conf, cell), src, cell


def _maps(run_id: int, g: dict, cell: float | None, images: dict | None, point) -> None:
    """The two-column grid: predicted class (box select) | confidence (click), then the arrows, the ground
    truth, the errors and a virtual image, two per row, in that order (panels without data drop out)."""
    scan, model = ctx.scan, ctx.model
    ny, nx = g["ny"], g["nx"]
    region = ctx.filters.region
    mask = _mask(g, region=False)
    tag = f"{scan['name']}_{model['name']}"
    base, base_name, alpha = _base_controls(images)
    legend = dict(orientation="h", y=-0.16, font=dict(size=10))

    left, right = st.columns(2)
    with left:
        fig = class_map_figure(g["pred"], title="Predicted class \u2014 drag a box to set the region",
                               base=base, opacity=alpha, base_name=base_name)
        box_select_layout(fig)
        add_region_outline(fig, region)
        if point is not None:
            add_marker(fig, *point)
        fig.update_layout(height=MAP_H + 40, legend=legend)
        event = st.plotly_chart(fig, on_select="rerun", selection_mode="box", key=f"em_class_{run_id}",
                                config=png_config(f"class_map_{tag}"))
        new_region = selection_to_region(event, ny, nx)
        if new_region is not None and new_region != region:
            state.set_region(new_region)
            st.rerun()
    with right:
        conf = np.where(mask, g["confidence"], np.nan)
        fig = scalar_map_figure(conf, title="Confidence \u2014 click a position for its pattern",
                                colorscale="Viridis", zmin=0, zmax=1, colorbar_title="p")
        add_click_grid(fig, ny, nx)
        add_region_outline(fig, region)
        if point is not None:
            add_marker(fig, *point)
        fig.update_layout(height=MAP_H + 40)
        event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key=f"em_conf_{run_id}",
                                config=png_config(f"confidence_{tag}"))
        new_point = selection_to_point(event, ny, nx)
        if new_point is not None and new_point != point:
            state.set_point(new_point, int(scan["scan_id"]))
            st.rerun()

    def arrows_panel() -> None:
        arrows, src, period = _arrows(g, cell, mask)
        if arrows is None:
            st.info("No lattice period is known for this scan (no calibration, no cell layer): no per-cell arrows.")
            return
        img = base if base is not None else (images or {}).get("adf")
        under = (base_name or "virtual ADF") if img is not None else ""
        fig = arrow_map_figure(
            arrows, (ny, nx), period, base=img, base_name=under or "virtual ADF",
            base_classes=None if img is not None else np.where(mask, g["pred"], -1),
            title="Polarization per unit cell" + (f" over the {under}" if img is not None else ""),
        )
        add_region_outline(fig, region, color="white" if img is not None else "black")
        if point is not None:
            add_marker(fig, *point)
        fig.update_layout(height=MAP_H + 40, legend=legend)
        st.plotly_chart(fig, config=png_config(f"arrows_{tag}"), key="em_arrows")
        st.caption(
            f"{len(arrows['cls'])} cells of {period:.2f} scan px, from {src}: direction = class angle, colour = "
            "class wheel, length = confidence."
            + ("" if img is not None else " No virtual ADF is stored for this scan: drawn over the class map.")
        )

    def truth_panel() -> None:
        fig = class_map_figure(g["true_label"], title="Ground truth", base=base, opacity=alpha, base_name=base_name)
        add_region_outline(fig, region)
        fig.update_layout(height=MAP_H, legend=legend)
        st.plotly_chart(fig, config=png_config(f"truth_{scan['name']}"), key="em_truth")

    def errors_panel() -> None:
        err = np.where(mask, g["error"], np.nan)
        fig = scalar_map_figure(err, title="Errors (1 = wrong)", colorscale=[[0, "#f5f5f5"], [1, "#c62828"]],
                                zmin=0, zmax=1, colorbar_title="error")
        add_region_outline(fig, region)
        fig.update_layout(height=MAP_H)
        st.plotly_chart(fig, config=png_config(f"errors_{tag}"), key="em_err")

    def image_panel(which: str) -> None:
        if which == "com":
            img, label, title = np.hypot(images["com_y"], images["com_x"]), "px", "Virtual image: |CoM| shift"
        else:
            img, label, title = images[which], "", f"Virtual image: {which.upper()}"
        fig = image_figure(img, title=title, colorbar_title=label, colorscale="Viridis" if which == "com" else "Gray")
        add_region_outline(fig, region, color="red")
        fig.update_layout(height=MAP_H)
        st.plotly_chart(fig, config=png_config(f"virtual_{which}_{scan['name']}"), key="em_vimg_fig")

    # Beside the arrows: one map at a time (errors, ground truth or a virtual image), chosen with a radio. Each
    # Plotly chart costs the browser a roughly fixed amount of drawing (Streamlit draws it two or three times),
    # so the page draws four maps at first load, not six (issue 16: every page in < 2 s).
    side = {}
    if bool(scan["has_ground_truth"]) and (g["true_label"] >= 0).any():
        if np.isfinite(np.where(mask, g["error"], np.nan)).any():
            side["errors"] = errors_panel
        side["truth"] = truth_panel
    if images:
        for k in ("adf", "bf"):
            if k in images:
                side[k] = lambda k=k: image_panel(k)
        if {"com_y", "com_x"} <= set(images):
            side["com"] = lambda: image_panel("com")
    left, right = st.columns(2)
    with left:
        arrows_panel()
    if side:
        if st.session_state.get("em_side") not in side:  # e.g. "truth" kept from a scan with ground truth
            st.session_state["em_side"] = next(iter(side))
        with right:
            which = st.radio("Map beside the arrows", list(side), horizontal=True, key="em_side",
                             format_func=SIDE_MAPS.get, label_visibility="collapsed")
            side[which]()
    if not bool(scan["has_ground_truth"]) or not (g["true_label"] >= 0).any():
        st.info("This scan has no ground truth: no truth or error maps; see the confidence map.")


# ------------------------------------------------------------------------------------------ probe viewer


def _frac_in_cell(iy: int, ix: int, cell: float | None) -> tuple[float, float] | None:
    """Probe position as fractions of the unit cell (the composer's convention: the scan starts on an A site)."""
    if cell is None or cell < 1:
        return None
    return (iy / cell) % 1.0, (ix / cell) % 1.0


def _marks_caption(marks: dict | None, known: bool = False) -> str:
    if not marks:
        return "No bright-field disc found in this pattern."
    cy, cx, r = marks["disc"]
    shift = float(np.hypot(marks["com"][0] - cy, marks["com"][1] - cx))
    how = "convergence angle" if known else "found in the pattern"
    return (f"Dashed: bright-field disc, radius {r:.1f} px ({how}). Orange arrow: centre-of-mass shift "
            f"{shift:.2f} px from the disc centre (drawn \u00d7{marks['gain']:.0f}).")


def _library_column(title: str, cls: int, thickness: float, frac, display: dict, key: str) -> None:
    if frac is None:
        st.info(f"{title}: the scan has no lattice period, so the position inside the cell is unknown.")
        return
    try:
        lib, info = D.library_pattern(int(cls), float(thickness), float(frac[0]), float(frac[1]))
    except (FileNotFoundError, ValueError, OSError) as exc:
        st.info(f"{title}: the committed pattern library is not available ({exc}).")
        return
    k = lib.shape[0]
    r = info["convergence_mrad"] / info["mrad_per_px"]
    marks = pattern_marks(lib, disc=(k // 2, k // 2, r) if np.isfinite(r) else None)
    fig = pattern_figure(lib, title=f"{title}: {class_label(int(cls))}", marks=marks, **display)
    fig.update_layout(height=PATTERN_H, margin=PATTERN_MARGIN)
    st.plotly_chart(fig, config=png_config(f"library_{CLASS_NAMES[int(cls)]}"), key=key)
    st.caption(
        f"Library: {info['thickness_nm']:g} nm, probe at ({info['py']}, {info['px']})/8 of the cell, "
        f"{info['mrad_per_px']:.2f} mrad/px. " + _marks_caption(marks, known=np.isfinite(r))
    )


def _probe_section(run_id: int, g: dict, cell: float | None, point) -> None:
    scan = ctx.scan
    if point is None:
        st.info("Click a position on the confidence map: its diffraction pattern appears here, beside the library "
                "patterns of the predicted and the true class at the same place in the unit cell.")
        return
    iy, ix = point
    st.subheader(f"Probe position iy={iy}, ix={ix}")
    row = D.prediction_at(run_id, iy, ix)
    c1, c2 = st.columns([1, 2])
    mode = c1.radio("Display", list(DISPLAY), horizontal=True, key="em_disp", format_func=DISPLAY.get,
                    help="log10(1 + I) or I^0.5 show the dark field beside the bright disc.")
    robust = c2.toggle("Robust contrast (clip to the 0.5\u201399.5 % percentiles)", value=True, key="em_robust",
                       help="A few hot pixels no longer set the colour scale.")
    display = dict(log_scale=mode == "log", gamma=0.5 if mode == "gamma" else None,
                   clip=(0.5, 99.5) if robust else None)
    r = row.iloc[0] if len(row) else None
    cols = st.columns(3)
    src = scan.get("source_file")
    with cols[0]:
        if src and Path(str(src)).is_file():
            pat = D.pattern(str(src), iy, ix)
            marks = pattern_marks(pat)
            fig = pattern_figure(pat, title="Measured pattern", marks=marks, **display)
            fig.update_layout(height=PATTERN_H, margin=PATTERN_MARGIN)
            st.plotly_chart(fig, config=png_config(f"pattern_{iy}_{ix}"), key="em_pattern")
            st.caption(_marks_caption(marks))
        else:
            st.warning(f"The scan file is not available on this server ({src}); the pattern cannot be shown.")
    frac = _frac_in_cell(iy, ix, cell)
    thickness = _finite(r["thickness_nm"]) if r is not None else None
    thickness = thickness or _finite(scan.get("thickness_nm")) or 20.0
    with cols[1]:
        if r is not None and int(r["pred"]) >= 0:
            _library_column("Library, predicted", int(r["pred"]), thickness, frac, display, "em_lib_pred")
        else:
            st.info("No stored prediction at this position.")
    with cols[2]:
        if r is not None and int(r["true_label"]) >= 0:
            _library_column("Library, true", int(r["true_label"]), thickness, frac, display, "em_lib_true")
        else:
            st.info("No ground truth at this position: no true-class pattern.")
    left, right = st.columns([1, 2])
    with left:
        if r is not None:
            true = int(r["true_label"])
            m1, m2 = st.columns(2)
            m1.metric("Predicted", CLASS_NAMES[int(r["pred"])] if int(r["pred"]) >= 0 else "\u2014")
            m2.metric("True", CLASS_NAMES[true] if true >= 0 else "\u2014")
            m1.metric("Confidence", f"{float(r['confidence']):.3f}")
            if np.isfinite(r["thickness_nm"]):
                m2.metric("Thickness", f"{float(r['thickness_nm']):.1f} nm")
        else:
            st.info("No stored prediction at this position.")
    with right:
        if r is not None and np.all(np.isfinite(r["probs"])):
            fig = probs_figure(r["probs"], title="Class probabilities")
            fig.update_layout(height=300, margin=dict(l=30, r=30, t=40, b=20))
            st.plotly_chart(fig, config=png_config(f"probs_{iy}_{ix}"), key="em_probs")
        elif r is not None:
            st.info("This model stores no class probabilities.")
    if frac is not None:
        st.caption(
            f"Position in the unit cell ({frac[0]:.2f}, {frac[1]:.2f}) of {cell:.2f} scan px, counted from the scan "
            "origin (true for the composed scans, which start on an A site; an experimental scan's lattice phase "
            "is not known). The library patterns are noise-free simulations at the library's own detector "
            "sampling."
        )


# -------------------------------------------------------------------------------------- two models


def _agreement(a: np.ndarray, b: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    valid = (a >= 0) & (b >= 0) & mask
    n = int(valid.sum())
    out = {"n": n, "rate": float((a[valid] == b[valid]).mean()) if n else float("nan")}
    lab = valid & (truth >= 0)
    if lab.any():
        ra, rb = a[lab] == truth[lab], b[lab] == truth[lab]
        out.update(n_labelled=int(lab.sum()), both_right=int((ra & rb).sum()), only_a=int((ra & ~rb).sum()),
                   only_b=int((~ra & rb).sum()), both_wrong=int((~ra & ~rb).sum()))
    return out


def _compare_section(run_id: int, g: dict) -> None:
    scan, model = ctx.scan, ctx.model
    runs = D.runs(ctx.tok)
    others = list(dict.fromkeys(runs.loc[(runs["scan_id"] == int(scan["scan_id"])) & (runs["layer"] == ctx.layer)
                                         & (runs["model"] != model["name"]), "model"]))
    if not others:
        st.info("No other model has a run on this scan in this prediction layer: nothing to compare with.")
        return
    cur = st.session_state.get("f_compare")
    if cur not in others:
        cur = others[0]
        st.session_state["f_compare"] = cur
    st.session_state["w_compare"] = cur
    st.selectbox("Compare with", others, key="w_compare",
                 on_change=lambda: st.session_state.__setitem__("f_compare", st.session_state["w_compare"]),
                 help="A second model's run on the same scan and layer (the first model is the sidebar's).")
    other = st.session_state["f_compare"]
    gb = D.grids(ctx.tok, D.find_run(ctx.tok, int(scan["scan_id"]), other, ctx.layer))
    mask = _mask(g)
    a, b, t = g["pred"], gb["pred"], g["true_label"]
    ag = _agreement(a, b, t, mask)
    m = st.columns(4)
    m[0].metric("Agreement rate", "\u2014" if not ag["n"] else f"{ag['rate']:.1%}",
                help=f"Share of the {ag['n']:,} positions (filtered) where the two models predict the same class.")
    if "n_labelled" in ag:
        acc_a = (ag["both_right"] + ag["only_a"]) / ag["n_labelled"]
        acc_b = (ag["both_right"] + ag["only_b"]) / ag["n_labelled"]
        m[1].metric("Accuracy A", f"{acc_a:.3f}", help=f"A = {model['name']} (the sidebar's model)")
        m[2].metric("Accuracy B", f"{acc_b:.3f}", help=f"B = {other}")
        m[3].metric("Only A right / only B right", f"{ag['only_a']:,} / {ag['only_b']:,}",
                    help="labelled positions where only one of the two models is right")
    legend = dict(orientation="h", y=-0.16, font=dict(size=10))
    shown = _mask(g, region=False)
    c = st.columns(3)
    for col, grid, name, key in ((c[0], a, f"A: {model['name']}", "em_cmp_a"), (c[1], b, f"B: {other}", "em_cmp_b")):
        with col:
            fig = class_map_figure(np.where(shown, grid, -1), title=name)
            add_region_outline(fig, ctx.filters.region)
            fig.update_layout(height=MAP_H, showlegend=False)
            st.plotly_chart(fig, config=png_config(f"compare_{scan['name']}_{name}"), key=key)
    with c[2]:
        fig = agreement_map_figure(a, b, t if (t >= 0).any() else None, names=("A", "B"), mask=shown,
                                   title="Where they disagree")
        add_region_outline(fig, ctx.filters.region)
        fig.update_layout(height=MAP_H, legend=legend)
        st.plotly_chart(fig, config=png_config(f"agreement_{scan['name']}"), key="em_cmp_agree")
    st.caption("Agreement rate and accuracies count the positions that pass the thickness and region filters; "
               "the maps show the whole scan with the region outlined.")


# ----------------------------------------------------------------------------------- periodic errors


def _periodic_section(run_id: int, g: dict, cell: float | None) -> None:
    ny, nx = g["ny"], g["nx"]
    region = ctx.filters.region
    if not (g["true_label"] >= 0).any():
        st.info("Periodic error analysis needs ground truth.")
        return
    crop = (ny, nx) if region is None else (region[1] - region[0] + 1, region[3] - region[2] + 1)
    if min(crop) < 8:
        st.info("The region is too small for a periodic analysis (at least 8\u00d78 positions).")
        return
    pa = D.periodic_analysis(ctx.tok, run_id, cell, ctx.ft)
    res = pa["result"]
    if res is None:
        st.info("No labelled positions pass the filters.")
        return
    m = st.columns(4)
    m[0].metric("Error period [scan px]",
                "\u2014" if _finite(res["period_px"]) is None else f"{res['period_px']:.2f}",
                help="1/|k| of the strongest Fourier peak of the error map (\u2014: no errors)")
    m[1].metric("Lattice period [scan px]", "\u2014" if cell is None else f"{cell:.2f}")
    m[2].metric("Direction [deg]", "\u2014" if _finite(res["angle_deg"]) is None else f"{res['angle_deg']:.0f}")
    m[3].metric("Periodic part of the errors", f"{res['periodic_fraction']:.0%}",
                help="variance of the error map explained by the peak, its harmonics and combinations")
    if not res["significant"]:
        st.caption("The strongest peak is not significant (1 % false-alarm level): the errors look random rather "
                   "than periodic.")
    left, right = st.columns(2)
    with left:
        fig = spectrum_figure(res, lattice_period_px=cell)
        fig.update_layout(height=MAP_H)
        st.plotly_chart(fig, config=png_config("error_spectrum"), key="em_spec")
    with right:
        if pa["cell"] is not None:
            fig = cell_fold_figure(pa["cell"])
            fig.update_layout(height=MAP_H)
            st.plotly_chart(fig, config=png_config("error_cell"), key="em_cell")
            st.caption("Error rate at each probe position inside the unit cell (all cells of the scan folded onto "
                       "one): positions on weakly scattering columns carry little polarization signal.")
        else:
            st.info("The scan has no lattice period (cell_px) stored: no unit-cell folding.")


def _errors_section(run_id: int) -> None:
    scan, model, region = ctx.scan, ctx.model, ctx.filters.region
    errs = D.errors(ctx.tok, run_id, ctx.ft)
    scope = ("whole scan" if region is None
             else f"region rows {region[0]}\u2013{region[1]}, columns {region[2]}\u2013{region[3]}")
    th = ctx.filters.thickness
    st.markdown(f"**{len(errs):,} wrong predictions** in the {scope}"
                + ("" if th is None else f", thickness {th[0]:g}\u2013{th[1]:g} nm"))
    show = errs.copy()
    for col in ("pred", "true_label"):
        show[col] = [CLASS_NAMES[int(v)] if 0 <= int(v) < 8 else "\u2014" for v in show[col]]
    st.dataframe(show, hide_index=True, width="stretch", key="em_errors_table", column_config={
        "confidence": st.column_config.NumberColumn(format="%.3f"),
        "irregularity": st.column_config.NumberColumn(format="%.3f"),
        "thickness_nm": st.column_config.NumberColumn("thickness [nm]", format="%.1f"),
    })
    download_table(errs, f"errors_{scan['name']}_{model['name']}", key="dl_err")


# ------------------------------------------------------------------------------------- figure export


def _export_panel(panel, scan, model) -> None:
    """Draw the figure panel once (``polcore.panel.panel_figure``, the one ``python -m polcore figure`` and
    ``export_panel`` write) and keep it in every format it saves to, for the download buttons."""
    import io

    files, problems = {}, []
    fig = panel.panel_figure(ctx.db, int(scan["scan_id"]), str(model["name"]), layer=ctx.layer)
    for suffix in panel.FORMATS:
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format=suffix, dpi=panel.DPI)
        except Exception as exc:  # noqa: BLE001 - a format this matplotlib cannot write is left out
            problems.append(f"{suffix.upper()}: {exc}")
            continue
        files[suffix] = buf.getvalue()
    st.session_state["em_panel"] = {"key": _panel_key(scan, model), "files": files, "problems": problems}


def _panel_key(scan, model) -> tuple:
    return (int(scan["scan_id"]), str(model["name"]), ctx.layer)


def _export_controls(scan, model) -> None:
    panel = D.panel_module()
    if panel is None:
        return
    with st.popover("Export figure", icon=":material/image:", help="A figure panel for slides: PNG, SVG, PDF"):
        st.caption("Virtual ADF with arrows, class map, error map and confusion matrix, with legends and a scale "
                   "bar (nm from the calibration); PNG, SVG and PDF.")
        if st.button("Make the figure panel", key="em_panel_make", icon=":material/draw:"):
            with st.spinner("Drawing the panel ..."):
                _export_panel(panel, scan, model)
        made = st.session_state.get("em_panel")
        if made and made["key"] == _panel_key(scan, model):
            cols = st.columns(max(1, len(made["files"])))
            for col, (suffix, data) in zip(cols, made["files"].items()):
                col.download_button(suffix.upper(), data, file_name=f"panel_{scan['name']}_{model['name']}.{suffix}",
                                    mime=panel.FORMATS.get(suffix), key=f"em_panel_{suffix}", on_click="ignore",
                                    icon=":material/download:")
            for p in made["problems"]:
                st.caption(f"Not available: {p}")


# ---------------------------------------------------------------------------------------------- page


def _tab_changed() -> None:
    label = st.session_state.get("em_tab")
    st.session_state["f_tab"] = next((k for k, v in state.TABS.items() if v == label), None)


with guard("The error-map page"):
    run_id = require_run(ctx)
    scan, model = ctx.scan, ctx.model
    g = D.grids(ctx.tok, run_id)
    ny, nx = g["ny"], g["nx"]
    cell = _finite(g["cell_px"])
    mrow = D.run_metrics(ctx.tok, run_id, ctx.ft)
    c = st.columns([1, 1, 1, 1, 1.1])
    c[0].metric("Scan", str(scan["name"]), help=str(scan["dataset"]))
    c[1].metric("Model", str(model["name"]), help=f"Prediction layer: {state.LAYER_LABELS[ctx.layer]}")
    if mrow is not None and mrow["n_labelled"] > 0:
        c[2].metric("Accuracy (filtered)", f"{mrow['accuracy']:.3f}")
        c[3].metric("Labelled positions (filtered)", f"{int(mrow['n_labelled']):,}")
    else:
        c[2].metric("Accuracy (filtered)", "\u2014")
        c[3].metric("Positions (filtered)", f"{int(mrow['n_rows']) if mrow is not None else 0:,}")
    with c[4]:
        with guard("The figure export"):
            _export_controls(scan, model)
    st.caption(_geometry_caption(ctx.tok, run_id))
    if ctx.layer == "cell":
        st.info(
            f"Unit-cell layer: the class log-probabilities of the probe positions inside each projected unit "
            f"cell (blocks of {cell:.2f} scan pixels, from the calibration or the scan's periodicity) are summed, "
            "and every position shows its cell's class. Pooling assumes one polarization per cell: a domain "
            "wall through a cell takes one side's class." if cell else
            "Unit-cell layer: the cell's pooled class at every position of the cell."
        )
    st.caption(
        "Drag a box on the predicted-class map to set the region (the sidebar shows it; \u201cClear region\u201d "
        "resets it). Click a position on the confidence map to see its diffraction pattern. Camera icon on a "
        "chart: PNG."
    )
    images = D.scan_images(ctx.tok, int(scan["scan_id"]))
    point = state.current_point(int(scan["scan_id"]), (ny, nx))

    st.subheader("Maps")
    _maps(run_id, g, cell, images, point)

    # Tabs run lazily: only the open one's content is computed and drawn. The open tab lives in the plain key
    # f_tab (URL ``tab``), the widget is rebuilt from it as the sidebar's are.
    st.session_state["em_tab"] = state.TABS.get(st.session_state.get("f_tab"), state.TABS["probe"])
    tabs = dict(zip(state.TABS, st.tabs(list(state.TABS.values()), key="em_tab", on_change=_tab_changed)))
    if tabs["probe"].open:
        with tabs["probe"], guard("The probe-position panel"):
            _probe_section(run_id, g, cell, point)
    if tabs["compare"].open:
        with tabs["compare"], guard("The model comparison"):
            _compare_section(run_id, g)
    if tabs["periodic"].open:
        with tabs["periodic"], guard("The periodic analysis"):
            _periodic_section(run_id, g, cell)
    if tabs["errors"].open:
        with tabs["errors"]:
            _errors_section(run_id)

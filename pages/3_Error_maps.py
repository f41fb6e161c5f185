"""Error maps: class / truth / error / confidence maps of one run, periodic error analysis, probe patterns.

Drag a box on the predicted-class map to set the region filter (shared with every page and the URL); click a
position to see its diffraction pattern and the 8 class probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from polcore.figures import (
    cell_fold_figure,
    class_map_figure,
    pattern_figure,
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
MAP_H = 440


@st.cache_data(show_spinner=False, max_entries=32)
def _geometry_caption(tok: tuple, run_id: int) -> str:
    """One line: the scan geometry this run's patterns went through (the run's config, ``queries.run_config``)."""
    from polcore.store import queries

    g = (queries.run_config(D.store(), int(run_id)) or {}).get("geometry")
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


def _thickness_mask(g: dict) -> np.ndarray | None:
    th = ctx.filters.thickness
    if th is None:
        return None
    t = g["thickness_nm"]
    return (t >= th[0]) & (t <= th[1])


def _show_point(run_id: int, scan, point: tuple[int, int]) -> None:
    iy, ix = point
    st.subheader(f"Probe position iy={iy}, ix={ix}")
    row = D.prediction_at(run_id, iy, ix)
    c1, c2, c3 = st.columns([1.2, 1.2, 1])
    src = scan.get("source_file")
    with c1:
        if src and Path(str(src)).is_file():
            pat = D.pattern(str(src), iy, ix)
            log_scale = st.toggle("log intensity", value=False, key="em_log")
            fig = pattern_figure(pat, title="Diffraction pattern", log_scale=log_scale)
            fig.update_layout(height=360)
            st.plotly_chart(fig, config=png_config(f"pattern_{iy}_{ix}"), key="em_pattern")
        else:
            st.warning(f"The scan file is not available on this server ({src}); the pattern cannot be shown.")
    with c2:
        if len(row) and np.all(np.isfinite(row["probs"].iloc[0])):
            fig = probs_figure(row["probs"].iloc[0], title="Class probabilities")
            fig.update_layout(height=360)
            st.plotly_chart(fig, config=png_config(f"probs_{iy}_{ix}"), key="em_probs")
        else:
            st.info("This model stores no class probabilities.")
    with c3:
        if len(row):
            r = row.iloc[0]
            true = int(r["true_label"])
            st.metric("Predicted", CLASS_NAMES[int(r["pred"])])
            st.metric("True", CLASS_NAMES[true] if true >= 0 else "\u2014")
            st.metric("Confidence", f"{float(r['confidence']):.3f}")
            if np.isfinite(r["thickness_nm"]):
                st.caption(f"thickness {float(r['thickness_nm']):.1f} nm")
        else:
            st.info("No stored prediction at this position.")


with guard("The error-map page"):
    run_id = require_run(ctx)
    scan, model = ctx.scan, ctx.model
    g = D.grids(ctx.tok, run_id)
    ny, nx = g["ny"], g["nx"]
    cell = None if g["cell_px"] is None or not np.isfinite(g["cell_px"]) else float(g["cell_px"])
    region = ctx.filters.region
    mrow = D.run_metrics(ctx.tok, run_id, ctx.ft)
    c = st.columns(4)
    c[0].metric("Scan", str(scan["name"]), help=str(scan["dataset"]))
    c[1].metric("Model", str(model["name"]), help=f"Prediction layer: {state.LAYER_LABELS[ctx.layer]}")
    if mrow is not None and mrow["n_labelled"] > 0:
        c[2].metric("Accuracy (filtered)", f"{mrow['accuracy']:.3f}")
        c[3].metric("Labelled positions (filtered)", f"{int(mrow['n_labelled']):,}")
    else:
        c[2].metric("Accuracy (filtered)", "\u2014")
        c[3].metric("Positions (filtered)", f"{int(mrow['n_rows']) if mrow is not None else 0:,}")
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
        "Drag a box on the predicted-class map to set the region (the sidebar shows it; "
        "\u201cClear region\u201d "
        "resets it). Click a position on the confidence map to see its diffraction pattern and class "
        "probabilities. Camera icon on a chart: PNG."
    )

    point = st.session_state.get("em_point")
    if point is not None and (
        point[0] >= ny or point[1] >= nx or st.session_state.get("em_point_run") != run_id
    ):
        point = None
    tmask = _thickness_mask(g)
    left, right = st.columns(2)
    with left:
        fig = class_map_figure(g["pred"], title="Predicted class \u2014 drag a box to set the region")
        box_select_layout(fig)
        add_region_outline(fig, region)
        if point is not None:
            add_marker(fig, *point)
        fig.update_layout(height=MAP_H + 40, legend=dict(orientation="h", y=-0.18, font=dict(size=10)))
        event = st.plotly_chart(
            fig,
            on_select="rerun",
            selection_mode="box",
            key=f"em_class_{run_id}",
            config=png_config(f"class_map_{scan['name']}_{model['name']}"),
        )
        new_region = selection_to_region(event, ny, nx)
        if new_region is not None and new_region != region:
            state.set_region(new_region)
            st.rerun()
    with right:
        conf = np.array(g["confidence"], dtype=float)
        if tmask is not None:
            conf[~tmask] = np.nan
        fig = scalar_map_figure(
            conf,
            title="Confidence \u2014 click a position for its pattern",
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar_title="p",
        )
        add_click_grid(fig, ny, nx)
        add_region_outline(fig, region)
        if point is not None:
            add_marker(fig, *point)
        fig.update_layout(height=MAP_H + 40)
        event = st.plotly_chart(
            fig,
            on_select="rerun",
            selection_mode="points",
            key=f"em_conf_{run_id}",
            config=png_config(f"confidence_{scan['name']}_{model['name']}"),
        )
        new_point = selection_to_point(event, ny, nx)
        if new_point is not None and new_point != point:
            st.session_state["em_point"] = new_point
            st.session_state["em_point_run"] = run_id
            st.rerun()
    left, right = st.columns(2)
    with left:
        if bool(scan["has_ground_truth"]) and (g["true_label"] >= 0).any():
            fig = class_map_figure(g["true_label"], title="Ground truth")
            add_region_outline(fig, region)
            fig.update_layout(height=MAP_H + 40, legend=dict(orientation="h", y=-0.18, font=dict(size=10)))
            st.plotly_chart(fig, config=png_config(f"truth_{scan['name']}"), key="em_truth")
        else:
            st.info("This scan has no ground truth: no truth or error maps; see the confidence map.")
    with right:
        err = np.array(g["error"], dtype=float)
        if tmask is not None:
            err[~tmask] = np.nan
        if np.isfinite(err).any():
            fig = scalar_map_figure(
                err,
                title="Errors (1 = wrong)",
                colorscale=[[0, "#f5f5f5"], [1, "#c62828"]],
                zmin=0,
                zmax=1,
                colorbar_title="error",
            )
            add_region_outline(fig, region)
            fig.update_layout(height=MAP_H + 40)
            st.plotly_chart(fig, config=png_config(f"errors_{scan['name']}_{model['name']}"), key="em_err")

    if point is not None:
        with guard("The probe-position panel"):
            _show_point(run_id, scan, point)

    st.subheader("Do the errors repeat with the lattice?")
    if not (g["true_label"] >= 0).any():
        st.info("Periodic error analysis needs ground truth.")
    else:
        with guard("The periodic analysis"):
            crop = (ny, nx) if region is None else (region[1] - region[0] + 1, region[3] - region[2] + 1)
            if min(crop) < 8:
                st.info("The region is too small for a periodic analysis (at least 8\u00d78 positions).")
            else:
                pa = D.periodic_analysis(ctx.tok, run_id, cell, ctx.ft)
                res = pa["result"]
                if res is None:
                    st.info("No labelled positions pass the filters.")
                else:
                    m = st.columns(4)
                    m[0].metric(
                        "Error period [scan px]",
                        "\u2014" if res["period_px"] is None or not np.isfinite(res["period_px"]) else f"{res['period_px']:.2f}",
                        help="1/|k| of the strongest Fourier peak of the error map (\u2014: no errors)",
                    )
                    m[1].metric("Lattice period [scan px]", "\u2014" if cell is None else f"{cell:.2f}")
                    m[2].metric("Direction [deg]",
                                "\u2014" if res["angle_deg"] is None or not np.isfinite(res["angle_deg"]) else f"{res['angle_deg']:.0f}")
                    m[3].metric(
                        "Periodic part of the errors",
                        f"{res['periodic_fraction']:.0%}",
                        help="variance of the error map explained by the peak, its harmonics and "
                        "combinations",
                    )
                    if not res["significant"]:
                        st.caption(
                            "The strongest peak is not significant (1 % false-alarm level): the errors look "
                            "random rather than periodic."
                        )
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
                            st.caption(
                                "Error rate at each probe position inside the unit cell (all cells of the "
                                "scan folded onto one): positions on weakly scattering columns carry little "
                                "polarization signal."
                            )
                        else:
                            st.info("The scan has no lattice period (cell_px) stored: no unit-cell folding.")

    st.subheader("Wrong predictions (filtered)")
    errs = D.errors(ctx.tok, run_id, ctx.ft)
    scope = (
        "whole scan"
        if region is None
        else f"region rows {region[0]}\u2013{region[1]}, columns {region[2]}\u2013{region[3]}"
    )
    st.markdown(
        f"**{len(errs):,} wrong predictions** in the {scope}"
        + (
            ""
            if ctx.filters.thickness is None
            else f", thickness {ctx.filters.thickness[0]:g}\u2013{ctx.filters.thickness[1]:g} nm"
        )
    )
    show = errs.copy()
    for col in ("pred", "true_label"):
        show[col] = [CLASS_NAMES[int(v)] if 0 <= int(v) < 8 else "\u2014" for v in show[col]]
    st.dataframe(
        show,
        hide_index=True,
        width="stretch",
        key="em_errors_table",
        column_config={
            "confidence": st.column_config.NumberColumn(format="%.3f"),
            "irregularity": st.column_config.NumberColumn(format="%.3f"),
            "thickness_nm": st.column_config.NumberColumn("thickness [nm]", format="%.1f"),
        },
    )
    download_table(errs, f"errors_{scan['name']}_{model['name']}", key="dl_err")

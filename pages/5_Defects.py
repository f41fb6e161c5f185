"""Defects: irregularity map with the defect mask, ROC curve and AUC per model, ranked candidate regions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from polcore.analysis import precision_at_k
from polcore.figures import roc_figure, scalar_map_figure
from ui import data as D
from ui import download_table, guard, init_page, require_run, state
from ui.maps import add_region_outline, png_config

ctx = init_page("Defects", icon=":material/report:")
st.title("Defects")
st.caption(
    "Where are the defects? The irregularity score is high where a prediction does not fit the regular "
    "pattern (disagreement with neighbours beyond the lattice period, uncertain probabilities). Where the "
    "scan has a ground-truth defect mask, its outline is drawn and the ROC curve tells how well the score "
    "finds it."
)


def _period(scan) -> float | None:
    v = scan.get("cell_px")
    return None if v is None or pd.isna(v) else float(v)


def _use_candidate(y0: int, y1: int, x0: int, x1: int) -> None:
    state.set_region((y0, y1, x0, x1))


with guard("The defects page"):
    run_id = require_run(ctx)
    scan, model = ctx.scan, ctx.model
    period = _period(scan)
    res = D.defect_analysis(ctx.tok, run_id, period, ctx.ft)
    scored = np.isfinite(res["score"])
    n_def = int((res["mask"] & scored).sum())
    c = st.columns(3)
    c[0].metric("Defect positions (truth, filtered)", f"{n_def:,}" if res["has_mask"] else "no mask")
    c[1].metric(f"ROC-AUC ({model['name']})", f"{res['auc']:.3f}" if np.isfinite(res["auc"]) else "\u2014")
    if np.isfinite(res["auc"]):
        c[2].metric(
            f"Precision at k={n_def}",
            f"{precision_at_k(res['score'], res['mask'], n_def):.2f}",
            help="fraction of true defect positions among the k highest scores, k = number of defects",
        )
    if ctx.filters.thickness is not None or ctx.filters.region is not None:
        st.caption(f"Thickness / region filters applied: {res['n_scored']:,} positions scored.")
    left, right = st.columns([1.2, 1])
    cands = res["candidates"]
    with left:
        fig = scalar_map_figure(
            res["score"],
            title="Irregularity" + (" (white: defect mask)" if res["has_mask"] else ""),
            colorscale="Inferno",
            mask=res["mask"] if res["has_mask"] else None,
            colorbar_title="score",
        )
        for r in cands.head(5).itertuples():
            fig.add_shape(
                type="rect",
                x0=r.x0 - 0.5,
                x1=r.x1 + 0.5,
                y0=r.y0 - 0.5,
                y1=r.y1 + 0.5,
                line=dict(color="cyan", width=1.5),
            )
            fig.add_annotation(
                x=r.x1 + 0.5,
                y=r.y0 - 0.5,
                text=f"#{int(r.rank)}",
                showarrow=False,
                font=dict(color="cyan", size=11),
                xanchor="left",
                yanchor="bottom",
            )
        add_region_outline(fig, ctx.filters.region, color="white")
        fig.update_layout(height=500, legend=dict(orientation="h", y=-0.18))
        st.plotly_chart(fig, config=png_config(f"irregularity_{scan['name']}_{model['name']}"), key="def_map")
        if res["computed"]:
            st.caption("The store has no irregularity for this run: computed here from the predictions.")
    with right:
        if not res["has_mask"]:
            st.info("This scan has no defect mask: use the ranked candidate regions below.")
        else:
            runs = D.runs(ctx.tok)
            runs = runs[(runs["scan_id"] == int(scan["scan_id"])) & (runs["layer"] == ctx.layer)]
            fig, rows = None, []
            for r in runs.itertuples():
                rr = D.defect_analysis(ctx.tok, int(r.run_id), period, ctx.ft)
                if not np.isfinite(rr["auc"]):
                    continue
                k = int((rr["mask"] & np.isfinite(rr["score"])).sum())
                rows.append(
                    {
                        "model": r.model,
                        "auc": rr["auc"],
                        "precision_at_k": precision_at_k(rr["score"], rr["mask"], k),
                    }
                )
                if fig is None:
                    fig = roc_figure(rr["fpr"], rr["tpr"], rr["auc"], title="Defect ROC per model")
                    fig.data[0].name = f"{r.model} (AUC {rr['auc']:.3f})"
                else:
                    fig.add_trace(
                        go.Scatter(
                            x=rr["fpr"], y=rr["tpr"], mode="lines", name=f"{r.model} (AUC {rr['auc']:.3f})"
                        )
                    )
            if fig is not None:
                fig.update_layout(height=480, legend=dict(orientation="h", y=-0.2))
                st.plotly_chart(fig, config=png_config(f"defect_roc_{scan['name']}"), key="def_roc")
            if not rows:
                st.info("No defect position passes the filters.")
            aucs = pd.DataFrame(rows, columns=["model", "auc", "precision_at_k"]).sort_values(
                "auc", ascending=False
            )
            st.dataframe(
                aucs,
                hide_index=True,
                width="stretch",
                column_config={
                    "auc": st.column_config.NumberColumn("ROC-AUC", format="%.3f"),
                    "precision_at_k": st.column_config.NumberColumn("precision@k", format="%.2f"),
                },
            )

    st.subheader("Candidate regions (ranked)")
    if cands.empty:
        st.info("No connected region of high irregularity.")
    else:
        table = cands.copy()
        if res["has_mask"]:
            table["defect fraction"] = [
                float(res["mask"][int(r.y0) : int(r.y1) + 1, int(r.x0) : int(r.x1) + 1].mean())
                for r in cands.itertuples()
            ]
        int_cols = ["rank", "y0", "y1", "x0", "x1", "n_px"]
        table[int_cols] = table[int_cols].astype(int)
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={
                c: st.column_config.NumberColumn(format="%.3f")
                for c in ("mean_score", "max_score", "mass", "cy", "cx", "defect fraction")
            },
        )
        pick = st.selectbox("Candidate", list(table["rank"]), format_func=lambda k: f"#{k}", key="def_pick")
        r = table[table["rank"] == pick].iloc[0]
        st.button(
            "Use as region filter (then see it on the Error maps page)",
            key="def_use",
            on_click=_use_candidate,
            args=(int(r.y0), int(r.y1), int(r.x0), int(r.x1)),
        )
        download_table(table, f"defect_candidates_{scan['name']}_{model['name']}", key="dl_def")

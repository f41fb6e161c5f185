"""Embeddings: PCA/UMAP of synthetic and experimental(-like) patterns; domain gap per model."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from polcore.analysis import apply_filters
from polcore.figures import embedding_figure
from ui import data as D
from ui import download_table, guard, init_page, require_db
from ui.maps import png_config

ctx = init_page("Embeddings", icon=":material/scatter_plot:")
st.title("Embeddings and the domain gap")
st.caption(
    "How far are experimental-like patterns from the synthetic training data, in the eyes of each model? "
    "Each point is one probe position; synthetic and experimental(-like) scans share one embedding."
)
MAX_POINTS = 20000
COLOR_BY = {
    "source": "kind",
    "scan": "scan",
    "true class": "true_label",
    "predicted class": "pred",
    "thickness [nm]": "thickness_nm",
    "correct?": "correct",
}

with guard("The embeddings page"):
    require_db(ctx)
    c1, c2, c3 = st.columns(3)
    method = c1.radio("Method", ["pca", "umap"], horizontal=True, key="emb_method", format_func=str.upper)
    space = c2.radio(
        "Space",
        ["features", "input"],
        horizontal=True,
        key="emb_space",
        format_func={"features": "model features", "input": "preprocessed patterns"}.get,
    )
    color_label = c3.selectbox("Colour by", list(COLOR_BY), key="emb_color")
    model_id = None if ctx.model is None else int(ctx.model["model_id"])
    if space == "features" and model_id is None:
        st.info("Select a model in the sidebar.")
        st.stop()
    df = D.embeddings(ctx.tok, model_id, method, space)
    if df.empty:
        st.info(
            f"No stored {method.upper()} embedding of the {space} for "
            f"{'this model' if space == 'features' else 'the scans'}: the demo build computes them "
            "(`python -m polcore demo`); try the other method or space."
        )
    else:
        apply = st.toggle("Apply the sidebar's thickness / region filters", value=False, key="emb_apply")
        view = apply_filters(df, ctx.filters) if apply else df
        col = COLOR_BY[color_label]
        view = view.assign(correct=view["correct"].astype("object").where(view["correct"].notna(), "unknown"))
        if col == "pred":
            view = view[view["pred"].notna()].assign(pred=lambda d: d["pred"].astype(int))
        if col == "true_label":
            view = view.assign(true_label=view["true_label"].astype(int))
        shown = min(len(view), MAX_POINTS)
        title = (
            f"{method.upper()} of "
            f"{'features of ' + str(ctx.model['name']) if space == 'features' else 'inputs'}"
            f" \u2014 {shown:,} of {len(view):,} positions"
        )
        if len(view):
            fig = embedding_figure(
                view, color=col, title=title, max_points=MAX_POINTS, seed=0, hover=("scan", "iy", "ix")
            )
            fig.update_layout(height=560)
            st.plotly_chart(fig, config=png_config(f"embedding_{method}_{space}"), key="emb_fig")
            st.caption(f"WebGL scatter; at most {MAX_POINTS:,} points are drawn (seeded random subsample).")
        else:
            st.info("No positions pass the filters.")
        download_table(view, f"embedding_{method}_{space}", key="dl_emb")

    st.subheader("Domain gap per model")
    gaps = D.domain_gaps(ctx.tok)
    if gaps.empty:
        st.info("No domain-gap scores stored (the demo build computes them).")
    else:
        per_model = (
            gaps.groupby("model", sort=False)
            .agg(auc=("auc", "mean"), mmd=("mmd", "mean"), pairs=("auc", "size"))
            .reset_index()
        )
        per_model = per_model.sort_values("auc")
        sel = None if ctx.model is None else str(ctx.model["name"])
        colors = ["#3b6fb6" if m != sel else "#e65100" for m in per_model["model"]]
        fig = go.Figure(
            go.Bar(
                x=per_model["auc"],
                y=per_model["model"],
                orientation="h",
                marker_color=colors,
                text=[f"{v:.3f}" for v in per_model["auc"]],
                textposition="auto",
                hovertemplate="%{y}: AUC %{x:.3f}<extra></extra>",
            )
        )
        fig.add_vline(x=0.5, line_dash="dash", line_color="grey")
        fig.update_layout(
            xaxis=dict(
                title="two-sample AUC (0.5 = indistinguishable, 1 = fully separable)", range=[0.45, 1.0]
            ),
            height=max(250, 40 * len(per_model) + 100),
            margin=dict(l=160, r=20, t=20, b=50),
        )
        st.plotly_chart(fig, config=png_config("domain_gap"), key="gap_fig")
        st.caption(
            "A classifier tries to tell the model's features of synthetic patterns from those of "
            "experimental-like ones; the lower its AUC, the smaller the domain gap."
        )
        cols = ["model", "scan_a_name", "kind_a", "scan_b_name", "kind_b", "auc", "mmd", "n_a", "n_b"]
        table = gaps[[c for c in cols if c in gaps.columns]]
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            column_config={
                "auc": st.column_config.NumberColumn(format="%.3f"),
                "mmd": st.column_config.NumberColumn(format="%.4f"),
            },
        )
        download_table(table, "domain_gap", key="dl_gap")
        if np.isfinite(per_model["auc"]).any():
            best = per_model.iloc[0]
            st.success(f"Smallest domain gap: **{best['model']}** (AUC {best['auc']:.3f}).")

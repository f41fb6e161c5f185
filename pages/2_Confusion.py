"""Confusion: per-model normalised confusion matrices side by side, and the circular error histogram."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from polcore.analysis import CIRCULAR_ERROR_DEG
from polcore.figures import confusion_figure
from polcore.store.queries import confusion_matrix
from polcore.types import N_CLASSES, circular_class_distance
from ui import data as D
from ui import download_table, guard, init_page, require_db
from ui.maps import png_config

ctx = init_page("Confusion", icon=":material/grid_on:")
st.title("Confusion matrices")
st.caption(
    "Which directions get mixed up? Rows: true class, columns: predicted class, each row normalised to 1. "
    "Sidebar thickness and region filters apply."
)

_DIST = circular_class_distance(*np.meshgrid(np.arange(N_CLASSES), np.arange(N_CLASSES), indexing="ij"))


def _summary(cm: np.ndarray) -> dict:
    n = int(cm.sum())
    hist = np.bincount(_DIST.ravel(), weights=cm.ravel(), minlength=len(CIRCULAR_ERROR_DEG))
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    present = denom > 0
    f1 = float(np.mean(2 * tp[present] / denom[present])) if present.any() else float("nan")
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": f1,
        "mean_error_deg": float(np.dot(hist, CIRCULAR_ERROR_DEG) / n) if n else float("nan"),
        "hist": hist,
    }


with guard("The confusion page"):
    require_db(ctx)
    runs = D.runs(ctx.tok)
    runs = runs[runs["has_ground_truth"] & (runs["layer"] == ctx.layer)]
    scope_opts = ["data set", "scan"]
    scope = st.radio(
        "Scope",
        scope_opts,
        horizontal=True,
        key="conf_scope",
        help="All scans of the sidebar's data set, or only the selected scan.",
    )
    if scope == "scan":
        if ctx.scan is None:
            st.info("Select a scan in the sidebar.")
            st.stop()
        pool = runs[runs["scan_id"] == int(ctx.scan["scan_id"])]
        where = f"scan {ctx.scan['name']}"
    else:
        dataset = ctx.dataset or (None if ctx.scan is None else ctx.scan["dataset"])
        pool = runs if dataset is None else runs[runs["dataset"] == dataset]
        where = f"data set \u201c{dataset}\u201d" if dataset else "all data sets"
    if pool.empty:
        st.info(f"No runs with ground truth for {where}.")
        st.stop()
    names = list(dict.fromkeys(pool["model"]))
    default = list(dict.fromkeys(pool.drop_duplicates(["family", "head", "variant"])["model"]))[:4]
    chosen = st.multiselect(
        "Models",
        names,
        default=default,
        key="conf_models",
        help="One matrix per model (sums over the scans in scope).",
    )
    if not chosen:
        st.info("Choose at least one model.")
        st.stop()
    sel = pool[pool["model"].isin(chosen)]
    counts = D.confusion(ctx.tok, tuple(int(r) for r in sel["run_id"]), ctx.ft)
    st.markdown(f"**{where}** \u2014 {len(sel)} run(s)")
    ncol = 2 if len(chosen) <= 4 else 3
    cols = st.columns(ncol)
    rows, hists = [], {}
    for i, name in enumerate(chosen):
        ids = set(sel.loc[sel["model"] == name, "run_id"].astype(int))
        cm = confusion_matrix(counts[counts["run_id"].isin(ids)])
        s = _summary(cm)
        hists[name] = s["hist"]
        rows.append(
            {
                "model": name,
                "positions": s["n"],
                "accuracy": s["accuracy"],
                "macro_f1": s["macro_f1"],
                "mean angular error [deg]": s["mean_error_deg"],
            }
        )
        with cols[i % ncol]:
            if s["n"] == 0:
                st.info(f"{name}: no labelled positions pass the filters.")
                continue
            fig = confusion_figure(cm, title=f"{name} (acc {s['accuracy']:.3f}, n={s['n']})")
            fig.update_layout(height=430)
            st.plotly_chart(fig, config=png_config(f"confusion_{name}"), key=f"cm_{name}")

    st.subheader("How far off are the errors?")
    fig = go.Figure()
    labels = [f"{d}\u00b0" for d in CIRCULAR_ERROR_DEG]
    for name, h in hists.items():
        tot = h.sum()
        frac = h / tot if tot else np.zeros_like(h)
        fig.add_trace(
            go.Bar(
                name=name,
                x=labels,
                y=frac,
                customdata=h,
                hovertemplate=f"{name}<br>%{{x}}: %{{y:.2%}} (%{{customdata:.0f}})<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="group",
        yaxis=dict(title="fraction of positions", tickformat=".2~%", type="log"),
        xaxis_title="angular error",
        height=360,
        margin=dict(l=50, r=20, t=20, b=40),
    )
    st.plotly_chart(fig, config=png_config("circular_error"), key="circ_hist")
    st.caption(
        "Log scale: 0\u00b0 is correct; 45\u00b0 errors go to a neighbouring direction, 180\u00b0 to the "
        "opposite one (the sign of the polarization lost). Camera icon: PNG."
    )
    table = pd.DataFrame(rows)
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            **{c: st.column_config.NumberColumn(format="%.3f") for c in ("accuracy", "macro_f1")},
            "mean angular error [deg]": st.column_config.NumberColumn(format="%.1f"),
        },
    )
    long = counts.merge(sel[["run_id", "model", "scan"]], on="run_id")
    download_table(long, "confusion_counts", key="dl_conf")

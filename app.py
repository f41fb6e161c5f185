"""polbench dashboard: Overview page (entry point of `streamlit run app.py`).

Data sets, models, the headline comparison and what each page answers. Without a database it offers one
button that builds the demo database in a background thread with a progress bar.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui import data as D
from ui import guard, init_page, jobs
from ui.backend import build_demo
from ui.maps import png_config

ctx = init_page("Overview", icon=":material/insights:")

st.title("polbench \u2014 ML polarization mapping from 4D-STEM")
st.markdown(
    "Which machine-learning model reads the projected polarization of KNN (8 directions at 45\u00b0 steps) "
    "best from 4D-STEM diffraction patterns, where do its errors repeat with the lattice, and where are the "
    "defects? Every pattern's prediction is stored; the pages below slice them by data set, scan, model, "
    "thickness and region (sidebar). The URL keeps the filters, so a view can be shared in a meeting."
)


def _demo_section() -> None:
    st.subheader("No database yet")
    st.markdown(
        f"The database `{ctx.db}` does not exist. The demo uses the models shipped with the repository "
        "(`data/models/shipped`), composes the default scans from the committed pattern library, runs every "
        "model on every scan and computes the benchmark and the embeddings (about 5 minutes on a 2-core "
        "machine; `make run` does the same from a terminal)."
    )
    job = jobs.get_job(st.session_state.get("demo_job")) or jobs.find_running("demo")
    if job is not None:
        st.session_state["demo_job"] = job.job_id
    if job is not None and job.status == "running":
        jobs.job_progress(job.job_id)
        return
    if job is not None and job.status == "failed":
        st.error(f"Building the demo failed: {job.error}")
    if job is not None and job.status == "done":
        D.clear_caches()
        st.success(f"Demo database built in {job.elapsed:.0f} s.")
        st.session_state.pop("demo_job", None)
        st.rerun()
    if st.button("Build the demo database", type="primary", icon=":material/build:", key="b_build_demo"):
        new = jobs.start_job("demo", "Building the demo", build_demo, ctx.db)
        st.session_state["demo_job"] = new.job_id
        st.rerun()


def _overview() -> None:
    tok = ctx.tok
    scans, models, runs = ctx.scans, ctx.models, D.runs(tok)
    c = st.columns(4)
    c[0].metric("Data sets", scans["dataset"].nunique() if len(scans) else 0)
    c[1].metric("Scans", len(scans))
    c[2].metric("Models", len(models))
    pat = runs[runs["layer"] == "pattern"] if len(runs) else runs
    c[3].metric("Stored predictions", f"{int(pat['n_patterns'].sum()):,}" if len(pat) else "0")
    built = D.demo_summary(tok)
    if built:
        steps = ", ".join(f"{k.removesuffix('_s')} {built[k]:.0f} s" for k in ("train_s", "scans_s", "inference_s",
                                                                             "analysis_s") if k in built)
        st.caption(f"Demo database built in {built.get('total_s', 0):.0f} s ({steps}).")

    st.subheader("Headline: accuracy per data set")
    bench = D.bench(tok)
    if bench.empty:
        st.info("No benchmark rows yet (run `python -m polcore bench`). Per-run accuracies follow.")
        met = D.metrics(tok, ctx.ft)
        if len(met):
            st.dataframe(
                met[["model", "scan", "dataset", "accuracy", "macro_f1", "n_labelled"]],
                hide_index=True,
                width="stretch",
            )
    else:
        _headline(bench)

    left, right = st.columns(2)
    with left:
        st.markdown("**Data sets**")
        ds = (
            (
                scans.groupby("dataset", sort=False, dropna=False)
                .agg(kind=("kind", "first"), scans=("scan_id", "count"))
                .reset_index()
            )
            if len(scans)
            else pd.DataFrame()
        )
        if len(scans):
            pos = (scans["ny"] * scans["nx"]).groupby(scans["dataset"], sort=False).sum()
            ds["positions"] = ds["dataset"].map(pos).astype(int)
            th = scans.groupby("dataset", sort=False)["thickness_nm"].first()
            ds["thickness_nm"] = ds["dataset"].map(th)
        st.dataframe(ds, hide_index=True, width="stretch")
    with right:
        st.markdown("**Models**")
        cols = [
            c
            for c in (
                "name",
                "family",
                "head",
                "variant",
                "seed",
                "train_seconds",
                "patterns_per_s",
                "n_runs",
            )
            if c in models.columns
        ]
        st.dataframe(
            models[cols],
            hide_index=True,
            width="stretch",
            column_config={
                "train_seconds": st.column_config.NumberColumn("train [s]", format="%.0f"),
                "patterns_per_s": st.column_config.NumberColumn("patterns/s", format="%.0f"),
            },
        )


def _headline(bench: pd.DataFrame) -> None:
    models = [m for m in dict.fromkeys(bench["model"]) if m != "majority"] + (
        ["majority"] if (bench["model"] == "majority").any() else []
    )
    datasets = list(dict.fromkeys(bench["dataset"]))
    fig = go.Figure()
    for m in models:
        sub = bench[bench["model"] == m].set_index("dataset").reindex(datasets)
        fig.add_trace(
            go.Bar(
                name=m,
                x=datasets,
                y=sub["accuracy_mean"],
                marker_color="#9e9e9e" if m == "majority" else None,
                error_y=dict(type="data", array=sub["accuracy_std"].fillna(0).to_numpy(), visible=True),
                hovertemplate=f"{m}<br>%{{x}}<br>accuracy %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="group",
        yaxis=dict(title="accuracy (mean \u00b1 std over seeds)", range=[0, 1]),
        margin=dict(l=50, r=20, t=30, b=80),
        legend=dict(orientation="h", y=-0.25),
        height=380,
    )
    st.plotly_chart(fig, config=png_config("headline_accuracy"), key="headline")
    exp = bench[
        bench["dataset"].str.contains("experimental", case=False, na=False) & (bench["model"] != "majority")
    ]
    if len(exp):
        best = exp.loc[exp["accuracy_mean"].idxmax()]
        st.success(
            f"Best on experimental-like data: **{best['model']}**, accuracy "
            f"{best['accuracy_mean']:.3f} on \u201c{best['dataset']}\u201d."
        )
    real = bench[bench["model"] != "majority"]
    if len(real):
        per_ds = real.loc[
            real.groupby("dataset", sort=False)["accuracy_mean"].idxmax(),
            ["dataset", "model", "accuracy_mean", "macro_f1_mean"],
        ]
        maj = bench[bench["model"] == "majority"].set_index("dataset")["accuracy_mean"]
        per_ds["majority baseline"] = per_ds["dataset"].map(maj)
        st.dataframe(
            per_ds.rename(
                columns={"model": "best model", "accuracy_mean": "accuracy", "macro_f1_mean": "macro-F1"}
            ),
            hide_index=True,
            width="stretch",
            column_config={
                c: st.column_config.NumberColumn(format="%.3f")
                for c in ("accuracy", "macro-F1", "majority baseline")
            },
        )
    st.caption("Camera icon on any chart: download it as PNG. Tables: CSV/Parquet buttons on each page.")


def _guide() -> None:
    st.subheader("What each page answers")
    pages = [
        (
            "pages/1_Benchmark.py",
            "Benchmark",
            "Which model is best, per data set? Accuracy, macro-F1, per-class "
            "recall, speed and training time, mean \u00b1 std over seeds, against the majority class.",
        ),
        (
            "pages/2_Confusion.py",
            "Confusion",
            "Which directions get mixed up? Normalised confusion matrices side "
            "by side, and how far off (45\u00b0 \u2026 180\u00b0) the errors are.",
        ),
        (
            "pages/3_Error_maps.py",
            "Error maps",
            "Where are the errors on a scan, and do they repeat with the "
            "lattice? Class, truth, error and confidence maps, error spectrum, errors folded onto the "
            "unit cell; "
            "click a position for its pattern, drag a box to set the region.",
        ),
        (
            "pages/4_Embeddings.py",
            "Embeddings",
            "How far are experimental-like patterns from the synthetic "
            "training data? PCA/UMAP of features, domain-gap score per model.",
        ),
        (
            "pages/5_Defects.py",
            "Defects",
            "Where are the defects? Irregularity map with the defect mask, ROC and "
            "AUC per model, ranked candidate regions.",
        ),
        (
            "pages/6_Upload.py",
            "Upload",
            "Your own scan: upload it (or give a path under the data directory), pick "
            "models, and see its maps.",
        ),
    ]
    for path, label, text in pages:
        c1, c2 = st.columns([1, 4])
        if (Path(__file__).parent / path).is_file():
            c1.page_link(path, label=label)
        else:
            c1.markdown(f"**{label}**")
        c2.markdown(text)


with guard("The overview"):
    if not ctx.ready:
        _demo_section()
    else:
        _overview()
    _guide()

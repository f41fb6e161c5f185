"""polbench dashboard: Overview page (entry point of `streamlit run app.py`).

Data sets, models, the headline comparison and what each page answers. The demo database is built beside the
dashboard by its own process (``python -m polcore demo --if-needed``, started by ``make run`` or by the button
here; :mod:`polcore.demo`): this page follows its status file every :data:`BUILD_POLL_S` seconds (step, per
cent, time left) and reruns whenever the build reaches a new step, so the counts and tables fill in as the
scans land.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from polcore import demo as demo_build
from ui import data as D
from ui import guard, init_page
from ui.maps import png_config

#: Seconds between two reads of the demo build's status file.
BUILD_POLL_S = 1.5
#: After a click on the build button, seconds to wait for the new process's status file before offering the
#: button again.
START_GRACE_S = 20.0

ctx = init_page("Overview", icon=":material/insights:")

st.title("polbench \u2014 ML polarization mapping from 4D-STEM")
st.markdown(
    "Which machine-learning model reads the projected polarization of KNN (8 directions at 45\u00b0 steps) "
    "best from 4D-STEM diffraction patterns, where do its errors repeat with the lattice, and where are the "
    "defects? Every pattern's prediction is stored; the pages below slice them by data set, scan, model, "
    "thickness and region (sidebar). The URL keeps the filters, so a view can be shared in a meeting."
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2013"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _build_key(state: dict | None) -> tuple | None:
    """What makes the whole page rerun when it changes: the build's state and step."""
    return None if state is None else (state["state"], state.get("step"))


def _build_state() -> dict | None:
    state = demo_build.build_state(ctx.db)
    if state is not None and state["state"] == "done" and not ctx.ready:
        return None  # the database was removed after its build: offer a new one
    return state


def _progress_line(state: dict) -> str:
    pct = 100 * float(state.get("fraction") or 0.0)
    left = "estimating the time left" if state.get("eta_s") is None else f"about {_duration(state['eta_s'])} left"
    return f"Step {state.get('step', '')} \u00b7 {pct:.0f} % \u00b7 {_duration(state['elapsed_s'])} elapsed \u00b7 {left}"


def _start_build() -> None:
    demo_build.start_build_process(ctx.db)
    st.session_state["_demo_started"] = time.time()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and demo_build.build_state(ctx.db) is None:
        time.sleep(0.2)  # the new process writes its status within a second
    st.rerun()


def _build_poll() -> None:
    """Fragment: progress of a running build from its status file; rerun the page at each new step."""

    @st.fragment(run_every=BUILD_POLL_S)
    def _poll() -> None:
        state = _build_state()
        if _build_key(state) != st.session_state.get("_demo_seen"):
            st.rerun(scope="app")
        if state is not None and state["state"] == "running":
            st.progress(min(max(float(state.get("fraction") or 0.0), 0.0), 1.0), text=_progress_line(state))
            st.caption(f"{state.get('message', '')}")

    _poll()


def _demo_section(state: dict | None) -> None:
    """The demo build: its progress while it runs, what happened when it failed or died, else a button."""
    log = demo_build.log_path(ctx.db)
    if state is not None and state["state"] == "running":
        st.subheader("Building the demo database")
        _build_poll()
        st.caption(
            f"A separate process (pid {state.get('pid')}) builds it from the models shipped with the repository: "
            "no training. The pages show what is stored already and fill in as each scan lands; the benchmark "
            f"table and the embeddings come last. Its log: `{log}`."
        )
        return
    if state is not None and state["state"] in ("failed", "died"):
        pct = 100 * float(state.get("fraction") or 0.0)
        if state["state"] == "failed":
            st.error(f"The demo build failed at {pct:.0f} % ({state.get('step')}): {state.get('error')}")
        else:
            st.warning(f"The demo build stopped at {pct:.0f} % ({state.get('step')}): its process "
                       f"(pid {state.get('pid')}) is gone. Restarting resumes it: finished steps are kept.")
        st.caption(f"Log: `{log}`.")
        if st.button("Restart the demo build", type="primary", icon=":material/restart_alt:",
                     key="b_restart_demo"):
            _start_build()
        _build_poll()  # a build started elsewhere (`make run`) shows up by itself
        return
    st.subheader("No database yet")
    st.markdown(
        f"The database `{ctx.db}` does not exist. The demo uses the models shipped with the repository "
        "(`data/models/shipped`, no training), composes the default scans from the committed pattern library, "
        "runs every model on every scan and computes the benchmark and the embeddings (about 5 minutes on a "
        "2-core machine). `make run` starts it by itself beside the dashboard; here, one button does."
    )
    started = st.session_state.get("_demo_started")
    if started is not None and time.time() - started < START_GRACE_S:
        st.info("Starting the build \u2026")
    elif st.button("Build the demo database", type="primary", icon=":material/build:", key="b_build_demo"):
        _start_build()
    _build_poll()


def _overview(building: bool = False) -> None:
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
        if building:
            st.info("The benchmark table comes when every scan is in (the demo build is running). Per-run "
                    "accuracies of the scans stored so far follow.")
        else:
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
    build = _build_state()
    st.session_state["_demo_seen"] = _build_key(build)
    if build is not None:
        st.session_state.pop("_demo_started", None)
    if (build is not None and build["state"] != "done") or not ctx.ready:
        _demo_section(build)
    if ctx.ready:
        _overview(building=build is not None and build["state"] == "running")
    _guide()

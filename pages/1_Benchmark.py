"""Benchmark: the study's comparison table (rows = data sets, columns = family x head), sortable, CSV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from polcore import settings
from polcore.types import CLASS_NAMES
from ui import data as D
from ui import download_table, guard, init_page, require_db

ctx = init_page("Benchmark", icon=":material/leaderboard:")
st.title("Benchmark")
st.caption(
    "Which model is best on which data set? Scores are mean \u00b1 std over training seeds; the majority "
    "row always predicts the most frequent true class of the data set."
)


@st.cache_data(show_spinner=False, max_entries=4)
def _provenance(folder: str, stamp: tuple) -> pd.DataFrame:
    """One row per trained checkpoint in ``folder`` from its JSON sidecar (``stamp``: names and mtimes, the cache
    key); the untrained CoM-direction baseline has no training provenance and is left out."""
    from polcore.ingest import available_models
    from polcore.models import UNTRAINED_FAMILIES, read_checkpoint_meta

    rows = []
    for name, path in sorted(available_models(folder).items()):
        meta = read_checkpoint_meta(path)
        if meta.get("family") in UNTRAINED_FAMILIES:
            continue
        cfg = meta.get("train_config") or {}
        ver = meta.get("versions") or {}
        ho = pd.DataFrame(meta.get("heldout") or [])
        if len(ho) and "dose" in ho:
            ho = ho[np.isclose(ho["dose"].astype(float), float(cfg.get("eval_dose") or 2e4))]
        role = cfg.get("eval_role", "test")
        ths = (f"{ho['thickness_nm'].min():g}\u2013{ho['thickness_nm'].max():g} nm" if len(ho) > 1
               else f"{ho['thickness_nm'].iloc[0]:g} nm" if len(ho) else "")
        if cfg.get("family") == "pca_knn":
            recipe = f"fit on {cfg.get('n_fit_patterns', 0):,} patterns"
        else:
            warm = cfg.get("warmup_steps") or 0
            recipe = f"{cfg.get('steps') or 0:,} steps" + (f" + {warm:,} warm-up" if warm else "")
            recipe += f", batch {cfg.get('batch_size')}, lr {cfg.get('lr'):g}"
        per_pattern = float(ho["per_pattern"].mean()) if len(ho) else np.nan
        per_cell = float(ho["per_cell"].mean()) if len(ho) and "per_cell" in ho else np.nan
        rows.append({
            "model": name,
            "training library sha256": str(meta.get("library_sha256") or "")[:12],
            "data": f"{meta.get('library_kind', cfg.get('data', ''))}, roles {'+'.join(cfg.get('train_roles') or [])}",
            "recipe": recipe,
            "steps run": f"{meta.get('steps_run', 0):,}",
            "seed": str(cfg.get("seed", meta.get("seed"))),
            "train time": f"{float(meta.get('train_seconds') or np.nan) / 60:.1f} min",
            "versions": ", ".join(f"{k} {ver[k]}" for k in ("polcore", "torch", "numpy", "scikit-learn") if k in ver),
            "held-out set": f"{role} draws, {ths}, {float(cfg.get('eval_dose') or 2e4):g} e\u207b/pattern",
            "held-out accuracy": f"{per_pattern:.3f} per pattern, {per_cell:.3f} per cell",
        })
    return pd.DataFrame(rows).set_index("model").T if rows else pd.DataFrame()


def _provenance_section() -> None:
    """The shipped checkpoints' provenance, from their JSON sidecars (nothing is loaded)."""
    folder = settings.shipped_models_dir()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json"))) if folder.is_dir() else ()
    if not stamp:
        return
    prov = _provenance(str(folder), stamp)
    if prov.empty:
        return
    with st.expander(f"Provenance of the {prov.shape[1]} shipped models (`data/models/shipped`)"):
        st.caption(
            "Read from each checkpoint's JSON sidecar: the training library's sha256 (first 12 hex digits), the "
            "recipe (`python -m polcore train --profile default` retrains exactly these), steps run, seed, "
            "training time, package versions, and the held-out accuracy stored at training time (mean over the "
            "held-out thicknesses; per cell = 64 probe positions pooled)."
        )
        st.table(prov)


def _heldout_section() -> None:
    """Held-out draws: per pattern and per unit cell by thickness, the models beside the physics limit."""
    ho = D.heldout(ctx.tok)
    if ho.empty:
        return
    st.subheader("Held-out simulations, beside the physics limit")
    st.caption(
        "Independent test draws of the training library (their own tilt, defocus, convergence, Nb displacement, "
        "disorder and phonons), Poisson noise at the chosen dose. **Per unit cell**: the class log-probabilities "
        "of the 64 probe positions of a cell summed. **Limit**: the ideal observer (maximum likelihood against "
        "noise-free templates, probe position known) with every nuisance known, or with the nuisances "
        "marginalised over the training draws."
    )
    c1, c2, c3 = st.columns(3)
    roles = list(dict.fromkeys(ho["role"]))
    role = c1.selectbox("Held-out set", roles, key="ho_role",
                        format_func={"test": "test draws (all nuisances)",
                                     "ideal_test": "ideal draws (zero tilt, nominal)"}.get)
    sub = ho[ho["role"] == role]
    doses = sorted(sub["dose"].dropna().unique().tolist())
    dose = c2.selectbox("Dose [e-/pattern]", doses, index=doses.index(2e4) if 2e4 in doses else 0,
                        key="ho_dose", format_func=lambda v: f"{v:g}")
    value = c3.radio("Accuracy", ["per_cell", "per_pattern"], horizontal=True, key="ho_value",
                     format_func={"per_cell": "per unit cell", "per_pattern": "per pattern"}.get)
    sub = sub[sub["dose"] == dose]
    if sub.empty:
        st.info("No held-out rows at this dose.")
        return
    piv = sub.pivot_table(index=["kind", "name"], columns="thickness_nm", values=value).sort_index(
        level=0, ascending=False)
    piv.columns = [f"{t:g} nm" for t in piv.columns]
    piv = piv.reset_index(level=0, drop=True)
    st.dataframe(piv.style.format("{:.3f}", na_rep="–"), width="stretch")
    download_table(sub, "heldout", key="dl_heldout")


with guard("The shipped models' provenance"):
    _provenance_section()

with guard("The benchmark page"):
    require_db(ctx)
    _heldout_section()
    bench = D.bench(ctx.tok)
    if bench.empty:
        st.info("The benchmark table is empty: run `python -m polcore bench` (or build the demo).")
        st.stop()
    from polcore.store.queries import pivot_benchmark

    metric = st.radio(
        "Metric",
        ["accuracy", "macro_f1"],
        horizontal=True,
        key="bench_metric",
        format_func={"accuracy": "accuracy", "macro_f1": "macro-F1"}.get,
    )
    st.subheader("The study's table")
    pivot = pivot_benchmark(bench, metric)
    best = pivot_benchmark(bench, metric, text=False)
    st.dataframe(pivot, width="stretch")
    winners = best.drop(columns=["majority"], errors="ignore").idxmax(axis=1)
    st.caption(
        "Best per data set: " + "; ".join(f"{d}: **{m}**" for d, m in winners.items() if isinstance(m, str))
    )

    st.subheader("All scores (click a column header to sort)")
    detail = bench.copy()
    if ctx.dataset is not None:
        detail = detail[detail["dataset"] == ctx.dataset]
        st.caption(f"Data set from the sidebar: {ctx.dataset}.")
    rec = (
        np.stack(
            [
                np.asarray(r, float) if r is not None else np.full(8, np.nan)
                for r in detail["per_class_recall"]
            ]
        )
        if len(detail)
        else np.zeros((0, 8))
    )
    for k, name in enumerate(CLASS_NAMES):
        detail[f"recall {name}"] = rec[:, k] if len(detail) else []
    detail = detail.drop(columns=["per_class_recall", "majority_class"])
    first = [
        "dataset",
        "model",
        "n_seeds",
        "accuracy_mean",
        "accuracy_std",
        "macro_f1_mean",
        "macro_f1_std",
        "patterns_per_s",
        "train_seconds",
    ]
    detail = detail[first + [c for c in detail.columns if c not in first]]
    num = {
        c: st.column_config.NumberColumn(format="%.3f")
        for c in detail.columns
        if c.startswith(("accuracy", "macro_f1", "recall"))
    }
    num["patterns_per_s"] = st.column_config.NumberColumn("speed [patterns/s]", format="%.0f")
    num["train_seconds"] = st.column_config.NumberColumn("train time [s]", format="%.0f")
    st.dataframe(detail, hide_index=True, width="stretch", column_config=num)
    download_table(detail, "benchmark", key="dl_bench")

    if ctx.filters.thickness is not None or ctx.filters.region is not None:
        st.subheader("With the sidebar's thickness / region filters")
        st.caption("Recomputed from the stored predictions of every run (region applies to every scan).")
        ft = D.filtered_bench(ctx.tok, ctx.ft, ctx.layer)
        if ft.empty:
            st.info("No labelled positions pass the filters.")
        else:
            ft = ft[["dataset", "model", "n_seeds", "n_patterns", "accuracy_mean", "accuracy_std", "macro_f1_mean",
                     "macro_f1_std"]].rename(columns={"n_patterns": "n_labelled (max over seeds)"})
            st.dataframe(
                ft,
                hide_index=True,
                width="stretch",
                column_config={
                    c: st.column_config.NumberColumn(format="%.3f")
                    for c in ft.columns
                    if c.startswith(("accuracy", "macro_f1"))
                },
            )

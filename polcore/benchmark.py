"""The study's benchmark: accuracy of every model on every data set with ground truth, from the stored runs.

Rows are data sets (synthetic at the training thickness, other thicknesses and cell sizes, experimental-like
scans; a unit-cell layer's data set carries ``queries.CELL_SUFFIX``), columns are models; stored in DuckDB
(table ``bench``). ``queries.benchmark_table`` adds the majority-class baseline and the mean ± std over seeds.
The classical centre-of-mass baseline (``com_direction``, :mod:`polcore.models.com_direction`: no training) is
ingested like any model, so it has its own rows here beside the networks and the majority class.
The held-out draw benchmark and the physics limit live in :mod:`polcore.heldout`.
"""

from __future__ import annotations

import pandas as pd

from polcore import settings

__all__ = ["run_bench", "training_table"]


def run_bench(db_path=None) -> pd.DataFrame:
    """Score every finished run on a scan with ground truth and store the rows; returns the tidy frame (one row
    per model x data set)."""
    from polcore.analysis import accuracy, macro_f1, per_class_recall
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db_path or settings.db_path())
    runs = queries.scored_runs(store)
    rows = []
    for (mid, name, fam, head, var, seed, ds), g in runs.groupby(
        ["model_id", "model_name", "family", "head", "variant", "seed", "dataset"], dropna=False
    ):
        p = queries.labelled_predictions(store, g["run_id"])
        if p.empty:
            continue
        yt, yp = p["true_label"].to_numpy(), p["pred"].to_numpy()
        rows.append(dict(model_id=int(mid), model_name=name, family=fam, head=head, variant=var or "",
                         seed=None if pd.isna(seed) else int(seed), dataset=ds, accuracy=accuracy(yt, yp),
                         macro_f1=macro_f1(yt, yp), per_class_recall=list(per_class_recall(yt, yp)), n=len(p)))
    df = pd.DataFrame(rows)
    if not df.empty:
        store.write_bench(df)
    return df


def training_table(db_path=None) -> pd.DataFrame:
    """Per stored model: held-out accuracy at the training thickness and at other thicknesses (from the
    checkpoint's training result), mean accuracy on the experimental-like scans (stored runs), train seconds."""
    from polcore.models import read_checkpoint_meta
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db_path or settings.db_path())
    exp = queries.mean_accuracy_by_model(store, "pseudo_experimental")
    rows = []
    for m in queries.list_models(store).itertuples():
        try:
            meta = read_checkpoint_meta(m.checkpoint_path)
        except (OSError, ValueError):
            meta = {}
        res = meta.get("train_result") or {}
        by_t = res.get("test_acc_by_thickness") or {}
        train_t = (res.get("config") or {}).get("train_thickness_nm") or [20.0]
        t0 = f"{float(train_t[0]):g}"
        if not res and meta.get("heldout"):  # an untrained baseline: its held-out rows, no training thickness
            by_t = {f"{float(r['thickness_nm']):g}": float(r["per_pattern"]) for r in meta["heldout"]
                    if r.get("role", "test") == "test"}
            t0 = None
        other = {k: v for k, v in by_t.items() if k != t0}
        rows.append(dict(
            model=m.name, family=m.family, head=m.head, n_train=res.get("n_train"),
            heldout_train_thickness=by_t.get(t0),
            other_thickness=", ".join(f"{k} nm: {v:.3f}" for k, v in other.items()),
            experimental_like=exp.get(m.name), train_seconds=m.train_seconds,
        ))
    return pd.DataFrame(rows)

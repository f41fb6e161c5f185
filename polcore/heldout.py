"""The held-out benchmark on the draw library: the physics limit, the curve against the number of draws, and
the models' held-out rows, into DuckDB (table ``heldout``) and CSV files under ``docs/results/``.

Commands (``polcore.cli``)::

    python -m polcore bench --limit          # ideal observer, nuisances known / unknown, 3 doses, every thickness
    python -m polcore bench --draw-curve     # nuisance-unknown accuracy against the number of training draws
    python -m polcore bench --heldout        # the held-out rows of every draw-trained checkpoint

The CSV files are committed so that a fresh clone (which has no draw library) still shows the limit beside the
shipped models: ``load_results`` reads them into a store.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["RESULTS_DIR", "run_limit", "run_draw_curve", "model_heldout_rows", "load_results", "LIMIT_NAMES"]

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"
LIMIT_NAMES = {"known": "limit: nuisances known", "unknown": "limit: nuisances unknown",
               "unknown_pos": "limit: nuisances and probe position unknown"}


def _limit_rows(df: pd.DataFrame, sha: str) -> pd.DataFrame:
    out = df.copy()
    out["name"] = [LIMIT_NAMES[v] + ("" if b == 1 else f" ({b}x{b} binned)")
                   for v, b in zip(out["version"], out["bin_px"])]
    out["kind"] = "limit"
    out["library_sha256"] = sha
    return out[["name", "kind", "role", "dose", "thickness_nm", "per_pattern", "per_cell", "library_sha256"]]


def run_limit(draws=None, db_path=None, out_dir=RESULTS_DIR, progress=None) -> pd.DataFrame:
    """Ideal observer on the held-out draws (``test`` against ``train``; ``ideal_test`` against
    ``ideal_train``), at every thickness and dose; written to ``out_dir/limit.csv`` and the store."""
    from polcore.evaluate import DOSES, ideal_observer
    from polcore.simulate.draws import load_draws

    lib = load_draws(draws)
    parts = []
    # the nuisance-unknown observer marginalises over finitely many training draws, so it is a lower bound of
    # the true limit; it is run at full resolution and 4 x 4 binned, and the higher is the tighter bound
    for role, train_role in (("test", "train"), ("ideal_test", "ideal_train")):
        if not (lib.n_draws(role) and lib.n_draws(train_role)):
            continue
        parts.append(ideal_observer(lib, role=role, train_role=train_role, doses=DOSES))
        parts.append(ideal_observer(lib, role=role, train_role=train_role, doses=DOSES, versions=("unknown",),
                                    bin_px=4))
        # the limit of a classifier that sees one pattern and nothing else (no probe position): at 2e4 only,
        # 4 x 4 binned (the full-resolution version costs 16x more and scored lower for 'unknown')
        parts.append(ideal_observer(lib, role=role, train_role=train_role, doses=(2e4,), versions=("unknown_pos",),
                                    bin_px=4))
        if progress:
            progress(0.5 if role == "test" else 1.0, f"limit on {role} draws done")
    if not parts:
        raise ValueError(f"{lib.path}: the limit needs 'test' and 'train' draws")
    df = _limit_rows(pd.concat(parts, ignore_index=True), lib.sha256)
    _save(df, out_dir, "limit.csv", db_path)
    return df


def run_draw_curve(draws=None, out_dir=RESULTS_DIR, dose: float = 2e4) -> pd.DataFrame:
    """Nuisance-unknown ideal-observer accuracy against the number of training draws; CSV and PNG."""
    from polcore.evaluate import draw_count_curve
    from polcore.simulate.draws import load_draws

    lib = load_draws(draws, roles=("train", "test"))
    df = draw_count_curve(lib, dose=dose)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "draw_curve.csv", index=False)
    _curve_figure(df, out_dir / "draw_curve.png", dose)
    return df


def _curve_figure(df: pd.DataFrame, path: Path, dose: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, col, title in ((axes[0], "per_pattern", "per pattern"), (axes[1], "per_cell", "per unit cell")):
        for i, (t, g) in enumerate(df.groupby("thickness_nm")):
            ax.semilogx(g["n_train_draws"], g[col], "o-", color=f"C{i}", label=f"{t:g} nm")
        ax.set_xlabel("training draws marginalised over")
        ax.set_title(f"{title}, {dose:g} e-/pattern")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nuisance-unknown ideal observer accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def model_heldout_rows(model_dirs) -> pd.DataFrame:
    """Held-out rows stored in the metadata of every draw-trained checkpoint under ``model_dirs`` (a model found
    in several folders, e.g. shipped and the training folder, counts once: the first folder's)."""
    from polcore.ingest import checkpoints
    from polcore.models import read_checkpoint_meta
    from polcore.naming import model_name

    rows = []
    for d in np.atleast_1d(model_dirs):
        for p in checkpoints(Path(d)):
            meta = read_checkpoint_meta(p)
            for r in meta.get("heldout") or []:
                rows.append(dict(name=model_name(meta), kind="model", role=r["role"], dose=r["dose"],
                                 thickness_nm=r["thickness_nm"], per_pattern=r["per_pattern"],
                                 per_cell=r["per_cell"], library_sha256=meta.get("library_sha256", "")))
    cols = ["name", "kind", "role", "dose", "thickness_nm", "per_pattern", "per_cell", "library_sha256"]
    df = pd.DataFrame(rows, columns=cols)
    return df.drop_duplicates(["name", "role", "dose", "thickness_nm"], keep="first").reset_index(drop=True)


def _save(df: pd.DataFrame, out_dir, name: str, db_path) -> None:
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        df.to_csv(out_dir / name, index=False)
    if db_path is not None and len(df):
        from polcore.store import PredictionStore

        PredictionStore(db_path).write_heldout(df)


def load_results(db_path, model_dirs=(), results_dir=RESULTS_DIR) -> int:
    """Load the committed limit rows (``results_dir/limit.csv``) and the checkpoints' held-out rows into
    the store; returns the number of rows written."""
    from polcore.store import PredictionStore

    parts = []
    f = Path(results_dir) / "limit.csv"
    if f.exists():
        parts.append(pd.read_csv(f))
    if len(model_dirs):
        parts.append(model_heldout_rows(model_dirs))
    parts = [p for p in parts if len(p)]
    if not parts:
        return 0
    df = pd.concat(parts, ignore_index=True)
    df["library_sha256"] = df["library_sha256"].fillna("").astype(str)
    return PredictionStore(db_path).write_heldout(df)

"""Markdown tables of the held-out results for the README, from the CSV files that
``python -m polcore bench --limit --draw-curve --heldout`` writes to docs/results/.

Usage: ``.venv/bin/python docs/make_results_tables.py`` (prints Markdown).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
THICK = (5.0, 10.0, 20.0, 35.0, 50.0, 60.0)


def _table(df: pd.DataFrame, value: str, thick=THICK) -> str:
    piv = df.pivot_table(index="name", columns="thickness_nm", values=value, sort=False)
    cols = [t for t in thick if t in piv.columns]
    head = "| | " + " | ".join(f"{t:g} nm" for t in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    rows = [f"| {n} | " + " | ".join(f"{piv.loc[n, t]:.3f}" for t in cols) + " |" for n in piv.index]
    return "\n".join([head, sep, *rows])


def seed_table(mod: pd.DataFrame, value: str, thick=THICK) -> str:
    """Mean +- std over seeds of each recipe (run names equal but for ``-s<seed>``) with more than one seed."""
    sub = mod[(mod["role"] == "test") & (mod["dose"] == 2e4)].copy()
    sub["recipe"] = sub["name"].map(lambda n: re.sub(r"-s\d+", "-s*", n))
    sub["seed"] = sub["name"].map(lambda n: (re.search(r"-s(\d+)", n) or [None, ""])[1])
    rows = []
    for recipe, g in sub.groupby("recipe", sort=False):
        seeds = sorted(g["seed"].unique())
        if len(seeds) < 2:
            continue
        piv = g.pivot_table(index="seed", columns="thickness_nm", values=value)
        cells = [f"{piv[t].mean():.3f} ± {piv[t].std(ddof=1):.3f}" for t in thick if t in piv.columns]
        rows.append(f"| {recipe} ({len(seeds)} seeds: {', '.join(seeds)}) | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    cols = [t for t in thick if t in sub["thickness_nm"].unique()]
    head = "| recipe | " + " | ".join(f"{t:g} nm" for t in cols) + " |"
    return "\n".join([head, "|---" * (len(cols) + 1) + "|", *rows])


def main() -> None:
    parts = []
    lim = pd.read_csv(RESULTS / "limit.csv") if (RESULTS / "limit.csv").exists() else pd.DataFrame()
    mod = pd.read_csv(RESULTS / "models_heldout.csv") if (RESULTS / "models_heldout.csv").exists() else pd.DataFrame()
    both = pd.concat([mod, lim], ignore_index=True)
    for role, title in (("test", "test draws"), ("ideal_test", "ideal draws")):
        sub = both[(both["role"] == role) & (both["dose"] == 2e4)]
        if sub.empty:
            continue
        for value in ("per_cell", "per_pattern"):
            parts.append(f"**{title}, {value.replace('_', ' ')}, 2e4 e-/pattern**\n\n" + _table(sub, value))
    if len(mod):
        for value in ("per_pattern", "per_cell"):
            t = seed_table(mod, value)
            if t:
                parts.append(f"**mean ± std over seeds, {value.replace('_', ' ')}, test draws, 2e4 e-/pattern**\n\n" + t)
    for dose in (5e3, 1e5):
        sub = lim[(lim["role"] == "test") & (lim["dose"] == dose)]
        if len(sub):
            parts.append(f"**limit on test draws at {dose:g} e-/pattern, per pattern**\n\n" + _table(sub, "per_pattern"))
    f = RESULTS / "draw_curve.csv"
    if f.exists():
        cur = pd.read_csv(f)
        for value in ("per_pattern", "per_cell"):
            piv = cur.pivot_table(index="n_train_draws", columns="thickness_nm", values=value)
            head = "| draws | " + " | ".join(f"{t:g} nm" for t in piv.columns) + " |"
            sep = "|---" * (len(piv.columns) + 1) + "|"
            rows = [f"| {int(n)} | " + " | ".join(f"{v:.3f}" for v in piv.loc[n]) + " |" for n in piv.index]
            parts.append(f"**draw curve, {value.replace('_', ' ')}**\n\n" + "\n".join([head, sep, *rows]))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()

"""Held-out accuracy of the classical CoM-direction baseline on the draw library, and its checkpoint.

The baseline (:mod:`polcore.models.com_direction`) has nothing to train: its sign (CoM along P) comes from
physics, never from these data. This script scores it exactly as the networks are scored in their checkpoints
(:func:`polcore.evaluate.evaluate_model`: the 'test' draws at 2e4 electrons per pattern, every thickness, per
pattern and per unit cell of 8 x 8 positions) and, with ``--out``, writes its checkpoint with those rows in the
metadata (the shipped one lives in ``data/models/shipped``).

A diagnostic (``--diagnose``) prints, per thickness, the mean projection of the cell-averaged CoM shift on the
true polarization direction and its spread, on the TRAINING draws (it informs, it fixes nothing).

Usage::

    python -m benchmarks.com_baseline                        # score (about a minute on 2 loaded cores)
    python -m benchmarks.com_baseline --out data/models/shipped
    python -m benchmarks.com_baseline --diagnose
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _diagnose(draws, n_draws: int = 8, dose: float = 2e4) -> None:
    from polcore.evaluate import heldout_counts
    from polcore.models.com_direction import ComDirectionModel, class_directions
    from polcore.preprocess import minmax
    from polcore.simulate.draws import load_draws

    lib = load_draws(draws, roles=("train",), max_draws={"train": n_draws})
    u = class_directions()
    model = ComDirectionModel()
    print(f"training draws ({lib.n_draws('train')}), {dose:g} e-/pattern: cell-averaged CoM [px] projected on the "
          "true direction, and the histogram of (cell prediction - truth) mod 8")
    for t in lib.thickness_nm["train"]:
        counts, _ = heldout_counts(lib, "train", float(t), dose, seed=5)
        D, C, N, _, K, _ = counts.shape
        c = model.com(minmax(counts.reshape(-1, K, K))).reshape(D, C, N * N, 2).mean(axis=2)  # (D, C, 2)
        proj = np.einsum("dcj,cj->dc", c, u)
        off = np.mod((c @ u.T).argmax(-1) - np.arange(C)[None], 8)
        hist = np.bincount(off.ravel(), minlength=8)
        print(f"  {t:4.0f} nm: |cell CoM| median {np.median(np.hypot(c[..., 0], c[..., 1])):.3f}, projection on P "
              f"mean {proj.mean():+.4f} (std {proj.std():.4f}), offsets {hist.tolist()}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=Path, default=None, help="draw library (default ~/.cache/polbench/draws/train)")
    p.add_argument("--out", type=Path, default=None, help="write the checkpoint into this folder")
    p.add_argument("--dose", type=float, default=2e4)
    p.add_argument("--diagnose", action="store_true", help="the CoM projection on the training draws")
    args = p.parse_args(argv)
    import pandas as pd

    from polcore.evaluate import evaluate_model
    from polcore.models.com_direction import ComDirectionModel, make_checkpoint
    from polcore.simulate.draws import load_draws

    if args.diagnose:
        _diagnose(args.draws, dose=args.dose)
        return 0
    t0 = time.perf_counter()
    lib = load_draws(args.draws, roles=("train", "test"), max_draws={"train": 1})  # train: the preprocessing fit
    if args.out is not None:
        path, df = make_checkpoint(args.out, lib, dose=args.dose)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    else:
        df = evaluate_model(ComDirectionModel(), lib, role="test", dose=args.dose, seed=0)
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(f"CoM direction (sign +1: CoM along P), {lib.n_draws('test')} test draws, {args.dose:g} e-/pattern, "
              f"chance = 0.125:")
        print(df[["thickness_nm", "per_pattern", "per_cell", "n_patterns", "n_cells"]].to_string(index=False))
        print(f"mean over thicknesses: per pattern {df['per_pattern'].mean():.3f}, per cell {df['per_cell'].mean():.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

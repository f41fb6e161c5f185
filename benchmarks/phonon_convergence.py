"""How many frozen-phonon snapshots does a library pattern need? (issue 10, docs/phonon_convergence.*)

Simulates ``--snapshots`` single-snapshot multislice runs (independent phonon seeds) of one KNN structure (RU,
nominal parameters, zero tilt) and of its reversed polarization (LD, the same seeds), on the draw library's
grid, then measures at each probe position and thickness:

* ``doubling``: the normalised L2 change of the S-snapshot average when S doubles (first S vs first 2S);
* ``pair``: the normalised L2 difference of two disjoint S-snapshot averages (what two library draws of the
  same structure differ by);
* ``signal``: P against -P, both averaged over all snapshots;
* ``shot``: the Poisson noise of one pattern at ``--dose`` electrons, for scale.

normalised L2 d(a, b) = ||a - b|| / ||(a + b) / 2|| per pattern; the tables give the mean over the probe
positions and the value at the Nb-O column position. Run: ``python -m benchmarks.phonon_convergence``.
Cost: about 2 x snapshots x 4 s on one core of the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def nl2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised L2 difference over the last two axes."""
    num = np.sqrt(((a - b) ** 2).sum(axis=(-2, -1)))
    den = np.sqrt((((a + b) / 2) ** 2).sum(axis=(-2, -1)))
    return num / np.maximum(den, 1e-30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=16)
    ap.add_argument("--thickness", type=float, nargs="+", default=[10.0, 20.0, 35.0, 50.0])
    ap.add_argument("--dose", type=float, default=2e4)
    ap.add_argument("--out", type=Path, default=Path("docs") / "phonon_convergence")
    args = ap.parse_args(argv)

    from dataclasses import replace

    from polcore.simulate.build import _structure_for, simulate_cell_scan
    from polcore.simulate.draws import DRAW_PROFILES, draw_nuisance

    cfg = DRAW_PROFILES["train"]
    sim = replace(cfg.sim_config("ideal_test"), thickness_nm=tuple(args.thickness), phonon_snapshots=1)
    nu = draw_nuisance(cfg, "ideal_test", 999)
    runs = {"P": [], "-P": []}
    t0 = time.perf_counter()
    rng = np.random.default_rng(7)
    seeds = rng.integers(2**31, size=args.snapshots)
    for s in seeds:
        for name, vec in (("P", (1, -1, 0)), ("-P", (-1, 1, 0))):
            n = {**nu, "phonon_seed": int(s)}
            runs[name].append(simulate_cell_scan(_structure_for(vec, n), sim, n))
        print(f"snapshot {len(runs['P'])}/{args.snapshots} ({time.perf_counter() - t0:.0f} s)", flush=True)
    P = np.stack(runs["P"])  # (S, T, N, N, K, K)
    M = np.stack(runs["-P"])
    # the Nb-O column sits at the cell centre (1/2, 1/2): probe position (N/2, N/2)
    c = P.shape[2] // 2
    rows = []
    s = 1
    while 2 * s <= args.snapshots:
        dbl = nl2(P[:s].mean(0), P[: 2 * s].mean(0))  # (T, N, N)
        pair = nl2(P[:s].mean(0), P[s : 2 * s].mean(0))
        for ti, t in enumerate(args.thickness):
            rows.append(dict(snapshots=s, thickness_nm=t, doubling_mean=float(dbl[ti].mean()),
                             doubling_nbo=float(dbl[ti, c, c]), pair_mean=float(pair[ti].mean()),
                             pair_nbo=float(pair[ti, c, c])))
        s *= 2
    sig = nl2(P.mean(0), M.mean(0))
    mean_pat = P.mean(0)
    lam = mean_pat / mean_pat.sum(axis=(-2, -1), keepdims=True) * args.dose
    shot = np.sqrt(lam.sum(axis=(-2, -1))) / np.sqrt((lam**2).sum(axis=(-2, -1)))
    ref = {f"{t:g}": dict(signal_mean=float(sig[ti].mean()), signal_nbo=float(sig[ti, c, c]),
                          shot_noise_mean=float(shot[ti].mean())) for ti, t in enumerate(args.thickness)}
    out = dict(rows=rows, reference=ref, snapshots=args.snapshots, dose=args.dose,
               seconds=time.perf_counter() - t0, nuisance=nu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(f"{'S':>3} {'t nm':>5} {'doubling':>9} {'(NbO)':>7} {'pair':>7} {'(NbO)':>7}")
    for r in rows:
        print(f"{r['snapshots']:>3} {r['thickness_nm']:>5g} {r['doubling_mean']:9.3f} {r['doubling_nbo']:7.3f} "
              f"{r['pair_mean']:7.3f} {r['pair_nbo']:7.3f}")
    for t, r in ref.items():
        print(f"{t} nm: P vs -P {r['signal_mean']:.3f} (Nb-O {r['signal_nbo']:.3f}); shot noise at "
              f"{args.dose:g} e- {r['shot_noise_mean']:.3f}")
    _figure(out, args.out.with_suffix(".png"))
    return 0


def _figure(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ts = sorted({r["thickness_nm"] for r in out["rows"]})
    for i, t in enumerate(ts):
        rr = [r for r in out["rows"] if r["thickness_nm"] == t]
        col = f"C{i}"
        ax.loglog([r["snapshots"] for r in rr], [r["doubling_mean"] for r in rr], "o-", color=col,
                  label=f"{t:g} nm: change when S doubles")
        ax.axhline(out["reference"][f"{t:g}"]["signal_mean"], color=col, ls="--", lw=1)
    ax.axhline(np.mean([v["shot_noise_mean"] for v in out["reference"].values()]), color="k", ls=":",
               label=f"shot noise, {out['dose']:g} e-/pattern")
    ax.set_xlabel("frozen-phonon snapshots S")
    ax.set_ylabel("normalised L2 difference (mean over probe positions)")
    ax.set_title("Phonon convergence (dashed: P vs -P signal)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())

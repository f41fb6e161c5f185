"""Accuracy of the scan-geometry estimate (polcore.geometry) on composed scans with a known detector geometry.

For ``--n`` random rotations x both flips x the doses (default 2e4 and 5e3 electrons per pattern), a scan is
composed from the committed library (``--side`` x ``--side`` positions, random domains, ``--thickness`` nm, a
new seed per rotation), recorded on a detector turned by the rotation (detector-to-scan, counter-clockwise on
screen) with or without a transpose and a linear descan ramp of +-3 px in a random direction, with Poisson
noise; ``estimate_geometry_from`` then estimates the geometry from the noisy patterns. Printed per run: the
true and estimated angle and flip, the error (full circle and modulo 180 deg), the confidences, the dark-field
half-turn correlation, and the descan error (largest distance between the estimated and the true disc-centre
surface over the scan, and the error of its range). Then a summary and the speed of ``apply_geometry``.

The detector model here is independent of polcore.geometry (``scipy.ndimage.affine_transform`` per pattern).

Usage::

    python benchmarks/geometry_bench.py                      # 10 rotations, 10 nm, 32 x 32
    python benchmarks/geometry_bench.py --thickness 20 --n 5
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import ndimage


def rc_matrix(theta: float, flip: bool) -> np.ndarray:
    """Detector-to-scan map R(theta) F on (row, col) coordinates."""
    t = math.radians(theta)
    c, s = math.cos(t), math.sin(t)
    m = np.array([[c, s], [-s, c]])  # (x right, y down): counter-clockwise on screen
    if flip:
        m = m @ np.array([[0.0, 1.0], [1.0, 0.0]])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    return swap @ m @ swap


def record(data, theta, flip, descan, dose, rng):
    ny, nx, K, _ = data.shape
    M = rc_matrix(theta, flip)
    c = np.full(2, K // 2, float)
    out = np.empty(data.shape, np.float32)
    for iy in range(ny):
        for ix in range(nx):
            out[iy, ix] = ndimage.affine_transform(np.asarray(data[iy, ix], np.float32), M,
                                                   offset=c - M @ (c + descan[iy, ix]), order=1, mode="constant")
    return rng.poisson(out / out.sum((2, 3), keepdims=True).mean() * dose).astype(np.uint16)


def ramp(ny, nx, amp, direction_deg):
    """Linear descan: the disc offset (dy, dx) [px] goes from -amp to +amp along a random direction."""
    iy, ix = np.mgrid[0:ny, 0:nx]
    u, v = 2 * iy / (ny - 1) - 1, 2 * ix / (nx - 1) - 1
    a = math.radians(direction_deg)
    return np.stack([amp * (math.cos(a) * u), amp * (math.sin(a) * u + 0.7 * v)], -1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="random rotations")
    ap.add_argument("--doses", type=float, nargs="+", default=[2e4, 5e3])
    ap.add_argument("--thickness", type=float, default=10.0)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine-model", default=None,
                    help="a checkpoint: also refine each estimate with this model (polcore.refine, the angle within "
                         "2 deg of the estimate at which the model is surest) and print the refined error")
    args = ap.parse_args(argv)

    from polcore.geometry import Geometry, apply_geometry, estimate_geometry_from
    from polcore.simulate import load_library
    from polcore.simulate.composer import ScanComposerConfig, compose_scan

    lib = load_library()
    refiner = None
    if args.refine_model:
        from polcore.infer import make_preprocessor
        from polcore.models import load_checkpoint
        from polcore.refine import _entropy_at, refine_rotation

        rmodel = load_checkpoint(args.refine_model, device="cpu")

        def refiner(patterns, g):
            """(refined angle, the model's mean entropy there, and at the angle 180 deg away)."""
            def mk():
                return make_preprocessor(rmodel)

            best, info = refine_rotation(rmodel, mk, patterns, pos, g, max_patterns=768)
            e_best = _entropy_at(rmodel, mk, patterns, pos, g, best)
            return best, e_best, _entropy_at(rmodel, mk, patterns, pos, g, best + 180.0)
    rng = np.random.default_rng(args.seed)
    n = args.side
    pos = np.stack(np.mgrid[0:n, 0:n], -1).reshape(-1, 2)
    print(f"geometry bench: {args.n} rotations x 2 flips x doses {args.doses}, {n}x{n} positions, "
          f"{args.thickness:g} nm, descan +-3 px")
    hdr = (f"{'dose':>6} {'true':>8} {'flip':>5} | {'est':>8} {'flip':>5} {'err':>7} {'mod180':>7} {'conf':>5} "
           f"{'half':>5} {'|r|':>5} {'se':>5} | {'descan max err':>14} {'range err y/x':>14} {'s':>5}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for i in range(args.n):
        theta = float(rng.uniform(-180, 180))
        cfg = ScanComposerConfig(layout="random_domains", ny=n, nx=n, thickness_nm=args.thickness, det_px=lib.size,
                                 n_domains=4, seed=1000 + i)
        _, blocks = compose_scan(cfg, lib, block_rows=n)
        data = np.concatenate([b for _, b in blocks], axis=0)
        K = data.shape[-1]
        for flip in (False, True):
            d = ramp(n, n, 3.0, float(rng.uniform(0, 360)))
            true_range = np.ptp(d.reshape(-1, 2), axis=0)
            for dose in args.doses:
                rec = record(data, theta, flip, d, dose, rng)
                t0 = time.perf_counter()
                g = estimate_geometry_from(rec.reshape(-1, K, K), pos, (n, n))
                dt = time.perf_counter() - t0
                r = g.details["rotation"]
                err = (g.rotation_deg - theta + 180) % 360 - 180
                err180 = (err + 90) % 180 - 90
                surf = g.disc_centre(pos) - K // 2
                dmax = float(np.abs(surf - d.reshape(-1, 2)).max())
                fit = g.details["descan"]
                rerr = (fit["range_y_px"] - true_range[0], fit["range_x_px"] - true_range[1])
                ref_txt, ref180 = "", None
                if refiner is not None:
                    best, e_best, e_half = refiner(rec.reshape(-1, K, K), g)
                    ref_err = (best - theta + 180) % 360 - 180
                    ref180 = (ref_err + 90) % 180 - 90
                    ref_txt = (f" | refined err {ref_err:7.2f} mod180 {ref180:6.2f}; entropy {e_best:.3f}, "
                               f"180 deg away {e_half:.3f}")
                rows.append(dict(dose=dose, err=err, err180=err180, flip_ok=g.flip == flip,
                                 conf=g.confidence["rotation_deg"], half=r.get("half_turn_confidence"), dmax=dmax,
                                 rerr=max(abs(rerr[0]), abs(rerr[1])), ref180=ref180,
                                 dhalf=None if ref180 is None else e_half - e_best))
                print(f"{dose:6.0e} {theta:8.2f} {flip!s:>5} | {g.rotation_deg:8.2f} {g.flip!s:>5} {err:7.2f} "
                      f"{err180:7.2f} {g.confidence['rotation_deg']:>5} {r.get('half_turn_confidence', '-'):>5} "
                      f"{(r.get('half_turn_r') or 0):5.2f} {r.get('rotation_se_deg', float('nan')):5.2f} | "
                      f"{dmax:11.2f} px {rerr[0]:+6.2f}/{rerr[1]:+6.2f} px {dt:5.1f}{ref_txt}", flush=True)
    print()
    for dose in args.doses:
        sel = [x for x in rows if x["dose"] == dose]
        hi = [x for x in sel if x["conf"] == "high"]
        print(f"dose {dose:.0e}: {len(sel)} runs; flip right {sum(x['flip_ok'] for x in sel)}/{len(sel)}; "
              f"|error| mod 180: median {np.median([abs(x['err180']) for x in sel]):.2f}, "
              f"max {max(abs(x['err180']) for x in sel):.2f} deg; half-turn right "
              f"{sum(abs(x['err']) < 90 for x in sel)}/{len(sel)}; 'high' {len(hi)}/{len(sel)}, of which full-angle "
              f"|error| max {max([abs(x['err']) for x in hi], default=float('nan')):.2f} deg; descan max error "
              f"{max(x['dmax'] for x in sel):.2f} px, range error max {max(x['rerr'] for x in sel):.2f} px")
        if refiner is not None:
            r180 = [abs(x["ref180"]) for x in sel]
            print(f"  refined by the model: |error| mod 180 median {np.median(r180):.2f}, max {max(r180):.2f} deg "
                  f"({sum(e < 2.0 for e in r180)}/{len(sel)} within 2 deg); the model's entropy 180 deg away minus "
                  f"at the refined angle: {min(x['dhalf'] for x in sel):+.3f} .. {max(x['dhalf'] for x in sel):+.3f} "
                  "nats (near 0: the model cannot tell the half-turn)")
    # speed of apply_geometry on 64 x 64 patterns (batches of 256)
    g = Geometry(rotation_deg=37.0, flip=True, descan_y=(32.0, 0.01, 0.0), descan_x=(32.0, 0.0, -0.01))
    x = np.random.default_rng(1).random((256, 64, 64)).astype(np.float32)
    p = np.zeros((256, 2), int)
    apply_geometry(x, p, g)
    reps, t0, c0 = 8, time.perf_counter(), time.process_time()
    for _ in range(reps):
        apply_geometry(x, p, g)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"apply_geometry: {reps * 256 / wall:.0f} patterns/s wall-clock, {reps * 256 / cpu:.0f} patterns/s per "
          "CPU-second (64 x 64, batches of 256, one map_coordinates call per batch; the second figure does not "
          "depend on other jobs sharing the cores)")


if __name__ == "__main__":
    main()

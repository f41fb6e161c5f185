"""What the virtual images cost inside the ingest's pass: :meth:`polcore.virtual.VirtualImages.add` against
:meth:`polcore.preprocess.Preprocessor.transform` (which every batch goes through anyway) on the same batches.

Batches of uint16 counts (a disc on a background, Poisson noise), detector sizes typical of real scans. Prints
milliseconds per batch (best of ``--repeat``) and the ratio add / transform.

Usage::

    python -m benchmarks.virtual_bench
    python -m benchmarks.virtual_bench --batch 256 --det 64 128 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _batch(n: int, det: int, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:det, 0:det]
    c = det / 2 - 0.5
    disc = (np.hypot(yy - c, xx - c) <= det / 6).astype(float)
    lam = 200.0 * disc + 2.0
    return rng.poisson(lam, size=(n, det, det)).astype(np.uint16)


def _best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--det", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    from polcore.preprocess import Preprocessor
    from polcore.virtual import VirtualImages

    rng = np.random.default_rng(0)
    print(f"batch of {args.batch} uint16 patterns, best of {args.repeat}")
    print(f"{'detector':>10} {'transform ms':>13} {'virtual add ms':>15} {'add/transform':>14}")
    for det in args.det:
        b = _batch(args.batch, det, rng)
        pre = Preprocessor(target_mrad_per_px=1.27, convergence_mrad=24.0).fit_patterns(b)
        acc = VirtualImages.from_preprocessor(pre, (1, args.batch), b.shape[1:])
        idx = np.arange(args.batch)
        t_pre = _best(lambda: pre.transform(b), args.repeat)  # noqa: B023 - timed at once
        t_add = _best(lambda: acc.add(idx, b), args.repeat)  # noqa: B023
        print(f"{det:>7} px {1e3 * t_pre:13.1f} {1e3 * t_add:15.1f} {t_add / t_pre:14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

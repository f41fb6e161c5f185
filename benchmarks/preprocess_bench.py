"""Preprocessing speed: the batched bilinear resampling of ``Preprocessor.transform`` against the previous
per-pattern ``ndimage.map_coordinates`` loop, in one run (a ratio survives a busy machine), with the largest
difference between their outputs.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.preprocess_bench``
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from polcore.preprocess import Preprocessor, minmax


def per_pattern_loop(pre: Preprocessor, x: np.ndarray) -> np.ndarray:
    """The previous implementation: one map_coordinates call per pattern."""
    n, ky, kx = x.shape
    rows, cols, zoom = pre._source_coords(ky, kx)
    if zoom >= 2.0:
        b = int(zoom)
        hy, hx = (ky // b) * b, (kx // b) * b
        x = x[:, :hy, :hx].reshape(n, hy // b, b, hx // b, b).mean(axis=(2, 4))
        rows, cols = (rows - (b - 1) / 2.0) / b, (cols - (b - 1) / 2.0) / b
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((n, pre.size, pre.size), np.float32)
    for i in range(n):
        ndimage.map_coordinates(x[i], [rr, cc], output=out[i], order=1, mode="nearest")
    return minmax(out)


def _time(fn, *args, repeat: int = 3) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - t) / repeat


def main() -> None:
    rng = np.random.default_rng(0)
    for k in (96, 256):
        x = rng.random((256, k, k)).astype(np.float32)
        yy, xx = np.mgrid[0:k, 0:k]
        disc = ((yy - k / 2) ** 2 + (xx - k / 2) ** 2 < (k / 5) ** 2).astype(np.float32)
        pre = Preprocessor(1.27, 24.0).fit_mean(x.mean(0) + 5 * disc, mrad_per_px=1.27 * k / 80)
        diff = float(np.abs(per_pattern_loop(pre, x) - pre.transform(x)).max())
        t_old, t_new = _time(per_pattern_loop, pre, x), _time(pre.transform, x)
        print(f"{k}x{k} px -> 64x64: per-pattern map_coordinates {256 / t_old:.0f} patterns/s, batched gathers "
              f"{256 / t_new:.0f} patterns/s, ratio {t_old / t_new:.2f}; max difference {diff:.1e}")


if __name__ == "__main__":
    main()

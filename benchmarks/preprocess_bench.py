"""Preprocessing speed against the raw read rate, in one run (ratios survive a busy machine).

1. **Resampling routes** on random patterns (96 x 96, 128 x 128 and 256 x 256 px -> 64 x 64): the per-pattern
   ``ndimage.map_coordinates`` loop (the first implementation), the four batched gathers (the second) and
   ``Preprocessor.transform`` now (two matrix products per batch on the region read), patterns/s and the
   largest difference from the per-pattern loop.
2. **A composed scan** (64 x 64 positions of 128 x 128 px uint16 counts, gzip EMD as the composer writes it,
   with hot pixels), per stage in patterns/s: the raw read (``scan.iter_batches``), ``transform``,
   ``com_magnitude``, and the 4 x 4-binned input subsample; then the whole ``predict_scan`` loop with a cheap
   model (PCA on 2 components and a 1-NN fitted on 8 patterns; its own rate is printed beside it) and the share
   of the raw read rate the loop keeps.

Usage: ``.venv/bin/python -m benchmarks.preprocess_bench [--scan 64] [--det 128]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from polcore.preprocess import Preprocessor, _linear_taps, com_magnitude, minmax

ROOT = Path(__file__).resolve().parents[1]


def per_pattern_loop(pre: Preprocessor, x: np.ndarray) -> np.ndarray:
    """The first implementation: one map_coordinates call per pattern."""
    x, rows, cols = pre.reference_grid(x)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((len(x), pre.size, pre.size), np.float32)
    for i in range(len(x)):
        ndimage.map_coordinates(x[i], [rr, cc], output=out[i], order=1, mode="nearest")
    return minmax(out)


def four_gathers(pre: Preprocessor, x: np.ndarray) -> np.ndarray:
    """The second implementation: bilinear weights applied with four fancy-index gathers over the batch."""
    x = x.astype(np.float32, copy=False)
    x, rows, cols = pre.reference_grid(x)
    (i0, i1, fy), (j0, j1, fx) = _linear_taps(rows, x.shape[1]), _linear_taps(cols, x.shape[2])
    fy, fx = fy[:, None], fx[None, :]
    top = x[:, i0[:, None], j0[None, :]] * (1 - fx) + x[:, i0[:, None], j1[None, :]] * fx
    bottom = x[:, i1[:, None], j0[None, :]] * (1 - fx) + x[:, i1[:, None], j1[None, :]] * fx
    return minmax(top * (1 - fy) + bottom * fy)


def _time(fn, *args, repeat: int = 3) -> float:
    fn(*args)
    t = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - t) / repeat


def routes() -> None:
    rng = np.random.default_rng(0)
    print("resampling 256 patterns to 64 x 64 (patterns/s; max |difference| from the per-pattern loop)")
    for k in (96, 128, 256):
        x = rng.random((256, k, k)).astype(np.float32)
        yy, xx = np.mgrid[0:k, 0:k]
        disc = ((yy - k / 2) ** 2 + (xx - k / 2) ** 2 < (k / 5) ** 2).astype(np.float32)
        pre = Preprocessor(1.27, 24.0).fit_mean(x.mean(0) + 5 * disc, mrad_per_px=1.27 * k / 80)
        ref = per_pattern_loop(pre, x)
        d_g = float(np.abs(four_gathers(pre, x) - ref).max())
        d_t = float(np.abs(pre.transform(x) - ref).max())
        t_loop, t_g, t_t = _time(per_pattern_loop, pre, x), _time(four_gathers, pre, x), _time(pre.transform, x)
        print(f"  {k:3d} x {k:3d} px: per-pattern {256 / t_loop:7.0f}, four gathers {256 / t_g:7.0f} ({d_g:.0e}), "
              f"transform {256 / t_t:7.0f} ({d_t:.0e}); transform / gathers {t_g / t_t:.1f}x, "
              f"/ per-pattern {t_loop / t_t:.1f}x")


def scan_stages(n: int, det: int) -> None:
    from polcore.infer import predict_scan
    from polcore.io import open_scan
    from polcore.models import build_model
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd

    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        cfg = ScanComposerConfig(layout="random_domains", ny=n, nx=n, step_nm=0.045, thickness_nm=20, dose=3e4,
                                 det_px=det, det_mrad_per_px=1.0, descan_px=3, hot_pixels=2, seed=0, n_domains=6)
        truth, blocks = compose_scan(cfg)
        path = write_emd(Path(tmp) / "scan.h5", truth, blocks, cfg)
        scan = open_scan(path)
        N = scan.n_patterns
        t = time.perf_counter()
        raw = [b for _, b in scan.iter_batches(256)]
        t_read = time.perf_counter() - t
        pre = Preprocessor(1.2698400228125573, 24.0).fit_patterns(np.concatenate(raw[:16]), scan.meta)
        X = [pre.transform(b) for b in raw]
        t_tr = sum(_time(pre.transform, b, repeat=1) for b in raw)
        t_gat = sum(_time(four_gathers, pre, b, repeat=1) for b in raw[:4]) * len(raw) / 4
        t_com = sum(_time(com_magnitude, x, repeat=1) for x in X)
        t_bin = sum(_time(lambda x: x.reshape(len(x), 16, 4, 16, 4).mean(axis=(2, 4)), x, repeat=1) for x in X)
        model = build_model("pca_knn", n_components=2, n_neighbors=1).fit(X[0][:8], np.arange(8))
        model.meta["preprocessing"] = pre.to_dict()
        t = time.perf_counter()
        predict_scan(scan, model, batch_size=256, preprocessor=pre, embed_sample=256)
        t_loop = time.perf_counter() - t
        t_model = sum(_time(model.infer, x, repeat=1) for x in X)
        print(f"\n{n} x {n} scan of {det} x {det} px uint16 (gzip EMD, {len(pre.hot_pixels_)} hot pixels), "
              f"patterns/s:")
        print(f"  raw read (scan.iter_batches)   {N / t_read:8.0f}")
        print(f"  transform (hot-pixel repair, resampling, min-max) {N / t_tr:8.0f}  ({t_read / t_tr:.1f}x the "
              f"raw read; the four gathers: {N / t_gat:.0f})")
        print(f"  com_magnitude                  {N / t_com:8.0f}")
        print(f"  4x4-binned inputs (all)        {N / t_bin:8.0f}")
        print(f"  predict_scan with a 1-NN on 2 PCA components ({N / t_model:.0f} patterns/s alone): {N / t_loop:.0f} "
              f"= {t_read / t_loop:.0%} of the raw read rate")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--det", type=int, default=128)
    args = ap.parse_args(argv)
    routes()
    scan_stages(args.scan, args.det)


if __name__ == "__main__":
    main()

"""Inference speed and memory of polcore.infer.predict_scan.

1. For each model family: patterns/s of ``predict_scan`` (reading an HDF5 scan, preprocessing, predicting,
   collecting) against a plain eager PyTorch loop over the same preprocessed batches (``net(x)`` under
   ``torch.no_grad()``, nothing else): the ratio shows what the project's loop costs on top of the model.
   The FLOP-bound limit is the machine's measured matmul GFLOP/s divided by the model's FLOPs per pattern
   (``torch.utils.flop_counter``).
2. Peak RSS of a child process that ingests a composed 256 x 256-position scan of 128 x 128 px patterns
   (uint16, ~2 GB on disk) with one model into a temporary DuckDB.

Usage::

    python -m benchmarks.infer_bench                 # everything (several minutes on 2 cores)
    python -m benchmarks.infer_bench --scan 48 --no-rss
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _compose(path: Path, n: int, det: int, seed: int = 0) -> Path:
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd

    cfg = ScanComposerConfig(layout="random_domains", ny=n, nx=n, step_nm=0.045, thickness_nm=20, dose=3e4,
                             det_px=det, det_mrad_per_px=1.0, descan_px=3, seed=seed, n_domains=6)
    truth, blocks = compose_scan(cfg)
    return write_emd(path, truth, blocks, cfg)


def _matmul_gflops(torch, threads: int) -> float:
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    return 2 * 1024**3 * reps / (time.perf_counter() - t) / 1e9


def _flops_per_pattern(torch, net, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(8, 1, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    return fc.get_total_flops() / 8


def speed(scan_path: Path, families, batch: int) -> list[dict]:
    import torch

    from polcore.infer import predict_scan
    from polcore.io import open_scan
    from polcore.models import build_model
    from polcore.preprocess import Preprocessor
    from polcore.simulate import load_library

    lib = load_library()
    scan = open_scan(scan_path)
    pre = Preprocessor(lib.meta["mrad_per_px"], lib.meta["convergence_mrad"]).fit_scan(scan)
    X_all = np.concatenate([pre.transform(b) for _, b in scan.iter_batches(batch)])
    n = len(X_all)
    gflops = _matmul_gflops(torch, torch.get_num_threads())
    rows = []
    for fam, head in families:
        if fam == "pca_knn":
            Xl, yl, _ = lib.select("train", thickness=20)
            model = build_model("pca_knn").fit(Xl, yl)
        else:
            model = build_model(fam, head, device="cpu")
        model.meta["preprocessing"] = pre.to_dict()
        model.infer(X_all[:batch])  # warm-up
        t = time.perf_counter()
        res = predict_scan(scan, model, batch_size=batch, preprocessor=pre, embed_sample=256)
        t_proj = time.perf_counter() - t
        row = dict(model=f"{fam}/{head}", patterns=n, project_pps=n / t_proj)
        if fam != "pca_knn":
            net = model.net.eval()
            t = time.perf_counter()
            with torch.no_grad():
                for i in range(0, n, batch):
                    net(torch.from_numpy(X_all[i : i + batch]).unsqueeze(1))
            t_plain = time.perf_counter() - t
            fpp = _flops_per_pattern(torch, net, X_all.shape[-1])
            row.update(plain_torch_pps=n / t_plain, ratio=(n / t_proj) / (n / t_plain),
                       mflops_per_pattern=fpp / 1e6, flop_bound_pps=gflops * 1e9 / fpp)
        else:
            t = time.perf_counter()
            for i in range(0, n, batch):
                model.predict_proba(X_all[i : i + batch])
            t_plain = time.perf_counter() - t
            row.update(plain_torch_pps=n / t_plain, ratio=t_plain / t_proj)
        assert res.pred.shape == scan.nav_shape
        rows.append(row)
    print(f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, matmul {gflops:.1f} GFLOP/s")
    return rows


def _vm_hwm_mb() -> float:
    """Peak resident set of this process [MB] from /proc (unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(scan_path: str, db: str, out_json: str) -> None:
    """Runs in a child: ingest one scan with one (untrained, real) model; report peak RSS."""
    import h5py

    from polcore.ingest import ingest_scan, load_models
    from polcore.models import build_model, save_checkpoint
    from polcore.preprocess import Preprocessor
    from polcore.simulate import DEFAULT_LIBRARY

    with h5py.File(DEFAULT_LIBRARY, "r") as f:  # the library's sampling only: do not load its patterns here
        mrad, conv = float(f.attrs["mrad_per_px"]), float(f.attrs["convergence_mrad"])
    model = build_model("custom_cnn", "cls", device="cpu")
    pre = Preprocessor(mrad, conv)
    ck = save_checkpoint(model, Path(db).with_name("m.pt"), meta={"preprocessing": pre.to_dict(), "seed": 0})
    base = _vm_hwm_mb()
    t = time.perf_counter()
    models = load_models([ck])
    ingest_scan(scan_path, None, db, name="big", models=models)
    dt = time.perf_counter() - t
    peak = _vm_hwm_mb()
    Path(out_json).write_text(json.dumps(dict(peak_rss_mb=peak, rss_before_ingest_mb=base, seconds=dt)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64, help="side of the speed-test scan [positions]")
    ap.add_argument("--det", type=int, default=128, help="detector side [px]")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--big", type=int, default=256, help="side of the RSS-test scan [positions]")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="skip the speed table")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        rss_child(*args.child)
        return 0
    families = [("custom_cnn", "cls"), ("resnet", "cls"), ("vgg", "cls"), ("pca_knn", "cls")]
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        small = _compose(tmp / "speed.h5", args.scan, args.det)
        print(f"composed {args.scan}x{args.scan} x {args.det}x{args.det} px in {time.perf_counter() - t:.0f} s")
        rows = [] if args.rss_only else speed(small, families, args.batch)
        print(f"\n{'model':20s} {'project p/s':>12s} {'plain p/s':>10s} {'ratio':>6s} {'MFLOP/p':>8s} {'FLOP-bound p/s':>15s}")
        for r in rows:
            print(f"{r['model']:20s} {r['project_pps']:12.0f} {r['plain_torch_pps']:10.0f} {r['ratio']:6.2f} "
                  f"{r.get('mflops_per_pattern', float('nan')):8.1f} {r.get('flop_bound_pps', float('nan')):15.0f}")
        if not args.no_rss:
            t = time.perf_counter()
            big = _compose(tmp / "big.h5", args.big, args.det, seed=1)
            size = big.stat().st_size / 1e9
            print(f"\ncomposed {args.big}x{args.big} x {args.det}x{args.det} px uint16 ({size:.2f} GB on disk, "
                  f"{args.big**2 * args.det**2 * 2 / 1e9:.2f} GB uncompressed) in {time.perf_counter() - t:.0f} s")
            out = tmp / "rss.json"
            subprocess.run([sys.executable, "-m", "benchmarks.infer_bench", "--child", str(big), str(tmp / "db.duckdb"),
                            str(out)], check=True, cwd=ROOT)
            r = json.loads(out.read_text())
            print(f"ingest of {args.big**2} patterns with custom_cnn/cls: {r['seconds']:.0f} s "
                  f"({args.big**2 / r['seconds']:.0f} patterns/s), peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"({r['rss_before_ingest_mb']:.0f} MB before ingest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

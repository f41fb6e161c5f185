"""Ingest rate of one scan in this process against the same scan's row blocks on a Dask LocalCluster.

Composes one scan from the committed default library (``--n`` x ``--n`` positions, 64 x 64 px, Poisson noise),
then, in ONE run, on the same file and model (default: the shipped binned custom CNN):

1. ``polcore.ingest.ingest_many([scan])``: one pass in this process (the path of ``python -m polcore ingest``);
2. the same with ``executor=`` a LocalCluster of ``--workers`` worker processes, one thread each
   (``python -m polcore ingest --dask``), the scan's rows in blocks of ``--block`` patterns.

Each ingest writes its own fresh store. Printed: wall time and patterns/s of each (the whole ingest: reading,
inference and the store's transaction; the cluster's start-up is timed apart), their ratio, the load average
before and after (the machine may be shared: say so when quoting the numbers), and the fraction of positions
where both stores hold the same class (must be 1.0).

Usage::

    python -m benchmarks.dask_bench                  # 96 x 96, 2 workers
    python -m benchmarks.dask_bench --n 64 --workers 2 --block 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "models" / "shipped" / "custom_cnn-binned-cls-s888.pt"


def compose(path: Path, n: int, seed: int = 0) -> Path:
    from polcore.simulate import DEFAULT_LIBRARY, load_library
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd

    lib = load_library(DEFAULT_LIBRARY)
    cfg = ScanComposerConfig(layout="random_domains", ny=n, nx=n, det_px=64, thickness_nm=20.0, dose=2e4,
                             seed=seed)
    truth, blocks = compose_scan(cfg, lib)
    return write_emd(path, truth, blocks, cfg)


def _pred(db: Path) -> np.ndarray:
    from polcore.store import PredictionStore, queries

    store = PredictionStore(db, read_only=True)
    runs = queries.list_runs(store)
    run = runs[runs["layer"] == "pattern"].iloc[0]
    return np.asarray(queries.run_grids(store, int(run.run_id))["pred"])


def main(argv=None) -> None:
    from polcore.distributed import dask_executor
    from polcore.ingest import ingest_many, load_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="scan side [positions]")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block", type=int, default=2048, help="patterns per Dask task")
    ap.add_argument("--model", type=Path, default=SHIPPED)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = compose(tmp / "scan.h5", args.n)
        models = load_models([args.model])
        n = args.n * args.n
        print(f"scan {args.n} x {args.n} = {n} patterns of 64 x 64 px; model {next(iter(models))}; "
              f"{os.cpu_count()} CPU cores; load average before {os.getloadavg()[0]:.2f}", flush=True)

        t0 = time.perf_counter()
        ingest_many([scan], None, tmp / "local.duckdb", models=models)
        local_s = time.perf_counter() - t0
        print(f"single process : {local_s:7.1f} s  {n / local_s:8.1f} patterns/s", flush=True)

        t0 = time.perf_counter()
        with dask_executor("local", n_workers=args.workers, processes=True) as ex:
            up_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ingest_many([scan], None, tmp / "dask.duckdb", models=models, executor=ex, block_patterns=args.block)
            dask_s = time.perf_counter() - t0
        print(f"LocalCluster   : {dask_s:7.1f} s  {n / dask_s:8.1f} patterns/s  ({args.workers} worker processes x 1 "
              f"thread, blocks of {args.block}; cluster start-up {up_s:.1f} s not included)", flush=True)
        same = float((_pred(tmp / "local.duckdb") == _pred(tmp / "dask.duckdb")).mean())
        print(f"ratio LocalCluster / single process: {local_s / dask_s:.2f}x; same class on {same:.4f} of the "
              f"positions; load average after {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()

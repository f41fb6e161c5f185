"""Where a scan pass's CPU goes: core-µs per pattern of each part of ``predict_scan_many``, counted per thread.

Each part is wrapped to add its own thread's CPU time (``time.thread_time``): the reader thread (reading and
inflating), the resampling (``Preprocessor.transform``), the virtual detectors (``VirtualImages.add``) and the
model's calls (``model.infer``). Beside them: the process's CPU time, the wall-clock rate, and the cores' capacity
at that rate (2 cores x wall time). The same model alone (``benchmarks.infer_bench._infer_rate``, laid out as the
pass runs it) gives the model's own cost outside the pass. The model's share counts the calling thread only: with
two workers each ONNX Runtime session runs on its caller (one thread), so it is the whole of it; with one worker
the session's second thread is in the process total but not in "model". From these numbers:

    end-to-end / model-only <= model / (model + everything else)

on a machine whose cores are all busy, whatever the threading (README, Benchmarks: the ingest's bound).

Usage::

    python -m benchmarks.pass_cpu                                   # shipped base CNN, composed 64 x 64 scan
    python -m benchmarks.pass_cpu --model pca_knn/lib20nm --runs 5
    python -m benchmarks.pass_cpu --scan S.h5                       # an existing scan
    python -m benchmarks.pass_cpu --model resnet/resnet18 --workers 1,2   # one batch on all cores vs two side by side
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def measure(scan_path: Path, label: str, runs: int, workers=(None,)) -> None:
    import polcore.infer as inf
    from benchmarks.infer_bench import _infer_rate, _make
    from polcore.io import open_scan
    from polcore.preprocess import Preprocessor
    from polcore.simulate import load_library
    from polcore.virtual import VirtualImages

    lib = load_library()
    scan = open_scan(scan_path)
    pre = Preprocessor(lib.meta["mrad_per_px"], lib.meta["convergence_mrad"]).fit_scan(scan)
    model = _make(label, pre)
    X = np.concatenate([pre.transform(b) for _, b in scan.iter_batches(256)])
    n = len(X)
    parts: dict[str, float] = {}
    lock = threading.Lock()

    def timed(name, fn):
        def run(*a, **k):
            c = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    parts[name] = parts.get(name, 0.0) + time.thread_time() - c
        return run

    infer = model.infer
    patched = [(Preprocessor, "transform"), (VirtualImages, "add"), (inf._Prefetch, "_produce")]
    saved = [getattr(cls, name) for cls, name in patched]
    model.infer = timed("model", infer)
    Preprocessor.transform = timed("resampling", saved[0])
    VirtualImages.add = timed("virtual detectors", saved[1])
    inf._Prefetch._produce = timed("reader (read + inflate)", saved[2])
    cores = inf._cores()
    print(f"{label} on {scan_path.name} ({n} patterns), {cores} cores; core-us per pattern:")
    try:
        for i, w in enumerate([w for _ in range(runs + 1) for w in workers]):
            if i < len(workers):  # the first passes build the runners for each thread count: not printed
                inf.predict_scan_many(scan, [model], preprocessor=pre, embed_sample=256, workers=w)
                continue
            parts.clear()
            c0, t0 = time.process_time(), time.perf_counter()
            inf.predict_scan_many(scan, [model], preprocessor=pre, embed_sample=256, workers=w)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            time.sleep(0.1)  # the reader thread's last CPU time is added as it ends
            rest = sum(v for k, v in parts.items() if k != "model")
            print(f"  pass ({'default' if w is None else w} workers) {n / wall:7.0f} patterns/s: process {cpu / n * 1e6:4.0f} of {cores * wall / n * 1e6:4.0f} "
                  f"capacity; " + ", ".join(f"{k} {v / n * 1e6:.1f}" for k, v in sorted(parts.items()))
                  + f"; all but the model {rest / n * 1e6:.0f}")
    finally:
        model.infer = infer
        for (cls, name), fn in zip(patched, saved):
            setattr(cls, name, fn)
    c0 = time.process_time()
    rate = _infer_rate(model, X, 256)
    print(f"  model alone {rate:.0f} patterns/s, {(time.process_time() - c0) / n * 1e6:.0f} core-us per pattern "
          f"(one warm-up batch included)")


def main(argv=None) -> int:
    from benchmarks.infer_bench import _compose

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="custom_cnn/binned*", help="a benchmarks.infer_bench case")
    ap.add_argument("--scan", type=Path, help="an existing scan (default: compose 64 x 64 x 128 x 128)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="", help="comma-separated worker counts to alternate (default: the "
                    "pass's own choice), e.g. 1,2: the layouts side by side in one run")
    args = ap.parse_args(argv)
    workers = tuple(int(v) for v in args.workers.split(",") if v.strip()) or (None,)
    with tempfile.TemporaryDirectory() as tmp:
        scan = args.scan or _compose(Path(tmp) / "scan.h5", 64, 128)
        measure(scan, args.model, args.runs, workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference speed: ``predict_scan`` against the model alone, eager PyTorch, every inference backend and the
FLOP bound, in one run (ratios survive a busy machine; absolute rates do not).

1. **Speed table** on a composed 64 x 64-position scan of 128 x 128 px uint16 patterns (gzip HDF5, as the
   composer writes it), for each model family:

   - ``predict_scan``: patterns/s of the whole loop (read, preprocess, model, collect) with a fitted
     preprocessor (no geometry estimate: that is section 3's business);
   - ``model``: the model alone (``model.infer`` on the preprocessed patterns, the route ``predict_scan`` uses,
     on the pass's worker threads), and ``e2e/model`` = ``predict_scan`` / ``model`` (what the loop costs on top
     of the model);
   - ``net(x)``: plain eager PyTorch (``net(x)`` under ``torch.no_grad()``, nothing else);
   - one column per inference backend (``polcore.models.base.BACKENDS``: eager, channels_last, onnxruntime
     when installed; ``model.infer`` with the head and the numpy outputs), ``best`` and ``best/net(x)``;
   - ``FLOP-bound``: the measured matmul rate (GFLOP/s, the larger of a measurement before and after the
     table) divided by the FLOPs per pattern (``torch.utils.flop_counter``), and ``best/bound``.

   PCA+kNN appears twice: fitted on the committed library's 20 nm training patterns (the model the issue's
   "today" figure used) and the shipped checkpoint (60k training patterns: the kNN search dominates).
2. **Threads and batch size** for the default recommended model (the model alone, best backend).
3. **The 256 x 256 x 128 x 128 scan** (composed here, or ``--big-scan FILE``) through the default recommended
   model (``data/models/shipped/custom_cnn-binned-cls-s888.pt``) with ``ingest_scan`` into a temporary DuckDB,
   in a child process: seconds until the full map is stored (the file's sha256 given, as the Upload page has
   it; the hash pass is timed separately), patterns/s, the same model alone on the scan's own preprocessed
   patterns, their ratio, and the peak RSS.
4. ``--baseline REV``: the same ``predict_scan`` / ``model`` measurement with the library as it was at git
   revision REV (``git archive`` into a temporary folder), in the same run: the speed-up over that revision.

Usage::

    python -m benchmarks.infer_bench                                  # everything (minutes on 2 cores)
    python -m benchmarks.infer_bench --baseline ae18887               # + the same table at an older revision
    python -m benchmarks.infer_bench --big-scan /tmp/s256.h5          # reuse a composed 256 x 256 scan
    python -m benchmarks.infer_bench --no-big --families custom_cnn,pca_knn
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "models" / "shipped"
#: the shipped base CNN (the speed table's custom CNN row) and the recommended model (the thickness experts: the
#: general CNN, a 5 nm expert run only on the patterns gated to it, and the gate) for sections 2 and 3
BASE_CNN = SHIPPED / "custom_cnn-binned-cls-s888.pt"
DEFAULT_MODEL = SHIPPED / "custom_cnn-binned-cls-s888-tx.pt"
SHIPPED_PCA = SHIPPED / "pca_knn-cls-s888.npz"

#: label -> (family, how the model is made)
CASES = {
    "custom_cnn/study": ("custom_cnn", dict(arch="study")),
    "custom_cnn/binned*": ("custom_cnn", dict(checkpoint=str(BASE_CNN))),
    "resnet/resnet18": ("resnet", dict(arch="resnet18")),
    "vgg/vgg11_bn": ("vgg", dict(arch="vgg11_bn")),
    "pca_knn/lib20nm": ("pca_knn", dict()),
    "pca_knn/shipped": ("pca_knn", dict(checkpoint=str(SHIPPED_PCA))),
}


def _compose(path: Path, n: int, det: int, seed: int = 0) -> Path:
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd

    cfg = ScanComposerConfig(layout="random_domains", ny=n, nx=n, step_nm=0.045, thickness_nm=20, dose=3e4,
                             det_px=det, det_mrad_per_px=1.0, descan_px=3, seed=seed, n_domains=6)
    truth, blocks = compose_scan(cfg)
    return write_emd(path, truth, blocks, cfg)


def _matmul_gflops(torch) -> float:
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


def _make(label: str, pre):
    from polcore.models import build_model, load_checkpoint

    family, how = CASES[label]
    if "checkpoint" in how:
        model = load_checkpoint(how["checkpoint"], device="cpu") if family != "pca_knn" else \
            load_checkpoint(how["checkpoint"])
    elif family == "pca_knn":
        from polcore.simulate import load_library

        Xl, yl, _ = load_library().select("train", thickness=20)
        model = build_model("pca_knn").fit(Xl, yl)
    else:
        model = build_model(family, "cls", device="cpu", arch=how["arch"])
    model.meta["preprocessing"] = pre.to_dict()
    return model


def _infer_rate(model, X: np.ndarray, batch: int, workers: int | None = None) -> float:
    """Patterns/s of ``model.infer`` over ``X`` in batches of ``batch``, laid out as ``predict_scan`` runs it:
    on the pass's workers (``polcore.infer._workers_default``: whole batches side by side, torch's threads
    shared out) with numpy's BLAS on one thread; ``workers=1``: one batch after the other on every core. A
    polcore without workers (the baseline revision) runs one batch after the other."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    import polcore.infer as inf

    blas = getattr(inf, "_blas_one_thread", lambda: contextlib.nullcontext)()
    if not hasattr(inf, "_workers_default"):
        workers = 1
    elif workers is None:
        workers = inf._workers_default([model])
    threads = inf._torch_threads([model], workers) if workers > 1 else contextlib.nullcontext()
    chunks = [X[i : i + batch] for i in range(0, len(X), batch)]
    with blas(), threads, ThreadPoolExecutor(workers) as pool:
        model.infer(chunks[0], batch_size=batch)  # the runner for this thread count
        t = time.perf_counter()
        list(pool.map(lambda x: model.infer(x, batch_size=batch), chunks))
        return len(X) / (time.perf_counter() - t)


def _eager_rate(torch, net, X: np.ndarray, batch: int) -> float:
    """Patterns/s of plain eager PyTorch, ``net(x)`` under ``torch.no_grad()`` (after one warm-up batch)."""
    with torch.no_grad():
        net(torch.from_numpy(X[:batch]).unsqueeze(1))
        t = time.perf_counter()
        for i in range(0, len(X), batch):
            net(torch.from_numpy(X[i : i + batch]).unsqueeze(1))
    return len(X) / (time.perf_counter() - t)


#: A row's read, ``predict_scan`` and model-alone rates are the medians of this many runs when one pass takes
#: under SHORT_PASS_S seconds (a 4096-pattern pass of PCA+kNN takes 0.25 s: one run moved by 1.5x)
REPEATS = 3
SHORT_PASS_S = 5.0


def speed(scan_path: Path, labels, batch: int, n_model: int, routes: bool = True, baseline=None) -> dict:
    """The speed table's measurements, one row per model; each row's numbers are taken back to back (its own
    matmul rate before and after, its raw read rate, and ``baseline(label)``: the same row measured by an older
    polcore in a child process right after), so a machine whose load changes during the run still gives fair
    ratios. Also run in that child (``routes=False``) against the older polcore."""
    import torch

    from polcore.infer import predict_scan
    from polcore.io import open_scan
    from polcore.preprocess import Preprocessor
    from polcore.simulate import load_library

    lib = load_library()
    scan = open_scan(scan_path)
    pre = Preprocessor(lib.meta["mrad_per_px"], lib.meta["convergence_mrad"]).fit_scan(scan)
    X_all = np.concatenate([pre.transform(b) for _, b in scan.iter_batches(batch)])
    n = len(X_all)
    nm = min(n, n_model)
    Xm = X_all[:nm]
    rows = []
    for label in labels:
        gf = [_matmul_gflops(torch)]
        model = _make(label, pre)
        model.infer(X_all[:batch])  # warm-up (builds the fast backend's runner where there is one)
        reads, passes, alone = [], [], []
        while len(passes) < (1 if passes and passes[0] * n > SHORT_PASS_S else REPEATS):  # median of short runs
            t = time.perf_counter()
            n_read = sum(len(b) for _, b in scan.iter_batches(batch))
            reads.append(n_read / (time.perf_counter() - t))
            t = time.perf_counter()
            res = predict_scan(scan, model, batch_size=batch, preprocessor=pre, embed_sample=256)
            passes.append((time.perf_counter() - t) / n)
            assert res.pred.shape == scan.nav_shape
            alone.append(_infer_rate(model, Xm, batch))
        row = dict(model=label, patterns=n, project_pps=1.0 / float(np.median(passes)),
                   model_pps=float(np.median(alone)), read_pps=float(np.median(reads)), runs=len(passes),
                   active_backend=getattr(model, "active_backend", "eager"))
        if getattr(model, "is_torch", False):
            net = model.net.eval()
            row["eager_pps"] = _eager_rate(torch, net, Xm, batch)
            row["flops_per_pattern"] = _flops_per_pattern(torch, net, X_all.shape[-1])
            if routes and hasattr(model, "backend"):
                from polcore.models.base import BACKENDS, onnxruntime_available

                row["routes"] = {}
                for b in BACKENDS:
                    if b == "auto" or (b == "onnxruntime" and not onnxruntime_available()):
                        continue
                    model.backend = b
                    model.infer(Xm[:batch])
                    row["routes"][b] = _infer_rate(model, Xm, batch)
                model.backend = "auto"
        gf.append(_matmul_gflops(torch))
        row["gflops"] = max(gf)
        row["gflops_all"] = gf
        if baseline is not None:
            row["baseline"] = baseline(label)
        rows.append(row)
        print(f"  measured {label}", flush=True)
    return dict(rows=rows, threads=torch.get_num_threads(), torch=torch.__version__)


def sweep(scan_path: Path, batch_sizes, threads, n_model: int) -> list[dict]:
    """The default recommended model alone (best backend) at several thread counts and batch sizes."""
    import torch

    from polcore.infer import make_preprocessor
    from polcore.io import open_scan
    from polcore.models import load_checkpoint

    scan = open_scan(scan_path)
    model = load_checkpoint(DEFAULT_MODEL, device="cpu")
    pre = make_preprocessor(model, scan)
    X = np.concatenate([pre.transform(b) for _, b in scan.iter_batches(256)])[:n_model]
    before = torch.get_num_threads()
    out = []
    try:
        for th in threads:
            torch.set_num_threads(th)
            model.backend = model.backend  # rebuild the runner with this many threads
            for bs in batch_sizes:
                model.infer(X[: max(bs, 256)], batch_size=bs)
                r = _infer_rate(model, X, bs, workers=1)
                out.append(dict(threads=th, batch=bs, pps=r, backend=model.active_backend))
    finally:
        torch.set_num_threads(before)
    return out


def _vm_hwm_mb() -> float:
    """Peak resident set of this process [MB] from /proc (unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def big_child(scan_path: str, db: str, out_json: str) -> None:
    """Runs in a child: ingest the big scan with the default recommended model; time, rate, model alone, RSS."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="  [log] %(name)s: %(message)s")
    from polcore.infer import make_preprocessor
    from polcore.ingest import ingest_scan, load_models
    from polcore.io import open_scan

    t = time.perf_counter()
    h = hashlib.sha256()
    with open(scan_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    t_hash = time.perf_counter() - t
    models = load_models([DEFAULT_MODEL])
    (model, _, _), = models.values()
    # the same model alone, on the scan's own preprocessed patterns (the first 4096), before and after the ingest
    scan = open_scan(scan_path)
    pre = make_preprocessor(model)
    batches = []
    for _, b in scan.iter_batches(256):
        batches.append(b)
        if len(batches) * 256 >= 4096:
            break
    pre.fit_patterns(np.concatenate(batches), scan.meta)
    X = np.concatenate([pre.transform(b) for b in batches])
    del batches

    def model_rate() -> float:
        """The model alone at its best: the faster of one batch at a time on every core and the pass's workers
        (each the median of 3 runs), numpy's BLAS on one thread as in the pass."""
        one = float(np.median([_infer_rate(model, X, 256, workers=1) for _ in range(3)]))
        workers = float(np.median([_infer_rate(model, X, 256) for _ in range(3)]))
        layouts.append((one, workers))
        return max(one, workers)

    layouts = []
    before = model_rate()
    base = _vm_hwm_mb()
    t = time.perf_counter()
    ingest_scan(scan_path, None, db, name="big", models=models, sha256=h.hexdigest())
    dt = time.perf_counter() - t
    peak = _vm_hwm_mb()
    after = model_rate()
    n = scan.n_patterns
    Path(out_json).write_text(json.dumps(dict(
        seconds=dt, hash_seconds=t_hash, n=n, pps=n / dt, model_pps=(before + after) / 2, model_pps_all=[before, after],
        model_layouts=layouts,
        peak_rss_mb=peak, rss_before_ingest_mb=base, backend=getattr(model, "active_backend", "eager"))))


def _baseline_tree(rev: str, tmp: Path) -> Path:
    """polcore as it was at git revision ``rev`` (``git archive``), with this checkout's data folder."""
    tree = tmp / "baseline"
    tree.mkdir()
    (tree / "data").symlink_to(ROOT / "data")  # the committed library and shipped models, as the tree expects
    archive = subprocess.run(["git", "archive", rev, "polcore"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _baseline_row(tree: Path, scan_path: Path, label: str, batch: int, n_model: int) -> dict:
    """One speed-table row (predict_scan, model alone, raw read) measured by the polcore in ``tree``."""
    out = tree / f"row_{abs(hash(label))}.json"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-speed", str(scan_path), str(out),
                    label, str(batch), str(n_model)], check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["rows"][0]


def _fmt(v, spec=".0f") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def print_table(res: dict) -> None:
    rows = res["rows"]
    g = [r["gflops"] for r in rows]
    print(f"\nmachine: torch {res['torch']}, {res['threads']} threads; matmul {min(g):.1f} .. {max(g):.1f} GFLOP/s "
          f"over the rows (each row's FLOP bound uses its own)")
    names = ["eager", "channels_last", "onnxruntime"]
    print(f"{'model':20s} {'predict_scan':>12s} {'model':>7s} {'e2e/model':>9s} {'read':>6s} {'net(x)':>7s} "
          + " ".join(f"{n[:13]:>13s}" for n in names)
          + f" {'best':>7s} {'best/net(x)':>11s} {'MFLOP/p':>8s} {'FLOP-bound':>10s} {'best/bound':>10s}")
    for r in rows:
        routes = r.get("routes", {})
        best = max([r["model_pps"], *routes.values()])
        fpp = r.get("flops_per_pattern")
        bound = r["gflops"] * 1e9 / fpp if fpp else None
        print(f"{r['model']:20s} {r['project_pps']:12.0f} {r['model_pps']:7.0f} {r['project_pps'] / r['model_pps']:9.2f} "
              f"{r['read_pps']:6.0f} {_fmt(r.get('eager_pps')):>7s} "
              + " ".join(f"{_fmt(routes.get(n)):>13s}" for n in names)
              + f" {best:7.0f} {_fmt(best / r['eager_pps'] if r.get('eager_pps') else None, '.2f'):>11s} "
              f"{_fmt(fpp / 1e6 if fpp else None, '.1f'):>8s} {_fmt(bound):>10s} "
              f"{_fmt(best / bound if bound else None, '.0%'):>10s}")
    print("(read: the raw read rate of the scan (scan.iter_batches) just before; net(x): plain eager PyTorch; eager / "
          "channels_last / onnxruntime: model.infer with that backend; model: the route predict_scan uses, backend "
          "'auto' -> " + ", ".join(f"{r['model']}: {r['active_backend']}" for r in rows if "flops_per_pattern" in r)
          + "; * = the shipped base CNN, the general member of the recommended thickness experts)")
    for r in rows:
        if str(r.get("active_backend", "")).startswith("knn:"):
            print(f"{r['model']}: predict_scan / raw read {r['project_pps'] / r['read_pps']:.2f}; neighbour search "
                  f"{r['active_backend']} (PCAKNNModel.knn_route 'auto')")
    if any("baseline" in r for r in rows):
        print("\nagainst the baseline revision: the same row measured by it right after (same scan, same run):")
        print(f"{'model':20s} {'predict_scan now':>16s} {'then':>7s} {'ratio':>6s} {'model now':>10s} {'then':>7s} "
              f"{'ratio':>6s} {'read now':>9s} {'then':>6s}")
        for r in rows:
            o = r.get("baseline")
            if o is None:
                continue
            print(f"{r['model']:20s} {r['project_pps']:16.0f} {o['project_pps']:7.0f} "
                  f"{r['project_pps'] / o['project_pps']:6.2f} {r['model_pps']:10.0f} {o['model_pps']:7.0f} "
                  f"{r['model_pps'] / o['model_pps']:6.2f} {r['read_pps']:9.0f} {o['read_pps']:6.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64, help="side of the speed-test scan [positions]")
    ap.add_argument("--det", type=int, default=128, help="detector side [px]")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model-patterns", type=int, default=1024,
                    help="patterns for each model-alone / backend timing (predict_scan always runs the whole scan)")
    ap.add_argument("--families", default=",".join(CASES), help=f"comma-separated rows of {', '.join(CASES)} "
                    "(a family name selects its rows)")
    ap.add_argument("--baseline", metavar="REV", help="also measure polcore at this git revision")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--big", type=int, default=256, help="side of the big scan [positions]")
    ap.add_argument("--big-scan", type=Path, help="an existing big scan to ingest instead of composing one")
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-speed", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        big_child(*args.child)
        return 0
    if args.child_speed:
        scan, out, labels, batch, nm = args.child_speed
        Path(out).write_text(json.dumps(speed(Path(scan), labels.split(","), int(batch), int(nm), routes=False)))
        return 0
    wanted = args.families.split(",")
    labels = [k for k in CASES if k in wanted or CASES[k][0] in wanted]
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        tmp = Path(tmp)
        if labels:
            t = time.perf_counter()
            small = _compose(tmp / "speed.h5", args.scan, args.det)
            print(f"composed {args.scan}x{args.scan} x {args.det}x{args.det} px in {time.perf_counter() - t:.0f} s")
            baseline = None
            if args.baseline:
                tree = _baseline_tree(args.baseline, tmp)

                def baseline(label):
                    return _baseline_row(tree, small, label, args.batch, args.model_patterns)

            res = speed(small, labels, args.batch, args.model_patterns, baseline=baseline)
            print_table(res)
            if not args.no_sweep:
                print("\nthe default recommended model alone (best backend), patterns/s:")
                for r in sweep(small, (64, 256, 1024), (1, 2), args.model_patterns * 2):
                    print(f"  threads {r['threads']}, batch {r['batch']:5d}: {r['pps']:6.0f} ({r['backend']})")
        if not args.no_big:
            big = args.big_scan
            if big is None:
                t = time.perf_counter()
                big = _compose(tmp / "big.h5", args.big, args.det, seed=1)
                print(f"\ncomposed {args.big}x{args.big} x {args.det}x{args.det} px uint16 in "
                      f"{time.perf_counter() - t:.0f} s")
            size = big.stat().st_size / 1e9
            out = tmp / "big.json"
            subprocess.run([sys.executable, "-m", "benchmarks.infer_bench", "--child", str(big),
                            str(tmp / "db.duckdb"), str(out)], check=True, cwd=ROOT)
            r = json.loads(out.read_text())
            print(f"\n{r['n']} patterns ({big.name}, {size:.2f} GB on disk, synthetic, composed by polcore.simulate) "
                  f"through {DEFAULT_MODEL.stem} with ingest_scan: full map stored in {r['seconds']:.1f} s "
                  f"({r['pps']:.0f} patterns/s; the sha256 pass before it, as an upload has it: "
                  f"{r['hash_seconds']:.1f} s); the model alone ({r['backend']}) {r['model_pps']:.0f} patterns/s (before and "
                  f"after: {r['model_pps_all'][0]:.0f}, {r['model_pps_all'][1]:.0f}; the faster of one batch at a time "
                  f"on all cores {', '.join(f'{a:.0f}' for a, _ in r['model_layouts'])} and the pass's workers "
                  f"{', '.join(f'{b:.0f}' for _, b in r['model_layouts'])}): "
                  f"end-to-end / model-only {r['pps'] / r['model_pps']:.0%}; peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"({r['rss_before_ingest_mb']:.0f} MB before ingest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

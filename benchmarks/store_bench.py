"""Prediction-store speed: bulk insert rate and the latency of every page query at ~10 million rows.

Builds a temporary DuckDB file through the real ``PredictionStore.write_run`` (one transaction per run, Arrow
``INSERT ... SELECT``), with runs of ``side x side`` positions (default 150 runs of 256x256 = 9.8 M rows:
15 models x 10 scans), 8 probabilities per row, ground truth, thickness wedge and defect masks generated with
numpy. Then times each query of ``polcore.store.queries`` on a read-only store, as the dashboard calls them
(connection open and close included), and prints median and p95 over ``--repeats`` calls, and the file size.

Usage::

    python -m benchmarks.store_bench                  # 10 M rows, from the repository root
    python -m benchmarks.store_bench --rows 1000000   # quicker
    python -m benchmarks.store_bench --db /tmp/big.duckdb --keep
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from polcore.store import PredictionStore, queries
from polcore.types import N_CLASSES, Filters

FAMILIES = [("custom_cnn", "cls"), ("resnet", "cls"), ("resnet", "proto"), ("vgg", "reg"), ("pca_knn", "knn")]
SEEDS = (0, 1, 2)


def scan_truth(side: int, scan: int) -> dict[str, np.ndarray]:
    """Ground truth of one synthetic scan: striped domains, a thickness wedge, square defects."""
    iy, ix = np.divmod(np.arange(side * side), side)
    label = ((iy // 32 + ix // 48 + scan) % N_CLASSES).astype(np.int8)
    thickness = (10.0 + 40.0 * ix / max(side - 1, 1)).astype(np.float32)
    defect = ((iy % 64) < 3) & ((ix % 80) < 3)
    label[(iy % 97) == 0] = -1  # a few unlabelled rows
    return {"iy": iy, "ix": ix, "true_label": label, "thickness_nm": thickness, "is_defect": defect}


def fake_predictions(
    truth: dict[str, np.ndarray], skill: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Softmax probabilities whose argmax agrees with the truth for a fraction set by ``skill``."""
    n = len(truth["iy"])
    logits = rng.standard_normal((n, N_CLASSES), dtype=np.float32)
    lab = np.where(truth["true_label"] >= 0, truth["true_label"], 0)
    logits[np.arange(n), lab] += skill
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return {
        **truth,
        "pred": probs.argmax(axis=1).astype(np.int8),
        "probs": probs,
        "irregularity": rng.random(n, dtype=np.float32),
    }


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median and p95 wall time [ms] of ``repeats`` calls (after one warm-up call)."""
    fn(0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float(np.percentile(times, 95))


def build(store: PredictionStore, rows: int, side: int, rng: np.random.Generator) -> dict:
    n_per_run = side * side
    n_runs = max(1, math.ceil(rows / n_per_run))
    models = []
    for fam, head in FAMILIES:
        for seed in SEEDS:
            name = f"{fam}-{head}-s{seed}"
            models.append(
                (
                    store.add_model(
                        name=name, family=fam, head=head, seed=seed, train_seconds=60.0 + 10 * seed
                    ),
                    name,
                )
            )
    n_scans = math.ceil(n_runs / len(models))
    scans = []
    for k in range(n_scans):
        kind = (
            "synthetic"
            if k < n_scans - 2
            else ("pseudo_experimental" if k == n_scans - 2 else "experimental")
        )
        dataset = f"synthetic {10 + 10 * k} nm" if kind == "synthetic" else kind
        sha = f"{k:064x}"
        scans.append(
            (
                store.add_scan(
                    name=f"scan {k}",
                    kind=kind,
                    sha256=sha,
                    ny=side,
                    nx=side,
                    ky=128,
                    kx=128,
                    dataset=dataset,
                    cell_px=4.0,
                    has_ground_truth=True,
                ),
                dataset,
            )
        )
    insert_s = gen_s = 0.0
    bench_rows = []
    run_ids = []
    written = 0
    for s_idx, (scan_id, dataset) in enumerate(scans):
        truth = scan_truth(side, s_idx)
        for m_idx, (model_id, name) in enumerate(models):
            if written >= n_runs:
                break
            t0 = time.perf_counter()
            preds = fake_predictions(
                truth, skill=1.5 + 0.3 * (m_idx % 5) - 0.4 * (s_idx >= n_scans - 2), rng=rng
            )
            gen_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            run_ids.append(store.write_run(model_id, scan_id, preds, seconds=5.0, device="cpu"))
            insert_s += time.perf_counter() - t0
            written += 1
            lab = preds["true_label"] >= 0
            fam, head = FAMILIES[m_idx // len(SEEDS)]
            bench_rows.append(
                {
                    "model_name": name,
                    "model_id": model_id,
                    "family": fam,
                    "head": head,
                    "seed": SEEDS[m_idx % 3],
                    "dataset": dataset,
                    "accuracy": float(np.mean(preds["pred"][lab] == preds["true_label"][lab])),
                    "macro_f1": float("nan"),
                    "n": int(lab.sum()),
                }
            )
            if written % 25 == 0:
                print(
                    f"  {written}/{n_runs} runs, {written * n_per_run / insert_s:,.0f} rows/s so far",
                    flush=True,
                )
    store.write_bench(pd.DataFrame(bench_rows))
    # one model's feature embedding over the first (synthetic) and last (experimental) scan, 10k points each
    m0 = models[0][0]
    emb = []
    for scan_id, _ in (scans[0], scans[-1]):
        pos = rng.choice(n_per_run, size=min(10_000, n_per_run), replace=False)
        emb.append(
            pd.DataFrame(
                {
                    "model_id": m0,
                    "method": "umap",
                    "space": "features",
                    "scan_id": scan_id,
                    "iy": pos // side,
                    "ix": pos % side,
                    "e1": rng.standard_normal(len(pos)),
                    "e2": rng.standard_normal(len(pos)),
                }
            )
        )
    store.write_embeddings(pd.concat(emb, ignore_index=True))
    for model_id, _ in models:
        store.write_domain_gap(model_id, scans[0][0], scans[-1][0], auc=float(rng.uniform(0.5, 1.0)))
    return {
        "runs": run_ids,
        "rows": written * n_per_run,
        "insert_s": insert_s,
        "gen_s": gen_s,
        "models": models,
        "scans": scans,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="prediction rows to insert (default 10 M)")
    ap.add_argument(
        "--side", type=int, default=256, help="scan side: positions per run = side^2 (default 256)"
    )
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per query (default 20)")
    ap.add_argument("--db", type=Path, default=None, help="database file (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the database file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = None
    if args.db is None:
        tmp = Path(tempfile.mkdtemp(prefix="store_bench_"))
        args.db = tmp / "bench.duckdb"
    if args.db.exists():
        raise SystemExit(f"{args.db} exists: give a new path")
    rng = np.random.default_rng(args.seed)
    try:
        print(f"building {args.db} with {args.rows:,} rows (runs of {args.side}x{args.side})", flush=True)
        t0 = time.perf_counter()
        info = build(PredictionStore(args.db), args.rows, args.side, rng)
        total = time.perf_counter() - t0
        rate = info["rows"] / info["insert_s"]
        print(
            f"\ninserted {info['rows']:,} rows in {len(info['runs'])} runs: write_run total "
            f"{info['insert_s']:.1f} s"
            f" -> {rate:,.0f} rows/s (numpy generation {info['gen_s']:.1f} s, build total {total:.1f} s)"
        )
        size = sum(p.stat().st_size for p in args.db.parent.glob(args.db.name + "*"))
        print(f"file size: {size / 2**20:,.1f} MiB ({size / info['rows']:.1f} bytes/row)\n")

        ro = PredictionStore(args.db, read_only=True)
        runs = info["runs"]
        mid_run = runs[len(runs) // 2]
        n_ds = len(info["models"])
        one_dataset = runs[:n_ds]
        m0 = info["models"][0][0]
        side = args.side
        th = Filters(thickness=(20.0, 30.0))
        box = Filters(region=(side // 4, side // 2, side // 4, side // 2))

        def pick(i: int) -> int:  # a different run each call, as a user clicking through the pages would
            return runs[(len(runs) // 2 + 7 * i) % len(runs)]

        def connect_only(i: int) -> None:
            with ro.connect():
                pass

        cases = [
            ("connect + close (read-only)", connect_only),
            ("list_scans", lambda i: queries.list_scans(ro)),
            ("list_models", lambda i: queries.list_models(ro)),
            ("list_runs", lambda i: queries.list_runs(ro)),
            ("has_run", lambda i: ro.has_run(m0, info["scans"][0][0])),
            ("benchmark_table (+ majority)", lambda i: queries.benchmark_table(ro)),
            ("pivot_benchmark", lambda i: queries.pivot_benchmark(bench_df)),
            ("confusion_counts 1 run", lambda i: queries.confusion_counts(ro, pick(i))),
            ("confusion_counts 1 run, thickness", lambda i: queries.confusion_counts(ro, pick(i), th)),
            (
                f"confusion_counts {len(one_dataset)} runs",
                lambda i: queries.confusion_counts(ro, one_dataset),
            ),
            ("run_map 1 run (with probs)", lambda i: queries.run_map(ro, pick(i))),
            ("run_map 1 run (no probs)", lambda i: queries.run_map(ro, pick(i), probs=False)),
            ("run_grids 1 run", lambda i: queries.run_grids(ro, pick(i))),
            ("errors 1 run", lambda i: queries.errors(ro, pick(i))),
            ("errors 1 run, region", lambda i: queries.errors(ro, pick(i), box)),
            ("prediction_at", lambda i: queries.prediction_at(ro, pick(i), i % side, (3 * i) % side)),
            ("embeddings (20k points)", lambda i: queries.embeddings(ro, m0, "umap", "features")),
            ("domain_gaps", lambda i: queries.domain_gaps(ro)),
            ("thickness_range (all rows)", lambda i: queries.thickness_range(ro)),
            ("thickness_range 1 run", lambda i: queries.thickness_range(ro, pick(i))),
            ("metrics_by_run 1 run, thickness", lambda i: queries.metrics_by_run(ro, th, run_ids=[pick(i)])),
            (f"metrics_by_run all {len(runs)} runs", lambda i: queries.metrics_by_run(ro)),
            (f"metrics_by_run all {len(runs)} runs, region", lambda i: queries.metrics_by_run(ro, box)),
        ]
        bench_df = queries.benchmark_table(ro)
        print(
            f"query latency over {args.repeats} calls, read-only store, connection included (run {mid_run} "
            "etc.)"
        )
        print(f"{'query':44s} {'median ms':>10s} {'p95 ms':>10s}")
        for name, fn in cases:
            med, p95 = timed(fn, args.repeats)
            print(f"{name:44s} {med:10.1f} {p95:10.1f}", flush=True)
        print("\nbenchmark table (accuracy):")
        print(queries.pivot_benchmark(bench_df).to_string())
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.keep:
            print(f"kept {args.db}")


if __name__ == "__main__":
    main()

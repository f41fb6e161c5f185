"""The demo: everything the dashboard shows, built from a fresh clone; idempotent (every step skips what
exists).

Steps: models (the shipped checkpoints, or train the 'quick'/'paper' profile on the committed library) →
compose the default scans → ingest every scan with every model (:mod:`polcore.ingest`) → the benchmark table
(:mod:`polcore.benchmark`) and the held-out rows (:mod:`polcore.heldout`) → embeddings and domain gaps
(:mod:`polcore.reports`).
"""

from __future__ import annotations

import json
import time

from polcore import settings
from polcore.progress import Progress, report, scaled

__all__ = ["build_demo", "demo_models_dir"]


def demo_models_dir(profile: str | None = None) -> tuple[str, object]:
    """(profile, checkpoint folder) of the demo: 'shipped' when the checkout has shipped checkpoints (the
    default), else the folder a training profile writes."""
    from polcore.ingest import checkpoints

    if profile is None:
        profile = "shipped" if checkpoints(settings.shipped_models_dir()) else "quick"
    if profile == "shipped":
        return profile, settings.shipped_models_dir()
    return profile, settings.models_dir() / profile


def build_demo(db_path=None, *, profile: str | None = None, progress: Progress | None = None,
               library=None, models_dir=None, scans: dict | None = None, scans_dir=None,
               embed_methods=("pca", "umap")) -> dict:
    """Build the demo database; returns a summary with the elapsed time per step [s].

    Parameters
    ----------
    profile : 'shipped' (the committed checkpoints, no training), 'quick' or 'paper' (train on the committed
        library first); None = 'shipped' when ``data/models/shipped`` holds checkpoints, else 'quick'.
    progress : optional ``progress(fraction, message)``; training 0-0.55, scans 0.55-0.6, inference 0.6-0.9,
        benchmark and embeddings 0.9-1.
    library : the pattern library the scans are composed from (default: the committed one).
    models_dir : use the checkpoints in this folder instead (no training).
    scans : name -> (kind, benchmark row, ScanComposerConfig); default ``composer.DEFAULT_SCANS``.
    scans_dir : where the scans are composed (default :func:`polcore.settings.scans_dir`).
    embed_methods : embedding methods of the Embeddings page.
    """
    from polcore.benchmark import run_bench
    from polcore.heldout import load_results
    from polcore.ingest import checkpoints, ingest_scan, load_models
    from polcore.reports import compute_embeddings
    from polcore.simulate import load_library
    from polcore.simulate.composer import DEFAULT_SCANS, build_default_scans
    from polcore.store import PredictionStore

    progress = report(progress)
    db_path = db_path or settings.db_path()
    t0 = time.perf_counter()
    summary: dict = {}
    profile, out = ("given", models_dir) if models_dir is not None else demo_models_dir(profile)
    lib = library if library is not None else load_library()
    scans = DEFAULT_SCANS if scans is None else scans
    if profile in ("shipped", "given"):
        if not checkpoints(out):
            raise FileNotFoundError(f"{out}: no checkpoints; use --profile quick to train the demo models")
        progress(0.55, f"using the shipped models in {out}")
    else:
        from polcore.train import train_profile

        progress(0.0, f"training the '{profile}' profile")
        train_profile(profile, lib, out, progress=scaled(progress, 0.0, 0.55, "train: "))
    summary["train_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    paths = build_default_scans(scans_dir or settings.scans_dir(), lib, progress=scaled(progress, 0.55, 0.6),
                                table=scans)
    summary["scans_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    models = load_models(checkpoints(out))
    for i, (name, path) in enumerate(paths.items()):
        kind, row, _ = scans[name]
        ingest_scan(path, None, db_path, name=name, kind=kind, dataset=row, models=models,
                    progress=scaled(progress, 0.6 + 0.3 * i / len(paths), 0.6 + 0.3 * (i + 1) / len(paths),
                                    f"{name}: "))
    summary["inference_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    progress(0.9, "benchmark table")
    bench = run_bench(db_path)
    summary["heldout_rows"] = load_results(db_path, [out])
    progress(0.92, "embeddings and domain gap (UMAP compiles on first use)")
    summary["domain_gap_auc"] = compute_embeddings(db_path, methods=embed_methods,
                                                   progress=scaled(progress, 0.92, 1.0))
    summary["bench_rows"] = len(bench)
    summary["analysis_s"] = time.perf_counter() - t3
    summary["total_s"] = time.perf_counter() - t0
    PredictionStore(db_path).cache_put("demo_summary", json.loads(json.dumps(summary, default=float)))
    progress(1.0, f"demo ready in {summary['total_s']:.0f} s")
    return summary

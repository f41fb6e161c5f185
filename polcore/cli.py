"""Command line: ``python -m polcore {simulate,train,ingest,bench,demo,analyze,figure}``.

Every subcommand prints progress and an elapsed-time total. Heavy modules are imported by the subcommand
that needs them, so ``python -m polcore --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from polcore import settings
from polcore.progress import printer as _fraction_printer


def _cmd_simulate_draws(args) -> int:
    from polcore.simulate.draws import DRAW_PROFILES, build_draws

    cfg = DRAW_PROFILES[args.profile]
    out = args.out
    print(f"simulating the '{args.profile}' draw library with abTEM: {sum(cfg.counts.values())} draws "
          f"({cfg.counts}), thicknesses {cfg.thickness_nm} nm, {cfg.phonon_snapshots} phonon snapshots "
          f"({cfg.test_phonon_snapshots} for held-out draws); resumable, several processes may share it",
          flush=True)
    t0 = time.perf_counter()
    if getattr(args, "dask", None) is not None:  # one task per draw on a Dask cluster; this process writes
        from polcore.distributed import build_draws_distributed, dask_executor

        with dask_executor(args.dask, n_workers=args.dask_workers) as ex, \
                _tqdm_fraction(f"library {args.profile} (Dask)") as bar:
            made = build_draws_distributed(ex, cfg, out, limit=args.limit, progress=bar)
    else:
        with _tqdm_fraction(f"library {args.profile}") as bar:
            made = build_draws(cfg, out, limit=args.limit, progress=bar)
    print(f"simulated {len(made)} draw(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _tqdm_fraction(desc: str):
    from polcore.progress import TqdmProgress

    return TqdmProgress(desc)


def _cmd_simulate_library(args) -> int:
    from polcore.simulate.build import PROFILES, build_library
    from polcore.simulate.draws import DRAW_PROFILES

    if args.profile in DRAW_PROFILES and args.profile not in PROFILES:
        return _cmd_simulate_draws(args)
    if args.profile.startswith("draws-"):
        args.profile = args.profile[len("draws-"):]
        return _cmd_simulate_draws(args)
    if args.dask is not None:
        raise ValueError("--dask builds the draw libraries (--profile train / draws-tiny), one task per draw; a "
                         f"one-file library ({args.profile}) is simulated by one process")

    cfg = PROFILES[args.profile]
    print(f"simulating the '{args.profile}' library with abTEM: {cfg.n_configs} configurations x 3 base variants, "
          f"thicknesses {cfg.thickness_nm} nm, {cfg.positions}x{cfg.positions} probe positions", flush=True)
    t0 = time.perf_counter()
    out = build_library(cfg, args.out, progress=_fraction_printer("library"))
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _cmd_simulate_scan(args) -> int:
    from polcore.simulate.composer import ScanComposerConfig, compose_scan, write_emd
    from polcore.simulate.library import load_library

    kw = dict(layout=args.layout, ny=args.ny, nx=args.nx, step_nm=args.step_nm, defects=args.defects,
              dose=args.dose, blur_px=args.blur, background=args.background, descan_px=args.descan,
              hot_pixels=args.hot_pixels, det_px=args.det_px, det_mrad_per_px=args.det_mrad,
              calibrated=not args.no_calibration, seed=args.seed, wall=args.wall, roles=tuple(args.roles))
    if args.thickness_range:
        kw["thickness_range"] = tuple(args.thickness_range)
    else:
        kw["thickness_nm"] = args.thickness
    cfg = ScanComposerConfig(**kw)
    t0 = time.perf_counter()
    lib = load_library(args.library)
    truth, blocks = compose_scan(cfg, lib)
    out = write_emd(args.out, truth, blocks, cfg)
    print(f"wrote {out}: {cfg.ny}x{cfg.nx} positions, {cfg.det_px}x{cfg.det_px} px, layout {cfg.layout}, "
          f"{int(truth['defect'].sum())} defect positions, cell period {truth['cell_px']:.2f} px "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_simulate_defaults(args) -> int:
    from polcore.simulate.composer import build_default_scans

    t0 = time.perf_counter()
    args.out_dir = args.out_dir or settings.scans_dir()
    paths = build_default_scans(args.out_dir, progress=_fraction_printer("scans"))
    print(f"{len(paths)} default scans in {args.out_dir} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_train(args) -> int:
    from polcore.train import profile_configs, train_profile

    t0 = time.perf_counter()
    cfgs = profile_configs(args.profile)
    if cfgs and cfgs[0].data == "draws":
        from polcore.simulate.draws import load_draws

        lib = load_draws(args.draws)
        print(f"draw library {lib.path}: " + ", ".join(f"{lib.n_draws(r)} {r}" for r in lib.roles()), flush=True)
    else:
        from polcore.simulate import load_library

        lib = load_library(args.library)
    out = args.out or settings.models_dir() / args.profile
    only = None
    if args.only:
        only = lambda c: c.name in args.only or c.family in args.only  # noqa: E731
    results = train_profile(args.profile, lib, out, progress=_fraction_printer("train"), only=only)
    for r in results:
        print(f"{r.name}: held-out per pattern {r.test_acc}, by thickness {r.test_acc_by_thickness}", flush=True)
    print(f"{len(results)} model(s) in {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _geometry_lines(g: dict) -> list[str]:
    """The geometry used by an ingest, for the terminal (one line, then one per warning)."""
    src, conf = g.get("sources") or {}, g.get("confidence") or {}

    def tag(key):
        c = conf.get(key)
        return f"{src.get(key, '?')}" + (f", {c}" if c and src.get(key) == "estimated" else "")

    d = (g.get("details") or {}).get("descan") or {}
    descan = ("none" if not g.get("descan_y") else
              f"{d.get('range_y_px', 0):.1f} x {d.get('range_x_px', 0):.1f} px" if src.get("descan") == "estimated"
              else "constant centre" if src.get("descan") == "default" else "given")
    mrad = g.get("mrad_per_px")
    lines = [f"geometry: rotation {g.get('rotation_deg', 0.0):.1f} deg ({tag('rotation_deg')}), "
             f"{'flip' if g.get('flip') else 'no flip'} ({tag('flip')}), descan {descan} ({tag('descan')}), "
             f"{'?' if mrad is None else f'{mrad:.3f}'} mrad/px ({tag('mrad_per_px')})"]
    lines += [f"geometry warning: {w}" for w in g.get("warnings") or ()]
    return lines


def _cmd_ingest(args) -> int:
    from polcore.ingest import ingest_many
    from polcore.store import PredictionStore, queries

    t0 = time.perf_counter()
    db = args.db or settings.db_path()
    if args.name is not None and len(args.scan) > 1:
        raise ValueError(f"--name names one scan; {len(args.scan)} scan files were given")
    kw = dict(progress=_fraction_printer("ingest"), name=args.name, kind=args.kind, model_dir=args.model_dir,
              rotation_deg=args.rotation_deg, flip=args.flip)
    if args.dask is None:
        if args.dask_workers is not None or args.block_patterns is not None:
            raise ValueError("--dask-workers and --block-patterns need --dask")
        results = ingest_many(args.scan, args.models, db, **kw)
    else:
        from polcore.distributed import LOCAL, dask_executor, n_workers

        if args.dask != LOCAL and args.dask_workers is not None:
            raise ValueError("--dask-workers sizes a LocalCluster; a running cluster has its own workers")
        with dask_executor(args.dask, n_workers=args.dask_workers) as ex:
            where = "a LocalCluster" if args.dask == LOCAL else args.dask
            print(f"Dask: {n_workers(ex)} worker(s) on {where}; "
                  f"{'row blocks of one scan' if len(args.scan) == 1 else 'one task per scan'}", flush=True)
            results = ingest_many(args.scan, args.models, db, executor=ex, block_patterns=args.block_patterns, **kw)
    runs = queries.list_runs(PredictionStore(db))
    for res in results:
        if res.geometry:
            for line in _geometry_lines(res.geometry):
                print(line, flush=True)
        else:
            print("geometry: nothing ran (already ingested); see the runs' config", flush=True)
        mine = runs[runs["scan_id"] == res.scan_id]
        cols = [c for c in ("model", "n_patterns", "seconds", "patterns_per_s", "device") if c in mine.columns]
        print(mine[cols].to_string(index=False))
    ids = ", ".join(str(r.scan_id) for r in results)
    print(f"scan{'s' if len(results) > 1 else ''} {ids} ingested into {db} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_bench(args) -> int:
    import pandas as pd

    from polcore.benchmark import run_bench, training_table
    from polcore.store import PredictionStore, queries

    t0 = time.perf_counter()
    args.db = args.db or settings.db_path()
    args.model_dir = args.model_dir or [settings.models_dir()]
    if args.limit or args.draw_curve or args.heldout:
        return _cmd_bench_draws(args, t0)
    run_bench(args.db)
    table = queries.pivot_benchmark(queries.benchmark_table(PredictionStore(args.db)))
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        print(table.T.to_string())
        print("\n(accuracy on each data set: mean +- std over seeds; rows = models, columns = data sets)\n")
        print(training_table(args.db).to_string(index=False))
        print("\n(heldout_train_thickness / other_thickness: library 'test' configurations; experimental_like: "
              "mean over the experimental-like scans)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_bench_draws(args, t0: float) -> int:
    import pandas as pd

    from polcore import heldout

    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.precision", 3):
        if args.limit:
            df = heldout.run_limit(args.draws, args.db, args.results)
            print("physics limit (ideal observer; probe position and thickness known):")
            print(df.pivot_table(index=["role", "name", "dose"], columns="thickness_nm",
                                 values=["per_pattern", "per_cell"]).round(3).to_string())
        if args.draw_curve:
            df = heldout.run_draw_curve(args.draws, args.results)
            print("nuisance-unknown ideal observer against the number of training draws (2e4 e-/pattern):")
            print(df.pivot_table(index="n_train_draws", columns="thickness_nm",
                                 values=["per_pattern", "per_cell"]).round(3).to_string())
        if args.heldout:
            df = heldout.model_heldout_rows(args.model_dir)
            df.to_csv(args.results / "models_heldout.csv", index=False)
            if len(df):
                from polcore.store import PredictionStore

                PredictionStore(args.db).write_heldout(df)
            print(df.pivot_table(index=["role", "name", "dose"], columns="thickness_nm",
                                 values=["per_pattern", "per_cell"]).round(3).to_string())
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_demo(args) -> int:
    import os
    import signal

    from polcore.demo import run_build

    def _stop(signum, frame):  # SIGTERM (kill, a closed dashboard's session): recorded as a failure
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    t0 = time.perf_counter()
    args.db = args.db or settings.db_path()
    summary = run_build(args.db, status_file=args.status_file, if_needed=args.if_needed, profile=args.profile,
                        scans=args.scans or os.environ.get("POLBENCH_DEMO_SCANS") or "default",
                        progress=_fraction_printer("demo"), say=lambda m: print(m, flush=True))
    if summary is None:
        return 0
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(f"demo database {args.db} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _cmd_analyze(args) -> int:
    import pandas as pd

    from polcore.reports import analysis_report

    df = analysis_report(args.db or settings.db_path())
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(df.to_string(index=False))
    return 0


def _cmd_figure(args) -> int:
    from polcore.panel import FORMATS, panel_figure, panel_size_px, save_panel

    t0 = time.perf_counter()
    db = args.db or settings.db_path()
    bad = [str(o) for o in args.out if o.suffix.lower().lstrip(".") not in FORMATS]
    if bad:
        raise ValueError(f"unsupported figure format of {', '.join(bad)}; use one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    fig = panel_figure(db, args.scan, args.model, layer=args.layer)  # read once, written in every format
    outs = [save_panel(fig, out) for out in args.out]
    for out in outs:
        print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
    png = [o for o in outs if o.suffix.lower() == ".png"]
    if png:
        from PIL import Image

        with Image.open(png[0]) as im:
            w, h = im.size
        print(f"PNG {w} x {h} px (4 panels with ground truth: {panel_size_px(True)}, 2 without: "
              f"{panel_size_px(False)})")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m polcore", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="abTEM pattern library and scan composer")
    simsub = sim.add_subparsers(dest="what", required=True)
    lib = simsub.add_parser("library", help="simulate a pattern library with abTEM")
    lib.add_argument("--profile", default="default", choices=["default", "paper", "tiny", "train", "draws-tiny"],
                     help="default/paper/tiny: one-file libraries (the committed one is 'default'); train: the "
                          "training library of independent nuisance draws (data/library/draws/train, resumable); "
                          "draws-tiny: the same at test size")
    lib.add_argument("--out", type=Path, default=None,
                     help="output HDF5 (default data/library/knn_<profile>.h5), or the draws folder")
    lib.add_argument("--limit", type=int, default=None, help="draw libraries: stop after this many draws")
    lib.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="draw libraries: one task per draw on a Dask cluster (tcp://host:8786, or 'local' / nothing "
                          "for a LocalCluster); this process writes the draw files")
    lib.add_argument("--dask-workers", type=int, default=None, metavar="N", help="--dask local: worker processes")
    lib.set_defaults(func=_cmd_simulate_library)

    sc = simsub.add_parser("scan", help="compose a scan with ground truth from the library")
    sc.add_argument("--layout", default="stripes", choices=["single", "stripes", "checker", "random_domains"])
    g = sc.add_mutually_exclusive_group()
    g.add_argument("--thickness", type=float, default=20.0, help="constant thickness [nm]")
    g.add_argument("--thickness-range", type=float, nargs=2, metavar=("LEFT", "RIGHT"),
                   help="wedge along x [nm]")
    sc.add_argument("--step-nm", type=float, default=None, help="probe step [nm] (default: lattice / 8)")
    sc.add_argument("--ny", type=int, default=64)
    sc.add_argument("--nx", type=int, default=64)
    sc.add_argument("--defects", type=int, default=0, help="number of defect sites")
    sc.add_argument("--dose", type=float, default=None, help="electrons per pattern (Poisson counts)")
    sc.add_argument("--blur", type=float, default=0.0, help="detector blur sigma [px]")
    sc.add_argument("--background", type=float, default=0.0, help="background, fraction of the mean pattern")
    sc.add_argument("--descan", type=float, default=0.0, help="disc centre drift across the scan [px]")
    sc.add_argument("--hot-pixels", type=int, default=0)
    sc.add_argument("--det-px", type=int, default=64, help="output detector size [px]")
    sc.add_argument("--det-mrad", type=float, default=None, help="output detector sampling [mrad/px]")
    sc.add_argument("--no-calibration", action="store_true", help="omit the detector calibration")
    sc.add_argument("--wall", default="90", choices=["90", "180"])
    sc.add_argument("--roles", nargs="+", default=["test"], choices=["train", "val", "test"],
                    help="library configurations to draw from")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--library", type=Path, default=None)
    sc.add_argument("--out", type=Path, required=True)
    sc.set_defaults(func=_cmd_simulate_scan)

    dfl = simsub.add_parser("defaults", help="compose the default data sets (demo and benchmark rows)")
    dfl.add_argument("--out-dir", type=Path, default=None, help="default <data dir>/scans")
    dfl.set_defaults(func=_cmd_simulate_defaults)

    tr = sub.add_parser("train", help="train a model profile on the pattern library")
    tr.add_argument("--profile", default="quick", choices=["quick", "paper", "cpu", "default"],
                    help="quick/paper: the committed one-file library; cpu: the draw library (all thicknesses); "
                         "default: the shipped models (a subset of cpu)")
    tr.add_argument("--library", type=Path, default=None)
    tr.add_argument("--draws", type=Path, default=None,
                    help="draw library folder (default ~/.cache/polbench/draws/train)")
    tr.add_argument("--only", nargs="+", default=None, help="train only these run names or families")
    tr.add_argument("--out", type=Path, default=None, help="checkpoint folder (default <models dir>/<profile>)")
    tr.set_defaults(func=_cmd_train)

    ing = sub.add_parser("ingest", help="run models on scans and store the predictions",
                         description="Run models on one or more scans and store the predictions (each scan in one "
                                     "transaction, written by this process only). --dask spreads the work over a "
                                     "Dask cluster: one task per scan, or the row blocks of a single scan.")
    ing.add_argument("scan", type=Path, nargs="+", help="scan file(s)")
    ing.add_argument("--models", nargs="*", default=None, help="model names (default: all in --model-dir)")
    ing.add_argument("--model-dir", type=Path, default=None, help="checkpoints (default $POLBENCH_MODELS or <data dir>/models)")
    ing.add_argument("--db", type=Path, default=None, help="DuckDB file (default $POLBENCH_DB or <data dir>/polbench.duckdb)")
    ing.add_argument("--name", default=None)
    ing.add_argument("--kind", default="experimental", choices=["synthetic", "pseudo_experimental", "experimental"])
    ing.add_argument("--rotation-deg", type=float, default=None,
                     help="detector-to-scan rotation [deg], counter-clockwise on screen (py4DSTEM QR_rotation_degrees);"
                          " default: the file's calibration, else estimated from the data (applied if confident)")
    ing.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                     help="detector axes transposed before the rotation (py4DSTEM QR_flip); default: file, else estimate")
    ing.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="predict on a Dask cluster: a scheduler address (tcp://host:8786; start it with `dask "
                          "scheduler` and `dask worker tcp://host:8786` on machines that see the same files), or "
                          "'local' / nothing for a LocalCluster on this machine")
    ing.add_argument("--dask-workers", type=int, default=None, metavar="N",
                     help="--dask local: worker processes (default: the CPU cores, at most 4)")
    ing.add_argument("--block-patterns", type=int, default=None, metavar="N",
                     help="--dask with one scan: patterns per task (whole rows; default 8192)")
    ing.set_defaults(func=_cmd_ingest)

    be = sub.add_parser("bench", help="the study's benchmark table from the stored runs; --limit, --draw-curve "
                                      "and --heldout work on the draw library")
    be.add_argument("--db", type=Path, default=None, help="DuckDB file (default $POLBENCH_DB or <data dir>/polbench.duckdb)")
    be.add_argument("--limit", action="store_true",
                    help="the physics limit: ideal observer on the held-out draws (nuisances known / unknown)")
    be.add_argument("--draw-curve", action="store_true",
                    help="nuisance-unknown accuracy against the number of training draws")
    be.add_argument("--heldout", action="store_true", help="held-out rows of every draw-trained checkpoint")
    be.add_argument("--draws", type=Path, default=None, help="draw library folder")
    be.add_argument("--model-dir", type=Path, nargs="+", default=None, help="checkpoint folders (default <data dir>/models)")
    be.add_argument("--results", type=Path, default=Path("docs") / "results", help="CSV/PNG output folder")
    be.set_defaults(func=_cmd_bench)

    de = sub.add_parser("demo", help="build the demo database from the committed library (idempotent)")
    de.add_argument("--db", type=Path, default=None, help="DuckDB file (default $POLBENCH_DB or <data dir>/polbench.duckdb)")
    de.add_argument("--profile", default=None, choices=["shipped", "quick", "paper"],
                    help="shipped: the committed checkpoints (data/models/shipped, no training); quick/paper: "
                         "train on the committed library first; default: shipped when present, else quick")
    de.add_argument("--status-file", type=Path, default=None,
                    help="progress as JSON (fraction, message, step, started, updated, pid, done, error), rewritten "
                         "atomically; the Overview page reads it (default <db folder>/demo_status.json)")
    de.add_argument("--if-needed", action="store_true",
                    help="build only when the database is missing or an earlier build of it did not finish, and "
                         "leave at once when a build is running (what `make run` starts in the background)")
    de.add_argument("--scans", default=None, choices=["default", "tiny"],
                    help="default: the 9 default scans, PCA and UMAP embeddings; tiny: one 16x16 scan, PCA only "
                         "(seconds, for tests); default $POLBENCH_DEMO_SCANS or 'default'")
    de.set_defaults(func=_cmd_demo)

    an = sub.add_parser("analyze", help="periodic errors, defect ROC-AUC and domain gap per run")
    an.add_argument("--db", type=Path, default=None, help="DuckDB file (default $POLBENCH_DB or <data dir>/polbench.duckdb)")
    an.set_defaults(func=_cmd_analyze)

    fi = sub.add_parser("figure", help="a figure panel for slides: virtual ADF with polarization arrows, class map, "
                                       "error map, confusion matrix (PNG, SVG or PDF)")
    fi.add_argument("scan", help="scan name (or id) in the store")
    fi.add_argument("--model", required=True, help="model name (see the Benchmark page or `bench`)")
    fi.add_argument("--out", type=Path, nargs="+", required=True,
                    help="output file(s); the format follows the suffix: .png, .svg, .pdf")
    fi.add_argument("--layer", default="pattern", choices=["pattern", "cell"],
                    help="layer of the class map, error map and confusion matrix (arrows: per cell when stored)")
    fi.add_argument("--db", type=Path, default=None, help="DuckDB file (default $POLBENCH_DB or <data dir>/polbench.duckdb)")
    fi.set_defaults(func=_cmd_figure)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a busy / unusable database: one line, exit 2. The store's and the
    readers' error classes are looked up only if their modules were imported (so ``--help`` stays instant)."""
    kinds: list[type[BaseException]] = [ValueError, OSError]  # ScanFormatError is a ValueError
    for module, name in (("polcore.store.connection", "StoreError"), ("polcore.io.errors", "ScanFormatError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            kinds.append(cls)
    return tuple(kinds)


def _report(exc: BaseException, verbose: bool, prefix: str = "error") -> None:
    """One line on stderr (the traceback too with -v)."""
    if verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    text = " ".join(str(exc).split()) or type(exc).__name__
    hint = "" if verbose else " (run with -v for the traceback)"
    if prefix != "error":
        text = f"{type(exc).__name__}: {text}{hint}"
    print(f"{prefix}: {text}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """Run one subcommand. Every failure is ONE line on stderr and a non-zero exit: 2 for bad input or an
    unusable / busy database (StoreError, ScanFormatError, ValueError, OSError), 130 for Ctrl-C, 1 for anything
    unexpected; ``-v`` prints the traceback as well."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if args.verbose:
            _report(exc, True)
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line reports every failure as one line
        if isinstance(exc, _expected_errors()):
            _report(exc, args.verbose)
            return 2
        _report(exc, args.verbose, prefix="unexpected error")
        return 1

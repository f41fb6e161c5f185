"""A small, real prediction store for the dashboard tests (AppTest and browser).

Everything is written to a temporary data directory:

* ``scans/*.h5``: four small scans in the composer's EMD 1.0 layout (py4DSTEM ``datacube`` with
  calibration), three with ``ground_truth/{label,thickness_nm,defect,region}`` (two synthetic, one
  experimental-like with defects) and one experimental scan without ground truth, as a user would upload.
  Patterns are a bright-field disc whose intensity tilts towards the polarization direction, so that the
  direction is visible in the data.
* ``polbench.duckdb``: those scans, four models and their runs, written through ``PredictionStore``.
  Predictions are made by hand with numpy (the truth plus errors that repeat with the lattice, random errors
  and scrambled defect positions), so tests know what the pages must show. Benchmark rows, embeddings and
  domain gaps are computed with ``polcore.analysis`` from those predictions.
* ``models/pca_knn-cls-s0.npz``: a real, fitted PCA+kNN checkpoint trained on patterns of the same kind,
  so that an upload can be ingested end to end with ``polcore.bench.ingest_scan``.

Build time is about a second (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from polcore.io.ground_truth import write_ground_truth
from polcore.types import class_to_vector

__all__ = [
    "StoreInfo",
    "build_store",
    "write_scan",
    "write_plain_scan",
    "disc_patterns",
    "make_labels",
    "fake_predictions",
    "write_checkpoint",
    "DET",
    "CELL_PX",
]

DET = 32  # detector pixels per side
CELL_PX = 6.0  # lattice period in scan pixels
MRAD_PER_PX = 1.0
STEP_NM = 0.395 / CELL_PX

#: name -> (family, head, seed, periodic error probability, random error probability)
MODELS: dict[str, tuple[str, str, int, float, float]] = {
    "resnet-cls-s0": ("resnet", "cls", 0, 0.55, 0.04),
    "resnet-cls-s1": ("resnet", "cls", 1, 0.45, 0.06),
    "custom_cnn-proto-s0": ("custom_cnn", "proto", 0, 0.75, 0.10),
    "pca_knn-cls-s0": ("pca_knn", "cls", 0, 0.85, 0.25),
}

#: name -> (kind, dataset, ny, nx, thickness (constant nm or (left, right) wedge), n defects, seed)
SCANS: dict[str, tuple] = {
    "syn_20nm": ("synthetic", "synthetic 20 nm", 24, 24, 20.0, 0, 1),
    "syn_35nm": ("synthetic", "synthetic 35 nm", 24, 24, 35.0, 0, 2),
    "exp_wedge": ("pseudo_experimental", "experimental-like wedge", 30, 36, (15.0, 45.0), 2, 3),
}


@dataclass
class StoreInfo:
    """Paths and ids of a test store."""

    data_dir: Path
    db: Path
    scans: dict[str, Path] = field(default_factory=dict)
    scan_ids: dict[str, int] = field(default_factory=dict)
    model_ids: dict[str, int] = field(default_factory=dict)
    run_ids: dict[tuple[str, str], int] = field(default_factory=dict)
    checkpoint: Path | None = None

    def env(self) -> dict[str, str]:
        """Environment variables that point the dashboard at this store."""
        return {"POLBENCH_DB": str(self.db), "POLBENCH_DATA": str(self.data_dir)}


def make_labels(ny: int, nx: int, rng: np.random.Generator, n_domains: int = 4) -> np.ndarray:
    """Domain map (ny, nx) int8 of classes 0..7: Voronoi cells around ``n_domains`` random seeds."""
    centres = rng.uniform([0, 0], [ny, nx], size=(n_domains, 2))
    classes = rng.choice(8, size=n_domains, replace=False)
    yy, xx = np.mgrid[0:ny, 0:nx]
    d = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    return classes[np.argmin(d, axis=-1)].astype(np.int8)


def disc_patterns(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    det: int = DET,
    radius: float = 6.0,
    tilt: float = 0.5,
    noise: float = 0.02,
) -> np.ndarray:
    """Patterns (..., det, det) float32: a disc brighter towards each label's direction (-1: symmetric)."""
    lab = np.asarray(labels)
    c = (det - 1) / 2.0
    ky, kx = np.mgrid[0:det, 0:det].astype(np.float32)
    dx, dy = kx - c, -(ky - c)  # on-screen frame: y up
    disc = (dx**2 + dy**2 <= radius**2).astype(np.float32)
    vec = np.where(lab[..., None] >= 0, class_to_vector(np.maximum(lab, 0)), 0.0).astype(np.float32)
    ramp = (vec[..., 0, None, None] * dx + vec[..., 1, None, None] * dy) / radius
    out = disc * (1.0 + tilt * ramp) + noise * rng.standard_normal(lab.shape + (det, det)).astype(np.float32)
    return np.maximum(out, 0.0).astype(np.float32)


def write_scan(
    path: Path,
    labels: np.ndarray,
    thickness: np.ndarray,
    defect: np.ndarray,
    rng: np.random.Generator,
    *,
    region: np.ndarray | None = None,
    cell_px: float = CELL_PX,
    ground_truth: bool = True,
) -> Path:
    """Write a scan in the composer's EMD 1.0 layout (with ``ground_truth/`` unless told not to)."""
    ny, nx = labels.shape
    pats = disc_patterns(np.where(defect, -1, labels), rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(
            emd_group_type="file", version_major=1, version_minor=0, authoring_program="polbench-tests"
        )
        root = f.create_group("polbench_root")
        root.attrs.update(emd_group_type="root", python_class="Root")
        dc = root.create_group("datacube")
        dc.attrs.update(emd_group_type="array", python_class="DataCube")
        dc.create_dataset("data", data=pats, chunks=(1, nx, DET, DET))
        for i, (name, size, units) in enumerate(
            [
                ("Rx", STEP_NM, "nm"),
                ("Ry", STEP_NM, "nm"),
                ("Qx", MRAD_PER_PX, "mrad"),
                ("Qy", MRAD_PER_PX, "mrad"),
            ]
        ):
            ds = dc.create_dataset(f"dim{i}", data=np.array([0.0, size]))
            ds.attrs.update(name=name, units=units)
        if not ground_truth:
            return path
        truth = dict(label=np.where(defect, -1, labels), thickness_nm=thickness, defect=defect,
                     region=labels if region is None else region)
        write_ground_truth(f, truth, dict(cell_px=cell_px, step_nm=STEP_NM))
    return path


def fake_predictions(
    labels: np.ndarray,
    defect: np.ndarray,
    rng: np.random.Generator,
    *,
    p_periodic: float,
    p_random: float,
    cell_px: float = CELL_PX,
) -> dict[str, np.ndarray]:
    """Hand-made predictions: truth, plus errors on the A-column sites of the lattice (probability
    ``p_periodic``), random errors elsewhere (``p_random``) and random classes on defects.

    Returns
    -------
    dict of (ny, nx) maps ``pred`` int8, ``probs`` (ny, nx, 8) float32, ``confidence`` float32.
    """
    ny, nx = labels.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    on_site = (np.mod(yy, cell_px) < 2) & (np.mod(xx, cell_px) < 2)
    wrong = np.where(on_site, rng.random((ny, nx)) < p_periodic, rng.random((ny, nx)) < p_random)
    shift = rng.choice([1, -1, 1, -1, 2, 4], size=(ny, nx))
    pred = np.where(wrong, np.mod(labels + shift, 8), labels)
    pred = np.where(defect, rng.integers(0, 8, size=(ny, nx)), pred).astype(np.int8)
    logits = rng.normal(0.0, 0.7, size=(ny, nx, 8))
    boost = np.where(wrong | defect, 1.2, 3.0)
    np.put_along_axis(logits, pred[..., None].astype(np.int64), boost[..., None] + 0.5, axis=-1)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    pred = probs.argmax(axis=-1).astype(np.int8)
    return {
        "pred": pred,
        "probs": probs.astype(np.float32),
        "confidence": probs.max(axis=-1).astype(np.float32),
    }


def write_plain_scan(path: Path, ny: int, nx: int, *, thickness_nm: float = 20.0, seed: int = 0) -> Path:
    """A small scan of random domains at one thickness, without defects (:func:`write_scan`), for ingest tests."""
    rng = np.random.default_rng(seed)
    lab = make_labels(ny, nx, rng)
    return write_scan(path, lab, np.full(lab.shape, thickness_nm, np.float32), np.zeros(lab.shape, bool), rng)


def write_checkpoint(models_dir: Path, rng: np.random.Generator) -> Path:
    """Fit a real PCA+kNN model on disc patterns and save it (``pca_knn-cls-s0``) with its preprocessing."""
    from polcore.models import build_model, save_checkpoint
    from polcore.preprocess import Preprocessor

    labels = np.repeat(np.arange(8), 40).astype(np.int8)
    pats = disc_patterns(labels, rng)
    pre = Preprocessor(target_mrad_per_px=0.5, convergence_mrad=6.0).fit_mean(pats.mean(axis=0), MRAD_PER_PX)
    x = pre.transform(pats)
    model = build_model("pca_knn", "cls", n_components=8, n_neighbors=3).fit(x, labels)
    meta = {"preprocessing": pre.unfitted_copy().to_dict(), "train_config": {"seed": 0}, "seed": 0}
    return save_checkpoint(model, models_dir / "pca_knn-cls-s0", meta=meta)


def build_store(data_dir: Path, *, seed: int = 7, checkpoint: bool = True) -> StoreInfo:
    """Build the test store under ``data_dir`` (scans, database, optional checkpoint); see the module doc."""
    from polcore.analysis import domain_gap, embed_2d, irregularity, metrics_table
    from polcore.io import sha256_file
    from polcore.store import PredictionStore

    rng = np.random.default_rng(seed)
    data_dir = Path(data_dir)
    info = StoreInfo(data_dir=data_dir, db=data_dir / "polbench.duckdb")
    store = PredictionStore(info.db)
    truth = {}
    for name, (kind, dataset, ny, nx, th, n_def, s) in SCANS.items():
        r = np.random.default_rng(s)
        labels = make_labels(ny, nx, r)
        if isinstance(th, tuple):
            thickness = np.broadcast_to(np.linspace(th[0], th[1], nx, dtype=np.float32), (ny, nx)).copy()
        else:
            thickness = np.full((ny, nx), th, np.float32)
        defect = np.zeros((ny, nx), bool)
        for _ in range(n_def):
            y, x = r.integers(3, ny - 5), r.integers(3, nx - 5)
            defect[y : y + 3, x : x + 3] = True
        path = write_scan(data_dir / "scans" / f"{name}.h5", labels, thickness, defect, r)
        info.scans[name] = path
        info.scan_ids[name] = store.add_scan(
            name=name,
            kind=kind,
            dataset=dataset,
            sha256=sha256_file(path),
            ny=ny,
            nx=nx,
            ky=DET,
            kx=DET,
            source_file=str(path),
            step_nm=STEP_NM,
            thickness_nm=None if isinstance(th, tuple) else float(th),
            cell_px=CELL_PX,
            has_ground_truth=True,
        )
        truth[name] = (labels, thickness, defect)
    # an experimental scan without ground truth (what a user uploads), with runs of two models
    r = np.random.default_rng(9)
    nog_labels = make_labels(20, 20, r)
    nog = write_scan(
        data_dir / "scans" / "exp_nogt.h5",
        nog_labels,
        np.full((20, 20), 30.0, np.float32),
        np.zeros((20, 20), bool),
        r,
        ground_truth=False,
    )
    info.scans["exp_nogt"] = nog
    info.scan_ids["exp_nogt"] = store.add_scan(
        name="exp_nogt",
        kind="experimental",
        dataset="uploads",
        sha256=sha256_file(nog),
        ny=20,
        nx=20,
        ky=DET,
        kx=DET,
        source_file=str(nog),
        step_nm=STEP_NM,
        cell_px=CELL_PX,
        has_ground_truth=False,
    )
    bench_rows, features = [], {}
    for mname, (family, head, mseed, p_per, p_rand) in MODELS.items():
        mid = store.add_model(
            name=mname,
            family=family,
            head=head,
            seed=mseed,
            train_seconds=10.0 + 5 * mseed,
            config={"note": "hand-made test model"},
        )
        info.model_ids[mname] = mid
        for sname, (labels, thickness, defect) in truth.items():
            extra = 0.1 if SCANS[sname][0] != "synthetic" else 0.0
            pr = fake_predictions(labels, defect, rng, p_periodic=p_per, p_random=p_rand + extra)
            true = np.where(defect, -1, labels)
            irr = irregularity(pr["pred"], pr["probs"], period_px=CELL_PX)
            maps = {
                **pr,
                "true_label": true,
                "thickness_nm": thickness,
                "is_defect": defect,
                "region": labels.astype(np.int16),
                "irregularity": irr,
            }
            rid = store.write_run(
                mid, info.scan_ids[sname], maps, seconds=0.01 * labels.size / (1 + mseed), device="cpu"
            )
            info.run_ids[(mname, sname)] = rid
            ny, nx = labels.shape
            yy, xx = np.mgrid[0:ny, 0:nx]
            df = pd.DataFrame(
                {"iy": yy.ravel(), "ix": xx.ravel(), "pred": pr["pred"].ravel(), "true_label": true.ravel()}
            )
            m = metrics_table(df)
            bench_rows.append(
                {
                    "model_name": mname,
                    "model_id": mid,
                    "family": family,
                    "head": head,
                    "seed": mseed,
                    "dataset": SCANS[sname][1],
                    "accuracy": m["accuracy"],
                    "macro_f1": m["macro_f1"],
                    "per_class_recall": list(np.nan_to_num(m["per_class_recall"], nan=np.nan)),
                    "n": m["n_labelled"],
                }
            )
            shift = 1.5 if SCANS[sname][0] != "synthetic" else 0.0
            feats = rng.normal(0, 1, size=(labels.size, 6)) + np.eye(8, 6)[labels.ravel()] * 2 + shift
            features[(mname, sname)] = (
                feats.astype(np.float32),
                yy.ravel(),
                xx.ravel(),
                true.ravel(),
                thickness.ravel(),
            )
        if mname in ("resnet-cls-s0", "pca_knn-cls-s0"):
            pr = fake_predictions(
                nog_labels, np.zeros((20, 20), bool), rng, p_periodic=p_per, p_random=p_rand
            )
            irr = irregularity(pr["pred"], pr["probs"], period_px=CELL_PX)
            info.run_ids[(mname, "exp_nogt")] = store.write_run(
                mid, info.scan_ids["exp_nogt"], {**pr, "irregularity": irr}, seconds=0.5, device="cpu"
            )
    store.write_bench(pd.DataFrame(bench_rows))
    emb_frames = []
    for mname in MODELS:
        parts = [features[(mname, s)] for s in SCANS]
        allf = np.concatenate([p[0] for p in parts])
        emb, idx = embed_2d(allf, "pca", seed=0)
        sid = np.concatenate([np.full(len(p[0]), info.scan_ids[s]) for p, s in zip(parts, SCANS)])
        cols = [np.concatenate([p[k] for p in parts]) for k in (1, 2, 3, 4)]
        emb_frames.append(
            pd.DataFrame(
                {
                    "model_id": info.model_ids[mname],
                    "method": "pca",
                    "space": "features",
                    "scan_id": sid[idx],
                    "iy": cols[0][idx],
                    "ix": cols[1][idx],
                    "e1": emb[:, 0],
                    "e2": emb[:, 1],
                    "true_label": cols[2][idx],
                    "thickness_nm": cols[3][idx],
                }
            )
        )
        gap = domain_gap(features[(mname, "syn_20nm")][0], features[(mname, "exp_wedge")][0], rng=0)
        auc = float(gap["auc"] if isinstance(gap, dict) else gap)
        store.write_domain_gap(
            info.model_ids[mname],
            info.scan_ids["syn_20nm"],
            info.scan_ids["exp_wedge"],
            auc=min(max(auc, 0.0), 1.0),
        )
    store.write_embeddings(pd.concat(emb_frames, ignore_index=True))
    if checkpoint:
        info.checkpoint = write_checkpoint(data_dir / "models", rng)
    return info


# ------------------------------------------------------------------------------ browser-test helpers

#: URL path of every page (legacy pages/ folder: the file name without its number prefix).
PAGE_PATHS: dict[str, str] = {
    "overview": "",
    "benchmark": "Benchmark",
    "confusion": "Confusion",
    "error_maps": "Error_maps",
    "embeddings": "Embeddings",
    "defects": "Defects",
    "upload": "Upload",
}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """An unused TCP port on localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StreamlitServer:
    """``streamlit run app.py`` in a subprocess on a free port, stopped on exit (context manager).

    Parameters
    ----------
    env : extra environment (POLBENCH_DB, POLBENCH_DATA).
    root : repository root (the folder holding app.py).
    timeout : seconds to wait for ``/_stcore/health``.
    """

    def __init__(self, env: dict[str, str] | None = None, root: Path | None = None, timeout: float = 90.0):
        self.root = Path(root or Path(__file__).resolve().parents[1])
        self.env = dict(env or {})
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = None

    def __enter__(self) -> StreamlitServer:
        import os
        import subprocess
        import sys
        import tempfile
        import time
        import urllib.request

        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="streamlit-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        cmd = [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(self.port),
            "--server.headless",
            "true",
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ]
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise TimeoutError(f"streamlit did not answer on {self.url} within {self.timeout} s:\n{self.log()}")

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def launch_chromium(playwright):
    """Debian's chromium through Playwright (no browser download)."""
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("chromium is not installed (make test installs it with apt-get)")
    return playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)


def wait_idle(page, timeout_ms: int = 60000, settle_ms: int = 300) -> None:
    """Wait until the app's script run has finished (stApp data-test-script-state = notRunning)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_timeout(settle_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_timeout(settle_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)


def page_problems(page) -> list[str]:
    """Texts of exception elements and of any 'Traceback' shown on the page."""
    out = [e.inner_text() for e in page.query_selector_all('[data-testid="stException"]')]
    body = page.inner_text("body")
    if "Traceback" in body:
        out.append("'Traceback' on the page")
    return out


def open_page(page, base_url: str, name: str, query: str = "", timeout_ms: int = 60000) -> float:
    """Open one page by its key in :data:`PAGE_PATHS`, wait for it to finish; returns seconds taken."""
    import time

    t0 = time.perf_counter()
    page.goto(f"{base_url}/{PAGE_PATHS[name]}{('?' + query) if query else ''}", wait_until="domcontentloaded")
    wait_idle(page, timeout_ms)
    page.wait_for_selector("h1", timeout=timeout_ms)
    return time.perf_counter() - t0


def full_screenshot(page, path, *, max_height: int = 8000) -> None:
    """Screenshot of the whole page: Streamlit scrolls inside its main block, so grow the viewport to it."""
    size = page.viewport_size
    height = page.evaluate("""() => Math.max(...['[data-testid="stMain"]',
                                               '[data-testid="stAppViewContainer"]',
                                               '[data-testid="stMainBlockContainer"]']
        .map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight), 0)""")
    page.set_viewport_size(
        {"width": size["width"], "height": int(min(max(height + 40, size["height"]), max_height))}
    )
    page.wait_for_timeout(800)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)

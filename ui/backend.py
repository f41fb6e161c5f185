"""Thin, lazy bridges to the orchestration in ``polcore.bench`` and to the scan readers.

The pages call these instead of importing heavy modules at load time; when an optional part is missing the
functions raise :class:`BackendMissing`, whose message a page shows with ``st.error``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ui import paths

CHECKPOINT_SUFFIXES = (".pt", ".npz")

__all__ = [
    "BackendMissing",
    "bench_function",
    "build_demo",
    "ingest_scan",
    "ingest_or_rollback",
    "available_models",
    "save_upload",
    "validate_scan",
    "read_pattern",
]

log = logging.getLogger(__name__)


class BackendMissing(RuntimeError):
    """A polcore function the dashboard needs is not available in this installation."""


def bench_function(name: str) -> Callable:
    """``polcore.bench.<name>``, imported on first use.

    Raises
    ------
    BackendMissing
        When polcore.bench (or the function) cannot be imported.
    """
    try:
        mod = importlib.import_module("polcore.bench")
    except ImportError as exc:
        log.exception("polcore.bench cannot be imported")
        raise BackendMissing(f"The benchmark orchestration (polcore.bench) is not available: {exc}") from exc
    fn = getattr(mod, name, None)
    if fn is None:
        raise BackendMissing(f"polcore.bench has no function {name!r} in this version.")
    return fn


def build_demo(db_path: Path, progress=None):
    """Build the demo database (``polcore.bench.build_demo``)."""
    return bench_function("build_demo")(db_path, progress=progress)


def ingest_scan(
    path: Path,
    model_names: list[str],
    db_path: Path,
    progress=None,
    name: str | None = None,
    kind: str = "experimental",
    dataset: str | None = None,
) -> int:
    """Ingest one scan with the chosen models (``polcore.bench.ingest_scan``); returns the scan_id.

    Checkpoints are looked up under ``<data dir>/models`` (the demo trains into it) when the orchestration
    accepts a ``model_dir``.
    """
    fn = bench_function("ingest_scan")
    kw: dict = {"progress": progress, "name": name, "kind": kind}
    params = inspect.signature(fn).parameters
    if "dataset" in params and dataset:
        kw["dataset"] = dataset
    if "model_dir" in params:
        kw["model_dir"] = paths.data_dir() / "models"
    return fn(Path(path).resolve(), model_names, db_path, **kw)


#: ``polcore.bench.ingest_scan`` rolls a failed ingest back itself (runs are one transaction each; a scan row
#: the call added is removed again when none of its runs was stored), so the pages' name is an alias.
ingest_or_rollback = ingest_scan


def available_models(model_dir: Path | None = None) -> dict[str, Path]:
    """Trained checkpoints under ``model_dir`` (default ``<data dir>/models``): model name -> path.

    Names follow ``polcore.bench.model_name`` (``family[-arch]-head-s<seed>``), the names ingest expects.
    """
    from polcore.models import read_checkpoint_meta

    model_dir = Path(model_dir or paths.data_dir() / "models")
    if not model_dir.is_dir():
        return {}
    name_of = bench_function("model_name")
    out: dict[str, Path] = {}
    for p in sorted(model_dir.rglob("*")):
        if p.suffix not in CHECKPOINT_SUFFIXES or not p.is_file():
            continue
        try:
            out[name_of(read_checkpoint_meta(p))] = p
        except Exception:  # noqa: BLE001 - a foreign file in the folder is skipped, not fatal
            log.warning("skipping %s: not a readable polbench checkpoint", p, exc_info=True)
    return out


def _safe_name(name: str) -> str:
    base = os.path.basename(name or "scan")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return safe[:120] or "scan"


def save_upload(
    fileobj: BinaryIO, name: str, file_id: str, dest_dir: Path | None = None, *, chunk_bytes: int = 8 << 20
) -> Path:
    """Copy an uploaded file to ``<data dir>/uploads/`` in chunks (never the whole file in memory).

    The file is written under a temporary name and renamed when complete; the final name is the sanitised
    upload name with a short hash of the upload id, so two uploads never overwrite each other.
    """
    dest_dir = Path(dest_dir or paths.uploads_dir())
    dest_dir.mkdir(parents=True, exist_ok=True)
    safe = _safe_name(name)
    stem, dot, suffix = safe.rpartition(".")
    tag = hashlib.sha1(str(file_id).encode()).hexdigest()[:8]
    final = dest_dir / (f"{stem}-{tag}.{suffix}" if dot and stem else f"{safe}-{tag}")
    if final.is_file():
        return final
    tmp = final.with_name(final.name + ".partial")
    try:
        if hasattr(fileobj, "seek"):
            fileobj.seek(0)
        with open(tmp, "wb") as out:
            shutil.copyfileobj(fileobj, out, length=chunk_bytes)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def validate_scan(path: Path) -> dict:
    """Open a scan with ``polcore.io.open_scan`` and describe it.

    Returns
    -------
    dict with nav_shape (ny, nx), sig_shape (ky, kx), dtype (str), n_patterns, meta (ScanMeta) and
    reader (class name).

    Raises
    ------
    polcore.io.ScanFormatError
        The reader's message for an unreadable or invalid file.
    """
    from polcore.io import open_scan

    scan = open_scan(path)
    ny, nx = (int(v) for v in scan.nav_shape)
    ky, kx = (int(v) for v in scan.sig_shape)
    return {
        "nav_shape": (ny, nx),
        "sig_shape": (ky, kx),
        "dtype": str(scan.dtype),
        "n_patterns": ny * nx,
        "meta": scan.meta,
        "reader": type(scan).__name__,
    }


def read_pattern(path: str | Path, iy: int, ix: int):
    """One diffraction pattern (ky, kx) of a scan file, read lazily via ``polcore.io.open_scan``."""
    from polcore.io import open_scan

    scan = open_scan(Path(path))
    return scan.pattern(int(iy), int(ix))

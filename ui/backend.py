"""The dashboard's calls into polcore: ingest, the demo build, the model list, uploads and pattern reads.

Each function calls the polcore module that does the job (:mod:`polcore.ingest`, :mod:`polcore.demo`,
:mod:`polcore.io`) directly, with the folders of :mod:`polcore.settings`. Heavy modules are imported inside the
functions, so a page loads fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO

from polcore import settings

__all__ = [
    "build_demo",
    "ingest_scan",
    "available_models",
    "save_upload",
    "validate_scan",
    "read_pattern",
]

log = logging.getLogger(__name__)

#: sha256 of each upload saved by this server process, hashed while its bytes were written (so an ingest of
#: an upload never reads the file a second time to hash it).
_UPLOAD_SHA: dict[str, str] = {}
_UPLOAD_LOCK = threading.Lock()


def build_demo(db_path: Path, progress=None):
    """Build the demo database (:func:`polcore.demo.build_demo`)."""
    from polcore.demo import build_demo as _build

    return _build(db_path, progress=progress)


def ingest_scan(path: Path, model_names: list[str], db_path: Path, progress=None, name: str | None = None,
                kind: str = "experimental", dataset: str | None = None) -> int:
    """Ingest one scan with the chosen models (:func:`polcore.ingest.ingest_scan`); returns the scan_id.

    Checkpoints come from :func:`polcore.settings.models_dir`. A failed ingest leaves the database as it was.
    """
    from polcore.ingest import ingest_scan as _ingest

    path = Path(path).resolve()
    with _UPLOAD_LOCK:
        sha = _UPLOAD_SHA.get(str(path))
    return _ingest(path, model_names, db_path, progress=progress, name=name, kind=kind, dataset=dataset,
                   model_dir=settings.models_dir(), sha256=sha)


def available_models(model_dir: Path | None = None) -> dict[str, Path]:
    """Trained checkpoints (default :func:`polcore.settings.models_dir`): model name -> path, from their
    metadata alone (:func:`polcore.ingest.available_models`)."""
    from polcore.ingest import available_models as _available

    return _available(model_dir or settings.models_dir())


def _safe_name(name: str) -> str:
    base = os.path.basename(name or "scan")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return safe[:120] or "scan"


def save_upload(
    fileobj: BinaryIO, name: str, file_id: str, dest_dir: Path | None = None, *, chunk_bytes: int = 8 << 20
) -> Path:
    """Copy an uploaded file to ``<data dir>/uploads/`` in chunks (never the whole file in memory), hashing the
    bytes on the way (the ingest then needs no second read for the sha256).

    The file is written under a temporary name and renamed when complete; the final name is the sanitised
    upload name with a short hash of the upload id, so two uploads never overwrite each other.
    """
    dest_dir = Path(dest_dir or settings.uploads_dir())
    dest_dir.mkdir(parents=True, exist_ok=True)
    safe = _safe_name(name)
    stem, dot, suffix = safe.rpartition(".")
    tag = hashlib.sha1(str(file_id).encode()).hexdigest()[:8]
    final = dest_dir / (f"{stem}-{tag}.{suffix}" if dot and stem else f"{safe}-{tag}")
    if final.is_file():
        return final
    tmp = final.with_name(final.name + ".partial")
    h = hashlib.sha256()
    try:
        if hasattr(fileobj, "seek"):
            fileobj.seek(0)
        with open(tmp, "wb") as out:
            while chunk := fileobj.read(chunk_bytes):
                h.update(chunk)
                out.write(chunk)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    with _UPLOAD_LOCK:
        _UPLOAD_SHA[str(final.resolve())] = h.hexdigest()
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

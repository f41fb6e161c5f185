"""The dashboard's calls into polcore: ingest, the demo build, the model list, uploads and pattern reads.

Each function calls the polcore module that does the job (:mod:`polcore.ingest`, :mod:`polcore.demo`,
:mod:`polcore.io`) directly, with the folders of :mod:`polcore.settings`. Heavy modules are imported inside the
functions, so a page loads fast.

Upload limits (the constants, in one place): :data:`DISK_MARGIN_BYTES` of free space must remain after an
upload is written (else :class:`UploadRefused`); uploads never ingested are deleted after
:data:`UPLOAD_MAX_AGE_S`, abandoned ``*.partial`` files after :data:`PARTIAL_MAX_AGE_S`
(:func:`cleanup_uploads`, run by the Upload page at most every :data:`CLEANUP_EVERY_S`). The per-file size
limit of a browser upload is Streamlit's ``server.maxUploadSize`` in ``.streamlit/config.toml``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from polcore import settings

__all__ = [
    "build_demo",
    "ingest_scan",
    "live_map",
    "available_models",
    "save_upload",
    "UploadRefused",
    "check_disk_space",
    "cleanup_uploads",
    "cleanup_uploads_if_due",
    "DISK_MARGIN_BYTES",
    "UPLOAD_MAX_AGE_S",
    "PARTIAL_MAX_AGE_S",
    "CLEANUP_EVERY_S",
    "validate_scan",
    "read_pattern",
]

log = logging.getLogger(__name__)

#: sha256 of each upload saved by this server process, hashed while its bytes were written (so an ingest of
#: an upload never reads the file a second time to hash it).
_UPLOAD_SHA: dict[str, str] = {}
_UPLOAD_LOCK = threading.Lock()

#: Free space that must remain on the uploads' disk after an upload is written [bytes]: room for the database
#: rows and feature files the ingest writes next, and for everything else on that disk.
DISK_MARGIN_BYTES = 1 << 30  # 1 GiB
#: An upload that no stored scan comes from is deleted this long after it was written [s].
UPLOAD_MAX_AGE_S = 24 * 3600
#: A ``*.partial`` file (an upload whose copy was interrupted) not written to for this long is deleted [s].
PARTIAL_MAX_AGE_S = 3600
#: The Upload page runs :func:`cleanup_uploads` at most this often per server process [s].
CLEANUP_EVERY_S = 600
_LAST_CLEANUP = [float("-inf")]


class UploadRefused(Exception):
    """An upload that cannot be written (not enough disk space); the message says why, for the page."""


def build_demo(db_path: Path, progress=None):
    """Build the demo database (:func:`polcore.demo.build_demo`)."""
    from polcore.demo import build_demo as _build

    return _build(db_path, progress=progress)


def ingest_scan(path: Path, model_names: list[str], db_path: Path, progress=None, name: str | None = None,
                kind: str = "experimental", dataset: str | None = None, *, rotation_deg: float | None = None,
                flip: bool | None = None, live=None) -> int:
    """Ingest one scan with the chosen models (:func:`polcore.ingest.ingest_scan`); returns the scan_id.

    Checkpoints come from :func:`polcore.settings.models_dir`. A failed or cancelled ingest leaves the database
    as it was. ``rotation_deg`` / ``flip``: the user's detector geometry (None = the file's, else the estimate).
    ``live``: a :func:`live_map` that the pass fills in batch by batch (the page's progressive map).
    """
    from polcore.ingest import ingest_scan as _ingest

    path = Path(path).resolve()
    with _UPLOAD_LOCK:
        sha = _UPLOAD_SHA.get(str(path))
    return _ingest(path, model_names, db_path, progress=progress, name=name, kind=kind, dataset=dataset,
                   model_dir=settings.models_dir(), sha256=sha, rotation_deg=rotation_deg, flip=flip, live=live)


def live_map(model: str | None):
    """A :class:`polcore.ingest.LiveMap` for the class map of ``model`` (the first chosen) during an ingest."""
    from polcore.ingest import LiveMap

    return LiveMap(model)


def available_models(model_dir: Path | None = None) -> dict[str, Path]:
    """Trained checkpoints (default :func:`polcore.settings.models_dir`): model name -> path, from their
    metadata alone (:func:`polcore.ingest.available_models`)."""
    from polcore.ingest import available_models as _available

    return _available(model_dir or settings.models_dir())


def _safe_name(name: str) -> str:
    base = os.path.basename(name or "scan")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return safe[:120] or "scan"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _size_of(fileobj: BinaryIO) -> int | None:
    size = getattr(fileobj, "size", None)
    if isinstance(size, int):
        return size
    try:
        pos = fileobj.tell()
        end = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(pos)
        return int(end)
    except (AttributeError, OSError, ValueError):
        return None


def check_disk_space(size: int, dest_dir: Path | None = None, *, margin: int = DISK_MARGIN_BYTES) -> None:
    """Refuse (:class:`UploadRefused`) when the disk of ``dest_dir`` has less than ``size + margin`` bytes
    free (``shutil.disk_usage``)."""
    dest_dir = Path(dest_dir or settings.uploads_dir())
    probe = dest_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < size + margin:
        raise UploadRefused(
            f"Not enough disk space for this upload: it needs {_fmt_bytes(size)} plus "
            f"{_fmt_bytes(margin)} kept free, and {_fmt_bytes(free)} are free on the disk of {dest_dir}. "
            "Nothing was written; ask the server's administrator to free space."
        )


def save_upload(
    fileobj: BinaryIO, name: str, file_id: str, dest_dir: Path | None = None, *, chunk_bytes: int = 8 << 20
) -> Path:
    """Copy an uploaded file to ``<data dir>/uploads/`` in chunks, hashing the bytes on the way (the ingest
    then needs no second read for the sha256).

    The free disk space is checked first (:func:`check_disk_space`: :class:`UploadRefused` when less than the
    file's size plus :data:`DISK_MARGIN_BYTES` is free). The file is written under a temporary name
    (``*.partial``) and renamed when complete; the final name is the sanitised upload name with a short hash of
    the upload id, so two uploads never overwrite each other. A browser upload is already in the server's
    memory when this runs (Streamlit holds it there); this copy only avoids a second whole-file buffer.
    """
    dest_dir = Path(dest_dir or settings.uploads_dir())
    safe = _safe_name(name)
    stem, dot, suffix = safe.rpartition(".")
    tag = hashlib.sha1(str(file_id).encode()).hexdigest()[:8]
    final = dest_dir / (f"{stem}-{tag}.{suffix}" if dot and stem else f"{safe}-{tag}")
    if final.is_file():
        return final
    size = _size_of(fileobj)
    check_disk_space(size or 0, dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
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


def _stored_sources(db_path: Path) -> tuple[set[str], set[str]] | None:
    """(resolved source_file paths, sha256s) of every stored scan, any status; empty sets without a database;
    None when the database cannot be read now (busy, broken): then nothing may be deleted."""
    from polcore.store import PredictionStore, StoreNotFoundError, queries

    store = PredictionStore(db_path, read_only=True, lock_timeout=2.0)
    if not Path(db_path).is_file():
        return set(), set()
    try:
        scans = queries.list_scans(store, status=None)
    except StoreNotFoundError:
        return set(), set()
    except Exception as exc:  # noqa: BLE001 - a clean-up never breaks the page
        log.warning("upload clean-up skipped: cannot read %s (%s)", db_path, exc)
        return None
    paths = set()
    for src in scans["source_file"].dropna():
        try:
            paths.add(str(Path(str(src)).resolve()))
        except (OSError, ValueError):
            continue
    return paths, {str(v).lower() for v in scans["sha256"].dropna()}


def cleanup_uploads(
    uploads_dir: Path | None = None,
    db_path: Path | None = None,
    *,
    max_age_s: float = UPLOAD_MAX_AGE_S,
    partial_max_age_s: float = PARTIAL_MAX_AGE_S,
    keep: Iterable[Path] = (),
    now: float | None = None,
) -> list[Path]:
    """Delete uploads that were never ingested and abandoned partial copies; returns what was deleted.

    A file in ``uploads_dir`` (default :func:`polcore.settings.uploads_dir`) is deleted when it was last
    written more than ``max_age_s`` ago and no stored scan (any status, from
    ``queries.list_scans(store, status=None)``) has it as ``source_file`` or has its sha256 (when this process
    hashed it while saving). ``*.partial`` files are deleted after ``partial_max_age_s`` without a write.
    Files in ``keep`` (those a queued or running ingest works on) are never deleted. Cheap: one directory
    listing, and one read of the scans table only when a file is old enough. When the database cannot be read,
    only stale partial files go.
    """
    uploads_dir = Path(uploads_dir or settings.uploads_dir())
    db_path = Path(db_path or settings.db_path())
    now = time.time() if now is None else float(now)
    try:
        entries = [p for p in uploads_dir.iterdir() if p.is_file() and not p.is_symlink()]
    except OSError:  # no uploads folder yet
        return []
    keep_set = set()
    for p in keep:
        try:
            keep_set.add(str(Path(p).resolve()))
        except (OSError, ValueError):
            continue
    removed: list[Path] = []
    old: list[Path] = []
    for p in entries:
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if str(p.resolve()) in keep_set:
            continue
        if p.name.endswith(".partial"):
            if age > partial_max_age_s:
                removed.append(p)
        elif age > max_age_s:
            old.append(p)
    if old:
        stored = _stored_sources(db_path)
        if stored is not None:
            paths, shas = stored
            for p in old:
                key = str(p.resolve())
                with _UPLOAD_LOCK:
                    sha = _UPLOAD_SHA.get(key)
                if key in paths or (sha is not None and sha.lower() in shas):
                    continue
                removed.append(p)
    done = []
    for p in removed:
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not delete stale upload %s: %s", p, exc)
            continue
        with _UPLOAD_LOCK:
            _UPLOAD_SHA.pop(str(p.resolve()), None)
        done.append(p)
        log.info("deleted stale upload %s", p)
    return done


def cleanup_uploads_if_due(keep: Iterable[Path] = (), *, every_s: float = CLEANUP_EVERY_S) -> list[Path]:
    """:func:`cleanup_uploads` with the default folders, at most once per ``every_s`` in this process (the
    Upload page calls it on every load); never raises."""
    now = time.monotonic()
    with _UPLOAD_LOCK:
        if now - _LAST_CLEANUP[0] < every_s:
            return []
        _LAST_CLEANUP[0] = now
    try:
        return cleanup_uploads(keep=keep)
    except Exception as exc:  # noqa: BLE001 - a clean-up never breaks the page
        log.warning("upload clean-up failed: %s", exc)
        return []


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


#: Patterns read for the geometry shown before an ingest: the same leading patterns the ingest fits on.
GEOMETRY_PATTERNS = 4096


def _model_convergence() -> float | None:
    """The probe semi-angle [mrad] in a trained model's preprocessing (for the camera length from the disc)."""
    from polcore.models import read_checkpoint_meta

    for p in available_models().values():
        try:
            conv = (read_checkpoint_meta(p).get("preprocessing") or {}).get("convergence_mrad")
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is skipped
            continue
        if conv:
            return float(conv)
    return None


@functools.lru_cache(maxsize=8)
def _estimate_geometry_cached(path: str, mtime_ns: int, size: int, rotation_deg, flip,
                              convergence_mrad) -> dict:
    import numpy as np

    from polcore.geometry import estimate_geometry_from
    from polcore.infer import trusted_geometry
    from polcore.io import open_scan

    scan = open_scan(Path(path))
    ny, nx = (int(v) for v in scan.nav_shape)
    pos, pats, n = [], [], 0
    gen = scan.iter_batches(256)
    try:
        for p, b in gen:
            pos.append(np.asarray(p))
            pats.append(np.asarray(b))
            n += len(p)
            if n >= GEOMETRY_PATTERNS:
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    overrides = {k: v for k, v in (("rotation_deg", rotation_deg), ("flip", flip)) if v is not None}
    pos_all = np.concatenate(pos)
    est = estimate_geometry_from(np.concatenate(pats), pos_all, (ny, nx), scan.meta, overrides,
                                 convergence_mrad=convergence_mrad)
    applied = trusted_geometry(est, pos_all)
    return dict(estimate=est.to_dict(), applied=applied["geometry"].to_dict(), identity=applied["identity"],
                warnings=list(applied["warnings"]), n_patterns=int(n), nav_shape=(ny, nx))


def estimate_scan_geometry(path: str | Path, *, rotation_deg: float | None = None, flip: bool | None = None,
                           convergence_mrad: float | None = None) -> dict:
    """The scan geometry an ingest of ``path`` would find and apply, before it runs.

    Reads the first :data:`GEOMETRY_PATTERNS` patterns (the ones the ingest's preprocessing fit uses; bounded
    memory: at most that many patterns, bounded time: about 0.5 s per 1,000 patterns of 64 x 64) and runs
    :func:`polcore.geometry.estimate_geometry_from` with the file's calibration and the user's overrides, then
    :func:`polcore.infer.trusted_geometry` (the trust rule). Cached per (file, modification time, size,
    overrides).

    Returns
    -------
    dict: ``estimate`` (Geometry dict: every number with its source and confidence), ``applied`` (what the ingest
    applies), ``identity`` (nothing applied), ``warnings`` (list of str), ``n_patterns``, ``nav_shape``.
    """
    p = Path(path).resolve()
    st_ = p.stat()
    conv = convergence_mrad if convergence_mrad is not None else _model_convergence()
    return _estimate_geometry_cached(str(p), st_.st_mtime_ns, st_.st_size,
                                     None if rotation_deg is None else float(rotation_deg),
                                     None if flip is None else bool(flip), conv)

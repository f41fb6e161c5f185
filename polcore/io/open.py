"""``open_scan``: pick the reader from the file's content, open it, and make every failure a
:class:`ScanFormatError`; plus ``sha256_file``."""

from __future__ import annotations

import hashlib
import logging
import os
from os import PathLike
from pathlib import Path

from polcore.io.base import Scan
from polcore.io.errors import ScanFormatError
from polcore.io.files import check_regular_file, open_regular

__all__ = ["open_scan", "sha256_file", "sniff_format", "SUPPORTED_FORMATS"]

logger = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
MIB_MAGIC = b"MQ1,"
BLO_MAGIC = b"IMGBLO"

#: format key -> description, for messages and the upload page.
SUPPORTED_FORMATS = {
    "hdf5": "HDF5 (.h5/.hdf5/.emd): generic 4D dataset, py4DSTEM/EMD 1.0, Prismatic EMD, DECTRIS ARINA",
    "npy": "NumPy .npy (4D, or 3D with nav_shape)",
    "mib": "Quantum Detectors Merlin .mib (+ .hdr)",
    "blockfile": "NanoMegas ASTAR blockfile .blo",
}

_EXPECTED_BY_SUFFIX = {
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".emd": "hdf5",
    ".nxs": "hdf5",
    ".npy": "npy",
    ".mib": "mib",
    ".blo": "blockfile",
}


def sniff_format(path) -> str | None:
    """Format key from the file's first bytes (``hdf5``, ``npy``, ``mib``, ``blockfile``) or None.

    The HDF5 signature is looked for at offset 0 and after a user block (512, 1024, 2048, ... bytes). Only
    regular files are opened (:func:`polcore.io.files.open_regular`).
    """
    path = Path(path)
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(16)
        if head.startswith(HDF5_SIGNATURE):
            return "hdf5"
        if head.startswith(NPY_MAGIC):
            return "npy"
        if head.startswith(MIB_MAGIC):
            return "mib"
        if head.startswith(BLO_MAGIC):
            return "blockfile"
        offset = 512
        while offset + 8 <= size and offset <= 1 << 30:
            fh.seek(offset)
            if fh.read(8) == HDF5_SIGNATURE:
                return "hdf5"
            offset *= 2
    return None


def open_scan(path: str | PathLike, *, dataset: str | None = None, nav_shape=None) -> Scan:
    """Open a 4D-STEM scan file lazily, choosing the reader from its content.

    Parameters
    ----------
    path : str or path-like
        The scan file. HDF5 (generic / py4DSTEM EMD 1.0 / Prismatic / ARINA), ``.npy``, Merlin ``.mib``
        (passing its ``.hdr`` works too), NanoMegas ``.blo``. The extension is only a hint; the first bytes
        decide.
    dataset : str, optional
        HDF5 only: the dataset (full path, path suffix or group name) when the file holds several 4D
        datasets or Prismatic depths.
    nav_shape : (int, int), optional
        ``(ny, nx)`` for formats that store a flat stack of frames without the scan shape (Merlin without
        ScanX/ScanY, ARINA without metadata, 3D HDF5/npy arrays).

    Returns
    -------
    Scan
        ``nav_shape`` (ny, nx), ``sig_shape`` (ky, kx), ``dtype``, ``meta``, ``pattern(iy, ix)``,
        ``iter_batches(batch_size)``; arrays are (scan_y, scan_x, ky, kx).

    Raises
    ------
    ScanFormatError
        For anything that cannot be read as a scan; the message names the file, the dataset if any and the
        reason. No other exception type escapes.

    Files are not trusted: only regular files are opened (pipes, devices, directories, dangling or looping
    links are refused after ``os.stat``, never opened); HDF5 files may not point outside themselves (external
    links, virtual datasets, external storage: :mod:`polcore.io.h5safe`); declared sizes must be within
    :mod:`polcore.io.limits` and held by the file before anything sized by them is allocated.
    """
    p = Path(path)
    try:
        return _open(p, dataset, nav_shape)
    except ScanFormatError:
        raise
    except Exception as exc:  # wrap every lower-level failure (OSError, KeyError, rsciio/dask errors, ...)
        logger.debug("open_scan(%s) failed", p, exc_info=True)
        raise ScanFormatError(p, f"cannot be read: {type(exc).__name__}: {exc}", dataset=dataset) from exc


def _open(p: Path, dataset, nav_shape) -> Scan:
    size = check_regular_file(p).st_size  # never opens a pipe, device, directory or broken link
    if size == 0:
        raise ScanFormatError(p, "empty file (0 bytes)")
    kind = sniff_format(p)
    if kind is None and p.suffix.lower() == ".hdr":
        from polcore.io.files import sibling_file

        mib = sibling_file(p, p.with_suffix(".mib"), "Merlin data file")
        if mib is not None and sniff_format(mib) == "mib":
            logger.info("%s is a Merlin acquisition header; opening %s", p, mib.name)
            p, kind = mib, "mib"
    if kind is None and p.suffix.lower() == ".hdr":
        raise ScanFormatError(
            p, f"a Merlin .hdr acquisition header without its data file {p.with_suffix('.mib').name}"
        )
    if kind is None:
        with open_regular(p) as fh:
            head = fh.read(24)
        expected = _EXPECTED_BY_SUFFIX.get(p.suffix.lower())
        hint = (
            f"the name says {SUPPORTED_FORMATS[expected].split(' (')[0]} but the content is not "
            if expected
            else "unrecognised content, "
        )
        raise ScanFormatError(
            p,
            f"{hint}(no HDF5 signature, NumPy magic, Merlin MQ1 header or blockfile IMGBLO magic; "
            f"file starts with {head!r}). Supported: {'; '.join(SUPPORTED_FORMATS.values())}",
        )
    if dataset is not None and kind != "hdf5":
        raise ScanFormatError(
            p, f"dataset= applies to HDF5 files only; this is a {kind} file", dataset=dataset
        )
    if kind == "hdf5":
        from polcore.io.hdf5 import open_hdf5

        scan = open_hdf5(p, dataset=dataset, nav_shape=nav_shape)
    elif kind == "npy":
        from polcore.io.npy import NpyScan

        scan = NpyScan(p, nav_shape=nav_shape)
    elif kind == "mib":
        from polcore.io.vendor import MibScan

        scan = MibScan(p, nav_shape=nav_shape)
    else:
        from polcore.io.vendor import BlockfileScan

        scan = BlockfileScan(p, nav_shape=nav_shape)
    scan.check_sample()
    logger.info("opened %r (%s)", scan, scan.meta.source)
    return scan


def sha256_file(path: str | PathLike, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in ``chunk_bytes`` pieces (constant memory).

    A missing file raises ``FileNotFoundError``; a pipe, device or directory :class:`ScanFormatError` (it is
    not opened: a pipe would block).
    """
    os.stat(path)  # FileNotFoundError / OSError as for open()
    h = hashlib.sha256()
    with open_regular(path) as fh:
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()

"""NumPy ``.npy`` scans: the header is parsed and checked here, the data read block by block.

The header is read with numpy's own parser (``np.lib.format.read_array_header_1_0`` / ``_2_0``, a literal
parser, never pickle) with ``max_header_size`` = :data:`polcore.io.limits.MAX_NPY_HEADER_BYTES`, after its
declared length has been checked against that limit and the file size (so a lying length never makes it
allocate). Then: numeric dtype (object arrays would need pickle: refused), 4D (or 3D with ``nav_shape``), the
limits of :mod:`polcore.io.limits`, and a file size equal to header + shape x itemsize.

Blocks of C-ordered arrays are read with plain positioned file reads rather than through a memory map, so
pages of a multi-GB file never accumulate in the process's resident memory; Fortran-ordered arrays (rare; one
pattern is scattered over the whole file) are read through a memory map and limited to
:data:`polcore.io.limits.MAX_FORTRAN_NPY_BYTES`.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from polcore.io.base import Scan, check_dtype, check_shape4d, flat_block_reader
from polcore.io.errors import ScanFormatError
from polcore.io.files import open_regular
from polcore.io.limits import MAX_FORTRAN_NPY_BYTES, MAX_NPY_HEADER_BYTES, check_scan_limits, fmt_bytes
from polcore.types import ScanMeta

__all__ = ["NpyScan", "read_npy_header"]

_MAGIC = b"\x93NUMPY"


def _v3_reader():
    """numpy's (private) header reader that understands format 3.0, if this numpy has one."""
    for modname in ("numpy.lib._format_impl", "numpy.lib.format"):
        try:
            mod = __import__(modname, fromlist=["_read_array_header"])
        except ImportError:
            continue
        fn = getattr(mod, "_read_array_header", None)
        if fn is not None:
            return fn
    return None


def read_npy_header(path) -> tuple[tuple[int, ...], bool, np.dtype, int, int]:
    """``(shape, fortran_order, dtype, data_offset, file_size)`` of a ``.npy`` file, checked.

    Raises :class:`ScanFormatError` for a bad magic / version, a header longer than the limit or the file,
    an unparsable header, or an object dtype (which would need pickle).
    """
    path = Path(path)
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        pre = fh.read(12)
        if len(pre) < 10 or not pre.startswith(_MAGIC):
            raise ScanFormatError(path, "not a .npy file (no NumPy magic) or truncated header")
        version = (pre[6], pre[7])
        if version == (1, 0):
            hlen, start = int.from_bytes(pre[8:10], "little"), 10
        elif version in ((2, 0), (3, 0)) and len(pre) >= 12:
            hlen, start = int.from_bytes(pre[8:12], "little"), 12
        else:
            raise ScanFormatError(path, f"unsupported .npy format version {version[0]}.{version[1]}")
        if hlen > MAX_NPY_HEADER_BYTES:
            raise ScanFormatError(
                path,
                f".npy header of {hlen} bytes exceeds the limit of {MAX_NPY_HEADER_BYTES} bytes "
                "(polcore.io.limits.MAX_NPY_HEADER_BYTES)",
            )
        if start + hlen > size:
            raise ScanFormatError(
                path, f"truncated .npy: the header announces {start + hlen} bytes, the file has {size}"
            )
        fh.seek(8)  # after magic + version, where np.lib.format.read_magic leaves the file
        try:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=MAX_NPY_HEADER_BYTES)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=MAX_NPY_HEADER_BYTES)
            else:  # 3.0: utf-8 field names; numpy has no public reader for it
                reader = _v3_reader()
                if reader is None:
                    raise ScanFormatError(path, ".npy format version 3.0 is not supported by this numpy version")
                shape, fortran, dtype = reader(fh, version, max_header_size=MAX_NPY_HEADER_BYTES)
        except (ValueError, TypeError, SyntaxError, OverflowError, RecursionError, MemoryError, AttributeError) as exc:
            raise ScanFormatError(path, f"unreadable .npy header: {' '.join(str(exc).split())[:300]}") from exc
        offset = fh.tell()
    if dtype.hasobject:
        raise ScanFormatError(path, "non-numeric element type (object array, needs pickle; refused)")
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise ScanFormatError(path, f"unreadable .npy header: shape {shape!r}") from exc
    return shape, bool(fortran), dtype, offset, size


class NpyScan(Scan):
    """A ``.npy`` file holding ``(scan_y, scan_x, ky, kx)`` (or ``(n, ky, kx)`` with ``nav_shape``).

    Parameters
    ----------
    path : str or Path
        The ``.npy`` file (pickled object arrays are refused).
    nav_shape : (int, int), optional
        ``(ny, nx)`` for a 3D stack of frames in raster order.
    meta : ScanMeta, optional
        Calibration (a bare ``.npy`` carries none).
    name : str, optional
        Display name (default: file stem).
    """

    def __init__(self, path, *, nav_shape=None, meta: ScanMeta | None = None, name=None):
        path = Path(path)
        shape, fortran, dtype, offset, size = read_npy_header(path)
        check_dtype(dtype, path)
        self._offset = offset
        self._fortran = fortran and len(shape) > 1
        self._stored_shape = shape
        self._flat = len(shape) == 3 and nav_shape is not None
        if self._flat:
            try:
                ny, nx = (int(v) for v in nav_shape)
            except (TypeError, ValueError) as exc:
                raise ScanFormatError(path, f"nav_shape must be (ny, nx), got {nav_shape!r}") from exc
            if ny * nx != shape[0]:
                raise ScanFormatError(
                    path, f"nav_shape=({ny}, {nx}) needs {ny * nx} frames but the stack holds {shape[0]}"
                )
            shape = (ny, nx) + shape[1:]
        elif len(shape) == 3:
            raise ScanFormatError(
                path, f"3D array {shape}: a flat stack of frames (n, ky, kx); pass nav_shape=(ny, nx)"
            )
        elif nav_shape is not None and len(shape) == 4 and tuple(nav_shape) != shape[:2]:
            raise ScanFormatError(path, f"nav_shape={tuple(nav_shape)} does not match the stored {shape[:2]}")
        check_shape4d(shape, path)
        check_scan_limits(shape, dtype.itemsize, path)
        need = offset + math.prod(shape) * dtype.itemsize
        if size < need:
            raise ScanFormatError(
                path, f"truncated .npy: the header's shape {shape} {dtype} needs {need} bytes, the file has {size}"
            )
        if size > need:
            raise ScanFormatError(
                path,
                f"the file has {size - need} bytes more than its header's shape {self._stored_shape} {dtype} "
                f"needs ({need} bytes): header and data do not match",
            )
        if self._fortran and size > MAX_FORTRAN_NPY_BYTES:
            raise ScanFormatError(
                path,
                f"Fortran-ordered .npy of {fmt_bytes(size)}, over the limit of {fmt_bytes(MAX_FORTRAN_NPY_BYTES)} "
                "for that order (polcore.io.limits.MAX_FORTRAN_NPY_BYTES; each pattern is scattered over the "
                "whole file): re-save it in C order",
            )
        super().__init__(
            path=path,
            name=name,
            shape=shape,
            dtype=dtype,
            meta=meta or ScanMeta(source="none (.npy)", extra={"format": "npy"}),
        )
        self._stored_dtype = dtype

    @contextmanager
    def _reading(self, light: bool = False):
        if self._fortran:
            mm = np.memmap(
                self.path, dtype=self._stored_dtype, mode="r", offset=self._offset,
                shape=self._stored_shape, order="F",
            )
            try:
                if self._flat:
                    yield flat_block_reader(lambda a, b: mm[a:b], self.nav_shape[1], self.sig_shape)
                else:
                    yield lambda y0, y1, x0, x1: mm[y0:y1, x0:x1]
            finally:
                del mm
            return
        ky, kx = self.sig_shape
        dt = self._stored_dtype
        frame_bytes = ky * kx * dt.itemsize
        with open_regular(self.path) as fh:

            def frames(a, b):
                out = np.empty((b - a, ky, kx), dtype=dt)
                fh.seek(self._offset + a * frame_bytes)
                got = fh.readinto(memoryview(out).cast("B"))
                if got != out.nbytes:
                    raise OSError(f"short read: {got} of {out.nbytes} bytes at frame {a}")
                return out

            yield flat_block_reader(frames, self.nav_shape[1], self.sig_shape)

"""NumPy ``.npy`` scans: validated with ``np.load(mmap_mode="r", allow_pickle=False)``, read block by block.

Blocks of C-ordered arrays are read with plain positioned file reads rather than through the memory map, so
pages of a multi-GB file never accumulate in the process's resident memory; Fortran-ordered arrays (rare)
are read through the memory map.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from polcore.io.base import Scan, flat_block_reader
from polcore.io.errors import ScanFormatError
from polcore.types import ScanMeta

__all__ = ["NpyScan"]


class NpyScan(Scan):
    """A ``.npy`` file holding ``(scan_y, scan_x, ky, kx)`` (or ``(n, ky, kx)`` with ``nav_shape``).

    Parameters
    ----------
    path : str or Path
        The ``.npy`` file (pickled object arrays are refused: ``allow_pickle=False``).
    nav_shape : (int, int), optional
        ``(ny, nx)`` for a 3D stack of frames in raster order.
    meta : ScanMeta, optional
        Calibration (a bare ``.npy`` carries none).
    name : str, optional
        Display name (default: file stem).
    """

    def __init__(self, path, *, nav_shape=None, meta: ScanMeta | None = None, name=None):
        path = Path(path)
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "python objects" in str(exc).lower():
                raise ScanFormatError(
                    path, "non-numeric element type (object array, needs pickle; refused)"
                ) from exc
            raise ScanFormatError(path, f"unreadable .npy: {exc}") from exc
        except (OSError, EOFError) as exc:
            raise ScanFormatError(path, f"unreadable .npy (truncated?): {exc}") from exc
        if not isinstance(mm, np.ndarray):
            raise ScanFormatError(path, f"expected a single array, got {type(mm).__name__}")
        shape, dtype = tuple(mm.shape), mm.dtype
        self._offset = int(getattr(mm, "offset", 0))
        self._fortran = bool(mm.flags.f_contiguous and not mm.flags.c_contiguous)
        del mm
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
        super().__init__(
            path=path,
            name=name,
            shape=shape,
            dtype=dtype,
            meta=meta or ScanMeta(source="none (.npy)", extra={"format": "npy"}),
        )
        self._stored_dtype = dtype
        frame = int(np.prod(self.sig_shape)) * dtype.itemsize
        need = self._offset + self.n_patterns * frame
        size = path.stat().st_size
        if size < need:
            raise ScanFormatError(path, f"truncated .npy: header needs {need} bytes, file has {size}")

    @contextmanager
    def _reading(self):
        if self._fortran:
            mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
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
        with open(self.path, "rb", buffering=0) as fh:

            def frames(a, b):
                out = np.empty((b - a, ky, kx), dtype=dt)
                fh.seek(self._offset + a * frame_bytes)
                got = fh.readinto(memoryview(out).cast("B"))
                if got != out.nbytes:
                    raise OSError(f"short read: {got} of {out.nbytes} bytes at frame {a}")
                return out

            yield flat_block_reader(frames, self.nav_shape[1], self.sig_shape)

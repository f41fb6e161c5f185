"""The ``Scan`` base class (the protocol every reader follows) and ``ArrayScan`` for in-memory arrays.

A reader subclass only says how to open its source and read a rectangular block of probe positions
(:meth:`Scan._reading`); batching, raster order, byte order, NaN/inf handling and error wrapping live here,
once, for every format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import numpy as np

from polcore.io.errors import ScanFormatError
from polcore.io.limits import OPEN_SAMPLE_BYTES, check_scan_limits
from polcore.types import ScanMeta

__all__ = ["Scan", "ArrayScan", "SAMPLE_PATTERNS"]

logger = logging.getLogger(__name__)

#: Number of patterns read at open time to check that the data are readable and not all NaN/inf (fewer when
#: they would exceed :data:`polcore.io.limits.OPEN_SAMPLE_BYTES`).
SAMPLE_PATTERNS = 16

#: ``read_block(y0, y1, x0, x1) -> array (y1 - y0, x1 - x0, ky, kx)``
BlockReader = Callable[[int, int, int, int], np.ndarray]


def check_dtype(dtype, path=None, dataset=None) -> np.dtype:
    """Return the native-byte-order version of ``dtype`` or raise if it is not real numeric counts.

    Accepted: unsigned/signed integers and floats of any width. Refused: bool, complex, strings, objects,
    compound/void types.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ScanFormatError(path, f"unreadable element type {dtype!r}: {exc}", dataset=dataset) from exc
    if dt.kind not in "uif" or dt.fields is not None:
        what = {
            "b": "boolean",
            "c": "complex (not intensities)",
            "O": "object (e.g. variable-length strings)",
            "S": "byte string",
            "U": "text",
            "V": "compound/opaque",
            "M": "datetime",
            "m": "timedelta",
        }.get(dt.kind, dt.kind)
        raise ScanFormatError(
            path,
            f"non-numeric element type {dt} ({what}); expected integer or floating-point detector counts",
            dataset=dataset,
        )
    return dt.newbyteorder("=")


def check_shape4d(shape, path=None, dataset=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a 4D shape ``(scan_y, scan_x, ky, kx)``; return ``(nav_shape, sig_shape)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ScanFormatError(
            path,
            f"expected a 4D array (scan_y, scan_x, ky, kx), got {len(shape)}D shape {shape}",
            dataset=dataset,
        )
    if min(shape) < 0:
        raise ScanFormatError(
            path, f"negative axis size in shape {shape} (scan_y, scan_x, ky, kx): corrupt header", dataset=dataset
        )
    if min(shape) == 0:
        raise ScanFormatError(
            path, f"zero-size axis in shape {shape} (scan_y, scan_x, ky, kx): no patterns", dataset=dataset
        )
    return (shape[0], shape[1]), (shape[2], shape[3])


def read_flat(read_block: BlockReader, nx: int, sig_shape, start: int, stop: int) -> np.ndarray:
    """Read raster positions ``start .. stop-1`` (flat index ``iy * nx + ix``) as ``(n, ky, kx)``.

    Whole rows are read with one block call; a partial first or last row with one call each, so a batch
    costs at most three contiguous reads.
    """
    ky, kx = sig_shape
    y0, x0 = divmod(start, nx)
    y1, x1 = divmod(stop, nx)
    if y0 == y1:
        return np.asarray(read_block(y0, y0 + 1, x0, x1)).reshape(-1, ky, kx)
    parts = []
    if x0:
        parts.append(np.asarray(read_block(y0, y0 + 1, x0, nx)).reshape(-1, ky, kx))
        y0 += 1
    if y1 > y0:
        parts.append(np.asarray(read_block(y0, y1, 0, nx)).reshape(-1, ky, kx))
    if x1:
        parts.append(np.asarray(read_block(y1, y1 + 1, 0, x1)).reshape(-1, ky, kx))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def flat_block_reader(get_frames: Callable[[int, int], np.ndarray], nx: int, sig_shape) -> BlockReader:
    """Adapt a flat frame source ``get_frames(start, stop) -> (n, ky, kx)`` to a 4D block reader."""
    ky, kx = sig_shape

    def read_block(y0, y1, x0, x1):
        if x0 == 0 and x1 == nx:
            return np.asarray(get_frames(y0 * nx, y1 * nx)).reshape(y1 - y0, nx, ky, kx)
        rows = [np.asarray(get_frames(y * nx + x0, y * nx + x1)) for y in range(y0, y1)]
        return np.stack(rows).reshape(y1 - y0, x1 - x0, ky, kx)

    return read_block


class Scan:
    """A 4D-STEM scan read lazily: ``(scan_y, scan_x, ky, kx)``, patterns served batch by batch.

    Subclasses set the attributes in ``__init__`` (cheaply: no pattern data is read there except the
    small open-time sample, see :meth:`check_sample`) and implement :meth:`_reading`.

    Attributes
    ----------
    path : pathlib.Path or None
        The file read (None for in-memory arrays).
    name : str
        Short display name (file stem or the name given).
    nav_shape : tuple of int
        ``(ny, nx)`` probe positions, rows (scan_y, top to bottom) then columns (scan_x, left to right).
    sig_shape : tuple of int
        ``(ky, kx)`` detector pixels, rows then columns.
    dtype : numpy.dtype
        Element type of the patterns returned (native byte order, as stored otherwise).
    meta : polcore.types.ScanMeta
        Calibration: step [nm], detector sampling [mrad/px], voltage [kV], convergence [mrad], rotation /
        flip, ``source`` (where the numbers came from) and ``extra`` (anything else the file says).
    dataset : str or None
        Path of the dataset inside the file (HDF5), else None.
    nonfinite_count : int
        NaN/inf values found (and replaced by 0) during the most recent :meth:`iter_batches` pass; it grows
        while the pass runs and is final when the pass ends.
    """

    path: Path | None
    name: str
    nav_shape: tuple[int, int]
    sig_shape: tuple[int, int]
    dtype: np.dtype
    meta: ScanMeta
    dataset: str | None

    def __init__(
        self,
        *,
        path: str | Path | None,
        name: str | None,
        shape,
        dtype,
        meta: ScanMeta | None = None,
        dataset: str | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.dataset = dataset
        self.nav_shape, self.sig_shape = check_shape4d(shape, self.path, dataset)
        self.dtype = check_dtype(dtype, self.path, dataset)
        if self.path is not None:  # files are not trusted: their declared size must be within the limits
            check_scan_limits(self.nav_shape + self.sig_shape, self.dtype.itemsize, self.path, dataset)
        self.meta = meta if meta is not None else ScanMeta()
        if not isinstance(self.meta, ScanMeta):
            raise TypeError(f"meta must be a polcore.types.ScanMeta, got {type(self.meta).__name__}")
        self.name = name if name else (self.path.stem if self.path is not None else "array")
        self.nonfinite_count = 0

    # -- to implement -------------------------------------------------------------------------------
    def _reading(self, light: bool = False) -> AbstractContextManager[BlockReader]:
        """Context manager that opens the source and yields ``read_block(y0, y1, x0, x1)``.

        ``read_block`` returns the patterns of rows ``y0:y1`` and columns ``x0:x1`` as an array-like of
        shape ``(y1 - y0, x1 - x0, ky, kx)``. The source is opened once per pass / call, never kept.
        ``light``: only a few patterns will be read (open-time sample, :meth:`pattern`): keep caches small.
        """
        raise NotImplementedError

    def _sample_limit(self) -> int:
        """Most patterns the open-time sample may read (:data:`polcore.io.limits.OPEN_SAMPLE_BYTES`)."""
        return max(1, OPEN_SAMPLE_BYTES // max(1, self.sig_shape[0] * self.sig_shape[1] * self.dtype.itemsize))

    # -- derived -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(ny, nx, ky, kx)``."""
        return self.nav_shape + self.sig_shape

    @property
    def n_patterns(self) -> int:
        """Number of probe positions ``ny * nx``."""
        return self.nav_shape[0] * self.nav_shape[1]

    @property
    def nbytes(self) -> int:
        """Size of the whole scan in memory [bytes] (it is never loaded whole)."""
        return self.n_patterns * self.sig_shape[0] * self.sig_shape[1] * self.dtype.itemsize

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else self.name
        ds = f", dataset={self.dataset!r}" if self.dataset else ""
        return f"{type(self).__name__}({where!r}{ds}, shape={self.shape}, dtype={self.dtype})"

    def _error(self, reason: str) -> ScanFormatError:
        return ScanFormatError(
            self.path if self.path is not None else self.name, reason, dataset=self.dataset
        )

    def _clean(self, frames) -> tuple[np.ndarray, int]:
        """Writeable native-order array with NaN/inf replaced by 0; return ``(array, count)``.

        Block readers return fresh arrays or read-only views (memory maps); read-only ones are copied here,
        so a caller never holds a writeable view into the source.
        """
        arr = np.asarray(frames)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        elif not arr.flags.writeable:
            arr = arr.copy()
        if arr.dtype.kind != "f":
            return arr, 0
        with np.errstate(invalid="ignore", over="ignore"):
            if np.isfinite(arr.sum(dtype=np.float64)):  # fast path: one reduction, no mask
                return arr, 0
        bad = ~np.isfinite(arr)
        n_bad = int(np.count_nonzero(bad))
        arr[bad] = 0
        return arr, n_bad

    def _read_range(self, read_block: BlockReader, start: int, stop: int) -> np.ndarray:
        try:
            return read_flat(read_block, self.nav_shape[1], self.sig_shape, start, stop)
        except ScanFormatError:
            raise
        except Exception as exc:  # any lower-level failure (OSError, KeyError, dask/rsciio errors, ...)
            raise self._error(
                f"reading patterns {start}..{stop - 1} (raster order) failed: {type(exc).__name__}: {exc}"
            ) from exc

    @contextmanager
    def _open_source(self, light: bool = False):
        with ExitStack() as stack:
            try:
                read_block = stack.enter_context(self._reading(light))
            except ScanFormatError:
                raise
            except Exception as exc:  # e.g. the file vanished or became unreadable after opening
                raise self._error(f"cannot open the data: {type(exc).__name__}: {exc}") from exc
            yield read_block

    # -- public --------------------------------------------------------------------------------------
    def pattern(self, iy: int, ix: int) -> np.ndarray:
        """The diffraction pattern at probe position ``(iy, ix)``.

        Parameters
        ----------
        iy, ix : int
            Row (scan_y) and column (scan_x), ``0 <= iy < ny``, ``0 <= ix < nx``.

        Returns
        -------
        numpy.ndarray, shape (ky, kx), dtype ``self.dtype``
            A copy; NaN/inf replaced by 0.
        """
        ny, nx = self.nav_shape
        iy_i, ix_i = int(iy), int(ix)
        if iy_i != iy or ix_i != ix or not (0 <= iy_i < ny and 0 <= ix_i < nx):
            raise IndexError(f"probe position ({iy}, {ix}) outside the scan of {ny} x {nx} (ny, nx)")
        start = iy_i * nx + ix_i
        with self._open_source(light=True) as read_block:
            frames = self._read_range(read_block, start, start + 1)
        return self._clean(frames)[0][0]

    def iter_batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate over all probe positions in raster order (row by row, left to right).

        Parameters
        ----------
        batch_size : int
            Patterns per batch (the last batch may be smaller); memory use is about
            ``batch_size * ky * kx * itemsize`` bytes plus the reader's cache.

        Yields
        ------
        positions : numpy.ndarray, shape (n, 2), int64
            ``[iy, ix]`` of each pattern.
        patterns : numpy.ndarray, shape (n, ky, kx), dtype ``self.dtype``
            Writeable arrays owned by the caller; NaN/inf replaced by 0 and counted in
            :attr:`nonfinite_count`.
        """
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._iter_batches(int(batch_size))

    def _iter_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nx = self.nav_shape[1]
        n = self.n_patterns
        self.nonfinite_count = 0
        with self._open_source() as read_block:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                frames, n_bad = self._clean(self._read_range(read_block, start, stop))
                self.nonfinite_count += n_bad
                idx = np.arange(start, stop, dtype=np.int64)
                positions = np.stack([idx // nx, idx % nx], axis=1)
                yield positions, frames
        if self.nonfinite_count:
            logger.warning(
                "%s: %d NaN/inf values replaced by 0 while reading %d patterns",
                self.path or self.name,
                self.nonfinite_count,
                n,
            )

    def check_sample(self, n: int = SAMPLE_PATTERNS) -> int:
        """Read the first ``n`` patterns (fewer when they would exceed
        :data:`polcore.io.limits.OPEN_SAMPLE_BYTES`): check the data are readable and not all NaN/inf.

        Called once when a scan is opened. Returns the number of NaN/inf values in the sample (logged as a
        warning when > 0); raises :class:`ScanFormatError` when *every* sampled value is NaN/inf.
        """
        n = min(int(n), self.n_patterns, self._sample_limit())
        with self._open_source(light=True) as read_block:
            frames = np.asarray(self._read_range(read_block, 0, n))
        if frames.dtype.kind != "f":
            return 0
        n_bad = int(np.count_nonzero(~np.isfinite(frames)))
        if n_bad == frames.size:
            raise self._error(
                f"every value of the first {n} patterns is NaN or inf ({n_bad} values): no usable data"
            )
        if n_bad:
            logger.warning(
                "%s: %d NaN/inf values among the first %d patterns; they will be replaced by 0 while reading",
                self.path or self.name,
                n_bad,
                n,
            )
        return n_bad

    def close(self) -> None:
        """Release resources (no-op: readers open their source per pass)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ArrayScan(Scan):
    """A scan held in an in-memory (or memory-mapped) 4D array ``(scan_y, scan_x, ky, kx)``.

    Used by tests and by the scan composer. Patterns handed out are copies, so callers may modify them.

    Parameters
    ----------
    array4d : array-like, shape (ny, nx, ky, kx)
        Integer or float counts. Not copied.
    meta : polcore.types.ScanMeta, optional
        Calibration; empty when not given.
    name : str
        Display name.
    """

    def __init__(self, array4d, meta: ScanMeta | None = None, name: str = "array"):
        arr = array4d if hasattr(array4d, "shape") and hasattr(array4d, "dtype") else np.asarray(array4d)
        super().__init__(path=None, name=name, shape=arr.shape, dtype=arr.dtype, meta=meta)
        self._array = arr
        self.check_sample()

    @contextmanager
    def _reading(self, light: bool = False):
        arr = self._array
        yield lambda y0, y1, x0, x1: np.array(arr[y0:y1, x0:x1])

    @property
    def array(self):
        """The wrapped array (read-only access intended)."""
        return self._array

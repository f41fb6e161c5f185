"""Limits on what a scan file may declare, and the time / memory budget of opening one: all in one place.

Files come from users and are not trusted. Every reader checks the shape a file *declares* against these limits
and against what the file can actually hold **before** anything proportional to that shape is allocated or
read, so a 1 kB file cannot make the server allocate gigabytes or iterate for hours. Messages name the limit
(and this module), e.g. ``patterns of 20000 x 20000 px exceed the limit of 1024 px per side
(polcore.io.limits.MAX_PATTERN_SIDE)``.

Opening (``open_scan``: headers, metadata, the link/storage audit and the open-time sample of patterns) stays
within :data:`OPEN_MEMORY_BUDGET_BYTES` of new allocations and :data:`OPEN_TIME_BUDGET_S` of work that grows with
the file (frame-header and chunk-index scans); reading patterns later is bounded by the batch size and the
chunk-cache size.
"""

from __future__ import annotations

import math
import time

from polcore.io.errors import ScanFormatError

__all__ = [
    "MAX_PATTERN_SIDE",
    "MAX_SCAN_SIDE",
    "MAX_POSITIONS",
    "MAX_TOTAL_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_CHUNKS",
    "MAX_PATTERN_READ_BYTES",
    "MAX_HDF5_LINKS",
    "MAX_ATTRS_READ",
    "MAX_NPY_HEADER_BYTES",
    "MAX_SIDE_FILE_BYTES",
    "MAX_FORTRAN_NPY_BYTES",
    "MAX_DATA_FILES",
    "OPEN_MEMORY_BUDGET_BYTES",
    "OPEN_SAMPLE_BYTES",
    "OPEN_CACHE_BYTES",
    "OPEN_TIME_BUDGET_S",
    "check_scan_limits",
    "Deadline",
    "fmt_bytes",
]

# --- what a scan may declare ------------------------------------------------------------------------------

#: Largest detector side [px] (ky and kx). Real 4D-STEM detectors are 64..512 px; 1024 leaves room for binned
#: camera data.
MAX_PATTERN_SIDE = 1024
#: Largest scan side [positions] (ny and nx).
MAX_SCAN_SIDE = 16384
#: Most probe positions ny * nx (a 4096 x 4096 scan).
MAX_POSITIONS = 4096 * 4096
#: Largest scan in bytes, ny * nx * ky * kx * itemsize (64 GiB): bounds the time an ingest can take.
MAX_TOTAL_BYTES = 64 * 2**30

# --- HDF5 layout ------------------------------------------------------------------------------------------

#: Largest uncompressed HDF5 chunk of the scan dataset [bytes]: one chunk is decompressed whole.
MAX_CHUNK_BYTES = 64 * 2**20
#: Most chunks in the scan dataset (the chunk index is walked once at open time: ~1.5 us per chunk).
MAX_CHUNKS = 4 * 2**20
#: Most uncompressed bytes HDF5 must decompress to read ONE pattern (chunks overlapping it x chunk size).
MAX_PATTERN_READ_BYTES = 128 * 2**20
#: Most links walked in an HDF5 file when checking that nothing in it points outside.
MAX_HDF5_LINKS = 100_000
#: Attributes read per HDF5 object when collecting calibration (the rest are ignored).
MAX_ATTRS_READ = 256

# --- other formats ----------------------------------------------------------------------------------------

#: Largest ``.npy`` header [bytes] (numpy itself writes < 1 kB; its own default limit is 10 000).
MAX_NPY_HEADER_BYTES = 1 * 2**20
#: Largest side file read whole (Merlin ``.hdr``) [bytes].
MAX_SIDE_FILE_BYTES = 1 * 2**20
#: Largest Fortran-ordered ``.npy`` [bytes]: one pattern of such a file is scattered over the whole file.
MAX_FORTRAN_NPY_BYTES = 2 * 2**30
#: Most data files one DECTRIS master may link.
MAX_DATA_FILES = 10_000

# --- budget of opening a file (open_scan + metadata + first pattern) --------------------------------------

#: New memory opening a file may take [bytes], whatever its header says: the sample of patterns read at open
#: time (:data:`OPEN_SAMPLE_BYTES`), the HDF5 chunk cache while opening (:data:`OPEN_CACHE_BYTES`), and one
#: decompressed chunk (:data:`MAX_CHUNK_BYTES`) fit in it.
OPEN_MEMORY_BUDGET_BYTES = 256 * 2**20
#: Bytes of patterns read at open time to check the data (fewer than ``SAMPLE_PATTERNS`` when patterns are big).
OPEN_SAMPLE_BYTES = 64 * 2**20
#: HDF5 chunk cache while opening a file or reading a single pattern.
OPEN_CACHE_BYTES = 32 * 2**20
#: Seconds the scans over a file's structure (every frame header, every chunk-index entry, every link) may
#: take at open time before the file is refused.
OPEN_TIME_BUDGET_S = 30.0

assert OPEN_SAMPLE_BYTES + OPEN_CACHE_BYTES + 2 * MAX_CHUNK_BYTES <= OPEN_MEMORY_BUDGET_BYTES


def fmt_bytes(n: int) -> str:
    """``1234567 -> '1.2 MB (1234567 bytes)'``: human size plus the exact count."""
    n = int(n)
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def check_scan_limits(shape, itemsize: int, path=None, dataset: str | None = None) -> None:
    """Refuse a declared 4D shape ``(ny, nx, ky, kx)`` of ``itemsize``-byte values beyond the stated limits.

    Only arithmetic on the declared numbers: call it before reading or allocating anything sized by them.
    Zero/negative sizes are left to :func:`polcore.io.base.check_shape4d` (they give their own message).
    """
    try:
        ny, nx, ky, kx = (int(s) for s in shape)
    except (TypeError, ValueError):
        return  # wrong rank: reported by check_shape4d
    if min(ny, nx, ky, kx) <= 0:
        return

    def refuse(reason):
        raise ScanFormatError(path, reason, dataset=dataset)

    if ky > MAX_PATTERN_SIDE or kx > MAX_PATTERN_SIDE:
        refuse(
            f"patterns of {ky} x {kx} px exceed the limit of {MAX_PATTERN_SIDE} px per side "
            "(polcore.io.limits.MAX_PATTERN_SIDE)"
        )
    if ny > MAX_SCAN_SIDE or nx > MAX_SCAN_SIDE:
        refuse(
            f"a scan of {ny} x {nx} positions exceeds the limit of {MAX_SCAN_SIDE} positions per side "
            "(polcore.io.limits.MAX_SCAN_SIDE)"
        )
    if ny * nx > MAX_POSITIONS:
        refuse(
            f"a scan of {ny} x {nx} = {ny * nx} positions exceeds the limit of {MAX_POSITIONS} positions "
            f"({math.isqrt(MAX_POSITIONS)} x {math.isqrt(MAX_POSITIONS)}, polcore.io.limits.MAX_POSITIONS)"
        )
    total = ny * nx * ky * kx * int(itemsize)
    if total > MAX_TOTAL_BYTES:
        refuse(
            f"the scan declares {fmt_bytes(total)} ({ny} x {nx} x {ky} x {kx} x {itemsize} bytes), over the "
            f"limit of {fmt_bytes(MAX_TOTAL_BYTES)} (polcore.io.limits.MAX_TOTAL_BYTES)"
        )


class Deadline:
    """The open-time time budget: ``check()`` raises :class:`ScanFormatError` once ``seconds`` have passed.

    Used inside loops whose length depends on the file (frame headers, chunk index, links), checked every
    few thousand iterations.
    """

    def __init__(self, path, what: str, seconds: float = OPEN_TIME_BUDGET_S, dataset: str | None = None):
        self.path, self.what, self.seconds, self.dataset = path, what, float(seconds), dataset
        self.t0 = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() - self.t0 > self.seconds

    def check(self) -> None:
        if self.expired():
            raise ScanFormatError(
                self.path,
                f"{self.what} took longer than the {self.seconds:g} s budget of opening a file "
                "(polcore.io.limits.OPEN_TIME_BUDGET_S)",
                dataset=self.dataset,
            )

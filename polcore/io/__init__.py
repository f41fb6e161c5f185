"""Reading 4D-STEM scans: one lazy ``Scan`` interface over HDF5, NumPy and vendor files.

Entry point: :func:`open_scan` picks the reader from the file's first bytes (HDF5 signature, NumPy magic,
Merlin ``MQ1`` header, blockfile ``IMGBLO`` magic), not from the extension.

Conventions
-----------
* Arrays are ``(scan_y, scan_x, ky, kx)``: rows before columns, row 0 at the top, for the scan and the
  detector alike. Readers keep each format's documented orientation and say in ``meta.extra`` what they did
  (e.g. Merlin frames are flipped vertically exactly as RosettaSciIO does).
* Construction is cheap: headers are parsed and a sample of :data:`SAMPLE_PATTERNS` patterns (fewer when they
  are large) is read to check the data; pattern data are otherwise read only by :meth:`Scan.pattern` and
  :meth:`Scan.iter_batches`, one block at a time, opening the file per pass. Memory stays bounded by the
  batch size whatever the file size.
* Calibration goes to ``scan.meta`` (:class:`polcore.types.ScanMeta`): step [nm], detector sampling
  [mrad/px], voltage [kV], convergence semi-angle [mrad], scan-detector rotation [deg] and flip (py4DSTEM
  ``QR_rotation``/``QR_flip``); unknown values stay None. Reciprocal-space sampling in Å^-1 / nm^-1 is
  converted to mrad with the relativistic electron wavelength when the voltage is known.

NaN / inf policy
----------------
Float data may contain NaN or inf (dead pixels, failed simulation cells, division by a zero flat field).
They are **zeroed and counted, not refused**: every batch from :meth:`Scan.iter_batches` (and every
:meth:`Scan.pattern`) has them replaced by 0; :attr:`Scan.nonfinite_count` holds the number replaced during
the latest pass and a warning is logged at its end. At open time the first :data:`SAMPLE_PATTERNS` patterns
are checked: if *every* value there is NaN/inf the file is refused with :class:`ScanFormatError` (there is
nothing to analyse); a partial count is logged as a warning.

Errors
------
Anything that cannot be read as a scan raises :class:`ScanFormatError` (a ``ValueError``) whose message
names the file, the dataset if any, and what was wrong: missing or empty file, truncated or corrupt HDF5,
text named ``.h5``, no 4D dataset / several without ``dataset=`` (listed), 2D/3D/5D arrays, non-numeric
types, zero-size axes, a ``.mib`` whose header does not match its size, all-NaN data, and everything listed
under *Untrusted files* below. ``open_scan`` never lets another exception type escape; read errors during
iteration are wrapped the same way.

Untrusted files
---------------
Files come from users and are treated as hostile (issue 12):

* **Only regular files are opened.** ``open_scan`` looks at the path with ``os.lstat``/``os.stat`` first and
  refuses pipes, devices, sockets, directories, dangling and looping symbolic links ("not a regular file:
  named pipe (FIFO)", "symbolic link loop", ...) without opening them (:mod:`polcore.io.files`).
* **Nothing outside the file is read.** HDF5 files are audited before any data is read
  (:mod:`polcore.io.h5safe`): external links, virtual datasets, datasets with external raw storage and soft
  links that do not resolve inside the file are refused, wherever they are in the file. The only other files
  ever read are those a format names next to the scan, when they are regular files in the same folder: a
  DECTRIS master's ``<name>_data_NNNNNN.h5`` data files (opened directly, audited, never through HDF5's link
  traversal) and ``<name>.h5`` metadata, and a Merlin ``.hdr``.
* **Declared sizes are checked before anything is allocated**, against the limits of
  :mod:`polcore.io.limits` (pattern side, scan size, total bytes, chunk size, ...) and against what the file
  holds (HDF5 storage and chunk index, ``.mib`` frame count and *every* frame header, ``.npy`` / ``.blo`` file
  size equal to what the header announces). Compressed HDF5 chunks are checked before HDF5 decompresses them
  (decompression bombs). Opening stays within a memory and time budget whatever the header says.
* Calibration values that are not plausible (negative step, NaN, absurd voltage) are dropped, not used, and
  listed in ``meta.extra['ignored_calibration']``.

This package imports neither torch nor streamlit; RosettaSciIO is imported only when a blockfile is opened.
"""

from polcore.io.arina import ArinaScan
from polcore.io.base import SAMPLE_PATTERNS, ArrayScan, Scan
from polcore.io.errors import ScanFormatError
from polcore.io.ground_truth import read_ground_truth
from polcore.io.hdf5 import HDF5Scan
from polcore.io.npy import NpyScan
from polcore.io.open import SUPPORTED_FORMATS, open_scan, sha256_file, sniff_format
from polcore.io.vendor import BlockfileScan, LazyScan, MibScan

__all__ = [
    "open_scan",
    "Scan",
    "ArrayScan",
    "HDF5Scan",
    "NpyScan",
    "LazyScan",
    "MibScan",
    "BlockfileScan",
    "ArinaScan",
    "ScanFormatError",
    "read_ground_truth",
    "sha256_file",
    "sniff_format",
    "SUPPORTED_FORMATS",
    "SAMPLE_PATTERNS",
]

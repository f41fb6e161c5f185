"""Vendor formats: Quantum Detectors Merlin ``.mib`` (read here, block by block) and NanoMegas blockfile ``.blo``
(read with RosettaSciIO, ``lazy=True``, after its header has been checked here).

Merlin: every frame header is checked at open time (magic, header size, frame size and pixel type equal to
the first frame's; only the header bytes of each frame are read, with ``pread``), the file size must be a
whole number of frames, and the ``.hdr`` next to the file is read only when it is a small regular file in the
same folder. Frames are then read with positioned reads of whole frames (no memory map). Orientation follows
RosettaSciIO (like pyxem and py4DSTEM's ``load_mib``): each frame is flipped vertically (``np.flip(axis=-2)``)
relative to the row order in the file. The test file with a hot pixel "52x 39y" therefore shows it at row
``ky - 1 - 39`` (39 rows from the bottom), column 52. The scan shape is inferred as RosettaSciIO does
(``.hdr`` ScanX/ScanY, frames per trigger, else the step in the frame timestamps of the first 10 000 frames).

Blockfile: offsets, sizes and the file size must agree with the header before RosettaSciIO reads it; batches
are computed with dask's synchronous scheduler, so only the requested block is read. Axis order is checked,
not assumed: ``(scan_y, scan_x, ky, kx)``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from polcore.io.base import Scan, flat_block_reader
from polcore.io.calibration import as_kv, length_to_nm
from polcore.io.errors import ScanFormatError
from polcore.io.files import open_regular, sibling_file
from polcore.io.limits import MAX_POSITIONS, MAX_SIDE_FILE_BYTES, Deadline, check_scan_limits
from polcore.types import ScanMeta

__all__ = ["LazyScan", "MibScan", "BlockfileScan", "parse_mib_header", "parse_hdr"]

logger = logging.getLogger(__name__)

_BLO_HEADER_BYTES = 240  # RosettaSciIO's blockfile header record
_MIB_DTYPES = {"U08": np.dtype(">u1"), "U16": np.dtype(">u2"), "U32": np.dtype(">u4")}
_MIB_REFUSED = {
    "R64": "raw (R64) counter readout is not supported by RosettaSciIO; save processed frames (U08/U16/U32)",
    "U01": "1-bit packed frames (U01) are not supported by RosettaSciIO; save as U08",
    "U1": "1-bit packed frames are not supported by RosettaSciIO; save as U08",
}


class LazyScan(Scan):
    """A scan over a lazy 4D array (dask, as RosettaSciIO returns with ``lazy=True``, or any array-like).

    Parameters
    ----------
    array : dask.array.Array or array-like, shape (ny, nx, ky, kx)
        Sliced block by block; dask blocks are computed with the synchronous scheduler.
    path : str or Path, optional
        The file behind the array.
    meta : ScanMeta, optional
    name : str, optional
    dataset : str, optional
    """

    def __init__(self, array, *, path=None, meta: ScanMeta | None = None, name=None, dataset=None):
        super().__init__(
            path=path, name=name, shape=array.shape, dtype=array.dtype, meta=meta, dataset=dataset
        )
        self._array = array

    @contextmanager
    def _reading(self, light: bool = False):
        arr = self._array

        def read_block(y0, y1, x0, x1):
            block = arr[y0:y1, x0:x1]
            if hasattr(block, "compute"):
                block = block.compute(scheduler="synchronous")
            return np.asarray(block)

        yield read_block


# --- Merlin ---------------------------------------------------------------------------------------------

_MIB_CHECK_BLOCK = 8 << 20  # bytes read at a time when frames are small enough to read whole
_MIB_TIMESTAMP_FRAMES = 10_000  # as RosettaSciIO's parse_timestamps


def _mq1_fields(head: bytes, path, frame: int = 1) -> list[str]:
    try:
        text = head[:384].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ScanFormatError(path, f"frame {frame}: not a valid Merlin MQ1 frame header ({exc})") from exc
    return text.split(",")


def parse_mib_header(path, deadline: Deadline | None = None) -> dict:
    """Parse and check the frame headers of a Merlin ``.mib`` file (``MQ1,...``) against its size.

    The first header gives the frame layout; the file size must be a whole number of such frames, within the
    limits of :mod:`polcore.io.limits`; then **every** frame header is checked (only its first bytes are read):
    it must start with ``MQ1,`` and announce the same header size, chip count, width, height and pixel type.

    Returns
    -------
    dict
        ``head_bytes``, ``width``, ``height``, ``dtype`` (big-endian numpy dtype), ``code`` (U08/U16/U32),
        ``frame_bytes``, ``n_frames``, ``chips``, ``geometry``, ``timestamps`` (of the first frames, for the
        scan-shape inference).

    Raises
    ------
    ScanFormatError
        Not an MQ1 header, unsupported counter format, a file size that is not a whole number of frames
        of the size the header announces (truncated file or a header that does not match the data), a corrupt
        frame header anywhere in the file.
    """
    path = Path(path)
    deadline = deadline or Deadline(path, "checking the Merlin frame headers")
    with open_regular(path) as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        head = os.pread(fd, 768, 0)
        fields = _mq1_fields(head, path)
        try:
            if fields[0] != "MQ1":
                raise ValueError("does not start with MQ1")
            head_bytes = int(fields[2])
            chips = int(fields[3])
            width, height = int(fields[4]), int(fields[5])
            code = fields[6].strip()
            geometry = fields[7].strip()
        except (ValueError, IndexError) as exc:
            raise ScanFormatError(path, f"not a valid Merlin MQ1 frame header ({exc})") from exc
        if code in _MIB_REFUSED:
            raise ScanFormatError(path, f"unsupported counter format {code}: {_MIB_REFUSED[code]}")
        if code not in _MIB_DTYPES:
            raise ScanFormatError(
                path, f"unknown pixel format {code!r} in the MQ1 header; expected one of {sorted(_MIB_DTYPES)}"
            )
        if not (64 <= head_bytes <= 65536) or width <= 0 or height <= 0:
            raise ScanFormatError(
                path,
                f"MQ1 header announces {width} x {height} px frames with a {head_bytes}-byte header: invalid",
            )
        dt = _MIB_DTYPES[code]
        check_scan_limits((1, 1, height, width), dt.itemsize, path)
        if head_bytes > len(head):
            head = os.pread(fd, head_bytes, 0)
        frame_bytes = head_bytes + width * height * dt.itemsize
        n_frames, rest = divmod(size, frame_bytes)
        what = f"{width} x {height} px {code} frames with {head_bytes}-byte headers = {frame_bytes} bytes/frame"
        if n_frames == 0 or rest:
            raise ScanFormatError(
                path,
                f"header does not match the file size: {what}, but the file has {size} bytes "
                f"({n_frames} frames + {rest} bytes); truncated file or wrong header",
            )
        if n_frames > MAX_POSITIONS:
            raise ScanFormatError(
                path, f"{n_frames} frames, over the limit of {MAX_POSITIONS} positions (polcore.io.limits.MAX_POSITIONS)"
            )
        timestamps = _check_frames(fd, path, fields, head, n_frames, frame_bytes, head_bytes, what, deadline)
    return dict(
        head_bytes=head_bytes,
        width=width,
        height=height,
        dtype=dt,
        code=code,
        frame_bytes=frame_bytes,
        n_frames=n_frames,
        chips=chips,
        geometry=geometry,
        timestamps=timestamps,
        exposure_s=_exposure_s(head[:head_bytes]),
    )


def _check_frames(fd, path, fields, head, n, frame_bytes, head_bytes, what, deadline) -> list[str]:
    """Check the header of every frame; return the timestamps of the first frames."""
    # bytes of frame 1's header after its sequence number, through the pixel-type field: "00384,01,0256,...,U16,"
    prefix_end = len(",".join(fields[:7])) + 1
    seq_end = len(",".join(fields[:2])) + 1
    tail_ref = np.frombuffer(head[seq_end:prefix_end], dtype=np.uint8)
    magic = np.frombuffer(b"MQ1,", dtype=np.uint8)
    timestamps: list[str] = []
    want_ts = min(n, _MIB_TIMESTAMP_FRAMES)

    def bad(i, reason):
        raise ScanFormatError(
            path, f"header does not match the data: frame {i + 1} {reason} ({n} frames of {what}); corrupt or mixed file"
        )

    def slow_check(i, hdr):
        if hdr[:4] != b"MQ1,":
            bad(i, f"does not start with an MQ1 header at byte {i * frame_bytes}")
        try:
            f_i = hdr[:prefix_end + 8].decode("ascii").split(",")
        except UnicodeDecodeError:
            bad(i, "has an unreadable MQ1 header")
        if f_i[2:7] != fields[2:7]:
            bad(i, f"announces {','.join(f_i[2:7])!r} where frame 1 has {','.join(fields[2:7])!r}")

    small = frame_bytes <= 65536
    per_block = max(1, _MIB_CHECK_BLOCK // frame_bytes) if small else 4096
    i = 0
    while i < n:
        deadline.check()
        k = min(per_block, n - i)
        if small:  # read whole frames, compare the header bytes of all of them at once
            buf = os.pread(fd, k * frame_bytes, i * frame_bytes)
            if len(buf) != k * frame_bytes:
                bad(i, "is cut short (file changed while reading?)")
            rows = np.frombuffer(buf, dtype=np.uint8).reshape(k, frame_bytes)
            ok = (rows[:, :4] == magic).all(axis=1) & (rows[:, seq_end:prefix_end] == tail_ref).all(axis=1)
            for j in np.flatnonzero(~ok):  # e.g. a sequence number wider than frame 1's: parse the fields
                slow_check(i + int(j), bytes(rows[j, :head_bytes]))
            for j in range(max(0, min(k, want_ts - i))):
                timestamps.append(_field_from_end(bytes(rows[j, :head_bytes]), 4))
        else:  # large frames: read only the first bytes of each header
            for m in range(i, i + k):
                hdr = os.pread(fd, head_bytes if m < want_ts else prefix_end + 8, m * frame_bytes)
                if hdr[:4] != b"MQ1," or hdr[seq_end:prefix_end] != head[seq_end:prefix_end]:
                    slow_check(m, hdr)
                if m < want_ts:
                    timestamps.append(_field_from_end(hdr, 4))
        i += k
    return timestamps


def _field_from_end(header: bytes, k: int) -> str:
    """The k-th comma-separated field from the end of a frame header (4: timestamp, 3: exposure)."""
    parts = header.decode("ascii", "replace").split(",")
    return parts[-k] if len(parts) >= k else ""


def parse_hdr(path, scan_path=None) -> dict:
    """Key/value pairs of a Merlin ``.hdr`` acquisition header (empty dict when absent).

    Read only when it is a regular file of at most :data:`polcore.io.limits.MAX_SIDE_FILE_BYTES` in the folder
    of ``scan_path`` (when given); otherwise :class:`ScanFormatError` naming the scan file.
    """
    path = Path(path)
    scan_path = Path(scan_path) if scan_path is not None else path
    if sibling_file(scan_path, path, "acquisition header") is None:
        return {}
    with open_regular(path, "acquisition header") as fh:
        raw = fh.read(MAX_SIDE_FILE_BYTES + 1)
    if len(raw) > MAX_SIDE_FILE_BYTES:
        raise ScanFormatError(
            scan_path,
            f"acquisition header {path.name} is larger than {MAX_SIDE_FILE_BYTES} bytes "
            "(polcore.io.limits.MAX_SIDE_FILE_BYTES); not a Merlin .hdr",
        )
    out = {}
    for line in raw.replace(b"\x00", b"").decode("latin1").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _hdr_int(hdr: dict, key: str) -> int | None:
    try:
        return int(str(hdr.get(key, "")).split()[0])
    except (ValueError, IndexError):
        return None


def _frames_per_line(timestamps: list[str]) -> int | None:
    """RosettaSciIO's inference: the first step in the frame timestamps larger than the mean step marks the
    end of the first scan line (frames per line = its index + 1)."""
    if len(timestamps) < 2:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = np.array([t.strip().rstrip("Z") for t in timestamps]).astype("datetime64[ns]")
    except (ValueError, TypeError, OverflowError):
        return None
    diff = np.diff(times).astype(float)
    idx = np.flatnonzero(diff - np.mean(diff) > 0)
    return int(idx[0]) + 1 if len(idx) else None


class MibScan(Scan):
    """Quantum Detectors Merlin ``.mib`` (+ ``.hdr``), read lazily with positioned reads of whole frames.

    Scan shape, in order of preference: ``nav_shape`` argument; ``ScanX``/``ScanY`` in the ``.hdr``;
    frames per trigger (``.hdr``) or the step in the frame timestamps, as RosettaSciIO infers it; a square
    scan when the frame count is a perfect square (logged, ``meta.extra['nav_shape_source']``); otherwise
    refused.

    Parameters
    ----------
    path : str or Path
        The ``.mib`` file (the ``.hdr`` next to it is read when present).
    nav_shape : (int, int), optional
        ``(ny, nx)``.
    """

    def __init__(self, path, *, nav_shape=None, name=None):
        path = Path(path)
        info = parse_mib_header(path)
        n = info["n_frames"]
        hdr_path = path.with_suffix(".hdr")
        hdr = parse_hdr(hdr_path, path) if hdr_path != path else {}
        expected = _hdr_int(hdr, "Frames in Acquisition (Number)")
        if expected and expected > n:
            raise ScanFormatError(
                path,
                f"{hdr_path.name} announces {expected} frames but the file holds {n} complete frames "
                "(interrupted acquisition or truncated copy)",
            )
        if expected and expected < n:
            logger.warning("%s: %d frames in the file, %s announces %d", path, n, hdr_path.name, expected)
        nav_source = "nav_shape argument"
        if nav_shape is None and _hdr_int(hdr, "ScanX") and _hdr_int(hdr, "ScanY"):
            nav_shape = (_hdr_int(hdr, "ScanY"), _hdr_int(hdr, "ScanX"))
            nav_source = f"{hdr_path.name} ScanY/ScanX"
        if nav_shape is None:
            nav_shape, nav_source = self._infer_nav(path, hdr, hdr_path, info, n)
        try:
            ny, nx = (int(v) for v in nav_shape)
        except (TypeError, ValueError) as exc:
            raise ScanFormatError(path, f"nav_shape must be (ny, nx), got {nav_shape!r}") from exc
        if ny <= 0 or nx <= 0:
            raise ScanFormatError(path, f"zero-size scan {ny} x {nx} (from {nav_source})")
        check_scan_limits((ny, nx, info["height"], info["width"]), info["dtype"].itemsize, path)
        if ny * nx > n:
            raise ScanFormatError(path, f"scan {ny} x {nx} (from {nav_source}) needs {ny * nx} frames, file has {n}")
        if ny * nx < n:
            logger.warning("%s: reading the first %d of %d frames as a %d x %d scan", path, ny * nx, n, ny, nx)
        extra = {
            "format": "Quantum Detectors Merlin .mib",
            "nav_shape_source": nav_source,
            "counter_depth": _hdr_int(hdr, "Counter Depth (number)"),
            "pixel_format": info["code"],
            "assembly": info["geometry"],
            "dwell_time_s": info["exposure_s"],
            "orientation": "frames flipped vertically as RosettaSciIO does (np.flip axis -2 of the file rows)",
            "hdr_file": hdr_path.name if hdr else None,
        }
        super().__init__(
            path=path,
            name=name,
            shape=(ny, nx, info["height"], info["width"]),
            dtype=info["dtype"],
            meta=ScanMeta(source="Merlin header (no calibration)", extra=extra),
        )
        self._info = {k: v for k, v in info.items() if k != "timestamps"}

    @staticmethod
    def _infer_nav(path, hdr, hdr_path, info, n):
        """Scan shape as RosettaSciIO infers it: frames per trigger from the .hdr, else from the timestamps;
        a single line or column falls back to a square scan (or a refusal)."""
        frames = n
        per_line = 1
        if hdr:
            per_line = _hdr_int(hdr, "Frames per Trigger (Number)") or 1
            frames = _hdr_int(hdr, "Frames in Acquisition (Number)")
            frames = n if frames is None else min(frames, n)
        if per_line == 1:
            per_line = _frames_per_line(info["timestamps"]) or 1
        if frames and per_line and frames // per_line > 1 and per_line > 1:
            ny = min(frames // per_line, n // per_line)
            return (ny, per_line), "Merlin .hdr frames per trigger / frame timestamps (as RosettaSciIO)"
        count = frames if frames else n
        r = math.isqrt(count)
        if r * r != count:
            raise ScanFormatError(
                path,
                f"{count} frames and no scan size in {hdr_path.name} or the frame timestamps: pass nav_shape=(ny, nx)",
            )
        logger.warning("%s: no scan size in the header; assuming a square %d x %d scan", path, r, r)
        return (r, r), f"assumed square ({count} frames, no scan size in the header)"

    @contextmanager
    def _reading(self, light: bool = False):
        info = self._info
        frame_dtype = np.dtype([("header", f"V{info['head_bytes']}"), ("data", info["dtype"], (info["height"], info["width"]))])
        fbytes = info["frame_bytes"]
        with open_regular(self.path) as fh:

            def frames(a, b):
                out = np.empty(b - a, dtype=frame_dtype)
                fh.seek(a * fbytes)
                got = fh.readinto(memoryview(out).cast("B"))
                if got != out.nbytes:
                    raise OSError(f"short read: {got} of {out.nbytes} bytes at frame {a}")
                return np.ascontiguousarray(out["data"][:, ::-1, :])

            yield flat_block_reader(frames, self.nav_shape[1], self.sig_shape)


def _exposure_s(first_header: bytes) -> float | None:
    """Exposure of the first frame [s] from its header ("...,100000000ns,6,"), as RosettaSciIO reads it."""
    text = _field_from_end(first_header, 3).strip()
    if not text.endswith("ns"):
        return None
    try:
        v = float(text[:-2]) * 1e-9
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


# --- NanoMegas blockfile ----------------------------------------------------------------------------------


class BlockfileScan(LazyScan):
    """NanoMegas ASTAR blockfile ``.blo`` read with RosettaSciIO, lazily.

    The header's probe step (``SX``/``SY`` [nm]) and beam energy [V] go to ``meta``; scan rotation and the
    camera length to ``meta.extra``.
    """

    def __init__(self, path, *, nav_shape=None, name=None):
        path = Path(path)
        self._check_size(path)
        try:
            from rsciio.blockfile import file_reader
        except ImportError as exc:
            raise ScanFormatError(
                path,
                "reading NanoMegas .blo needs RosettaSciIO's blockfile reader, which imports scikit-image "
                f"(not installed: {exc}); install scikit-image",
            ) from exc
        try:
            result = file_reader(str(path), lazy=True)
        except Exception as exc:
            raise ScanFormatError(
                path, f"RosettaSciIO could not read the blockfile: {type(exc).__name__}: {exc}"
            ) from exc
        entry = result[0]
        data = entry["data"]
        header = entry.get("original_metadata", {}).get("blockfile_header", {})
        if data.ndim != 4:
            raise ScanFormatError(
                path, f"blockfile holds a {data.ndim}D array {tuple(data.shape)}, not a 2D scan"
            )
        names = [a.get("name") for a in entry.get("axes", [])]
        if names and names[:2] != ["y", "x"]:
            raise ScanFormatError(path, f"unexpected axis order from RosettaSciIO: {names}")
        if nav_shape is not None and tuple(nav_shape) != tuple(data.shape[:2]):
            raise ScanFormatError(
                path, f"nav_shape={tuple(nav_shape)} does not match the header's {data.shape[:2]}"
            )
        sx, sy = _f(header.get("SX")), _f(header.get("SY"))
        extra = {
            "format": "NanoMegas blockfile",
            "scan_rotation_deg": _f(header.get("Scan_rotation"), 0.01),
            "camera_length_mm": _f(header.get("Camera_length"), 0.1),
            "step_x_nm": sx,
            "step_y_nm": sy,
            "note": str(header.get("Note", ""))[:200],
        }
        meta = ScanMeta(
            step_nm=length_to_nm(sx, "nm") if sx and (not sy or math.isclose(sx, sy, rel_tol=1e-6)) else None,
            voltage_kv=as_kv(header.get("Beam_energy")),
            source="blockfile header",
            extra=extra,
        )
        super().__init__(data, path=path, meta=meta, name=name)

    @staticmethod
    def _check_size(path: Path) -> None:
        """Check the blockfile header against the limits and the file size before RosettaSciIO reads it.

        Layout: a 240-byte header, a note up to ``Data_offset_1``, the virtual bright-field image (ny x nx
        bytes) up to ``Data_offset_2``, then ny x nx frames of a 6-byte marker + dp x dp uint8 pixels; the file
        size must be exactly that.
        """
        with open_regular(path) as fh:
            raw = fh.read(0x40)
            size = os.fstat(fh.fileno()).st_size
        if len(raw) < 0x40 or raw[:6] != b"IMGBLO":
            raise ScanFormatError(path, "not a blockfile (no IMGBLO header)")
        off1 = int.from_bytes(raw[8:12], "little")
        off2 = int.from_bytes(raw[12:16], "little")
        dp = int.from_bytes(raw[20:22], "little")
        nx = int.from_bytes(raw[24:26], "little")
        ny = int.from_bytes(raw[26:28], "little")
        if dp == 0 or nx == 0 or ny == 0:
            raise ScanFormatError(
                path, f"zero-size axis in the blockfile header: scan {ny} x {nx}, patterns {dp} px"
            )
        check_scan_limits((ny, nx, dp, dp), 1, path)
        if not (_BLO_HEADER_BYTES <= off1 <= MAX_SIDE_FILE_BYTES) or off1 + nx * ny > off2:
            raise ScanFormatError(
                path,
                f"blockfile header offsets do not fit: note up to byte {off1}, image of {ny} x {nx} bytes, data "
                f"from byte {off2} (expected {_BLO_HEADER_BYTES} <= offset 1 <= {MAX_SIDE_FILE_BYTES} and "
                "offset 1 + ny * nx <= offset 2); corrupt header",
            )
        need = off2 + nx * ny * (6 + dp * dp)
        if size < need:
            raise ScanFormatError(
                path,
                f"header announces {ny} x {nx} patterns of {dp} x {dp} px ({need} bytes) but the file has {size} "
                "bytes: truncated",
            )
        if size > need:
            raise ScanFormatError(
                path,
                f"header announces {ny} x {nx} patterns of {dp} x {dp} px ({need} bytes) but the file has {size} "
                f"bytes ({size - need} more): header and data do not match",
            )


def _f(value, scale: float = 1.0) -> float | None:
    try:
        v = float(value) * scale
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None

"""Vendor formats read through RosettaSciIO (``lazy=True``): Quantum Detectors Merlin ``.mib`` and NanoMegas
blockfile ``.blo``.

RosettaSciIO returns a lazy dask array; batches are computed with dask's synchronous scheduler, so only the
requested block is read. Axis order is checked, not assumed: both readers return
``(scan_y, scan_x, ky, kx)``.

Merlin orientation: RosettaSciIO (like pyxem and py4DSTEM's ``load_mib``) flips each frame vertically
(``np.flip(axis=-2)``) relative to the row order in the file; we keep that. The test file with a hot pixel
"52x 39y" therefore shows it at row ``ky - 1 - 39`` (39 rows from the bottom), column 52.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from polcore.io.base import Scan
from polcore.io.calibration import as_kv, length_to_nm
from polcore.io.errors import ScanFormatError
from polcore.types import ScanMeta

__all__ = ["LazyScan", "MibScan", "BlockfileScan", "parse_mib_header", "parse_hdr"]

logger = logging.getLogger(__name__)

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
    def _reading(self):
        arr = self._array

        def read_block(y0, y1, x0, x1):
            block = arr[y0:y1, x0:x1]
            if hasattr(block, "compute"):
                block = block.compute(scheduler="synchronous")
            return np.asarray(block)

        yield read_block


# --- Merlin ---------------------------------------------------------------------------------------------


def parse_mib_header(path) -> dict:
    """Parse the first frame header of a Merlin ``.mib`` file (``MQ1,...``) and check it against the size.

    Returns
    -------
    dict
        ``head_bytes``, ``width``, ``height``, ``dtype`` (big-endian numpy dtype), ``code`` (U08/U16/U32),
        ``frame_bytes``, ``n_frames``, ``chips``, ``geometry``.

    Raises
    ------
    ScanFormatError
        Not an MQ1 header, unsupported counter format, or a file size that is not a whole number of frames
        of the size the header announces (truncated file or a header that does not match the data).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(768)
    try:
        fields = head[:384].decode("ascii").split(",")
        if fields[0] != "MQ1":
            raise ValueError("does not start with MQ1")
        head_bytes = int(fields[2])
        chips = int(fields[3])
        width, height = int(fields[4]), int(fields[5])
        code = fields[6].strip()
        geometry = fields[7].strip()
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise ScanFormatError(path, f"not a valid Merlin MQ1 frame header ({exc})") from exc
    if code in _MIB_REFUSED:
        raise ScanFormatError(path, f"unsupported counter format {code}: {_MIB_REFUSED[code]}")
    if code not in _MIB_DTYPES:
        raise ScanFormatError(
            path, f"unknown pixel format {code!r} in the MQ1 header; expected one of {sorted(_MIB_DTYPES)}"
        )
    if head_bytes < 64 or width <= 0 or height <= 0:
        raise ScanFormatError(
            path,
            f"MQ1 header announces {width} x {height} px frames with a {head_bytes}-byte header: invalid",
        )
    dt = _MIB_DTYPES[code]
    frame_bytes = head_bytes + width * height * dt.itemsize
    n_frames, rest = divmod(size, frame_bytes)
    what = f"{width} x {height} px {code} frames with {head_bytes}-byte headers = {frame_bytes} bytes/frame"
    if n_frames == 0 or rest:
        raise ScanFormatError(
            path,
            f"header does not match the file size: {what}, but the file has {size} bytes "
            f"({n_frames} frames + {rest} bytes); truncated file or wrong header",
        )
    with open(path, "rb") as fh:
        for i in sorted({1, n_frames - 1} - {0}):
            if i >= n_frames:
                continue
            fh.seek(i * frame_bytes)
            if fh.read(4) != b"MQ1,":
                raise ScanFormatError(
                    path,
                    f"header does not match the data: frame {i + 1} does not start with an MQ1 header at byte "
                    f"{i * frame_bytes} ({what})",
                )
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
    )


def parse_hdr(path) -> dict:
    """Key/value pairs of a Merlin ``.hdr`` acquisition header (empty dict when absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_bytes().replace(b"\x00", b"").decode("latin1").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _hdr_int(hdr: dict, key: str) -> int | None:
    try:
        return int(str(hdr.get(key, "")).split()[0])
    except (ValueError, IndexError):
        return None


class MibScan(LazyScan):
    """Quantum Detectors Merlin ``.mib`` (+ ``.hdr``) read with RosettaSciIO, lazily.

    Scan shape, in order of preference: ``nav_shape`` argument; ``ScanX``/``ScanY`` in the ``.hdr``;
    RosettaSciIO's inference (frames per trigger / frame timestamps); a square scan when the frame count is
    a perfect square (logged, ``meta.extra['nav_shape_source']``); otherwise refused.

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
        hdr = parse_hdr(hdr_path)
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
        if nav_shape is not None:
            try:
                ny, nx = (int(v) for v in nav_shape)
            except (TypeError, ValueError) as exc:
                raise ScanFormatError(path, f"nav_shape must be (ny, nx), got {nav_shape!r}") from exc
            if ny * nx > n:
                raise ScanFormatError(
                    path, f"scan {ny} x {nx} (from {nav_source}) needs {ny * nx} frames, file has {n}"
                )
            nav_shape = (ny, nx)
            if ny * nx < n:
                logger.warning(
                    "%s: reading the first %d of %d frames as a %d x %d scan", path, ny * nx, n, ny, nx
                )
        try:
            from rsciio.quantumdetector import file_reader
        except ImportError as exc:  # pragma: no cover - rosettasciio is a pinned dependency
            raise ScanFormatError(path, f"reading .mib needs RosettaSciIO (rosettasciio): {exc}") from exc
        kwargs = {"navigation_shape": (nav_shape[1], nav_shape[0])} if nav_shape else {}
        try:
            result = file_reader(str(path), lazy=True, **kwargs)
        except Exception as exc:  # rsciio raises ValueError/RuntimeError/OSError/TypeError
            raise ScanFormatError(
                path, f"RosettaSciIO could not read the .mib: {type(exc).__name__}: {exc}"
            ) from exc
        data = result[0]["data"]
        if data.ndim == 3:
            if nav_shape is None:
                r = math.isqrt(data.shape[0])
                if r * r != data.shape[0]:
                    raise ScanFormatError(
                        path,
                        f"{data.shape[0]} frames and no scan size in {hdr_path.name} or the frame timestamps: "
                        "pass nav_shape=(ny, nx)",
                    )
                nav_shape = (r, r)
                nav_source = f"assumed square ({data.shape[0]} frames, no scan size in the header)"
                logger.warning("%s: no scan size in the header; assuming a square %d x %d scan", path, r, r)
            data = data.reshape(nav_shape + tuple(data.shape[1:]))
        elif data.ndim == 4 and nav_shape is None:
            nav_source = "RosettaSciIO (frames per trigger / timestamps)"
        elif data.ndim != 4:
            raise ScanFormatError(path, f"RosettaSciIO returned a {data.ndim}D array {data.shape}")
        if tuple(data.shape[-2:]) != (info["height"], info["width"]):
            raise ScanFormatError(
                path,
                f"detector shape {data.shape[-2:]} differs from the header's {info['height']} x {info['width']}",
            )
        md = result[0].get("metadata", {})
        extra = {
            "format": "Quantum Detectors Merlin .mib",
            "nav_shape_source": nav_source,
            "counter_depth": _hdr_int(hdr, "Counter Depth (number)"),
            "pixel_format": info["code"],
            "assembly": info["geometry"],
            "dwell_time_s": md.get("Acquisition_instrument", {}).get("dwell_time"),
            "orientation": "frames flipped vertically as RosettaSciIO does (np.flip axis -2 of the file rows)",
            "hdr_file": hdr_path.name if hdr else None,
        }
        super().__init__(
            data, path=path, meta=ScanMeta(source="Merlin header (no calibration)", extra=extra), name=name
        )


# --- NanoMegas blockfile ----------------------------------------------------------------------------------


class BlockfileScan(LazyScan):
    """NanoMegas ASTAR blockfile ``.blo`` read with RosettaSciIO, lazily.

    The header's probe step (``SX``/``SY`` [nm]) and beam energy [V] go to ``meta``; scan rotation and the
    camera length to ``meta.extra``.
    """

    def __init__(self, path, *, nav_shape=None, name=None):
        path = Path(path)
        try:
            from rsciio.blockfile import file_reader
        except ImportError as exc:
            raise ScanFormatError(
                path,
                "reading NanoMegas .blo needs RosettaSciIO's blockfile reader, which imports scikit-image "
                f"(not installed: {exc}); install scikit-image",
            ) from exc
        self._check_size(path)
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
        with open(path, "rb") as fh:
            raw = fh.read(0x40)
        if len(raw) < 0x40 or raw[:6] != b"IMGBLO":
            raise ScanFormatError(path, "not a blockfile (no IMGBLO header)")
        off2 = int.from_bytes(raw[12:16], "little")
        dp = int.from_bytes(raw[20:22], "little")
        nx = int.from_bytes(raw[24:26], "little")
        ny = int.from_bytes(raw[26:28], "little")
        if dp == 0 or nx == 0 or ny == 0:
            raise ScanFormatError(
                path, f"zero-size axis in the blockfile header: scan {ny} x {nx}, patterns {dp} px"
            )
        need = off2 + nx * ny * (6 + dp * dp)
        size = path.stat().st_size
        if size < need:
            raise ScanFormatError(
                path,
                f"header announces {ny} x {nx} patterns of {dp} x {dp} px ({need} bytes) but the file has {size} "
                "bytes: truncated",
            )


def _f(value, scale: float = 1.0) -> float | None:
    try:
        v = float(value) * scale
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None

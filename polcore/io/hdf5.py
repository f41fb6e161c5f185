"""HDF5 readers: generic 4D datasets, py4DSTEM / EMD 1.0, Prismatic EMD; dispatch to DECTRIS ARINA.

Layouts recognised (all read with h5py, lazily, block by block):

* **py4DSTEM / emdfile (EMD 1.0)**: root attrs ``emd_group_type='file'``, ``version_major=1``; a group with
  ``emd_group_type='array'`` (``python_class='DataCube'``) holding ``data`` and ``dim0..dim3`` (``dim1..dim4``
  in older writers). Calibration from the nearest ``metadatabundle/calibration`` group (the datacube's own or
  an ancestor's): ``R_pixel_size``/``R_pixel_units`` -> step [nm]; ``Q_pixel_size``/``Q_pixel_units`` -> mrad/px
  (``A^-1`` / ``nm^-1`` converted with the electron wavelength when the voltage is known, else kept in
  ``meta.extra``); ``QR_rotation_degrees`` (or ``QR_rotation`` [rad]) and ``QR_flip``; voltage from
  ``voltage``/``accelerating_voltage`` [V or kV] or ``beam_energy``/``energy`` [eV]; convergence from
  ``convergence_semiangle_mrad``. Without a calibration group the ``dim`` vectors and their ``units`` are used.
* **Prismatic EMD (EMD 0.x, axes numbered from 1)**: ``4DSTEM_simulation/data/datacubes/CBED_array_depthNNNN/
  datacube``, one 4D dataset per output depth. The deepest depth is taken unless ``dataset=`` names another
  (group name such as ``CBED_array_depth0000`` or the full dataset path); the choice is logged and recorded in
  ``meta.extra['prismatic_depth']``. Prismatic labels its axes ``[n_m]``/``[n_m^-1]`` but writes Å and Å^-1
  (probe positions 0..5 for a 5.43 Å cell); they are read as Å. Voltage ``E`` [kV] and probe semi-angle ``sa``
  [mrad] come from the simulation parameters.
* **DECTRIS ARINA (NeXus)**: ``<name>_master.h5`` with ``entry/data/data_NNNNNN`` external links to
  ``<name>_data_NNNNNN.h5`` (bitshuffle-LZ4: ``hdf5plugin`` is imported before opening) and an optional
  ``<name>.h5`` with ``STEM Metadata`` (``NumPixelsX/Y``, ``Pixel Size`` [nm], ``High Tension`` [V]). Opening
  any of the three files opens the scan through the master file (:mod:`polcore.io.arina`).
* **Generic**: exactly one 4D dataset anywhere in the tree (``ground_truth/`` excluded), or the one named by
  ``dataset=``. Optional attributes ``step_nm``, ``mrad_per_px``, ``voltage_kv``, ``convergence_mrad``,
  ``rotation_deg``, ``flip`` on the dataset or the root are read as calibration.

Array order is kept as stored, ``(scan_y, scan_x, ky, kx)``. py4DSTEM and Prismatic call the first axis "x"
(their convention: x is the row index); their ``R_x``/``Q_x`` are therefore our scan_y/ky.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from polcore.io.base import Scan, check_dtype, check_shape4d, flat_block_reader
from polcore.io.calibration import as_kv, length_to_nm, reciprocal_to_mrad
from polcore.io.errors import ScanFormatError
from polcore.io.files import check_regular_file
from polcore.io.ground_truth import GROUP as _GROUND_TRUTH
from polcore.io.h5safe import DecodedChunks, audit_file, check_storage, resolve, small_attr, small_attrs
from polcore.io.limits import (
    MAX_ATTRS_READ,
    MAX_CHUNK_BYTES,
    MAX_PATTERN_READ_BYTES,
    OPEN_CACHE_BYTES,
    check_scan_limits,
    fmt_bytes,
)
from polcore.types import ScanMeta

__all__ = ["HDF5Scan", "open_hdf5", "h5open", "list_arrays"]

logger = logging.getLogger(__name__)

_CACHE_MIN = 1 << 20
_CACHE_MAX = 256 << 20


def _import_filters() -> bool:
    """Register the compression filters of hdf5plugin (bitshuffle-LZ4 for DECTRIS files)."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:  # pragma: no cover - hdf5plugin is a pinned dependency
        logger.warning("hdf5plugin is not installed: compressed DECTRIS (bitshuffle-LZ4) data cannot be read")
        return False
    return True


def h5open(path, **kwargs) -> h5py.File:
    """Open a regular HDF5 file read-only (filters registered); wrap failures into :class:`ScanFormatError`.

    The path is checked with ``os.stat`` first: pipes, devices, directories and broken links are refused
    without being opened (:func:`polcore.io.files.check_regular_file`).
    """
    _import_filters()
    check_regular_file(path)
    try:
        return h5py.File(path, "r", locking=False, **kwargs)
    except FileNotFoundError as exc:
        raise ScanFormatError(path, "file not found") from exc
    except OSError as exc:
        raise ScanFormatError(
            path, f"cannot open as HDF5 (truncated or corrupt file?): {_short(exc)}"
        ) from exc


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_TEXT = 1000


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | np.bytes_):
        return bytes(value[: 4 * _MAX_TEXT]).decode("utf-8", "replace")[:_MAX_TEXT]
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        return _text(value.reshape(-1)[0])
    return str(value)[:_MAX_TEXT]


def _num(value) -> float | None:
    try:
        arr = np.asarray(value)
        if arr.size != 1 or arr.dtype.kind not in "uifb":
            return None
        v = float(arr.reshape(-1)[0])
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _read_small(ds: h5py.Dataset):
    """Value of a scalar / tiny dataset as a Python object (bytes decoded)."""
    if ds.size > 64:
        return None
    value = ds[()]
    if isinstance(value, bytes | np.bytes_):
        return _text(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OS":
            return [_text(v) for v in value.reshape(-1)]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def list_arrays(f: h5py.File) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """All datasets of rank >= 2 outside ``ground_truth/``: ``[(path, shape, dtype), ...]`` (no data read)."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim >= 2:
            if name == _GROUND_TRUTH or name.startswith(_GROUND_TRUTH + "/") or f"/{_GROUND_TRUTH}/" in name:
                return
            found.append((name, tuple(obj.shape), obj.dtype))

    f.visititems(visit)
    return found


def _describe(arrays) -> str:
    return ", ".join(f"{p!r} {tuple(s)} {d}" for p, s, d in arrays)


def _depth_of(path: str) -> int | None:
    m = re.search(r"depth(\d+)", path)
    return int(m.group(1)) if m else None


def _is_prismatic(f: h5py.File, path: str) -> bool:
    return path.startswith("4DSTEM_simulation/") or (
        _depth_of(path) is not None and f"{path.rsplit('/', 1)[0]}/dim1" in f
    )


def _resolve_dataset(f, arrays, dataset: str, path: Path):
    """Find the dataset named by ``dataset=``: a full path, a path suffix, or the name of its group."""
    want = dataset.strip("/")
    if want in f and isinstance(f[want], h5py.Dataset):
        return want
    candidates = []
    for p, _, _ in arrays:
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        if p.endswith("/" + want) or parent == want or parent.endswith("/" + want):
            candidates.append(p)
    if want in f and isinstance(f[want], h5py.Group):
        inside = [p for p, _, _ in arrays if p.startswith(want + "/") and p.count("/") == want.count("/") + 1]
        candidates = inside or candidates
    if len(candidates) == 1:
        return candidates[0]
    four = [a for a in arrays if len(a[1]) == 4]
    if not candidates:
        raise ScanFormatError(
            path,
            f"no dataset matches dataset={dataset!r}; 4D datasets in the file: {_describe(four) or 'none'}",
            dataset=dataset,
        )
    raise ScanFormatError(
        path,
        f"dataset={dataset!r} is ambiguous, it matches {candidates}; give the full path",
        dataset=dataset,
    )


def _choose(f, path: Path, dataset: str | None, nav_shape) -> tuple[str, dict]:
    """Pick the dataset to read; return ``(dataset_path, info)``; raise with the reason when none fits."""
    arrays = list_arrays(f)
    info: dict = {}
    if dataset is not None:
        chosen = _resolve_dataset(f, arrays, dataset, path)
        ndim = f[chosen].ndim
        if ndim == 4 or (ndim == 3 and nav_shape is not None):
            if _is_prismatic(f, chosen):
                depths = sorted(p for p, s, _ in arrays if len(s) == 4 and _depth_of(p) is not None)
                info.update(prismatic_depth=chosen, prismatic_depths=depths)
            return chosen, info
        raise ScanFormatError(path, _rank_reason(tuple(f[chosen].shape)), dataset=chosen)

    four = [a for a in arrays if len(a[1]) == 4]
    prism = [a for a in four if _is_prismatic(f, a[0])]
    if prism and len(prism) == len(four):
        prism.sort(key=lambda a: (_depth_of(a[0]) if _depth_of(a[0]) is not None else -1, a[0]))
        chosen = prism[-1][0]
        depths = [a[0] for a in prism]
        info.update(prismatic_depth=chosen, prismatic_depths=depths)
        if len(prism) > 1:
            logger.info(
                "%s: Prismatic file with %d depths; reading the deepest, %r (pass dataset= to choose: %s)",
                path,
                len(prism),
                chosen,
                ", ".join(depths),
            )
        return chosen, info
    if len(four) == 1:
        return four[0][0], info
    if len(four) > 1:
        raise ScanFormatError(
            path,
            f"several 4D datasets: {_describe(four)}; pass dataset= with one of {[a[0] for a in four]}",
        )
    five = [a for a in arrays if len(a[1]) == 5]
    if five:
        raise ScanFormatError(
            path,
            f"no 4D dataset; 5D dataset(s) {_describe(five)} are not read (only Prismatic depth series, "
            "stored as one 4D dataset per depth, are): save one 4D (scan_y, scan_x, ky, kx) array",
        )
    three = [a for a in arrays if len(a[1]) == 3]
    if three:
        if nav_shape is not None and len(three) == 1:
            return three[0][0], info
        raise ScanFormatError(
            path,
            f"no 4D dataset; 3D dataset(s) {_describe(three)} look like a flat stack of frames "
            "(n, ky, kx): pass nav_shape=(ny, nx) (and dataset= if several) to read it as a scan",
        )
    higher = [a for a in arrays if len(a[1]) > 5]
    if higher:
        raise ScanFormatError(path, f"no 4D dataset; only {_describe(higher)}")
    two = [a for a in arrays if len(a[1]) == 2]
    if two:
        raise ScanFormatError(path, f"no 4D dataset; only 2D image(s) {_describe(two)}: not a 4D-STEM scan")
    raise ScanFormatError(path, "no 4D dataset: the file holds no array datasets")


def _rank_reason(shape) -> str:
    if len(shape) == 3:
        return (
            f"3D array {shape}: a flat stack of frames (n, ky, kx); pass nav_shape=(ny, nx) to read it as a "
            "scan"
        )
    if len(shape) == 5:
        return f"5D array {shape}: only Prismatic depth series (one 4D dataset per depth) are read"
    return f"expected a 4D array (scan_y, scan_x, ky, kx), got {len(shape)}D shape {shape}"


# --- calibration ----------------------------------------------------------------------------------------


def _calibration_group(f: h5py.File, ds_path: str) -> h5py.Group | None:
    parts = ds_path.split("/")[:-1]
    while True:
        base = "/".join(parts)
        key = f"{base}/metadatabundle/calibration" if base else "metadatabundle/calibration"
        if key in f and isinstance(f[key], h5py.Group):
            return f[key]
        if not parts:
            return None
        parts.pop()


def _group_values(g: h5py.Group) -> dict:
    """Small attributes and small datasets of a calibration group (the file has passed :func:`audit_file`)."""
    values = {
        k: _text(v) if isinstance(v, bytes | np.bytes_ | str) else _num(v) for k, v in small_attrs(g).items()
    }
    for i, k in enumerate(g.keys()):
        if i >= MAX_ATTRS_READ:
            break
        obj = g.get(k)
        if isinstance(obj, h5py.Dataset):
            try:
                values[k] = _read_small(obj)
            except Exception:  # noqa: BLE001 - an unreadable calibration value is no calibration
                logger.warning("%s: calibration value %s unreadable, ignored", g.file.filename, obj.name)
    return values


def _first(values: dict, *keys):
    for k in keys:
        if values.get(k) is not None:
            return values[k]
    return None


def _dim_step(f, ds_path: str, axis: int, base: int):
    g = f[ds_path.rsplit("/", 1)[0]] if "/" in ds_path else f["/"]
    dim = g.get(f"dim{axis + base}")
    if not isinstance(dim, h5py.Dataset) or dim.ndim != 1 or dim.shape[0] < 2 or dim.dtype.kind not in "uif":
        return None, None
    try:
        v = dim[:2].astype(float)
    except Exception:  # noqa: BLE001 - an unreadable axis vector is no calibration
        return None, None
    return float(v[1] - v[0]), _text(small_attr(dim, "units"))


def _emd1_meta(f: h5py.File, ds_path: str) -> ScanMeta:
    cal_group = _calibration_group(f, ds_path)
    cal = _group_values(cal_group) if cal_group is not None else {}
    extra: dict = {"format": "EMD 1.0 (py4DSTEM/emdfile)", "calibration": _jsonable(cal)}
    source = "py4DSTEM calibration" if cal_group is not None else "EMD dim vectors"
    voltage = as_kv(_first(cal, "voltage", "accelerating_voltage", "high_tension"))
    if voltage is None:
        e = _num(_first(cal, "beam_energy", "energy", "E0"))
        voltage = e / 1e3 if e else None
    base = 0 if f"{ds_path.rsplit('/', 1)[0]}/dim0" in f else 1
    r_size, r_units = cal.get("R_pixel_size"), cal.get("R_pixel_units")
    if r_size is None:
        r_size, r_units = _dim_step(f, ds_path, 0, base)
    q_size, q_units = cal.get("Q_pixel_size"), cal.get("Q_pixel_units")
    if q_size is None:
        q_size, q_units = _dim_step(f, ds_path, 2, base)
    step = length_to_nm(r_size, r_units)
    mrad = reciprocal_to_mrad(q_size, q_units, voltage)
    if q_size is not None:
        extra["Q_pixel_size"] = _num(q_size)
        extra["Q_pixel_units"] = _text(q_units)
        if mrad is None and _text(q_units) and str(_text(q_units)).lower() not in ("pixels", "pixel", ""):
            extra["note"] = (
                f"detector sampling in {_text(q_units)} cannot be converted to mrad without a voltage"
            )
    rot = _num(cal.get("QR_rotation_degrees"))
    if rot is None and _num(cal.get("QR_rotation")) is not None:
        rot = math.degrees(_num(cal["QR_rotation"]))
    flip = cal.get("QR_flip")
    return ScanMeta(
        step_nm=step,
        mrad_per_px=mrad,
        voltage_kv=voltage,
        convergence_mrad=_num(_first(cal, "convergence_semiangle_mrad", "convergence_mrad")),
        rotation_deg=rot,
        flip=None if flip is None else bool(flip),
        source=source,
        extra=extra,
    )


def _prismatic_meta(f: h5py.File, ds_path: str, info: dict) -> ScanMeta:
    params_path = "4DSTEM_simulation/metadata/metadata_0/original/simulation_parameters"
    params = {k: _num(v) for k, v in small_attrs(f[params_path]).items()} if params_path in f else {}
    voltage = params.get("E")  # keV
    r_step, _ = _dim_step(f, ds_path, 0, 1)
    q_step, _ = _dim_step(f, ds_path, 2, 1)
    step_a = params.get("rx") or r_step
    extra = {
        "format": "Prismatic EMD",
        "units_note": "Prismatic labels dims [n_m] / [n_m^-1] but stores Angstrom / 1/Angstrom; read as such",
        "simulation_parameters": {k: v for k, v in params.items() if v is not None},
        **info,
    }
    if info.get("prismatic_depth"):
        extra["prismatic_depth_index"] = _depth_of(info["prismatic_depth"])
    return ScanMeta(
        step_nm=length_to_nm(step_a, "A"),
        mrad_per_px=reciprocal_to_mrad(q_step, "A^-1", voltage),
        voltage_kv=voltage,
        convergence_mrad=params.get("sa"),
        source="Prismatic simulation parameters",
        extra=extra,
    )


def _attrs_meta(f: h5py.File, ds_path: str) -> ScanMeta:
    values: dict = {}
    for obj in (f["/"], f[ds_path]):
        for k in ("step_nm", "mrad_per_px", "voltage_kv", "convergence_mrad", "rotation_deg", "flip"):
            v = _num(small_attr(obj, k, 1))
            if v is not None:
                values[k] = v
    if not values:
        return ScanMeta(source="none (generic HDF5)", extra={"format": "generic HDF5"})
    flip = values.pop("flip", None)
    return ScanMeta(
        **values,
        flip=None if flip is None else bool(flip),
        source="HDF5 attributes",
        extra={"format": "HDF5"},
    )


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, int | float | str | bool):
            out[k] = v
        elif isinstance(v, list) and len(v) <= 16:
            out[k] = v
    return out


#: Plausible calibration ranges: a value outside is dropped (None) with a warning, not used.
_CAL_RANGES = {
    "step_nm": (0.0, 1e6),
    "mrad_per_px": (0.0, 1e3),
    "voltage_kv": (0.0, 1e4),
    "convergence_mrad": (0.0, 1e3),
    "rotation_deg": (-1e4, 1e4),
}


def sane_meta(meta: ScanMeta, path=None) -> ScanMeta:
    """Drop calibration values that are not finite numbers in a plausible range (e.g. a negative step).

    Dropped values are listed in ``meta.extra['ignored_calibration']`` and logged; the scan still opens.
    """
    ignored, changes = {}, {}
    for key, (lo, hi) in _CAL_RANGES.items():
        v = getattr(meta, key)
        if v is None:
            continue
        try:
            fv = float(v)
        except (TypeError, ValueError, OverflowError):
            fv = float("nan")
        ok = math.isfinite(fv) and (lo < fv <= hi if key != "rotation_deg" else lo <= fv <= hi)
        if not ok:
            ignored[key] = repr(v)[:60]
            changes[key] = None
    if not ignored:
        return meta
    logger.warning("%s: implausible calibration values ignored: %s", path, ignored)
    return dataclasses.replace(meta, **changes, extra={**meta.extra, "ignored_calibration": ignored})


def _meta_for(f: h5py.File, ds_path: str, info: dict) -> ScanMeta:
    if info.get("prismatic_depth") or _is_prismatic(f, ds_path):
        return _prismatic_meta(f, ds_path, info)
    parent = f[ds_path.rsplit("/", 1)[0]] if "/" in ds_path else f["/"]
    if _text(small_attr(parent, "emd_group_type")) == "array" or _calibration_group(f, ds_path) is not None:
        return _emd1_meta(f, ds_path)
    return _attrs_meta(f, ds_path)


# --- scans ----------------------------------------------------------------------------------------------


def _cache_bytes(shape, chunks, itemsize) -> int:
    """Chunk cache big enough for one row of chunks along the scan (bounded), so row-block reads of chunked
    data decompress each chunk once."""
    if not chunks:
        return _CACHE_MIN
    n_chunks_row = math.prod(math.ceil(s / c) for s, c in zip(shape[1:], chunks[1:]))
    need = int(1.1 * n_chunks_row * math.prod(chunks) * itemsize)
    return int(min(max(need, _CACHE_MIN), _CACHE_MAX))


def pattern_read_bytes(stored_shape, chunks, itemsize) -> int:
    """Bytes HDF5 decompresses to read one pattern: chunks overlapping it x the chunk size (contiguous: one
    pattern)."""
    sig = stored_shape[-2:]
    if not chunks:
        return math.prod(sig) * itemsize
    n = math.prod(math.ceil(s / c) for s, c in zip(sig, chunks[-2:]))
    return n * math.prod(chunks) * itemsize


def check_scan_dataset(f: h5py.File, ds: h5py.Dataset, path, name: str, shape4, *, file_size: int,
                       limits: bool = True):
    """Limits (when ``limits``), storage and chunk layout of the dataset a scan is read from; return its
    :class:`~polcore.io.h5safe.ChunkGuard` (or None). Nothing of the data is read."""
    if limits:
        check_scan_limits(shape4, ds.dtype.itemsize, path, name)
    per_pattern = pattern_read_bytes(tuple(ds.shape), ds.chunks, ds.dtype.itemsize)
    chunk_ok = ds.chunks is not None and math.prod(ds.chunks) * ds.dtype.itemsize <= MAX_CHUNK_BYTES
    if per_pattern > MAX_PATTERN_READ_BYTES and chunk_ok:  # (too-big chunks get their own message below)
        raise ScanFormatError(
            path,
            f"the chunk layout {ds.chunks} makes reading one pattern decompress {fmt_bytes(per_pattern)}, over "
            f"the limit of {fmt_bytes(MAX_PATTERN_READ_BYTES)} (polcore.io.limits.MAX_PATTERN_READ_BYTES): "
            "save with chunks of one or a few whole patterns",
            dataset=name,
        )
    return check_storage(ds, path, name, file_size)


class HDF5Scan(Scan):
    """One dataset of an HDF5 file, read lazily in row blocks (the file is opened once per pass).

    Parameters
    ----------
    path : str or Path
        The HDF5 file.
    dataset : str
        Path of a 4D dataset ``(scan_y, scan_x, ky, kx)`` inside the file, or of a 3D stack ``(n, ky, kx)``
        together with ``nav_shape``.
    nav_shape : (int, int), optional
        ``(ny, nx)`` for a 3D frame stack in raster order (``ny * nx == n``).
    meta : ScanMeta, optional
        Calibration (``open_scan`` reads it from the file).
    name : str, optional
        Display name (default: file stem).

    The file is audited first (:func:`polcore.io.h5safe.audit_file`: no external links, virtual datasets or
    external storage anywhere in it), then the dataset's declared shape is checked against the limits of
    :mod:`polcore.io.limits` and against the storage the file holds (:func:`polcore.io.h5safe.check_storage`).
    """

    def __init__(self, path, dataset: str, *, nav_shape=None, meta: ScanMeta | None = None, name=None,
                 _audited: bool = False):
        path = Path(path)
        file_size = check_regular_file(path).st_size
        with h5open(path) as f:
            if not _audited:
                audit_file(f, path)
            comps, why = resolve(f, dataset)
            obj = f["/" + "/".join(comps)] if comps is not None else None
            if not isinstance(obj, h5py.Dataset):
                raise ScanFormatError(path, why or "no such dataset (not a dataset)", dataset=dataset)
            ds = obj
            shape, chunks, dtype = tuple(ds.shape), ds.chunks, ds.dtype
            check_dtype(dtype, path, dataset)
            self._flat = len(shape) == 3 and nav_shape is not None
            if self._flat:
                shape4 = _flat_shape(shape, nav_shape, path, dataset)
            elif len(shape) != 4:
                raise ScanFormatError(path, _rank_reason(shape), dataset=dataset)
            else:
                shape4 = shape
                if nav_shape is not None and tuple(nav_shape) != tuple(shape[:2]):
                    raise ScanFormatError(
                        path,
                        f"nav_shape={tuple(nav_shape)} does not match the stored scan {shape[:2]}",
                        dataset=dataset,
                    )
            check_shape4d(shape4, path, dataset)
            self._guard = check_scan_dataset(f, ds, path, dataset, shape4, file_size=file_size)
        super().__init__(path=path, name=name, shape=shape4, dtype=dtype, meta=meta, dataset=dataset)
        self._cache = _cache_bytes(shape, chunks, self.dtype.itemsize)
        self.chunks = chunks

    @contextmanager
    def _reading(self, light: bool = False):
        cache = min(self._cache, OPEN_CACHE_BYTES) if light else self._cache
        f = h5open(self.path, rdcc_nbytes=cache, rdcc_w0=1.0, rdcc_nslots=100003)
        try:
            ds = f[self.dataset]
            guard = self._guard
            if guard is not None:
                guard.reset()
            decoded = DecodedChunks(cache)  # chunks decoded once by the guard (deflate), kept like HDF5's cache
            ky, kx = self.sig_shape
            if self._flat:

                def frames(a, b):
                    if guard is not None:
                        out = guard.read(ds.id, (a, 0, 0), (b, ky, kx), decoded)
                        if out is not None:
                            return out
                        guard.check(ds.id, (a, 0, 0), (b, ky, kx))
                    return ds[a:b]

                yield flat_block_reader(frames, self.nav_shape[1], self.sig_shape)
            else:

                def read_block(y0, y1, x0, x1):
                    if guard is not None:
                        out = guard.read(ds.id, (y0, x0, 0, 0), (y1, x1, ky, kx), decoded)
                        if out is not None:
                            return out
                        guard.check(ds.id, (y0, x0, 0, 0), (y1, x1, ky, kx))
                    return ds[y0:y1, x0:x1]

                yield read_block
        finally:
            f.close()

    def _sample_limit(self) -> int:
        """Patterns read at open time: bounded by bytes and by what their chunks cost to decompress."""
        n = super()._sample_limit()
        stored = (self.n_patterns,) + self.sig_shape if self._flat else self.shape
        per = pattern_read_bytes(stored, self.chunks, self.dtype.itemsize)
        return max(1, min(n, (4 * MAX_PATTERN_READ_BYTES) // max(per, 1)))


def _flat_shape(shape3, nav_shape, path, dataset=None):
    try:
        ny, nx = (int(v) for v in nav_shape)
    except (TypeError, ValueError) as exc:
        raise ScanFormatError(
            path, f"nav_shape must be (ny, nx), got {nav_shape!r}", dataset=dataset
        ) from exc
    if ny * nx != shape3[0]:
        raise ScanFormatError(
            path,
            f"nav_shape=({ny}, {nx}) needs {ny * nx} frames but the stack holds {shape3[0]}",
            dataset=dataset,
        )
    return (ny, nx) + tuple(shape3[1:])


# --- entry points -----------------------------------------------------------------------------------------


def open_hdf5(path, dataset: str | None = None, nav_shape=None) -> Scan:
    """Open an HDF5 file (any layout above) as a :class:`Scan`; see :func:`polcore.io.open_scan`.

    The file is audited before anything else is read from it (:func:`polcore.io.h5safe.audit_file`); the only
    external links accepted are the ``entry/data/data_NNNNNN`` links of a DECTRIS master, which
    :class:`~polcore.io.arina.ArinaScan` checks and opens itself.
    """
    from polcore.io.arina import ArinaScan, _arina_master_for, is_arina_data_link

    path = Path(path)
    with h5open(path) as f:
        external = audit_file(f, path, allow_external=is_arina_data_link if dataset is None else None)
        master = _arina_master_for(path, f) if dataset is None else None
        if master is None and external:
            name, link = external[0]
            raise ScanFormatError(
                path,
                f"external link to {link.filename!r} (path {link.path!r}): links out of the file are not "
                "followed",
                dataset=name,
            )
        if master is None:
            chosen, info = _choose(f, path, dataset, nav_shape)
            meta = sane_meta(_meta_for(f, chosen, info), path)
    if master is not None:
        return ArinaScan(master, nav_shape=nav_shape)
    return HDF5Scan(path, chosen, nav_shape=nav_shape, meta=meta, _audited=True)

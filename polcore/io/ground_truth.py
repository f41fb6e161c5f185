"""Ground truth of composed scans: the ``/ground_truth`` group of an HDF5 scan file, written and read here.

Layout (written by :func:`write_ground_truth`, e.g. from the scan composer)::

    /ground_truth/label         (ny, nx) int8     class index, -1 = none / non-polar
    /ground_truth/thickness_nm  (ny, nx) float32  [nm]
    /ground_truth/defect        (ny, nx) bool
    /ground_truth/region        (ny, nx) int16    domain id (optional)
    /ground_truth/variant       (ny, nx) int8     library variant, -1 = non-polar (optional)
    attrs                       e.g. cell_px (lattice period [scan px]), step_nm, library_sha256, composer

Readers only touch the group's own datasets and attributes: a group or dataset reached through a soft or
external link, a virtual dataset or one with external raw storage is not read, so nothing outside the given
file is opened.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from polcore.io.errors import ScanFormatError
from polcore.io.files import check_regular_file

__all__ = ["GROUP", "write_ground_truth", "read_ground_truth", "ground_truth_attrs"]

#: Name of the ground-truth group (at the file root when written here).
GROUP = "ground_truth"
#: Maps that must be present.
REQUIRED = ("label", "thickness_nm", "defect")
#: Every map and its stored dtype.
MAP_DTYPES = {"label": np.int8, "thickness_nm": np.float32, "defect": bool, "region": np.int16, "variant": np.int8}


def write_ground_truth(h5group_or_file, truth: dict, attrs: dict | None = None) -> h5py.Group:
    """Write ``/ground_truth`` into an open, writable HDF5 file (or under a group of it).

    Parameters
    ----------
    h5group_or_file : h5py.File or h5py.Group
        Where the ``ground_truth`` group is created (it must not exist yet).
    truth : dict
        ``label``, ``thickness_nm``, ``defect`` and optionally ``region``, ``variant``: 2D maps of one shape
        (ny, nx), stored with the dtypes of :data:`MAP_DTYPES` (gzip). Other keys are ignored, so the
        composer's whole truth dict can be passed.
    attrs : dict, optional
        Attributes of the group (numbers or strings), e.g. ``cell_px``, ``step_nm``.

    Returns
    -------
    The new group.
    """
    missing = [k for k in REQUIRED if k not in truth]
    if missing:
        raise ValueError(f"ground truth lacks {missing}")
    maps = {k: np.asarray(truth[k], dtype=dt) for k, dt in MAP_DTYPES.items() if k in truth}
    shapes = {k: v.shape for k, v in maps.items()}
    if len(set(shapes.values())) != 1 or maps["label"].ndim != 2:
        raise ValueError(f"ground-truth maps must share one 2D shape, got {shapes}")
    g = h5group_or_file.create_group(GROUP)
    for key, arr in maps.items():
        g.create_dataset(key, data=arr, compression="gzip")
    g.attrs.update(attrs or {})
    return g


def _filters() -> None:
    try:  # a hand-made file may use the hdf5plugin filters
        import hdf5plugin  # noqa: F401
    except ImportError:  # pragma: no cover - a pinned dependency
        pass


def _is_hard(parent: h5py.Group, name: str) -> bool:
    """Whether ``parent/name`` exists as a hard link (checked without following it)."""
    try:
        return isinstance(parent.get(name, getlink=True), h5py.HardLink)
    except (KeyError, OSError, ValueError):
        return False


def _own_dataset(g: h5py.Group, name: str) -> bool:
    """``g/name`` is a dataset stored in this file (hard link, not virtual, no external raw storage)."""
    if not _is_hard(g, name):
        return False
    ds = g[name]
    return isinstance(ds, h5py.Dataset) and not ds.is_virtual and not ds.external


def _find_group(f: h5py.File) -> tuple[str | None, bool]:
    """Path of the ground-truth group (root first, else the first hard-linked group of that name),
    and whether a link of that name at the root points elsewhere (soft / external link)."""
    link = f.get(GROUP, getlink=True)
    if link is not None:
        if isinstance(link, h5py.HardLink) and isinstance(f[GROUP], h5py.Group):
            return GROUP, False
        return None, not isinstance(link, h5py.HardLink)
    hits: list[str] = []
    # visit() walks hard links only: soft and external links are not followed
    f.visit(lambda n: hits.append(n) if n.rsplit("/", 1)[-1] == GROUP else None)
    for key in hits:
        if isinstance(f[key], h5py.Group):
            return key, False
    return None, False


def read_ground_truth(path) -> dict | None:
    """Ground-truth maps written by the scan composer, or None when the file has none.

    Parameters
    ----------
    path : str or Path
        A scan file; only HDF5 files can carry a ``ground_truth/`` group (other formats return None).

    Returns
    -------
    dict or None
        ``label`` (ny, nx) int8 class index (-1 = non-polar), ``thickness_nm`` (ny, nx) float32 [nm],
        ``defect`` (ny, nx) bool, plus ``region`` (ny, nx) as stored when present.

    Raises
    ------
    ScanFormatError when the file is missing or unreadable, the group lacks a map, a map points outside the
    file, or the maps differ in shape.
    """
    path = Path(path)
    check_regular_file(path)  # pipes, devices, broken links: refused without being opened
    if not h5py.is_hdf5(path):
        return None
    _filters()
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise ScanFormatError(path, f"cannot open as HDF5 (truncated or corrupt file?): {exc}") from exc
    with f:
        key, linked = _find_group(f)
        if linked:
            raise ScanFormatError(path, "ground_truth is a link, not a group of this file; not read",
                                  dataset=GROUP)
        if key is None:
            return None
        g = f[key]
        present = [k for k in REQUIRED + ("region",) if g.get(k, getlink=True) is not None]
        missing = [k for k in REQUIRED if k not in present]
        if missing:
            raise ScanFormatError(path, f"ground_truth group lacks {missing}", dataset=key)
        foreign = [k for k in present if not _own_dataset(g, k)]
        if foreign:
            raise ScanFormatError(path, f"ground_truth maps {foreign} are not datasets stored in this file",
                                  dataset=key)
        out = {
            "label": g["label"][()].astype(np.int8),
            "thickness_nm": g["thickness_nm"][()].astype(np.float32),
            "defect": g["defect"][()].astype(bool),
        }
        if "region" in present:
            out["region"] = g["region"][()]
    shapes = {k: v.shape for k, v in out.items()}
    if len(set(shapes.values())) != 1 or len(out["label"].shape) != 2:
        raise ScanFormatError(path, f"ground-truth maps must share one 2D shape, got {shapes}", dataset=key)
    return out


def _attr_value(v):
    """An HDF5 attribute as python: numbers -> float, text -> str (arrays -> lists of those)."""
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, str):
        return v
    arr = np.asarray(v)
    if arr.dtype.kind in "biuf":
        vals = [float(x) for x in arr.reshape(-1)]
        return vals[0] if arr.ndim == 0 else vals
    if arr.dtype.kind in "SOU":
        vals = [_attr_value(x) for x in arr.reshape(-1)]
        return vals[0] if arr.ndim == 0 else vals
    return str(v)


def ground_truth_attrs(path) -> dict:
    """Attributes of the file's ``/ground_truth`` group (e.g. ``cell_px``, ``step_nm``) as python floats and
    strings; ``{}`` when the file is missing, not HDF5, unreadable or has no such group. Never raises."""
    try:
        path = Path(path)
        check_regular_file(path)
        if not h5py.is_hdf5(path):
            return {}
        _filters()
        with h5py.File(path, "r", locking=False) as f:
            key, _ = _find_group(f)
            if key is None:
                return {}
            out = {}
            for k, v in f[key].attrs.items():
                out[str(k)] = _attr_value(v)
            return out
    except Exception:  # a damaged file or attribute: no ground-truth attributes
        return {}

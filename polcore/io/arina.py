"""DECTRIS ARINA (NeXus) reader: a master file linking bitshuffle-LZ4 compressed frame files.

Layout: ``<name>_master.h5`` with ``entry/data/data_NNNNNN`` external links to ``<name>_data_NNNNNN.h5``
(bitshuffle-LZ4: ``hdf5plugin`` is imported before opening) and an optional ``<name>.h5`` with
``STEM Metadata`` (``NumPixelsX/Y``, ``Pixel Size`` [nm], ``High Tension`` [V]). Opening any of the three files
(:func:`polcore.io.hdf5.open_hdf5`) opens the scan through the master file.

Files read, and nothing else: the master, the data files its ``entry/data/data_NNNNNN`` links name, and the
metadata file ``<name>.h5``. A data link must name a bare file (no folder part) that is a regular file in the
master's folder (also after resolving symbolic links); HDF5 never follows the links itself: each data file is
opened here directly, audited like any HDF5 file (:func:`polcore.io.h5safe.audit_file`) and its dataset checked
against what it holds (:func:`polcore.io.h5safe.check_storage`).
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from polcore.io.base import Scan, check_dtype, check_shape4d, flat_block_reader
from polcore.io.calibration import as_kv, length_to_nm
from polcore.io.errors import ScanFormatError
from polcore.io.files import check_regular_file, sibling_file
from polcore.io.h5safe import audit_file, resolve, small_attrs
from polcore.io.hdf5 import (
    _CACHE_MIN,
    _flat_shape,
    _group_values,
    _num,
    check_scan_dataset,
    h5open,
    sane_meta,
)
from polcore.io.limits import MAX_DATA_FILES, Deadline
from polcore.types import ScanMeta

__all__ = ["ArinaScan", "is_arina_data_link"]

logger = logging.getLogger(__name__)

_ARINA_DATA = re.compile(r"data_\d{6}")
_ARINA_LINK_NAME = re.compile(r"entry/data/data_\d{6}")
_OPEN_FILES = 4


def is_arina_data_link(name: str, link) -> bool:
    """Whether an external link found in an HDF5 file sits where a DECTRIS master keeps its data links.

    Only its position is judged here; :class:`ArinaScan` checks the file it names before opening it.
    """
    return bool(_ARINA_LINK_NAME.fullmatch(name))


def _data_links(master: Path, f: h5py.File) -> list[tuple[str, object]]:
    g = f.get("entry/data")
    if not isinstance(g, h5py.Group):
        raise ScanFormatError(master, "not a DECTRIS master file: no entry/data group")
    names = sorted(k for k in g.keys() if _ARINA_DATA.fullmatch(k))
    if not names:
        raise ScanFormatError(master, "DECTRIS master file without data_NNNNNN links in entry/data")
    if len(names) > MAX_DATA_FILES:
        raise ScanFormatError(
            master, f"{len(names)} data links, over the limit of {MAX_DATA_FILES} (polcore.io.limits.MAX_DATA_FILES)"
        )
    return [(k, g.get(k, getlink=True)) for k in names]


def _data_file(master: Path, key: str, link) -> tuple[Path, str]:
    """The data file (checked) and the dataset path inside it for the link ``entry/data/<key>``."""
    where = f"entry/data/{key}"
    fname = str(link.filename)
    if (
        not fname
        or "/" in fname
        or "\\" in fname
        or "\x00" in fname
        or fname in (".", "..")
        or Path(fname).is_absolute()
    ):
        raise ScanFormatError(
            master,
            f"external link to {fname!r}: a data link must name a file in the master's folder; links out of "
            "the folder are not followed",
            dataset=where,
        )
    if fname == master.name:
        raise ScanFormatError(master, f"external link to the master file itself ({fname!r})", dataset=where)
    path = master.with_name(fname)
    try:
        found = sibling_file(master, path, "data file")
    except ScanFormatError as exc:
        raise ScanFormatError(master, f"data file {fname!r} linked as {where}: {exc.reason}") from exc
    if found is None:
        raise ScanFormatError(master, f"data file {fname!r} linked as {where} is missing or unreadable")
    return path, str(link.path)


def _open_data(master: Path, path: Path, inner: str, key: str, deadline: Deadline):
    """Audit a data file and return ``(file, dataset, hard path)``; the caller closes the file."""
    try:
        f = h5open(path)
    except ScanFormatError as exc:
        raise ScanFormatError(
            master, f"data file {path.name!r} linked as entry/data/{key} is missing or unreadable: {exc.reason}"
        ) from exc
    try:
        try:
            audit_file(f, path, deadline=deadline)
        except ScanFormatError as exc:
            raise _in_data_file(master, path, exc) from exc
        comps, why = resolve(f, inner)
        obj = f["/" + "/".join(comps)] if comps is not None else None
        if not isinstance(obj, h5py.Dataset):
            raise ScanFormatError(
                master, f"data file {path.name!r}: {why or repr(inner) + ' is not a dataset'}", dataset=f"entry/data/{key}"
            )
        return f, obj, "/" + "/".join(comps)
    except BaseException:
        f.close()
        raise


def _in_data_file(master: Path, path: Path, exc: ScanFormatError) -> ScanFormatError:
    """A refusal found in a data file, reported for the master (the file the user opened)."""
    where = f" [dataset {exc.dataset!r}]" if exc.dataset else ""
    return ScanFormatError(master, f"data file {path.name!r}{where}: {exc.reason}", dataset="entry/data")


def _arina_master_for(path: Path, f: h5py.File) -> Path | None:
    """The ARINA master file behind ``path`` (itself, or the sibling of a data / metadata file), if any."""
    g = f.get("entry/data")
    if isinstance(g, h5py.Group) and any(_ARINA_DATA.fullmatch(k) for k in g.keys()):
        return path
    m = re.fullmatch(r"(.*)_data_\d{6}\.h5", path.name)
    stem = m.group(1) if m else (path.stem if "STEM Metadata" in f else None)
    if stem is not None:
        master = sibling_file(path, path.with_name(f"{stem}_master.h5"), "DECTRIS master file")
        if master is not None:
            logger.info("%s is part of a DECTRIS ARINA acquisition: reading it through %s", path, master.name)
            return master
    return None


class ArinaScan(Scan):
    """DECTRIS ARINA 4D-STEM data: a NeXus master file linking bitshuffle-LZ4 compressed frame files.

    Parameters
    ----------
    master : str or Path
        ``<name>_master.h5``; the frames live in ``<name>_data_NNNNNN.h5`` (external links, checked and opened
        here: see the module docstring).
    nav_shape : (int, int), optional
        ``(ny, nx)``; default from ``<name>.h5`` (``STEM Metadata`` ``NumPixelsY/X``), else a square scan
        when the number of frames is a perfect square (logged), else refused.
    """

    def __init__(self, master, *, nav_shape=None, name=None):
        master = Path(master)
        check_regular_file(master)
        deadline = Deadline(master, "checking the DECTRIS data files")
        with h5open(master) as f:
            audit_file(f, master, allow_external=is_arina_data_link, deadline=deadline)
            data_links = _data_links(master, f)
            det = f.get("entry/instrument/detector")
            det_values = _group_values(det) if isinstance(det, h5py.Group) else {}
        sources: list[tuple[Path | None, str]] = []  # (data file or None = inside the master, dataset path)
        counts, sig, dtype = [], None, None
        guards = []
        for k, link in data_links:
            deadline.check()
            if isinstance(link, h5py.ExternalLink):
                dpath, inner = _data_file(master, k, link)
                f, ds, hard = _open_data(master, dpath, inner, k, deadline)
                src = (dpath, hard)
            else:  # frames stored in the master itself (hard or soft link; the audit resolved it)
                f = h5open(master)
                comps, why = resolve(f, f"entry/data/{k}")
                ds = f["/" + "/".join(comps)] if comps is not None else None
                hard = "/" + "/".join(comps or [])
                dpath = master
                src = (None, hard)
            try:
                if not isinstance(ds, h5py.Dataset):
                    raise ScanFormatError(master, "not a dataset", dataset=f"entry/data/{k}")
                check_dtype(ds.dtype, master, f"entry/data/{k}")
                if ds.ndim != 3 or (sig is not None and tuple(ds.shape[1:]) != sig):
                    raise ScanFormatError(master, f"entry/data/{k} has shape {ds.shape}, expected (n, ky, kx)")
                if dtype is not None and ds.dtype != dtype:
                    raise ScanFormatError(master, f"entry/data/{k} holds {ds.dtype}, the first data file {dtype}")
                sig, dtype = tuple(int(s) for s in ds.shape[1:]), ds.dtype
                n_here = int(ds.shape[0])
                shape_here = (1, max(n_here, 1)) + sig
                check_shape4d(shape_here, master, f"entry/data/{k}")
                try:  # the limits apply to the whole scan (Scan.__init__), not to each file
                    guards.append(check_scan_dataset(
                        f, ds, dpath, hard, shape_here, file_size=dpath.stat().st_size, limits=False
                    ))
                except ScanFormatError as exc:
                    if dpath == master:
                        raise
                    raise _in_data_file(master, dpath, exc) from exc
            finally:
                f.close()
            counts.append(n_here)
            sources.append(src)
        n = sum(counts)
        side = master.with_name(master.name.replace("_master.h5", ".h5"))
        stem_md: dict = {}
        if side != master:
            try:
                if sibling_file(master, side, "metadata file") is not None:
                    with h5open(side) as fs:
                        audit_file(fs, side, deadline=deadline)
                        g = fs.get("STEM Metadata")
                        if isinstance(g, h5py.Group):
                            stem_md = {k: _num(v) for k, v in small_attrs(g).items()}
            except ScanFormatError as exc:
                logger.warning("ARINA metadata file unreadable, ignored: %s", exc)
        nav_source = "nav_shape argument"
        if nav_shape is None and stem_md.get("NumPixelsX") and stem_md.get("NumPixelsY"):
            nav_shape = (int(stem_md["NumPixelsY"]), int(stem_md["NumPixelsX"]))
            nav_source = f"{side.name} STEM Metadata NumPixelsY/NumPixelsX"
        elif nav_shape is None:
            r = math.isqrt(n)
            if r * r != n:
                raise ScanFormatError(
                    master, f"{n} frames and no scan size in the metadata: pass nav_shape=(ny, nx)"
                )
            nav_shape = (r, r)
            nav_source = f"assumed square ({n} frames, no scan size in the metadata)"
            logger.warning("%s: no scan size in the metadata; assuming a square %d x %d scan", master, r, r)
        shape = _flat_shape((n,) + sig, nav_shape, master)
        voltage = as_kv(stem_md.get("High Tension")) or as_kv(det_values.get("photon_energy"))
        extra = {
            "format": "DECTRIS ARINA (NeXus)",
            "nav_shape_source": nav_source,
            "data_files": [k for k, _ in data_links],
            "count_time_s": det_values.get("count_time"),
        }
        px = _num(det_values.get("x_pixel_size"))
        cl = stem_md.get("Camera Length")
        if px and cl:
            extra["nominal_mrad_per_px"] = px / cl * 1e3
            extra["nominal_note"] = "detector pixel size / nominal camera length; not a calibration"
        meta = ScanMeta(
            step_nm=length_to_nm(stem_md.get("Pixel Size"), "nm"),
            voltage_kv=voltage,
            rotation_deg=None,
            source="ARINA master + STEM Metadata" if stem_md else "ARINA master",
            extra=extra,
        )
        super().__init__(
            path=master,
            name=name or master.name.replace("_master.h5", ""),
            shape=shape,
            dtype=dtype,
            meta=sane_meta(meta, master),
            dataset="entry/data",
        )
        self._names = [k for k, _ in data_links]
        self._sources = sources
        self._guards = guards
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    @contextmanager
    def _reading(self, light: bool = False):
        opened: OrderedDict[int, tuple[h5py.File, h5py.Dataset]] = OrderedDict()
        offsets = self._offsets

        def dataset(i):
            if i in opened:
                opened.move_to_end(i)
                return opened[i][1]
            while len(opened) >= _OPEN_FILES:
                opened.popitem(last=False)[1][0].close()
            fpath, inner = self._sources[i]
            f = h5open(fpath if fpath is not None else self.path, rdcc_nbytes=_CACHE_MIN * 8)
            ds = f[inner]
            opened[i] = (f, ds)
            if self._guards[i] is not None:
                self._guards[i].reset()
            return ds

        def frames(a, b):
            parts = []
            for i in range(len(self._sources)):
                lo, hi = max(a, offsets[i]), min(b, offsets[i + 1])
                if lo < hi:
                    ds = dataset(i)
                    lo_i, hi_i = int(lo - offsets[i]), int(hi - offsets[i])
                    if self._guards[i] is not None:
                        self._guards[i].check(ds.id, (lo_i, 0, 0), (hi_i,) + self.sig_shape)
                    parts.append(ds[lo_i:hi_i])
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        try:
            yield flat_block_reader(frames, self.nav_shape[1], self.sig_shape)
        finally:
            for f, _ in opened.values():
                f.close()

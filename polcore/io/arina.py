"""DECTRIS ARINA (NeXus) reader: a master file linking bitshuffle-LZ4 compressed frame files.

Layout: ``<name>_master.h5`` with ``entry/data/data_NNNNNN`` external links to ``<name>_data_NNNNNN.h5``
(bitshuffle-LZ4: ``hdf5plugin`` is imported before opening) and an optional ``<name>.h5`` with
``STEM Metadata`` (``NumPixelsX/Y``, ``Pixel Size`` [nm], ``High Tension`` [V]). Opening any of the three files
(:func:`polcore.io.hdf5.open_hdf5`) opens the scan through the master file.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from polcore.io.base import Scan, flat_block_reader
from polcore.io.calibration import as_kv, length_to_nm
from polcore.io.errors import ScanFormatError
from polcore.io.hdf5 import _CACHE_MIN, _flat_shape, _group_values, _num, h5open
from polcore.types import ScanMeta

__all__ = ["ArinaScan"]

logger = logging.getLogger(__name__)

_ARINA_DATA = re.compile(r"data_\d{6}")


def _arina_master_for(path: Path, f: h5py.File) -> Path | None:
    """The ARINA master file behind ``path`` (itself, or the sibling of a data / metadata file), if any."""
    g = f.get("entry/data")
    if isinstance(g, h5py.Group) and any(_ARINA_DATA.fullmatch(k) for k in g.keys()):
        return path
    m = re.fullmatch(r"(.*)_data_\d{6}\.h5", path.name)
    stem = m.group(1) if m else (path.stem if "STEM Metadata" in f else None)
    if stem is not None:
        master = path.with_name(f"{stem}_master.h5")
        if master.is_file():
            logger.info("%s is part of a DECTRIS ARINA acquisition: reading it through %s", path, master.name)
            return master
    return None


class ArinaScan(Scan):
    """DECTRIS ARINA 4D-STEM data: a NeXus master file linking bitshuffle-LZ4 compressed frame files.

    Parameters
    ----------
    master : str or Path
        ``<name>_master.h5``; the frames live in ``<name>_data_NNNNNN.h5`` (external links).
    nav_shape : (int, int), optional
        ``(ny, nx)``; default from ``<name>.h5`` (``STEM Metadata`` ``NumPixelsY/X``), else a square scan
        when the number of frames is a perfect square (logged), else refused.
    """

    def __init__(self, master, *, nav_shape=None, name=None):
        master = Path(master)
        with h5open(master) as f:
            g = f.get("entry/data")
            if not isinstance(g, h5py.Group):
                raise ScanFormatError(master, "not a DECTRIS master file: no entry/data group")
            names = sorted(k for k in g.keys() if _ARINA_DATA.fullmatch(k))
            if not names:
                raise ScanFormatError(master, "DECTRIS master file without data_NNNNNN links in entry/data")
            counts, sig, dtype = [], None, None
            for k in names:
                try:
                    ds = g[k]
                except (KeyError, OSError) as exc:
                    link = g.get(k, getlink=True)
                    target = getattr(link, "filename", k)
                    raise ScanFormatError(
                        master, f"data file {target!r} linked as entry/data/{k} is missing or unreadable"
                    ) from exc
                if ds.ndim != 3 or (sig is not None and tuple(ds.shape[1:]) != sig):
                    raise ScanFormatError(
                        master, f"entry/data/{k} has shape {ds.shape}, expected (n, ky, kx)"
                    )
                sig, dtype = tuple(ds.shape[1:]), ds.dtype
                counts.append(int(ds.shape[0]))
            det = f.get("entry/instrument/detector")
            det_values = _group_values(det) if isinstance(det, h5py.Group) else {}
        n = sum(counts)
        side = master.with_name(master.name.replace("_master.h5", ".h5"))
        stem_md: dict = {}
        if side != master and side.is_file():
            try:
                with h5open(side) as fs:
                    if "STEM Metadata" in fs:
                        stem_md = {k: _num(v) for k, v in fs["STEM Metadata"].attrs.items()}
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
            "data_files": names,
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
            meta=meta,
            dataset="entry/data",
        )
        self._names = names
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    @contextmanager
    def _reading(self):
        f = h5open(self.path, rdcc_nbytes=_CACHE_MIN * 8)
        try:
            dsets = [f["entry/data"][k] for k in self._names]
            offsets = self._offsets

            def frames(a, b):
                parts = []
                for i, ds in enumerate(dsets):
                    lo, hi = max(a, offsets[i]), min(b, offsets[i + 1])
                    if lo < hi:
                        parts.append(ds[lo - offsets[i] : hi - offsets[i]])
                return parts[0] if len(parts) == 1 else np.concatenate(parts)

            yield flat_block_reader(frames, self.nav_shape[1], self.sig_shape)
        finally:
            f.close()

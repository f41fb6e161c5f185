"""Reader of the abTEM pattern library: multislice CBED patterns of KNN indexed by variant, configuration,
thickness and probe position inside the unit cell.

This module only reads; it imports neither abTEM nor the build (:mod:`polcore.simulate.build`, which
simulates a library and documents its recipe), so training and the app can load a library without abTEM.

Only the three symmetry-independent variants (``structure.BASE_VARIANTS``) are stored; the others follow by
quarter turns of patterns and probe positions together (exact on this grid, see ``rotate_entry`` and the
tests). Patterns are cropped to ``crop`` x ``crop`` pixels (odd, centred on the optical axis, so quarter turns
are exact) and stored as float16 times ``scale``, compressed with Blosc/zstd (bit shuffle; reading needs
``import hdf5plugin``, which polcore does).

HDF5 layout (``format = "polbench-library/1"``)::

    /patterns            float16 (3, C, T, N, N, K, K)   base variant, config, thickness, probe row, col, ky, kx
    /base_vectors        int8    (3, 3)                  (x right, y down, z) polarization of each base variant
    /thickness_nm        float32 (T,)
    /positions_frac      float32 (N, N, 2)               (y, x) fractions of the cell, A site at (0, 0)
    /configs             compound (C + E,)               seed, phonon_seed, tilt_x/y [mrad], nb_disp_A,
                                                         o_disp_A, convergence_mrad, defocus_A, na_fraction,
                                                         disorder_seed, role
    /extra/patterns      float16 (3, E, T_e, N, N, K, K)   extra training configurations (configs C..C+E-1)
    /extra/thickness_nm  float32 (T_e,)                  a subset of /thickness_nm
    /defects/<name>      float16 (B_d, C_d, T, N, N, K, K) with attrs base_vectors, description
    /done                bool    (3, C) and /defects/<name>_done: resumable builds
    attrs                voltage_kv, mrad_per_px, lattice_A, cells_xy, gpts_per_cell, crop, scale,
                         abtem_version, seed, profile, recipe (JSON), elapsed_s

``/extra`` lives in a sibling file (``extra_path``) behind an HDF5 external link.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polcore.simulate.structure import LATTICE_A, VARIANTS, rotate_vector_ccw, variant_class

__all__ = [
    "DEFAULT_LIBRARY",
    "FORMAT",
    "PatternLibrary",
    "load_library",
    "rotate_entry",
    "extra_path",
    "wavelength_A",
    "mrad_per_px",
    "pattern_at",
]

DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "data" / "library" / "knn_default.h5"
FORMAT = "polbench-library/1"


def wavelength_A(voltage_kv: float) -> float:
    """Relativistic electron wavelength [A] at ``voltage_kv`` [kV]."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    v = voltage_kv * 1e3
    return h / np.sqrt(2 * m0 * e * v * (1 + e * v / (2 * m0 * c**2))) * 1e10


def mrad_per_px(cfg) -> float:
    """Detector sampling [mrad/px] of a library: wavelength / supercell width.

    ``cfg`` is any settings object with ``voltage_kv`` [kV] and ``cells_xy`` (a ``build.SimulationConfig``).
    """
    return wavelength_A(cfg.voltage_kv) / (cfg.cells_xy * LATTICE_A) * 1e3


def rotate_entry(patterns: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Patterns of the structure turned counter-clockwise (on screen) by 90 deg * quarter_turns.

    ``patterns`` is (..., N, N, K, K) over probe row/col and ky/kx with the A site at position (0, 0) and the
    optical axis at the centre pixel (K odd). A probe at (x, y) of the turned structure sees the pattern of
    position (-y, x) of the original, turned with the structure: (x, y) -> (y, -x), the same map in
    reciprocal space.
    """
    out = patterns
    for _ in range(quarter_turns % 4):
        out = np.rot90(out, k=1, axes=(-2, -1))  # pattern: counter-clockwise as displayed
        # new[iy', ix'] = old[ix', -iy' mod N]
        n = out.shape[-3]
        idx = (-np.arange(n)) % n
        out = np.swapaxes(out, -4, -3)[..., idx, :, :, :]
    return np.ascontiguousarray(out)


def extra_path(path: Path) -> Path:
    """Sibling file holding a library's extra training configurations (``/extra``, an HDF5 external link)."""
    return path.with_name(path.stem + "_extra" + path.suffix)


def _sha256(path: Path) -> str:
    """sha256 over the library file and, when present, its extra-configurations file."""
    h = hashlib.sha256()
    for p in (path, extra_path(path)):
        if not p.exists():
            continue
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _expand(stored: np.ndarray, scale: float) -> np.ndarray:
    """(B, C, T, N, N, K, K) float16 of base variants -> (4B, C, T, N, N, K-1, K-1) float32, variant index
    4 * base + quarter turns; the last row/column is dropped after turning so that the optical axis sits
    at pixel (K-1)//2 of an even-sized pattern."""
    B = stored.shape[0]
    out = np.empty((4 * B,) + stored.shape[1:-2] + (stored.shape[-2] - 1, stored.shape[-1] - 1), np.float32)
    for b in range(B):
        base = stored[b].astype(np.float32) / scale
        for q in range(4):
            out[4 * b + q] = rotate_entry(base, q)[..., :-1, :-1]
    return out


@dataclass
class PatternLibrary:
    """A loaded pattern library with all variants expanded (see docs/INTERFACES.md).

    ``patterns`` is float32 (V, C, T, N, N, K, K), K even, optical axis at pixel (K // 2, K // 2);
    ``available`` (C, T) says which (configuration, thickness) pairs were simulated (extra training
    configurations exist at the training thickness only; other entries are zero).
    """

    patterns: np.ndarray
    variant_class: np.ndarray
    variant_vector: np.ndarray
    thickness_nm: np.ndarray
    positions_frac: np.ndarray
    configs: object  # pandas.DataFrame
    available: np.ndarray | None = None  # (C, T) bool: which (configuration, thickness) pairs were simulated
    defects: dict = field(default_factory=dict)
    defect_class: dict = field(default_factory=dict)
    defect_vector: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    sha256: str = ""
    path: str = ""

    @property
    def size(self) -> int:
        """Pattern side [px]."""
        return self.patterns.shape[-1]

    def thickness_index(self, thickness_nm: float) -> int:
        """Index of the library thickness nearest to ``thickness_nm`` [nm]."""
        return int(np.argmin(np.abs(self.thickness_nm - float(thickness_nm))))

    def select(self, split: str | list[str] | None = None, thickness=None):
        """Flatten patterns of the configurations with role ``split`` at the given thickness(es).

        Parameters
        ----------
        split : 'train', 'val', 'test', a list of them, or None for all.
        thickness : nm value, list of values (nearest library thickness each), or None for all.

        Returns
        -------
        X : float32 (n, K, K); y : int64 (n,) class index; info : DataFrame with variant, config, role,
        thickness_nm, py, px.
        """
        import pandas as pd

        roles = self.configs["role"].to_numpy()
        if split is None:
            cfg_idx = np.arange(len(roles))
        else:
            wanted = [split] if isinstance(split, str) else list(split)
            bad = set(wanted) - {"train", "val", "test"}
            if bad:
                raise ValueError(f"unknown split {sorted(bad)}; valid: train, val, test")
            cfg_idx = np.flatnonzero(np.isin(roles, wanted))
        if thickness is None:
            t_idx = np.arange(len(self.thickness_nm))
        else:
            ts = np.atleast_1d(thickness)
            t_idx = np.unique([self.thickness_index(t) for t in ts])
        V, _, _, N, _, K, _ = self.patterns.shape
        avail = self.available if self.available is not None else np.ones(self.patterns.shape[1:3], bool)
        pairs = [(c, t) for c in cfg_idx for t in t_idx if avail[c, t]]
        if not pairs:
            return np.zeros((0, K, K), np.float32), np.zeros(0, np.int64), pd.DataFrame(
                columns=["variant", "config", "role", "thickness_nm", "py", "px"])
        pc = np.array([p[0] for p in pairs])
        pt = np.array([p[1] for p in pairs])
        X = self.patterns[:, pc, pt].reshape(-1, K, K)
        v, j, py, px = np.meshgrid(np.arange(V), np.arange(len(pairs)), np.arange(N), np.arange(N), indexing="ij")
        c, t = pc[j], pt[j]
        info = pd.DataFrame(
            {
                "variant": v.ravel(),
                "config": c.ravel(),
                "role": roles[c.ravel()],
                "thickness_nm": self.thickness_nm[t.ravel()],
                "py": py.ravel(),
                "px": px.ravel(),
            }
        )
        y = self.variant_class[v.ravel()].astype(np.int64)
        return X, y, info


def load_library(path: str | Path | None = None) -> PatternLibrary:
    """Read a library file and expand the base variants to all 12 by symmetry.

    Raises
    ------
    FileNotFoundError if the file is missing; ValueError if it is not a polbench library.
    """
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter)
    import pandas as pd

    path = Path(path) if path is not None else DEFAULT_LIBRARY
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pattern library (build one with `python -m polcore simulate library`)")
    with h5py.File(path, "r") as f:
        if "extra" in f.keys() and f.get("extra", getlink=True).__class__ is h5py.ExternalLink \
                and not extra_path(path).exists():
            raise FileNotFoundError(f"{path}: its extra configurations file {extra_path(path).name} is missing")
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a polbench pattern library (format {f.attrs.get('format')!r})")
        scale = float(f.attrs["scale"])
        main = f["patterns"]
        C, T = main.shape[1], main.shape[2]
        E = f["extra/patterns"].shape[1] if "extra" in f else 0
        thickness = f["thickness_nm"][()]
        K = main.shape[-1] - 1
        # dense (V, C + E, T, ...) array; (config, thickness) pairs that were not simulated stay zero and are
        # marked unavailable
        patterns = np.zeros((4 * main.shape[0], C + E, T) + main.shape[3:5] + (K, K), np.float32)
        available = np.zeros((C + E, T), bool)
        patterns[:, :C] = _expand(main[()], scale)
        available[:C] = True
        if E:
            t_idx = [int(np.argmin(np.abs(thickness - t))) for t in f["extra/thickness_nm"][()]]
            ex = _expand(f["extra/patterns"][()], scale)
            for j, ti in enumerate(t_idx):
                patterns[:, C:, ti] = ex[:, :, j]
                available[C:, ti] = True
            del ex
        base_vectors = f["base_vectors"][()].astype(float)
        table = f["configs"][()]
        configs = pd.DataFrame({k: table[k] for k in table.dtype.names})
        configs["role"] = configs["role"].str.decode("ascii")
        meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        defects, dclass, dvec = {}, {}, {}
        for name, ds in f.get("defects", {}).items():
            if name.endswith("_done"):
                continue
            bv = ds.attrs["base_vectors"].astype(float)
            vecs = np.array([rotate_vector_ccw(v, q) for v in bv for q in range(4)])
            arr = _expand(ds[()], scale)
            if np.all(bv == 0):  # non-polar: turns are the same structure statistically; keep one
                arr, vecs = arr[:1], vecs[:1]
            defects[name] = arr
            dvec[name] = vecs
            dclass[name] = np.array([variant_class(v) for v in vecs])
        positions = f["positions_frac"][()]
    vectors = np.array([rotate_vector_ccw(v, q) for v in base_vectors for q in range(4)])
    assert [tuple(int(round(c)) for c in v) for v in vectors] == [v for v, _, _ in VARIANTS][: len(vectors)]
    meta["mrad_per_px"] = float(meta["mrad_per_px"])
    return PatternLibrary(
        patterns=patterns,
        variant_class=np.array([variant_class(v) for v in vectors]),
        variant_vector=vectors,
        thickness_nm=thickness,
        positions_frac=positions,
        configs=configs,
        available=available,
        defects=defects,
        defect_class=dclass,
        defect_vector=dvec,
        meta=meta,
        sha256=_sha256(path),
        path=str(path),
    )


def pattern_at(cls: int, thickness_nm: float, frac_y: float, frac_x: float, path: str | Path | None = None,
               *, role: str = "test") -> tuple[np.ndarray, dict]:
    """One library pattern of class ``cls`` at a probe position inside the unit cell, read without loading
    the whole library (one compressed (N, N, K, K) entry, a few ms; :func:`load_library` expands all of it).

    Parameters
    ----------
    cls : class index 0..7 (the first variant of that class is taken; classes 0, 2, 4, 6 have an in-plane
        variant and one with +-z, both project to the class).
    thickness_nm : the nearest library thickness is taken [nm].
    frac_y, frac_x : probe position as fractions of the cell, A site at (0, 0); the nearest simulated probe
        position is taken (periodic).
    path : library file (default :data:`DEFAULT_LIBRARY`).
    role : configuration role to take (the first configuration with it; the first configuration if none).

    Returns
    -------
    pattern : float32 (K, K), K even, optical axis at (K // 2, K // 2), as in :class:`PatternLibrary`.
    info : dict with variant, config, thickness_nm, py, px, mrad_per_px and convergence_mrad (the disc radius
        is convergence_mrad / mrad_per_px pixels around the optical axis).
    """
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter)

    path = Path(path) if path is not None else DEFAULT_LIBRARY
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pattern library (build one with `python -m polcore simulate library`)")
    k = int(cls)
    if not 0 <= k < 8:
        raise ValueError(f"class must be 0..7, got {cls!r}")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a polbench pattern library (format {f.attrs.get('format')!r})")
        base_vectors = f["base_vectors"][()].astype(float)
        vectors = [rotate_vector_ccw(v, q) for v in base_vectors for q in range(4)]
        classes = [variant_class(v) for v in vectors]
        if k not in classes:
            raise ValueError(f"{path}: no variant of class {k}")
        v = classes.index(k)
        b, q = divmod(v, 4)
        roles = [r.decode("ascii") if isinstance(r, bytes) else str(r) for r in f["configs"][()]["role"]]
        n_main = f["patterns"].shape[1]
        c = next((i for i, r in enumerate(roles[:n_main]) if r == role), 0)
        ts = f["thickness_nm"][()]
        t = int(np.argmin(np.abs(ts - float(thickness_nm)))) if np.isfinite(thickness_nm) else 0
        entry = f["patterns"][b, c, t].astype(np.float32) / float(f.attrs["scale"])
        mrad = float(f.attrs["mrad_per_px"])
        conv = float(f.attrs["convergence_mrad"]) if "convergence_mrad" in f.attrs else float("nan")
    ent = rotate_entry(entry, q)[..., :-1, :-1]
    n = ent.shape[0]
    py, px = int(round(float(frac_y) * n)) % n, int(round(float(frac_x) * n)) % n
    info = dict(variant=v, config=c, thickness_nm=float(ts[t]), py=py, px=px, mrad_per_px=mrad, convergence_mrad=conv)
    return np.ascontiguousarray(ent[py, px]), info

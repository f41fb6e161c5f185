"""Scan composer: tiles library patterns over a scan grid, with ground truth.

A probe at scan position (iy, ix) with step ``s`` sits at (iy s, ix s) in the specimen. Its unit cell decides
the polarization variant (domains are made of whole cells, so walls lie on cell boundaries), the library
configuration (drawn per cell, so thermal and structural nuisances vary over the scan) and whether the cell
holds a defect; its position inside the cell (modulo the lattice) picks the library pattern, bilinearly
interpolated between the four nearest simulated probe positions (periodic), which serves commensurate and
incommensurate steps alike. Thickness maps (constant or a wedge along x) interpolate linearly between the two
nearest library thicknesses. Detector effects follow: resampling to the output camera length, descan drift of
the disc centre, blur, background, Poisson dose and hot pixels.

The file is written in the EMD 1.0 layout that py4DSTEM/emdfile read (``<root>/datacube/data`` with
``dim0..dim3`` and a ``metadatabundle/calibration``), with ground truth under ``/ground_truth``:
``label`` (ny, nx) int8 (-1 = none), ``thickness_nm`` (ny, nx) float32, ``defect`` (ny, nx) bool, ``region``
(ny, nx) int16 (domain id), ``variant`` (ny, nx) int8 (-1 = non-polar), and attributes ``cell_px`` (lattice
period in scan pixels), ``library_sha256`` and ``composer`` (the config as JSON).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polcore.simulate.library import PatternLibrary, load_library

__all__ = ["ScanComposerConfig", "compose_scan", "write_emd", "LAYOUTS", "DEFAULT_SCANS", "build_default_scans"]

log = logging.getLogger(__name__)

LAYOUTS = ("single", "stripes", "checker", "random_domains")


@dataclass(frozen=True)
class ScanComposerConfig:
    """How a scan is composed. Units: [nm], [mrad], [px], electrons per pattern.

    Attributes
    ----------
    layout : one of LAYOUTS.
    ny, nx : scan size [positions].
    step_nm : probe step [nm]; None = lattice / library positions (commensurate with the library).
    thickness_nm : constant thickness [nm] (ignored when thickness_range is set).
    thickness_range : (left, right) [nm] for a wedge along x.
    variants : variant indices (0..11, see structure.VARIANTS) used for the domains; None = layout default.
    wall : '90' or '180' (stripes/checker default variants).
    domain_cells : domain width [unit cells] for stripes and checker.
    stripe_angle : 0 (vertical walls) or 45 (diagonal walls).
    n_domains : number of domains of the random_domains layout (Voronoi cells).
    roles : library configuration roles drawn per unit cell.
    defects : number of defect sites; defect_types : which library defects; defect_cells : defect size
        [cells] (a square of that many cells).
    dose : electrons per pattern (Poisson counts, uint16 output); None = noiseless float32.
    blur_px, background, descan_px, hot_pixels : detector effects (blur sigma [px of the output detector],
        uniform background as a fraction of the mean pattern, disc centre drift across the scan [px],
        number of hot pixels).
    det_px : output detector size [px]; det_mrad_per_px : its sampling (None = the library's).
    calibrated : write the detector calibration; False mimics a file without it.
    seed : random seed of domains, configurations, defects and noise.
    """

    layout: str = "stripes"
    ny: int = 64
    nx: int = 64
    step_nm: float | None = None
    thickness_nm: float = 20.0
    thickness_range: tuple[float, float] | None = None
    variants: tuple[int, ...] | None = None
    wall: str = "90"
    domain_cells: int = 3
    stripe_angle: int = 0
    n_domains: int = 5
    roles: tuple[str, ...] = ("test",)
    defects: int = 0
    defect_types: tuple[str, ...] = ("o_vacancy", "nonpolar")
    defect_cells: int = 1
    dose: float | None = None
    blur_px: float = 0.0
    background: float = 0.0
    descan_px: float = 0.0
    hot_pixels: int = 0
    det_px: int = 64
    det_mrad_per_px: float | None = None
    calibrated: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {', '.join(LAYOUTS)}")
        if self.wall not in ("90", "180"):
            raise ValueError(f"wall must be '90' or '180', got {self.wall!r}")
        if self.ny < 1 or self.nx < 1 or self.det_px < 8:
            raise ValueError("ny, nx must be >= 1 and det_px >= 8")
        if self.step_nm is not None and self.step_nm <= 0:
            raise ValueError(f"step_nm must be > 0, got {self.step_nm}")
        if self.dose is not None and self.dose <= 0:
            raise ValueError(f"dose must be > 0 electrons per pattern, got {self.dose}")
        if self.stripe_angle not in (0, 45):
            raise ValueError(f"stripe_angle must be 0 or 45, got {self.stripe_angle}")


# Variant indices (structure.VARIANTS): 0 RU, 1 LU, 2 LD, 3 RD (in-plane), 4..7 RM/MU/LM/MD (+z), 8..11 (-z).
_WALL_PAIRS = {"90": (0, 1), "180": (0, 2)}


def _domain_map(cfg: ScanComposerConfig, ncy: int, ncx: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Variant index and domain id for every unit cell, (ncy, ncx) each."""
    cy, cx = np.mgrid[0:ncy, 0:ncx]
    if cfg.layout == "single":
        region = np.zeros((ncy, ncx), int)
        variants = cfg.variants or (0,)
    elif cfg.layout in ("stripes", "checker"):
        w = max(1, cfg.domain_cells)
        if cfg.layout == "stripes":
            coord = cx if cfg.stripe_angle == 0 else cx + cy
            region = coord // w
        else:
            region = (cy // w) * (ncx // w + 1) + cx // w
        variants = cfg.variants or _WALL_PAIRS[cfg.wall]
        if cfg.layout == "checker":
            parity = ((cy // w) + (cx // w)) % 2
            v = np.asarray(variants)[parity % len(variants)]
            return v.astype(int), region.astype(int)
    else:  # random_domains: Voronoi cells with random variants
        n = max(1, cfg.n_domains)
        seeds = np.stack([rng.uniform(0, ncy, n), rng.uniform(0, ncx, n)], axis=1)
        d = (cy[..., None] + 0.5 - seeds[:, 0]) ** 2 + (cx[..., None] + 0.5 - seeds[:, 1]) ** 2
        region = np.argmin(d, axis=-1)
        pool = np.asarray(cfg.variants or tuple(range(12)))
        dom_var = rng.choice(pool, size=n)
        for i in range(1, n):  # neighbouring domains should differ
            while dom_var[i] == dom_var[i - 1] and len(pool) > 1:
                dom_var[i] = rng.choice(pool)
        return dom_var[region].astype(int), region.astype(int)
    v = np.asarray(variants)[region % len(variants)]
    return v.astype(int), region.astype(int)


def _gather(arr: np.ndarray, v, c, t, fy, fx) -> np.ndarray:
    """Bilinear interpolation over the (periodic) probe-position grid of ``arr[v, c, t, py, px]``."""
    N = arr.shape[3]
    gy, gx = fy * N, fx * N
    y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
    wy, wx = (gy - y0)[:, None, None], (gx - x0)[:, None, None]
    y0, x0 = y0 % N, x0 % N
    y1, x1 = (y0 + 1) % N, (x0 + 1) % N
    return ((1 - wy) * (1 - wx) * arr[v, c, t, y0, x0] + (1 - wy) * wx * arr[v, c, t, y0, x1]
            + wy * (1 - wx) * arr[v, c, t, y1, x0] + wy * wx * arr[v, c, t, y1, x1])


def _thickness_map(cfg: ScanComposerConfig) -> np.ndarray:
    if cfg.thickness_range is None:
        return np.full((cfg.ny, cfg.nx), float(cfg.thickness_nm), np.float32)
    lo, hi = cfg.thickness_range
    row = np.linspace(lo, hi, cfg.nx, dtype=np.float32)
    return np.broadcast_to(row, (cfg.ny, cfg.nx)).copy()


def _thickness_weights(lib: PatternLibrary, t: np.ndarray):
    """Indices (i0, i1) and weight of i1 for linear interpolation between library thicknesses."""
    ts = lib.thickness_nm.astype(float)
    t = np.clip(t, ts[0], ts[-1])
    i1 = np.clip(np.searchsorted(ts, t, side="left"), 1, len(ts) - 1) if len(ts) > 1 else np.zeros(len(t), int)
    i0 = np.maximum(i1 - 1, 0)
    span = np.where(ts[i1] > ts[i0], ts[i1] - ts[i0], 1.0)
    w = np.where(i1 > i0, (t - ts[i0]) / span, 0.0)
    return i0, i1, w[:, None, None]


def compose_scan(cfg: ScanComposerConfig, lib: PatternLibrary | None = None, *, block_rows: int = 8):
    """Compose a scan.

    Returns
    -------
    truth : dict of ground-truth maps and attributes (see module docstring) plus 'meta'.
    blocks : a generator of (row0, patterns (rows, nx, det_px, det_px)) in raster order, so that large
        scans never sit in memory whole.
    """
    from scipy import ndimage

    lib = lib if lib is not None else load_library()
    rng = np.random.default_rng(cfg.seed)
    a_nm = float(lib.meta["lattice_A"]) / 10
    N = lib.patterns.shape[3]
    step = cfg.step_nm if cfg.step_nm is not None else a_nm / N
    ys, xs = np.arange(cfg.ny) * step, np.arange(cfg.nx) * step
    cell_y, cell_x = np.floor(ys / a_nm + 1e-9).astype(int), np.floor(xs / a_nm + 1e-9).astype(int)
    frac_y, frac_x = ys / a_nm - cell_y, xs / a_nm - cell_x
    ncy, ncx = cell_y[-1] + 1, cell_x[-1] + 1

    cell_var, cell_region = _domain_map(cfg, ncy, ncx, rng)
    roles = lib.configs["role"].to_numpy()
    full = lib.available.all(axis=1) if lib.available is not None else np.ones(len(roles), bool)
    cfg_pool = np.flatnonzero(np.isin(roles, cfg.roles) & full)  # configurations simulated at every thickness
    if len(cfg_pool) == 0:
        raise ValueError(f"the library has no configuration with role in {cfg.roles}")
    cell_cfg = rng.choice(cfg_pool, size=(ncy, ncx))

    cell_defect = np.full((ncy, ncx), "", dtype=object)
    types = [t for t in cfg.defect_types if t in lib.defects]
    if cfg.defects and not types:
        raise ValueError(f"the library has none of the defect types {cfg.defect_types}; it has {sorted(lib.defects)}")
    for _ in range(cfg.defects):
        d = cfg.defect_cells
        y0, x0 = rng.integers(1, max(2, ncy - d - 1)), rng.integers(1, max(2, ncx - d - 1))
        cell_defect[y0 : y0 + d, x0 : x0 + d] = types[rng.integers(len(types))]
    defect_cfg = {name: rng.integers(lib.defects[name].shape[1], size=(ncy, ncx)) for name in types}

    thick = _thickness_map(cfg)
    V = cell_var[cell_y[:, None], cell_x[None, :]]
    cls = lib.variant_class[V].astype(np.int8)
    dmap = cell_defect[cell_y[:, None], cell_x[None, :]]
    defect_mask = dmap != ""
    for name in types:
        sel = dmap == name
        if name in lib.defect_class and lib.defects[name].shape[0] == 1:
            cls[sel] = lib.defect_class[name][0]
    variant = np.where((dmap == "nonpolar"), -1, V).astype(np.int8)
    region = cell_region[cell_y[:, None], cell_x[None, :]].astype(np.int16)

    mrad_lib = float(lib.meta["mrad_per_px"])
    mrad_out = cfg.det_mrad_per_px or mrad_lib
    K = lib.size
    c_lib = K // 2
    det = cfg.det_px
    hot = rng.integers(0, det, size=(cfg.hot_pixels, 2))
    mean_sum = None

    truth = dict(
        label=cls,
        thickness_nm=thick.astype(np.float32),
        defect=defect_mask,
        region=region,
        variant=variant,
        cell_px=float(a_nm / step),
        step_nm=float(step),
        det_mrad_per_px=float(mrad_out),
        library_sha256=lib.sha256,
        composer=json.dumps(asdict(cfg)),
        meta=dict(
            voltage_kv=float(lib.meta["voltage_kv"]),
            convergence_mrad=float(lib.meta["convergence_mrad"]),
            lattice_A=float(lib.meta["lattice_A"]),
        ),
    )

    def blocks():
        nonlocal mean_sum
        for r0 in range(0, cfg.ny, block_rows):
            r1 = min(cfg.ny, r0 + block_rows)
            iy, ix = np.mgrid[r0:r1, 0 : cfg.nx]
            iy, ix = iy.ravel(), ix.ravel()
            cy, cx = cell_y[iy], cell_x[ix]
            fy, fx = frac_y[iy], frac_x[ix]
            i0, i1, w = _thickness_weights(lib, thick[iy, ix])
            v = cell_var[cy, cx]
            c = cell_cfg[cy, cx]
            pats = (1 - w) * _gather(lib.patterns, v, c, i0, fy, fx) + w * _gather(lib.patterns, v, c, i1, fy, fx)
            names = cell_defect[cy, cx]
            for name in types:
                sel = np.flatnonzero(names == name)
                if len(sel) == 0:
                    continue
                arr = lib.defects[name]
                dv = v[sel] if arr.shape[0] > 1 else np.zeros(len(sel), int)
                dc = defect_cfg[name][cy[sel], cx[sel]]
                pats[sel] = ((1 - w[sel]) * _gather(arr, dv, dc, i0[sel], fy[sel], fx[sel])
                             + w[sel] * _gather(arr, dv, dc, i1[sel], fy[sel], fx[sel]))
            # detector: camera length (sampling), descan, output size
            scale = mrad_out / mrad_lib
            gy, gx = np.mgrid[0:det, 0:det].astype(np.float32)
            dy = cfg.descan_px * (iy / max(1, cfg.ny - 1) - 0.5)
            dx = cfg.descan_px * (ix / max(1, cfg.nx - 1) - 0.5) * 0.6
            out = np.empty((len(iy), det, det), np.float32)
            for k in range(len(iy)):
                src_y = (gy - det / 2 - dy[k]) * scale + c_lib
                src_x = (gx - det / 2 - dx[k]) * scale + c_lib
                out[k] = ndimage.map_coordinates(pats[k], [src_y, src_x], order=1, mode="constant", cval=0.0)
            out *= scale**2  # intensity per output pixel (solid angle)
            if cfg.blur_px > 0:
                out = ndimage.gaussian_filter(out, sigma=(0, cfg.blur_px, cfg.blur_px))
            if mean_sum is None:
                mean_sum = float(out.sum(axis=(1, 2)).mean())
            if cfg.background > 0:
                out += cfg.background * mean_sum / det**2
            if cfg.dose is not None:
                counts = rng.poisson(out * (cfg.dose / max(mean_sum, 1e-12)))
                if len(hot):
                    counts[:, hot[:, 0], hot[:, 1]] = np.maximum(counts[:, hot[:, 0], hot[:, 1]], 4000)
                out = np.clip(counts, 0, 65535).astype(np.uint16)
            elif len(hot):
                out[:, hot[:, 0], hot[:, 1]] = out.max() * 20
            yield r0, out.reshape(r1 - r0, cfg.nx, det, det)

    return truth, blocks()


def _emd_meta(group, name: str, items: dict):
    """An emdfile metadata group: one scalar dataset per item with a 'type' attribute."""
    import h5py

    g = group.create_group(name)
    g.attrs["emd_group_type"] = "metadata"
    g.attrs["python_class"] = "Calibration" if name == "calibration" else "Metadata"
    for k, v in items.items():
        if isinstance(v, bool):
            ds = g.create_dataset(k, data=np.bool_(v))
            ds.attrs["type"] = "bool"
        elif isinstance(v, (int, float)):
            ds = g.create_dataset(k, data=np.float64(v))
            ds.attrs["type"] = "number"
        else:
            ds = g.create_dataset(k, data=str(v), dtype=h5py.string_dtype())
            ds.attrs["type"] = "string"
    return g


def write_emd(path, truth: dict, blocks, cfg: ScanComposerConfig) -> Path:
    """Write a composed scan as EMD 1.0 (py4DSTEM DataCube) plus /ground_truth; atomic (temp + rename)."""
    import h5py

    from polcore.io.ground_truth import write_ground_truth

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    dtype = np.uint16 if cfg.dose is not None else np.float32
    det = cfg.det_px
    with h5py.File(tmp, "w") as f:
        f.attrs.update(emd_group_type="file", version_major=1, version_minor=0, UUID=str(uuid.uuid4()),
                       authoring_program="polbench", authoring_user="")
        root = f.create_group("polbench_root")
        root.attrs.update(emd_group_type="root", python_class="Root")
        dc = root.create_group("datacube")
        dc.attrs.update(emd_group_type="array", python_class="DataCube")
        data = dc.create_dataset("data", (cfg.ny, cfg.nx, det, det), dtype=dtype,
                                 chunks=(1, min(cfg.nx, 16), det, det), compression="gzip", compression_opts=1)
        data.attrs["units"] = "counts" if cfg.dose is not None else "fraction of incident intensity"
        step, q = truth["step_nm"], truth["det_mrad_per_px"]
        qsize, qunits = (q, "mrad") if cfg.calibrated else (1.0, "pixels")
        for i, (name, size, units) in enumerate(
            [("Rx", step, "nm"), ("Ry", step, "nm"), ("Qx", qsize, qunits), ("Qy", qsize, qunits)]
        ):
            ds = dc.create_dataset(f"dim{i}", data=np.array([0.0, size]))
            ds.attrs.update(name=name, units=units)
        bundle = root.create_group("metadatabundle")
        bundle.attrs["emd_group_type"] = "metadatabundle"
        _emd_meta(bundle, "calibration", dict(
            R_pixel_size=float(step), R_pixel_units="nm", Q_pixel_size=float(qsize), Q_pixel_units=qunits,
            QR_rotation_degrees=0.0, QR_flip=False, accelerating_voltage=truth["meta"]["voltage_kv"] * 1e3,
            convergence_semiangle_mrad=truth["meta"]["convergence_mrad"],
        ))
        for r0, block in blocks:
            data[r0 : r0 + block.shape[0]] = block
        write_ground_truth(f, truth, dict(
            cell_px=truth["cell_px"], step_nm=truth["step_nm"], library_sha256=truth["library_sha256"],
            composer=truth["composer"], class_convention="k <-> 45 deg * k counter-clockwise from +x"))
    tmp.replace(path)
    return path


# The default data sets: name -> (kind, dataset row of the benchmark, config). Synthetic rows use the
# library's held-out 'test' configurations; the training thickness is 20 nm (as in the study).
#: Side of the default scans [positions]: 40 x 40 keeps the demo's inference (10 models x 9 scans, VGG at about
#: 80 patterns/s on 2 CPU cores) within minutes; compose larger scans with ``python -m polcore simulate scan``.
DEMO_SIDE = 40

DEFAULT_SCANS: dict[str, tuple[str, str, ScanComposerConfig]] = {
    "syn_20nm": ("synthetic", "synthetic 20 nm (train thickness)",
                 ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="random_domains", thickness_nm=20, n_domains=10, seed=1)),
    "syn_20nm_stripes": ("synthetic", "synthetic 20 nm, 90-degree stripes",
                         ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="stripes", thickness_nm=20, wall="90", domain_cells=2, seed=11)),
    "syn_10nm": ("synthetic", "synthetic 10 nm",
                 ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="random_domains", thickness_nm=10, n_domains=10, seed=2)),
    "syn_35nm": ("synthetic", "synthetic 35 nm",
                 ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="random_domains", thickness_nm=35, n_domains=10, seed=3)),
    "syn_50nm": ("synthetic", "synthetic 50 nm",
                 ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="random_domains", thickness_nm=50, n_domains=10, seed=4)),
    "syn_20nm_2x2cells": ("synthetic", "synthetic 20 nm, 2x2 cells (fine step)",
                          ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="stripes", thickness_nm=20, step_nm=0.79 / DEMO_SIDE,
                                             domain_cells=1, seed=5)),
    "syn_20nm_12x12cells": ("synthetic", "synthetic 20 nm, 12x12 cells (coarse step)",
                            ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="random_domains", thickness_nm=20, step_nm=4.74 / DEMO_SIDE,
                                               n_domains=6, seed=6)),
    "exp_wedge": ("pseudo_experimental", "experimental-like: wedge 15-45 nm, dose 5e4",
                  ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="random_domains", thickness_range=(15, 45), step_nm=0.0455,
                                     n_domains=5, defects=5, dose=5e4, blur_px=0.8, background=0.05,
                                     descan_px=4, hot_pixels=3, det_px=96, det_mrad_per_px=0.95,
                                     calibrated=False, seed=7)),
    "exp_stripes": ("pseudo_experimental", "experimental-like: 30 nm stripes, dose 2e4",
                    ScanComposerConfig(ny=DEMO_SIDE, nx=DEMO_SIDE, layout="stripes", thickness_nm=30, wall="180", domain_cells=3,
                                       step_nm=0.052, defects=4, dose=2e4, blur_px=1.0, background=0.1,
                                       descan_px=3, hot_pixels=2, det_px=80, det_mrad_per_px=1.1, seed=8)),
}


def build_default_scans(out_dir, lib: PatternLibrary | None = None, *, names=None, progress=None,
                        table: dict | None = None) -> dict:
    """Compose the default data sets into ``out_dir`` (skips files that exist). Returns name -> path.

    ``table`` replaces :data:`DEFAULT_SCANS` (name -> (kind, benchmark row, ScanComposerConfig));
    ``progress(fraction, message)`` is optional."""
    table = DEFAULT_SCANS if table is None else table
    out_dir = Path(out_dir)
    lib = lib if lib is not None else load_library()
    paths = {}
    todo = list(names or table)
    for i, name in enumerate(todo):
        kind, row, cfg = table[name]
        p = out_dir / f"{name}.h5"
        if not p.exists():
            t0 = time.perf_counter()
            truth, blocks = compose_scan(cfg, lib)
            write_emd(p, truth, blocks, cfg)
            log.info("composed %s in %.1f s", p, time.perf_counter() - t0)
        paths[name] = p
        if progress is not None:
            progress((i + 1) / len(todo), f"scan {name}")
    return paths

"""abTEM build of the pattern library (read it with :mod:`polcore.simulate.library`).

Recipe (``PROFILES``): a ``cells_xy`` x ``cells_xy`` supercell of KNN, ``gpts_per_cell`` grid points per unit
cell (commensurate, so the unpolarised structure keeps its 4mm symmetry exactly), one slice per unit cell
(infinite projection), exit planes at the requested thicknesses, an 8 x 8 grid of probe positions over the
centre unit cell (origin on its A site). Each *configuration* draws the nuisances that PHYSICS.md measured to be
as large as the signal: a frozen-phonon snapshot set (averaged), mistilt (0-1.5 mrad, random direction), Nb
displacement (0.10-0.20 A, O at -1/3 of it), convergence semi-angle and K/Na disorder. Configurations are
assigned roles (train / val / test) so that held-out data are independent simulations. Extra training
configurations (``extra_train_configs``) are simulated at the training thickness only
(``extra_thickness_nm``): more independent nuisance draws where the models learn, at a quarter of the cost.

Only the three symmetry-independent variants (``structure.BASE_VARIANTS``) are simulated; patterns are
cropped to ``crop`` x ``crop`` pixels and stored as float16 times ``scale`` with the lowest
``drop_mantissa_bits`` mantissa bits rounded away (0.8 % relative precision by default, below the shot noise
of any realistic dose), compressed with Blosc/zstd (bit shuffle). The file layout is documented in
:mod:`polcore.simulate.library`. :func:`simulate_cell_scan` is also the multislice engine of the draw library
(:mod:`polcore.simulate.draws`).

abTEM (and dask) are imported only inside the functions that simulate, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from polcore.simulate.library import DEFAULT_LIBRARY, FORMAT, extra_path, mrad_per_px
from polcore.simulate.structure import BASE_VARIANTS, LATTICE_A, StructureParams, knn_supercell

__all__ = [
    "SimulationConfig",
    "PROFILES",
    "simulate_cell_scan",
    "build_library",
    "configure_abtem",
]

log = logging.getLogger(__name__)

PHONON_SIGMAS_A = {"K": 0.10, "Na": 0.10, "Nb": 0.06, "O": 0.09}


@dataclass(frozen=True)
class SimulationConfig:
    """How a library is simulated. Units: [kV], [mrad], [nm], [A].

    ``roles`` gives the role of each configuration (its length is the number of configurations).
    """

    profile: str = "default"
    voltage_kv: float = 200.0
    convergence_mrad: float = 24.0
    convergence_jitter_mrad: float = 1.0
    thickness_nm: tuple[float, ...] = (10.0, 20.0, 35.0, 50.0)
    cells_xy: int = 5
    gpts_per_cell: int = 32
    positions: int = 8
    crop: int = 65
    phonon_snapshots: int = 2
    max_tilt_mrad: float = 1.5
    nb_disp_range_A: tuple[float, float] = (0.10, 0.20)
    defocus_range_A: tuple[float, float] = (-20.0, 20.0)
    na_fraction: float = 0.5
    roles: tuple[str, ...] = ("train",) * 5 + ("val", "test", "test")
    extra_train_configs: int = 12
    extra_thickness_nm: tuple[float, ...] = (20.0,)
    defects: tuple[str, ...] = ("o_vacancy", "nonpolar")
    defect_configs: int = 1
    seed: int = 2026
    scale: float = 1e4
    drop_mantissa_bits: int = 4

    def __post_init__(self):
        if self.crop % 2 != 1:
            raise ValueError(f"crop must be odd so that quarter turns are exact, got {self.crop}")
        if self.cells_xy * self.gpts_per_cell < self.crop:
            raise ValueError("the simulation grid is smaller than the crop")
        if self.gpts_per_cell % self.positions:
            raise ValueError("gpts_per_cell must be a multiple of positions (probe on grid points)")
        if self.extra_train_configs and not set(self.extra_thickness_nm) <= set(self.thickness_nm):
            raise ValueError("extra_thickness_nm must be a subset of thickness_nm")
        bad = set(self.roles) - {"train", "val", "test"}
        if bad:
            raise ValueError(f"unknown roles {sorted(bad)}; valid: train, val, test")

    @property
    def n_configs(self) -> int:
        return len(self.roles)

    @property
    def n_all_configs(self) -> int:
        """Configurations at every thickness plus the extra training configurations."""
        return len(self.roles) + self.extra_train_configs

    @property
    def cells_z(self) -> int:
        return int(round(max(self.thickness_nm) * 10 / LATTICE_A))


PROFILES: dict[str, SimulationConfig] = {
    "default": SimulationConfig(),
    # The study's geometry: 24 mrad, 20 and 50 nm, 256 px patterns; a finer grid; several phonons.
    "paper": SimulationConfig(
        profile="paper", thickness_nm=(20.0, 50.0), cells_xy=6, gpts_per_cell=48, crop=129,
        phonon_snapshots=8, roles=("train",) * 10 + ("val",) * 2 + ("test",) * 4, defect_configs=4,
        drop_mantissa_bits=0, extra_train_configs=0,
    ),
    # Seconds, for tests: thin, small grid, 4 x 4 positions.
    "tiny": SimulationConfig(
        profile="tiny", thickness_nm=(4.0, 8.0), cells_xy=3, gpts_per_cell=24, positions=4, crop=65,
        phonon_snapshots=1, roles=("train", "val"), defects=("nonpolar",), defect_configs=1,
        extra_train_configs=2, extra_thickness_nm=(8.0,),
    ),
}


def configure_abtem():
    """Guard the measured abTEM 1.0.11 pitfall: FrozenPhonons + exit_planes under dask's threaded
    scheduler gave wrong (partly zero) thickness series, 18x slower. Force the synchronous scheduler."""
    import abtem
    import dask

    dask.config.set(scheduler="synchronous")
    # one FFTW thread by default: on a loaded 2-core machine two threads made each simulation 10x slower
    threads = int(os.environ.get("POLBENCH_FFTW_THREADS", "1"))
    abtem.config.set({"fftw.threads": threads, "device": "cpu"})


def _quantize(x: np.ndarray, drop_bits: int) -> np.ndarray:
    """float16 with the lowest ``drop_bits`` mantissa bits rounded away (relative error <= 2**(drop_bits-11)),
    which roughly halves the compressed size of noisy diffraction patterns."""
    x = np.asarray(x, dtype=np.float16)
    if drop_bits <= 0:
        return x
    u = x.view(np.uint16).astype(np.uint32)
    u = (u + (1 << (drop_bits - 1))) & (0xFFFF & (0xFFFF << drop_bits))
    return u.astype(np.uint16).view(np.float16)


def _compression() -> dict:
    """Blosc (zstd, bit shuffle) from hdf5plugin: about 25 % smaller than gzip on these patterns."""
    import hdf5plugin

    return dict(hdf5plugin.Blosc(cname="zstd", clevel=9, shuffle=hdf5plugin.Blosc.BITSHUFFLE))


def _draw_configs(cfg: SimulationConfig) -> list[dict]:
    """Nuisance parameters of every configuration, drawn from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    out = []
    for i, role in enumerate(tuple(cfg.roles) + ("train",) * cfg.extra_train_configs):
        tilt = rng.uniform(0, cfg.max_tilt_mrad)
        phi = rng.uniform(0, 2 * np.pi)
        nb = rng.uniform(*cfg.nb_disp_range_A)
        out.append(
            dict(
                index=i,
                role=role,
                phonon_seed=int(rng.integers(2**31)),
                tilt_x_mrad=float(tilt * np.cos(phi)),
                tilt_y_mrad=float(tilt * np.sin(phi)),
                nb_disp_A=float(nb),
                o_disp_A=float(-nb / 3),
                convergence_mrad=float(cfg.convergence_mrad + rng.uniform(-1, 1) * cfg.convergence_jitter_mrad),
                defocus_A=float(rng.uniform(*cfg.defocus_range_A)),
                na_fraction=float(cfg.na_fraction),
                disorder_seed=int(rng.integers(2**31)),
            )
        )
    return out


def simulate_cell_scan(structure: StructureParams, cfg: SimulationConfig, nuisance: dict) -> np.ndarray:
    """Multislice CBED patterns over one unit cell for every exit thickness.

    Parameters
    ----------
    structure : the supercell (``cells_z`` is overridden to reach the largest thickness).
    cfg : simulation settings (grid, probe positions, crop, thicknesses).
    nuisance : one entry of the configuration table (phonon seed, tilt, convergence, defocus).

    Returns
    -------
    patterns : float32 (T, N, N, crop, crop) as (thickness, probe row y, probe col x, ky, kx); each pattern
        is a fraction of the incident intensity (probe normalised to 1).
    """
    import abtem

    configure_abtem()
    a = structure.lattice_A
    cells_z = cfg.cells_z
    params = StructureParams(**{**asdict(structure), "cells_z": cells_z, "cells_xy": cfg.cells_xy})
    atoms = knn_supercell(params)
    exit_idx = tuple(int(round(t * 10 / a)) - 1 for t in cfg.thickness_nm)
    if len(set(exit_idx)) != len(exit_idx) or min(exit_idx) < 0:
        raise ValueError(f"thicknesses {cfg.thickness_nm} nm do not map to distinct slices")
    if cfg.phonon_snapshots > 0:
        fp = abtem.FrozenPhonons(
            atoms, num_configs=cfg.phonon_snapshots, sigmas=PHONON_SIGMAS_A, seed=int(nuisance["phonon_seed"])
        )
    else:  # static lattice (symmetry tests)
        fp = atoms
    n = cfg.cells_xy * cfg.gpts_per_cell
    potential = abtem.Potential(fp, gpts=(n, n), slice_thickness=a, projection="infinite", exit_planes=exit_idx)
    probe = abtem.Probe(
        energy=cfg.voltage_kv * 1e3,
        semiangle_cutoff=float(nuisance["convergence_mrad"]),
        defocus=float(nuisance["defocus_A"]),
        tilt=(float(nuisance["tilt_x_mrad"]), float(nuisance["tilt_y_mrad"])),
    )
    c = (cfg.cells_xy // 2) * a
    scan = abtem.GridScan(start=(c, c), end=(c + a, c + a), gpts=(cfg.positions, cfg.positions), endpoint=False)
    measurement = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None))
    # the scheduler named here too, not only in configure_abtem's global config: on a Dask worker (polcore.distributed)
    # a client may set the global config to itself at any moment, and this graph must never go there
    arr = np.asarray(measurement.compute(progress_bar=False, scheduler="synchronous").array, dtype=np.float32)
    if arr.ndim == 4:  # a single exit plane comes back without the thickness axis
        arr = arr[None]
    if arr.shape[0] != len(exit_idx):
        raise RuntimeError(f"abTEM returned {arr.shape[0]} exit planes, expected {len(exit_idx)}")
    # abTEM axes: (T, scan_x, scan_y, kx, ky) -> polcore (T, scan_y, scan_x, ky, kx)
    arr = np.transpose(arr, (0, 2, 1, 4, 3))
    k0 = arr.shape[-1] // 2  # zero frequency after fftshift (even size)
    h = cfg.crop // 2
    return np.ascontiguousarray(arr[..., k0 - h : k0 + h + 1, k0 - h : k0 + h + 1])


def _structure_for(base_vector, nuisance: dict, defect: str | None = None) -> StructureParams:
    pol = (0.0, 0.0, 0.0) if defect == "nonpolar" else tuple(float(v) for v in base_vector)
    return StructureParams(
        polarization=pol,
        nb_disp_A=nuisance["nb_disp_A"],
        o_disp_A=nuisance["o_disp_A"],
        na_fraction=nuisance["na_fraction"],
        disorder_seed=nuisance["disorder_seed"],
        defect=None if defect == "nonpolar" else defect,
    )


_CONFIG_DTYPE = np.dtype(
    [
        ("phonon_seed", "i8"), ("tilt_x_mrad", "f4"), ("tilt_y_mrad", "f4"), ("nb_disp_A", "f4"),
        ("o_disp_A", "f4"), ("convergence_mrad", "f4"), ("defocus_A", "f4"), ("na_fraction", "f4"),
        ("disorder_seed", "i8"), ("role", "S5"),
    ]
)


def build_library(cfg: SimulationConfig | str = "default", out: str | Path | None = None, *, progress=None):
    """Simulate a library with abTEM and write it to ``out`` (HDF5); resumable.

    Work is written entry by entry into ``out + '.partial'`` (a rerun continues where it stopped) and the
    file is renamed to ``out`` only when complete, so a reader never sees half a library.

    Parameters
    ----------
    cfg : a SimulationConfig or a profile name from ``PROFILES``.
    out : output path; default ``data/library/knn_<profile>.h5``.
    progress : optional ``progress(fraction, message)`` (``polcore.progress``).

    Returns
    -------
    Path of the finished library.
    """
    import abtem
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter)

    if isinstance(cfg, str):
        if cfg not in PROFILES:
            raise ValueError(f"unknown profile {cfg!r}; valid: {sorted(PROFILES)}")
        cfg = PROFILES[cfg]
    out = Path(out) if out is not None else DEFAULT_LIBRARY.with_name(f"knn_{cfg.profile}.h5")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    nuis = _draw_configs(cfg)
    T, N, K, C = len(cfg.thickness_nm), cfg.positions, cfg.crop, cfg.n_configs
    nb = len(BASE_VARIANTS)
    defect_bases = {"o_vacancy": list(BASE_VARIANTS), "nonpolar": [(0, 0, 0)]}
    recipe = json.dumps(asdict(cfg))
    t0 = time.perf_counter()
    with h5py.File(partial, "a") as f:
        if "patterns" in f and f.attrs.get("recipe") != recipe:
            raise ValueError(f"{partial} was started with another recipe; delete it to start over")
        if "patterns" not in f:
            chunks = (1, 1, 1, N, N, K, K)
            f.create_dataset("patterns", (nb, C, T, N, N, K, K), dtype="f2", chunks=chunks, **_compression())
            f.create_dataset("done", data=np.zeros((nb, C), bool))
            f["base_vectors"] = np.array(BASE_VARIANTS, dtype=np.int8)
            f["thickness_nm"] = np.array(cfg.thickness_nm, dtype=np.float32)
            g = (np.arange(N) / N).astype(np.float32)
            f["positions_frac"] = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1)
            if cfg.extra_train_configs:
                eg = f.create_group("extra")
                Te = len(cfg.extra_thickness_nm)
                eg.create_dataset("patterns", (nb, cfg.extra_train_configs, Te, N, N, K, K), dtype="f2",
                                  chunks=chunks, **_compression())
                eg.create_dataset("done", data=np.zeros((nb, cfg.extra_train_configs), bool))
                eg["thickness_nm"] = np.array(cfg.extra_thickness_nm, dtype=np.float32)
            table = np.zeros(cfg.n_all_configs, dtype=_CONFIG_DTYPE)
            for i, n_ in enumerate(nuis):
                for k in _CONFIG_DTYPE.names:
                    table[i][k] = n_[k].encode() if k == "role" else n_[k]
            f["configs"] = table
            dg = f.create_group("defects")
            for name in cfg.defects:
                bases = defect_bases[name]
                ds = dg.create_dataset(name, (len(bases), cfg.defect_configs, T, N, N, K, K), dtype="f2",
                                       chunks=chunks, **_compression())
                ds.attrs["base_vectors"] = np.array(bases, dtype=np.int8)
                ds.attrs["description"] = {
                    "o_vacancy": "O column at (1/2, 0) of the centre cell 30 % vacant; neighbouring Nb columns "
                    "pushed 0.15 A away from it (host polarization = base vector)",
                    "nonpolar": "no polar displacement (paraelectric region / domain-wall core); class -1",
                }[name]
                dg.create_dataset(name + "_done", data=np.zeros((len(bases), cfg.defect_configs), bool))
            f.attrs.update(
                format=FORMAT, voltage_kv=cfg.voltage_kv, convergence_mrad=cfg.convergence_mrad,
                mrad_per_px=mrad_per_px(cfg), lattice_A=LATTICE_A, cells_xy=cfg.cells_xy,
                gpts_per_cell=cfg.gpts_per_cell, crop=K, scale=cfg.scale, abtem_version=abtem.__version__,
                seed=cfg.seed, profile=cfg.profile, recipe=recipe,
            )
        jobs = [("patterns", b, c, BASE_VARIANTS[b], None) for c in range(C) for b in range(nb)]
        jobs += [("extra/patterns", b, e, BASE_VARIANTS[b], None) for e in range(cfg.extra_train_configs)
                 for b in range(nb)]
        for name in cfg.defects:
            for b, base in enumerate(defect_bases[name]):
                for c in range(cfg.defect_configs):
                    jobs.append((f"defects/{name}", b, c, base, name))
        total = len(jobs)
        for j, (dset, b, c, base, defect) in enumerate(jobs):
            extra = dset.startswith("extra/")
            done = f["extra/done"] if extra else (f["done"] if defect is None else f[f"defects/{defect}_done"])
            if done[b, c]:
                continue
            t1 = time.perf_counter()
            nu = nuis[C + c] if extra else nuis[c]
            sim_cfg = replace(cfg, thickness_nm=cfg.extra_thickness_nm) if extra else cfg
            pats = simulate_cell_scan(_structure_for(base, nu, defect), sim_cfg, nu)
            f[dset][b, c] = _quantize(pats * cfg.scale, cfg.drop_mantissa_bits)
            done[b, c] = True
            f.flush()
            msg = (f"[{j + 1}/{total}] {dset} base {base} config {c}: {time.perf_counter() - t1:.1f} s "
                   f"(elapsed {time.perf_counter() - t0:.0f} s)")
            log.info(msg)
            if progress is not None:
                progress((j + 1) / total, msg)
        f.attrs["elapsed_s"] = float(f.attrs.get("elapsed_s", 0.0)) + time.perf_counter() - t0
    _finish(partial, out)
    return out


def _finish(partial: Path, out: Path) -> None:
    """Move a finished build into place. ``/extra`` goes to its own file (``extra_path``) behind an HDF5
    external link, so that each committed file stays small; readers follow the link transparently."""
    import h5py

    with h5py.File(partial, "r") as src:
        has_extra = "extra" in src
        if has_extra:
            ex_tmp = extra_path(out).with_name(extra_path(out).name + ".tmp")
            main_tmp = out.with_name(out.name + ".tmp")
            with h5py.File(ex_tmp, "w") as fe:
                src.copy(src["extra"], fe, "extra")
            with h5py.File(main_tmp, "w") as fm:
                for key in src:
                    if key != "extra":
                        src.copy(src[key], fm, key)
                fm.attrs.update(dict(src.attrs))
                fm["extra"] = h5py.ExternalLink(extra_path(out).name, "/extra")
    if has_extra:
        os.replace(ex_tmp, extra_path(out))
        os.replace(main_tmp, out)
        partial.unlink()
    else:
        os.replace(partial, out)

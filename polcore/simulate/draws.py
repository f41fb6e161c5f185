"""The training library: many independent nuisance draws, converged frozen phonons, 5-60 nm.

The committed library (:mod:`polcore.simulate.library`) is valid physics but a poor teacher: five nuisance
draws per thickness, each averaged over two phonon snapshots (PHYSICS.md). This module builds the library the
models learn from. Each *draw* is one independent random set of nuisances, simulated with abTEM for both
symmetry-independent polarization variants that the projection can tell apart:

* tilt uniform in [-1.5, 1.5] mrad on both axes, defocus, convergence 24 +- 1 mrad, Nb displacement
  0.10-0.20 A (O at -1/3 of it), K/Na disorder (Na fraction 0.4-0.6, own seed), a frozen-phonon average of
  ``phonon_snapshots`` snapshots (own seed);
* every thickness from 5 to 60 nm in 5 nm steps from one multislice run (exit planes);
* base variants RU (1, -1, 0) and RM (1, 0, +1); the other six classes follow by exact quarter turns
  (``library.rotate_entry``). The -z partner of RM is not simulated: PHYSICS.md measured the out-of-plane
  sign to change a pattern by 0.1-0.2 %, so it would cost a third of the time for a near duplicate. Each of
  the 8 classes therefore has exactly one variant per draw (a uniform class prior).

Roles (each its own seed stream, so adding training draws never changes held-out ones):
``train``, ``val``, ``test`` (all nuisances drawn); ``ideal_train``, ``ideal_test`` (zero tilt, nominal
parameters: Nb 0.15 A, 24 mrad, no defocus, Na 0.5; only phonons and disorder drawn), for the study's
"same thickness, ideal patterns" row. Held-out draws (``test``, ``ideal_test``) are averaged over
``test_phonon_snapshots`` (more converged, as a real exposure is).

Storage: one HDF5 file per draw under ``~/.cache/polbench/draws/<profile>/`` (``$POLBENCH_CACHE`` overrides;
outside the work tree, about 5 MB each), written to a
temporary name and renamed when complete, so a killed build loses at most the draw in flight and a rerun
continues. Several worker processes can build one library at once: each claims a draw with an exclusive
claim file (stale claims of dead processes are taken over). ``load_draws`` reads every finished draw.

File layout (``format = "polbench-draw/1"``)::

    /patterns   float16 (2, T, N, N, K, K) x scale   base variant, thickness, probe row, col, ky, kx
    attrs       role, index, nuisance (JSON), recipe (JSON), abtem_version, seconds, scale
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from polcore.simulate.build import (
    SimulationConfig,
    _compression,
    _quantize,
    _structure_for,
    simulate_cell_scan,
)
from polcore.simulate.library import mrad_per_px, rotate_entry
from polcore.simulate.structure import LATTICE_A, rotate_vector_ccw, variant_class

__all__ = [
    "DrawConfig",
    "DRAW_PROFILES",
    "DRAW_BASES",
    "default_draws_dir",
    "draw_nuisance",
    "build_draws",
    "load_draws",
    "DrawLibrary",
]

log = logging.getLogger(__name__)



def default_draws_dir(profile: str = "train") -> Path:
    """Where draw libraries are cached: ``$POLBENCH_CACHE/draws/<profile>`` (default ``~/.cache/polbench``),
    outside the work tree so that a build survives a fresh checkout; read at call time."""
    from polcore.settings import cache_dir

    return cache_dir() / "draws" / profile

FORMAT = "polbench-draw/1"
#: RU in plane and RM with +z: the two projections that differ; quarter turns give all 8 classes.
DRAW_BASES: tuple[tuple[int, int, int], ...] = ((1, -1, 0), (1, 0, 1))
ROLES = ("train", "val", "test", "ideal_train", "ideal_test")
_ROLE_CODE = {r: i for i, r in enumerate(ROLES)}


@dataclass(frozen=True)
class DrawConfig:
    """How the training library is simulated. Units: [kV], [mrad], [nm], [A].

    ``counts`` gives the number of draws of each role; ``order`` is the build order (role, how many) so that
    a partial build already has held-out draws and a spread of training draws.
    """

    profile: str = "train"
    voltage_kv: float = 200.0
    convergence_mrad: float = 24.0
    convergence_jitter_mrad: float = 1.0
    thickness_nm: tuple[float, ...] = tuple(float(t) for t in range(5, 65, 5))
    ideal_thickness_nm: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0)
    cells_xy: int = 5
    gpts_per_cell: int = 32
    positions: int = 8
    crop: int = 65
    phonon_snapshots: int = 4
    test_phonon_snapshots: int = 8
    max_tilt_mrad: float = 1.5
    nb_disp_range_A: tuple[float, float] = (0.10, 0.20)
    defocus_range_A: tuple[float, float] = (-30.0, 30.0)
    na_fraction_range: tuple[float, float] = (0.4, 0.6)
    counts: dict = field(default_factory=lambda: {"train": 160, "val": 6, "test": 10, "ideal_train": 6,
                                                  "ideal_test": 3})
    order: tuple = (("test", 4), ("val", 3), ("train", 24), ("ideal_train", 6), ("ideal_test", 3),
                    ("test", 6), ("val", 3), ("train", 136))
    seed: int = 2027
    scale: float = 1e4
    drop_mantissa_bits: int = 4

    def __post_init__(self):
        bad = set(self.counts) - set(ROLES)
        if bad:
            raise ValueError(f"unknown roles {sorted(bad)}; valid: {', '.join(ROLES)}")
        for role, n in self.counts.items():
            if sum(k for r, k in self.order if r == role) != n:
                raise ValueError(f"order must schedule exactly counts[{role!r}] = {n} draws")
        if not set(self.ideal_thickness_nm) <= set(self.thickness_nm):
            raise ValueError("ideal_thickness_nm must be a subset of thickness_nm")

    def sim_config(self, role: str) -> SimulationConfig:
        """The per-run settings of :func:`simulate_cell_scan` for a draw of ``role``."""
        held_out = role in ("test", "ideal_test")
        return SimulationConfig(
            profile=self.profile, voltage_kv=self.voltage_kv, convergence_mrad=self.convergence_mrad,
            thickness_nm=self.ideal_thickness_nm if role.startswith("ideal") else self.thickness_nm,
            cells_xy=self.cells_xy, gpts_per_cell=self.gpts_per_cell, positions=self.positions, crop=self.crop,
            phonon_snapshots=self.test_phonon_snapshots if held_out else self.phonon_snapshots,
            extra_train_configs=0, defects=(), roles=("train",),
        )

    def jobs(self) -> list[tuple[str, int]]:
        """(role, index) in build order."""
        nxt = {r: 0 for r in ROLES}
        out = []
        for role, k in self.order:
            for _ in range(k):
                out.append((role, nxt[role]))
                nxt[role] += 1
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


DRAW_PROFILES: dict[str, DrawConfig] = {
    "train": DrawConfig(),
    # Seconds, for tests: thin, a small grid, 4 x 4 positions, one snapshot.
    "tiny": DrawConfig(
        profile="tiny", thickness_nm=(4.0, 8.0), ideal_thickness_nm=(8.0,), cells_xy=3, gpts_per_cell=24,
        positions=4, phonon_snapshots=1, test_phonon_snapshots=1,
        counts={"train": 3, "val": 1, "test": 1, "ideal_train": 1, "ideal_test": 1},
        order=(("test", 1), ("val", 1), ("train", 3), ("ideal_train", 1), ("ideal_test", 1)),
    ),
}


def draw_nuisance(cfg: DrawConfig, role: str, index: int) -> dict:
    """The nuisance parameters of draw ``index`` of ``role`` (deterministic: seed, role and index)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; valid: {', '.join(ROLES)}")
    rng = np.random.default_rng([cfg.seed, _ROLE_CODE[role], int(index)])
    phonon_seed, disorder_seed = (int(v) for v in rng.integers(2**31, size=2))
    if role.startswith("ideal"):
        nb = float(np.mean(cfg.nb_disp_range_A))
        return dict(role=role, index=int(index), phonon_seed=phonon_seed, disorder_seed=disorder_seed,
                    tilt_x_mrad=0.0, tilt_y_mrad=0.0, nb_disp_A=nb, o_disp_A=-nb / 3,
                    convergence_mrad=cfg.convergence_mrad, defocus_A=0.0,
                    na_fraction=float(np.mean(cfg.na_fraction_range)))
    tx, ty = rng.uniform(-cfg.max_tilt_mrad, cfg.max_tilt_mrad, size=2)
    nb = rng.uniform(*cfg.nb_disp_range_A)
    return dict(role=role, index=int(index), phonon_seed=phonon_seed, disorder_seed=disorder_seed,
                tilt_x_mrad=float(tx), tilt_y_mrad=float(ty), nb_disp_A=float(nb), o_disp_A=float(-nb / 3),
                convergence_mrad=float(cfg.convergence_mrad + rng.uniform(-1, 1) * cfg.convergence_jitter_mrad),
                defocus_A=float(rng.uniform(*cfg.defocus_range_A)),
                na_fraction=float(rng.uniform(*cfg.na_fraction_range)))


def _draw_path(out_dir: Path, role: str, index: int) -> Path:
    return out_dir / f"{role}_{index:04d}.h5"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(path: Path) -> bool:
    """Claim a draw for this process (exclusive create); take over the claim of a dead process."""
    claim = path.with_suffix(".claim")
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(claim.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            claim.unlink(missing_ok=True)  # stale: its process died
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def _write_draw(path: Path, patterns: np.ndarray, cfg: DrawConfig, nuisance: dict, seconds: float) -> None:
    import abtem
    import h5py
    import hdf5plugin  # noqa: F401

    tmp = path.with_name(path.name + ".tmp")
    K = patterns.shape[-1]
    with h5py.File(tmp, "w") as f:
        f.create_dataset("patterns", data=_quantize(patterns * cfg.scale, cfg.drop_mantissa_bits),
                         chunks=(1, 1) + patterns.shape[2:4] + (K, K), **_compression())
        f.attrs.update(format=FORMAT, role=nuisance["role"], index=nuisance["index"],
                       nuisance=json.dumps(nuisance), recipe=cfg.to_json(), abtem_version=abtem.__version__,
                       seconds=float(seconds), scale=cfg.scale)
    os.replace(tmp, path)


def prepare_draws_dir(cfg, out_dir=None):
    """``(DrawConfig, folder)`` of a build: the profile resolved, the folder made, its recipe written or checked
    (a folder of another recipe is refused). Shared by the single-process and the Dask builds."""
    if isinstance(cfg, str):
        if cfg not in DRAW_PROFILES:
            raise ValueError(f"unknown draw profile {cfg!r}; valid: {', '.join(DRAW_PROFILES)}")
        cfg = DRAW_PROFILES[cfg]
    out_dir = Path(out_dir) if out_dir is not None else default_draws_dir(cfg.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = out_dir / "recipe.json"
    if recipe_file.exists() and json.loads(recipe_file.read_text()) != json.loads(cfg.to_json()):
        raise ValueError(f"{out_dir} holds draws of another recipe; use another folder or delete it")
    if not recipe_file.exists():
        recipe_file.write_text(cfg.to_json())
    return cfg, out_dir


def build_draws(cfg: DrawConfig | str = "train", out_dir=None, *, limit: int | None = None,
                progress=None) -> list[Path]:
    """Simulate the draws of ``cfg`` that are not on disk yet (resumable, several processes may share it).

    Parameters
    ----------
    cfg : a DrawConfig or a name in ``DRAW_PROFILES``.
    out_dir : folder of the draw files (default ``default_draws_dir(profile)``).
    limit : stop after simulating this many draws (None = all).
    progress : optional ``progress(fraction, message)`` over the whole library.

    Returns
    -------
    Paths of the draws this call simulated.
    """
    cfg, out_dir = prepare_draws_dir(cfg, out_dir)
    jobs = cfg.jobs()
    made: list[Path] = []
    t0 = time.perf_counter()
    for role, index in jobs:
        path = _draw_path(out_dir, role, index)
        if path.exists() or not _claim(path):
            continue
        try:
            if path.exists():
                continue
            t1 = time.perf_counter()
            nu = draw_nuisance(cfg, role, index)
            sim = cfg.sim_config(role)
            pats = np.stack([simulate_cell_scan(_structure_for(b, nu), sim, nu) for b in DRAW_BASES])
            _write_draw(path, pats, cfg, nu, time.perf_counter() - t1)
            made.append(path)
        finally:
            path.with_suffix(".claim").unlink(missing_ok=True)
        n_done = sum(_draw_path(out_dir, r, i).exists() for r, i in jobs)
        msg = (f"{role} draw {index}: {time.perf_counter() - t1:.0f} s; {n_done}/{len(jobs)} on disk, "
               f"{time.perf_counter() - t0:.0f} s in this process")
        log.info(msg)
        if progress is not None:
            progress(n_done / len(jobs), msg)
        if limit is not None and len(made) >= limit:
            break
    return made


@dataclass
class DrawLibrary:
    """Finished draws of one library folder.

    ``base[role]`` is float16 (D, 2, T, N, N, K + 1, K + 1): the stored patterns of the two simulated base
    variants (``DRAW_BASES``) times ``scale``, K + 1 odd with the optical axis at the centre pixel;
    ``nuisance[role]`` the draws' parameters (a DataFrame); ``thickness_nm[role]`` the thicknesses [nm] of
    that role. :meth:`expanded` gives all 8 classes with exact probe-position bookkeeping;
    :data:`QUARTER_TURN_CLASS` maps (base, quarter turns) to the class index for fast sampling.
    """

    base: dict
    nuisance: dict
    thickness_nm: dict
    meta: dict
    sha256: str
    path: str
    scale: float = 1e4

    def roles(self) -> list[str]:
        return [r for r in ROLES if r in self.base and len(self.base[r])]

    def n_draws(self, role: str) -> int:
        return len(self.base[role]) if role in self.base else 0

    @property
    def positions(self) -> int:
        return int(next(iter(self.base.values())).shape[3])

    @property
    def size(self) -> int:
        """Pattern side after expansion [px] (even; the optical axis at size // 2)."""
        return int(next(iter(self.base.values())).shape[-1]) - 1

    def thickness_index(self, role: str, thickness_nm: float) -> int:
        t = self.thickness_nm[role]
        i = int(np.argmin(np.abs(t - float(thickness_nm))))
        if abs(float(t[i]) - float(thickness_nm)) > 1e-3:
            raise ValueError(f"no {role} draws at {thickness_nm} nm; thicknesses: {t.tolist()}")
        return i

    def expanded(self, role: str, thickness_nm: float, draws=None) -> np.ndarray:
        """float32 (D, 8, N, N, K, K) of one thickness: every class, probe positions in the scan frame
        (position (0, 0) on the A site), intensities as fractions of the incident probe."""
        ti = self.thickness_index(role, thickness_nm)
        arr = self.base[role][:, :, ti] if draws is None else self.base[role][np.asarray(draws)][:, :, ti]
        D, _, N, _, K1, _ = arr.shape
        out = np.empty((D, 8, N, N, K1 - 1, K1 - 1), np.float32)
        for b in range(len(DRAW_BASES)):
            a = arr[:, b].astype(np.float32) / self.scale
            for q in range(4):
                out[:, QUARTER_TURN_CLASS[b][q]] = rotate_entry(a, q)[..., :-1, :-1]
        return out


#: class index of base variant b turned counter-clockwise by q quarter turns
QUARTER_TURN_CLASS = tuple(tuple(variant_class(rotate_vector_ccw(b, q)) for q in range(4)) for b in DRAW_BASES)


def load_draws(path=None, roles=None, max_draws: dict | None = None) -> DrawLibrary:
    """Read the finished draws of a library folder (draws are stored float16 as simulated, not expanded).

    Parameters
    ----------
    path : the folder (default ``default_draws_dir('train')``).
    roles : roles to load (default all).
    max_draws : role -> at most this many draws (the lowest indices), e.g. for curves against draw count.
    """
    import h5py
    import hdf5plugin  # noqa: F401
    import pandas as pd

    path = Path(path) if path is not None else default_draws_dir("train")
    recipe_file = path / "recipe.json"
    if not recipe_file.exists():
        raise FileNotFoundError(f"{path}: no draw library (build it with `python -m polcore simulate library "
                                f"--profile train`)")
    recipe = json.loads(recipe_file.read_text())
    base, nuis, thick = {}, {}, {}
    h = hashlib.sha256(recipe_file.read_bytes())
    scale = float(recipe.get("scale", 1e4))
    for role in roles or ROLES:
        files = sorted(path.glob(f"{role}_[0-9][0-9][0-9][0-9].h5"))
        if max_draws and role in max_draws:
            files = files[: max_draws[role]]
        arrs, rows = [], []
        for p in files:
            with h5py.File(p, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise ValueError(f"{p}: not a polbench draw (format {f.attrs.get('format')!r})")
                arrs.append(f["patterns"][()])
                rows.append({**json.loads(f.attrs["nuisance"]), "seconds": float(f.attrs["seconds"]),
                             "file": p.name})
            h.update(p.name.encode())
            h.update(p.read_bytes())
        if not arrs:
            continue
        base[role] = np.stack(arrs)
        nuis[role] = pd.DataFrame(rows)
        tl = recipe["ideal_thickness_nm"] if role.startswith("ideal") else recipe["thickness_nm"]
        thick[role] = np.asarray(tl, np.float32)
    cfg = DrawConfig(**{k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list)
                            else v) for k, v in recipe.items()})
    meta = dict(voltage_kv=cfg.voltage_kv, convergence_mrad=cfg.convergence_mrad, lattice_A=LATTICE_A,
                mrad_per_px=mrad_per_px(cfg.sim_config("train")), profile=cfg.profile, recipe=recipe)
    return DrawLibrary(base=base, nuisance=nuis, thickness_nm=thick, meta=meta, sha256=h.hexdigest(),
                       path=str(path), scale=scale)

"""KNN ((K,Na)NbO3) supercells with a polarization variant, nuisances and defects.

Frame: x to the right, y down (rows of the displayed scan and pattern), z along the beam. This is the frame
of ase/abTEM *after* the (x, y) -> (row = y, col = x) transpose that polcore applies to abTEM output, so a
polarization P = (P_x, P_y, P_z) here is the same vector in ase coordinates. On screen the polarization
angle is ``atan2(-P_y, P_x)`` (counter-clockwise), see :mod:`polcore.types`.

Lengths are in Angstrom [A] (ase convention); displacements in [A].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from polcore.types import angle_to_class, polarization_angle

__all__ = [
    "LATTICE_A",
    "VARIANTS",
    "BASE_VARIANTS",
    "variant_class",
    "rotate_vector_ccw",
    "StructureParams",
    "knn_supercell",
]

#: Pseudo-cubic lattice constant of KNN [A] (cubic metric, PHYSICS.md).
LATTICE_A = 3.95


def rotate_vector_ccw(v, quarter_turns: int = 1) -> np.ndarray:
    """Rotate a (x, y_down, z) vector counter-clockwise on screen by 90 deg * quarter_turns.

    On screen (y down) a counter-clockwise quarter turn maps (x, y) -> (y, -x); z is unchanged.
    """
    v = np.array(v, dtype=float)
    for _ in range(quarter_turns % 4):
        v = np.array([v[1], -v[0], v[2]])
    return v


#: The three symmetry-independent variants that are simulated; the other nine follow by quarter turns.
#: RU in-plane (+x, -y), RM with +z, RM with -z.
BASE_VARIANTS: tuple[tuple[int, int, int], ...] = ((1, -1, 0), (1, 0, 1), (1, 0, -1))


def _variant_table() -> list[tuple[tuple[int, int, int], int, int]]:
    """(vector, base index, quarter turns) for the 12 <110> variants, ordered base-major."""
    out = []
    for b, base in enumerate(BASE_VARIANTS):
        for q in range(4):
            v = tuple(int(round(c)) for c in rotate_vector_ccw(base, q))
            out.append((v, b, q))
    return out


#: All 12 pseudo-cubic <110> variants as (vector, base index, quarter turns); index = 4 * base + turns.
VARIANTS = _variant_table()
assert sorted(v for v, _, _ in VARIANTS) == sorted(
    v for v in itertools.product((-1, 0, 1), repeat=3) if sum(abs(c) for c in v) == 2
)


def variant_class(vector) -> int:
    """Projected class index (0..7) of a polarization vector (x, y_down, z); -1 if it has no in-plane part."""
    v = np.asarray(vector, dtype=float)
    if np.hypot(v[0], v[1]) < 1e-9:
        return -1
    return int(angle_to_class(polarization_angle(v[0], v[1])))


@dataclass(frozen=True)
class StructureParams:
    """Parameters of one KNN supercell.

    Attributes
    ----------
    polarization : (x, y_down, z) direction of P (need not be normalised); (0, 0, 0) is non-polar.
    nb_disp_A : Nb displacement along P [A] (0.10-0.20 in KNN).
    o_disp_A : O displacement along P [A] (negative: opposite to Nb).
    cells_xy : lateral supercell size in unit cells (square).
    cells_z : number of unit cells along the beam (thickness = cells_z * a).
    na_fraction : fraction of A sites occupied by Na (random, seeded); the rest K.
    disorder_seed : seed of the K/Na arrangement.
    defect : None, "o_vacancy" (O column of the centre cell at (1/2, 0) partly emptied, neighbouring
        Nb pushed away from it) or "nonpolar" (handled by polarization = 0).
    vacancy_fraction : fraction of O atoms removed from the defect column.
    vacancy_nb_shift_A : displacement of the two Nb columns next to the vacancy column, away from it [A].
    lattice_A : pseudo-cubic lattice constant [A].
    """

    polarization: tuple[float, float, float] = (1, -1, 0)
    nb_disp_A: float = 0.15
    o_disp_A: float = -0.05
    cells_xy: int = 5
    cells_z: int = 127
    na_fraction: float = 0.5
    disorder_seed: int = 0
    defect: str | None = None
    vacancy_fraction: float = 0.3
    vacancy_nb_shift_A: float = 0.15
    lattice_A: float = LATTICE_A

    def __post_init__(self):
        if self.cells_xy < 3 or self.cells_z < 1:
            raise ValueError(f"cells_xy must be >= 3 and cells_z >= 1, got {self.cells_xy}, {self.cells_z}")
        if not 0 <= self.na_fraction <= 1:
            raise ValueError(f"na_fraction must be in [0, 1], got {self.na_fraction}")
        if self.defect not in (None, "o_vacancy", "nonpolar"):
            raise ValueError(f"defect must be None, 'o_vacancy' or 'nonpolar', got {self.defect!r}")


def knn_supercell(p: StructureParams):
    """Build the ase.Atoms supercell; the centre cell's A site sits at (c, c) with c = (cells_xy // 2) * a.

    Returns
    -------
    atoms : ase.Atoms with a periodic orthogonal cell (cells_xy a, cells_xy a, cells_z a).
    """
    from ase import Atoms

    a = p.lattice_A
    n, nz = p.cells_xy, p.cells_z
    P = np.asarray(p.polarization, dtype=float)
    norm = np.linalg.norm(P)
    u = P / norm if norm > 0 else np.zeros(3)
    rng = np.random.default_rng(p.disorder_seed)

    ix, iy, iz = np.meshgrid(np.arange(n), np.arange(n), np.arange(nz), indexing="ij")
    cell_origin = np.stack([ix.ravel(), iy.ravel(), iz.ravel()], axis=1).astype(float) * a
    n_cells = len(cell_origin)

    a_sites = cell_origin.copy()
    is_na = rng.random(n_cells) < p.na_fraction
    a_symbols = np.where(is_na, "Na", "K")

    nb = cell_origin + a * 0.5 + p.nb_disp_A * u
    o_frac = np.array([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
    o = (cell_origin[:, None, :] + a * o_frac[None]).reshape(-1, 3) + p.o_disp_A * u
    o_cell = np.repeat(np.arange(n_cells), 3)
    o_kind = np.tile(np.arange(3), n_cells)

    keep_o = np.ones(len(o), dtype=bool)
    if p.defect == "o_vacancy":
        c = n // 2
        centre = (ix.ravel() == c) & (iy.ravel() == c)
        # O of kind 1 sits at (1/2, 0) in projection: the column between Nb (1/2, 1/2) and Nb (1/2, -1/2).
        col = centre[o_cell] & (o_kind == 1)
        idx = np.flatnonzero(col)
        drop = idx[rng.random(len(idx)) < p.vacancy_fraction]
        keep_o[drop] = False
        # Nb of the centre cell (at +y of the vacancy column) moves +y; Nb of the cell above (-y) moves -y.
        above = (ix.ravel() == c) & (iy.ravel() == (c - 1) % n)
        nb[centre, 1] += p.vacancy_nb_shift_A
        nb[above, 1] -= p.vacancy_nb_shift_A

    positions = np.concatenate([a_sites, nb, o[keep_o]])
    symbols = list(a_symbols) + ["Nb"] * n_cells + ["O"] * int(keep_o.sum())
    atoms = Atoms(symbols=symbols, positions=positions, cell=[n * a, n * a, nz * a], pbc=True)
    atoms.wrap()
    return atoms

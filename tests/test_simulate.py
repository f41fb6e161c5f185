"""Physics and bookkeeping of polcore.simulate: real (tiny) abTEM simulations, run in seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polcore.simulate.build import PROFILES, _structure_for, simulate_cell_scan
from polcore.simulate.library import rotate_entry
from polcore.simulate.structure import (
    VARIANTS,
    StructureParams,
    knn_supercell,
    rotate_vector_ccw,
    variant_class,
)
from polcore.types import CLASS_NAMES, class_to_vector

pytest.importorskip("abtem")

STATIC = dict(phonon_seed=0, tilt_x_mrad=0.0, tilt_y_mrad=0.0, nb_disp_A=0.15, o_disp_A=-0.05,
              convergence_mrad=24.0, defocus_A=0.0, na_fraction=0.0, disorder_seed=0)


@pytest.fixture(scope="module")
def static_cfg():
    return dataclasses.replace(PROFILES["tiny"], phonon_snapshots=0)


def test_variants_project_onto_eight_classes():
    classes = [variant_class(v) for v, _, _ in VARIANTS]
    counts = np.bincount(classes, minlength=8)
    # diagonal classes come from one in-plane variant each, axial classes from two (+z and -z)
    assert counts.tolist() == [2, 1, 2, 1, 2, 1, 2, 1]
    assert variant_class((1, -1, 0)) == CLASS_NAMES.index("RU")  # +x and towards row 0
    assert variant_class((0, 1, 1)) == CLASS_NAMES.index("MD")
    assert variant_class((0, 0, 1)) == -1


def test_supercell_has_polar_displacements_and_vacancy():
    p = StructureParams(polarization=(1, -1, 0), cells_xy=3, cells_z=2, nb_disp_A=0.2)
    atoms = knn_supercell(p)
    nb = atoms.positions[np.array(atoms.get_chemical_symbols()) == "Nb"]
    frac = (nb / 3.95) % 1.0
    # Nb shifted by 0.2 A along (1, -1)/sqrt(2): +x and -y from the cell centre
    d = (frac[:, :2] - 0.5) * 3.95
    np.testing.assert_allclose(d[:, 0], 0.2 / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(d[:, 1], -0.2 / np.sqrt(2), atol=1e-6)
    vac = knn_supercell(dataclasses.replace(p, defect="o_vacancy", vacancy_fraction=1.0, cells_z=4))
    full = knn_supercell(dataclasses.replace(p, cells_z=4))
    n_o = lambda a: sum(s == "O" for s in a.get_chemical_symbols())  # noqa: E731
    assert n_o(full) - n_o(vac) == 4  # the whole column of 4 cells emptied


def test_dask_scheduler_pitfall_is_guarded():
    """abTEM 1.0.11 with FrozenPhonons + exit planes under the threaded scheduler returned partly-zero series."""
    import dask

    cfg = PROFILES["tiny"]
    pats = simulate_cell_scan(_structure_for((1, -1, 0), STATIC), cfg, {**STATIC, "phonon_seed": 3})
    assert dask.config.get("scheduler") == "synchronous"
    assert pats.shape == (2, 4, 4, cfg.crop, cfg.crop)
    sums = pats.sum(axis=(-1, -2))
    assert np.all(sums > 0.5) and np.all(sums <= 1.01)  # every thickness and position carries the beam
    assert np.linalg.norm(pats[0] - pats[1]) > 0.05 * np.linalg.norm(pats[0])  # thicknesses differ


def test_symmetry_shortcut_is_exact(static_cfg):
    """Quarter turns of patterns + probe positions equal direct simulations of the turned structure."""
    base = simulate_cell_scan(_structure_for((1, -1, 0), STATIC), static_cfg, STATIC)
    for q in (1, 2):
        v = rotate_vector_ccw((1, -1, 0), q)
        direct = simulate_cell_scan(_structure_for(v, STATIC), static_cfg, STATIC)
        turned = rotate_entry(base, q)
        assert np.abs(direct - turned).max() < 1e-4 * direct.max()
        assert np.abs(direct - base).max() > 0.05 * direct.max()  # and the variants do differ


def test_opposite_polarizations_differ_at_nb_o_column_not_on_average(static_cfg):
    ru = simulate_cell_scan(_structure_for((1, -1, 0), STATIC), static_cfg, STATIC)[-1]
    ld = simulate_cell_scan(_structure_for((-1, 1, 0), STATIC), static_cfg, STATIC)[-1]
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(a)  # noqa: E731
    nb_o = rel(ru[2, 2], ld[2, 2])  # probe at (1/2, 1/2): the Nb-O column
    a_site = rel(ru[0, 0], ld[0, 0])
    averaged = rel(ru.mean(axis=(0, 1)), ld.mean(axis=(0, 1)))
    assert nb_o > 0.3
    assert nb_o > 3 * averaged and nb_o > 3 * a_site


def test_library_round_trip_and_select(tiny_library):
    lib = tiny_library
    assert lib.patterns.shape[:2] == (12, 4)  # 2 configurations at every thickness + 2 extra training ones
    assert lib.available.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert lib.patterns.shape[-1] % 2 == 0
    assert sorted(set(lib.variant_class.tolist())) == list(range(8))
    X, y, info = lib.select("train")
    assert len(X) == len(y) == len(info) == 12 * 16 * (2 + 1 + 1)
    assert set(info["role"]) == {"train"}
    assert np.all(X.reshape(len(X), -1).sum(axis=1) > 0)  # never an unsimulated (zero) entry
    X8, _, info8 = lib.select("train", thickness=8.0)
    assert len(X8) == 12 * 16 * 3 and set(info8["config"]) == {0, 2, 3}
    np.testing.assert_array_equal(y, lib.variant_class[info["variant"]])
    with pytest.raises(ValueError, match="unknown split"):
        lib.select("holdout")
    assert lib.meta["mrad_per_px"] > 0 and len(lib.sha256) == 64
    assert "nonpolar" in lib.defects and lib.defect_class["nonpolar"].tolist() == [-1]


def test_ru_display_vector_points_right_up():
    vx, vy = class_to_vector(CLASS_NAMES.index("RU"))
    assert vx > 0 and vy > 0  # counter-clockwise frame: up on screen is +sin

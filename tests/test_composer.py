"""Scan composer: ground truth, layouts, detector effects, and the file round trip through polcore.io."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polcore.simulate.composer import LAYOUTS, ScanComposerConfig, compose_scan, write_emd
from polcore.types import CLASS_NAMES

pytest.importorskip("abtem")


def _compose(lib, **kw):
    base = dict(ny=16, nx=12, roles=("val",), det_px=lib.size, thickness_nm=float(lib.thickness_nm[-1]))
    cfg = ScanComposerConfig(**{**base, **kw})
    truth, blocks = compose_scan(cfg, lib, block_rows=5)
    data = np.concatenate([b for _, b in blocks], axis=0)
    return cfg, truth, data


def test_ground_truth_matches_library_entries(tiny_library):
    lib = tiny_library
    N = lib.patterns.shape[3]
    c_val = int(np.flatnonzero(lib.configs["role"] == "val")[0])
    cfg, truth, data = _compose(lib, layout="stripes", domain_cells=1, seed=5)
    assert data.shape == (16, 12, lib.size, lib.size)
    t = len(lib.thickness_nm) - 1
    for iy, ix in [(0, 0), (3, 5), (15, 11), (7, 2)]:
        v = int(truth["variant"][iy, ix])
        assert truth["label"][iy, ix] == lib.variant_class[v]
        np.testing.assert_allclose(data[iy, ix], lib.patterns[v, c_val, t, iy % N, ix % N], rtol=1e-5, atol=1e-7)
    assert truth["cell_px"] == pytest.approx(N)


def test_ru_survives_composer_file_and_reader(tiny_library, tmp_path):
    """A pattern simulated for RU stays RU through the composer, an EMD file and polcore.io."""
    from polcore.io import open_scan, read_ground_truth

    lib = tiny_library
    ru = CLASS_NAMES.index("RU")
    v_ru = int(np.flatnonzero(lib.variant_class == ru)[0])
    assert tuple(lib.variant_vector[v_ru][:2]) == (1, -1)  # +x, and -y = towards row 0
    cfg, truth, _ = _compose(lib, layout="single", variants=(v_ru,))
    truth2, blocks = compose_scan(cfg, lib)
    path = write_emd(tmp_path / "ru.h5", truth2, blocks, cfg)
    scan = open_scan(path)
    assert scan.nav_shape == (16, 12) and scan.sig_shape == (lib.size, lib.size)
    gt = read_ground_truth(path)
    assert np.all(gt["label"] == ru)
    c_val = int(np.flatnonzero(lib.configs["role"] == "val")[0])
    N = lib.patterns.shape[3]
    np.testing.assert_allclose(scan.pattern(2, 3), lib.patterns[v_ru, c_val, -1, 2 % N, 3 % N], rtol=1e-5, atol=1e-7)
    assert scan.meta.step_nm == pytest.approx(truth2["step_nm"])
    assert scan.meta.mrad_per_px == pytest.approx(lib.meta["mrad_per_px"], rel=1e-6)
    assert scan.meta.voltage_kv == pytest.approx(200.0)
    assert scan.meta.convergence_mrad == pytest.approx(lib.meta["convergence_mrad"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_writes_a_readable_file(tiny_library, tmp_path, layout):
    from polcore.io import open_scan, read_ground_truth

    cfg = ScanComposerConfig(layout=layout, ny=20, nx=24, roles=("val",), thickness_range=(4.0, 8.0), defects=2,
                             defect_types=("nonpolar",), dose=2e4, blur_px=0.7, background=0.05, descan_px=2,
                             hot_pixels=2, det_px=48, det_mrad_per_px=1.6, seed=11, n_domains=3)
    truth, blocks = compose_scan(cfg, tiny_library)
    path = write_emd(tmp_path / f"{layout}.h5", truth, blocks, cfg)
    scan = open_scan(path)
    assert scan.nav_shape == (20, 24) and scan.sig_shape == (48, 48)
    assert np.dtype(scan.dtype) == np.uint16
    gt = read_ground_truth(path)
    assert gt["defect"].any() and np.all(gt["label"][gt["defect"]] == -1)  # non-polar defects carry no class
    assert np.all(np.diff(gt["thickness_nm"], axis=1) >= 0)  # wedge along x
    _, batch = next(iter(scan.iter_batches(24)))
    hot = np.all(batch >= 4000, axis=0)  # hot pixels saturate in every frame
    assert 1 <= hot.sum() <= 2
    counts = batch[:, ~hot].sum(axis=1)
    assert abs(float(counts.mean()) / (2e4 * 1.05) - 1) < 0.1  # dose + 5 % background
    composer = json.loads(truth["composer"])
    assert composer["layout"] == layout


def test_walls_and_incommensurate_steps(tiny_library):
    lib = tiny_library
    _, t90, _ = _compose(lib, layout="stripes", wall="90", domain_cells=1, nx=24)
    _, t180, _ = _compose(lib, layout="checker", wall="180", domain_cells=1, nx=24)
    d90 = {int(v) for v in np.unique(t90["label"])}
    d180 = {int(v) for v in np.unique(t180["label"])}
    assert len(d90) == 2 and (max(d90) - min(d90)) % 8 in (2, 6)  # 90 degrees apart
    assert len(d180) == 2 and (max(d180) - min(d180)) % 8 == 4  # opposite
    a_nm = lib.meta["lattice_A"] / 10
    step = a_nm / 5.5  # 5.5 positions per cell: incommensurate with the 4x4 library grid
    _, truth, data = _compose(lib, layout="single", step_nm=step)
    assert truth["cell_px"] == pytest.approx(5.5)
    assert np.all(np.isfinite(data)) and data.sum(axis=(2, 3)).min() > 0.5
    # positions whose intra-cell coordinate falls on the library grid reproduce it exactly
    c_val = int(np.flatnonzero(lib.configs["role"] == "val")[0])
    v = int(truth["variant"][0, 0])
    np.testing.assert_allclose(data[0, 0], lib.patterns[v, c_val, -1, 0, 0], rtol=1e-5, atol=1e-7)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown layout"):
        ScanComposerConfig(layout="spiral")
    with pytest.raises(ValueError, match="dose"):
        ScanComposerConfig(dose=-1)

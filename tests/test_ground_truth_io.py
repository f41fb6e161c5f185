"""Ground-truth I/O (polcore.io.ground_truth): one writer, one reader, attributes; nothing outside the file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from polcore.io import ScanFormatError
from polcore.io import read_ground_truth as read_from_package
from polcore.io.ground_truth import ground_truth_attrs, read_ground_truth, write_ground_truth


def _truth(rng, shape=(3, 4)):
    return dict(
        label=rng.integers(-1, 8, shape),
        thickness_nm=rng.random(shape) * 40,
        defect=rng.random(shape) > 0.7,
        region=rng.integers(0, 5, shape),
        variant=rng.integers(-1, 12, shape),
        step_nm=0.1,  # not a map: ignored by the writer
    )


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    truth = _truth(rng)
    path = tmp_path / "gt.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros((3, 4, 2, 2), np.float32)
        write_ground_truth(f, truth, dict(cell_px=2.5, step_nm=0.158, library_sha256="ab" * 32, n=3))
    gt = read_ground_truth(path)
    assert set(gt) == {"label", "thickness_nm", "defect", "region"}
    assert gt["label"].dtype == np.int8 and gt["thickness_nm"].dtype == np.float32 and gt["defect"].dtype == bool
    np.testing.assert_array_equal(gt["label"], truth["label"])
    np.testing.assert_allclose(gt["thickness_nm"], truth["thickness_nm"], rtol=1e-6)
    np.testing.assert_array_equal(gt["defect"], truth["defect"])
    np.testing.assert_array_equal(gt["region"], truth["region"])
    with h5py.File(path, "r") as f:
        assert f["ground_truth/variant"].dtype == np.int8 and f["ground_truth/region"].dtype == np.int16
        assert "step_nm" not in f["ground_truth"]
    attrs = ground_truth_attrs(path)
    assert attrs == {"cell_px": 2.5, "step_nm": 0.158, "library_sha256": "ab" * 32, "n": 3.0}
    assert all(type(v) in (float, str) for v in attrs.values())
    # the package-level name is the same reader
    assert read_from_package is read_ground_truth


def test_writer_refuses_incomplete_or_mismatched_maps(tmp_path):
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        with pytest.raises(ValueError, match="lacks"):
            write_ground_truth(f, {"label": np.zeros((2, 2))}, {})
        bad = {**_truth(rng), "defect": np.zeros((2, 2), bool)}
        with pytest.raises(ValueError, match="one 2D shape"):
            write_ground_truth(f, bad, {})


def test_no_group_and_non_hdf5(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = np.zeros((2, 2, 2, 2))
    assert read_ground_truth(plain) is None and ground_truth_attrs(plain) == {}
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 2, 2, 2)))
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    for p in (npy, text):
        assert read_ground_truth(p) is None
        assert ground_truth_attrs(p) == {}
    assert ground_truth_attrs(tmp_path / "missing.h5") == {}
    with pytest.raises(ScanFormatError, match="not found"):
        read_ground_truth(tmp_path / "missing.h5")


def test_links_outside_the_file_are_not_followed(tmp_path):
    rng = np.random.default_rng(2)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        write_ground_truth(f, _truth(rng), dict(cell_px=9.0))
    linked_group = tmp_path / "linked_group.h5"
    with h5py.File(linked_group, "w") as f:
        f["ground_truth"] = h5py.ExternalLink(other.name, "/ground_truth")
    with pytest.raises(ScanFormatError, match="link"):
        read_ground_truth(linked_group)
    assert ground_truth_attrs(linked_group) == {}
    linked_map = tmp_path / "linked_map.h5"
    with h5py.File(linked_map, "w") as f:
        g = f.create_group("ground_truth")
        g["label"] = np.zeros((3, 4), np.int8)
        g["thickness_nm"] = h5py.ExternalLink(other.name, "/ground_truth/thickness_nm")
        g["defect"] = np.zeros((3, 4), bool)
    with pytest.raises(ScanFormatError, match="not datasets stored in this file"):
        read_ground_truth(linked_map)

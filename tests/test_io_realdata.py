"""polcore.io on real instrument and software files (../shared/realdata, see its README.md).

Each file opens with the documented (scan_y, scan_x, ky, kx) shape, or is refused with a message naming the
file and the reason. Orientation is checked against the raw bytes / raw HDF5 arrays read independently
here, not against the reader's own output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from polcore.io import ArinaScan, HDF5Scan, MibScan, ScanFormatError, open_scan
from polcore.io.calibration import electron_wavelength_A

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

pytestmark = pytest.mark.skipif(
    not REALDATA.is_dir(), reason=f"real detector files not found at {REALDATA} (shared test data folder)"
)

HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None

# file -> (scan_y, scan_x, ky, kx) as documented in the README
EXPECTED = {
    "001_4x2_6bit.mib": (2, 4, 256, 256),
    "001_4x2_6bit.hdr": (2, 4, 256, 256),
    "002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.mib": (2, 4, 128, 256),
    "Quad_9_Frame_CounterDepth_12_Rows_256.mib": (3, 3, 512, 512),
    "py4DSTEM_size2x3x4x5.h5": (2, 3, 4, 5),
    "Si100_4D.emd": (11, 11, 8, 8),
    "test_00_master.h5": (4, 4, 192, 192),
    "test_00.h5": (4, 4, 192, 192),
    "test_00_data_000001.h5": (4, 4, 192, 192),
    "test1.blo": (3, 2, 144, 144),
}


def _all(scan, batch_size=3):
    return np.concatenate([p for _, p in scan.iter_batches(batch_size)]).reshape(scan.shape)


def _raw_mib_frames(path: Path, head: int, h: int, w: int, dtype: str) -> np.ndarray:
    """Frames in file order, rows as stored, read straight from the bytes."""
    frame = np.dtype([("header", f"S{head}"), ("data", dtype, (h, w))])
    return np.fromfile(path, dtype=frame)["data"]


def test_every_listed_file_is_covered():
    listed = {p.name for p in REALDATA.iterdir() if p.suffix != ".md"}
    assert listed <= set(EXPECTED) | {
        "002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.hdr",
        "Quad_9_Frame_CounterDepth_12_Rows_256.hdr",
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_opens_with_documented_shape_or_clear_refusal(name):
    path = REALDATA / name
    if name == "test1.blo" and not HAS_SKIMAGE:
        with pytest.raises(ScanFormatError) as e:
            open_scan(path)
        assert str(path) in str(e.value) and "scikit-image" in str(e.value)
        return
    scan = open_scan(path)
    assert scan.shape == EXPECTED[name]
    n = 0
    for pos, pats in scan.iter_batches(5):
        assert pats.shape[1:] == scan.sig_shape and pats.dtype == scan.dtype
        n += len(pos)
    assert n == scan.n_patterns and scan.nonfinite_count == 0


def test_merlin_hot_pixel_orientation_and_raster_order():
    path = REALDATA / "002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.mib"
    scan = open_scan(path)
    assert isinstance(scan, MibScan) and scan.dtype == np.uint16
    assert scan.meta.extra["nav_shape_source"].endswith("ScanY/ScanX")
    data = _all(scan)
    total = data.sum(axis=(0, 1), dtype=np.int64)
    ky, kx = np.unravel_index(np.argmax(total), total.shape)
    # "52x 39y": column 52, row 39 counted from the bottom (RosettaSciIO orientation) = 88 from the top
    assert (ky, kx) == (scan.sig_shape[0] - 1 - 39, 52)
    assert total[ky, kx] > 5 * np.sort(total.ravel())[-2]
    # in the file the frame rows are stored bottom-up: row 39 of the stored frame
    raw = _raw_mib_frames(path, 384, 128, 256, ">u2")
    assert np.argmax(raw.sum(axis=0)) == 39 * 256 + 52
    for k in range(8):  # frame k of the file is probe position (k // 4, k % 4), flipped vertically
        np.testing.assert_array_equal(scan.pattern(k // 4, k % 4), raw[k][::-1])


@pytest.mark.parametrize(
    "name,head,h,w,dtype",
    [
        ("001_4x2_6bit.mib", 384, 256, 256, ">u1"),
        ("Quad_9_Frame_CounterDepth_12_Rows_256.mib", 768, 512, 512, ">u2"),
    ],
)
def test_merlin_frames_match_raw_bytes(name, head, h, w, dtype):
    path = REALDATA / name
    scan = open_scan(path)
    raw = _raw_mib_frames(path, head, h, w, dtype)
    assert len(raw) == scan.n_patterns
    data = _all(scan, batch_size=2).reshape(-1, h, w)
    np.testing.assert_array_equal(data, raw[:, ::-1, :])
    if name.startswith("Quad"):
        assert "square" in scan.meta.extra["nav_shape_source"]
        assert scan.meta.extra["assembly"] == "2x2"


def test_merlin_nav_shape_override():
    path = REALDATA / "001_4x2_6bit.mib"
    scan = open_scan(path, nav_shape=(4, 2))
    assert scan.shape == (4, 2, 256, 256)
    raw = _raw_mib_frames(path, 384, 256, 256, ">u1")
    np.testing.assert_array_equal(scan.pattern(3, 1), raw[7][::-1])
    with pytest.raises(ScanFormatError, match="needs 9 frames, file has 8"):
        open_scan(path, nav_shape=(3, 3))


def test_py4dstem_emd1_values_order_and_calibration():
    path = REALDATA / "py4DSTEM_size2x3x4x5.h5"
    scan = open_scan(path)
    assert isinstance(scan, HDF5Scan) and scan.dataset == "datacube_root/datacube/data"
    with h5py.File(path, "r") as f:
        ref = f["datacube_root/datacube/data"][()]
    np.testing.assert_array_equal(_all(scan, 4), ref)
    np.testing.assert_array_equal(scan.pattern(1, 2), ref[1, 2])
    m = scan.meta
    assert m.step_nm == pytest.approx(0.126796875)
    assert m.flip is False
    # Q in A^-1 and no voltage in the file: kept, not converted
    assert m.mrad_per_px is None
    assert m.extra["Q_pixel_units"] == "A^-1" and m.extra["Q_pixel_size"] == pytest.approx(0.0442515666)


def test_prismatic_depths_values_and_calibration():
    path = REALDATA / "Si100_4D.emd"
    base = "4DSTEM_simulation/data/datacubes/CBED_array_depth%04d/datacube"
    with h5py.File(path, "r") as f:
        d0, d1 = f[base % 0][()], f[base % 1][()]
    scan = open_scan(path)
    assert scan.dataset == base % 1 and scan.meta.extra["prismatic_depth_index"] == 1
    np.testing.assert_array_equal(_all(scan, 7), d1)
    first = open_scan(path, dataset="CBED_array_depth0000")
    np.testing.assert_array_equal(_all(first, 7), d0)
    # scan and detector axes stay paired: the Si [100] simulation is symmetric under swapping x and y, so
    # pattern(iy, ix) must be the transpose of pattern(ix, iy) -- a reader that transposed only one pair fails
    np.testing.assert_allclose(scan.pattern(0, 5), scan.pattern(5, 0).T, rtol=1e-5, atol=1e-7)
    assert not np.allclose(scan.pattern(0, 5), scan.pattern(5, 0))
    m = scan.meta
    assert m.voltage_kv == pytest.approx(100.0) and m.convergence_mrad == pytest.approx(30.0)
    assert m.step_nm == pytest.approx(0.05)  # 0.5 Å probe step (Prismatic writes Å under a "[n_m]" label)
    assert m.mrad_per_px == pytest.approx(electron_wavelength_A(100.0) / 5.43 * 1e3, rel=1e-4)


@pytest.mark.parametrize("name", ["test_00_master.h5", "test_00.h5", "test_00_data_000001.h5"])
def test_arina_values_and_metadata(name):
    import hdf5plugin  # noqa: F401  (bitshuffle-LZ4 for the reference read)

    scan = open_scan(REALDATA / name)
    assert isinstance(scan, ArinaScan) and scan.path.name == "test_00_master.h5"
    with h5py.File(REALDATA / "test_00_data_000001.h5", "r") as f:
        ref = f["entry/data/data"][()]
    np.testing.assert_array_equal(_all(scan, 3).reshape(16, 192, 192), ref)
    np.testing.assert_array_equal(scan.pattern(2, 1), ref[2 * 4 + 1])
    assert scan.meta.voltage_kv == pytest.approx(300.0)
    assert scan.meta.step_nm == pytest.approx(0.13915206)
    assert "NumPixelsY" in scan.meta.extra["nav_shape_source"]


@pytest.mark.skipif(not HAS_SKIMAGE, reason="RosettaSciIO's blockfile reader needs scikit-image")
def test_blockfile_values_and_metadata():
    path = REALDATA / "test1.blo"
    scan = open_scan(path)
    raw = path.read_bytes()
    off2 = int.from_bytes(raw[12:16], "little")
    frame = 6 + 144 * 144
    for k in range(6):  # frames stored in raster order after a 6-byte marker each
        start = off2 + k * frame + 6
        ref = np.frombuffer(raw[start : start + 144 * 144], dtype=np.uint8).reshape(144, 144)
        np.testing.assert_array_equal(scan.pattern(k // 2, k % 2), ref)
    assert scan.meta.step_nm == pytest.approx(12.8) and scan.meta.voltage_kv == pytest.approx(200.0)

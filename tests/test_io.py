"""polcore.io: round trips through real files written in tmp dirs (generic HDF5, EMD 1.0, Prismatic layout,
npy, ArrayScan), batching, calibration, NaN/inf policy, ground truth, hashing, import hygiene."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polcore.io import (
    SAMPLE_PATTERNS,
    ArrayScan,
    HDF5Scan,
    NpyScan,
    ScanFormatError,
    open_scan,
    read_ground_truth,
    sha256_file,
)
from polcore.io.calibration import electron_wavelength_A, reciprocal_to_mrad
from polcore.types import ScanMeta

ROOT = Path(__file__).resolve().parents[1]


def _array(rng, shape=(5, 7, 6, 4), dtype=np.float32):
    a = rng.random(shape) * 1000
    return a.astype(dtype)


def _collect(scan, batch_size):
    pos, pats = [], []
    for p, x in scan.iter_batches(batch_size):
        assert p.dtype == np.int64 and p.shape == (len(x), 2)
        assert x.shape[1:] == scan.sig_shape and x.dtype == scan.dtype
        assert len(x) <= batch_size
        pos.append(p)
        pats.append(x)
    return np.concatenate(pos), np.concatenate(pats)


def _raster(ny, nx):
    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    return np.stack([iy.ravel(), ix.ravel()], axis=1)


def _assert_same(scan, arr, batch_sizes=(1, 3, 7, 16, 1000)):
    ny, nx = arr.shape[:2]
    assert scan.nav_shape == (ny, nx) and scan.sig_shape == arr.shape[2:]
    for bs in batch_sizes:
        pos, pats = _collect(scan, bs)
        np.testing.assert_array_equal(pos, _raster(ny, nx))
        np.testing.assert_array_equal(pats, arr.reshape(ny * nx, *arr.shape[2:]))
    for iy, ix in [(0, 0), (ny - 1, nx - 1), (ny // 2, nx - 1), (ny - 1, 0)]:
        np.testing.assert_array_equal(scan.pattern(iy, ix), arr[iy, ix])


def write_emd1(path, data, *, r_size=0.25, r_units="nm", q_size=0.02, q_units="A^-1", extra_cal=None):
    """Write an EMD 1.0 file by hand, following the emdfile layout py4DSTEM writes."""
    with h5py.File(path, "w") as f:
        f.attrs.update(
            emd_group_type="file", version_major=1, version_minor=0, authoring_program="emdfile", UUID="x"
        )
        root = f.create_group("datacube_root")
        root.attrs.update(emd_group_type="root", python_class="Root")
        dc = root.create_group("datacube")
        dc.attrs.update(emd_group_type="array", python_class="DataCube")
        d = dc.create_dataset("data", data=data)
        d.attrs["units"] = "pixel intensity"
        for i, (name, step, units) in enumerate(
            [
                ("Rx", r_size, r_units),
                ("Ry", r_size, r_units),
                ("Qx", q_size, q_units),
                ("Qy", q_size, q_units),
            ]
        ):
            dim = dc.create_dataset(f"dim{i}", data=np.array([0.0, step]))
            dim.attrs.update(name=name, units=units)
        cal = root.create_group("metadatabundle").create_group("calibration")
        cal.attrs.update(emd_group_type="metadata", python_class="Calibration")
        values = {
            "R_pixel_size": r_size,
            "R_pixel_units": r_units,
            "Q_pixel_size": q_size,
            "Q_pixel_units": q_units,
            "QR_flip": False,
            **(extra_cal or {}),
        }
        for k, v in values.items():
            if isinstance(v, str):
                cal.create_dataset(k, data=v, dtype=h5py.string_dtype())
            else:
                cal.create_dataset(k, data=v)
        tp = cal.create_group("_target_paths")
        tp.create_dataset("0", data="/datacube", dtype=h5py.string_dtype())


def write_prismatic(path, depths, *, step_a=0.5, dq=0.2, energy_kv=200.0, semiangle=20.0):
    """Prismatic EMD 0.x layout: one datacube per depth, dims numbered from 1, labelled [n_m] (values Å)."""
    with h5py.File(path, "w") as f:
        sim = f.create_group("4DSTEM_simulation")
        sim.attrs.update(emd_group_type=np.int32(2), version_major=np.int32(0), version_minor=np.int32(5))
        cubes = sim.create_group("data/datacubes")
        for k, arr in enumerate(depths):
            g = cubes.create_group(f"CBED_array_depth{k:04d}")
            g.attrs.update(emd_group_type=np.int32(1), metadata=np.int32(0))
            g.create_dataset("datacube", data=arr, chunks=(1, 1) + arr.shape[2:])
            for i, (n, step, units) in enumerate(
                [
                    ("R_x", step_a, "[n_m]"),
                    ("R_y", step_a, "[n_m]"),
                    ("Q_x", dq, "[n_m^-1]"),
                    ("Q_y", dq, "[n_m^-1]"),
                ]
            ):
                dim = g.create_dataset(
                    f"dim{i + 1}", data=(np.arange(arr.shape[i]) * step).astype(np.float32)
                )
                dim.attrs.update(name=np.bytes_(n), units=np.bytes_(units))
        p = sim.create_group("metadata/metadata_0/original/simulation_parameters")
        p.attrs.update(E=np.float32(energy_kv), sa=np.float32(semiangle), rx=np.float32(step_a))


# --- round trips ------------------------------------------------------------------------------------------


def test_generic_hdf5_roundtrip_contiguous_and_chunked(tmp_path, rng):
    arr = _array(rng, (5, 7, 6, 4))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_group("a/b").create_dataset("scan", data=arr)
        f.create_dataset("image", data=arr[0, 0])  # a 2D dataset next to it does not confuse the search
    scan = open_scan(plain)
    assert isinstance(scan, HDF5Scan) and scan.dataset == "a/b/scan"
    _assert_same(scan, arr)

    chunked = tmp_path / "chunked.hdf5"
    with h5py.File(chunked, "w") as f:
        f.create_dataset("data", data=arr, chunks=(2, 3, 6, 4), compression="gzip")
    scan = open_scan(chunked)
    assert scan.chunks == (2, 3, 6, 4)
    _assert_same(scan, arr)


def test_hdf5_integer_big_endian_is_native_and_writeable(tmp_path, rng):
    arr = rng.integers(0, 4000, (3, 4, 5, 5)).astype(">u2")
    path = tmp_path / "be.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=arr)
    scan = open_scan(path)
    assert scan.dtype == np.dtype("uint16") and scan.dtype.isnative
    _, pats = _collect(scan, 5)
    assert pats.flags.writeable
    np.testing.assert_array_equal(pats, arr.reshape(12, 5, 5).astype(np.uint16))


def test_emd1_roundtrip_and_calibration(tmp_path, rng):
    arr = _array(rng, (4, 6, 8, 8))
    path = tmp_path / "emd.emd"
    write_emd1(
        path,
        arr,
        r_size=2.5,
        r_units="A",
        q_size=0.02,
        q_units="A^-1",
        extra_cal={"voltage": 200000.0, "QR_rotation_degrees": 12.5, "QR_flip": True},
    )
    scan = open_scan(path)
    assert scan.dataset == "datacube_root/datacube/data"
    _assert_same(scan, arr)
    m = scan.meta
    assert m.step_nm == pytest.approx(0.25)
    assert m.voltage_kv == pytest.approx(200.0)
    # 200 kV: lambda = 0.025079 Å; 0.02 Å^-1 * lambda = 0.50158 mrad
    assert m.mrad_per_px == pytest.approx(0.02 * 0.0250793 * 1e3, rel=1e-4)
    assert m.rotation_deg == pytest.approx(12.5) and m.flip is True
    assert "py4DSTEM" in m.source


def test_emd1_without_voltage_keeps_reciprocal_units(tmp_path, rng):
    arr = _array(rng, (2, 3, 4, 4))
    path = tmp_path / "novolt.h5"
    write_emd1(
        path, arr, r_size=0.5, r_units="nm", q_size=0.03, q_units="A^-1", extra_cal={"QR_rotation": np.pi / 2}
    )
    m = open_scan(path).meta
    assert m.step_nm == pytest.approx(0.5)
    assert m.mrad_per_px is None and m.voltage_kv is None
    assert m.extra["Q_pixel_size"] == pytest.approx(0.03) and m.extra["Q_pixel_units"] == "A^-1"
    assert m.rotation_deg == pytest.approx(90.0)  # py4DSTEM QR_rotation is in radians


def test_emd1_mrad_units_and_dims_fallback(tmp_path, rng):
    arr = _array(rng, (2, 2, 4, 4))
    path = tmp_path / "mrad.h5"
    write_emd1(path, arr, r_size=1.0, r_units="nm", q_size=0.8, q_units="mrad")
    assert open_scan(path).meta.mrad_per_px == pytest.approx(0.8)
    with h5py.File(path, "a") as f:  # without the calibration group the dim vectors are used
        del f["datacube_root/metadatabundle"]
    m = open_scan(path).meta
    assert m.step_nm == pytest.approx(1.0) and m.mrad_per_px == pytest.approx(0.8)
    assert m.source == "EMD dim vectors"


def test_prismatic_depths_default_deepest_and_choice(tmp_path, rng, caplog):
    depths = [_array(rng, (3, 4, 5, 5)) for _ in range(3)]
    path = tmp_path / "sim.emd"
    write_prismatic(path, depths, step_a=0.5, dq=0.2, energy_kv=200.0, semiangle=20.0)
    with caplog.at_level("INFO", logger="polcore.io"):
        scan = open_scan(path)
    assert scan.dataset.endswith("CBED_array_depth0002/datacube")
    assert "deepest" in caplog.text and "CBED_array_depth0002" in caplog.text
    assert scan.meta.extra["prismatic_depth_index"] == 2
    assert len(scan.meta.extra["prismatic_depths"]) == 3
    _assert_same(scan, depths[2], batch_sizes=(5, 12))
    # Prismatic's "[n_m]" labels carry Å values
    assert scan.meta.step_nm == pytest.approx(0.05)
    assert scan.meta.mrad_per_px == pytest.approx(0.2 * electron_wavelength_A(200.0) * 1e3)
    assert scan.meta.convergence_mrad == pytest.approx(20.0) and scan.meta.voltage_kv == pytest.approx(200.0)
    first = open_scan(path, dataset="CBED_array_depth0000")
    assert first.meta.extra["prismatic_depth_index"] == 0
    _assert_same(first, depths[0], batch_sizes=(4,))


def test_dataset_choice_among_several(tmp_path, rng):
    a, b = _array(rng, (2, 3, 4, 4)), _array(rng, (3, 2, 4, 4))
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("g1/scan", data=a)
        f.create_dataset("g2/scan", data=b)
    _assert_same(open_scan(path, dataset="g2/scan"), b, batch_sizes=(4,))
    _assert_same(open_scan(path, dataset="/g1/scan"), a, batch_sizes=(4,))
    _assert_same(open_scan(path, dataset="g1"), a, batch_sizes=(4,))  # a group name holding one dataset


def test_flat_stack_with_nav_shape(tmp_path, rng):
    arr = _array(rng, (3, 5, 4, 4))
    h5 = tmp_path / "flat.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("frames", data=arr.reshape(15, 4, 4))
    _assert_same(open_scan(h5, nav_shape=(3, 5)), arr)
    npy = tmp_path / "flat.npy"
    np.save(npy, arr.reshape(15, 4, 4))
    _assert_same(open_scan(npy, nav_shape=(3, 5)), arr)
    with pytest.raises(ScanFormatError, match="needs 16 frames"):
        open_scan(npy, nav_shape=(4, 4))


@pytest.mark.parametrize("order,dtype", [("C", "<f4"), ("F", "<f4"), ("C", ">u2"), ("C", "<i4")])
def test_npy_roundtrip(tmp_path, rng, order, dtype):
    arr = np.asarray(rng.integers(0, 3000, (4, 5, 6, 3)), dtype=dtype, order=order)
    arr = np.asfortranarray(arr) if order == "F" else arr
    path = tmp_path / "scan.npy"
    np.save(path, arr)
    scan = open_scan(path)
    assert isinstance(scan, NpyScan) and scan.dtype.isnative
    _assert_same(scan, arr.astype(scan.dtype))
    _, pats = _collect(scan, 6)
    pats[:] = 7  # batches are the caller's to modify
    np.testing.assert_array_equal(scan.pattern(0, 0), arr[0, 0].astype(scan.dtype))


def test_npy_extension_does_not_decide(tmp_path, rng):
    arr = _array(rng, (2, 2, 3, 3))
    odd = tmp_path / "scan.dat"
    np.save(odd, arr)  # np.save appends .npy
    odd.with_suffix(".dat.npy").rename(odd)
    _assert_same(open_scan(odd), arr, batch_sizes=(3,))
    h5_named_npy = tmp_path / "really_hdf5.npy"
    with h5py.File(h5_named_npy, "w") as f:
        f.create_dataset("d", data=arr)
    assert isinstance(open_scan(h5_named_npy), HDF5Scan)


def test_hdf5_with_user_block_is_recognised(tmp_path, rng):
    arr = _array(rng, (2, 3, 4, 4))
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f.create_dataset("d", data=arr)
    with open(path, "r+b") as fh:
        fh.write(b"text in the user block")
    _assert_same(open_scan(path), arr, batch_sizes=(5,))


def test_array_scan_copies_and_meta(rng):
    arr = _array(rng, (3, 3, 4, 4))
    meta = ScanMeta(step_nm=0.4, mrad_per_px=0.5, source="test")
    orig = arr.copy()
    scan = ArrayScan(arr, meta=meta, name="synthetic")
    assert scan.path is None and scan.name == "synthetic" and scan.meta is meta and scan.dataset is None
    _assert_same(scan, arr)
    for _, pats in scan.iter_batches(4):
        pats[:] = -5  # callers may modify batches without touching the source
    p = scan.pattern(1, 2)
    p[:] = -5
    np.testing.assert_array_equal(arr, orig)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ny=st.integers(1, 6),
    nx=st.integers(1, 7),
    batch=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_batches_cover_raster_exactly(ny, nx, batch, seed):
    arr = np.random.default_rng(seed).integers(0, 100, (ny, nx, 2, 3)).astype(np.uint16)
    scan = ArrayScan(arr)
    pos, pats = _collect(scan, batch)
    np.testing.assert_array_equal(pos, _raster(ny, nx))
    np.testing.assert_array_equal(pats, arr.reshape(-1, 2, 3))
    sizes = [len(p) for p, _ in scan.iter_batches(batch)]
    assert all(s == batch for s in sizes[:-1]) and 1 <= sizes[-1] <= batch


def test_bad_arguments(rng):
    scan = ArrayScan(_array(rng, (2, 3, 2, 2)))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            next(scan.iter_batches(bad))
    for iy, ix in [(2, 0), (0, 3), (-1, 0)]:
        with pytest.raises(IndexError, match="outside the scan"):
            scan.pattern(iy, ix)


# --- NaN / inf policy ---------------------------------------------------------------------------------------


def test_nonfinite_values_are_zeroed_and_counted(tmp_path, rng, caplog):
    arr = _array(rng, (6, 5, 4, 4))
    arr[0, 1, 0, 0] = np.nan
    arr[4, 4, 2, 3] = np.inf
    arr[5, 0, 1, :] = -np.inf
    path = tmp_path / "nan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=arr)
    with caplog.at_level("WARNING", logger="polcore.io"):
        scan = open_scan(path)
    assert "first" in caplog.text  # the open-time sample found the NaN at (0, 1)
    assert scan.nonfinite_count == 0
    clean = np.where(np.isfinite(arr), arr, 0)
    for bs in (4, 7):
        _, pats = _collect(scan, bs)
        assert scan.nonfinite_count == 6
        np.testing.assert_array_equal(pats, clean.reshape(30, 4, 4))
    assert "6 NaN/inf values replaced by 0" in caplog.text
    np.testing.assert_array_equal(scan.pattern(5, 0), clean[5, 0])


def test_all_nonfinite_first_batch_is_refused(tmp_path):
    arr = np.full((5, 5, 3, 3), np.nan, dtype=np.float32)
    arr[4, 4] = 1.0  # finite data only beyond the sample (25 patterns > SAMPLE_PATTERNS)
    assert SAMPLE_PATTERNS < 25
    path = tmp_path / "allnan.npy"
    np.save(path, arr)
    with pytest.raises(ScanFormatError, match=r"every value of the first \d+ patterns is NaN or inf") as e:
        open_scan(path)
    assert str(path) in str(e.value)
    with pytest.raises(ScanFormatError, match="NaN or inf"):
        ArrayScan(arr)


def test_nonfinite_beyond_sample_is_counted_not_refused(rng):
    arr = _array(rng, (8, 8, 2, 2))
    flat = arr.reshape(64, 2, 2)
    flat[SAMPLE_PATTERNS:] = np.nan
    scan = ArrayScan(arr)
    _, pats = _collect(scan, 10)
    assert scan.nonfinite_count == (64 - SAMPLE_PATTERNS) * 4
    assert np.all(pats[SAMPLE_PATTERNS:] == 0) and np.all(pats[:SAMPLE_PATTERNS] > 0)


# --- ground truth, hashing, helpers ------------------------------------------------------------------------


def test_read_ground_truth(tmp_path, rng):
    arr = _array(rng, (3, 4, 4, 4))
    path = tmp_path / "gt.h5"
    write_emd1(path, arr)
    assert read_ground_truth(path) is None
    label = rng.integers(-1, 8, (3, 4))
    thick = rng.random((3, 4)) * 40
    defect = rng.random((3, 4)) > 0.7
    with h5py.File(path, "a") as f:
        g = f.create_group("ground_truth")
        g["label"] = label.astype(np.int16)
        g["thickness_nm"] = thick
        g["defect"] = defect.astype(np.uint8)
    gt = read_ground_truth(path)
    assert set(gt) == {"label", "thickness_nm", "defect"}
    assert (
        gt["label"].dtype == np.int8 and gt["thickness_nm"].dtype == np.float32 and gt["defect"].dtype == bool
    )
    np.testing.assert_array_equal(gt["label"], label)
    np.testing.assert_allclose(gt["thickness_nm"], thick, rtol=1e-6)
    np.testing.assert_array_equal(gt["defect"], defect)
    with h5py.File(path, "a") as f:
        f["ground_truth/region"] = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(read_ground_truth(path)["region"], np.arange(12).reshape(3, 4))
    # the ground-truth maps are 2D and never mistaken for the scan
    assert open_scan(path).dataset == "datacube_root/datacube/data"
    with h5py.File(path, "a") as f:
        del f["ground_truth/defect"]
    with pytest.raises(ScanFormatError, match="lacks"):
        read_ground_truth(path)
    npy = tmp_path / "x.npy"
    np.save(npy, arr)
    assert read_ground_truth(npy) is None


def test_sha256_file_matches_hashlib(tmp_path, rng):
    data = rng.integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_bytes=4096) == hashlib.sha256(data).hexdigest()


def test_wavelength_and_conversions():
    assert electron_wavelength_A(200) == pytest.approx(0.025079, rel=1e-4)
    assert electron_wavelength_A(300) == pytest.approx(0.019687, rel=1e-4)
    assert reciprocal_to_mrad(1.0, "nm^-1", 200) == pytest.approx(0.1 * 0.025079 * 1e3, rel=1e-4)
    assert reciprocal_to_mrad(0.5, "pixels", 200) is None
    with pytest.raises(ValueError):
        electron_wavelength_A(0)


def test_import_does_not_pull_torch_or_streamlit():
    code = (
        "import polcore.io, sys; "
        "assert 'torch' not in sys.modules and 'streamlit' not in sys.modules, "
        "[m for m in ('torch', 'streamlit') if m in sys.modules]"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def write_arina(dirpath, frames, per_file, *, scan=None, name="acq"):
    """DECTRIS-style acquisition: master with external links to bitshuffle-LZ4 data files, STEM metadata."""
    import hdf5plugin

    names = []
    for k, start in enumerate(range(0, len(frames), per_file)):
        fname = f"{name}_data_{k + 1:06d}.h5"
        with h5py.File(dirpath / fname, "w") as f:
            f.create_dataset(
                "entry/data/data",
                data=frames[start : start + per_file],
                chunks=(1,) + frames.shape[1:],
                **hdf5plugin.Bitshuffle(cname="lz4"),
            )
        names.append(fname)
    with h5py.File(dirpath / f"{name}_master.h5", "w") as f:
        det = f.create_group("entry/instrument/detector")
        det["photon_energy"] = 200000.0
        det["x_pixel_size"] = 1e-4
        det["description"] = np.bytes_(b"Dectris ARINA CZT")
        for k, fname in enumerate(names):
            f[f"entry/data/data_{k + 1:06d}"] = h5py.ExternalLink(fname, "/entry/data/data")
    if scan is not None:
        with h5py.File(dirpath / f"{name}.h5", "w") as f:
            g = f.create_group("STEM Metadata")
            g.attrs.update(
                {
                    "NumPixelsX": np.int64(scan[1]),
                    "NumPixelsY": np.int64(scan[0]),
                    "Pixel Size": np.array([0.25]),
                    "Camera Length": np.array([0.1]),
                }
            )
    return dirpath / f"{name}_master.h5"


def test_arina_several_data_files_roundtrip(tmp_path, rng, monkeypatch):
    arr = rng.integers(0, 60000, (3, 5, 6, 6)).astype(np.uint32)
    master = write_arina(tmp_path, arr.reshape(15, 6, 6), per_file=4, scan=(3, 5))
    monkeypatch.chdir(tmp_path.parent)  # external links resolve next to the master file, not the cwd
    for opened in (master, tmp_path / "acq.h5", tmp_path / "acq_data_000003.h5"):
        scan = open_scan(opened)
        assert scan.path == master and scan.meta.extra["data_files"] == [
            f"data_{k:06d}" for k in (1, 2, 3, 4)
        ]
        _assert_same(scan, arr, batch_sizes=(1, 3, 4, 7, 15))
    m = scan.meta
    assert m.voltage_kv == pytest.approx(200.0) and m.step_nm == pytest.approx(0.25)
    assert m.mrad_per_px is None and m.extra["nominal_mrad_per_px"] == pytest.approx(1.0)


def test_arina_without_metadata_needs_square_or_nav_shape(tmp_path, rng):
    arr = rng.integers(0, 100, (2, 3, 4, 4)).astype(np.uint32)
    master = write_arina(tmp_path, arr.reshape(6, 4, 4), per_file=6, scan=None)
    with pytest.raises(ScanFormatError, match="6 frames and no scan size"):
        open_scan(master)
    _assert_same(open_scan(master, nav_shape=(2, 3)), arr, batch_sizes=(4,))
    (tmp_path / "acq_data_000001.h5").unlink()
    with pytest.raises(ScanFormatError, match="missing or unreadable") as e:
        open_scan(master, nav_shape=(2, 3))
    assert "acq_data_000001.h5" in str(e.value)

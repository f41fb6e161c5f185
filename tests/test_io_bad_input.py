"""polcore.io on bad input: every case gets ScanFormatError naming the file (and dataset) and the reason.

The corpus is built in tmp dirs: real HDF5 / npy / Merlin files written here, then damaged.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polcore.io import MibScan, ScanFormatError, open_scan

# --- a tiny Merlin writer (MQ1 frame headers + .hdr), after the layout of the real files ------------------

_DACS = "023,511,000,000,000,000,000,000,100,255,100,125,100,100,080,100,090,030,128,004,255,126,128,174,172,511,511"


def _mq1_header(i: int, w: int, h: int, code: str) -> bytes:
    text = (
        f"MQ1,{i + 1:06d},00384,01,{w:04d},{h:04d},{code},   1x1,01,2024-07-02 13:46:44.{i:06d},0.001000,0,0,0,"
        "1.200000E+1,5.110000E+2,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,"
        f"3RX,{_DACS},MQ1A,2024-07-02T11:46:44.{i:09d}Z,1000000ns,12,"
    )
    return text.encode("ascii").ljust(384, b" ")


def write_mib(path, frames, *, code="U16", scan=None, hdr_frames=None, hdr=True):
    """Write frames (n, h, w) as a Merlin .mib (+ .hdr); rows are written as given."""
    n, h, w = frames.shape
    dt = {"U08": ">u1", "U16": ">u2", "U32": ">u4", "R64": ">u8"}[code]
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(_mq1_header(i, w, h, code))
            fh.write(np.ascontiguousarray(frames[i], dtype=dt).tobytes())
    if hdr:
        lines = [
            "HDR,\t",
            "Counter Depth (number):\t12",
            f"Frames in Acquisition (Number):\t{n if hdr_frames is None else hdr_frames}",
            f"Frames per Trigger (Number):\t{scan[1] if scan else 1}",
        ]
        if scan:
            lines += [f"ScanX:\t{scan[1]}", f"ScanY:\t{scan[0]}"]
        path.with_suffix(".hdr").write_text("\n".join(lines) + "\nEnd\t")
    return path


@pytest.fixture
def mib(tmp_path, rng):
    frames = rng.integers(0, 4096, (6, 8, 10)).astype(np.uint16)
    return write_mib(tmp_path / "scan.mib", frames, scan=(2, 3)), frames


def _refused(path, *match, dataset=None, **kwargs) -> str:
    with pytest.raises(ScanFormatError) as e:
        open_scan(path, dataset=dataset, **kwargs)
    msg = str(e.value)
    assert type(e.value) is ScanFormatError
    assert str(path) in msg, msg
    if dataset is not None:
        assert e.value.dataset is not None and e.value.dataset in msg
    for m in match:
        assert m in msg, msg
    return msg


# --- the synthetic Merlin writer itself reads back ----------------------------------------------------------


def test_synthetic_mib_reads_back(mib):
    path, frames = mib
    scan = open_scan(path)
    assert isinstance(scan, MibScan) and scan.shape == (2, 3, 8, 10)
    for k in range(6):
        np.testing.assert_array_equal(scan.pattern(k // 3, k % 3), frames[k][::-1])


# --- missing / empty / wrong content -------------------------------------------------------------------------


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.h5", "file not found")


def test_directory(tmp_path):
    _refused(tmp_path, "is a directory")


@pytest.mark.parametrize("name", ["empty.h5", "empty.mib", "empty.npy", "empty.blo", "empty"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.touch()
    _refused(path, "empty file")


def test_text_file_named_h5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("these are my notes, not a scan\n" * 10)
    _refused(path, "the name says HDF5", "no HDF5 signature", "these are my notes")


@pytest.mark.parametrize("name", ["scan.mib", "scan.npy", "scan.emd", "scan.xyz"])
def test_garbage_with_any_extension(tmp_path, rng, name):
    path = tmp_path / name
    path.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _refused(path, "Supported:")


def test_truncated_hdf5(tmp_path, rng):
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=rng.random((8, 8, 16, 16)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, "cannot open as HDF5", "truncated")


def test_truncated_npy(tmp_path, rng):
    path = tmp_path / "cut.npy"
    np.save(path, rng.random((4, 4, 8, 8)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _refused(path, "truncated")


# --- HDF5 content -------------------------------------------------------------------------------------------


def test_hdf5_without_any_dataset(tmp_path):
    path = tmp_path / "empty_tree.h5"
    with h5py.File(path, "w") as f:
        f.create_group("a/b")
    _refused(path, "no 4D dataset", "no array datasets")


def test_hdf5_only_2d(tmp_path, rng):
    path = tmp_path / "images.h5"
    with h5py.File(path, "w") as f:
        f["haadf"] = rng.random((16, 16))
    _refused(path, "no 4D dataset", "'haadf' (16, 16)", "not a 4D-STEM scan")


def test_hdf5_3d_suggests_nav_shape(tmp_path, rng):
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f["frames"] = rng.random((12, 4, 4))
    _refused(path, "3D dataset", "'frames' (12, 4, 4)", "nav_shape=(ny, nx)")
    _refused(path, "3D array (12, 4, 4)", dataset="frames")
    assert open_scan(path, nav_shape=(3, 4)).shape == (3, 4, 4, 4)


def test_hdf5_several_4d_lists_them(tmp_path, rng):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f["raw/data"] = rng.random((2, 2, 3, 3))
        f["processed/data"] = rng.random((2, 2, 3, 3))
    _refused(path, "several 4D datasets", "'processed/data'", "'raw/data'", "dataset=")
    _refused(path, "ambiguous", dataset="data")
    msg = _refused(path, "no dataset matches", dataset="nonexistent")
    assert "raw/data" in msg


def test_hdf5_5d_refused(tmp_path, rng):
    path = tmp_path / "five.h5"
    with h5py.File(path, "w") as f:
        f["cube5"] = rng.random((2, 2, 2, 3, 3))
    _refused(path, "5D dataset", "'cube5' (2, 2, 2, 3, 3)", "Prismatic")
    _refused(path, "5D array", dataset="cube5")


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("strings", h5py.string_dtype()),
        ("compound", np.dtype([("a", "<f4"), ("b", "<i2")])),
        ("complex", np.complex64),
        ("bool", np.bool_),
    ],
)
def test_hdf5_non_numeric_dtype(tmp_path, kind, dtype):
    path = tmp_path / f"{kind}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("d", shape=(2, 2, 3, 3), dtype=dtype)
    msg = _refused(path, "non-numeric element type", dataset=None)
    assert "'d'" in msg  # the dataset is named


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (4, 0, 3, 3), (2, 2, 0, 3), (2, 2, 3, 0)])
def test_zero_size_axes(tmp_path, shape):
    h5 = tmp_path / "zero.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("d", shape=shape, dtype=np.uint16)
    _refused(h5, "zero-size axis")
    npy = tmp_path / "zero.npy"
    np.save(npy, np.zeros(shape, dtype=np.uint16))
    _refused(npy, "zero-size axis")


# --- npy content ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,reason", [((5, 6), "got 2D"), ((6, 4, 4), "3D array"), ((2, 2, 2, 3, 3), "got 5D")]
)
def test_npy_wrong_rank(tmp_path, rng, shape, reason):
    path = tmp_path / "x.npy"
    np.save(path, rng.random(shape).astype(np.float32))
    _refused(path, reason)


@pytest.mark.parametrize(
    "array",
    [
        np.array([[[["a"]]]], dtype="<U3"),
        np.zeros((2, 2, 2, 2), dtype=bool),
        np.zeros((2, 2, 2, 2), dtype=np.complex128),
    ],
    ids=["text", "bool", "complex"],
)
def test_npy_non_numeric(tmp_path, array):
    path = tmp_path / "x.npy"
    np.save(path, array)
    _refused(path, "non-numeric element type")


def test_npy_object_array_needs_pickle(tmp_path):
    path = tmp_path / "obj.npy"
    arr = np.empty((2, 2, 2, 2), dtype=object)
    np.save(path, arr, allow_pickle=True)
    _refused(path, "non-numeric", "pickle")


# --- Merlin .mib ------------------------------------------------------------------------------------------------


def test_mib_truncated(mib):
    path, _ = mib
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    _refused(path, "header does not match the file size", "truncated")


def test_mib_header_claims_bigger_frames(mib):
    path, _ = mib
    data = bytearray(path.read_bytes())
    data[25:29] = b"0012"  # first header now says 10 x 12 px: the size no longer fits
    path.write_bytes(bytes(data))
    _refused(path, "header does not match")


def test_mib_frames_not_where_the_header_says(tmp_path, rng):
    frames = rng.integers(0, 200, (4, 6, 6)).astype(np.uint16)
    path = write_mib(tmp_path / "a.mib", frames, scan=(2, 2))
    data = bytearray(path.read_bytes())
    frame_bytes = 384 + 6 * 6 * 2
    data[frame_bytes : frame_bytes + 4] = b"XXXX"  # frame 2 has no MQ1 header where expected
    path.write_bytes(bytes(data))
    _refused(path, "frame 2 does not start with an MQ1 header")


def test_mib_hdr_announces_more_frames(tmp_path, rng):
    frames = rng.integers(0, 200, (6, 4, 4)).astype(np.uint16)
    path = write_mib(tmp_path / "short.mib", frames, scan=(2, 3), hdr_frames=9)
    _refused(path, "announces 9 frames", "holds 6")


def test_mib_unsupported_counter_format(tmp_path, rng):
    frames = rng.integers(0, 200, (4, 4, 4)).astype(np.uint64)
    path = write_mib(tmp_path / "raw.mib", frames, code="R64", scan=(2, 2))
    _refused(path, "unsupported counter format R64")


def test_mib_unknown_scan_shape(tmp_path, rng):
    frames = rng.integers(0, 200, (6, 4, 4)).astype(np.uint16)
    path = write_mib(tmp_path / "noscan.mib", frames, hdr=False)
    # no .hdr and equal timestamps steps: RosettaSciIO cannot tell the scan shape, 6 is not a square
    msg = _refused(path, "pass nav_shape")
    assert "6 frames" in msg
    assert open_scan(path, nav_shape=(2, 3)).shape == (2, 3, 4, 4)


def test_dataset_argument_on_non_hdf5(mib):
    path, _ = mib
    _refused(path, "dataset= applies to HDF5 files only", dataset="data")


# --- NaN / inf ---------------------------------------------------------------------------------------------------


def test_all_nan_hdf5_refused_with_count(tmp_path):
    path = tmp_path / "nan.h5"
    with h5py.File(path, "w") as f:
        f["d"] = np.full((3, 3, 4, 4), np.inf, dtype=np.float32)
    _refused(path, "every value of the first 9 patterns is NaN or inf (144 values)")


# --- never another exception type -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("valid")
    arr = rng.random((4, 5, 6, 6)).astype(np.float32)
    with h5py.File(d / "a.h5", "w") as f:
        f.create_dataset("data", data=arr, chunks=(1, 5, 6, 6), compression="gzip")
        f.create_dataset("other", data=arr[0])
    np.save(d / "a.npy", arr)
    write_mib(d / "a.mib", (arr.reshape(20, 6, 6) * 100).astype(np.uint16), scan=(4, 5))
    return {k: (d / f"a.{k}").read_bytes() for k in ("h5", "npy", "mib")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["h5", "npy", "mib"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=4),
)
def test_damaged_files_raise_only_scan_format_error(tmp_path, valid_files, kind, cut, flips):
    data = bytearray(valid_files[kind])
    data = data[: int(len(data) * cut)]
    if kind != "h5":  # byte flips in the headers we parse ourselves; HDF5 damage is tested by truncation
        for pos, val in flips:
            if pos < len(data):
                data[pos] = val
    path = tmp_path / f"damaged.{kind}"
    path.write_bytes(bytes(data))
    try:
        scan = open_scan(path)
    except ScanFormatError as e:
        assert str(path) in str(e)
        return
    try:  # what opens must also iterate, or fail with ScanFormatError
        for _ in scan.iter_batches(7):
            pass
    except ScanFormatError as e:
        assert str(path) in str(e)


def test_hdr_without_mib(tmp_path):
    path = tmp_path / "lonely.hdr"
    path.write_text("HDR,\t\nFrames in Acquisition (Number):\t4\nEnd\t")
    _refused(path, "without its data file lonely.mib")


@pytest.mark.parametrize("kind", ["h5", "npy", "mib"])
def test_file_removed_after_open(tmp_path, rng, kind):
    arr = rng.integers(0, 100, (2, 3, 4, 4)).astype(np.uint16)
    path = tmp_path / f"gone.{kind}"
    if kind == "h5":
        with h5py.File(path, "w") as f:
            f["d"] = arr
    elif kind == "npy":
        np.save(path, arr)
    else:
        write_mib(path, arr.reshape(6, 4, 4), scan=(2, 3))
    scan = open_scan(path)
    path.unlink()
    with pytest.raises(ScanFormatError) as e:
        for _ in scan.iter_batches(4):
            pass
    assert str(path) in str(e.value)


# --- issue 12: links, special files, every .mib frame, large .npy headers -------------------------------------
# (pipes are tested in tests/test_hostile_io.py, in a worker process: a regression there would hang this one)


def test_self_symlink_is_a_loop_not_missing(tmp_path):
    link = tmp_path / "self.h5"
    link.symlink_to("self.h5")
    msg = _refused(link, "symbolic link loop")
    assert "not found" not in msg


def test_dangling_symlink(tmp_path):
    link = tmp_path / "gone.h5"
    link.symlink_to(tmp_path / "nowhere.h5")
    _refused(link, "dangling symbolic link")


def test_device_is_not_a_regular_file():
    _refused("/dev/null", "not a regular file: character device")


@pytest.mark.parametrize("frame", [3, 5])  # the middle and the last of 6 frames
def test_mib_corrupt_header_anywhere(tmp_path, rng, frame):
    frames = rng.integers(0, 200, (6, 4, 4)).astype(np.uint16)
    path = write_mib(tmp_path / "mid.mib", frames, scan=(2, 3))
    data = bytearray(path.read_bytes())
    data[(frame - 1) * (384 + 32) : (frame - 1) * (384 + 32) + 4] = b"JUNK"
    path.write_bytes(bytes(data))
    _refused(path, f"frame {frame} does not start with an MQ1 header")


def test_mib_header_field_changed_in_a_middle_frame(tmp_path, rng):
    frames = rng.integers(0, 200, (6, 4, 4)).astype(np.uint16)
    path = write_mib(tmp_path / "mixed.mib", frames, scan=(2, 3))
    data = bytearray(path.read_bytes())
    off = 3 * (384 + 32)
    assert data[off + 30 : off + 33] == b"U16"
    data[off + 30 : off + 33] = b"U08"
    path.write_bytes(bytes(data))
    _refused(path, "frame 4 announces")


def test_npy_with_a_large_valid_header_opens(tmp_path, rng):
    arr = rng.integers(0, 100, (2, 3, 4, 4)).astype(np.uint16)
    header = "{'descr': '<u2', 'fortran_order': False, 'shape': (2, 3, 4, 4), }" + " " * 30000
    header += " " * ((64 - (len(header) + 13) % 64) % 64) + "\n"
    path = tmp_path / "bighead.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + arr.tobytes())
    assert np.load(path, max_header_size=100000).shape == arr.shape  # numpy agrees the file is valid
    scan = open_scan(path)
    np.testing.assert_array_equal(scan.pattern(1, 2), arr[1, 2])


def test_npy_header_length_beyond_limit_is_not_read(tmp_path):
    path = tmp_path / "hlen.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{}" * 10)
    _refused(path, "MAX_NPY_HEADER_BYTES")

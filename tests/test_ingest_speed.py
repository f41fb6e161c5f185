"""The read side of an ingest (issue 15): deflate chunks are inflated once, by the hostile-input check itself
(:meth:`polcore.io.h5safe.ChunkGuard.read`), instead of checked and then inflated again by HDF5. The data must
be exactly what h5py reads, for any chunk layout and batch size, and the checks must still refuse what they
refused (a deflate bomb, a corrupt or short stream)."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from polcore.io import ScanFormatError, open_scan
from polcore.io.h5safe import ChunkGuard, DecodedChunks


def _write(path, data, **kw):
    with h5py.File(path, "w") as f:
        f.create_dataset("scan", data=data, **kw)
    return path


@pytest.mark.parametrize("kw", [
    dict(chunks=(1, 4, 6, 5), compression="gzip"),
    dict(chunks=(2, 3, 6, 5), compression="gzip", shuffle=True),  # chunks across rows and batches
    dict(chunks=(3, 5, 4, 3), compression="gzip", compression_opts=9),  # edge chunks in every axis
    dict(chunks=(1, 7, 6, 5), compression="gzip", fletcher32=True),  # not decoded here: h5py reads it
    dict(chunks=(2, 2, 6, 5), compression="lzf"),
])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, ">u2"])
def test_reads_exactly_what_h5py_reads(tmp_path, kw, dtype):
    rng = np.random.default_rng(1)
    data = (rng.poisson(30.0, (5, 7, 6, 5))).astype(dtype)
    scan = open_scan(_write(tmp_path / "s.h5", data, **kw))
    for bs in (1, 4, 9, 35, 100):
        got = np.concatenate([b for _, b in scan.iter_batches(bs)])
        np.testing.assert_array_equal(got, data.reshape(35, 6, 5))
    np.testing.assert_array_equal(scan.pattern(4, 6), data[4, 6])
    guard = scan._guard
    assert guard.direct == (kw.get("compression") == "gzip" and not kw.get("fletcher32"))


def test_flat_stack_reads_exactly(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 60000, (24, 8, 8)).astype(np.uint16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("frames", data=data, chunks=(5, 8, 8), compression="gzip", shuffle=True)
    from polcore.io import HDF5Scan

    scan = HDF5Scan(tmp_path / "f.h5", "frames", nav_shape=(4, 6))
    for bs in (1, 7, 24):
        np.testing.assert_array_equal(np.concatenate([b for _, b in scan.iter_batches(bs)]), data)


def _chunk_file(tmp_path, raw: bytes, chunk=(1, 1, 64, 64)):
    """A (2, 1, 64, 64) uint16 gzip scan whose first chunk is replaced by ``raw`` (written with
    write_direct_chunk, so the file is otherwise valid)."""
    path = tmp_path / "h.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("scan", shape=(2, 1, 64, 64), dtype=np.uint16, chunks=chunk, compression="gzip")
        ds[...] = 7
        ds.id.write_direct_chunk((0, 0, 0, 0), raw)
    return path


def _read_all(path):
    scan = open_scan(path)
    return np.concatenate([b for _, b in scan.iter_batches(2)])


def test_a_deflate_bomb_is_still_refused(tmp_path):
    bomb = zlib.compress(b"\0" * (64 * 64 * 2 * 500), 9)  # 4 MB from a stream smaller than the 8 kB chunk
    assert len(bomb) < 64 * 64 * 2
    with pytest.raises(ScanFormatError, match="decompression bomb"):
        _read_all(_chunk_file(tmp_path, bomb))


def test_short_and_corrupt_streams_are_refused(tmp_path):
    with pytest.raises(ScanFormatError, match="not the chunk size"):
        _read_all(_chunk_file(tmp_path, zlib.compress(b"\1\0" * 100)))
    with pytest.raises(ScanFormatError, match="corrupt deflate stream"):
        _read_all(_chunk_file(tmp_path, b"\x78\x9c" + b"garbage-not-deflate" * 3))


def test_each_chunk_is_inflated_once_per_pass(tmp_path):
    """Chunks spanning two batches come from the pass's decoded-chunk cache, not a second inflate."""
    rng = np.random.default_rng(4)
    data = rng.integers(0, 1000, (6, 4, 8, 8)).astype(np.uint16)
    path = _write(tmp_path / "c.h5", data, chunks=(3, 4, 8, 8), compression="gzip")
    scan = open_scan(path)
    guard: ChunkGuard = scan._guard
    calls = []
    decode = guard._decode

    def counted(dsid, origin):
        calls.append(origin)
        return decode(dsid, origin)

    guard._decode = counted  # a counting wrapper around the real decoder
    got = np.concatenate([b for _, b in scan.iter_batches(5)])  # batches cut the 12-pattern chunks
    np.testing.assert_array_equal(got, data.reshape(24, 8, 8))
    assert sorted(calls) == [(0, 0, 0, 0), (3, 0, 0, 0)]


def test_decoded_chunks_bounded():
    c = DecodedChunks(100)
    for i in range(5):
        c.put(i, np.zeros(40, np.uint8))
    assert c.get(0) is None and c.get(4) is not None and c._bytes <= 100
    c.put(9, np.zeros(200, np.uint8))  # larger than the budget: not kept
    assert c.get(9) is None

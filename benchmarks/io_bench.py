"""Benchmark polcore.io on a large HDF5 scan: throughput and peak memory while iterating in batches.

Writes a ~4 GB (``--gb``) float32 scan of 128 x 128 px patterns to a temp dir, row by row (never held in
memory), then:

1. drops the page cache (``/proc/sys/vm/drop_caches``, needs root) and/or evicts the file's pages
   (``posix_fadvise(DONTNEED)``), and says which worked;
2. reads the file's bytes sequentially with a 16 MiB buffer: the disk's raw read speed for comparison;
3. evicts the cache again and iterates the scan with ``open_scan(...).iter_batches(batch)`` in a fresh
   child process, reporting patterns/s, MB/s and that process's peak RSS (``ru_maxrss``).

Usage::

    python benchmarks/io_bench.py            # 4 GB
    python benchmarks/io_bench.py --gb 0.5 --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K = 128  # detector pixels per side
NX = 256  # probe positions per row


def write_scan(path: Path, gb: float, seed: int = 0) -> tuple[int, int]:
    """Write a (ny, 256, 128, 128) float32 scan of about ``gb`` GB, one scan row at a time."""
    import h5py

    row_bytes = NX * K * K * 4
    ny = max(1, round(gb * 1e9 / row_bytes))
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", shape=(ny, NX, K, K), dtype=np.float32, chunks=(1, 16, K, K))
        ds.attrs["step_nm"] = 0.4
        for iy in range(ny):
            ds[iy] = rng.random((NX, K, K), dtype=np.float32)
    return ny, NX


def evict(path: Path) -> list[str]:
    """Try to get ``path`` out of the page cache; return what worked / failed, in words."""
    notes = []
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        notes.append("drop_caches: ok")
    except OSError as exc:
        notes.append(f"drop_caches: failed ({exc.strerror or exc})")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            notes.append("posix_fadvise(DONTNEED): ok")
        finally:
            os.close(fd)
    except (OSError, AttributeError) as exc:
        notes.append(f"posix_fadvise(DONTNEED): failed ({exc})")
    return notes


def raw_read(path: Path, buf_mib: int = 16) -> tuple[float, int]:
    """Sequential read of the file's bytes; return (seconds, bytes)."""
    buf = bytearray(buf_mib << 20)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            total += n
    return time.perf_counter() - t0, total


def iterate(path: str, batch: int) -> dict:
    """Child-process side: iterate the scan, report throughput and this process's peak RSS."""
    sys.path.insert(0, str(ROOT))
    from polcore.io import open_scan

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    scan = open_scan(path)
    t_open = time.perf_counter() - t0
    n = 0
    checksum = 0.0
    t0 = time.perf_counter()
    for _, pats in scan.iter_batches(batch):
        n += len(pats)
        checksum += float(pats[:, 0, 0].sum())
    seconds = time.perf_counter() - t0
    return {
        "patterns": n,
        "seconds": seconds,
        "open_seconds": t_open,
        "bytes": scan.nbytes,
        "rss_before_mb": rss_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checksum": checksum,
        "shape": scan.shape,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0, help="scan size in GB (default 4)")
    ap.add_argument("--batch", type=int, default=256, help="patterns per batch (default 256)")
    ap.add_argument("--dir", default=None, help="where to write the temp file (default: system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written file")
    ap.add_argument("--read", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)

    if args.read:
        print(json.dumps(iterate(args.read, args.batch)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="polbench_io_", dir=args.dir))
    path = tmp / "scan.h5"
    try:
        t0 = time.perf_counter()
        ny, nx = write_scan(path, args.gb)
        t_write = time.perf_counter() - t0
        size = path.stat().st_size
        print(
            f"wrote {path} ({ny} x {nx} x {K} x {K} float32, {size / 1e9:.2f} GB) in {t_write:.1f} s "
            f"({size / 1e6 / t_write:.0f} MB/s incl. generating random data)"
        )
        print("cache before raw read:", "; ".join(evict(path)))
        sec, nbytes = raw_read(path)
        print(f"raw sequential read (16 MiB buffer): {nbytes / 1e6 / sec:.0f} MB/s ({sec:.1f} s)")
        print("cache before iterating:", "; ".join(evict(path)))
        res = subprocess.run(
            [sys.executable, __file__, "--read", str(path), "--batch", str(args.batch)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"open_scan: {r['open_seconds'] * 1e3:.1f} ms; shape {tuple(r['shape'])}")
        print(
            f"iter_batches({args.batch}): {r['patterns']} patterns in {r['seconds']:.1f} s = "
            f"{r['patterns'] / r['seconds']:.0f} patterns/s, {r['bytes'] / 1e6 / r['seconds']:.0f} MB/s"
        )
        print(
            f"peak RSS of the reading process: {r['peak_rss_mb']:.0f} MB "
            f"(after imports: {r['rss_before_mb']:.0f} MB; scan size {r['bytes'] / 1e6:.0f} MB; "
            f"target < 1000 MB: {'PASS' if r['peak_rss_mb'] < 1000 else 'FAIL'})"
        )
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"deleted {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

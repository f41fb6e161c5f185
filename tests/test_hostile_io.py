"""polcore.io against hostile uploads: a corpus of crafted files, each opened in a sandboxed worker process.

Every case is built here, in tmp dirs: HDF5 files whose storage or links point outside them (at /etc/passwd, a
named pipe, /dev/zero, a planted secret), files declaring enormous shapes they do not hold, damaged Merlin /
NumPy / blockfile headers, pipes, devices, sockets and looping links, decompression bombs, ... plus odd but
valid files that must still open.

Each case runs ``open_scan`` + ``pattern(0, 0)`` + one ``iter_batches`` batch in a worker subprocess with a
memory cap (``RLIMIT_AS``) and a per-case time limit (``signal.alarm`` inside, a kill from outside when the
worker stops answering: a hang or crash fails that case only and the worker is replaced). For every case:

* the worker survives and answers in time (nothing hangs, nothing crashes, no MemoryError);
* hostile files are refused with ``ScanFormatError`` whose message names the file and gives the reason
  expected for that case; valid ones open and read;
* no byte of the planted secret appears in any output (messages, metadata, patterns, logs), and a header that
  tries to run code does not run it.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"S3CRET-MARKER-9f81c2d7e4"  # planted outside the scan folder; must never show up anywhere
CASE_TIMEOUT_S = 20
MEMORY_CAP_BYTES = 1536 * 2**20  # RLIMIT_AS of each worker (its baseline after imports is ~0.3 GB)
RSS_RISE_LIMIT_MB = 400  # most a single case may raise the worker's peak resident memory
WORKERS = 2


# --- the worker ------------------------------------------------------------------------------------------

WORKER = r"""
import json, logging, os, resource, signal, sys, time, traceback
out = os.fdopen(os.dup(1), "w")  # results only; anything else written to stdout (libraries, C code) -> stderr
os.dup2(2, 1)
sys.stdout = sys.stderr
sys.path.insert(0, os.environ["POLBENCH_ROOT"])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import numpy as np, h5py, hdf5plugin
import polcore.io
from polcore.io import ScanFormatError, open_scan
try:
    import rsciio.blockfile._api, skimage, dask.array  # heavy imports before the cap
except Exception:
    pass
cap = int(os.environ["HOSTILE_MEMORY_CAP"])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
secret = os.environ["HOSTILE_SECRET"].encode()

class Timeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise Timeout()

signal.signal(signal.SIGALRM, on_alarm)

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

for line in sys.stdin:
    spec = json.loads(line)
    res = {"id": spec["id"]}
    rss0 = rss_mb()
    t0 = time.monotonic()
    signal.alarm(int(spec["timeout"]))
    try:
        scan = open_scan(spec["path"], **spec.get("kwargs", {}))
        p = scan.pattern(0, 0)
        pos, batch = next(scan.iter_batches(64))
        blobs = p.tobytes() + batch.tobytes()
        res.update(outcome="accepted", shape=list(scan.shape), dtype=str(scan.dtype), meta=repr(scan.meta),
                   extra=repr(scan.meta.extra), step_nm=scan.meta.step_nm, voltage_kv=scan.meta.voltage_kv,
                   first_sum=float(np.asarray(p, dtype=np.float64).sum()), batch_len=len(batch),
                   leak=secret in blobs)
    except ScanFormatError as exc:
        res.update(outcome="refused", type=type(exc).__name__, message=str(exc), reason=exc.reason,
                   dataset=exc.dataset)
    except Timeout:
        res.update(outcome="timeout", message=f"no answer within {spec['timeout']} s")
    except MemoryError:
        res.update(outcome="memory", message="MemoryError (memory cap reached)")
    except BaseException as exc:
        res.update(outcome="error", type=type(exc).__name__, message=str(exc)[:2000],
                   traceback=traceback.format_exc()[-3000:])
    finally:
        signal.alarm(0)
    res["elapsed"] = time.monotonic() - t0
    res["rss_rise_mb"] = rss_mb() - rss0
    res["rss_mb"] = rss_mb()
    out.write("RESULT " + json.dumps(res) + "\n")
    out.flush()
"""


class _Worker:
    def __init__(self, cwd: Path, log_dir: Path, k: int):
        self.log = open(log_dir / f"worker{k}-{time.monotonic_ns()}.log", "wb")
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            POLBENCH_ROOT=str(ROOT),
            HOSTILE_MEMORY_CAP=str(MEMORY_CAP_BYTES),
            HOSTILE_SECRET=SECRET.decode(),
        )
        env.pop("HDF5_EXT_PREFIX", None)
        env.pop("HDF5_VDS_PREFIX", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            cwd=cwd, env=env,
        )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.started = False

    def ask(self, spec: dict, limit: float) -> dict | None:
        """Send one case; its result, or None when the worker died or stopped answering (then it is killed)."""
        try:
            self.proc.stdin.write((json.dumps(spec) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        deadline = time.monotonic() + limit
        while True:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sel.select(timeout=left):
                    self.kill()
                    return None
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.kill()
                    return None
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.decode("utf-8", "replace")
            if text.startswith("RESULT "):
                res = json.loads(text[len("RESULT "):])
                assert res["id"] == spec["id"], (res["id"], spec["id"])  # answers stay paired with questions
                return res

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


def run_cases(specs: list[dict], cwd: Path, log_dir: Path) -> dict[str, dict]:
    """Run the case specs on a pool of workers; a worker that hangs or dies fails only its current case."""
    todo = list(specs)
    lock = threading.Lock()
    results: dict[str, dict] = {}

    def slot(k):
        worker = None
        while True:
            with lock:
                if not todo:
                    break
                spec = todo.pop(0)
            if worker is None:
                worker = _Worker(cwd, log_dir, k)
            # the first case of a worker also pays its start-up (imports)
            res = worker.ask(spec, spec["timeout"] + (60 if not worker.started else 10))
            worker.started = True
            if res is None:
                code = worker.proc.returncode
                res = {"id": spec["id"], "outcome": "hang-or-crash",
                       "message": f"worker gave no answer (exit code {code}: killed after the time limit or crashed)"}
                worker.log.close()
                worker = None
            with lock:
                results[spec["id"]] = res
        if worker is not None:
            worker.close()

    threads = [threading.Thread(target=slot, args=(k,)) for k in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- corpus builders -------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    build: object  # build(d: Path, ctx: dict) -> path (or (path, kwargs))
    expect: str  # "refuse" | "accept"
    match: tuple = ()  # substrings expected in the refusal message
    check: object = None  # extra check on an accepted result
    secret: bool = False  # the case points at the planted secret
    names_file: str | None = None  # file name the message must contain (default: the opened file's)
    extra: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(id, expect="refuse", match=(), **kw):
    def deco(fn):
        CASES.append(Case(id, fn, expect, tuple([match] if isinstance(match, str) else match), **kw))
        return fn

    return deco


def _arr(shape=(3, 4, 8, 8), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(dtype)


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


# HDF5 pointing outside the file --------------------------------------------------------------------------

_EXT = dict(shape=(2, 2, 4, 4), dtype="u1")


@case("h5_external_storage_etc_passwd", match=("external raw storage in /etc/passwd", "'data'"))
def _(d, ctx):
    with h5py.File(d / "passwd.h5", "w") as f:
        f.create_dataset("data", external=[("/etc/passwd", 0, h5py.h5f.UNLIMITED)], **_EXT)
    return d / "passwd.h5"


@case("h5_external_storage_secret", match="external raw storage", secret=True)
def _(d, ctx):
    with h5py.File(d / "ext_secret.h5", "w") as f:
        f.create_dataset("data", external=[(str(ctx["secret_bin"]), 0, h5py.h5f.UNLIMITED)], **_EXT)
    return d / "ext_secret.h5"


@case("h5_external_storage_relative_name", match="external raw storage in secret.bin", secret=True)
def _(d, ctx):
    shutil.copy(ctx["secret_bin"], d / "secret.bin")
    with h5py.File(d / "ext_rel.h5", "w") as f:
        f.create_dataset("data", external=[("secret.bin", 0, h5py.h5f.UNLIMITED)], **_EXT)
    return d / "ext_rel.h5"


@case("h5_external_storage_fifo", match=("external raw storage", "fifo"))
def _(d, ctx):
    with h5py.File(d / "ext_fifo.h5", "w") as f:
        f.create_dataset("data", external=[(str(ctx["fifo"]), 0, h5py.h5f.UNLIMITED)], **_EXT)
    return d / "ext_fifo.h5"


@case("h5_external_storage_dev_zero", match="external raw storage in /dev/zero")
def _(d, ctx):
    with h5py.File(d / "ext_zero.h5", "w") as f:
        f.create_dataset("data", external=[("/dev/zero", 0, h5py.h5f.UNLIMITED)], shape=(64, 64, 64, 64), dtype="f8")
    return d / "ext_zero.h5"


@case("h5_external_storage_in_calibration", match=("external raw storage", "R_pixel_size"), secret=True)
def _(d, ctx):
    with h5py.File(d / "ext_cal.h5", "w") as f:
        f["dc/data"] = _arr()
        f["dc"].attrs["emd_group_type"] = "array"
        f.create_dataset("dc/metadatabundle/calibration/R_pixel_size", shape=(1,), dtype="S16",
                         external=[(str(ctx["secret_bin"]), 0, h5py.h5f.UNLIMITED)])
    return d / "ext_cal.h5"


@case("h5_external_storage_in_dim_vector", match=("external raw storage", "dim0"), secret=True)
def _(d, ctx):
    with h5py.File(d / "ext_dim.h5", "w") as f:
        f["dc/data"] = _arr()
        f["dc"].attrs["emd_group_type"] = "array"
        f.create_dataset("dc/dim0", shape=(3,), dtype="f8", external=[(str(ctx["secret_bin"]), 0, h5py.h5f.UNLIMITED)])
    return d / "ext_dim.h5"


@case("h5_external_storage_unused_dataset", match="external raw storage", secret=True)
def _(d, ctx):
    with h5py.File(d / "ext_unused.h5", "w") as f:
        f["data"] = _arr()
        f.create_dataset("notes", shape=(32,), dtype="u1", external=[(str(ctx["secret_bin"]), 0, h5py.h5f.UNLIMITED)])
    return d / "ext_unused.h5"


@case("h5_virtual_dataset_other_file", match=("virtual dataset", "secret.h5"), secret=True)
def _(d, ctx):
    layout = h5py.VirtualLayout(shape=(2, 2, 4, 4), dtype="u1")
    layout[...] = h5py.VirtualSource(str(ctx["secret_h5"]), "data", shape=(2, 2, 4, 4))
    with h5py.File(d / "vds.h5", "w") as f:
        f.create_virtual_dataset("data", layout)
    return d / "vds.h5"


@case("h5_virtual_dataset_same_file", match="virtual dataset")
def _(d, ctx):
    with h5py.File(d / "vds_self.h5", "w") as f:
        f["raw"] = _arr().reshape(12, 8, 8)
        lay = h5py.VirtualLayout(shape=(1, 12, 8, 8), dtype="u2")
        lay[0] = h5py.VirtualSource(".", "raw", shape=(12, 8, 8))
        f.create_virtual_dataset("cube", lay)
    return d / "vds_self.h5"


@case("h5_external_link_to_data", match=("external link to", "secret.h5"), secret=True)
def _(d, ctx):
    with h5py.File(d / "elink.h5", "w") as f:
        f["data"] = h5py.ExternalLink(str(ctx["secret_h5"]), "/data")
    return d / "elink.h5"


@case("h5_external_link_relative", match=("external link to", "secret.h5"), secret=True)
def _(d, ctx):
    shutil.copy(ctx["secret_h5"], d / "secret.h5")
    with h5py.File(d / "elink_rel.h5", "w") as f:
        f["data"] = h5py.ExternalLink("secret.h5", "/data")
    return d / "elink_rel.h5"


@case("h5_external_link_to_calibration", match="external link to", secret=True)
def _(d, ctx):
    with h5py.File(d / "elink_cal.h5", "w") as f:
        f["dc/data"] = _arr()
        f["dc"].attrs["emd_group_type"] = "array"
        f["dc/metadatabundle"] = h5py.ExternalLink(str(ctx["secret_h5"]), "/bundle")
    return d / "elink_cal.h5"


@case("h5_external_link_to_etc_passwd", match=("external link to", "/etc/passwd"))
def _(d, ctx):
    with h5py.File(d / "elink_passwd.h5", "w") as f:
        f["data"] = _arr()
        f["extra"] = h5py.ExternalLink("/etc/passwd", "/")
    return d / "elink_passwd.h5"


@case("h5_external_link_to_itself", match="external link to")
def _(d, ctx):
    with h5py.File(d / "elink_self.h5", "w") as f:
        f["data"] = _arr()
        f["again"] = h5py.ExternalLink("elink_self.h5", "/")
    return d / "elink_self.h5"


@case("h5_external_link_with_dataset_arg", match="external link to", secret=True)
def _(d, ctx):
    with h5py.File(d / "elink_arg.h5", "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink(str(ctx["secret_h5"]), "/data")
    return d / "elink_arg.h5", {"dataset": "entry/data/data_000001"}


@case("h5_soft_link_missing_target", match=("soft link", "does not exist"))
def _(d, ctx):
    with h5py.File(d / "soft_missing.h5", "w") as f:
        f["data"] = _arr()
        f["calib"] = h5py.SoftLink("/nowhere/at/all")
    return d / "soft_missing.h5"


@case("h5_soft_link_dotdot_outside", match="soft link")
def _(d, ctx):
    with h5py.File(d / "soft_dotdot.h5", "w") as f:
        f["data"] = _arr()
        f["up"] = h5py.SoftLink("/../../../etc/passwd")
    return d / "soft_dotdot.h5"


@case("h5_soft_link_loop", match=("soft link", "loop"))
def _(d, ctx):
    with h5py.File(d / "soft_loop.h5", "w") as f:
        f["data"] = _arr()
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
    return d / "soft_loop.h5"


@case("h5_soft_link_through_external_link", match="external link", secret=True)
def _(d, ctx):
    with h5py.File(d / "soft_ext.h5", "w") as f:
        f["ext"] = h5py.ExternalLink(str(ctx["secret_h5"]), "/")
        f["data"] = h5py.SoftLink("/ext/data")
    return d / "soft_ext.h5"


@case("h5_hard_link_cycle_no_data", match="no 4D dataset")
def _(d, ctx):
    with h5py.File(d / "cycle.h5", "w") as f:
        g = f.create_group("g")
        g["self"] = g
        g["up"] = f["/"]
        g["image"] = np.zeros((4, 4))
    return d / "cycle.h5"


@case("h5_family_driver_file", match="cannot open as HDF5")
def _(d, ctx):
    with h5py.File(d / "fam%d.h5", "w", driver="family", memb_size=4096) as f:
        f["data"] = _arr()
    return d / "fam0.h5"


# DECTRIS ARINA masters ----------------------------------------------------------------------------------


def _arina(d: Path, name="acq", n=4, sig=(8, 8), link_name=None, data_name=None, scan=(2, 2), extra=None):
    import hdf5plugin

    frames = _arr((n,) + sig, np.uint16, seed=3)
    data_name = data_name or f"{name}_data_000001.h5"
    if data_name and "/" not in data_name and not (d / data_name).exists():
        with h5py.File(d / data_name, "w") as f:
            f.create_dataset("entry/data/data", data=frames, chunks=(1,) + sig, **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(d / f"{name}_master.h5", "w") as f:
        f.create_group("entry/instrument/detector")["photon_energy"] = 200000.0
        f["entry/data/data_000001"] = h5py.ExternalLink(link_name or data_name, "/entry/data/data")
        if extra:
            extra(f)
    if scan:
        with h5py.File(d / f"{name}.h5", "w") as f:
            f.create_group("STEM Metadata").attrs.update(NumPixelsX=scan[1], NumPixelsY=scan[0])
    return d / f"{name}_master.h5"


@case("arina_link_absolute_outside", match=("external link to", "master's folder"), secret=True)
def _(d, ctx):
    return _arina(d, link_name=str(ctx["secret_h5"]))


@case("arina_link_dotdot", match=("external link to", "master's folder"), secret=True)
def _(d, ctx):
    sub = d / "inner"
    sub.mkdir()
    shutil.copy(ctx["secret_h5"], d / "acq_data_000001.h5")
    return _arina(sub, link_name="../acq_data_000001.h5")


@case("arina_link_subfolder", match=("external link to", "master's folder"))
def _(d, ctx):
    (d / "sub").mkdir()
    return _arina(d, link_name="sub/acq_data_000001.h5")


@case("arina_data_file_symlink_outside", match=("symbolic link out of", "acq_data_000001.h5"), secret=True)
def _(d, ctx):
    os.symlink(ctx["secret_h5"], d / "acq_data_000001.h5")
    return _arina(d)


@case("arina_data_file_missing", match=("missing", "acq_data_000001.h5"))
def _(d, ctx):
    m = _arina(d)
    (d / "acq_data_000001.h5").unlink()
    return m


@case("arina_data_file_is_fifo", match=("not a regular file: named pipe", "acq_data_000001.h5"))
def _(d, ctx):
    os.mkfifo(d / "acq_data_000001.h5")
    return _arina(d)


@case("arina_data_file_is_text", match=("acq_data_000001.h5", "cannot open as HDF5"))
def _(d, ctx):
    (d / "acq_data_000001.h5").write_text("not hdf5\n" * 100)
    return _arina(d)


@case("arina_master_links_itself", match="master file itself")
def _(d, ctx):
    return _arina(d, link_name="acq_master.h5", data_name="acq_master.h5")


@case("arina_master_extra_external_link", match="external link to", secret=True)
def _(d, ctx):
    return _arina(d, extra=lambda f: f.__setitem__("entry/instrument/detector/flatfield",
                                                    h5py.ExternalLink(str(ctx["secret_h5"]), "/data")))


@case("arina_data_file_external_storage", match=("external raw storage", "acq_data_000001.h5"), secret=True)
def _(d, ctx):
    with h5py.File(d / "acq_data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", shape=(4, 8, 8), dtype="u2",
                         external=[(str(ctx["secret_bin"]), 0, h5py.h5f.UNLIMITED)])
    return _arina(d)


@case("arina_data_file_external_link", match="external link to", secret=True)
def _(d, ctx):
    with h5py.File(d / "acq_data_000001.h5", "w") as f:
        f["entry/data/data"] = h5py.ExternalLink(str(ctx["secret_h5"]), "/stack")
    return _arina(d)


@case("arina_data_file_declares_huge_unwritten", match=("declares", "holds only"))
def _(d, ctx):
    with h5py.File(d / "acq_data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", shape=(1_000_000, 64, 64), dtype="u2", chunks=(1, 64, 64))
    return _arina(d, scan=(1000, 1000))


@case("arina_opened_via_data_file_master_symlink_outside", match=("symbolic link out of", "master"))
def _(d, ctx):
    other = ctx["outside"] / "arina_elsewhere"
    other.mkdir()
    _arina(other)
    shutil.copy(other / "acq_data_000001.h5", d / "acq_data_000001.h5")
    os.symlink(other / "acq_master.h5", d / "acq_master.h5")
    return d / "acq_data_000001.h5"


# declared sizes the file does not hold -----------------------------------------------------------------


@case("h5_contiguous_unwritten_16GiB", match=("declares", "holds only 0 bytes"))
def _(d, ctx):
    with h5py.File(d / "huge_contig.h5", "w") as f:
        f.create_dataset("data", shape=(2048, 2048, 64, 64), dtype="u1")
    return d / "huge_contig.h5"


@case("h5_contiguous_unwritten_small", match=("declares", "holds only 0 bytes"))
def _(d, ctx):
    with h5py.File(d / "unwritten.h5", "w") as f:
        f.create_dataset("data", shape=(4, 4, 8, 8), dtype="f4")
    return d / "unwritten.h5"


@case("h5_chunked_no_chunks_1M", match=("declares", "holds only 0 stored chunk"))
def _(d, ctx):
    with h5py.File(d / "huge_chunked.h5", "w") as f:
        f.create_dataset("data", shape=(1024, 1024, 64, 64), dtype="u2", chunks=(1, 1, 64, 64), compression="gzip")
    return d / "huge_chunked.h5"


@case("h5_chunked_one_chunk_of_65536", match=("holds only 1 stored chunk",))
def _(d, ctx):
    with h5py.File(d / "one_chunk.h5", "w") as f:
        ds = f.create_dataset("data", shape=(256, 256, 64, 64), dtype="u2", chunks=(1, 1, 64, 64), compression="gzip")
        ds[0, 0] = 7
    return d / "one_chunk.h5"


@case("h5_30000x30000_positions", match=("30000 x 30000", "MAX_SCAN_SIDE"))
def _(d, ctx):
    with h5py.File(d / "positions.h5", "w") as f:
        f.create_dataset("data", shape=(30000, 30000, 64, 64), dtype="u1")
    return d / "positions.h5"


@case("h5_positions_over_max", match="MAX_POSITIONS")
def _(d, ctx):
    with h5py.File(d / "positions2.h5", "w") as f:
        f.create_dataset("data", shape=(8192, 8192, 2, 2), dtype="u1")
    return d / "positions2.h5"


@case("h5_patterns_20000px", match=("20000 x 20000 px", "MAX_PATTERN_SIDE"))
def _(d, ctx):
    with h5py.File(d / "bigpatterns.h5", "w") as f:
        f.create_dataset("data", shape=(2, 2, 20000, 20000), dtype="f8")
    return d / "bigpatterns.h5"


@case("h5_patterns_20000px_chunked", match="MAX_PATTERN_SIDE")
def _(d, ctx):
    with h5py.File(d / "bigpatterns_chunked.h5", "w") as f:
        f.create_dataset("data", shape=(1, 1, 20000, 20000), dtype="u2", chunks=(1, 1, 1000, 1000))
    return d / "bigpatterns_chunked.h5"


@case("h5_total_over_64GiB", match="MAX_TOTAL_BYTES")
def _(d, ctx):
    with h5py.File(d / "total.h5", "w") as f:
        f.create_dataset("data", shape=(4096, 4096, 512, 512), dtype="u2")
    return d / "total.h5"


@case("h5_chunk_over_limit", match="MAX_CHUNK_BYTES")
def _(d, ctx):
    with h5py.File(d / "bigchunk.h5", "w") as f:
        f.create_dataset("data", shape=(64, 64, 64, 64), dtype="f8", chunks=(64, 64, 64, 64))
    return d / "bigchunk.h5"


@case("h5_chunk_layout_slow_pattern", match="MAX_PATTERN_READ_BYTES")
def _(d, ctx):
    with h5py.File(d / "slowpattern.h5", "w") as f:
        f.create_dataset("data", shape=(512, 2, 256, 256), dtype="f8", chunks=(512, 1, 128, 128))
    return d / "slowpattern.h5"


@case("h5_data_cut_off", match=("cannot open as HDF5", "truncated"))
def _(d, ctx):
    p = _h5(d / "cut.h5", data=_arr((8, 8, 16, 16), np.uint8))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 4000])
    return p


@case("h5_deflate_bomb", match="decompression bomb")
def _(d, ctx):
    with h5py.File(d / "bomb.h5", "w") as f:
        ds = f.create_dataset("data", shape=(2, 2, 256, 256), dtype="u1", chunks=(1, 1, 256, 256), compression="gzip")
        ds[...] = 1
        c = zlib.compressobj(9)
        bomb = b"".join(c.compress(b"\0" * (1 << 20)) for _ in range(64)) + c.flush()  # 64 MB from 62 kB
        assert len(bomb) < 65536  # smaller than the 64 kB chunk: only inflating it shows the bomb
        ds.id.write_direct_chunk((0, 0, 0, 0), bomb)
    return d / "bomb.h5"


@case("h5_bitshuffle_size_header_lies", match="decompression bomb")
def _(d, ctx):
    import hdf5plugin

    with h5py.File(d / "bshuf_bomb.h5", "w") as f:
        ds = f.create_dataset("data", shape=(2, 2, 64, 64), dtype="u2", chunks=(1, 1, 64, 64),
                              **hdf5plugin.Bitshuffle(cname="lz4"))
        ds[...] = 1
        ds.id.write_direct_chunk((0, 0, 0, 0), (3 << 30).to_bytes(8, "big") + (8192).to_bytes(4, "big") + b"\0" * 64)
    return d / "bshuf_bomb.h5"


@case("h5_unknown_filter", match=("compression filter id 33333", "not accepted"))
def _(d, ctx):
    with h5py.File(d / "unknown_filter.h5", "w") as f:
        ds = f.create_dataset("data", shape=(2, 2, 4, 4), dtype="u1", chunks=(1, 1, 4, 4), compression=33333,
                              allow_unknown_filter=True)
        for i in range(2):
            for j in range(2):
                ds.id.write_direct_chunk((i, j, 0, 0), b"x" * 16)
    return d / "unknown_filter.h5"


@case("h5_bzip2_filter", match=("compression filter id 307", "not accepted"))
def _(d, ctx):
    import hdf5plugin

    with h5py.File(d / "bzip2.h5", "w") as f:
        f.create_dataset("data", data=_arr(), chunks=(1, 4, 8, 8), **hdf5plugin.BZip2())
    return d / "bzip2.h5"


# HDF5 content ------------------------------------------------------------------------------------------


@case("h5_nan_only", match="every value of the first")
def _(d, ctx):
    return _h5(d / "nan.h5", data=np.full((3, 3, 8, 8), np.nan, np.float32))


@case("h5_1d", match="no 4D dataset")
def _(d, ctx):
    return _h5(d / "oned.h5", data=np.arange(100.0))


@case("h5_5d", match="5D dataset")
def _(d, ctx):
    return _h5(d / "fived.h5", data=np.ones((2, 2, 2, 3, 3), np.float32))


@case("h5_zero_size_axis", match="zero-size axis")
def _(d, ctx):
    with h5py.File(d / "zero.h5", "w") as f:
        f.create_dataset("data", shape=(0, 4, 8, 8), dtype="u2")
    return d / "zero.h5"


@case("h5_string_dtype", match="non-numeric element type")
def _(d, ctx):
    with h5py.File(d / "strings.h5", "w") as f:
        f.create_dataset("data", shape=(2, 2, 3, 3), dtype=h5py.string_dtype())
    return d / "strings.h5"


@case("h5_complex_dtype", match="non-numeric element type")
def _(d, ctx):
    return _h5(d / "complex.h5", data=np.ones((2, 2, 3, 3), np.complex64))


@case("h5_signature_then_garbage", match="cannot open as HDF5")
def _(d, ctx):
    p = d / "fake.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(3000))
    return p


@case("h5_signature_in_user_block_then_garbage", match="cannot open as HDF5")
def _(d, ctx):
    p = d / "fake_ub.h5"
    p.write_bytes(os.urandom(512) + b"\x89HDF\r\n\x1a\n" + os.urandom(3000))
    return p


# Merlin .mib -------------------------------------------------------------------------------------------

_DACS = "023,511,000,000,000,000,000,000,100,255,100,125,100,100,080,100,090,030,128,004,255,126,128,174,172,511,511"


def _mq1(i, w, h, code="U16"):
    text = (
        f"MQ1,{i + 1:06d},00384,01,{w:04d},{h:04d},{code},   1x1,01,2024-07-02 13:46:44.{i:06d},0.001000,0,0,0,"
        "1.200000E+1,5.110000E+2,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,0.000000E+0,"
        f"3RX,{_DACS},MQ1A,2024-07-02T11:46:44.{i:09d}Z,1000000ns,12,"
    )
    return text.encode("ascii").ljust(384, b" ")


def _mib(path, n=12, w=8, h=6, code="U16", scan=(3, 4), hdr=True, hdr_frames=None):
    dt = {"U08": ">u1", "U16": ">u2", "U32": ">u4", "R64": ">u8"}[code]
    frames = _arr((n, h, w), np.uint16, seed=5)
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(_mq1(i, w, h, code))
            fh.write(frames[i].astype(dt).tobytes())
    if hdr:
        lines = ["HDR,\t", f"Frames in Acquisition (Number):\t{n if hdr_frames is None else hdr_frames}",
                 "Frames per Trigger (Number):\t1"]
        if scan:
            lines += [f"ScanX:\t{scan[1]}", f"ScanY:\t{scan[0]}"]
        path.with_suffix(".hdr").write_text("\n".join(lines) + "\nEnd\t")
    return path


def _patch(path, offset, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


_FB = 384 + 8 * 6 * 2  # frame bytes of the default synthetic .mib


@case("mib_truncated", match=("header does not match the file size", "truncated"))
def _(d, ctx):
    p = _mib(d / "cut.mib")
    p.write_bytes(p.read_bytes()[:-50])
    return p


@case("mib_corrupt_header_frame_1", match="not a valid Merlin MQ1 frame header")
def _(d, ctx):
    return _patch(_mib(d / "bad1.mib"), 4, b"XXXXXX,YY")


@case("mib_corrupt_header_middle_frame", match=("frame 7 ", "does not start with an MQ1 header"))
def _(d, ctx):
    return _patch(_mib(d / "badmid.mib"), 6 * _FB, b"ZZZZ")


@case("mib_corrupt_header_last_frame", match=("frame 12 ", "does not start with an MQ1 header"))
def _(d, ctx):
    return _patch(_mib(d / "badlast.mib"), 11 * _FB, b"MQ2,")


@case("mib_middle_frame_other_pixel_type", match=("frame 5 ", "U32"))
def _(d, ctx):
    return _patch(_mib(d / "mixed.mib"), 4 * _FB + 30, b"U32")


@case("mib_middle_frame_other_width", match=("frame 9 ", "announces"))
def _(d, ctx):
    return _patch(_mib(d / "width.mib"), 8 * _FB + 20, b"0004")


@case("mib_declares_20000px", match="MAX_PATTERN_SIDE")
def _(d, ctx):
    p = d / "big.mib"
    p.write_bytes(_mq1(0, 20000, 20000) + b"\0" * 1000)
    return p


@case("mib_zero_width", match="invalid")
def _(d, ctx):
    p = d / "zero.mib"
    p.write_bytes(_mq1(0, 0, 6) + b"\0" * 100)
    return p


@case("mib_hdr_is_fifo", match=("acquisition header", "not a regular file: named pipe"))
def _(d, ctx):
    p = _mib(d / "fifohdr.mib", hdr=False)
    os.mkfifo(d / "fifohdr.hdr")
    return p


@case("mib_hdr_symlink_outside", match=("acquisition header", "symbolic link out of"), secret=True)
def _(d, ctx):
    p = _mib(d / "linkhdr.mib", hdr=False)
    os.symlink(ctx["secret_txt"], d / "linkhdr.hdr")
    return p


@case("mib_hdr_huge", match=("acquisition header", "MAX_SIDE_FILE_BYTES"))
def _(d, ctx):
    p = _mib(d / "bighdr.mib", hdr=False)
    (d / "bighdr.hdr").write_bytes(b"ScanX:\t4\n" * 300_000)
    return p


@case("mib_hdr_announces_more_frames", match=("announces 99 frames", "holds 12"))
def _(d, ctx):
    return _mib(d / "short.mib", hdr_frames=99)


@case("mib_hdr_scan_bigger_than_file", match="needs 100 frames, file has 12")
def _(d, ctx):
    return _mib(d / "bigscan.mib", scan=(10, 10))


@case("mib_raw_counter_format", match="unsupported counter format R64")
def _(d, ctx):
    return _mib(d / "raw.mib", code="R64")


@case("mib_unknown_scan_shape", match="pass nav_shape")
def _(d, ctx):
    return _mib(d / "noscan.mib", n=6, hdr=False)


@case("mib_opened_via_hdr_symlinked_mib_outside", match=("Merlin data file", "symbolic link out of"))
def _(d, ctx):
    _mib(ctx["outside"] / "elsewhere.mib")
    os.symlink(ctx["outside"] / "elsewhere.mib", d / "via.mib")
    (d / "via.hdr").write_text("HDR,\t\nScanX:\t4\nScanY:\t3\nEnd\t")
    return d / "via.hdr"


# NumPy .npy --------------------------------------------------------------------------------------------


def _npy_raw(path, header: str, data: bytes = b"", version=(1, 0), hlen=None):
    body = header.encode("latin1")
    if version == (1, 0):
        pre = b"\x93NUMPY\x01\x00" + (len(body) if hlen is None else hlen).to_bytes(2, "little")
    else:
        pre = b"\x93NUMPY" + bytes(version) + (len(body) if hlen is None else hlen).to_bytes(4, "little")
    path.write_bytes(pre + body + data)
    return path


def _hdr(descr="'<u2'", shape="(2, 2, 4, 4)", pad=0):
    h = "{'descr': " + descr + ", 'fortran_order': False, 'shape': " + shape + ", }"
    h = h + " " * pad
    return h + " " * ((64 - (len(h) + 11) % 64) % 64) + "\n"


@case("npy_bad_version", match="unsupported .npy format version 9.9")
def _(d, ctx):
    return _npy_raw(d / "ver.npy", _hdr(), version=(9, 9))


@case("npy_header_length_4GB", match=("header of 4294967295 bytes", "MAX_NPY_HEADER_BYTES"))
def _(d, ctx):
    return _npy_raw(d / "hlen.npy", _hdr(), version=(2, 0), hlen=0xFFFFFFFF)


@case("npy_header_length_beyond_file", match="truncated .npy")
def _(d, ctx):
    return _npy_raw(d / "hlen2.npy", _hdr(), version=(2, 0), hlen=50_000)


@case("npy_header_over_limit", match="MAX_NPY_HEADER_BYTES")
def _(d, ctx):
    return _npy_raw(d / "bighead.npy", _hdr(pad=2 * 2**20), version=(2, 0))


@case("npy_header_runs_code", match="unreadable .npy header")
def _(d, ctx):
    pwn = ctx["outside"] / "pwned"
    ctx["pwned"] = pwn
    return _npy_raw(d / "code.npy", _hdr(shape=f"__import__('os').mkdir({str(pwn)!r})"))


@case("npy_header_not_a_dict", match="unreadable .npy header")
def _(d, ctx):
    return _npy_raw(d / "notdict.npy", "[1, 2, 3]".ljust(117) + "\n")


@case("npy_header_deeply_nested", match="unreadable .npy header")
def _(d, ctx):
    return _npy_raw(d / "nested.npy", _hdr(shape="(" * 5000 + ")" * 5000), version=(2, 0))


@case("npy_shape_lies_bigger", match="truncated .npy")
def _(d, ctx):
    return _npy_raw(d / "lie_big.npy", _hdr(shape="(64, 64, 64, 64)"), b"\0" * 64)


@case("npy_shape_lies_smaller", match="more than its header's shape")
def _(d, ctx):
    return _npy_raw(d / "lie_small.npy", _hdr(shape="(1, 1, 2, 2)"), b"\0" * 4096)


@case("npy_declares_20000px", match="MAX_PATTERN_SIDE")
def _(d, ctx):
    return _npy_raw(d / "bigpx.npy", _hdr(descr="'<f8'", shape="(2, 2, 20000, 20000)"), b"\0" * 100)


@case("npy_declares_30000x30000_positions", match="MAX_SCAN_SIDE")
def _(d, ctx):
    return _npy_raw(d / "bignav.npy", _hdr(descr="'|u1'", shape="(30000, 30000, 64, 64)"), b"\0" * 100)


@case("npy_negative_dimension", match=("negative axis size",))
def _(d, ctx):
    return _npy_raw(d / "neg.npy", _hdr(shape="(-1, 2, 4, 4)"), b"\0" * 64)


@case("npy_object_dtype", match=("object array", "pickle"))
def _(d, ctx):
    p = d / "obj.npy"
    np.save(p, np.empty((2, 2, 2, 2), dtype=object), allow_pickle=True)
    return p


@case("npy_structured_dtype", match="non-numeric element type")
def _(d, ctx):
    p = d / "struct.npy"
    np.save(p, np.zeros((2, 2, 2, 2), dtype=[("a", "<f4"), ("b", "<i2")]))
    return p


@case("npy_truncated_data", match="truncated")
def _(d, ctx):
    p = d / "trunc.npy"
    np.save(p, _arr())
    p.write_bytes(p.read_bytes()[:-100])
    return p


@case("npy_1d", match="got 1D")
def _(d, ctx):
    p = d / "oned.npy"
    np.save(p, np.arange(10.0))
    return p


@case("npy_5d", match="got 5D")
def _(d, ctx):
    p = d / "fived.npy"
    np.save(p, np.ones((2, 2, 2, 2, 2), np.float32))
    return p


@case("npy_zero_size", match="zero-size axis")
def _(d, ctx):
    p = d / "zero.npy"
    np.save(p, np.ones((2, 0, 4, 4), np.float32))
    return p


@case("npy_inf_only", match="every value of the first")
def _(d, ctx):
    p = d / "inf.npy"
    np.save(p, np.full((2, 2, 4, 4), np.inf))
    return p


# NanoMegas .blo ----------------------------------------------------------------------------------------


def _blo(path, nx=2, ny=3, dp=16, off1=4096, off2=None, cut=0, extra=b""):
    off2 = off1 + nx * ny if off2 is None else off2
    head = bytearray(off1)
    head[0:6] = b"IMGBLO"
    head[8:12] = off1.to_bytes(4, "little")
    head[12:16] = off2.to_bytes(4, "little")
    head[20:22] = dp.to_bytes(2, "little")
    head[24:26] = nx.to_bytes(2, "little")
    head[26:28] = ny.to_bytes(2, "little")
    body = bytes(head) + b"\x01" * (off2 - off1)
    for k in range(nx * ny):
        body += b"\xaa\x55" + k.to_bytes(4, "little") + bytes([k % 256]) * (dp * dp)
    body = body[: len(body) - cut] + extra
    path.write_bytes(body)
    return path


@case("blo_truncated", match="truncated")
def _(d, ctx):
    return _blo(d / "cut.blo", cut=100)


@case("blo_trailing_bytes", match="header and data do not match")
def _(d, ctx):
    return _blo(d / "trail.blo", extra=b"\0" * 5000)


@case("blo_header_declares_more", match="truncated")
def _(d, ctx):
    p = _blo(d / "more.blo", off2=4096 + 1024)
    return _patch(p, 24, (200).to_bytes(2, "little"))


@case("blo_offset_absurd", match="offsets do not fit")
def _(d, ctx):
    p = _blo(d / "off.blo")
    return _patch(p, 8, (0xFFFFFFF0).to_bytes(4, "little"))


@case("blo_pattern_60000px", match="MAX_PATTERN_SIDE")
def _(d, ctx):
    p = _blo(d / "bigdp.blo")
    return _patch(p, 20, (60000).to_bytes(2, "little"))


@case("blo_zero_scan", match="zero-size axis")
def _(d, ctx):
    p = _blo(d / "zero.blo")
    return _patch(p, 24, (0).to_bytes(2, "little"))


# not regular files, names, wrong content ------------------------------------------------------------------


@case("empty_file", match="empty file")
def _(d, ctx):
    (d / "empty.h5").touch()
    return d / "empty.h5"


@case("directory", match="is a directory")
def _(d, ctx):
    (d / "folder.h5").mkdir()
    return d / "folder.h5"


@case("named_pipe", match="not a regular file: named pipe")
def _(d, ctx):
    os.mkfifo(d / "pipe.h5")
    return d / "pipe.h5"


@case("named_pipe_with_writer_never_opening", match="not a regular file: named pipe")
def _(d, ctx):
    os.mkfifo(d / "pipe.mib")
    return d / "pipe.mib"


@case("device_dev_zero", match="not a regular file: character device")
def _(d, ctx):
    return Path("/dev/zero")


@case("symlink_to_dev_zero", match="not a regular file: character device")
def _(d, ctx):
    os.symlink("/dev/zero", d / "zero.h5")
    return d / "zero.h5"


@case("socket", match="not a regular file: socket")
def _(d, ctx):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d / "sock.h5"))
    ctx.setdefault("sockets", []).append(s)
    return d / "sock.h5"


@case("symlink_self_loop", match="symbolic link loop")
def _(d, ctx):
    os.symlink("loop.h5", d / "loop.h5")
    return d / "loop.h5"


@case("symlink_two_loop", match="symbolic link loop")
def _(d, ctx):
    os.symlink("b.h5", d / "a.h5")
    os.symlink("a.h5", d / "b.h5")
    return d / "a.h5"


@case("symlink_dangling", match="dangling symbolic link")
def _(d, ctx):
    os.symlink("/nonexistent/place/scan.h5", d / "dangling.h5")
    return d / "dangling.h5"


@case("missing_file", match="file not found")
def _(d, ctx):
    return d / "does_not_exist.h5"


@case("zip_named_h5", match=("the name says HDF5", "PK"))
def _(d, ctx):
    import zipfile

    with zipfile.ZipFile(d / "archive.h5", "w") as z:
        z.writestr("scan.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    return d / "archive.h5"


@case("text_named_h5", match=("the name says HDF5", "hello"))
def _(d, ctx):
    (d / "notes.h5").write_text("hello, this is not a scan\n" * 20)
    return d / "notes.h5"


@case("png_named_h5", match=("the name says HDF5", "PNG"))
def _(d, ctx):
    (d / "image.h5").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    return d / "image.h5"


@case("unicode_name_garbage", match="Supported:")
def _(d, ctx):
    p = d / "скан_数据_🙂 ü.h5"
    p.write_bytes(os.urandom(2000))
    return p


@case("very_long_name_garbage", match="Supported:")
def _(d, ctx):
    p = d / ("x" * 240 + ".npy")
    p.write_bytes(b"not numpy at all" * 50)
    return p


@case("name_with_newline_and_quotes", match="Supported:")
def _(d, ctx):
    p = d / "we'ird\"\nname.mib"
    p.write_bytes(b"MQ9," + os.urandom(500))
    return p


# --- odd but valid: must open ----------------------------------------------------------------------------


def _accepts(shape, dtype=None, **meta):
    def check(res):
        assert res["shape"] == list(shape), res
        if dtype is not None:
            assert res["dtype"] == dtype, res
        for k, v in meta.items():
            assert res[k] == v, (k, res)

    return check


@case("ok_chunked_gzip_shuffle", expect="accept", check=_accepts((3, 4, 8, 8), "uint16"))
def _(d, ctx):
    with h5py.File(d / "gzip.h5", "w") as f:
        f.create_dataset("data", data=_arr(), chunks=(1, 4, 8, 8), compression="gzip", shuffle=True, fletcher32=True)
    return d / "gzip.h5"


@case("ok_uint8", expect="accept", check=_accepts((3, 4, 8, 8), "uint8"))
def _(d, ctx):
    return _h5(d / "u8.h5", data=_arr(dtype=np.uint8))


@case("ok_uint16_big_endian", expect="accept", check=_accepts((3, 4, 8, 8), "uint16"))
def _(d, ctx):
    return _h5(d / "u16be.h5", data=_arr().astype(">u2"))


@case("ok_float32", expect="accept", check=_accepts((3, 4, 8, 8), "float32"))
def _(d, ctx):
    return _h5(d / "f32.h5", data=_arr(dtype=np.float32))


@case("ok_float64", expect="accept", check=_accepts((3, 4, 8, 8), "float64"))
def _(d, ctx):
    return _h5(d / "f64.h5", data=_arr(dtype=np.float64))


@case("ok_1x1_nav", expect="accept", check=_accepts((1, 1, 8, 8)))
def _(d, ctx):
    return _h5(d / "one.h5", data=_arr((1, 1, 8, 8)))


@case("ok_non_square_detector", expect="accept", check=_accepts((3, 4, 12, 20)))
def _(d, ctx):
    return _h5(d / "rect.h5", data=_arr((3, 4, 12, 20)))


@case("ok_npy_fortran_order", expect="accept", check=_accepts((3, 4, 8, 8), "float32"))
def _(d, ctx):
    p = d / "fortran.npy"
    np.save(p, np.asfortranarray(_arr(dtype=np.float32)))
    return p


@case("ok_npy_large_valid_header", expect="accept", check=_accepts((2, 2, 4, 4), "uint16"))
def _(d, ctx):
    return _npy_raw(d / "largehead.npy", _hdr(pad=20000), b"\1\0" * 64, version=(2, 0))


@case("ok_npy_version_3", expect="accept", check=_accepts((2, 2, 4, 4), "uint16"))
def _(d, ctx):
    return _npy_raw(d / "v3.npy", _hdr(), b"\1\0" * 64, version=(3, 0))


@case("ok_bitshuffle_lz4", expect="accept", check=_accepts((3, 4, 8, 8), "uint16"))
def _(d, ctx):
    import hdf5plugin

    with h5py.File(d / "bshuf.h5", "w") as f:
        f.create_dataset("data", data=_arr(), chunks=(1, 1, 8, 8), **hdf5plugin.Bitshuffle(cname="lz4"))
    return d / "bshuf.h5"


@case("ok_zstd", expect="accept", check=_accepts((3, 4, 8, 8), "uint16"))
def _(d, ctx):
    import hdf5plugin

    with h5py.File(d / "zstd.h5", "w") as f:
        f.create_dataset("data", data=_arr(), chunks=(1, 2, 8, 8), **hdf5plugin.Zstd())
    return d / "zstd.h5"


@case("ok_internal_soft_link", expect="accept", check=_accepts((3, 4, 8, 8)))
def _(d, ctx):
    with h5py.File(d / "softok.h5", "w") as f:
        f["raw/cube"] = _arr()
        f["alias"] = h5py.SoftLink("/raw")
    return d / "softok.h5"


@case("ok_partly_nan", expect="accept", check=_accepts((3, 4, 8, 8), "float32"))
def _(d, ctx):
    a = _arr(dtype=np.float32)
    a[0, 0, 0, :4] = np.nan
    return _h5(d / "partnan.h5", data=a)


@case("ok_absurd_calibration_dropped", expect="accept", check=_accepts((3, 4, 8, 8), step_nm=None, voltage_kv=None))
def _(d, ctx):
    p = d / "badcal.h5"
    with h5py.File(p, "w", libver="latest") as f:  # dense attribute storage for the huge attribute
        f["data"] = _arr()
        f.attrs.update(step_nm=-5.0, voltage_kv=1e300, mrad_per_px=np.nan)
        f.attrs["huge"] = np.zeros(2_000_000, np.uint8)
    return p


@case("ok_unicode_name", expect="accept", check=_accepts((3, 4, 8, 8)))
def _(d, ctx):
    return _h5(d / "données_скан_🙂.h5", data=_arr())


@case("ok_user_block", expect="accept", check=_accepts((3, 4, 8, 8)))
def _(d, ctx):
    with h5py.File(d / "ublock.h5", "w", userblock_size=512) as f:
        f["data"] = _arr()
    return d / "ublock.h5"


@case("ok_stack_with_nav_shape", expect="accept", check=_accepts((3, 4, 8, 8)))
def _(d, ctx):
    return _h5(d / "stack.h5", frames=_arr().reshape(12, 8, 8)), {"nav_shape": [3, 4]}


@case("ok_arina_in_folder", expect="accept", check=_accepts((2, 2, 8, 8), "uint16"))
def _(d, ctx):
    return _arina(d)


@case("ok_mib_with_hdr", expect="accept", check=_accepts((3, 4, 6, 8), "uint16"))
def _(d, ctx):
    return _mib(d / "good.mib")


@case("ok_blockfile", expect="accept", check=_accepts((3, 2, 16, 16), "uint8"))
def _(d, ctx):
    return _blo(d / "good.blo")


# --- the run ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"  # where the secret lives: never a scan folder
    outside.mkdir()
    secret_txt = outside / "secret.txt"
    secret_txt.write_bytes(SECRET * 64)
    secret_bin = outside / "secret.bin"
    secret_bin.write_bytes(SECRET * 4096)
    secret_h5 = outside / "secret.h5"
    marker = np.frombuffer((SECRET * 64)[:64 * 4], dtype=np.uint8).reshape(2, 2, 8, 8)
    with h5py.File(secret_h5, "w") as f:
        f["data"] = marker[:, :, :4, :4].copy()
        f["stack"] = marker.reshape(4, 8, 8)
        g = f.create_group("bundle/calibration")
        g["R_pixel_size"] = 1.0
        g.attrs["note"] = SECRET.decode()
    fifo = outside / "fifo"
    os.mkfifo(fifo)
    ctx = dict(outside=outside, secret_txt=secret_txt, secret_bin=secret_bin, secret_h5=secret_h5, fifo=fifo)
    specs, meta = [], {}
    for c in CASES:
        d = base / c.id
        d.mkdir()
        built = c.build(d, ctx)
        path, kwargs = built if isinstance(built, tuple) else (built, {})
        specs.append(dict(id=c.id, path=str(path), kwargs=kwargs, timeout=CASE_TIMEOUT_S))
        meta[c.id] = path
    work = base / "cwd"  # the workers' cwd: holds nothing a relative link could find
    work.mkdir()
    logs = base / "logs"
    logs.mkdir()
    t0 = time.monotonic()
    results = run_cases(specs, work, logs)
    elapsed = time.monotonic() - t0
    for s in ctx.get("sockets", []):
        s.close()
    log_text = b"".join(p.read_bytes() for p in logs.iterdir())
    return dict(results=results, paths=meta, ctx=ctx, logs=log_text, elapsed=elapsed)


def test_corpus_size_and_split():
    refused = [c for c in CASES if c.expect == "refuse"]
    accepted = [c for c in CASES if c.expect == "accept"]
    assert len(refused) >= 60 and len(accepted) >= 11, (len(refused), len(accepted))
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_case(corpus, c):
    res = corpus["results"][c.id]
    path = corpus["paths"][c.id]
    assert res["outcome"] in ("refused", "accepted"), f"{c.id}: {res}"
    assert res["elapsed"] < CASE_TIMEOUT_S, res
    assert res["rss_rise_mb"] < RSS_RISE_LIMIT_MB, f"{c.id} raised the peak memory by {res['rss_rise_mb']:.0f} MB"
    text = json.dumps(res)
    assert SECRET.decode() not in text, f"{c.id}: the secret leaked: {res}"
    assert not res.get("leak"), f"{c.id}: the secret appears in the pattern data"
    if c.expect == "refuse":
        assert res["outcome"] == "refused", f"{c.id} was accepted: {res}"
        assert res["type"] == "ScanFormatError", res
        msg = res["message"]
        assert Path(path).name in msg, f"{c.id}: the message does not name the file: {msg}"
        assert res["reason"], res
        for m in c.match:
            assert m in msg, f"{c.id}: {m!r} not in {msg!r}"
    else:
        assert res["outcome"] == "accepted", f"{c.id} was refused: {res}"
        assert res["batch_len"] >= 1
        if c.check:
            c.check(res)


def test_nothing_leaked_anywhere(corpus):
    assert SECRET not in corpus["logs"], "the planted secret appears in the workers' logs"
    pwned = corpus["ctx"].get("pwned")
    assert pwned is not None and not pwned.exists(), "a .npy header ran code"


def test_whole_corpus_runs_quickly(corpus):
    assert corpus["elapsed"] < 120, f"the corpus took {corpus['elapsed']:.0f} s"

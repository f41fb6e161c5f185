"""HDF5 files from users: nothing outside the file is read, and a dataset must hold what it declares.

Three checks, used by every HDF5 reader (:mod:`polcore.io.hdf5`, :mod:`polcore.io.arina`):

:func:`audit_file`
    Walks every link of the file (through hard links; at most :data:`~polcore.io.limits.MAX_HDF5_LINKS`)
    *without following* soft or external links, and refuses the file when it finds

    * an **external link** (``h5py.ExternalLink``) -- except those a caller explicitly accepts (the data links
      of a DECTRIS master, which :mod:`polcore.io.arina` opens itself, after its own checks);
    * a **soft link** that does not resolve to an object of this file (missing target, a path through an
      external link, a chain of more than 16 soft links);
    * a **virtual dataset** (VDS: data mapped from other files or datasets);
    * a dataset with **external raw storage** (``external=``: its bytes live in another file, e.g.
      ``/etc/passwd`` or ``/dev/zero``);
    * a link of an unknown (user-defined) type.

    The whole file is audited, not only the datasets a reader touches, so code that later opens the same file
    with plain h5py (ground truth, attributes) cannot be led outside it either.

:func:`check_storage`
    A dataset's declared shape x itemsize against what the file holds, before anything is read:

    * contiguous: the allocated storage must cover it and lie inside the file;
    * chunked: every chunk the shape needs must be stored (compression is allowed: the *number* of stored
      chunks is compared with the number the shape needs, not their bytes), the chunk index must point inside
      the file, no stored chunk may be larger than its uncompressed size (+1/8 + 4 kB), chunks are at most
      :data:`~polcore.io.limits.MAX_CHUNK_BYTES`, at most :data:`~polcore.io.limits.MAX_CHUNKS` of them,
      and compression filters are from a known list (:data:`FILTERS`).

:class:`ChunkGuard`
    Before HDF5 decompresses a chunk of the scan, its raw bytes are checked once per pass: a deflate (gzip)
    stream must not inflate beyond the chunk size (HDF5's deflate filter grows its buffer until the stream
    ends: a 400 kB chunk would otherwise become 400 MB), and the size headers of bitshuffle / LZ4 / Blosc /
    Zstandard chunks (which those filters allocate blindly) must not exceed it.

    For deflate chunks (alone or after shuffle, the composer's and h5py's ``compression="gzip"``), the check
    *is* the read: :meth:`ChunkGuard.read` inflates each chunk once, bounded, and hands out its bytes, instead
    of checking the stream and then letting HDF5 inflate it a second time (``benchmarks/infer_bench.py
    --baseline REV``: the "read now / then" columns).
"""

from __future__ import annotations

import math

try:  # zlib-ng: the same deflate streams inflated about 2x faster than CPython's zlib (io_bench); optional
    from zlib_ng import zlib_ng as zlib
except ImportError:  # pragma: no cover - the pinned requirements install it
    import zlib

import h5py
import numpy as np

from polcore.io.errors import ScanFormatError
from polcore.io.limits import (
    MAX_ATTRS_READ,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_HDF5_LINKS,
    Deadline,
    fmt_bytes,
)

__all__ = [
    "FILTERS",
    "audit_file",
    "foreign_storage",
    "check_storage",
    "ChunkGuard",
    "DecodedChunks",
    "small_attrs",
    "small_attr",
    "resolve",
]

#: Compression / transform filters accepted in uploaded scans: HDF5 filter id -> name. Others (bzip2, Blosc2,
#: user-defined filters) are refused: their decompressed size cannot be bounded before HDF5 allocates it.
FILTERS = {
    1: "deflate (gzip)",
    2: "shuffle",
    3: "fletcher32",
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    32000: "lzf",
    32001: "blosc",
    32004: "lz4",
    32008: "bitshuffle",
    32015: "zstd",
}

_LAYOUT = {h5py.h5d.COMPACT: "compact", h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked"}
_MAX_SOFT_DEPTH = 16


def _dec(name) -> str:
    if isinstance(name, bytes | np.bytes_):
        return bytes(name).decode("utf-8", "replace")
    return str(name)


def foreign_storage(ds: h5py.Dataset) -> str | None:
    """Why reading ``ds`` would read outside its file (virtual dataset, external raw storage), or None."""
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        try:
            n = dcpl.get_virtual_count()
            names = sorted({_dec(dcpl.get_virtual_filename(i)) for i in range(min(n, 8))})
            where = ", ".join(repr(s) for s in names) + (" ..." if n > 8 else "")
        except Exception:  # noqa: BLE001 - only for the message
            where = "other datasets"
        return f"virtual dataset (maps data from {where}): data outside the file are not read"
    n_ext = dcpl.get_external_count()
    if n_ext:
        try:
            first = _dec(dcpl.get_external(0)[0])
        except Exception:  # noqa: BLE001 - only for the message
            first = "another file"
        more = f" and {n_ext - 1} more file(s)" if n_ext > 1 else ""
        return f"external raw storage in {first}{more}: data outside the file are not read"
    return None


# --- links ------------------------------------------------------------------------------------------------


def _split(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def resolve(f: h5py.File, target: str, base: list[str] | None = None, _depth: int = 0):
    """Resolve an HDF5 path inside ``f`` following hard links and soft links, never external links.

    Returns ``(components, None)`` -- the hard path of the object -- or ``(None, why)``.
    """
    comps = list(base or []) if not target.startswith("/") else []
    for comp in _split(target):
        parent_path = "/" + "/".join(comps)
        try:
            parent = f[parent_path]
        except Exception:  # noqa: BLE001
            return None, f"{target!r} does not exist in this file"
        if not isinstance(parent, h5py.Group):
            return None, f"{target!r} goes through {parent_path!r}, which is not a group"
        try:
            link = parent.get(comp, getlink=True)
        except Exception:  # noqa: BLE001 - unknown link class, undecodable name
            return None, f"{target!r}: unreadable link {comp!r}"
        if link is None:
            return None, f"{target!r} does not exist in this file"
        if isinstance(link, h5py.HardLink):
            comps.append(comp)
        elif isinstance(link, h5py.SoftLink):
            if _depth >= _MAX_SOFT_DEPTH:
                return None, f"{target!r}: more than {_MAX_SOFT_DEPTH} soft links in a chain (a loop?)"
            sub, why = resolve(f, link.path, comps, _depth + 1)
            if sub is None:
                return None, why
            comps = sub
        elif isinstance(link, h5py.ExternalLink):
            return None, f"{target!r} goes through an external link to {link.filename!r}"
        else:
            return None, f"{target!r}: link of unknown type {type(link).__name__}"
    return comps, None


def audit_file(f: h5py.File, path, *, allow_external=None, deadline: Deadline | None = None) -> list:
    """Refuse a file with anything that points outside it (see the module docstring).

    Parameters
    ----------
    f : open h5py.File
    path : the file (for messages)
    allow_external : callable ``(name, ExternalLink) -> bool``, optional
        External links it accepts are returned instead of refused (the caller must check and open them
        itself, never through HDF5's link traversal).

    Returns
    -------
    list of ``(name, h5py.ExternalLink)`` accepted by ``allow_external``.
    """
    deadline = deadline or Deadline(path, "walking the HDF5 tree")
    accepted: list = []
    problem: list = []
    count = 0

    def visit(name, link):
        nonlocal count
        count += 1
        if count > MAX_HDF5_LINKS:
            problem.append(
                (None, f"more than {MAX_HDF5_LINKS} links/objects (polcore.io.limits.MAX_HDF5_LINKS); not read")
            )
            return 1
        if count % 1024 == 0 and deadline.expired():
            problem.append(("deadline", None))  # raised after the walk: exceptions must not cross h5py's C code
            return 1
        if isinstance(link, h5py.HardLink):
            try:
                obj = f.get(name)
            except Exception as exc:  # noqa: BLE001 - a damaged object header
                problem.append((name, f"unreadable object ({type(exc).__name__}: {exc})"))
                return 1
            if isinstance(obj, h5py.Dataset):
                why = foreign_storage(obj)
                if why:
                    problem.append((name, why))
                    return 1
            return None
        if isinstance(link, h5py.ExternalLink):
            if allow_external is not None and allow_external(name, link):
                accepted.append((name, link))
                return None
            problem.append(
                (name, f"external link to {link.filename!r} (path {link.path!r}): links out of the file are "
                       "not followed")
            )
            return 1
        if isinstance(link, h5py.SoftLink):
            base = _split(name)[:-1]
            _, why = resolve(f, link.path, base)
            if why:
                problem.append((name, f"soft link to {link.path!r} that does not resolve inside the file: {why}"))
                return 1
            return None
        problem.append((name, f"link of unknown type {type(link).__name__}"))
        return 1

    try:
        f.visititems_links(visit)
    except ScanFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged B-tree / heap
        raise ScanFormatError(path, f"cannot walk the HDF5 tree (corrupt file?): {type(exc).__name__}: {exc}") from exc
    if problem:
        name, why = problem[0]
        if why is None:
            deadline.check()
            raise ScanFormatError(path, "walking the HDF5 tree took longer than the time budget")
        raise ScanFormatError(path, why, dataset=name)
    return accepted


# --- attributes -------------------------------------------------------------------------------------------


def small_attr(obj, key: str, max_elems: int = 64):
    """Attribute ``key`` of ``obj`` when it has at most ``max_elems`` elements; None otherwise or if unreadable."""
    try:
        if key not in obj.attrs:
            return None
        aid = h5py.h5a.open(obj.id, key.encode("utf-8"))
        shape = aid.shape
        if shape is not None and math.prod(shape) > max_elems:
            return None
        return obj.attrs[key]
    except Exception:  # noqa: BLE001 - an unreadable attribute is no calibration
        return None


def small_attrs(obj, max_elems: int = 64) -> dict:
    """The first :data:`~polcore.io.limits.MAX_ATTRS_READ` attributes of ``obj`` with few elements."""
    out = {}
    try:
        names = []
        for k in obj.attrs:
            names.append(k)
            if len(names) >= MAX_ATTRS_READ:
                break
    except Exception:  # noqa: BLE001
        return out
    for k in names:
        v = small_attr(obj, k, max_elems)
        if v is not None:
            out[k] = v
    return out


# --- storage ----------------------------------------------------------------------------------------------


def _filters(dcpl) -> list[int]:
    out = []
    for i in range(dcpl.get_nfilters()):
        code = dcpl.get_filter(i)[0]
        out.append(int(code))
    return out


def check_storage(
    ds: h5py.Dataset, path, name: str, file_size: int, *, deadline: Deadline | None = None
) -> ChunkGuard | None:
    """Refuse ``ds`` when its storage cannot hold its declared shape (see the module docstring).

    Returns a :class:`ChunkGuard` for compressed chunked data (None otherwise).
    """

    def refuse(reason):
        raise ScanFormatError(path, reason, dataset=name)

    why = foreign_storage(ds)
    if why:
        refuse(why)
    shape = tuple(int(s) for s in ds.shape)
    itemsize = int(ds.dtype.itemsize)
    need = math.prod(shape) * itemsize
    declared = f"declares {fmt_bytes(need)} ({' x '.join(map(str, shape))} x {itemsize} bytes)"
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.COMPACT or need == 0:
        return None
    if layout == h5py.h5d.CONTIGUOUS:
        stored = int(ds.id.get_storage_size())
        offset = ds.id.get_offset()
        if offset is None or stored < need:
            refuse(f"{declared} but holds only {fmt_bytes(stored if offset is not None else 0)}: never written "
                   "or a header that does not match the data")
        if offset + need > file_size:
            refuse(f"{declared} stored from byte {offset}, beyond the end of the file ({fmt_bytes(file_size)}): "
                   "truncated file")
        return None
    if layout != h5py.h5d.CHUNKED:
        refuse(f"unknown storage layout {layout}")
    chunks = tuple(int(c) for c in ds.chunks)
    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        refuse(f"HDF5 chunks of {chunks} = {fmt_bytes(chunk_bytes)} exceed the limit of "
               f"{fmt_bytes(MAX_CHUNK_BYTES)} per chunk (polcore.io.limits.MAX_CHUNK_BYTES)")
    codes = _filters(dcpl)
    unknown = [c for c in codes if c not in FILTERS]
    if unknown:
        refuse(f"compression filter id {unknown[0]} is not accepted (accepted: "
               f"{', '.join(sorted(set(FILTERS.values())))}); re-save with gzip, lz4 or zstd")
    grid = tuple(math.ceil(s / c) for s, c in zip(shape, chunks))
    needed = math.prod(grid)
    if needed > MAX_CHUNKS:
        refuse(f"the chunk layout {chunks} needs {needed} chunks, over the limit of {MAX_CHUNKS} "
               "(polcore.io.limits.MAX_CHUNKS): save with larger chunks")
    deadline = deadline or Deadline(path, "reading the chunk index", dataset=name)
    stats = {"n": 0, "total": 0, "max": 0, "min": None, "end": 0}

    def visit(info):
        stats["n"] += 1
        size = int(info.size)
        stats["total"] += size
        stats["max"] = max(stats["max"], size)
        stats["min"] = size if stats["min"] is None else min(stats["min"], size)
        stats["end"] = max(stats["end"], int(info.byte_offset) + size)
        if stats["n"] % 4096 == 0 and deadline.expired():
            return 1
        return None

    try:
        ds.id.chunk_iter(visit)
    except Exception as exc:  # noqa: BLE001 - a damaged chunk index
        refuse(f"unreadable chunk index (corrupt file?): {type(exc).__name__}: {exc}")
    deadline.check()
    n, total = stats["n"], stats["total"]
    if n < needed:
        refuse(f"{declared} in {needed} chunks of {chunks} but holds only {n} stored chunk(s), "
               f"{fmt_bytes(total)}: an unwritten or partly written dataset")
    if stats["end"] > file_size or total > file_size:
        refuse(f"the chunk index points beyond the end of the file ({fmt_bytes(file_size)}): truncated or "
               "corrupt file")
    bound = chunk_bytes + chunk_bytes // 8 + 4096
    if stats["max"] > bound:
        refuse(f"a stored chunk of {fmt_bytes(stats['max'])} is larger than its uncompressed size "
               f"{fmt_bytes(chunk_bytes)}: corrupt chunk index or a decompression bomb")
    if not codes and stats["min"] is not None and stats["min"] < chunk_bytes:
        refuse(f"an uncompressed chunk holds only {stats['min']} of its {chunk_bytes} bytes: corrupt chunk index")
    return ChunkGuard(ds, path, name, codes, chunks, grid, chunk_bytes) if codes else None


class ChunkGuard:
    """Checks the raw bytes of each chunk (once per pass) before HDF5 decompresses it.

    Bounds what a decompression filter may allocate to about one chunk: deflate streams are inflated here with
    ``max_length``; the uncompressed-size headers of bitshuffle, LZ4, Blosc and Zstandard chunks are compared
    with the chunk size. A chunk that fails is refused with a :class:`ScanFormatError` naming its position.
    Filters without such a header (lzf, szip, nbit, scaleoffset, shuffle, fletcher32) are not checked further.
    """

    def __init__(self, ds, path, name, codes, chunks, grid, chunk_bytes):
        self.path, self.name = path, name
        self.codes = list(codes)
        self.chunks, self.grid = tuple(chunks), tuple(grid)
        self.bound = chunk_bytes + 4096
        self.chunk_bytes = chunk_bytes
        self.seen = np.zeros(math.prod(grid), dtype=bool)
        self.active = any(c in (1, 32001, 32004, 32008, 32015) for c in self.codes)
        #: chunks :meth:`read` decodes itself: deflate alone or shuffle then deflate
        self.direct = self.codes in ([1], [2, 1])
        self.dtype = ds.dtype

    def read(self, dsid, start, stop, cache: DecodedChunks | None = None) -> np.ndarray | None:
        """The box ``start`` (inclusive) .. ``stop`` (exclusive) of the dataset, every chunk inflated once here
        (bounded, as :meth:`check` does) and never again by HDF5; None when this dataset's filters are not ones
        it decodes (deflate alone or shuffle then deflate) or a chunk was stored without them: then read
        through h5py after :meth:`check`. ``cache`` (one per pass over the file) keeps the latest decoded chunks
        for the next call, so a chunk that spans two batches is inflated once."""
        if not self.direct:
            return None
        start = tuple(int(v) for v in start)
        stop = tuple(int(v) for v in stop)
        out = np.empty(tuple(b - a for a, b in zip(start, stop)), self.dtype)
        if out.size == 0:
            return out
        ranges = [range(lo // c, (hi - 1) // c + 1) for lo, hi, c in zip(start, stop, self.chunks)]
        for idx in np.ndindex(*(len(r) for r in ranges)):
            cidx = tuple(r[i] for r, i in zip(ranges, idx))
            origin = tuple(i * c for i, c in zip(cidx, self.chunks))
            flat = int(np.ravel_multi_index(cidx, self.grid))
            chunk = None if cache is None else cache.get(flat)
            if chunk is None:
                chunk = self._decode(dsid, origin)
                if chunk is None:
                    return None
                self.seen[flat] = True
                if cache is not None:
                    cache.put(flat, chunk)
            src = tuple(slice(max(a, o) - o, min(b, o + c) - o) for a, b, o, c in zip(start, stop, origin, self.chunks))
            dst = tuple(slice(max(a, o) - a, min(b, o + c) - a) for a, b, o, c in zip(start, stop, origin, self.chunks))
            out[dst] = chunk[src]
        return out

    def _decode(self, dsid, origin) -> np.ndarray | None:
        """One chunk inflated (at most its size, a longer stream is refused), unshuffled, as an array."""
        try:
            mask, raw = dsid.read_direct_chunk(origin)
        except Exception as exc:  # noqa: BLE001 - missing / unreadable chunk
            self._fail(origin, f"unreadable ({type(exc).__name__}: {exc})")
        if mask:  # a filter was skipped for this chunk (stored raw): let HDF5 read it, after the check
            return None
        d = zlib.decompressobj()
        try:
            data = d.decompress(raw, self.bound)
        except zlib.error as exc:
            self._fail(origin, f"corrupt deflate stream ({exc})")
        if d.unconsumed_tail:
            self._fail(origin, f"deflate stream inflates beyond the chunk size of {fmt_bytes(self.chunk_bytes)} "
                               "(a decompression bomb)")
        if len(data) != self.chunk_bytes:
            self._fail(origin, f"deflate stream inflates to {len(data)} bytes, not the chunk size of "
                               f"{self.chunk_bytes} bytes: corrupt chunk")
        a = np.frombuffer(data, np.uint8)
        if self.codes[0] == 2:  # shuffle: byte k of every element stored together, k = 0 .. itemsize-1
            a = a.reshape(self.dtype.itemsize, -1).T
        return np.ascontiguousarray(a).view(self.dtype).reshape(self.chunks)

    def reset(self) -> None:
        self.seen[:] = False

    def check(self, dsid, start, stop) -> None:
        """Check every chunk overlapping the box ``start`` (inclusive) .. ``stop`` (exclusive)."""
        if not self.active:
            return
        ranges = [range(lo // c, (hi - 1) // c + 1) for lo, hi, c in zip(start, stop, self.chunks) if hi > lo]
        if len(ranges) != len(self.chunks):
            return
        for idx in np.ndindex(*(len(r) for r in ranges)):
            cidx = tuple(r[i] for r, i in zip(ranges, idx))
            flat = int(np.ravel_multi_index(cidx, self.grid))
            if self.seen[flat]:
                continue
            self._check_one(dsid, tuple(i * c for i, c in zip(cidx, self.chunks)))
            self.seen[flat] = True

    def _fail(self, origin, why):
        raise ScanFormatError(self.path, f"chunk at {origin}: {why}", dataset=self.name)

    def _check_one(self, dsid, origin) -> None:
        try:
            mask, raw = dsid.read_direct_chunk(origin)
        except Exception as exc:  # noqa: BLE001 - missing / unreadable chunk
            self._fail(origin, f"unreadable ({type(exc).__name__}: {exc})")
        active = [c for i, c in enumerate(self.codes) if not (mask >> i) & 1]
        if active and active[-1] == 3:  # fletcher32 checksum appended last
            raw = raw[:-4]
            active = active[:-1]
        if not active:
            if len(raw) > self.bound:
                self._fail(origin, f"stored uncompressed but holds {len(raw)} bytes for a {self.chunk_bytes}-byte chunk")
            return
        outer = active[-1]
        if outer == 1:
            d = zlib.decompressobj()
            try:
                d.decompress(raw, self.bound)
            except zlib.error as exc:
                self._fail(origin, f"corrupt deflate stream ({exc})")
            if d.unconsumed_tail:
                self._fail(origin, f"deflate stream inflates beyond the chunk size of {fmt_bytes(self.chunk_bytes)} "
                                   "(a decompression bomb)")
            return
        size = None
        if outer in (32004, 32008) and len(raw) >= 8:  # LZ4 / bitshuffle: uint64 big-endian uncompressed size
            size = int.from_bytes(raw[:8], "big")
        elif outer == 32001 and len(raw) >= 8:  # Blosc: uint32 little-endian nbytes at byte 4
            size = int.from_bytes(raw[4:8], "little")
        elif outer == 32015:
            size = _zstd_content_size(raw)
        if size is not None and size > self.bound:
            self._fail(origin, f"its header announces {fmt_bytes(size)} uncompressed, more than the chunk size "
                               f"of {fmt_bytes(self.chunk_bytes)} (a decompression bomb)")


class DecodedChunks:
    """The latest chunks :meth:`ChunkGuard.read` decoded in one pass over a file, up to ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._chunks: dict[int, np.ndarray] = {}
        self._bytes = 0

    def get(self, key: int) -> np.ndarray | None:
        return self._chunks.get(key)

    def put(self, key: int, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.max_bytes:
            return
        self._chunks[key] = chunk
        self._bytes += chunk.nbytes
        while self._bytes > self.max_bytes:
            self._bytes -= self._chunks.pop(next(iter(self._chunks))).nbytes


def _zstd_content_size(raw: bytes) -> int | None:
    """Frame content size from a Zstandard frame header, or None when absent / not a zstd frame."""
    if len(raw) < 6 or raw[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = raw[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size_len == 0 or len(raw) < pos + size_len:
        return None
    value = int.from_bytes(raw[pos : pos + size_len], "little")
    return value + 256 if size_len == 2 else value

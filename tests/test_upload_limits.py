"""Upload limits (issue 12): disk-space refusal, clean-up of uploads never ingested, the ingest queue with
cancel, the thickness parser refusing negative or malformed ranges, and over-long server paths.

The job-queue tests use their own :class:`ui.jobs.JobRegistry` (cap 1), so they neither wait for nor disturb
the process-wide registry; the page tests drive pages/6_Upload.py with AppTest against the fixture store.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from app_fixtures import build_store, write_plain_scan
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
UPLOAD_PAGE = "pages/6_Upload.py"
Usage = namedtuple("Usage", "total used free")


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# --------------------------------------------------------------------------------------------- disk space


def test_upload_refused_when_disk_is_nearly_full(tmp_path, monkeypatch):
    from ui import backend

    dest = tmp_path / "uploads"
    payload = b"\x01" * 10_000
    seen = []

    def nearly_full(path):
        seen.append(Path(path))
        return Usage(total=10 << 30, used=10 << 30, free=backend.DISK_MARGIN_BYTES + len(payload) - 1)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(backend.UploadRefused, match="Not enough disk space") as exc:
        backend.save_upload(io.BytesIO(payload), "scan.h5", "id-1", dest)
    assert "1.0 GB" in str(exc.value)  # the margin is stated in the message
    assert seen, "shutil.disk_usage must be asked"
    assert not dest.exists() or not any(dest.iterdir()), (
        "a refused upload writes nothing (no .partial either)"
    )

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(10 << 30, 0, backend.DISK_MARGIN_BYTES + len(payload))
    )
    saved = backend.save_upload(io.BytesIO(payload), "scan.h5", "id-1", dest)
    assert saved.read_bytes() == payload and saved.parent == dest
    assert not list(dest.glob("*.partial"))


# ------------------------------------------------------------------------------------------------ clean-up


def _age(path: Path, seconds: float, now: float) -> None:
    os.utime(path, (now - seconds, now - seconds))


def test_cleanup_removes_only_stale_unstored_uploads(tmp_path):
    from polcore.store import PredictionStore
    from ui import backend

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    db = tmp_path / "polbench.duckdb"
    now = time.time()
    day = backend.UPLOAD_MAX_AGE_S

    old_unstored = uploads / "old-unstored.h5"
    old_stored = uploads / "old-stored.h5"
    fresh = uploads / "fresh.h5"
    old_partial = uploads / "gone.h5.partial"
    fresh_partial = uploads / "writing.h5.partial"
    old_in_use = uploads / "queued.h5"
    for p in (old_unstored, old_stored, fresh, old_partial, fresh_partial, old_in_use):
        p.write_bytes(p.name.encode())
    # an upload hashed while it was saved by this process, stored under another path (same content)
    old_same_sha = backend.save_upload(io.BytesIO(b"same content"), "same.h5", "id-same", uploads)

    store = PredictionStore(db)
    store.add_scan(
        name="stored",
        kind="experimental",
        sha256=hashlib.sha256(b"a").hexdigest(),
        ny=2,
        nx=2,
        source_file=old_stored,
        status="ready",
    )
    store.add_scan(
        name="elsewhere",
        kind="experimental",
        sha256=hashlib.sha256(b"same content").hexdigest(),
        ny=2,
        nx=2,
        source_file=tmp_path / "scans" / "same.h5",
        status="ready",
    )

    for p in (old_unstored, old_stored, old_in_use, old_same_sha):
        _age(p, day + 60, now)
    _age(fresh, day - 60, now)
    _age(old_partial, backend.PARTIAL_MAX_AGE_S + 60, now)

    removed = backend.cleanup_uploads(uploads, db, keep=[old_in_use], now=now)
    assert sorted(p.name for p in removed) == sorted([old_unstored.name, old_partial.name])
    assert not old_unstored.exists() and not old_partial.exists()
    for kept in (old_stored, fresh, fresh_partial, old_in_use, old_same_sha):
        assert kept.exists(), kept.name
    assert backend.cleanup_uploads(uploads, db, keep=[old_in_use], now=now) == []  # nothing left to do

    # without a database nothing is stored: the old upload goes, the fresh one stays
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.h5").write_bytes(b"a")
    (other / "b.h5").write_bytes(b"b")
    _age(other / "a.h5", day + 1, now)
    removed = backend.cleanup_uploads(other, tmp_path / "missing.duckdb", now=now)
    assert [p.name for p in removed] == ["a.h5"] and (other / "b.h5").exists()
    assert not (tmp_path / "missing.duckdb").exists(), "the clean-up never creates the database"
    assert backend.cleanup_uploads(tmp_path / "no-such-folder", db, now=now) == []


# ------------------------------------------------------------------------------------------- job queue


def _registry():
    from ui.jobs import JobRegistry

    return JobRegistry(max_running={"ingest": 1}, max_queued={"ingest": 3})


def test_queue_runs_one_ingest_at_a_time_and_reports_positions():
    from ui import jobs

    reg = _registry()
    gates = {k: threading.Event() for k in "abcd"}
    calls: list[str] = []

    def work(tag, progress=None):
        calls.append(tag)
        progress(0.5, f"{tag} half")
        assert gates[tag].wait(10)
        return tag

    a = reg.start("ingest", "a", work, "a")
    assert _wait(lambda: a.status == "running" and calls == ["a"])
    b = reg.start("ingest", "b", work, "b")
    c = reg.start("ingest", "c", work, "c")
    d = reg.start("ingest", "d", work, "d")
    assert (b.status, c.status, d.status) == ("queued", "queued", "queued")
    assert [reg.position(j.job_id) for j in (a, b, c, d)] == [None, 1, 2, 3]
    assert jobs.describe(c, reg.position(c.job_id)) == "waiting: 2nd in line"
    with pytest.raises(jobs.QueueFull):
        reg.start("ingest", "e", work, "e")  # 3 waiting at most
    other = reg.start("demo", "not capped", lambda progress=None: "free")
    assert _wait(lambda: other.status == "done")  # other kinds do not queue
    time.sleep(0.2)
    assert calls == ["a"] and b.status == "queued", "the second ingest must wait for the first"

    gates["a"].set()
    assert _wait(lambda: b.status == "running")
    assert a.status == "done" and a.result == "a"
    assert b.started >= a.finished
    assert [reg.position(j.job_id) for j in (b, c, d)] == [None, 1, 2]
    gates["b"].set()
    gates["c"].set()
    gates["d"].set()
    assert _wait(lambda: d.status == "done")
    assert calls == ["a", "b", "c", "d"]
    assert all(j.status == "done" for j in (a, b, c, d))


def test_cancel_running_job_raises_in_its_work_and_ends_cancelled():
    from ui.jobs import JobCancelled

    reg = _registry()
    seen: list[BaseException] = []
    rolled_back = threading.Event()

    def work(progress=None):
        try:
            for i in range(100_000):
                progress(i / 100_000, f"step {i}")
                time.sleep(0.005)
        except BaseException as exc:  # what the ingest does: roll back, re-raise
            seen.append(exc)
            rolled_back.set()
            raise
        return "finished"

    job = reg.start("ingest", "long", work)
    assert _wait(lambda: job.fraction > 0)
    assert job.cancel_requested is False
    assert reg.cancel(job.job_id) is True
    assert job.cancel_requested
    assert _wait(lambda: job.status == "cancelled")
    assert rolled_back.is_set() and len(seen) == 1 and isinstance(seen[0], JobCancelled)
    assert job.result is None and job.error is None and job.finished is not None
    assert reg.cancel(job.job_id) is False  # already ended
    # the slot is free again
    nxt = reg.start("ingest", "next", lambda progress=None: 7)
    assert _wait(lambda: nxt.status == "done") and nxt.result == 7


def test_cancel_queued_job_never_runs_it():
    reg = _registry()
    gate = threading.Event()
    calls: list[str] = []

    def work(tag, progress=None):
        calls.append(tag)
        progress(0.1, tag)
        assert gate.wait(10)
        return tag

    first = reg.start("ingest", "first", work, "first")
    assert _wait(lambda: calls == ["first"])
    queued = reg.start("ingest", "queued", work, "queued")
    last = reg.start("ingest", "last", work, "last")
    assert reg.position(last.job_id) == 2
    assert reg.cancel(queued.job_id) is True
    assert _wait(lambda: queued.status == "cancelled")
    assert reg.position(last.job_id) == 1  # moved up
    gate.set()
    assert _wait(lambda: last.status == "done")
    assert calls == ["first", "last"], "a cancelled queued job must never start"
    assert queued.started is None and first.status == "done"


# ------------------------------------------------------------------------------------------- thickness


def test_thickness_parser_refuses_negative_and_malformed():
    from ui import state

    assert state.parse_thickness("40-10") == (10.0, 40.0)  # reversed: put in order
    assert state.parse_thickness("10-40") == state.parse_thickness(" 10 , 40 ") == (10.0, 40.0)
    assert state.parse_thickness("0-12.5") == (0.0, 12.5)
    assert state.parse_thickness("") is None
    for bad in ("-5--3", "-5", "10--3", "-3-10", "-5,-3"):
        with pytest.raises(ValueError, match="negative"):
            state.parse_thickness(bad)
    for bad in ("5-", "-", "1-2-3", "a-b", "nan", "inf", "1e400", "10 40", "10-40nm"):
        with pytest.raises(ValueError):
            state.parse_thickness(bad)


def test_negative_thickness_in_url_keeps_previous_filter():
    from ui import state

    ss = {"f_th": (20.0, 30.0)}
    problems = state.load_query_params({"th": "-5--3"}, ss)
    assert ss["f_th"] == (20.0, 30.0)
    assert len(problems) == 1 and "th='-5--3'" in problems[0] and "negative" in problems[0]


# ------------------------------------------------------------------------------------------ long paths


def test_overlong_path_is_a_value_error(tmp_path, monkeypatch):
    from ui import paths

    monkeypatch.setenv("POLBENCH_DATA", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    cases = {
        "a" * 5000: "too long",  # over PATH_MAX
        "b" * 300 + "/x.h5": "too long",  # one name over NAME_MAX
        "x/" * 2040 + "a.h5": "Cannot use the path",  # under PATH_MAX as typed, over it once joined
        "x\x00y": "NUL",
    }
    for text, words in cases.items():
        with pytest.raises(ValueError, match=words) as exc:
            paths.resolve_data_path(text)
        assert not isinstance(exc.value, OSError)
        assert len(str(exc.value)) < 400, "the message must not repeat a huge path"


# ------------------------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def store_info(tmp_path_factory):
    info = build_store(tmp_path_factory.mktemp("uploaddata"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in info.env().items():
            mp.setenv(k, v)
        yield info


def _upload_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    return at.switch_page(UPLOAD_PAGE).run()


def _problems(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [str(e.value) for e in at.error]


def test_upload_page_overlong_server_path_shows_error(store_info):
    at = _upload_page()
    at.radio(key="up_mode").set_value("Path on the server").run()
    for text in ("a" * 5000, "scans/" + "b" * 300 + ".h5"):
        at.text_input(key="up_path").input(text).run()
        assert not at.exception, [e.value for e in at.exception]
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and "too long" in errors[0], errors
        assert "could not be shown" not in errors[0]
    at.text_input(key="up_path").input("scans/syn_35nm.h5").run()  # the page still works afterwards
    assert not _problems(at)
    assert any("24\u00d724 positions" in s.value for s in at.success)


def test_upload_page_saves_then_releases_the_upload(store_info, monkeypatch):
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager

    removed = []
    original = MemoryUploadedFileManager.remove_file

    def remove_file(self, session_id, file_id):
        original(self, session_id, file_id)
        removed.append((file_id, len(self.file_storage.get(session_id, {}))))

    monkeypatch.setattr(MemoryUploadedFileManager, "remove_file", remove_file)
    src = write_plain_scan(store_info.data_dir / "tmp_src" / "small.h5", 6, 7, seed=5)
    at = _upload_page()
    assert any("200 MB" in c.value for c in at.caption), "the per-file limit is stated on the page"
    at.file_uploader[0].set_value(("small.h5", src.read_bytes(), "application/octet-stream")).run()
    assert not _problems(at)
    assert any("6\u00d77 positions" in s.value for s in at.success)
    cur = at.session_state["up_current"]
    assert Path(cur["path"]).read_bytes() == src.read_bytes()
    assert len(removed) == 1 and removed[0][1] == 0, "the bytes must leave Streamlit's upload store"
    # the uploader was replaced by an empty one: the widget no longer holds the upload
    assert len(at.file_uploader) == 0
    at.button(key="up_discard").click().run()
    assert not _problems(at)
    assert not Path(cur["path"]).exists()
    assert at.file_uploader[0].value is None and at.file_uploader[0].key.endswith("_1")


def test_upload_page_refuses_upload_without_disk_space(store_info, monkeypatch):
    from ui import backend

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, 1 << 30, backend.DISK_MARGIN_BYTES))
    at = _upload_page()
    at.file_uploader[0].set_value(("big.h5", b"\x00" * 4096, "application/octet-stream")).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "Not enough disk space" in errors[0] and "big.h5" in errors[0]
    assert not list((store_info.data_dir / "uploads").glob("big*"))
    assert "up_current" not in at.session_state


def test_upload_page_shows_queue_and_cancels(store_info):
    from ui import jobs

    gate = threading.Event()
    ran: list[str] = []

    def blocker(progress=None):
        ran.append("blocker")
        while not gate.wait(0.02):
            progress(0.1, "busy")
        return 0

    def never(progress=None):
        ran.append("never")
        return 0

    first = jobs.start_job("ingest", "someone else's scan", blocker)
    try:
        assert _wait(lambda: first.status == "running")
        queued = jobs.start_job("ingest", "my scan", never)
        assert queued.status == "queued"
        at = AppTest.from_file(APP, default_timeout=60)
        at.run()
        at.session_state["up_job"] = queued.job_id
        at.switch_page(UPLOAD_PAGE).run()
        assert not _problems(at)
        assert any("waits for its turn" in i.value for i in at.info)
        bars = [el.proto.text for el in at.get("progress")]
        assert any("waiting: 1st in line" in t for t in bars), bars
        at.button(key="up_cancel").click().run()  # the queued job wakes, leaves the queue and ends
        assert _wait(lambda: queued.status == "cancelled")
        shown = [w.value for w in at.warning]
        if not any("Cancelled" in w for w in shown):  # the click's run came before the thread ended
            assert any("Cancelling" in c.value for c in at.caption)
            at.run()  # what the polling fragment triggers once the job ended
            shown = [w.value for w in at.warning]
        assert not _problems(at)
        assert any("Cancelled, nothing was stored" in w for w in shown), shown
        assert "never" not in ran
    finally:
        gate.set()  # free the process-wide ingest slot for whatever runs next
        _wait(lambda: first.status not in jobs.ACTIVE)
    assert first.status == "done"


def test_cancelled_ingest_job_stores_nothing(store_info):
    """A real ingest cancelled through its job: JobCancelled leaves the ingest, which rolls back."""
    from polcore.store import PredictionStore
    from ui.backend import ingest_scan

    path = write_plain_scan(store_info.data_dir / "uploads" / "to-cancel.h5", 8, 8, seed=6)
    store = PredictionStore(store_info.db)
    before = store.counts()
    reg = _registry()
    holder: list[str] = []

    def work(progress=None):
        def cancel_on_first_report(fraction, message=""):
            reg.cancel(holder[0])  # the user presses Cancel once the scan row exists
            progress(fraction, message)

        return ingest_scan(
            path, ["pca_knn-cls-s0"], store_info.db, name="to-cancel", progress=cancel_on_first_report
        )

    job = reg.start("ingest", "to-cancel", work)
    holder.append(job.job_id)
    assert _wait(lambda: job.status not in ("queued", "running"), timeout=60)
    assert job.status == "cancelled", job.error
    assert store.counts() == before

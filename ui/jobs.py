"""Long work (demo build, scan ingest) in background threads, polled by a Streamlit fragment.

A widget interaction reruns the script and would kill work done inline, so the work runs in a daemon thread
registered in a process-wide registry (``st.cache_resource``); the page keeps only the job id in
``st.session_state`` and shows progress with :func:`job_progress`, a fragment that reruns every second and
triggers one full rerun when the job ends.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

__all__ = ["Job", "JobRegistry", "registry", "start_job", "get_job", "find_running", "job_progress"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One background task and what it reported.

    Attributes
    ----------
    job_id, kind, label : identity, a kind tag ("demo", "ingest") and a human label.
    fraction : progress in [0, 1].
    message : last progress message.
    status : "running", "done" or "failed".
    result : return value of the work function when done.
    error : short error message when failed (the traceback goes to the log).
    started, finished : time.time() stamps [s].
    """

    job_id: str
    kind: str
    label: str
    fraction: float = 0.0
    message: str = "starting"
    status: str = "running"
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def elapsed(self) -> float:
        """Seconds since start (until finish when finished)."""
        return (self.finished or time.time()) - self.started

    def progress(self, fraction: float, message: str = "") -> None:
        """The ``polcore.progress`` callback: ``progress(fraction, message)``; a bad value never stops the work."""
        try:
            frac = float(fraction)
        except (TypeError, ValueError):
            log.debug("ignored progress report %r %r", fraction, message)
            return
        with self._lock:
            if frac == frac:  # not NaN
                self.fraction = min(max(frac, 0.0), 1.0)
            if message:
                self.message = str(message)


class JobRegistry:
    """Thread-safe map job_id -> Job, shared by every session of the server process."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    def get(self, job_id: str | None) -> Job | None:
        if not job_id:
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def running(self, kind: str | None = None) -> list[Job]:
        with self._lock:
            return [
                j for j in self._jobs.values() if j.status == "running" and (kind is None or j.kind == kind)
            ]


@st.cache_resource(show_spinner=False)
def registry() -> JobRegistry:
    """The process-wide job registry."""
    return JobRegistry()


def start_job(kind: str, label: str, fn: Callable[..., Any], /, *args, **kwargs) -> Job:
    """Run ``fn(*args, progress=job.progress, **kwargs)`` in a daemon thread and register it.

    ``kind``, ``label`` and ``fn`` are positional-only, so ``kwargs`` may hold the same names for ``fn``.
    Exceptions are caught: the job becomes "failed" with the exception's message, and the traceback is logged.
    """
    job = Job(job_id=uuid.uuid4().hex[:12], kind=kind, label=label)

    def _target() -> None:
        try:
            result = fn(*args, progress=job.progress, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - report every failure of the work as the job's error
            log.error("background job %s (%s) failed:\n%s", job.job_id, label, traceback.format_exc())
            with job._lock:
                job.error = _short_error(exc)
                job.status = "failed"
                job.finished = time.time()
            return
        with job._lock:
            job.result = result
            job.fraction = 1.0
            job.message = "done"
            job.status = "done"
            job.finished = time.time()

    registry().add(job)
    thread = threading.Thread(target=_target, name=f"polbench-{kind}-{job.job_id}", daemon=True)
    thread.start()
    return job


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def get_job(job_id: str | None) -> Job | None:
    """The job with this id, or None."""
    return registry().get(job_id)


def find_running(kind: str) -> Job | None:
    """A running job of this kind (any session), or None."""
    jobs = registry().running(kind)
    return jobs[0] if jobs else None


def job_progress(job_id: str, *, every: float = 1.0) -> None:
    """Show a progress bar for a job; rerun the whole page once when it ends.

    Call it only while the job is running (the page shows the result otherwise), else the final rerun loops.
    """

    @st.fragment(run_every=every)
    def _poll() -> None:
        job = get_job(job_id)
        if job is None:
            st.warning("The background job is gone (the server restarted?).")
            return
        st.progress(job.fraction, text=f"{job.label}: {job.message} ({job.elapsed:.0f} s)")
        if job.status != "running":
            st.rerun(scope="app")

    _poll()

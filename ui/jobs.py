"""Long work (demo build, scan ingest) in background threads, polled by a Streamlit fragment.

A widget interaction reruns the script and would kill work done inline, so the work runs in a daemon thread
registered in a process-wide registry (``st.cache_resource``); the page keeps only the job id in
``st.session_state`` and shows progress with :func:`job_progress`, a fragment that reruns every second and
triggers one full rerun when the job ends.

Limits (one place): :data:`MAX_RUNNING` caps how many jobs of a kind run at once in this server process
(``"ingest"``: 1); a job started beyond the cap is ``"queued"`` and its thread sleeps on a condition variable
(no polling) until a slot frees and it is first in line. :data:`MAX_QUEUED` bounds the queue: one more is
refused with :class:`QueueFull`.

Cancel: :meth:`JobRegistry.cancel` sets the job's flag; a queued job then never starts ("cancelled"); a
running job's next ``progress(...)`` call raises :class:`JobCancelled`, the work function unwinds (an ingest
rolls back what it wrote) and the job ends "cancelled" once the exception has left the work function.

Progressive results: :attr:`Job.live` holds what the work fills in while it runs (an ingest's
:class:`polcore.ingest.LiveMap`, passed to the work as ``live=`` and set on the job by the page); the page reads
it with its own fragment (the Upload page's map).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

__all__ = [
    "MAX_RUNNING",
    "MAX_QUEUED",
    "ACTIVE",
    "Job",
    "JobCancelled",
    "QueueFull",
    "JobRegistry",
    "registry",
    "start_job",
    "cancel_job",
    "get_job",
    "find_running",
    "active_paths",
    "ordinal",
    "describe",
    "job_progress",
]

log = logging.getLogger(__name__)

#: Jobs of a kind that may run at the same time in this server process (kinds not listed: no cap). One ingest
#: at a time: an ingest uses every core and a model's memory; a second one would only slow both down.
MAX_RUNNING: dict[str, int] = {"ingest": 1}
#: Jobs of a capped kind that may wait in its queue; one more is refused (:class:`QueueFull`).
MAX_QUEUED: dict[str, int] = {"ingest": 8}
#: Statuses of a job that has not ended.
ACTIVE: tuple[str, ...] = ("queued", "running")


class JobCancelled(Exception):
    """Raised by :meth:`Job.progress` once the job was asked to stop (an ``Exception``, so the work's own
    clean-up, e.g. the ingest's rollback, runs for it)."""


class QueueFull(RuntimeError):
    """The queue of this kind of job is full: try again later."""


@dataclass
class Job:
    """One background task and what it reported.

    Attributes
    ----------
    job_id, kind, label : identity, a kind tag ("demo", "ingest") and a human label.
    fraction : progress in [0, 1].
    message : last progress message.
    status : "queued", "running", "done", "failed" or "cancelled".
    result : return value of the work function when done.
    error : short error message when failed (the traceback goes to the log).
    created, started, finished : time.time() stamps [s] (``started`` is None while queued).
    path : the file the job works on (an ingest's scan), so the upload clean-up leaves it alone.
    live : what the work fills in while it runs, for the page to show (an ingest's
        :class:`polcore.ingest.LiveMap`: the class map so far, patterns/s, time left); thread-safe itself.
    """

    job_id: str
    kind: str
    label: str
    fraction: float = 0.0
    message: str = "starting"
    status: str = "running"
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    path: str | None = None
    live: Any = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def elapsed(self) -> float:
        """Seconds since the work started (until finish when finished; 0 while queued)."""
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def waited(self) -> float:
        """Seconds since the job was created (queue time included)."""
        return (self.finished or time.time()) - self.created

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`JobRegistry.cancel` was called for this job."""
        return self._cancel.is_set()

    def progress(self, fraction: float, message: str = "") -> None:
        """The ``polcore.progress`` callback: ``progress(fraction, message)``.

        Raises :class:`JobCancelled` when the job was cancelled (that is how a cancel reaches the work); a bad
        value is otherwise ignored, never stops the work.
        """
        if self._cancel.is_set():
            raise JobCancelled(f"{self.label}: cancelled")
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
    """Thread-safe map job_id -> Job shared by every session of the server process, with a FIFO queue per
    capped kind.

    Parameters
    ----------
    max_running, max_queued : caps per kind (default :data:`MAX_RUNNING`, :data:`MAX_QUEUED`).
    """

    def __init__(self, max_running: dict[str, int] | None = None, max_queued: dict[str, int] | None = None):
        self._jobs: dict[str, Job] = {}
        self._max_running = dict(MAX_RUNNING if max_running is None else max_running)
        self._max_queued = dict(MAX_QUEUED if max_queued is None else max_queued)
        self._cond = threading.Condition()  # guards _jobs, _queues and _running
        self._queues: dict[str, deque[str]] = {}
        self._running: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ lookup

    def add(self, job: Job) -> None:
        with self._cond:
            self._jobs[job.job_id] = job

    def get(self, job_id: str | None) -> Job | None:
        if not job_id:
            return None
        with self._cond:
            return self._jobs.get(job_id)

    def running(self, kind: str | None = None) -> list[Job]:
        with self._cond:
            return [
                j for j in self._jobs.values() if j.status == "running" and (kind is None or j.kind == kind)
            ]

    def active(self, kind: str | None = None) -> list[Job]:
        """Queued and running jobs (of a kind)."""
        with self._cond:
            return [j for j in self._jobs.values() if j.status in ACTIVE and (kind is None or j.kind == kind)]

    def position(self, job_id: str) -> int | None:
        """1 for the next queued job to start, 2 for the one after it, ...; None when not queued."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status != "queued":
                return None
            waiting = [j for j in self._queues.get(job.kind, ()) if self._jobs[j].status == "queued"]
            return waiting.index(job_id) + 1 if job_id in waiting else None

    # ------------------------------------------------------------------------------------------ work

    def start(self, kind: str, label: str, fn: Callable[..., Any], /, *args, **kwargs) -> Job:
        """Run ``fn(*args, progress=job.progress, **kwargs)`` in a daemon thread (see :func:`start_job`)."""
        job = Job(job_id=uuid.uuid4().hex[:12], kind=kind, label=label)
        cap = self._max_running.get(kind)
        with self._cond:
            if cap is not None:
                queue = self._queues.setdefault(kind, deque())
                must_wait = queue or self._running.get(kind, 0) >= cap
                limit = self._max_queued.get(kind)
                if must_wait and limit is not None and len(queue) >= limit:
                    raise QueueFull(
                        f"{len(queue)} {kind} job(s) are already waiting (at most {limit}); try again later."
                    )
                queue.append(job.job_id)
                job.status, job.message = ("queued", "waiting") if must_wait else ("running", "starting")
            self._jobs[job.job_id] = job
        thread = threading.Thread(
            target=self._run, args=(job, fn, args, kwargs), name=f"polbench-{kind}-{job.job_id}", daemon=True
        )
        thread.start()
        return job

    def cancel(self, job_id: str | None) -> bool:
        """Ask a queued or running job to stop; True when it was active. A queued job never starts."""
        with self._cond:
            job = self._jobs.get(job_id) if job_id else None
            if job is None or job.status not in ACTIVE:
                return False
            job._cancel.set()
            with job._lock:
                job.message = "cancelling (rolling back)" if job.status == "running" else "cancelling"
            self._cond.notify_all()  # wake a queued job's thread: it leaves the queue
            return True

    def _acquire(self, job: Job) -> bool:
        """Wait (on the condition, no polling) until the job is first in its queue and a slot is free;
        False when it was cancelled meanwhile (it then leaves the queue)."""
        cap = self._max_running.get(job.kind)
        if cap is None:
            with job._lock:
                job.status, job.started = "running", time.time()
            return True
        with self._cond:
            queue = self._queues[job.kind]
            while not job.cancel_requested and not (
                queue[0] == job.job_id and self._running.get(job.kind, 0) < cap
            ):
                self._cond.wait()
            queue.remove(job.job_id)
            if job.cancel_requested:
                self._cond.notify_all()  # the next in line may be first now
                return False
            self._running[job.kind] = self._running.get(job.kind, 0) + 1
            with job._lock:
                job.status, job.started, job.message = "running", time.time(), "starting"
            return True

    def _release(self, job: Job) -> None:
        if self._max_running.get(job.kind) is None:
            return
        with self._cond:
            self._running[job.kind] -= 1
            self._cond.notify_all()

    def _finish(self, job: Job, status: str, *, result: Any = None, error: str | None = None) -> None:
        with job._lock:
            job.status = status
            job.result = result
            job.error = error
            job.finished = time.time()
            if status == "done":
                job.fraction, job.message = 1.0, "done"
            elif status == "cancelled":
                job.message = "cancelled"

    def _run(self, job: Job, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if not self._acquire(job):
            self._finish(job, "cancelled")
            return
        try:
            try:
                result = fn(*args, progress=job.progress, **kwargs)
            except JobCancelled:
                log.info("background job %s (%s) cancelled", job.job_id, job.label)
                self._finish(job, "cancelled")
                return
            except BaseException as exc:  # noqa: BLE001 - report every failure of the work as the job's error
                if job.cancel_requested:  # the work wrapped our JobCancelled: still a cancel
                    log.info("background job %s (%s) cancelled (%s)", job.job_id, job.label, exc)
                    self._finish(job, "cancelled")
                    return
                log.error("background job %s (%s) failed:\n%s", job.job_id, job.label, traceback.format_exc())
                self._finish(job, "failed", error=_short_error(exc))
                return
            self._finish(job, "done", result=result)
        finally:
            self._release(job)


@st.cache_resource(show_spinner=False)
def registry() -> JobRegistry:
    """The process-wide job registry."""
    return JobRegistry()


def start_job(kind: str, label: str, fn: Callable[..., Any], /, *args, **kwargs) -> Job:
    """Run ``fn(*args, progress=job.progress, **kwargs)`` in a daemon thread and register it.

    ``kind``, ``label`` and ``fn`` are positional-only, so ``kwargs`` may hold the same names for ``fn``.
    A kind capped by :data:`MAX_RUNNING` ("ingest") is queued when the cap is reached: status "queued" until
    a slot frees (:class:`QueueFull` when :data:`MAX_QUEUED` are already waiting). Exceptions are caught: the
    job becomes "failed" with the exception's message (the traceback is logged), or "cancelled" after
    :func:`cancel_job`.
    """
    return registry().start(kind, label, fn, *args, **kwargs)


def cancel_job(job_id: str | None) -> bool:
    """Cancel a queued or running job (:meth:`JobRegistry.cancel`); True when it was active."""
    return registry().cancel(job_id)


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


def active_paths(kind: str | None = None) -> set[Path]:
    """Files that queued or running jobs work on (:attr:`Job.path`), resolved."""
    return {Path(j.path).resolve() for j in registry().active(kind) if j.path}


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', ..."""
    n = int(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe(job: Job, position: int | None = None) -> str:
    """One line on a job's state: 'waiting: 2nd in line', the progress message, or how it ended."""
    if job.status == "queued":
        if job.cancel_requested:
            return "cancelling"
        return f"waiting: {ordinal(position)} in line" if position else "waiting"
    return job.message


def job_progress(job_id: str, *, every: float = 1.0) -> None:
    """Show a progress bar for a job (or its place in the queue); rerun the whole page once when it ends.

    Call it only while the job is queued or running (the page shows the result otherwise), else the final
    rerun loops.
    """

    @st.fragment(run_every=every)
    def _poll() -> None:
        job = get_job(job_id)
        if job is None:
            st.warning("The background job is gone (the server restarted?).")
            return
        if job.status == "queued":
            text = describe(job, registry().position(job_id))
            st.progress(0.0, text=f"{job.label}: {text} ({job.waited:.0f} s)")
        else:
            st.progress(job.fraction, text=f"{job.label}: {job.message} ({job.elapsed:.0f} s)")
        if job.status not in ACTIVE:
            st.rerun(scope="app")

    _poll()

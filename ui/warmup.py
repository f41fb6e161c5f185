"""Import the heavy modules the pages use in a background thread, once per server process.

A page's first visit in a fresh server otherwise pays these imports inside its own script run: scipy.ndimage
and scikit-learn's metrics (Defects page: candidate regions, ROC), scipy.fft and scipy.optimize (periodic
errors tab), the pattern library and scipy.ndimage (probe viewer), matplotlib (figure export), about 2 to 3 s
on this 2-core machine. :func:`init_page <ui.page.init_page>` calls :func:`start` on every run; only the
first call starts the thread, which imports :data:`MODULES` one after the other while the user reads the
first page. A page that needs a module before the thread got there imports it itself (Python's import lock
makes the two wait for one import, never run it twice). Nothing is computed and nothing is cached here: only
``sys.modules`` fills.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time

__all__ = ["MODULES", "start", "wait"]

log = logging.getLogger(__name__)

#: Modules imported in the background, in this order (the ones the pages need first come first).
MODULES: tuple[str, ...] = (
    "polcore.figures",
    "polcore.analysis.metrics",
    "polcore.analysis.cells",
    "scipy.ndimage",
    "polcore.analysis.defects",
    "sklearn.metrics",
    "polcore.analysis.questions",
    "polcore.analysis.periodic",
    "polcore.simulate.library",
    "polcore.panel",
    "matplotlib.figure",
    "scipy.stats",
)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _run(modules: tuple[str, ...]) -> None:
    t0 = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional module missing here must not end the warm-up
            log.warning("warm-up: could not import %s", name, exc_info=True)
    log.info("warm-up: %d modules imported in %.1f s", len(modules), time.perf_counter() - t0)


def start(modules: tuple[str, ...] = MODULES) -> threading.Thread | None:
    """Start the warm-up thread (daemon) unless this process started it already.

    Returns
    -------
    threading.Thread or None
        The new thread, or None when one was started before.
    """
    global _thread
    with _lock:
        if _thread is not None:
            return None
        _thread = threading.Thread(target=_run, args=(tuple(modules),), name="polbench-warmup", daemon=True)
        _thread.start()
        return _thread


def wait(timeout: float | None = None) -> bool:
    """Wait for the warm-up thread to end; True when it has ended (or was never started)."""
    t = _thread
    if t is None:
        return True
    t.join(timeout)
    return not t.is_alive()

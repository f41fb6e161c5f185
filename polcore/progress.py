"""The one progress protocol: ``progress(fraction, message)``.

Every long call in polcore (simulation, training, ingest, benchmark, reports, demo) takes an optional
``progress`` callable and calls it as ``progress(fraction, message)`` with ``fraction`` in [0, 1] and a short
human-readable ``message``. Nothing else is accepted or produced, so a caller never has to guess a shape.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "noop", "scaled", "printer", "report", "TqdmProgress"]

#: ``progress(fraction, message)``.
Progress = Callable[[float, str], None]


def noop(fraction: float, message: str = "") -> None:
    """A progress callback that does nothing."""


def report(progress: Progress | None) -> Progress:
    """``progress`` itself, or :func:`noop` for None."""
    return progress if progress is not None else noop


def scaled(progress: Progress | None, lo: float, hi: float, prefix: str = "") -> Progress:
    """Map a sub-task's [0, 1] onto [lo, hi] of ``progress``, prefixing its messages."""
    if progress is None:
        return noop

    def sub(fraction: float, message: str = "") -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        progress(lo + (hi - lo) * f, f"{prefix}{message}")

    return sub


def printer(prefix: str, *, step: float = 0.01) -> Progress:
    """A progress callback that prints ``prefix  42.0% message`` lines, at most one per ``step`` of progress."""
    last = [-1.0]

    def progress(fraction: float, message: str = "") -> None:
        f = float(fraction)
        if f - last[0] >= step or f >= 1.0:
            last[0] = f
            print(f"{prefix} {100 * f:5.1f}% {message}", flush=True)  # noqa: T201 - the CLI's progress lines

    return progress


class TqdmProgress:
    """A ``progress(fraction, message)`` callback drawing a tqdm bar (for the command line).

    Use as a context manager: ``with TqdmProgress("quick") as p: train_profile("quick", progress=p)``.
    """

    def __init__(self, desc: str = "", total: int = 1000):
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, desc=desc, unit="‰", dynamic_ncols=True)

    def __call__(self, fraction: float, message: str) -> None:
        n = int(round(min(max(fraction, 0.0), 1.0) * self.total))
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        self.bar.set_postfix_str(message[-70:], refresh=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

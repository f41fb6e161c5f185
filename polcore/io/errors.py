"""The one exception type that scan readers raise for unreadable or unsuitable input."""

from __future__ import annotations

from os import PathLike

__all__ = ["ScanFormatError"]


class ScanFormatError(ValueError):
    """A file (or array) cannot be read as a 4D-STEM scan.

    The message always names the file, the dataset inside it when there is one, and what was wrong,
    e.g. ``scan.h5 [dataset 'data']: expected a 4D array (scan_y, scan_x, ky, kx), got shape (5, 6)``.

    Parameters
    ----------
    path : str or path-like or None
        The file that was read (None for an in-memory array).
    reason : str
        What was wrong, in words a user can act on.
    dataset : str, optional
        Dataset path inside the file (HDF5), when one was involved.

    Attributes
    ----------
    path, reason, dataset : as given (``path`` as ``str``).
    """

    def __init__(self, path: str | PathLike | None, reason: str = "", *, dataset: str | None = None):
        self.path = None if path is None else str(path)
        self.reason = reason
        self.dataset = dataset
        where = self.path if self.path is not None else "<in-memory array>"
        if dataset:
            where += f" [dataset {dataset!r}]"
        super().__init__(f"{where}: {reason}" if reason else where)

    def __reduce__(self):
        return (_rebuild, (self.path, self.reason, self.dataset))


def _rebuild(path, reason, dataset):
    return ScanFormatError(path, reason, dataset=dataset)

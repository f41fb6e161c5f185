"""Shared types: the 8 projected polarization classes, angle helpers, scan metadata, filters.

Conventions (see PHYSICS.md): 4D arrays are (scan_y, scan_x, ky, kx); x/kx run along columns (left to
right), y/ky along rows (top to bottom, row 0 shown at the top). A polarization angle is counter-clockwise
as seen on screen: ``angle = atan2(-P_y, P_x)`` with P in those x (right) / y (down) coordinates.
Class ``k`` <-> angle ``45 deg * k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "N_CLASSES",
    "ScanMeta",
    "Filters",
    "class_to_angle",
    "angle_to_class",
    "class_to_vector",
    "vector_to_angle",
    "circular_class_distance",
    "polarization_angle",
    "jsonable",
]

#: Class names in index order; index k points at 45 deg * k counter-clockwise from +x.
CLASS_NAMES: tuple[str, ...] = ("RM", "RU", "MU", "LU", "LM", "LD", "MD", "RD")
N_CLASSES = len(CLASS_NAMES)


def class_to_angle(k):
    """Angle [deg] of class index ``k`` (int or int array), in [0, 360)."""
    return (np.asarray(k) % N_CLASSES) * (360.0 / N_CLASSES)


def angle_to_class(angle_deg):
    """Nearest class index for an angle [deg] (any real value, scalar or array).

    Angles exactly half-way between two classes go to the larger index modulo 8 (e.g. 22.5 -> 1).
    """
    a = np.mod(np.asarray(angle_deg, dtype=float), 360.0)
    k = np.floor(a / (360.0 / N_CLASSES) + 0.5).astype(int) % N_CLASSES
    return int(k) if np.ndim(k) == 0 else k


def class_to_vector(k):
    """Unit vector (cos, sin) of class ``k`` in the on-screen counter-clockwise frame; shape (..., 2)."""
    a = np.deg2rad(class_to_angle(k))
    return np.stack([np.cos(a), np.sin(a)], axis=-1)


def vector_to_angle(v):
    """Angle [deg] in [0, 360) of vectors (..., 2) given as (cos, sin) components."""
    v = np.asarray(v, dtype=float)
    return np.mod(np.rad2deg(np.arctan2(v[..., 1], v[..., 0])), 360.0)


def polarization_angle(p_x: float, p_y: float) -> float:
    """On-screen angle [deg] of a polarization with components along +x (right) and +y (down)."""
    return math.degrees(math.atan2(-p_y, p_x)) % 360.0


def circular_class_distance(a, b):
    """Number of 45-degree steps between class indices (0..4), elementwise."""
    d = np.abs(np.asarray(a) - np.asarray(b)) % N_CLASSES
    return np.minimum(d, N_CLASSES - d)


@dataclass(frozen=True)
class ScanMeta:
    """Calibration of a scan; every field may be unknown (None).

    Attributes
    ----------
    step_nm : probe step [nm] (scan pixel size).
    mrad_per_px : detector angular sampling [mrad/px].
    voltage_kv : accelerating voltage [kV].
    convergence_mrad : probe semi-angle [mrad].
    rotation_deg, flip : scan-detector rotation [deg] and transpose flag (py4DSTEM QR_rotation/QR_flip).
    source : short description of where the calibration came from.
    extra : anything else the file says (JSON-serialisable).
    """

    step_nm: float | None = None
    mrad_per_px: float | None = None
    voltage_kv: float | None = None
    convergence_mrad: float | None = None
    rotation_deg: float | None = None
    flip: bool | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Filters:
    """The dashboard's and the reports' filters, with ONE meaning wherever they apply.

    thickness : (lo, hi) [nm], inclusive, or None for all; positions of unknown thickness drop out when set.
    region : (y0, y1, x0, x1) scan-pixel rectangle, inclusive bounds, or None for the whole scan. A region is
        always a mask: maps keep their shape and positions outside are left out (NaN), never cropped.

    The same test is applied to a grid (:meth:`mask`, :meth:`apply`), to a frame
    (``polcore.analysis.apply_filters``) and in SQL (``polcore.store.queries``).
    """

    thickness: tuple[float, float] | None = None
    region: tuple[int, int, int, int] | None = None

    def __post_init__(self):
        if self.thickness is not None:
            if len(self.thickness) != 2:
                raise ValueError(f"Filters.thickness must be (lo, hi) [nm], got {self.thickness!r}")
            lo, hi = (float(v) for v in self.thickness)
            object.__setattr__(self, "thickness", (min(lo, hi), max(lo, hi)))
        if self.region is not None:
            if len(self.region) != 4:
                raise ValueError(f"Filters.region must be (y0, y1, x0, x1) scan pixels, got {self.region!r}")
            y0, y1, x0, x1 = (int(v) for v in self.region)
            object.__setattr__(self, "region", (min(y0, y1), max(y0, y1), min(x0, x1), max(x0, x1)))

    @property
    def active(self) -> bool:
        return self.thickness is not None or self.region is not None

    def keep(self, iy, ix, thickness_nm=None) -> np.ndarray:
        """Boolean: which positions (iy, ix) with local thickness ``thickness_nm`` [nm] pass."""
        iy, ix = np.asarray(iy), np.asarray(ix)
        out = np.ones(np.broadcast(iy, ix).shape, bool)
        if self.thickness is not None:
            if thickness_nm is None:
                raise ValueError("a thickness filter needs the local thickness")
            t = np.asarray(thickness_nm, float)
            out &= (t >= self.thickness[0]) & (t <= self.thickness[1])
        if self.region is not None:
            y0, y1, x0, x1 = self.region
            out &= (iy >= y0) & (iy <= y1) & (ix >= x0) & (ix <= x1)
        return out

    def mask(self, shape: tuple[int, int], thickness_nm=None) -> np.ndarray:
        """Boolean (ny, nx) grid of the positions that pass (``thickness_nm``: an (ny, nx) grid or None)."""
        iy, ix = np.indices(tuple(shape))
        return self.keep(iy, ix, thickness_nm)

    def apply(self, values, thickness_nm=None) -> np.ndarray:
        """Float copy of an (ny, nx) grid with NaN where a position does not pass."""
        v = np.array(values, dtype=float)
        if self.active:
            v[~self.mask(v.shape, thickness_nm)] = np.nan
        return v

    def key(self) -> tuple:
        """Hashable form (cache keys): ((lo, hi) | None, (y0, y1, x0, x1) | None)."""
        return (self.thickness, self.region)

    @classmethod
    def from_key(cls, key: tuple | None) -> Filters:
        """Inverse of :meth:`key` (None = no filter)."""
        if key is None:
            return cls()
        th, rg = key
        return cls(thickness=None if th is None else tuple(th), region=None if rg is None else tuple(rg))


def jsonable(obj):
    """A JSON-serialisable copy of ``obj``: numpy scalars/arrays to Python, paths to str, keys to str."""
    from pathlib import PurePath

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    return obj

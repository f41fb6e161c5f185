"""Unit handling for scan calibrations: electron wavelength, real-space and reciprocal-space units."""

from __future__ import annotations

import math
import re

__all__ = ["electron_wavelength_A", "length_to_nm", "reciprocal_to_mrad", "as_kv"]

_H = 6.62607015e-34  # Planck constant [J s]
_M0 = 9.1093837015e-31  # electron rest mass [kg]
_E = 1.602176634e-19  # elementary charge [C]
_C = 299792458.0  # speed of light [m/s]


def electron_wavelength_A(voltage_kv: float) -> float:
    """Relativistic electron wavelength [Å] for an accelerating voltage [kV] (200 kV -> 0.02508 Å)."""
    if not voltage_kv or voltage_kv <= 0:
        raise ValueError(f"voltage must be > 0 kV, got {voltage_kv!r}")
    v = voltage_kv * 1e3
    return _H / math.sqrt(2 * _M0 * _E * v * (1 + _E * v / (2 * _M0 * _C**2))) * 1e10


def _norm_units(units) -> str:
    if units is None:
        return ""
    if isinstance(units, bytes):
        units = units.decode("utf-8", "replace")
    u = str(units).strip().replace("Å", "A").replace("µ", "u").replace(" ", "")
    # Prismatic writes "[n_m]" / "[n_m^-1]"
    u = re.sub(r"[\[\]_]", "", u)
    return u.lower()


_LENGTH_NM = {"nm": 1.0, "a": 0.1, "angstrom": 0.1, "ang": 0.1, "pm": 1e-3, "um": 1e3, "m": 1e9}
_RECIP_PER_A = {
    "a^-1": 1.0,
    "a-1": 1.0,
    "1/a": 1.0,
    "angstrom^-1": 1.0,
    "1/angstrom": 1.0,
    "nm^-1": 0.1,
    "nm-1": 0.1,
    "1/nm": 0.1,
}


def length_to_nm(value, units) -> float | None:
    """Convert a real-space length to nm; None when the units are pixels/unknown or the value unusable."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    factor = _LENGTH_NM.get(_norm_units(units))
    if factor is None or not math.isfinite(v) or v <= 0:
        return None
    return v * factor


def reciprocal_to_mrad(value, units, voltage_kv: float | None) -> float | None:
    """Convert a detector sampling to mrad/px.

    ``units`` may be angular (``mrad``, ``rad``) or reciprocal length (``A^-1``, ``nm^-1``: scattering
    vector q = 1/d, angle = wavelength * q), the latter needing the voltage; None when not convertible.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or v <= 0:
        return None
    u = _norm_units(units)
    if u == "mrad":
        return v
    if u == "rad":
        return v * 1e3
    per_a = _RECIP_PER_A.get(u)
    if per_a is None or not voltage_kv:
        return None
    return v * per_a * electron_wavelength_A(voltage_kv) * 1e3


def as_kv(value) -> float | None:
    """Interpret an accelerating voltage given in V or kV (values above 1000 are taken as volts)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or v <= 0:
        return None
    return v / 1e3 if v > 1000 else v

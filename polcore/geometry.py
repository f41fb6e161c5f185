"""Scan geometry: the detector's rotation and flip against the scan, the descan and the camera length.

A direction must mean the same on every microscope. A real detector is rotated against the scan axes (tens of
degrees, sometimes with a transpose), the bright-field disc wanders across the detector while the probe scans
(descan), and the camera length differs from the library's. This module finds those numbers in a scan's own
data (or takes them from the file's calibration or from the user) and applies them to the patterns, so that the
models see every pattern centred on its disc and expressed in the *scan* frame of the polcore conventions
(``../shared/design/PHYSICS.md``: x/kx along columns to the right, y/ky along rows downwards, angles
counter-clockwise on screen, ``angle = atan2(-v_y, v_x)``).

Conventions implemented (the same as py4DSTEM's ``QR_rotation_degrees`` / ``QR_flip``)
--------------------------------------------------------------------------------------
A vector measured on the detector, ``v_det = (v_x, v_y)`` along (kx, ky) [px], is expressed in the scan frame as

    v_scan = R(rotation_deg) @ F(flip) @ v_det

* ``F`` is the transpose of the detector axes, applied **first**: ``F(True)`` swaps the two components
  (``(v_x, v_y) -> (v_y, v_x)``, i.e. ``pattern.T``); ``F(False)`` is the identity.
* ``R(t)`` turns a vector **counter-clockwise on screen** by ``t`` degrees. With y pointing down this is
  ``x' = cos t * x + sin t * y``, ``y' = -sin t * x + cos t * y``: +x (right) turns towards -y (up) for t > 0.

py4DSTEM stores the same two numbers in ``Calibration.QR_rotation_degrees`` and ``QR_flip`` and applies them to
detector vectors exactly so. Read in py4DSTEM's source (``py4DSTEM/braggvectors/braggvectors.py``,
``CalibratedVectorGetter._transform``, and ``py4DSTEM/process/phase/phase_base_class.py``,
``_solve_for_center_of_mass_relative_rotation``): with ``R = [[cos, -sin], [sin, cos]]`` the calibrated vector is
``R @ (qy, qx)`` when ``QR_flip`` else ``R @ (qx, qy)``, where py4DSTEM's ``qx``/``Rx`` run along the *first*
array axis (rows) and ``qy``/``Ry`` along the second (columns); the phase code rotates the measured CoM
``(com_x, com_y)`` the same way (transposed: components swapped first) and minimises the curl of the result in
the scan frame. Written in polcore's (x = columns, y = rows) components, py4DSTEM's matrix is exactly the
counter-clockwise-on-screen ``R`` above, and its flip is the same swap, applied before the rotation; a py4DSTEM
file's ``QR_rotation_degrees``/``QR_flip`` (read into ``ScanMeta.rotation_deg``/``flip`` by
:mod:`polcore.io.hdf5`) can therefore be used here unchanged. Equivalent statements: a detector whose recorded
image is ``np.rot90(true_pattern, k=1)`` (content turned counter-clockwise by 90 degrees) has
``rotation_deg = -90``; a detector that records ``true_pattern.T`` has ``flip = True, rotation_deg = 0``.

Descan: the disc centre ``(cy, cx)`` [detector px] at probe position ``(iy, ix)`` is a low-order polynomial
surface, coefficients over :data:`DESCAN_TERMS` (raw scan indices, no normalisation). Applying the geometry puts
each pattern's disc centre on the detector centre ``(ky // 2, kx // 2)`` (the optical axis of the library and of
:class:`polcore.preprocess.Preprocessor`).

Estimation from the data (each with a confidence)
-------------------------------------------------
* :func:`measure_disc_centres`: the disc centre from its **edge**, not the centre of mass (which carries the
  polarization signal): along 64 rays the edge is where the smoothed profile crosses half-way between the
  local level just inside and just outside the edge, then a circle is fitted to the edge points (Kasa, with
  outlier rejection), after dividing each pattern by the plane fitted to its intensity inside the disc. An
  intensity tilt inside the disc moves the CoM but not the edge.
* :func:`fit_descan`: a robust (iteratively reweighted, Tukey biweight) least-squares surface through the
  centres, fitted together with the residual's strongest lattice-periodic components (the per-pattern centre
  error repeats with the unit cell and would otherwise tilt the surface), with its range over the scan, its
  residual and the standard error where it is extrapolated.
* :func:`estimate_rotation`: the CoM field (descan removed) of an atomic-resolution scan is close to curl-free
  in the right frame (py4DSTEM's criterion, re-derived here): the curl of the rotated field is
  ``cos t * curl(u) - sin t * div(u)``, so the mean squared curl is a quadratic form in ``(cos t, sin t)`` and
  its smallest eigenvector gives the rotation in closed form (no angle grid); both flips are tried. The curl
  criterion fixes the rotation modulo 180 degrees; the half-turn is resolved with the dark-field rule below.
* :func:`estimate_geometry` / :func:`estimate_geometry_from`: file calibration, user overrides and estimates
  combined, each number with its source.

The half-turn rule, and how far it holds
----------------------------------------
At atomic resolution the CoM deflection points towards the atom columns (the electron is attracted by the
positive nuclear potential), and the columns are where the dark-field intensity (an annulus outside the
bright-field disc, rotation-invariant) is high. So in the right frame the CoM field points *up* the gradient of
the dark-field image, equivalently ``div(CoM)`` is negative where the dark field is bright. The rule takes the
sign of the normalised correlation ``r = <v . grad DF> / sqrt(<|v|^2><|grad DF|^2>)`` and adds 180 degrees when
it is negative. Measured on the committed library (``data/library/knn_default.h5``, 8 x 8 probe positions per
cell, every variant x configuration, noise-free, annulus 1.2 R .. detector edge): at 10 nm ``r`` lies in
[+0.59, +0.78] for all 96 entries (rule always right); at 20, 35 and 50 nm channelling reverses the contrast for
part of the configurations (the sign follows mainly the probe defocus): ``r`` spans [-0.39, +0.76], [-0.31, +0.68]
and [-0.47, +0.64], right sign for 78 %, 67 % and 50 % of the entries. No wrongly signed entry reached
``|r| >= 0.5``, so the half-turn is trusted (confidence 'high') only above that; below it the rotation is returned
with the rule's sign but the half-turn is reported as ambiguous (confidence 'low', ``info['alternative_deg']``).
On composed 32 x 32 scans (2e4 e-) ``|r|`` was 0.61-0.64 at 10 nm, 0.04 at 20 nm and 0.21 *with the wrong sign*
at 35 nm: flagged 'low' in both thick cases, as it must be.

Confidence rules (``'high'``, ``'low'``, ``'none'``)
-----------------------------------------------------
Rotation (see :func:`estimate_rotation`): 'none' (refused, with a reason) when fewer than 49 complete 2 x 2
plaquettes exist (smaller than an 8 x 8 block of positions), when the CoM field has no spatial contrast above
its noise (variance below 2x the Poisson variance when that is known) or when its curl contrast
``kappa = (l_max - l_min) / (l_max + l_min)`` (0 for isotropic noise, 1 for a perfect gradient field; equals
(median - min) / median of the curl over angles) is not above the largest of 32 position-shuffled copies of the
field plus 0.1. 'high' needs ``kappa >= 0.3``, a statistical standard error (from 3 x 3 sub-blocks, 2 x 2 on
small fields) of at most 1.5 degrees, the flip's minimum curl at least 1.5x lower than the other flip's and a
trusted half-turn (``|r| >= 0.5``); anything else is 'low'. Descan: 'high' when at least 64 centres were used,
they span at least half of the scan's rows and of its columns, and the fitted surface's standard error at the
worst corner of the scan is at most 0.25 px, else 'low' (leading rows only: the surface is extrapolated along
y). Camera length from the disc radius and the convergence semi-angle: always 'low' (the edge of overlapping
CBED discs is not a sharp aperture edge).

Measured (``benchmarks/geometry_bench.py``: composed 32 x 32 scans, random domains, random rotation x both
flips, +-3 px descan ramp, Poisson noise; 40 runs per row)
----------------------------------------------------------------------------------------------------------------
* 10 nm, 2e4 and 5e3 e-: flip right 40/40, half-turn right 40/40, every run 'high'; rotation error median
  0.25 / 0.37 deg, max 1.41 / 1.17 deg; descan surface error max 0.14 / 0.11 px, range error max 0.24 / 0.12 px.
* 20 nm (10 runs per dose): flip right 20/20; modulo 180 deg the error has a systematic part of about -1 deg
  (median 1.1, max 2.05 / 2.28 deg); the dark-field rule is near zero (``|r|`` about 0.05) and its sign was
  wrong in 8/10 runs per dose, every one flagged 'low' (no 'high' answer was wrong).
* With ``--refine-model`` (the shipped CNN; :mod:`polcore.refine`, which the ingest applies to a trusted estimate):
  |error| mod 180 deg max 0.67 deg at 10 nm and 0.92 deg at 20 nm (10 runs each, 2e4 e-); the model's entropy
  180 deg away differs by at most 0.027 nats: the half-turn is not in the patterns themselves.
* The estimator is exact on an analytic gradient field (errors below 0.001 deg for any angle and flip): the
  residual error on composed scans is that of the CoM field of a thick, tilted crystal, not of the method.
* :func:`apply_geometry`: about 3,000 patterns/s for 64 x 64 patterns in batches of 256 on one core of this
  2-core machine (3,098 per CPU-second in the benchmark, which prints it independently of other jobs);
  :func:`estimate_geometry_from` on 1,024 patterns of 64 x 64: about 0.5 s.

numpy and scipy only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DESCAN_TERMS",
    "SOURCES",
    "Geometry",
    "DescanFit",
    "apply_geometry",
    "rotate_vectors",
    "rotation_matrix",
    "centre_of_mass",
    "measure_disc_centres",
    "fit_descan",
    "estimate_rotation",
    "estimate_geometry",
    "estimate_geometry_from",
]

#: Where a number came from.
SOURCES = ("file", "user", "estimated", "default")
#: Terms of the descan surface per order, over raw scan indices (iy = row, ix = column).
DESCAN_TERMS = {1: ("1", "iy", "ix"), 2: ("1", "iy", "ix", "iy^2", "iy*ix", "ix^2")}

_OVERRIDE_KEYS = ("rotation_deg", "flip", "mrad_per_px", "descan_y", "descan_x")

# thresholds of the confidence rules (documented in the module docstring)
MIN_PLAQUETTES = 49
KAPPA_HIGH = 0.3
KAPPA_MARGIN = 0.1
SE_HIGH_DEG = 1.5
FLIP_RATIO_HIGH = 1.5
HALF_TURN_R = 0.5
NOISE_VAR_RATIO = 2.0
DESCAN_SE_HIGH = 0.25
DESCAN_COVERAGE_HIGH = 0.5
_COORD_BUDGET = 1 << 20  # output pixels per map_coordinates call in apply_geometry (3 x 8 bytes each: 24 MiB)


# ----------------------------------------------------------------------------------------------------------------
# the geometry and its application
# ----------------------------------------------------------------------------------------------------------------
def rotation_matrix(rotation_deg: float, flip: bool = False) -> np.ndarray:
    """The 2 x 2 detector-to-scan matrix ``R(rotation_deg) @ F(flip)`` acting on ``(v_x, v_y)`` columns.

    ``R`` turns counter-clockwise on screen (y down), ``F`` swaps the components (transpose), applied first.
    """
    t = math.radians(float(rotation_deg))
    c, s = math.cos(t), math.sin(t)
    R = np.array([[c, s], [-s, c]])
    return R @ np.array([[0.0, 1.0], [1.0, 0.0]]) if flip else R


def _design(iy, ix, order: int) -> np.ndarray:
    iy = np.asarray(iy, dtype=np.float64)
    ix = np.asarray(ix, dtype=np.float64)
    cols = [np.ones_like(iy), iy, ix]
    if order == 2:
        cols += [iy * iy, iy * ix, ix * ix]
    elif order != 1:
        raise ValueError(f"descan order must be 1 or 2, got {order!r}")
    return np.stack(cols, axis=-1)


def _as_positions(positions, n: int | None = None) -> np.ndarray:
    p = np.asarray(positions)
    if p.ndim == 1 and p.shape[0] == 2 and n in (None, 1):
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"positions must be (n, 2) [iy, ix], got shape {p.shape}")
    if n is not None and p.shape[0] != n:
        raise ValueError(f"{p.shape[0]} positions for {n} patterns")
    return p


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    return x


@dataclass(frozen=True)
class Geometry:
    """A scan's geometry: how detector directions map to scan directions, where the disc is, the sampling.

    Attributes
    ----------
    rotation_deg : float
        Detector-to-scan rotation [deg], counter-clockwise on screen, in (-180, 180]; py4DSTEM
        ``QR_rotation_degrees`` (see the module docstring for the exact convention).
    flip : bool
        Transpose of the detector axes, applied before the rotation; py4DSTEM ``QR_flip``.
    descan_y, descan_x : tuple of float or None
        Coefficients of the disc-centre surface ``cy(iy, ix)``, ``cx(iy, ix)`` [detector px] over
        ``DESCAN_TERMS[order]`` (3 terms: affine, 6 terms: quadratic); None = the disc sits at the detector
        centre ``(ky // 2, kx // 2)`` everywhere.
    mrad_per_px : float or None
        Detector sampling [mrad/px]; None = unknown.
    sources : dict
        ``{'rotation_deg' | 'flip' | 'descan' | 'mrad_per_px': 'file' | 'user' | 'estimated' | 'default'}``.
    confidence : dict
        For estimated (or refused) numbers: ``'high'``, ``'low'`` or ``'none'`` per key of ``sources``.
    notes : tuple of str
        Human-readable remarks (refusal reasons, file-versus-data disagreements, ambiguities).
    details : dict
        JSON-able numbers behind the estimates (curl contrast, residuals, ...).
    """

    rotation_deg: float = 0.0
    flip: bool = False
    descan_y: tuple | None = None
    descan_x: tuple | None = None
    mrad_per_px: float | None = None
    sources: dict = field(default_factory=dict)
    confidence: dict = field(default_factory=dict)
    notes: tuple = ()
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        rot = float(self.rotation_deg)
        if not math.isfinite(rot):
            raise ValueError(f"rotation_deg must be finite, got {self.rotation_deg!r}")
        rot = -((-rot + 180.0) % 360.0 - 180.0)  # (-180, 180]
        object.__setattr__(self, "rotation_deg", 0.0 if rot == 0 else rot)
        object.__setattr__(self, "flip", bool(self.flip))
        if (self.descan_y is None) != (self.descan_x is None):
            raise ValueError("descan_y and descan_x must both be given or both be None")
        if self.descan_y is not None:
            dy = tuple(float(v) for v in self.descan_y)
            dx = tuple(float(v) for v in self.descan_x)
            if len(dy) != len(dx) or len(dy) not in (3, 6) or not all(map(math.isfinite, dy + dx)):
                raise ValueError(f"descan coefficients must be 3 (affine) or 6 (quadratic) finite numbers each, "
                                 f"got {len(dy)} and {len(dx)}")
            object.__setattr__(self, "descan_y", dy)
            object.__setattr__(self, "descan_x", dx)
        if self.mrad_per_px is not None:
            m = float(self.mrad_per_px)
            if not (math.isfinite(m) and m > 0):
                raise ValueError(f"mrad_per_px must be > 0, got {self.mrad_per_px!r}")
            object.__setattr__(self, "mrad_per_px", m)
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))
        for k, v in self.sources.items():
            if v not in SOURCES:
                raise ValueError(f"sources[{k!r}] must be one of {SOURCES}, got {v!r}")

    @property
    def descan_order(self) -> int:
        """0 (no descan surface), 1 (affine) or 2 (quadratic)."""
        return 0 if self.descan_y is None else (1 if len(self.descan_y) == 3 else 2)

    def matrix(self) -> np.ndarray:
        """Detector-to-scan 2 x 2 matrix on ``(v_x, v_y)`` columns (see :func:`rotation_matrix`)."""
        return rotation_matrix(self.rotation_deg, self.flip)

    def disc_centre(self, positions, sig_shape=None) -> np.ndarray:
        """Disc centre ``(cy, cx)`` [detector px] at probe positions ``(n, 2)`` [iy, ix] -> ``(n, 2)``.

        Without a descan surface the detector centre ``(ky // 2, kx // 2)`` of ``sig_shape`` is returned.
        """
        p = _as_positions(positions)
        if self.descan_y is None:
            if sig_shape is None:
                raise ValueError("this geometry has no descan surface: give sig_shape for the detector centre")
            ky, kx = (int(s) for s in sig_shape)
            return np.tile(np.array([ky // 2, kx // 2], np.float64), (len(p), 1))
        A = _design(p[:, 0], p[:, 1], self.descan_order)
        return np.stack([A @ np.asarray(self.descan_y), A @ np.asarray(self.descan_x)], axis=1)

    def replace(self, **changes) -> Geometry:
        """A copy with some fields changed (dataclasses.replace)."""
        import dataclasses

        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able dict (round trip with :meth:`from_dict`)."""
        return _jsonable(dict(
            rotation_deg=self.rotation_deg, flip=self.flip,
            descan_y=None if self.descan_y is None else list(self.descan_y),
            descan_x=None if self.descan_x is None else list(self.descan_x),
            descan_terms=list(DESCAN_TERMS[self.descan_order]) if self.descan_order else None,
            mrad_per_px=self.mrad_per_px, sources=dict(self.sources), confidence=dict(self.confidence),
            notes=list(self.notes), details=dict(self.details),
            convention="v_scan = R(rotation_deg, counter-clockwise on screen) @ F(flip: swap kx/ky first) @ v_det; "
                       "py4DSTEM QR_rotation_degrees / QR_flip",
        ))

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        return cls(
            rotation_deg=float(d.get("rotation_deg", 0.0) or 0.0),
            flip=bool(d.get("flip", False)),
            descan_y=None if d.get("descan_y") is None else tuple(d["descan_y"]),
            descan_x=None if d.get("descan_x") is None else tuple(d["descan_x"]),
            mrad_per_px=d.get("mrad_per_px"),
            sources=dict(d.get("sources") or {}),
            confidence=dict(d.get("confidence") or {}),
            notes=tuple(d.get("notes") or ()),
            details=dict(d.get("details") or {}),
        )


def apply_geometry(patterns, positions, geom: Geometry, out_size=None, *, target_mrad_per_px: float | None = None,
                   cval: float = 0.0) -> np.ndarray:
    """Centre every pattern on its disc and express it in the scan frame.

    Output pixel ``o`` (``(oy, ox)``, centre ``(H // 2, W // 2)``) holds the detector intensity at
    ``centre(iy, ix) + M^-1 (o - o_centre) * scale`` with ``M = geom.matrix()`` (flip first, then the
    counter-clockwise rotation) and ``centre`` the disc centre from the descan surface at the pattern's probe
    position. So a direction in the output means the same as in the scan (and in the library): a CoM shift
    towards the output's +x is a deflection towards the scan's +x.

    One ``scipy.ndimage.map_coordinates`` call (order 1, bilinear) per batch over the stack of patterns with a
    stacked coordinate grid ``(pattern index, row, column)``; no Python loop over patterns (a batch is split
    only when its coordinate grid would exceed 24 MiB: more than 256 patterns of 64 x 64, or 16 of
    256 x 256). Speed: see "Measured" in the module docstring.

    Parameters
    ----------
    patterns : (n, ky, kx) or (ky, kx) array (any real dtype).
    positions : (n, 2) int [iy, ix] probe positions (used for the descan surface).
    geom : Geometry.
    out_size : (H, W) or int; default the input's (ky, kx).
    target_mrad_per_px : resample to this sampling [mrad/px] (needs ``geom.mrad_per_px``); None = keep the
        detector's pixel size. Intensities are scaled by the pixel-area ratio, so counts per solid angle stay.
    cval : value outside the detector.

    Returns
    -------
    float32 (n, H, W) (or (H, W) for a single pattern).
    """
    from scipy import ndimage

    x = np.asarray(patterns)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"patterns must be (n, ky, kx), got shape {np.shape(patterns)}")
    n, ky, kx = x.shape
    pos = _as_positions(positions, n)
    if out_size is None:
        H, W = ky, kx
    elif np.ndim(out_size) == 0:
        H = W = int(out_size)
    else:
        H, W = (int(v) for v in out_size)
    scale = 1.0
    if target_mrad_per_px is not None:
        if geom.mrad_per_px is None:
            raise ValueError("target_mrad_per_px needs the geometry's mrad_per_px")
        scale = float(target_mrad_per_px) / geom.mrad_per_px
    centres = geom.disc_centre(pos, (ky, kx))
    Minv = np.linalg.inv(geom.matrix())
    oy, ox = np.mgrid[0:H, 0:W]
    qx = (ox - W // 2) * scale
    qy = (oy - H // 2) * scale
    dx = Minv[0, 0] * qx + Minv[0, 1] * qy
    dy = Minv[1, 0] * qx + Minv[1, 1] * qy
    out = np.empty((n, H, W), np.float32)
    step = max(1, _COORD_BUDGET // (H * W))  # coordinates are 3 x 8 bytes per output pixel
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        src = x[s0:s1] if x.dtype == np.float32 else x[s0:s1].astype(np.float32)
        coords = np.empty((3, s1 - s0, H, W), np.float64)
        coords[0] = np.arange(s1 - s0)[:, None, None]
        coords[1] = centres[s0:s1, 0, None, None] + dy[None]
        coords[2] = centres[s0:s1, 1, None, None] + dx[None]
        # 'grid-constant': bilinear everywhere, with ``cval`` beyond the detector (partial border pixels kept)
        ndimage.map_coordinates(src, coords, order=1, mode="grid-constant", cval=float(cval), output=out[s0:s1])
    if scale != 1.0:
        out *= np.float32(scale * scale)
    return out[0] if single else out


def rotate_vectors(vx, vy, geom: Geometry, *, inverse: bool = False):
    """Detector-frame vectors (along kx, along ky) -> scan-frame (along x, along y); ``inverse`` goes back.

    Works elementwise on arrays of any (matching) shape, e.g. CoM shifts [px].
    """
    M = geom.matrix()
    if inverse:
        M = np.linalg.inv(M)
    vx = np.asarray(vx, dtype=np.float64)
    vy = np.asarray(vy, dtype=np.float64)
    return M[0, 0] * vx + M[0, 1] * vy, M[1, 0] * vx + M[1, 1] * vy


# ----------------------------------------------------------------------------------------------------------------
# measurements on patterns
# ----------------------------------------------------------------------------------------------------------------
def centre_of_mass(patterns, *, second_moments: bool = False):
    """Centre of mass ``(cy, cx)`` [px, pixel centres at integers] of each pattern ``(n, ky, kx)`` -> ``(n, 2)``.

    With ``second_moments`` also returns ``(n, 2)`` variances of the intensity distribution along ky and kx
    [px^2] (for Poisson counts the CoM noise variance is that divided by the total count).
    """
    x = np.asarray(patterns)
    if x.ndim == 2:
        x = x[None]
    x = x.astype(np.float64, copy=False)
    rows = x.sum(axis=2)  # (n, ky)
    cols = x.sum(axis=1)  # (n, kx)
    tot = rows.sum(axis=1)
    safe = np.where(tot > 0, tot, np.nan)
    iy = np.arange(x.shape[1], dtype=np.float64)
    ix = np.arange(x.shape[2], dtype=np.float64)
    cy = rows @ iy / safe
    cx = cols @ ix / safe
    com = np.stack([cy, cx], axis=1)
    if not second_moments:
        return com
    vy = rows @ (iy * iy) / safe - cy * cy
    vx = cols @ (ix * ix) / safe - cx * cx
    return com, np.stack([vy, vx], axis=1)


def _kasa(ey, ex, w):
    """Weighted algebraic circle fit per row of edge points ``(n, m)`` -> cy, cx, r (n,)."""
    A = np.stack([ex, ey, np.ones_like(ex)], axis=-1) * w[..., None]
    b = -(ex * ex + ey * ey) * w
    AtA = np.einsum("nki,nkj->nij", A, A) + 1e-9 * np.eye(3)
    Atb = np.einsum("nki,nk->ni", A, b)
    sol = np.linalg.solve(AtA, Atb[..., None])[..., 0]
    cx, cy = -sol[:, 0] / 2, -sol[:, 1] / 2
    r = np.sqrt(np.maximum(cx * cx + cy * cy - sol[:, 2], 0.0))
    return cy, cx, r


def _plateau_and_floor(flat: np.ndarray, mean: np.ndarray):
    """Per row of finite ``flat``: the median of the values above ``mean`` and the 5th percentile (linear),
    from one sort per row, the same numbers as ``nanmedian`` of the masked rows and ``percentile(.., 5)``."""
    n, m = flat.shape
    srt = np.sort(flat, axis=1)
    rows = np.arange(n)
    k = (flat > mean).sum(axis=1)  # the values above the mean are the last k of each sorted row
    lo = np.clip(m - k + (k - 1) // 2, 0, m - 1)
    hi = np.clip(m - k + k // 2, 0, m - 1)
    plateau = np.stack([srt[rows, lo], srt[rows, hi]]).mean(axis=0)
    plateau = np.where(k > 0, plateau, np.nan).astype(flat.dtype)
    q = 0.05 * (m - 1)
    i = min(int(math.floor(q)), m - 1)
    j = min(i + 1, m - 1)
    t = q - i
    a, b = srt[:, i], srt[:, j]
    d = b - a
    bg = a + d * t if t < 0.5 else b - d * (1 - t)
    return plateau, bg.astype(flat.dtype)


def _rough_disc(S: np.ndarray):
    """Centroid and radius of the thresholded disc (30 % from background to plateau) of smoothed patterns."""
    n = S.shape[0]
    flat = S.reshape(n, -1)
    mean = flat.mean(axis=1, keepdims=True)
    if np.isfinite(flat).all():
        plateau, bg = _plateau_and_floor(flat, mean)
    else:
        plateau = np.nanmedian(np.where(flat > mean, flat, np.nan), axis=1)
        bg = np.percentile(flat, 5, axis=1)
    M = S > (bg + 0.3 * (plateau - bg))[:, None, None]
    a = M.sum(axis=(1, 2)).astype(np.float64)
    iy = np.arange(S.shape[1], dtype=np.float64)
    ix = np.arange(S.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = M.sum(axis=2) @ iy / a
        cx = M.sum(axis=1) @ ix / a
    ok = (a >= 12) & (plateau > bg)
    return cy, cx, np.sqrt(a / np.pi), ok


def _flatten_tilt(S: np.ndarray, cy0, cx0, R: float) -> np.ndarray:
    """Divide each pattern by the plane fitted to its intensity inside ``0.85 R`` of the rough centre.

    An intensity tilt inside the disc (the polarization signal) makes the plateau slope towards the edge on one
    side and away from it on the other; dividing by the fitted plane (a smooth positive function, clipped at
    20 % of its value at the centre) makes the plateau flat without moving a relative half-way crossing.

    The normal equations come from row and column sums of the mask and of the masked intensity (separable
    moments), not from nine full-size products: the same least-squares plane, a few times faster."""
    n, ky, kx = S.shape
    gyv = np.arange(ky, dtype=np.float64)[None, :] - np.asarray(cy0, np.float64)[:, None]  # (n, ky)
    gxv = np.arange(kx, dtype=np.float64)[None, :] - np.asarray(cx0, np.float64)[:, None]  # (n, kx)
    gy, gx = gyv[:, :, None], gxv[:, None, :]
    m = (gy * gy + gx * gx) <= (0.85 * R) ** 2
    mf = m.astype(np.float64)
    rows, cols = mf.sum(axis=2), mf.sum(axis=1)  # mask pixels per row / column
    mgx = np.matmul(mf, gxv[:, :, None])[:, :, 0]  # per row: sum of gx over the mask
    ms = np.where(m, S, 0).astype(np.float64)
    srow, scol = ms.sum(axis=2), ms.sum(axis=1)
    A = np.empty((n, 3, 3))
    A[:, 0, 0] = rows.sum(axis=1)
    A[:, 0, 1] = A[:, 1, 0] = (rows * gyv).sum(axis=1)
    A[:, 0, 2] = A[:, 2, 0] = (cols * gxv).sum(axis=1)
    A[:, 1, 1] = (rows * gyv * gyv).sum(axis=1)
    A[:, 2, 2] = (cols * gxv * gxv).sum(axis=1)
    A[:, 1, 2] = A[:, 2, 1] = (mgx * gyv).sum(axis=1)
    rhs = np.stack([srow.sum(axis=1), (srow * gyv).sum(axis=1), (scol * gxv).sum(axis=1)], axis=1)
    coef = np.linalg.solve(A + 1e-9 * np.eye(3), rhs[..., None])[..., 0]
    plane = coef[:, 0, None, None] + coef[:, 1, None, None] * gy + coef[:, 2, None, None] * gx
    floor = np.maximum(0.2 * coef[:, 0], 1e-12)[:, None, None]
    good = coef[:, 0] > 0
    np.maximum(plane, floor, out=plane)
    out = np.divide(S, plane, out=plane).astype(np.float32)
    if not good.all():
        out[~good] = S[~good]
    return out


def _disc_chunk(x: np.ndarray, radius, smooth_px: float, n_rays: int):
    from scipy import ndimage

    n, ky, kx = x.shape
    S = x.astype(np.float32, copy=False)  # not written to below (the filter and the crop make new arrays)
    if smooth_px > 0:
        S = ndimage.gaussian_filter(S, sigma=(0, smooth_px, smooth_px), mode="nearest")
    cy0, cx0, r0, ok0 = _rough_disc(S)
    R = float(radius) if radius is not None else (float(np.median(r0[ok0])) if ok0.any() else float("nan"))
    nan = np.full(n, np.nan)
    if not math.isfinite(R) or R < 3:
        return np.stack([nan, nan], 1), nan, nan, np.zeros(n, int), np.zeros(n, bool), R
    cy0 = np.where(ok0, cy0, ky // 2)
    cx0 = np.where(ok0, cx0, kx // 2)
    dr = max(0.5, 0.8 * R / 64)
    rr = np.arange(0.6 * R, 1.4 * R + dr / 2, dr)
    # only the detector box the rays read (every pattern's rays, +2 px for the bilinear taps) is flattened and
    # sampled: the plane's moments come from inside 0.85 R, and a ray beyond the box is beyond the detector
    # there (the box is clipped to it), so 'nearest' clamps at the same pixels; the same profiles
    reach = rr[-1] + 2.0
    r0, r1 = max(int(math.floor(cy0.min() - reach)), 0), min(int(math.ceil(cy0.max() + reach)) + 1, ky)
    c0, c1 = max(int(math.floor(cx0.min() - reach)), 0), min(int(math.ceil(cx0.max() + reach)) + 1, kx)
    S = _flatten_tilt(S[:, r0:r1, c0:c1], cy0 - r0, cx0 - c0, R)
    phi = np.arange(n_rays) * (2 * np.pi / n_rays)
    sy, cxr = -np.sin(phi), np.cos(phi)  # ray directions on screen: (row, col) = (-sin, cos)
    yy = cy0[:, None, None] + rr[None, None, :] * sy[None, :, None]
    xx = cx0[:, None, None] + rr[None, None, :] * cxr[None, :, None]
    ii = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None, None], yy.shape)
    prof = ndimage.map_coordinates(S, [ii, yy - r0, xx - c0], order=1, mode="nearest")
    # the edge: where the profile crosses half-way between its mean level just inside and just outside
    w_in = max(1.5, 0.2 * R)
    inside = (rr >= R - 1.6 * w_in) & (rr <= R - 0.5 * w_in)
    outside = (rr >= R + 0.5 * w_in) & (rr <= R + 1.6 * w_in)
    a = prof[:, :, inside].mean(-1)
    b = prof[:, :, outside].mean(-1)
    t = 0.5 * (a + b)
    above = prof >= t[..., None]
    cross = above[:, :, :-1] & ~above[:, :, 1:]
    d = np.where(cross, np.abs(rr[:-1] - R)[None, None, :], np.inf)
    j = d.argmin(-1)
    has = np.isfinite(d.min(-1)) & (a > b + 0.1 * np.abs(b) + 1e-12)
    p0 = np.take_along_axis(prof, j[..., None], -1)[..., 0]
    p1 = np.take_along_axis(prof, j[..., None] + 1, -1)[..., 0]
    den = p0 - p1
    frac = np.clip((p0 - t) / np.where(den == 0, 1, den), 0, 1)
    re = rr[j] + frac * dr
    ey = cy0[:, None] + re * sy[None]
    ex = cx0[:, None] + re * cxr[None]
    has &= (ey >= 0) & (ey <= ky - 1) & (ex >= 0) & (ex <= kx - 1)
    w = has.astype(np.float64)
    ey0, ex0 = np.where(has, ey, 0.0), np.where(has, ex, 0.0)
    for _ in range(3):
        fy, fx, fr = _kasa(ey0, ex0, w)
        res = np.hypot(ey - fy[:, None], ex - fx[:, None]) - fr[:, None]
        absres = np.where(has, np.abs(res), np.nan)
        mad = np.zeros(n)
        some = has.any(axis=1)
        if some.any():
            mad[some] = np.nanmedian(absres[some], axis=1)
        w = (has & (np.abs(res) <= np.maximum(3 * 1.4826 * mad, 0.5)[:, None])).astype(float)
    fy, fx, fr = _kasa(ey0, ex0, w)
    res = np.hypot(ey - fy[:, None], ex - fx[:, None]) - fr[:, None]
    n_edges = w.sum(1).astype(int)
    with np.errstate(all="ignore"):
        rms = np.sqrt(np.nansum(np.where(w > 0, res * res, np.nan), axis=1) / np.maximum(n_edges, 1))
    ok = ok0 & (n_edges >= max(6, n_rays // 4)) & np.isfinite(fy) & np.isfinite(fx)
    cen = np.stack([np.where(ok, fy, np.nan), np.where(ok, fx, np.nan)], 1)
    return cen, np.where(ok, fr, np.nan), np.where(ok, rms, np.nan), n_edges, ok, R


def measure_disc_centres(patterns, positions=None, *, radius: float | None = None, smooth_px: float = 1.0,
                         n_rays: int = 64, chunk: int = 256):
    """Centre of the bright-field disc of each pattern, from its edge.

    Method: the patterns are smoothed (Gaussian, ``smooth_px``); a rough centre and radius come from the area of
    the disc thresholded at 30 % from background to plateau; each pattern is divided by the plane fitted to its
    intensity inside 0.85 R (this flattens an intensity tilt without moving a relative half-way crossing); along
    ``n_rays`` rays the edge is where the profile crosses half-way between its mean level just inside
    (``R - 1.6 w .. R - 0.5 w``, ``w = max(1.5, 0.2 R)``) and just outside the edge; a circle is fitted to the
    edge points (algebraic fit, points beyond 3 MAD rejected, three times). The local half-way level and the
    flattening make the edge independent of the intensity inside the disc, so an intensity tilt (the
    polarization signal, which moves the centre of mass) does not move the centre: a disc of radius 19 px whose
    intensity varies by +-40 % across it (CoM moved by 1.9 px) is found within 0.01 px (noise-free) and
    0.05 px rms at 2e4 electrons. Without the flattening, window means on a sloped plateau bias the centre
    towards the bright side (0.14 px for that disc).

    On the committed library's patterns (noise-free or 2e4 e-), the per-pattern centre scatters by about
    0.6 px rms around the optical axis because the overlapping CBED discs change with the probe position; it
    averages out in :func:`fit_descan` (the per-variant mean offset is below 0.06 px).

    Parameters
    ----------
    patterns : (n, ky, kx) array.
    positions : (n, 2) [iy, ix] or None; only checked for length (the measurement is per pattern).
    radius : disc radius [px] to use for the ray windows; None = measured (median over each chunk).
    smooth_px, n_rays, chunk : smoothing sigma [px], rays per pattern, patterns per vectorised step.

    Returns
    -------
    centres : float64 (n, 2) ``(cy, cx)`` [px]; NaN where no disc was found.
    info : dict with ``radius`` (n,) fitted radius [px], ``residual`` (n,) rms distance of the edge points from
        the circle [px], ``n_edges`` (n,), ``ok`` (n,) bool, ``radius_used`` (float).
    """
    x = np.asarray(patterns)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"patterns must be (n, ky, kx), got shape {x.shape}")
    n = x.shape[0]
    if positions is not None:
        _as_positions(positions, n)
    cen = np.full((n, 2), np.nan)
    rad = np.full(n, np.nan)
    res = np.full(n, np.nan)
    ned = np.zeros(n, int)
    ok = np.zeros(n, bool)
    R_used = radius
    for s in range(0, n, chunk):
        c, r, e, m, k, R = _disc_chunk(x[s:s + chunk], R_used, smooth_px, n_rays)
        cen[s:s + chunk], rad[s:s + chunk], res[s:s + chunk], ned[s:s + chunk], ok[s:s + chunk] = c, r, e, m, k
        if R_used is None and k.any():
            R_used = float(np.median(r[k]))
    return cen, dict(radius=rad, residual=res, n_edges=ned, ok=ok,
                     radius_used=float("nan") if R_used is None else float(R_used))


# ----------------------------------------------------------------------------------------------------------------
# descan
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DescanFit:
    """A fitted descan surface.

    Attributes
    ----------
    order : 1 (affine) or 2 (quadratic).
    coeffs_y, coeffs_x : coefficients over ``DESCAN_TERMS[order]`` of ``cy(iy, ix)``, ``cx(iy, ix)`` [px].
    range_y_px, range_x_px : max - min of each component over the scan grid [px].
    range_px : the largest distance between the disc centres of two probe positions of the scan [px].
    residual_px : robust scatter (sigma per component) of the measured centres about the fitted model (the
        surface plus any lattice terms) [px].
    rms_px : rms per component of the inliers' residuals [px].
    n_used, n_outliers : centres used with non-zero weight / rejected.
    extrapolation_se_px : standard error of the surface at the worst corner of the scan [px] (the larger of the
        independent-residual formula and a 4 x 4 block jackknife). Both can miss errors correlated over whole
        unit cells, so extrapolation is judged by ``coverage`` as well.
    coverage : (fraction of the scan's rows, fraction of its columns) spanned by the centres.
    lattice_frequencies : ((fy, fx), ...) periodic components fitted alongside [cycles per scan pixel].
    nav_shape : (ny, nx) the ranges refer to.
    """

    order: int
    coeffs_y: tuple
    coeffs_x: tuple
    range_y_px: float
    range_x_px: float
    range_px: float
    residual_px: float
    rms_px: float
    n_used: int
    n_outliers: int
    extrapolation_se_px: float
    coverage: tuple
    lattice_frequencies: tuple
    nav_shape: tuple

    def evaluate(self, positions) -> np.ndarray:
        """Surface ``(cy, cx)`` at positions ``(n, 2)`` [iy, ix] -> ``(n, 2)``."""
        p = _as_positions(positions)
        A = _design(p[:, 0], p[:, 1], self.order)
        return np.stack([A @ np.asarray(self.coeffs_y), A @ np.asarray(self.coeffs_x)], axis=1)

    def to_dict(self) -> dict:
        return _jsonable(dict(order=self.order, terms=list(DESCAN_TERMS[self.order]), coeffs_y=self.coeffs_y,
                              coeffs_x=self.coeffs_x, range_y_px=self.range_y_px, range_x_px=self.range_x_px,
                              range_px=self.range_px, residual_px=self.residual_px, rms_px=self.rms_px,
                              n_used=self.n_used, n_outliers=self.n_outliers,
                              extrapolation_se_px=self.extrapolation_se_px, coverage=self.coverage,
                              lattice_frequencies=self.lattice_frequencies, nav_shape=self.nav_shape))


def _wlstsq(A, y, w):
    """Weighted least squares with column scaling (conditioning of raw iy^2 terms)."""
    s = np.abs(A).max(axis=0)
    s[s == 0] = 1.0
    sw = np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(A / s * sw, y * sw, rcond=None)
    return coef / s[:, None] if coef.ndim == 2 else coef / s


def _jackknife_se(A, c, w, p, G, nterms: int, nb: int = 4) -> float:
    """Delete-one-block jackknife standard error of the surface at the points ``G`` (max over points and
    components). Blocks are up to ``nb`` x ``nb`` equal tiles of the positions' bounding box: the residuals of
    neighbouring probe positions are correlated (the same unit cell, the same local tilt), so the textbook
    standard error of independent residuals is too small, above all where the surface is extrapolated."""
    by = min(nb, int(np.ptp(p[:, 0])) + 1)
    bx = min(nb, int(np.ptp(p[:, 1])) + 1)
    ly = np.minimum(((p[:, 0] - p[:, 0].min()) * by // (np.ptp(p[:, 0]) + 1)).astype(int), by - 1)
    lx = np.minimum(((p[:, 1] - p[:, 1].min()) * bx // (np.ptp(p[:, 1]) + 1)).astype(int), bx - 1)
    lab = ly * bx + lx
    preds = []
    for b in np.unique(lab):
        m = lab != b
        if np.count_nonzero(w[m] > 0) < nterms + 2:
            continue
        preds.append(G @ _wlstsq(A[m], c[m], w[m]))
    k = len(preds)
    if k < 3:
        return 0.0
    P = np.stack(preds)
    var = (k - 1) / k * ((P - P.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.sqrt(var.max()))


def _irls(A: np.ndarray, c: np.ndarray, max_iter: int):
    """Robust fit of ``c`` (n, 2) on design ``A``: L1-like start, then Tukey's biweight. -> coef, weights, sigma."""
    w = np.ones(len(c))
    coef = _wlstsq(A, c, w)
    sigma = 1.0
    for it in range(max_iter):
        r = np.hypot(*(c - A @ coef).T)
        sigma = max(float(np.median(r)) / 1.1774, 1e-6)
        if it < 3:
            w = 1.0 / np.maximum(r, 0.1 * sigma)
        else:
            u = r / (4.685 * sigma)
            w = np.where(u < 1, (1 - u * u) ** 2, 0.0)
        new = _wlstsq(A, c, w)
        done = it >= 3 and np.max(np.abs(A @ (new - coef))) < 1e-6
        coef = new
        if done:
            break
    r = np.hypot(*(c - A @ coef).T)
    return coef, w, max(float(np.median(r)) / 1.1774, 1e-9)


def _lattice_terms(p: np.ndarray, resid: np.ndarray, n_peaks: int):
    """cos/sin columns at the strongest periodic components of the residual map (the lattice).

    Only for positions filling at least 90 % of a bounding box of at least 16 x 16; peaks must carry more than
    10x the median power and lie outside the 3 x 3 lowest-frequency bins (slow trends belong to the surface).
    Returns (columns (n, 2k), frequencies [(fy, fx)] in cycles per scan pixel).
    """
    p0 = p.min(axis=0)
    shp = np.ptp(p, axis=0) + 1
    if min(shp) < 16 or len(p) < 0.9 * shp[0] * shp[1]:
        return None, []
    g = np.zeros((2, int(shp[0]), int(shp[1])))
    g[:, p[:, 0] - p0[0], p[:, 1] - p0[1]] = resid.T
    F = (np.abs(np.fft.fft2(g)) ** 2).sum(axis=0)
    FY, FX = np.meshgrid(np.fft.fftfreq(int(shp[0])), np.fft.fftfreq(int(shp[1])), indexing="ij")
    low = (np.abs(FY) * shp[0] < 1.5) & (np.abs(FX) * shp[1] < 1.5)
    half = (FY > 0) | ((FY == 0) & (FX > 0))
    allowed = half & ~low
    if not allowed.any():
        return None, []
    floor = 10.0 * float(np.median(F[allowed]))
    F = np.where(allowed, F, 0.0)
    cols, freqs = [], []
    for k in np.argsort(F.ravel())[::-1][:n_peaks]:
        if F.flat[k] <= floor:
            break
        f = (float(FY.flat[k]), float(FX.flat[k]))
        ph = 2 * np.pi * (f[0] * p[:, 0] + f[1] * p[:, 1])
        cols += [np.cos(ph), np.sin(ph)]
        freqs.append(f)
    return (np.stack(cols, axis=1) if cols else None), freqs


def fit_descan(centres, positions, order: int = 1, *, nav_shape=None, max_iter: int = 30,
               lattice_peaks: int = 6) -> DescanFit:
    """Robust least-squares surface of the disc centres over the scan.

    Iteratively reweighted least squares: three L1-like passes (weights ``1 / max(|r|, 0.1 sigma)``) for a
    robust start, then Tukey's biweight (``c = 4.685 sigma``) until the coefficients move by less than 1e-6 px,
    with ``sigma = median(|r|) / 1.1774`` the robust per-component scatter of the 2-D residuals ``r``.

    The measured centres carry an error that repeats with the crystal lattice (the overlapping CBED discs change
    with the probe's place in the unit cell; about 0.8 px rms per pattern at 10 nm on the committed library).
    Its trend inside each cell leaks into the fitted slope (on a 32 x 32 scan of 8-px cells, up to 0.4 px of
    range). On a dense grid the fit therefore also carries cos/sin terms at the residual map's strongest
    periodic components (``lattice_peaks`` of them at most, see :func:`_lattice_terms`); only the polynomial
    is returned. On composed scans this halved the largest surface error (0.21 -> 0.11 px at 10 nm).

    Parameters
    ----------
    centres : (n, 2) measured ``(cy, cx)`` [px]; rows with NaN are ignored.
    positions : (n, 2) [iy, ix].
    order : 1 (affine: 3 terms) or 2 (quadratic: 6 terms).
    nav_shape : (ny, nx) of the whole scan for the range and the extrapolation error; default the bounding box
        ``(max iy + 1, max ix + 1)`` of ``positions``.
    lattice_peaks : periodic components fitted alongside (0 = none).

    Returns
    -------
    DescanFit
    """
    c = np.asarray(centres, dtype=np.float64)
    p = _as_positions(positions, c.shape[0] if c.ndim == 2 else None)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"centres must be (n, 2), got shape {c.shape}")
    keep = np.all(np.isfinite(c), axis=1)
    nterms = len(DESCAN_TERMS.get(order, ()))
    if nterms == 0:
        raise ValueError(f"descan order must be 1 or 2, got {order!r}")
    if keep.sum() < nterms + 2:
        raise ValueError(f"fit_descan needs at least {nterms + 2} valid centres for order {order}, got {keep.sum()}")
    c, p = c[keep], p[keep]
    A = _design(p[:, 0], p[:, 1], order)
    full, w, sigma = _irls(A, c, max_iter)
    B, freqs = A, []
    if lattice_peaks > 0:
        cols, freqs = _lattice_terms(p, c - A @ full, int(lattice_peaks))
        if cols is not None:
            B = np.hstack([A, cols])
            full, w, sigma = _irls(B, c, max_iter)
    coef = full[:nterms]
    resid = c - B @ full
    inl = w > 0
    rms = float(np.sqrt(np.mean(resid[inl] ** 2))) if inl.any() else float("nan")
    if nav_shape is None:
        nav_shape = (int(p[:, 0].max()) + 1, int(p[:, 1].max()) + 1)
    ny, nx = (int(v) for v in nav_shape)
    # range and extrapolation error over the scan grid (corners for order 1, a sample grid for order 2)
    if order == 1:
        gy, gx = np.array([0, 0, ny - 1, ny - 1], float), np.array([0, nx - 1, 0, nx - 1], float)
    else:
        gy, gx = np.meshgrid(np.linspace(0, ny - 1, min(ny, 33)), np.linspace(0, nx - 1, min(nx, 33)), indexing="ij")
        gy, gx = gy.ravel(), gx.ravel()
    G = _design(gy, gx, order)
    surf = G @ coef
    rng_y = float(np.ptp(surf[:, 0]))
    rng_x = float(np.ptp(surf[:, 1]))
    diff = surf[:, None, :] - surf[None, :, :]
    rng = float(np.sqrt((diff ** 2).sum(-1)).max())
    Gb = np.hstack([G, np.zeros((len(G), B.shape[1] - nterms))])  # the polynomial part only
    s = np.abs(B).max(axis=0)
    s[s == 0] = 1.0
    Bs = B / s
    try:
        cov = np.linalg.pinv((Bs * w[:, None]).T @ Bs)
        Gs = Gb / s
        se = float(sigma * np.sqrt(np.max(np.einsum("ij,jk,ik->i", Gs, cov, Gs))))
    except np.linalg.LinAlgError:
        se = float("inf")
    se = max(se, _jackknife_se(B, c, w, p, Gb, B.shape[1]))
    return DescanFit(order=order, coeffs_y=tuple(float(v) for v in coef[:, 0]),
                     coeffs_x=tuple(float(v) for v in coef[:, 1]), range_y_px=rng_y, range_x_px=rng_x,
                     range_px=rng, residual_px=sigma, rms_px=rms, n_used=int(inl.sum()),
                     n_outliers=int((~inl).sum()), extrapolation_se_px=se,
                     coverage=(float((np.ptp(p[:, 0]) + 1) / ny), float((np.ptp(p[:, 1]) + 1) / nx)),
                     lattice_frequencies=tuple(freqs), nav_shape=(ny, nx))


# ----------------------------------------------------------------------------------------------------------------
# rotation from the centre-of-mass field
# ----------------------------------------------------------------------------------------------------------------
def _remove_affine(f: np.ndarray, valid: np.ndarray) -> np.ndarray:
    iy, ix = np.nonzero(valid)
    out = np.full(f.shape, np.nan)
    if len(iy) < 4:
        out[valid] = f[valid] - f[valid].mean() if len(iy) else 0
        return out
    A = _design(iy, ix, 1)
    coef, *_ = np.linalg.lstsq(A, f[valid], rcond=None)
    out[valid] = f[valid] - A @ coef
    return out


def _plaquette_ops(f: np.ndarray):
    """Derivatives on the 2 x 2 plaquettes: (d/dx, d/dy) of an (ny, nx) field -> (ny-1, nx-1) each."""
    dx = 0.5 * ((f[:-1, 1:] - f[:-1, :-1]) + (f[1:, 1:] - f[1:, :-1]))
    dy = 0.5 * ((f[1:, :-1] - f[:-1, :-1]) + (f[1:, 1:] - f[:-1, 1:]))
    return dx, dy


def _plaquette_mean(f: np.ndarray) -> np.ndarray:
    return 0.25 * (f[:-1, :-1] + f[:-1, 1:] + f[1:, :-1] + f[1:, 1:])


def _curl_form(ux, uy, pm):
    """Quadratic form of the mean squared curl of R(t) u in (cos t, sin t) over plaquette mask ``pm``."""
    uxx, uxy = _plaquette_ops(ux)
    uyx, uyy = _plaquette_ops(uy)
    C = (uyx - uxy)[pm]
    D = (uxx + uyy)[pm]
    cc, dd, cd = np.mean(C * C), np.mean(D * D), np.mean(C * D)
    return np.array([[cc, -cd], [-cd, dd]])


def _solve_form(Q):
    w, v = np.linalg.eigh(Q)
    c, s = v[:, 0]
    t = math.degrees(math.atan2(s, c)) % 180.0
    return t, float(w[0]), float(w[1])


def _curl_at(Q, t_deg):
    t = math.radians(t_deg)
    e = np.array([math.cos(t), math.sin(t)])
    return float(e @ Q @ e)


def _refuse(reason: str, **info):
    info.update(reason=reason, rotation_mod180_confidence="none", flip_confidence="none",
                half_turn_confidence="none")
    return None, None, "none", info


def estimate_rotation(com_y, com_x, *, dark_field=None, noise_var: float | None = None, flip: bool | None = None,
                      rotation_deg: float | None = None, n_null: int = 32, seed: int = 0):
    """Detector-to-scan rotation and flip from an atomic-resolution centre-of-mass field.

    The field ``u`` (detector frame, descan removed; an affine trend per component is removed here too, so a
    residual descan does not bias the curl) is turned by ``R(t) F``; its discrete curl on the 2 x 2 plaquettes
    is ``cos t * curl(Fu) - sin t * div(Fu)``, so the mean squared curl over angles is a quadratic form whose
    smallest eigenvector gives the rotation modulo 180 degrees in closed form. Both flips are tried; the one
    with the lower minimum wins. The half-turn comes from the dark-field rule (module docstring). Position
    shuffles of the field give the curl contrast that pure noise reaches.

    Parameters
    ----------
    com_y, com_x : (ny, nx) CoM shift along ky (rows) and kx (columns) [detector px], NaN where unmeasured.
    dark_field : (ny, nx) rotation-invariant dark-field image (annulus outside the disc / total), or None (the
        half-turn then stays ambiguous: the angle is returned in (-90, 90] with half-turn confidence 'low').
    noise_var : expected noise variance of one CoM component [px^2] (Poisson), or None.
    flip : known flip (e.g. from the file) or None to estimate it.
    rotation_deg : known rotation (e.g. from the file) or None; when given (and ``flip`` is not), only the
        flip is estimated: the one with the lower curl at that angle.
    n_null : number of position shuffles for the noise reference.

    Returns
    -------
    rotation_deg : float in (-180, 180] or None when refused.
    flip : bool or None when refused.
    confidence : 'high', 'low' or 'none'.
    info : dict: ``reason`` (when refused), ``kappa`` (curl contrast), ``kappa_null``, ``curl_min``,
        ``curl_median``, ``curl_min_other_flip``, ``flip_ratio``, ``half_turn_r`` (the dark-field correlation at
        the returned angle, >= 0), ``rotation_se_deg`` (statistical, from sub-blocks; on composed scans a
        systematic error of up to about 1.5 deg remains because the CoM field of a thick, tilted crystal is not
        exactly curl-free),
        ``field_var``, ``noise_var``, ``n_plaquettes``, the per-part confidences
        (``rotation_mod180_confidence``, ``flip_confidence``, ``half_turn_confidence``), ``alternative_deg``
        (the other half-turn) and ``curl_by_angle`` (mean squared curl at 0..179 deg for each flip).
    """
    cy = np.array(com_y, dtype=np.float64)
    cx = np.array(com_x, dtype=np.float64)
    if cy.shape != cx.shape or cy.ndim != 2:
        raise ValueError(f"com_y and com_x must be (ny, nx) of the same shape, got {cy.shape} and {cx.shape}")
    valid = np.isfinite(cy) & np.isfinite(cx)
    pm = valid[:-1, :-1] & valid[:-1, 1:] & valid[1:, :-1] & valid[1:, 1:]
    n_plaq = int(pm.sum())
    if n_plaq < MIN_PLAQUETTES:
        return _refuse(f"scan too small for the curl criterion: {n_plaq} complete 2x2 plaquettes of CoM values "
                       f"(an {cy.shape[0]}x{cy.shape[1]} field); at least {MIN_PLAQUETTES} (an 8x8 block) are needed",
                       n_plaquettes=n_plaq)
    active = np.zeros_like(valid)
    for a, b in ((slice(None, -1), slice(None, -1)), (slice(None, -1), slice(1, None)),
                 (slice(1, None), slice(None, -1)), (slice(1, None), slice(1, None))):
        active[a, b] |= pm
    uy = _remove_affine(cy, active)
    ux = _remove_affine(cx, active)
    field_var = float(0.5 * (np.mean(uy[active] ** 2) + np.mean(ux[active] ** 2)))
    info = dict(n_plaquettes=n_plaq, field_var=field_var, noise_var=None if noise_var is None else float(noise_var))
    if field_var <= 1e-20:
        return _refuse("no contrast: the CoM field is constant (identical patterns)", **info)
    if noise_var is not None and field_var < NOISE_VAR_RATIO * float(noise_var):
        return _refuse(f"no atomic-resolution contrast: CoM spatial variance {field_var:.3g} px^2 is within "
                       f"{NOISE_VAR_RATIO:g}x its Poisson noise variance {float(noise_var):.3g} px^2", **info)
    uy0, ux0 = np.nan_to_num(uy), np.nan_to_num(ux)
    flips = (False, True) if flip is None else (bool(flip),)
    forms = {}
    for f in (False, True):
        a, b = (uy0, ux0) if f else (ux0, uy0)  # F(flip) u: components (x, y)
        forms[f] = _curl_form(a, b, pm)
    sol = {f: _solve_form(forms[f]) for f in (False, True)}
    best = min(flips, key=lambda f: sol[f][1])
    t_mod, lmin, lmax = sol[best]
    other = not best
    kappa = (lmax - lmin) / (lmax + lmin) if lmax + lmin > 0 else 0.0
    # noise reference: the same statistic on position-shuffled copies of the field
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(active)
    kn = []
    for _ in range(int(n_null)):
        perm = rng.permutation(idx)
        sy, sx = uy0.copy(), ux0.copy()
        sy.flat[idx] = uy0.flat[perm]
        sx.flat[idx] = ux0.flat[perm]
        ks = []
        for f in flips:
            a, b = (sy, sx) if f else (sx, sy)
            _, l0, l1 = _solve_form(_curl_form(a, b, pm))
            ks.append((l1 - l0) / (l1 + l0) if l1 + l0 > 0 else 0.0)
        kn.append(max(ks))
    kappa_null = float(max(kn)) if kn else 0.0
    curves = {str(f): [_curl_at(forms[f], t) for t in range(180)] for f in (False, True)}
    info.update(kappa=float(kappa), kappa_null=kappa_null, curl_min=lmin, curl_median=0.5 * (lmin + lmax),
                curl_min_other_flip=sol[other][1], flip_ratio=sol[other][1] / max(lmin, 1e-30),
                curl_by_angle=curves, rotation_mod180_deg=float(t_mod))
    if kappa <= kappa_null + KAPPA_MARGIN:
        return _refuse(f"no atomic-resolution contrast: curl contrast {kappa:.3f} is not above what a "
                       f"position-shuffled (noise-only) field reaches ({kappa_null:.3f} + {KAPPA_MARGIN})", **info)
    if rotation_deg is not None and flip is None:
        at = {f: _curl_at(forms[f], float(rotation_deg)) for f in (False, True)}
        fb = min((False, True), key=lambda f: at[f])
        ratio = at[not fb] / max(at[fb], 1e-30)
        c_flip = "high" if ratio >= FLIP_RATIO_HIGH else "low"
        info.update(flip_ratio_at_given_rotation=float(ratio), flip_confidence=c_flip, rotation_mod180_confidence="given",
                    half_turn_confidence="given")
        return float(rotation_deg), bool(fb), c_flip, info
    # standard error from sub-blocks (3 x 3, or 2 x 2 on small fields; doubled angles: modulo 180 degrees)
    ny1, nx1 = pm.shape
    nb = 3 if min(ny1, nx1) >= 12 else 2
    ys_ = np.linspace(0, ny1, nb + 1).astype(int)
    xs_ = np.linspace(0, nx1, nb + 1).astype(int)
    a, b = (uy0, ux0) if best else (ux0, uy0)
    blocks = []
    for i in range(nb):
        for j in range(nb):
            sub = np.zeros_like(pm)
            sub[ys_[i]:ys_[i + 1], xs_[j]:xs_[j + 1]] = pm[ys_[i]:ys_[i + 1], xs_[j]:xs_[j + 1]]
            if sub.sum() >= 16:
                blocks.append(_solve_form(_curl_form(a, b, sub))[0])
    if len(blocks) >= 2:
        z = np.exp(2j * np.radians(blocks))
        dev = np.degrees(np.angle(z * np.exp(-2j * math.radians(t_mod)))) / 2
        se = float(np.sqrt(np.sum(dev ** 2) / (len(blocks) * (len(blocks) - 1))))
    else:
        se = float("nan")
    # half-turn: the CoM field points up the dark-field gradient (towards the atom columns)
    half_r = None
    t = t_mod
    if dark_field is not None:
        df = np.array(dark_field, dtype=np.float64)
        if df.shape != cy.shape:
            raise ValueError(f"dark_field must have the CoM field's shape {cy.shape}, got {df.shape}")
        dvalid = active & np.isfinite(df)
        dpm = pm & dvalid[:-1, :-1] & dvalid[:-1, 1:] & dvalid[1:, :-1] & dvalid[1:, 1:]
        if dpm.sum() >= MIN_PLAQUETTES:
            d0 = np.nan_to_num(_remove_affine(df, dvalid))
            gx, gy = _plaquette_ops(d0)
            M = rotation_matrix(t_mod, best)
            vx = M[0, 0] * ux0 + M[0, 1] * uy0
            vy = M[1, 0] * ux0 + M[1, 1] * uy0
            px, py = _plaquette_mean(vx)[dpm], _plaquette_mean(vy)[dpm]
            gx, gy = gx[dpm], gy[dpm]
            den = math.sqrt(float(np.sum(px * px + py * py)) * float(np.sum(gx * gx + gy * gy)))
            half_r = float(np.sum(px * gx + py * gy) / den) if den > 0 else 0.0
            if half_r < 0:
                t = t_mod + 180.0
    if half_r is None:
        t = t_mod if t_mod <= 90 else t_mod - 180.0
    rot = -((-t + 180.0) % 360.0 - 180.0)
    alt = -((-(rot + 180.0) + 180.0) % 360.0 - 180.0)
    c_rot = "high" if (kappa >= KAPPA_HIGH and math.isfinite(se) and se <= SE_HIGH_DEG) else "low"
    c_flip = "given" if flip is not None else ("high" if info["flip_ratio"] >= FLIP_RATIO_HIGH else "low")
    c_half = "high" if (half_r is not None and abs(half_r) >= HALF_TURN_R) else "low"
    overall = "high" if (c_rot == "high" and c_flip in ("high", "given") and c_half == "high") else "low"
    info.update(rotation_se_deg=se, half_turn_r=None if half_r is None else abs(half_r),
                rotation_mod180_confidence=c_rot, flip_confidence=c_flip,
                half_turn_confidence=c_half, alternative_deg=float(alt),
                half_turn_rule="CoM points up the dark-field gradient (towards the atom columns); "
                               f"trusted when |r| >= {HALF_TURN_R}")
    return float(rot), bool(best), overall, info


# ----------------------------------------------------------------------------------------------------------------
# putting it together
# ----------------------------------------------------------------------------------------------------------------
class _Stats:
    """Per-pattern numbers gathered in one pass (the patterns themselves are not kept)."""

    def __init__(self):
        self.pos, self.cen, self.com, self.var, self.df, self.tot = [], [], [], [], [], []
        self.radius = None
        self.band = None
        self.counts = True

    def add(self, patterns, positions, *, radius=None, smooth_px=1.0, centre_every: int = 1):
        x = np.asarray(patterns)
        if x.ndim != 3 or x.shape[0] == 0:
            return
        self._append(self.compute(x, positions, radius=radius, smooth_px=smooth_px, centre_every=centre_every))

    def add_many(self, chunks, *, workers: int = 1, **kw) -> None:
        """:meth:`add` each ``(patterns, positions)`` of ``chunks`` in order; with ``workers`` > 1 the chunks
        after the first ones (which fix the disc radius and the dark-field band) are computed on that many threads
        (numpy and scipy.ndimage release the GIL), then appended in order: the same statistics."""
        chunks = [(np.asarray(x), p) for x, p in chunks if np.ndim(x) == 3 and len(x)]
        if not chunks:
            return
        i = 0
        while i < len(chunks) and (i == 0 or self.radius is None or self.band is None):
            self.add(*chunks[i], **kw)
            i += 1
        rest = chunks[i:]
        if workers > 1 and len(rest) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(rest))) as ex:
                results = list(ex.map(lambda c: self.compute(*c, **kw), rest))
        else:
            results = [self.compute(*c, **kw) for c in rest]
        for r in results:
            self._append(r)

    def _append(self, r: dict) -> None:
        self.counts = self.counts and r["counts"]
        if self.radius is None and r["radius"] is not None:
            self.radius = r["radius"]
        if self.band is None and r["band"] is not None:
            self.band = r["band"]
        for k in ("pos", "cen", "com", "var", "df", "tot"):
            getattr(self, k).append(r[k])

    def compute(self, patterns, positions, *, radius=None, smooth_px=1.0, centre_every: int = 1) -> dict:
        """One chunk's per-pattern numbers; reads the radius and band fixed so far, changes nothing."""
        x = np.asarray(patterns)
        pos = _as_positions(positions, x.shape[0])
        xf = x.astype(np.float32, copy=False)
        if x.dtype.kind in "ui":  # integers are whole numbers in float32 too: only the sign is in question
            counts = bool(x.dtype.kind == "u" or np.all(x >= 0))
        else:
            counts = bool(np.all(xf >= 0) and np.all(xf == np.round(xf)))
        r_in = radius if radius is not None else self.radius
        if centre_every > 1:  # disc centres of every k-th pattern only (NaN elsewhere); the rest of all of them
            cen_k, info_k = measure_disc_centres(xf[::centre_every], radius=r_in, smooth_px=smooth_px)
            cen = np.full((len(xf), 2), np.nan)
            cen[::centre_every] = cen_k
            ok = np.zeros(len(xf), bool)
            ok[::centre_every] = info_k["ok"]
            info = dict(ok=ok, radius_used=info_k["radius_used"])
        else:
            cen, info = measure_disc_centres(xf, radius=r_in, smooth_px=smooth_px)
        own_radius = self.radius
        if own_radius is None and np.isfinite(info["radius_used"]):
            own_radius = info["radius_used"] if radius is None else float(radius)
        com, m2 = centre_of_mass(xf, second_moments=True)
        tot = xf.reshape(len(xf), -1).sum(1, dtype=np.float64)
        ky, kx = x.shape[1:]
        ok = info["ok"]
        # provisional (chunk-local, affine) surface for the dark-field annulus
        if ok.sum() >= 8:
            try:
                prov = fit_descan(cen, pos, 1, max_iter=8).evaluate(pos)
            except ValueError:
                prov = np.tile(np.nanmedian(cen, axis=0), (len(pos), 1))
        elif ok.any():
            prov = np.tile(np.nanmedian(cen, axis=0), (len(pos), 1))
        else:
            prov = np.tile(np.array([ky // 2, kx // 2], float), (len(pos), 1))
        band = self.band
        if band is None and own_radius is not None:
            # dark-field annulus, fixed for the whole estimate: from 1.2 R to the detector's edge, less the
            # largest disc offset of the first chunk (no annulus when the disc fills the detector)
            off = float(np.max(np.abs(prov - np.array([ky // 2, kx // 2])))) if len(prov) else 0.0
            r_in, r_out = 1.2 * own_radius, min(ky, kx) / 2 - 1 - off
            band = (r_in, r_out) if r_out > r_in + 1 else (0.0, 0.0)
        if band is not None and band[1] > band[0]:
            gy, gx = np.mgrid[0:ky, 0:kx].astype(np.float32)
            d2 = (gy[None] - prov[:, 0, None, None].astype(np.float32)) ** 2 + \
                 (gx[None] - prov[:, 1, None, None].astype(np.float32)) ** 2
            m = (d2 >= band[0] ** 2) & (d2 < band[1] ** 2)
            df = (xf * m).reshape(len(xf), -1).sum(1, dtype=np.float64) / np.where(tot > 0, tot, np.nan)
        else:
            df = np.full(len(xf), np.nan)
        return dict(counts=counts, radius=own_radius, band=band, pos=pos.astype(np.int64), cen=cen, com=com,
                    var=m2.mean(1) / np.where(tot > 0, tot, np.nan), df=df, tot=tot)

    def arrays(self):
        def cat(v):
            return np.concatenate(v) if v else np.zeros((0,))

        return (cat(self.pos).reshape(-1, 2), cat(self.cen).reshape(-1, 2), cat(self.com).reshape(-1, 2),
                cat(self.var), cat(self.df), cat(self.tot))


def _check_overrides(overrides):
    ov = dict(overrides or {})
    bad = set(ov) - set(_OVERRIDE_KEYS)
    if bad:
        raise ValueError(f"unknown geometry override(s) {sorted(bad)}; valid: {', '.join(_OVERRIDE_KEYS)}")
    if ("descan_y" in ov) != ("descan_x" in ov):
        raise ValueError("override descan_y and descan_x together")
    return {k: v for k, v in ov.items() if v is not None}


def _geometry_from_stats(st: _Stats, nav_shape, meta, overrides, *, convergence_mrad=None,
                         descan_order: int = 1) -> Geometry:
    ov = _check_overrides(overrides)
    pos, cen, com, var, df, tot = st.arrays()
    ny, nx = (int(v) for v in nav_shape)
    sources, conf, notes, details = {}, {}, [], {}
    details["n_patterns"] = int(len(pos))
    details["disc_radius_px"] = st.radius

    # descan
    fit = None
    ok = np.all(np.isfinite(cen), axis=1)
    if "descan_y" in ov:
        dy, dx = tuple(ov["descan_y"]), tuple(ov["descan_x"])
        sources["descan"] = "user"
    else:
        dy = dx = None
        order = descan_order if ok.sum() >= 6 * descan_order + 10 else 1
        if ok.sum() >= 8:
            fit = fit_descan(cen, pos, order, nav_shape=(ny, nx))
            dy, dx = fit.coeffs_y, fit.coeffs_x
            sources["descan"] = "estimated"
            covered = min(fit.coverage) >= DESCAN_COVERAGE_HIGH
            conf["descan"] = ("high" if fit.n_used >= 64 and fit.extrapolation_se_px <= DESCAN_SE_HIGH and covered
                              else "low")
            details["descan"] = fit.to_dict()
            if not covered:
                notes.append(f"descan: the centres span {fit.coverage[0]:.0%} of the rows and {fit.coverage[1]:.0%} "
                             f"of the columns; the surface is extrapolated beyond them")
            elif conf["descan"] == "low":
                notes.append(f"descan: surface uncertain (se {fit.extrapolation_se_px:.2f} px at the worst corner, "
                             f"{fit.n_used} centres)")
        else:
            sources["descan"] = "default"
            conf["descan"] = "none"
            notes.append(f"descan: only {int(ok.sum())} disc centres found; the disc is assumed at the detector centre")

    # CoM field in the detector frame, descan removed
    if dy is not None:
        surf = Geometry(descan_y=dy, descan_x=dx).disc_centre(pos) if len(pos) else np.zeros((0, 2))
    else:
        surf = np.full((len(pos), 2), np.nan)
        if len(pos):
            surf[:] = np.nanmedian(com, axis=0)
    rel = com - surf
    grid_y = np.full((ny, nx), np.nan)
    grid_x = np.full((ny, nx), np.nan)
    grid_d = np.full((ny, nx), np.nan)
    if len(pos):
        inside = (pos[:, 0] >= 0) & (pos[:, 0] < ny) & (pos[:, 1] >= 0) & (pos[:, 1] < nx)
        p = pos[inside]
        grid_y[p[:, 0], p[:, 1]] = rel[inside, 0]
        grid_x[p[:, 0], p[:, 1]] = rel[inside, 1]
        grid_d[p[:, 0], p[:, 1]] = df[inside]
    noise_var = float(np.nanmean(var)) if (st.counts and len(var) and np.isfinite(var).any()) else None

    # rotation and flip: user > file > estimated > default
    file_rot = getattr(meta, "rotation_deg", None) if meta is not None else None
    file_flip = getattr(meta, "flip", None) if meta is not None else None
    rot_known = ov.get("rotation_deg", file_rot)
    flip_known = ov.get("flip", file_flip)
    est_rot, est_flip, est_conf, rinfo = estimate_rotation(grid_y, grid_x, dark_field=grid_d, noise_var=noise_var,
                                                           flip=None if flip_known is None else bool(flip_known))
    flip_choice, flip_conf = est_flip, rinfo.get("flip_confidence", "none")
    if rot_known is not None and flip_known is None and est_rot is not None:
        # the file (or user) gives the rotation but not the flip: choose the flip at that rotation
        _, flip_choice, flip_conf, finfo = estimate_rotation(grid_y, grid_x, noise_var=noise_var,
                                                             rotation_deg=float(rot_known), n_null=0)
        rinfo = dict(rinfo, flip_at_given_rotation=flip_choice, flip_at_given_rotation_confidence=flip_conf,
                     flip_ratio_at_given_rotation=finfo.get("flip_ratio_at_given_rotation"))
    details["rotation"] = {k: v for k, v in rinfo.items() if k != "curl_by_angle"}
    if "rotation_deg" in ov:
        rotation, sources["rotation_deg"] = float(ov["rotation_deg"]), "user"
    elif file_rot is not None:
        rotation, sources["rotation_deg"] = float(file_rot), "file"
    elif est_rot is not None:
        rotation, sources["rotation_deg"] = est_rot, "estimated"
        conf["rotation_deg"] = est_conf
        if rinfo.get("half_turn_confidence") != "high":
            r_txt = "no dark field" if rinfo.get("half_turn_r") is None else f"r = {rinfo['half_turn_r']:.2f}"
            notes.append(f"rotation: known modulo 180 deg only (dark-field rule {r_txt} < {HALF_TURN_R}); "
                         f"the alternative is {rinfo['alternative_deg']:.1f} deg")
    else:
        rotation, sources["rotation_deg"] = 0.0, "default"
        conf["rotation_deg"] = "none"
        notes.append(f"rotation: not estimated ({rinfo.get('reason')}); 0 deg assumed")
    if "flip" in ov:
        flip, sources["flip"] = bool(ov["flip"]), "user"
    elif file_flip is not None:
        flip, sources["flip"] = bool(file_flip), "file"
    elif flip_choice is not None:
        flip, sources["flip"] = flip_choice, "estimated"
        conf["flip"] = flip_conf
    else:
        flip, sources["flip"] = False, "default"
        conf["flip"] = "none"
    if sources["rotation_deg"] != "estimated" and est_rot is not None and est_conf == "high":
        d = (est_rot - rotation + 180.0) % 360.0 - 180.0
        if abs(d) > 5.0 or (est_flip != flip):
            notes.append(f"rotation: the {sources['rotation_deg']} value {rotation:.1f} deg (flip {flip}) disagrees "
                         f"with the data's estimate {est_rot:.1f} deg (flip {est_flip}, high confidence)")

    # camera length: user > file > disc radius with the convergence angle
    conv = getattr(meta, "convergence_mrad", None) if meta is not None else None
    conv = conv if conv is not None else convergence_mrad
    radius_fit = st.radius
    if "mrad_per_px" in ov:
        mrad, sources["mrad_per_px"] = float(ov["mrad_per_px"]), "user"
    elif meta is not None and getattr(meta, "mrad_per_px", None) is not None:
        mrad, sources["mrad_per_px"] = float(meta.mrad_per_px), "file"
    elif conv is not None and radius_fit is not None and np.isfinite(radius_fit) and radius_fit > 0:
        mrad, sources["mrad_per_px"] = float(conv) / float(radius_fit), "estimated"
        conf["mrad_per_px"] = "low"
        notes.append(f"mrad_per_px: from the disc radius {radius_fit:.2f} px and a {float(conv):g} mrad semi-angle")
    else:
        mrad, sources["mrad_per_px"] = None, "default"
        conf["mrad_per_px"] = "none"
    return Geometry(rotation_deg=rotation, flip=flip, descan_y=dy, descan_x=dx, mrad_per_px=mrad, sources=sources,
                    confidence=conf, notes=tuple(notes), details=_jsonable(details))


def estimate_geometry_from(patterns, positions, nav_shape, meta=None, overrides=None, *,
                           convergence_mrad: float | None = None, descan_order: int = 1, chunk: int = 256,
                           radius: float | None = None, centre_every: int = 1, workers: int | None = None) -> Geometry:
    """The geometry from patterns already in memory, e.g. the first patterns of an ingest's single pass.

    Parameters
    ----------
    patterns : (n, ky, kx) array; positions : (n, 2) [iy, ix]; nav_shape : (ny, nx) of the whole scan.
    meta : the scan's ``polcore.types.ScanMeta`` (file calibration: ``rotation_deg``, ``flip``,
        ``mrad_per_px``, ``convergence_mrad``) or None.
    overrides : dict of user values that win over everything: ``rotation_deg``, ``flip``, ``mrad_per_px``,
        ``descan_y`` + ``descan_x`` (coefficients over ``DESCAN_TERMS``).
    convergence_mrad : probe semi-angle [mrad] used for the camera length when the file has none.
    descan_order : 1 (affine) or 2 (quadratic) surface.
    centre_every : measure the disc centre (the costly part) of every ``centre_every``-th pattern only; the
        CoM, dark field and totals still come from every pattern. With an affine surface (``descan_order=1``)
        the rotation does not depend on which centres fit it (the estimator removes an affine trend from the
        CoM field itself); the descan surface rests on fewer centres (its ``extrapolation_se_px`` grows).
    workers : threads computing the chunks' numbers (None = the cores, at most 4); the same result for any.

    Notes
    -----
    The rotation needs a contiguous block of at least 8 x 8 positions (consecutive rows of a raster scan are
    fine). Leading rows only cover part of the scan: the descan surface is then extrapolated along y and its
    confidence says so (``details['descan']['extrapolation_se_px']``).
    """
    x = np.asarray(patterns)
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"patterns must be (n, ky, kx) with n > 0, got shape {x.shape}")
    pos = _as_positions(positions, x.shape[0])
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    st = _Stats()
    st.add_many([(x[s:s + chunk], pos[s:s + chunk]) for s in range(0, x.shape[0], chunk)], workers=workers,
                radius=radius, centre_every=max(1, int(centre_every)))
    return _geometry_from_stats(st, nav_shape, meta, overrides, convergence_mrad=convergence_mrad,
                                descan_order=descan_order)


def _subsample(nav_shape, max_patterns: int) -> np.ndarray:
    """Flat raster indices: a contiguous central window (3/4 of the budget, for the CoM field) plus a strided
    grid over the whole scan (the rest, for the descan)."""
    ny, nx = nav_shape
    n = ny * nx
    if n <= max_patterns:
        return np.arange(n)
    budget = max(64, int(max_patterns) * 3 // 4)
    wy = min(ny, max(8, int(math.sqrt(budget))))
    wx = min(nx, max(8, budget // wy))
    y0, x0 = (ny - wy) // 2, (nx - wx) // 2
    iy, ix = np.mgrid[y0:y0 + wy, x0:x0 + wx]
    win = (iy * nx + ix).ravel()
    rest = max(0, int(max_patterns) - len(win))
    if rest > 0:
        step = max(1, int(math.ceil(math.sqrt(n / rest))))
        gy, gx = np.mgrid[0:ny:step, 0:nx:step]
        grid = (gy * nx + gx).ravel()
        win = np.union1d(win, grid)
    return np.unique(win)


def estimate_geometry(scan, *, max_patterns: int = 4096, file_meta=None, overrides=None, batch_size: int = 256,
                      convergence_mrad: float | None = None, descan_order: int = 1) -> Geometry:
    """The geometry of a scan (``polcore.io.Scan``): file calibration, user overrides, estimates from the data.

    User overrides win over everything, then the file's calibration (``file_meta``, default ``scan.meta``:
    ``rotation_deg``, ``flip``, ``mrad_per_px``, ``convergence_mrad``), then estimates from a subsample of at
    most ``max_patterns`` patterns read through ``scan.iter_batches``: a contiguous central window (for the CoM
    field) plus a strided grid over the whole scan (for the descan). Only per-pattern numbers are kept, never
    the patterns; the pass stops after the last sampled position. The ingest does not call this: it feeds the
    first patterns of its single pass to :func:`estimate_geometry_from` instead.
    """
    meta = file_meta if file_meta is not None else getattr(scan, "meta", None)
    ny, nx = (int(v) for v in scan.nav_shape)
    want = _subsample((ny, nx), max_patterns)
    last = int(want[-1])
    st = _Stats()
    gen = scan.iter_batches(batch_size)
    try:
        for positions, batch in gen:
            flat = positions[:, 0] * nx + positions[:, 1]
            keep = np.isin(flat, want)
            if keep.any():
                st.add(np.asarray(batch)[keep], positions[keep])
            if flat[-1] >= last:
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    return _geometry_from_stats(st, (ny, nx), meta, overrides, convergence_mrad=convergence_mrad,
                                descan_order=descan_order)

"""Periodic errors: dominant spatial period of an error (or confidence) map, folding onto the unit cell.

Probe positions on A columns carry little polarization signal (PHYSICS.md), so model errors tend to repeat
with the lattice. :func:`periodicity` finds the dominant Fourier peak of a map, refines it to sub-pixel
precision, finds a second (non-collinear) lattice vector when one is significant, and reports how much of the
map's variance the peaks and their harmonics explain. :func:`fold_to_cell` averages a map over positions
inside the unit cell, and :func:`com_relation` correlates the folded error rate with the folded
centre-of-mass magnitude.

Frequencies are in cycles per scan pixel; ``k = (ky, kx)`` with ky along rows (down) and kx along columns
(right). Angles are counter-clockwise from +x as seen on screen (rows go down): ``atan2(-ky, kx)``; a wave
vector and its negative describe the same wave, so angles lie in [0, 180).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import fft as sfft
from scipy import optimize
from threadpoolctl import threadpool_limits

__all__ = ["PeriodicityResult", "periodicity", "fold_to_cell", "com_relation"]

log = logging.getLogger(__name__)

_ROW_CHUNK = 32768  # rows of the design matrix per chunk (bounds memory for large maps)
_MAX_ALIAS_ORDER = 32  # harmonics of the first peak excluded when searching for a second lattice vector


@dataclass(frozen=True, eq=False)
class PeriodicityResult(Mapping):
    """Result of :func:`periodicity`; also readable as a mapping (``result["period_px"]``).

    Attributes
    ----------
    period_px : float
        Period [scan px] of the dominant peak (1 / |k|); NaN for a constant map.
    angle_deg : float
        Direction of the dominant wave vector [deg], counter-clockwise from +x on screen, in [0, 180).
    periodic_fraction : float
        Fraction (0..1) of the map's variance (over valid entries) explained by sinusoids at the dominant
        peak(s), their harmonics and combinations.
    wavevector : tuple of float
        (ky, kx) of the dominant peak [cycles/px].
    snr : float
        Power of the dominant peak over the median power of the search band.
    significant : bool
        Whether ``snr`` exceeds the false-alarm threshold of a search over the whole band (1 %).
    peaks : list of dict
        Every sinusoid used for ``periodic_fraction``: order (m, n) in the basis of the fundamental(s), ky, kx
        [cycles/px], period_px, angle_deg, power, snr, amplitude (in map units).
    n_fundamentals : int
        1 for a stripe pattern, 2 when a second non-collinear lattice vector was found.
    lattice_period_px : float or None
        The lattice period [scan px] given by the caller.
    lattice_match : float or None
        |period_px - lattice_period_px| / lattice_period_px.
    lattice_fraction : float or None
        Variance fraction explained by a square lattice of that period aligned with the scan axes
        (wave vectors (1/a, 0) and (0, 1/a) and their combinations up to the harmonic order).
    spectrum : np.ndarray, shape (Fy, Fx), float32
        Power spectrum of the windowed, zero-padded map, shifted so that zero frequency is in the middle.
    freq_y, freq_x : np.ndarray, shapes (Fy,), (Fx,)
        Frequencies [cycles/px] of the spectrum's rows and columns (ascending).
    n_valid : int
        Number of finite entries used.
    """

    period_px: float
    angle_deg: float
    periodic_fraction: float
    wavevector: tuple[float, float]
    snr: float
    significant: bool
    peaks: list = field(default_factory=list)
    n_fundamentals: int = 1
    lattice_period_px: float | None = None
    lattice_match: float | None = None
    lattice_fraction: float | None = None
    spectrum: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    freq_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    freq_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_valid: int = 0

    def __getitem__(self, key):
        if key in self._keys():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self):
        return len(self._keys())

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def summary(self) -> dict:
        """Scalar fields only (for tables and logs)."""
        return {k: getattr(self, k) for k in ("period_px", "angle_deg", "periodic_fraction", "snr",
                                              "significant", "n_fundamentals", "lattice_period_px",
                                              "lattice_match", "lattice_fraction", "n_valid")}


def _reduce(k: np.ndarray) -> np.ndarray:
    """Alias frequencies (..., 2) into [-0.5, 0.5) (the representative of smallest norm)."""
    return (np.asarray(k, dtype=float) + 0.5) % 1.0 - 0.5


def _canonical(k) -> np.ndarray:
    """Reduce (ky, kx) and pick the sign whose on-screen angle lies in [0, 180)."""
    k = _reduce(k)
    ang = math.degrees(math.atan2(-k[0], k[1])) % 360.0
    if ang >= 180.0 - 1e-9:
        k = _reduce(-k)
    return k


def _angle(k) -> float:
    a = math.degrees(math.atan2(-k[0], k[1])) % 180.0
    return 0.0 if a > 180.0 - 1e-9 else a


class _Dft:
    """Power of the windowed, demeaned map at arbitrary (ky, kx) [cycles/px]."""

    def __init__(self, z: np.ndarray):
        self.z = z
        self.y = np.arange(z.shape[0])
        self.x = np.arange(z.shape[1])

    def power(self, k) -> float:
        # real matrix-vector products only (complex BLAS calls thread badly on a loaded machine)
        ay = 2 * np.pi * k[0] * self.y
        ax = 2 * np.pi * k[1] * self.x
        zc = self.z @ np.cos(ax)
        zs = self.z @ np.sin(ax)
        cy, sy = np.cos(ay), np.sin(ay)
        re = cy @ zc - sy @ zs
        im = cy @ zs + sy @ zc
        return float(re * re + im * im)


def _refine(dft: _Dft, k0, shape) -> np.ndarray:
    """Sub-pixel maximum of the periodogram near ``k0`` (within 1.5 unpadded bins)."""
    ny, nx = shape
    by, bx = 1.0 / ny, 1.0 / nx
    k0 = np.asarray(k0, dtype=float)
    scale = np.array([by, bx])

    def cost(u):
        return -math.log(dft.power(k0 + u * scale) + 1e-300)

    simplex = np.array([[0.0, 0.0], [0.3, 0.0], [0.0, 0.3]])
    opts = {"initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-9, "maxiter": 400}
    res = optimize.minimize(cost, np.zeros(2), method="Nelder-Mead", bounds=[(-1.5, 1.5), (-1.5, 1.5)],
                            options=opts)
    u = res.x if res.fun <= cost(np.zeros(2)) else np.zeros(2)
    return k0 + u * scale


def _combinations(basis: list[np.ndarray], order: int, shape, kmin: float):
    """Distinct canonical frequencies m*k1 (+ n*k2), |m|, |n| <= order, with their orders (m, n).

    Fundamentals come first, then by total order; a frequency that aliases onto one already listed is
    dropped.
    """
    ny, nx = shape
    ns = range(0, order + 1) if len(basis) > 1 else [0]
    # (m, n) and (-m, -n) are the same wave: keep n > 0, or n == 0 and m > 0
    orders = [(m, n) for n in ns for m in range(-order, order + 1) if n > 0 or (n == 0 and m > 0)]
    orders.sort(key=lambda o: (abs(o[0]) + abs(o[1]), abs(o[1]), o[0] < 0))
    out: list[tuple[tuple[int, int], np.ndarray]] = []
    for m, n in orders:
        g = m * basis[0] + (n * basis[1] if len(basis) > 1 else 0.0)
        g = _canonical(g)
        if np.hypot(*g) < kmin:
            continue
        dup = False
        for _, h in out:
            d = _reduce(g - h)
            d2 = _reduce(g + h)
            if min(np.hypot(d[0] * ny, d[1] * nx), np.hypot(d2[0] * ny, d2[1] * nx)) < 0.5:
                dup = True
                break
        if not dup:
            out.append(((m, n), g))
    return out


def _explained(values: np.ndarray, valid: np.ndarray, freqs: list[np.ndarray]):
    """Least-squares fit of cos/sin at ``freqs`` (plus a constant) to the valid entries.

    Returns (R^2, amplitudes per frequency).
    """
    iy, ix = np.nonzero(valid)
    y = values[valid].astype(float)
    y = y - y.mean()
    tss = float(y @ y)
    if tss <= 0 or not freqs:
        return 0.0, np.zeros(len(freqs))
    g = np.asarray(freqs, dtype=float)  # (M, 2)
    m = 2 * len(g) + 1
    ata = np.zeros((m, m))
    aty = np.zeros(m)
    # tall-skinny products: BLAS threading only adds overhead here (and stalls on a loaded machine)
    with threadpool_limits(limits=1, user_api="blas"):
        for s in range(0, y.size, _ROW_CHUNK):
            sl = slice(s, s + _ROW_CHUNK)
            ph = 2 * np.pi * (np.outer(iy[sl], g[:, 0]) + np.outer(ix[sl], g[:, 1]))
            a = np.concatenate([np.ones((ph.shape[0], 1)), np.cos(ph), np.sin(ph)], axis=1)
            ata += a.T @ a
            aty += a.T @ y[sl]
        beta = np.linalg.pinv(ata, rcond=1e-10, hermitian=True) @ aty
    ess = float(beta @ aty)
    amp = np.hypot(beta[1:1 + len(g)], beta[1 + len(g):])
    return float(np.clip(ess / tss, 0.0, 1.0)), amp


def periodicity(
    error_map,
    *,
    lattice_period_px: float | None = None,
    min_period_px: float = 2.0,
    max_period_px: float | None = None,
    n_harmonics: int = 4,
    alpha: float = 0.01,
) -> PeriodicityResult:
    """Dominant spatial period and orientation of an error (or confidence) map.

    Parameters
    ----------
    error_map : array_like, shape (ny, nx)
        Error indicator (bool or 0/1), error rate, confidence or any scalar map; NaN marks masked
        (unlabelled) positions, which are left out. Non-square maps are fine.
    lattice_period_px : float, optional
        Lattice period [scan px] (lattice constant / scan step) to compare with.
    min_period_px, max_period_px : float
        Search band [scan px]; ``max_period_px`` defaults to ``min(ny, nx) / 2``.
    n_harmonics : int
        Highest harmonic order used for ``periodic_fraction``.
    alpha : float
        False-alarm probability for accepting a second lattice vector or a harmonic as a peak.

    Returns
    -------
    PeriodicityResult
        Dataclass with mapping access; keys include ``period_px``, ``angle_deg``, ``periodic_fraction``,
        ``peaks``, ``lattice_match``, ``spectrum``, ``freq_y``, ``freq_x``.

    Notes
    -----
    The map is demeaned and multiplied by a separable Hann window (zero at masked entries); the coarse peak
    is the maximum of the zero-padded FFT power inside the band, refined by maximising the power of the
    continuous-frequency DFT (the maximum-likelihood frequency of a sinusoid in white noise), which recovers a
    planted period to well under a pixel. Aliased frequencies are reported as their smallest-norm
    representative.
    """
    x = np.asarray(error_map, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"error_map must be 2-D (ny, nx), got shape {x.shape}")
    ny, nx = x.shape
    if min(ny, nx) < 4:
        raise ValueError(f"error_map must be at least 4x4, got {x.shape}")
    if lattice_period_px is not None and not lattice_period_px > 0:
        raise ValueError(f"lattice_period_px must be > 0, got {lattice_period_px}")
    if n_harmonics < 1:
        raise ValueError(f"n_harmonics must be >= 1, got {n_harmonics}")
    max_period_px = float(max_period_px) if max_period_px is not None else min(ny, nx) / 2.0
    if not (2.0 <= min_period_px < max_period_px):
        raise ValueError(f"need 2 <= min_period_px < max_period_px, got {min_period_px}, {max_period_px}")
    valid = np.isfinite(x)
    n_valid = int(valid.sum())
    if n_valid < 16:
        raise ValueError(f"error_map has only {n_valid} finite entries (need >= 16)")

    win = np.outer(np.hanning(ny + 2)[1:-1], np.hanning(nx + 2)[1:-1]) * valid
    xv = np.where(valid, x, 0.0)
    z = win * (xv - (win * xv).sum() / win.sum())
    dft = _Dft(z)

    py, px = sfft.next_fast_len(max(2 * ny, 64)), sfft.next_fast_len(max(2 * nx, 64))
    power = np.abs(sfft.fft2(z, s=(py, px))) ** 2
    fy = sfft.fftfreq(py)
    fx = sfft.fftfreq(px)
    kr = np.hypot(fy[:, None], fx[None, :])
    band = (kr >= 1.0 / max_period_px) & (kr <= 1.0 / min_period_px)
    spectrum = sfft.fftshift(power).astype(np.float32)
    freq_y, freq_x = sfft.fftshift(fy), sfft.fftshift(fx)
    background = float(np.median(power[band])) if np.any(band) else 0.0
    n_eff = max(1.0, band.sum() * (ny * nx) / (py * px) / 2.0)  # independent half-plane bins
    t_search = math.log2(n_eff / alpha)

    lattice_fraction = None
    if lattice_period_px is not None:
        a = float(lattice_period_px)
        lat = _combinations([np.array([0.0, 1.0 / a]), np.array([1.0 / a, 0.0])], n_harmonics, (ny, nx),
                            kmin=0.5 / max(ny, nx))
        lattice_fraction, _ = _explained(x, valid, [g for _, g in lat])

    if background <= 0 or not np.any(power[band] > 0):
        log.info("periodicity: map is constant over its valid entries; no period")
        return PeriodicityResult(
            period_px=float("nan"), angle_deg=float("nan"), periodic_fraction=0.0,
            wavevector=(float("nan"), float("nan")),
            snr=0.0, significant=False, peaks=[], n_fundamentals=0, lattice_period_px=lattice_period_px,
            lattice_match=None, lattice_fraction=lattice_fraction, spectrum=spectrum, freq_y=freq_y,
            freq_x=freq_x, n_valid=n_valid)

    masked = np.where(band, power, -1.0)
    i, j = np.unravel_index(np.argmax(masked), masked.shape)
    k1 = _canonical(_refine(dft, (fy[i], fx[j]), (ny, nx)))
    p1 = dft.power(k1)
    snr1 = p1 / background
    basis = [k1]

    # second, non-collinear lattice vector: strongest remaining peak away from the harmonics of k1
    def near(g, radius=2.5):
        """Padded bins within ``radius`` unpadded bins of +g or -g."""
        out = np.zeros(band.shape, dtype=bool)
        for s in (1.0, -1.0):
            dy = _reduce(fy[:, None] - s * g[0]) * ny
            dx = _reduce(fx[None, :] - s * g[1]) * nx
            out |= dy ** 2 + dx ** 2 < radius ** 2
        return out

    excl = np.zeros_like(band)
    for m in range(1, _MAX_ALIAS_ORDER + 1):  # sampled binary patterns alias many harmonics
        excl |= near(_reduce(m * k1))
    cand = np.where(band & ~excl, power, -1.0)
    for _ in range(3):
        if cand.max() <= 0:
            break
        i, j = np.unravel_index(np.argmax(cand), cand.shape)
        k2 = _canonical(_refine(dft, (fy[i], fx[j]), (ny, nx)))
        if dft.power(k2) / background < t_search:
            break
        sin_angle = abs(k1[0] * k2[1] - k1[1] * k2[0]) / (np.hypot(*k1) * np.hypot(*k2))
        if sin_angle > 0.25:
            basis.append(k2)
            break
        cand[near(np.array([fy[i], fx[j]]))] = -1.0

    combos = _combinations(basis, n_harmonics, (ny, nx), kmin=1.0 / max(ny, nx))
    t_harm = math.log2(max(len(combos), 1) / alpha)
    kept = []
    for order, g in combos:
        is_fund = order in ((1, 0), (0, 1))
        pw = dft.power(g)
        if is_fund or pw / background >= t_harm:
            kept.append((order, g, pw))
    frac, amp = _explained(x, valid, [g for _, g, _ in kept])
    peaks = [
        {
            "order": order,
            "ky": float(g[0]),
            "kx": float(g[1]),
            "period_px": float(1.0 / np.hypot(*g)),
            "angle_deg": _angle(g),
            "power": pw,
            "snr": pw / background,
            "amplitude": float(a),
        }
        for (order, g, pw), a in zip(kept, amp)
    ]
    period = float(1.0 / np.hypot(*k1))
    match = None if lattice_period_px is None else abs(period - lattice_period_px) / lattice_period_px
    return PeriodicityResult(
        period_px=period,
        angle_deg=_angle(k1),
        periodic_fraction=frac,
        wavevector=(float(k1[0]), float(k1[1])),
        snr=float(snr1),
        significant=bool(snr1 >= t_search),
        peaks=peaks,
        n_fundamentals=len(basis),
        lattice_period_px=None if lattice_period_px is None else float(lattice_period_px),
        lattice_match=match,
        lattice_fraction=lattice_fraction,
        spectrum=spectrum,
        freq_y=freq_y,
        freq_x=freq_x,
        n_valid=n_valid,
    )


def _periods(period_px) -> tuple[float, float]:
    p = np.broadcast_to(np.asarray(period_px, dtype=float), (2,))
    if not np.all(p > 0):
        raise ValueError(f"period_px must be > 0 (scalar or (py, px)), got {period_px}")
    return float(p[0]), float(p[1])


def fold_to_cell(values_map, period_px, *, n_bins=None, origin_px=(0.0, 0.0), return_counts: bool = False):
    """Average a map over positions inside the unit cell of an axis-aligned lattice.

    Position (iy, ix) falls in cell bin ``floor(((iy - oy) mod py) / py * nby)`` (and likewise for x); the
    period may be non-integer (lattice constant / scan step), which spreads the bins over several cells.

    Parameters
    ----------
    values_map : array_like, shape (ny, nx)
        Values to fold (e.g. the error indicator pred != true, so the result is an error rate); NaN entries
        are left out.
    period_px : float or (float, float)
        Lattice period [scan px] along y and x.
    n_bins : int or (int, int), optional
        Bins per period; defaults to round(period) (at least 2).
    origin_px : (float, float)
        Scan position (y, x) [px] of the cell origin.
    return_counts : bool
        Also return the number of values in each bin.

    Returns
    -------
    cell : np.ndarray, shape (nby, nbx), float
        Mean value per intra-cell bin (NaN for empty bins); row 0 is the top of the cell.
    counts : np.ndarray, shape (nby, nbx), int (only with ``return_counts``)
    """
    v = np.asarray(values_map, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"values_map must be 2-D (ny, nx), got shape {v.shape}")
    py, px = _periods(period_px)
    if n_bins is None:
        nby, nbx = max(2, int(round(py))), max(2, int(round(px)))
    else:
        nb = np.broadcast_to(np.asarray(n_bins, dtype=int), (2,))
        if np.any(nb < 1):
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        nby, nbx = int(nb[0]), int(nb[1])
    ny, nx = v.shape
    by = np.minimum((np.mod(np.arange(ny) - origin_px[0], py) / py * nby).astype(int), nby - 1)
    bx = np.minimum((np.mod(np.arange(nx) - origin_px[1], px) / px * nbx).astype(int), nbx - 1)
    idx = by[:, None] * nbx + bx[None, :]
    ok = np.isfinite(v)
    counts = np.bincount(idx[ok], minlength=nby * nbx).reshape(nby, nbx)
    sums = np.bincount(idx[ok], weights=v[ok], minlength=nby * nbx).reshape(nby, nbx)
    with np.errstate(invalid="ignore", divide="ignore"):
        cell = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return (cell, counts) if return_counts else cell


def com_relation(error_cell, com_cell) -> dict:
    """Correlation between the folded error rate and the folded centre-of-mass magnitude.

    Positions with a small CoM shift carry little polarization information, so a negative correlation is
    expected.

    Parameters
    ----------
    error_cell, com_cell : array_like, same shape (e.g. (nby, nbx) from :func:`fold_to_cell`)
        Error rate and mean CoM magnitude per intra-cell bin; NaN bins are left out.

    Returns
    -------
    dict with pearson_r, spearman_r, slope (error rate per unit CoM, least squares), n (bins used).
    """
    e = np.asarray(error_cell, dtype=float).ravel()
    c = np.asarray(com_cell, dtype=float).ravel()
    if e.shape != c.shape:
        raise ValueError(f"error_cell and com_cell must have the same shape, got {np.shape(error_cell)} "
                         f"and {np.shape(com_cell)}")
    ok = np.isfinite(e) & np.isfinite(c)
    e, c = e[ok], c[ok]
    out = {"pearson_r": float("nan"), "spearman_r": float("nan"), "slope": float("nan"), "n": int(ok.sum())}
    if e.size < 3 or np.ptp(e) == 0 or np.ptp(c) == 0:
        return out
    from scipy import stats  # imported here: about a second, and only this function needs it

    out["pearson_r"] = float(stats.pearsonr(c, e).statistic)
    out["spearman_r"] = float(stats.spearmanr(c, e).statistic)
    out["slope"] = float(np.polyfit(c, e, 1)[0])
    return out

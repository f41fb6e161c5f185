"""Virtual detectors of a scan, accumulated batch by batch in the ingest's single pass over the file.

What py4DSTEM and LiberTEM users look at first: the structure under every map.

* ``bf``: virtual bright field, the intensity inside the bright-field disc (radius ``r``) [counts];
* ``adf``: virtual annular dark field, the intensity in the annulus ``inner * r <= |k - c| <= outer * r``
  (default 1.2 r to 3 r), clipped to the detector [counts];
* ``com_y``, ``com_x``: the centre of mass of each pattern [detector px] (rows down, columns right), taken
  inside the annulus' outer radius (the disc and the scattering around it, not the far corners' background),
  relative to the scan-mean centre of mass (its mean over the scan is subtracted, so a constant disc offset
  does not show as a field).

The disc centre ``c`` and radius ``r`` [px] come from the fitted preprocessor (:meth:`VirtualImages.from_preprocessor`,
fitted on the same geometry-corrected patterns) or from a mean pattern (:meth:`VirtualImages.from_mean_pattern`).
Hot pixels the preprocessor found are left out of every detector. The per-batch work is one matrix product:
``(n, ky * kx) @ (ky * kx, 5)`` gives the five sums (bf, adf, total, sum of row and column moments).

Coordinates: pixel ``(i, j)`` has its centre at ``(i, j)`` (as in :mod:`polcore.preprocess`); with the scan
geometry applied, detector rows and columns run along the scan's y (down) and x (right).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from polcore.preprocess import centre_of_mass  # noqa: F401 - part of this module's interface

__all__ = ["IMAGE_KINDS", "VirtualImages", "centre_of_mass", "detector_masks", "stitch_rows"]

log = logging.getLogger(__name__)

#: The images stored per scan, in this order.
IMAGE_KINDS: tuple[str, ...] = ("bf", "adf", "com_y", "com_x")
_EPS = 1e-12


def detector_masks(sig_shape, center, radius: float, adf: tuple[float, float] = (1.2, 3.0),
                   hot_pixels=None) -> dict[str, np.ndarray]:
    """Boolean (ky, kx) detectors: ``bf`` (|k - c| <= r), ``adf`` (inner r <= |k - c| <= outer r) and ``com``
    (|k - c| <= outer r, where the centre of mass is taken), without the hot pixels (rows, cols)."""
    ky, kx = (int(v) for v in sig_shape)
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"disc radius must be a positive number of pixels, got {radius!r}")
    inner, outer = (float(v) for v in adf)
    if not 0 < inner < outer:
        raise ValueError(f"ADF radii must satisfy 0 < inner < outer (in disc radii), got {adf!r}")
    yy, xx = np.mgrid[0:ky, 0:kx]
    rr = np.hypot(yy - float(center[0]), xx - float(center[1]))
    good = np.ones((ky, kx), bool)
    if hot_pixels is not None and len(hot_pixels):
        hp = np.asarray(hot_pixels, int).reshape(-1, 2)
        inside = (hp[:, 0] >= 0) & (hp[:, 0] < ky) & (hp[:, 1] >= 0) & (hp[:, 1] < kx)
        good[hp[inside, 0], hp[inside, 1]] = False
    return {"bf": (rr <= radius) & good, "adf": (rr >= inner * radius) & (rr <= outer * radius) & good,
            "com": (rr <= outer * radius) & good}


class VirtualImages:
    """Accumulate virtual BF, ADF and the centre-of-mass field over a scan, one batch at a time.

    Parameters
    ----------
    nav_shape : (ny, nx) probe positions.
    sig_shape : (ky, kx) detector pixels.
    center : (cy, cx) disc centre [px] in the patterns given to :meth:`add`.
    radius : bright-field disc radius [px].
    adf : (inner, outer) radii of the ADF annulus in disc radii (default 1.2 to 3), clipped to the detector.
    hot_pixels : (m, 2) detector pixels (row, col) left out of every detector.

    Use ``acc.add(flat_indices, raw_batch)`` for every batch, then ``acc.result()``.
    """

    def __init__(self, nav_shape, sig_shape, center, radius: float, *, adf: tuple[float, float] = (1.2, 3.0),
                 hot_pixels=None):
        ny, nx = (int(v) for v in nav_shape)
        if ny < 1 or nx < 1:
            raise ValueError(f"nav_shape must be positive, got {nav_shape!r}")
        self.nav_shape = (ny, nx)
        self.sig_shape = tuple(int(v) for v in sig_shape)
        self.center = (float(center[0]), float(center[1]))
        self.radius = float(radius)
        self.adf = (float(adf[0]), float(adf[1]))
        masks = detector_masks(self.sig_shape, self.center, self.radius, self.adf, hot_pixels)
        ky, kx = self.sig_shape
        yy, xx = np.mgrid[0:ky, 0:kx].astype(np.float64)
        com = masks["com"].astype(np.float64)
        # columns: bf, adf, total (CoM region), row moment, column moment (relative to the centre: better
        # conditioned in float32 than absolute pixel indices)
        w = np.stack([masks["bf"].astype(np.float64), masks["adf"].astype(np.float64), com,
                      com * (yy - self.center[0]), com * (xx - self.center[1])], axis=-1)
        self._w = w.reshape(ky * kx, 5)
        self._w32 = self._w.astype(np.float32)
        self.n_pixels = {"bf": int(masks["bf"].sum()), "adf": int(masks["adf"].sum()), "com": int(masks["com"].sum())}
        if self.n_pixels["adf"] == 0:
            log.warning("virtual ADF: the annulus %.1f-%.1f disc radii (r = %.1f px) lies outside the %dx%d "
                        "detector: the ADF image is zero", *self.adf, self.radius, ky, kx)
        self._sums = np.zeros((ny * nx, 5), np.float64)
        self._seen = np.zeros(ny * nx, bool)
        self._com_mean: tuple[float, float] | None = None

    @classmethod
    def from_preprocessor(cls, pre, nav_shape, sig_shape, **kw) -> VirtualImages:
        """Detectors from a fitted :class:`polcore.preprocess.Preprocessor`: its disc centre, its measured
        disc radius (else the convergence semi-angle over the source sampling) and its hot pixels."""
        if not getattr(pre, "is_fitted", False):
            raise ValueError("the preprocessor is not fitted: no disc centre for the virtual detectors")
        info = getattr(pre, "info", {}) or {}
        same = list(info.get("source_shape") or []) == [int(v) for v in sig_shape]
        radius = info.get("disc_radius_px") if same else None
        if not radius or radius < 1.0:
            radius = float(pre.convergence_mrad) / float(pre.source_mrad_per_px_)
        hot = pre.hot_pixels_ if same else None
        return cls(nav_shape, sig_shape, pre.center_, float(radius), hot_pixels=hot, **kw)

    @classmethod
    def from_mean_pattern(cls, mean_pattern, nav_shape, **kw) -> VirtualImages:
        """Detectors from a scan-mean pattern (disc centre and half-maximum radius, hot pixels left out)."""
        from polcore.preprocess import find_disc_center, find_hot_pixels, measure_disc_radius

        m = np.asarray(mean_pattern, dtype=np.float64)
        hot = find_hot_pixels(m)
        if len(hot):
            from polcore.preprocess import _repair

            m = _repair(m[None], hot)[0]
        kw.setdefault("hot_pixels", hot)
        return cls(nav_shape, m.shape, find_disc_center(m), measure_disc_radius(m), **kw)

    def add(self, flat_indices, raw_batch) -> None:
        """Add one batch: ``flat_indices`` (n,) scan positions ``iy * nx + ix``, ``raw_batch`` (n, ky, kx)."""
        idx = np.asarray(flat_indices, dtype=np.intp).ravel()
        b = np.asarray(raw_batch)
        if b.ndim != 3 or b.shape[0] != idx.size or tuple(b.shape[1:]) != self.sig_shape:
            raise ValueError(f"batch must be (n, {self.sig_shape[0]}, {self.sig_shape[1]}) with n = {idx.size} "
                             f"positions, got shape {b.shape}")
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self._sums.shape[0]:
            raise ValueError(f"flat indices out of the {self.nav_shape[0]}x{self.nav_shape[1]} scan")
        flat = b.reshape(idx.size, -1)
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        self._sums[idx] = (flat @ self._w32).astype(np.float64)
        self._seen[idx] = True

    @property
    def n_seen(self) -> int:
        return int(self._seen.sum())

    def result(self) -> dict[str, np.ndarray]:
        """``{'bf', 'adf', 'com_y', 'com_x'}``: float32 (ny, nx) images. BF and ADF [counts, as the file's
        intensities]; the CoM [detector px] relative to the scan mean (rows down, columns right); positions
        never added are NaN."""
        ny, nx = self.nav_shape
        s = self._sums
        tot = s[:, 2]
        ok = self._seen & (np.abs(tot) > _EPS)
        my = np.where(ok, s[:, 3] / np.where(ok, tot, 1.0), np.nan)
        mx = np.where(ok, s[:, 4] / np.where(ok, tot, 1.0), np.nan)
        if ok.any():
            self._com_mean = (float(np.nanmean(my)), float(np.nanmean(mx)))
            my = my - self._com_mean[0]
            mx = mx - self._com_mean[1]
        bf = np.where(self._seen, s[:, 0], np.nan)
        adf = np.where(self._seen, s[:, 1], np.nan)
        return {k: v.reshape(ny, nx).astype(np.float32) for k, v in
                (("bf", bf), ("adf", adf), ("com_y", my), ("com_x", mx))}

    def info(self) -> dict:
        """JSON-able description of the detectors (stored with the images)."""
        return {"center_px": list(self.center), "disc_radius_px": self.radius, "adf_radii": list(self.adf),
                "sig_shape": list(self.sig_shape), "n_pixels": dict(self.n_pixels),
                "com_mean_px": None if self._com_mean is None else list(self._com_mean),
                "com": "centre of mass inside the ADF outer radius, minus its scan mean [detector px]; "
                       "com_y rows (down), com_x columns (right)"}


def stitch_rows(parts) -> tuple[dict[str, np.ndarray], dict]:
    """Join the images of row blocks of one scan (each computed by its own :class:`VirtualImages` with the same
    detectors) into the whole scan's, as one pass would have given them.

    Parameters
    ----------
    parts : iterable of ``(y0, images, info)``: the block's first row, its :meth:`VirtualImages.result` and its
        :meth:`VirtualImages.info` (whose ``com_mean_px`` is what was subtracted from that block's CoM).

    Returns
    -------
    (images, info) of the whole scan: blocks stacked by ``y0``; the CoM made absolute with each block's mean and
    centred again on the scan mean over every valid position.
    """
    parts = sorted(((int(y0), img, dict(inf or {})) for y0, img, inf in parts), key=lambda p: p[0])
    if not parts:
        raise ValueError("no blocks to stitch")
    out = {k: np.concatenate([np.asarray(p[1][k], np.float32) for p in parts], axis=0) for k in ("bf", "adf")}
    com = {}
    for j, k in enumerate(("com_y", "com_x")):
        rows = []
        for _, img, inf in parts:
            mean = inf.get("com_mean_px")
            rows.append(np.asarray(img[k], np.float64) + (0.0 if mean is None else float(mean[j])))
        com[k] = np.concatenate(rows, axis=0)
    valid = np.isfinite(com["com_y"]) & np.isfinite(com["com_x"])
    means = [float(com[k][valid].mean()) if valid.any() else 0.0 for k in ("com_y", "com_x")]
    for j, k in enumerate(("com_y", "com_x")):
        out[k] = (com[k] - means[j]).astype(np.float32)
    info = {**parts[0][2], "com_mean_px": means if valid.any() else None, "blocks": len(parts)}
    return {k: out[k] for k in IMAGE_KINDS}, info

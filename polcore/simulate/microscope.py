"""What a microscope does to a simulated pattern, for training-time augmentation and held-out test sets.

Two entry points:

* :func:`apply_dose`: Poisson counts at a fixed dose (electrons per pattern), seeded: the held-out sets of the
  benchmark (issue 10: 2e4 electrons per pattern).
* :class:`MicroscopeAugment`: a batch of noise-free library patterns -> patterns as a detector records them,
  every effect drawn per pattern: camera-length scaling (a few per cent), disc shift (descan and centring
  error), detector blur, uniform background, Poisson dose over a range, hot pixels. Runs in torch on the
  whole batch (one ``grid_sample``, one FFT), so it costs a few per cent of a training step.

Both return raw intensities (counts); the model input is :func:`polcore.preprocess.minmax` of them, as the
Preprocessor does for a scan recorded at the library's sampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

__all__ = ["apply_dose", "MicroscopeAugment"]


def apply_dose(patterns: np.ndarray, dose: float | None, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts with ``dose`` electrons per pattern on average; None = noise-free (copy, float32).

    Parameters
    ----------
    patterns : (..., K, K) non-negative intensities.
    dose : electrons per pattern [-].
    rng : seeded generator.
    """
    x = np.asarray(patterns, dtype=np.float64)
    if dose is None:
        return x.astype(np.float32)
    if dose <= 0:
        raise ValueError(f"dose must be > 0 electrons per pattern, got {dose}")
    lam = np.clip(x, 0, None)
    lam = lam * (dose / np.maximum(lam.sum(axis=(-2, -1), keepdims=True), 1e-30))
    return rng.poisson(lam).astype(np.float32)


@dataclass(frozen=True)
class MicroscopeAugment:
    """Detector-side effects drawn per pattern (the training distribution; stored with every model).

    Attributes
    ----------
    dose_range : electrons per pattern, log-uniform; ``p_noise_free`` of the patterns stay noise-free.
    scale_range : camera-length error, the pattern is zoomed by a factor uniform in 1 +- scale_range.
    shift_px : disc shift, uniform in +-shift_px on each axis [px] (descan, centring error).
    blur_sigma : detector blur sigma [px], uniform, applied with probability ``p_blur``.
    background : uniform background as a fraction of the mean pixel, uniform in [0, background], with
        probability ``p_background``.
    p_hot : probability of 1-3 hot pixels in a pattern (a few times the disc's brightness).
    """

    dose_range: tuple[float, float] = (3e3, 2e5)
    p_noise_free: float = 0.05
    scale_range: float = 0.04
    shift_px: float = 2.0
    blur_sigma: tuple[float, float] = (0.0, 1.2)
    p_blur: float = 0.5
    background: float = 0.15
    p_background: float = 0.5
    p_hot: float = 0.05

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "microscope"
        return d

    def scaled(self, strength: float) -> MicroscopeAugment:
        """The same effects at ``strength`` in [0, 1] (0: no shift, scaling, blur, background or hot pixels and
        the highest dose of the range; 1: this object). For a curriculum that ramps the microscope in."""
        s = float(min(max(strength, 0.0), 1.0))
        lo, hi = np.log(self.dose_range[0]), np.log(self.dose_range[1])
        return replace(self, dose_range=(float(np.exp(hi - s * (hi - lo))), self.dose_range[1]),
                       scale_range=self.scale_range * s, shift_px=self.shift_px * s,
                       blur_sigma=(self.blur_sigma[0] * s, self.blur_sigma[1] * s), background=self.background * s,
                       p_hot=self.p_hot * s)

    def __call__(self, x, generator=None):
        """Augment a batch.

        Parameters
        ----------
        x : torch float32 (n, K, K) noise-free intensities (any scale).
        generator : torch.Generator (seeded by the caller).

        Returns
        -------
        torch float32 (n, K, K) counts (or intensities for the noise-free share).
        """
        import torch
        import torch.nn.functional as F

        g = generator
        n, K, _ = x.shape
        dev = x.device

        def u(lo, hi, size=(n,)):
            return lo + (hi - lo) * torch.rand(size, generator=g, device=dev)

        x = x / x.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
        # camera length and disc shift: output pixel p samples the source at c + (p - c) * s + d
        s = u(1 - self.scale_range, 1 + self.scale_range)
        d = u(-self.shift_px, self.shift_px, (n, 2))
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        # align_corners=False normalised coordinates: one pixel = 2 / K; the optical axis sits at pixel K // 2,
        # half a pixel off the grid centre for even K, which the scaling about it must respect
        off = (2 * (K // 2) + 1) / K - 1
        theta[:, 0, 2] = off * (1 - s) + d[:, 1] * 2 / K
        theta[:, 1, 2] = off * (1 - s) + d[:, 0] * 2 / K
        grid = F.affine_grid(theta, (n, 1, K, K), align_corners=False)
        x = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
        x = x * s[:, None, None] ** 2
        # blur: Gaussian transfer function per pattern
        sig = u(*self.blur_sigma) * (torch.rand(n, generator=g, device=dev) < self.p_blur)
        if bool((sig > 0).any()):
            f = torch.fft.fftfreq(K, device=dev)
            f2 = f[:, None] ** 2 + f[None, :] ** 2
            h = torch.exp(-2 * (np.pi**2) * sig[:, None, None] ** 2 * f2[None])
            x = torch.fft.ifft2(torch.fft.fft2(x) * h).real.clamp_min(0)
        # background
        bg = u(0, self.background) * (torch.rand(n, generator=g, device=dev) < self.p_background)
        x = x + bg[:, None, None] / (K * K)
        # dose
        lo, hi = np.log(self.dose_range[0]), np.log(self.dose_range[1])
        dose = torch.exp(u(lo, hi))
        lam = x / x.sum(dim=(1, 2), keepdim=True) * dose[:, None, None]
        noisy = torch.poisson(lam, generator=g)
        keep = (torch.rand(n, generator=g, device=dev) < self.p_noise_free)[:, None, None]
        x = torch.where(keep, lam, noisy)
        # hot pixels
        hot = torch.rand(n, generator=g, device=dev) < self.p_hot
        if bool(hot.any()):
            idx = torch.nonzero(hot)[:, 0]
            for _ in range(3):
                r = torch.randint(0, K, (len(idx),), generator=g, device=dev)
                c = torch.randint(0, K, (len(idx),), generator=g, device=dev)
                peak = x[idx].amax(dim=(1, 2))
                x[idx, r, c] = peak * u(2.0, 8.0, (len(idx),))
        return x

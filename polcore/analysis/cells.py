"""Unit-cell pooling of per-pattern predictions: polarization belongs to a unit cell, not to a probe position.

Probe positions on A-site columns carry little polarization signal (PHYSICS.md), so per-pattern accuracy has a
physical ceiling. The cell layer combines the class log-probabilities of every probe position inside one
projected unit cell: ``log P(c | cell) = sum_pos log p(c | pattern_pos) + const``, the maximum-likelihood class
if the patterns were independent given the class (the positions of one cell see one polarization).

The lattice period in scan pixels comes from the calibration (``lattice / step``) or, for an uncalibrated scan,
from the scan's own periodicity (:func:`estimate_cell_px`: the strongest non-zero frequency of a per-position
image such as the centre-of-mass magnitude). The phase of the lattice does not matter: a block of one cell
period holds every position inside the cell once, wherever it starts.

What pooling assumes, and where it fails:

* one polarization per cell: a domain wall running through a block mixes two classes and the block takes the
  majority's (or a confident minority's) class; walls are blurred to the block size;
* a period that is right to a fraction of a pixel per cell: blocks are ``floor(i / cell_px)``, so a wrong
  period slowly walks the blocks off the lattice (harmless for pooling, harmful only for defect localisation);
* roughly independent errors: correlated errors (a tilt that biases every position of a cell the same way) are
  not averaged out, which is why the nuisance-unknown limit per cell stays below 1 at large thickness.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cell_blocks", "pool_scan", "estimate_cell_px"]


def cell_blocks(ny: int, nx: int, cell_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Block index of every position: (cy (ny,), cx (nx,)) with ``cy = floor(iy / cell_px)``.

    Parameters
    ----------
    ny, nx : scan size [positions].
    cell_px : lattice period [scan pixels], > 1.
    """
    if not (cell_px and np.isfinite(cell_px) and cell_px >= 1.0):
        raise ValueError(f"cell_px must be a period of at least 1 scan pixel, got {cell_px!r}")
    cy = np.floor(np.arange(ny) / float(cell_px) + 1e-9).astype(np.int64)
    cx = np.floor(np.arange(nx) / float(cell_px) + 1e-9).astype(np.int64)
    return cy, cx


def pool_scan(probs: np.ndarray, cell_px: float, eps: float = 1e-6) -> dict:
    """Pool per-position class probabilities over unit-cell blocks.

    Parameters
    ----------
    probs : (ny, nx, 8) per-position class probabilities.
    cell_px : lattice period [scan pixels].
    eps : probability floor before the logarithm (a single overconfident position cannot veto a class).

    Returns
    -------
    dict with ``pred`` int8 (ny, nx) (each position gets its cell's class), ``probs`` float32 (ny, nx, 8) (the
    cell's pooled posterior), ``confidence`` float32 (ny, nx), ``cell_y`` / ``cell_x`` int (ny,) / (nx,)
    block indices, ``n_cells`` and ``cell_pred`` int8 (ncy, ncx).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"probs must be (ny, nx, n_classes), got shape {p.shape}")
    ny, nx, nc = p.shape
    cy, cx = cell_blocks(ny, nx, cell_px)
    ncy, ncx = int(cy[-1]) + 1, int(cx[-1]) + 1
    logp = np.log(np.clip(p, eps, 1.0))
    acc = np.zeros((ncy, ncx, nc))
    np.add.at(acc, (cy[:, None], cx[None, :]), logp)
    acc -= acc.max(axis=-1, keepdims=True)
    post = np.exp(acc)
    post /= post.sum(axis=-1, keepdims=True)
    cell_pred = post.argmax(axis=-1).astype(np.int8)
    full = post[cy[:, None], cx[None, :]].astype(np.float32)
    return dict(pred=cell_pred[cy[:, None], cx[None, :]], probs=full, confidence=full.max(axis=-1), cell_y=cy,
                cell_x=cx, n_cells=ncy * ncx, cell_pred=cell_pred)


def estimate_cell_px(image: np.ndarray, min_px: float = 3.0) -> tuple[float | None, float]:
    """Lattice period [scan pixels] of a per-position image from its strongest non-zero spatial frequency.

    Parameters
    ----------
    image : (ny, nx) per-position image with lattice contrast (CoM magnitude, virtual bright field).
    min_px : shortest period considered [px].

    Returns
    -------
    (period or None, prominence): ``prominence`` is the peak's power over the median power of the searched
    band; below 10 there is no clear lattice and the period is None (the cell layer is then not computed).
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 2 * min_px:
        return None, 0.0
    a = a - a.mean()
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    P = np.abs(np.fft.fft2(a * win)) ** 2
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.fftfreq(a.shape[1])[None, :]
    f = np.hypot(fy, fx)
    # axis-aligned peaks (the scan grid is aligned with the lattice to within a few degrees)
    band = (f > 1.5 / min(a.shape)) & (f <= 1.0 / min_px) & ((np.abs(fy) < 1e-9) | (np.abs(fx) < 1e-9))
    if not band.any():
        return None, 0.0
    vals = np.where(band, P, 0.0)
    i = np.unravel_index(np.argmax(vals), P.shape)
    prom = float(vals[i] / max(np.median(P[band]), 1e-30))
    if prom < 10.0:
        return None, prom
    return float(1.0 / f[i]), prom

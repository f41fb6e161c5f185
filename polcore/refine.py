"""Refine an estimated detector rotation with a trained model: the angle at which the model is surest.

Why
---
The curl-free criterion (:func:`polcore.geometry.estimate_rotation`) fixes the rotation of a thick, tilted
crystal's CoM field to about 1-2 deg (module docstring of :mod:`polcore.geometry`). The models are trained on
library patterns in the scan frame (no rotation augmentation), and a pattern turned by 1.3 deg already costs the
shipped binned CNN about 7 points on a composed 10 nm scan. A model's mean prediction entropy over the scan is
smallest where the patterns look most like its training patterns, i.e. at the right rotation. Measured on the
composed 24 x 24, 10 nm scan of ``tests/test_geometry_ingest.py`` (turned by 30 deg and flipped, 2e4 e-): the
entropy of the shipped CNN falls from 0.539 at 28 deg to its minimum 0.5046 at 30.0 deg and rises to 0.576 at
33 deg, and the accuracy follows it (0.743 / 0.861 / 0.668).

What it cannot do: tell a rotation from the one 180 deg away. A detector turned by 180 deg shows every pattern
of the crystal as that of the crystal with the opposite polarization (the projected structure apart from the
polar displacements is centrosymmetric), so the model is as sure at ``t + 180`` as at ``t`` (measured: entropy
within 0.015 at 10, 20 and 35 nm, with every class reversed). The half-turn stays with the dark-field rule of
:mod:`polcore.geometry` or with the user.

The refinement only moves a rotation that was *estimated* and trusted (confidence 'high'), by at most
``span_deg``; a value from the file or the user is never changed.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["refine_rotation", "mean_entropy"]

log = logging.getLogger(__name__)


def mean_entropy(proba: np.ndarray) -> float:
    """Mean Shannon entropy [nats] of rows of class probabilities."""
    p = np.clip(np.asarray(proba, np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(axis=1).mean())


def _entropy_at(model, make_pre, patterns, positions, geom, angle: float) -> float:
    from polcore.geometry import apply_geometry

    x = apply_geometry(patterns, positions, geom.replace(rotation_deg=float(angle)))
    pre = make_pre()
    pre.fit_patterns(x, None)
    _, proba, _ = model.infer(pre.transform(x))
    return mean_entropy(proba)


def refine_rotation(model, make_pre, patterns, positions, geom, *, span_deg: float = 2.0, step_deg: float = 0.5,
                    max_patterns: int = 1024, seed: int = 0):
    """The rotation in ``[geom.rotation_deg - span_deg, + span_deg]`` at which ``model`` is surest.

    Parameters
    ----------
    model : an object with ``infer(X) -> (pred, proba, embedding)`` (a polbench model).
    make_pre : ``make_pre() -> Preprocessor`` (unfitted) of that model; it is fitted at each angle.
    patterns : (n, ky, kx) raw patterns (hot pixels repaired); positions : (n, 2) their probe positions.
    geom : the trusted :class:`polcore.geometry.Geometry` (rotation, flip, descan) to refine.
    span_deg, step_deg : the grid of angles tried around ``geom.rotation_deg``.
    max_patterns : a seeded subsample of at most this many patterns is used.

    Returns
    -------
    (rotation_deg, info): the vertex of a parabola through the grid minimum and its two neighbours (the grid
    minimum itself when it lies on the edge of the span, flagged), and ``info`` with the grid, the entropies and
    the shift.
    """
    patterns = np.asarray(patterns)
    positions = np.asarray(positions)
    if len(patterns) > max_patterns:
        idx = np.sort(np.random.default_rng(seed).choice(len(patterns), size=max_patterns, replace=False))
        patterns, positions = patterns[idx], positions[idx]
    t0 = float(geom.rotation_deg)
    n = int(round(span_deg / step_deg))
    grid = t0 + step_deg * np.arange(-n, n + 1)
    ent = np.array([_entropy_at(model, make_pre, patterns, positions, geom, a) for a in grid])
    k = int(np.argmin(ent))
    edge = k in (0, len(grid) - 1)
    best = float(grid[k])
    if not edge:
        e0, e1, e2 = ent[k - 1], ent[k], ent[k + 1]
        den = e0 - 2 * e1 + e2
        if den > 0:
            best += float(np.clip(0.5 * (e0 - e2) / den, -0.5, 0.5)) * step_deg
    info = {"method": "minimum mean prediction entropy of the model over a grid of rotations",
            "model": str((getattr(model, "meta", {}) or {}).get("name", model)),
            "from_deg": t0, "to_deg": best, "shift_deg": best - t0, "n_patterns": int(len(patterns)),
            "grid_deg": [float(a) for a in grid], "entropy": [float(e) for e in ent], "at_edge": bool(edge)}
    log.info("rotation refined by the model from %.2f to %.2f deg (entropy %.4f -> %.4f%s)", t0, best, ent[n],
             ent[k], ", minimum at the edge of the span" if edge else "")
    return best, info

"""Unit-cell pooling of per-pattern predictions and the lattice period from a scan's own periodicity."""

from __future__ import annotations

import numpy as np
import pytest

from polcore.analysis import cell_blocks, estimate_cell_px, pool_scan


def test_cell_blocks_follow_the_period():
    cy, cx = cell_blocks(10, 7, 2.5)
    assert cy.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert cx.tolist() == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="period"):
        cell_blocks(4, 4, 0.5)


def test_pooling_recovers_the_cell_class_from_weak_patterns(rng):
    ny = nx = 32
    cell = 8
    truth = np.zeros((ny // cell, nx // cell), int)
    truth[:, 2:] = 3
    lab = np.kron(truth, np.ones((cell, cell), int))
    # per pattern: the true class gets a slight edge, argmax right only about 40 % of the time
    logits = rng.normal(size=(ny, nx, 8))
    logits[np.arange(ny)[:, None], np.arange(nx)[None, :], lab] += 0.9
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    per_pattern = np.mean(p.argmax(-1) == lab)
    out = pool_scan(p, cell)
    assert per_pattern < 0.6
    assert np.mean(out["pred"] == lab) == 1.0
    assert out["n_cells"] == 16 and out["cell_pred"].shape == (4, 4)
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
    assert out["confidence"].shape == (ny, nx)


def test_estimate_cell_px_from_a_lattice_image(rng):
    y, x = np.mgrid[0:64, 0:64]
    img = np.cos(2 * np.pi * x / 7.6) + np.cos(2 * np.pi * y / 7.6) + 0.3 * rng.normal(size=(64, 64))
    period, prom = estimate_cell_px(img)
    assert period == pytest.approx(7.6, rel=0.06) and prom > 10
    none, _ = estimate_cell_px(rng.normal(size=(64, 64)))
    assert none is None

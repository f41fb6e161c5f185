"""Held-out evaluation on the draw library: per pattern and per unit cell, at each thickness, at a given dose;
and the physics limit beside it (the ideal observer).

Held-out data are whole independent simulations (``test`` draws: their own phonon, disorder and nuisance
seeds), never a random pick of patterns. Each test pattern gets Poisson counts at ``dose`` electrons (seeded by
draw and thickness, so every model sees the same noisy patterns). The model input is the per-pattern min-max of
the counts, as :class:`polcore.preprocess.Preprocessor` gives for a scan at the library's sampling.

Per unit cell: the class log-probabilities of the ``N x N`` probe positions of one cell (one draw, one class,
one thickness) are summed and the argmax taken: the maximum-likelihood class if the positions were independent
given the class. Pooling assumes the whole cell has one polarization: a domain wall through a cell breaks it.

The ideal observer (:func:`ideal_observer`) classifies by Poisson likelihood against noise-free templates at
the known probe position and thickness, in two versions:

* ``known``: the templates are the test draw's own noise-free patterns (every nuisance known): the ceiling;
* ``unknown``: the likelihood is averaged over the training draws (tilt, defocus, convergence, Nb displacement,
  disorder and phonons unknown, drawn from the training distribution). Per cell the nuisance is shared by the
  cell's positions: ``L(c) = mean_j prod_pos L(n_pos | template_{c, j, pos})``.
* ``unknown_pos``: nuisances AND the probe position inside the cell unknown: the likelihood of each pattern is
  averaged over the training draws and over every position of the cell. This is the limit of a classifier
  that sees one pattern and nothing else, which is what a per-pattern network is. Its per-cell score pools
  those position-blind per-pattern posteriors over the cell, as the networks' unit-cell layer does.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

__all__ = ["heldout_counts", "evaluate_model", "ideal_observer", "draw_count_curve", "pool_cells"]

log = logging.getLogger(__name__)

DOSES = (5e3, 2e4, 1e5)


def heldout_counts(lib, role: str, thickness_nm: float, dose: float | None, seed: int = 0, draws=None):
    """Noisy held-out patterns of one thickness.

    Returns
    -------
    counts : float32 (D, 8, N, N, K, K) Poisson counts (noise-free intensities when ``dose`` is None);
    clean : float32, the same shape, noise-free.
    """
    from polcore.simulate.microscope import apply_dose

    clean = lib.expanded(role, thickness_nm, draws=draws)
    rng = np.random.default_rng([int(seed), int(round(thickness_nm * 10)), 7])
    return apply_dose(clean, dose, rng), clean


def pool_cells(logp: np.ndarray) -> np.ndarray:
    """Per-cell class from per-position log-probabilities (..., P, 8) summed over the P positions -> (...,)."""
    return np.argmax(logp.sum(axis=-2), axis=-1)


def _log_proba(model, X: np.ndarray, batch: int = 2048) -> np.ndarray:
    out = []
    for i in range(0, len(X), batch):
        p = np.asarray(model.predict_proba(X[i : i + batch]), np.float64)
        out.append(np.log(np.clip(p, 1e-6, 1.0)))
    return np.concatenate(out)


def evaluate_model(model, lib, *, role: str = "test", thickness=None, dose: float | None = 2e4, seed: int = 0,
                   max_draws: int | None = None) -> pd.DataFrame:
    """Per-pattern and per-cell accuracy of ``model`` on held-out draws, one row per thickness.

    Parameters
    ----------
    model : anything with ``predict_proba((n, K, K) min-max patterns) -> (n, 8)``.
    lib : a ``DrawLibrary``.
    role : 'test' (or 'ideal_test', 'val').
    thickness : thicknesses [nm]; None = every thickness of the role.
    dose : electrons per pattern (None = noise-free).

    Returns
    -------
    DataFrame: thickness_nm, per_pattern, per_cell, n_patterns, n_cells, dose, role.
    """
    from polcore.preprocess import minmax

    ts = lib.thickness_nm[role] if thickness is None else np.atleast_1d(thickness)
    draws = None if max_draws is None else np.arange(min(max_draws, lib.n_draws(role)))
    rows = []
    for t in ts:
        counts, _ = heldout_counts(lib, role, float(t), dose, seed, draws=draws)
        D, C, N, _, K, _ = counts.shape
        X = minmax(counts.reshape(-1, K, K))
        lp = _log_proba(model, X).reshape(D, C, N * N, 8)
        y = np.broadcast_to(np.arange(C)[None, :, None], (D, C, N * N))
        per_pattern = float(np.mean(np.argmax(lp, -1) == y))
        per_cell = float(np.mean(pool_cells(lp) == np.arange(C)[None, :]))
        rows.append(dict(thickness_nm=float(t), per_pattern=per_pattern, per_cell=per_cell,
                         n_patterns=int(y.size), n_cells=int(D * C), dose=dose, role=role))
    return pd.DataFrame(rows)


def _log_templates(clean: np.ndarray, dose: float, floor: float = 1e-4) -> np.ndarray:
    """log of the expected counts per pixel, with a small uniform floor (no pixel is ever impossible)."""
    p = clean / np.maximum(clean.sum(axis=(-2, -1), keepdims=True), 1e-30)
    K2 = clean.shape[-1] * clean.shape[-2]
    return np.log(dose * ((1 - floor) * p + floor / K2)).astype(np.float32)


def _logmeanexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.mean(np.exp(a - m), axis=axis))


def _bin(a: np.ndarray, b: int) -> np.ndarray:
    """Sum b x b detector pixels (the last two axes)."""
    if b == 1:
        return a
    s = a.shape
    return a.reshape(s[:-2] + (s[-2] // b, b, s[-1] // b, b)).sum(axis=(-3, -1))


def ideal_observer(lib, *, role: str = "test", train_role: str = "train", thickness=None, doses=DOSES, seed: int = 0,
                   n_train_draws: int | None = None, versions=("known", "unknown"), bin_px: int = 1) -> pd.DataFrame:
    """The physics limit: maximum likelihood over noise-free templates, probe position and thickness known.

    Parameters
    ----------
    lib : ``DrawLibrary``.
    role : held-out draws to classify ('test' or 'ideal_test').
    train_role : draws the nuisance-unknown version marginalises over ('train' or 'ideal_train').
    thickness : thicknesses [nm] (None = every thickness of ``role``).
    doses : electrons per pattern.
    n_train_draws : use only the first n training draws (None = all), for the curve against the draw count.
    versions : any of 'known', 'unknown' and 'unknown_pos' (nuisances and probe position unknown).
    bin_px : sum bin_px x bin_px detector pixels of patterns and templates first (counts stay Poisson). With a
        finite set of training draws, the marginalised likelihood over-weights fine detail that differs between
        draws; binning trades resolution for robustness and can score higher (both are lower bounds of the
        true nuisance-unknown limit).

    Returns
    -------
    DataFrame: version, dose, thickness_nm, per_pattern, per_cell, n_train_draws, role.
    """
    ts = lib.thickness_nm[role] if thickness is None else np.atleast_1d(thickness)
    rows = []
    for t in ts:
        t = float(t)
        tr = None
        if "unknown" in versions or "unknown_pos" in versions:
            n_tr = lib.n_draws(train_role) if n_train_draws is None else min(n_train_draws, lib.n_draws(train_role))
            if n_tr < 1:
                raise ValueError(f"no {train_role} draws for the nuisance-unknown observer")
            tr = _bin(lib.expanded(train_role, t, draws=np.arange(n_tr)), bin_px)  # (J, 8, N, N, K, K)
        for dose in doses:
            counts, clean = heldout_counts(lib, role, t, dose, seed)
            counts, clean = _bin(counts, bin_px), _bin(clean, bin_px)
            D, C, N, _, K, _ = counts.shape
            P = N * N
            n = counts.reshape(D * C, P, K * K)  # patterns grouped by position
            y = np.repeat(np.arange(C)[None, :], D, 0).ravel()
            if "known" in versions:
                lt = _log_templates(clean, dose or 1.0).reshape(D, C, P, K * K)
                # ll[d, c_true, p, c] = n[d, c_true, p] . log lambda[d, c, p]
                ll = np.einsum("dapk,dcpk->dapc", n.reshape(D, C, P, K * K), lt, optimize=True)
                rows.append(_score("known", dose, t, ll.reshape(D * C, P, C), y, None, role, bin_px=bin_px))
            if tr is not None:
                J = tr.shape[0]
                lt = _log_templates(tr, dose or 1.0).reshape(J, C, P, K * K)
                ll = np.empty((D * C, P, J, C), np.float32)
                for p in range(P):
                    # (D*C, K*K) @ (K*K, J*C)
                    ll[:, p] = (n[:, p] @ lt[:, :, p].reshape(J * C, K * K).T).reshape(D * C, J, C)
                per_pos = _logmeanexp(ll, axis=2)  # (D*C, P, C): nuisance marginalised per position
                cell = _logmeanexp(ll.sum(axis=1), axis=1)  # (D*C, C): one nuisance for the whole cell
                if "unknown" in versions:
                    rows.append(_score("unknown", dose, t, per_pos, y, cell, role, J, bin_px=bin_px))
                if "unknown_pos" in versions:
                    blind = _position_blind(n.reshape(D * C * P, K * K), lt, J, C, P).reshape(D * C, P, C)
                    rows.append(_score("unknown_pos", dose, t, blind, y, None, role, J, bin_px=bin_px))
        log.info("ideal observer at %g nm done", t)
    return pd.DataFrame(rows)


def _position_blind(n: np.ndarray, lt: np.ndarray, J: int, C: int, P: int, chunk: int = 256) -> np.ndarray:
    """log mean over (draw, position) of the Poisson log-likelihood of each pattern under each class:
    n (M, KK) counts, lt (J, C, P, KK) log templates -> (M, C)."""
    flat = np.ascontiguousarray(lt.transpose(1, 0, 2, 3).reshape(C * J * P, -1).T)  # (KK, C*J*P)
    out = np.empty((len(n), C), np.float32)
    for i in range(0, len(n), chunk):
        ll = (n[i : i + chunk] @ flat).reshape(-1, C, J * P)
        out[i : i + chunk] = _logmeanexp(ll, axis=2)
    return out


def _score(version, dose, t, ll_pos, y, ll_cell, role, n_train=None, bin_px: int = 1) -> dict:
    per_pattern = float(np.mean(np.argmax(ll_pos, -1) == y[:, None]))
    cell_pred = pool_cells(ll_pos) if ll_cell is None else np.argmax(ll_cell, -1)
    return dict(version=version, dose=dose, thickness_nm=t, per_pattern=per_pattern,
                per_cell=float(np.mean(cell_pred == y)), n_train_draws=n_train, role=role, bin_px=bin_px)


def draw_count_curve(lib, *, counts=(1, 2, 4, 8, 16, 32, 64, 128), thickness=(10.0, 20.0, 35.0, 50.0),
                     dose: float = 2e4, seed: int = 0, bin_px: int = 4) -> pd.DataFrame:
    """Nuisance-unknown ideal-observer accuracy against the number of training draws it marginalises over."""
    rows = []
    t0 = time.perf_counter()
    n_max = lib.n_draws("train")
    for k in [c for c in counts if c <= n_max] + ([n_max] if n_max not in counts else []):
        df = ideal_observer(lib, thickness=thickness, doses=(dose,), seed=seed, n_train_draws=k,
                            versions=("unknown",), bin_px=bin_px)
        rows.append(df)
        log.info("draw-count curve: %d draws (%.0f s)", k, time.perf_counter() - t0)
    return pd.concat(rows, ignore_index=True)

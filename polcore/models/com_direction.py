"""The classical baseline every 4D-STEM package already runs: the direction of the centre-of-mass (CoM) shift.

No training. For each preprocessed pattern (the disc centre of the scan mean at pixel ``(K // 2, K // 2)``) the
CoM shift ``c`` [px] is measured, and class ``k`` gets the logit

    logit_k = kappa * sign * (c . u_k),

with ``u_k`` the unit vector of class ``k`` (``polcore.types.class_to_angle``: 45 deg * k counter-clockwise on
screen, so in (row down, column right) pixel coordinates ``u_k = (-sin a_k, cos a_k)``). The probabilities are
the softmax of the logits.

Why this is "the direction of the cell-averaged CoM shift": the unit-cell layer of an ingest sums the
log-probabilities of a cell's positions (``polcore.analysis.pool_scan``). ``log p_k = logit_k - logsumexp``
and the second term does not depend on ``k``, so the pooled argmax is ``argmax_k (sum_i c_i) . u_k``: the class
nearest to the direction of the cell-summed (equivalently cell-averaged) CoM shift. This holds as long as no
probability falls below the pooling floor (1e-6), i.e. ``2 * kappa * |c| < ln(1e6)``: with the default
``kappa = 0.5 / px`` up to ``|c| = 13.8 px``, far above the shifts measured on the draw library (99th
percentile 2.5-8.5 px on the 64 x 64 input). ``kappa`` is a scale, not fitted: it sets the confidence, never
the predicted class.

Sign convention (``sign = +1``: the CoM shift points along P). Physics: the transmitted electron is pulled
towards the positive atomic columns (the force is ``+e grad(phi)``, Ehrenfest's theorem makes the first moment
of the diffraction pattern the probe-weighted integral of that force), and polarization moves the heavy Nb
columns by 0.1-0.2 A along P (the lighter O by about a third of that against P); a probe channelling on the Nb
columns is therefore deflected towards +P. The macroscopic picture agrees: an unscreened depolarising field is
``E = -P / eps``, the force on an electron ``-e E`` points along +P. The caveat is physics too: for a probe
sampling the cell uniformly, the cell average of the projected field gradient of a periodic crystal is zero in
the thin (phase-object) limit, so any cell-averaged CoM signal comes from dynamical scattering and can change
sign with thickness, and a mistilt of a fraction of a mrad shifts the CoM as much (PHYSICS.md). The sign was
fixed from this argument, not from data; the held-out rows in the shipped checkpoint's metadata measure how
far the rule gets (``benchmarks/com_baseline.py``).

Checkpoints are ``.npz`` files (``kappa``, ``sign`` and the metadata JSON, ``np.load(allow_pickle=False)``)
with the usual JSON sidecar, so ingest, the demo and the benchmark treat the baseline like any model.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from polcore.preprocess import as_patterns
from polcore.types import N_CLASSES, class_to_angle

__all__ = ["ComDirectionModel", "HEADS", "DEFAULT_KAPPA", "NAME", "class_directions", "make_checkpoint"]

log = logging.getLogger(__name__)

HEADS: tuple[str, ...] = ("cls",)
#: Logit scale [1/px]: keeps every probability above the cell pooling's 1e-6 floor for |c| < 13.8 px.
DEFAULT_KAPPA = 0.5
#: The baseline's model name (no seed: nothing is random in it).
NAME = "com_direction-cls"


def class_directions() -> np.ndarray:
    """(8, 2) unit vectors of the classes in pixel coordinates (row down, column right)."""
    a = np.deg2rad(class_to_angle(np.arange(N_CLASSES)))
    return np.stack([-np.sin(a), np.cos(a)], axis=1)


class ComDirectionModel:
    """The CoM-direction classifier (see the module docstring); speaks the models' interface.

    Parameters
    ----------
    kappa : logit scale [1/px] (> 0).
    sign : +1 (CoM shift along P, the default) or -1 (against P).
    input_size : side of the preprocessed input [px]; the optical axis is at ``input_size // 2``.
    """

    is_torch = False
    family = "com_direction"
    head = "cls"

    def __init__(self, kappa: float = DEFAULT_KAPPA, sign: int = 1, input_size: int = 64):
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be a positive number [1/px], got {kappa!r}")
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 (CoM along P) or -1 (against P), got {sign!r}")
        if int(input_size) < 8:
            raise ValueError(f"input_size must be >= 8 px, got {input_size}")
        self.cfg = {"kappa": float(kappa), "sign": int(sign), "input_size": int(input_size)}
        self.meta: dict = {"family": self.family, "head": self.head, "model_cfg": dict(self.cfg)}
        self.history_: list[dict] = []
        self.best_epoch_ = None
        self._u = class_directions()

    @property
    def input_size(self) -> int:
        return self.cfg["input_size"]

    @property
    def embed_dim(self) -> int:
        return 2

    def n_parameters(self) -> int:
        """Fitted parameters: none (kappa and the sign are fixed)."""
        return 0

    def __repr__(self) -> str:
        return f"ComDirectionModel(kappa={self.cfg['kappa']:g}, sign={self.cfg['sign']:+d})"

    def fit(self, X=None, y=None, *args, **kwargs) -> ComDirectionModel:
        """Nothing to learn: returns self unchanged (the data are not looked at)."""
        return self

    def com(self, X) -> np.ndarray:
        """(n, 2) float64 CoM shift [px] from the input's optical axis, (row down, column right)."""
        from polcore.virtual import centre_of_mass

        x = as_patterns(X)
        k = x.shape[-1]
        return centre_of_mass(x, (k // 2, k // 2))

    def logits(self, X) -> np.ndarray:
        """(n, 8) float64 ``kappa * sign * (c . u_k)``."""
        return self.cfg["kappa"] * self.cfg["sign"] * (self.com(X) @ self._u.T)

    def predict_proba(self, X, batch_size: int | None = None) -> np.ndarray:
        """(n, 8) float32 softmax of :meth:`logits`."""
        z = self.logits(X)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p.astype(np.float32)

    def predict(self, X, batch_size: int | None = None) -> np.ndarray:
        """(n,) int64: the class nearest to the (signed) CoM direction."""
        return self.logits(X).argmax(axis=1).astype(np.int64)

    def embed(self, X, batch_size: int | None = None) -> np.ndarray:
        """(n, 2) float32 the signed CoM vector on screen [px]: (x right, y up)."""
        c = self.cfg["sign"] * self.com(X)
        return np.stack([c[:, 1], -c[:, 0]], axis=1).astype(np.float32)

    def infer(self, X, batch_size: int | None = None):
        """(pred (n,), proba (n, 8), embedding (n, 2)) like ``TorchModel.infer``."""
        x = as_patterns(X)
        k = x.shape[-1]
        from polcore.virtual import centre_of_mass

        c = self.cfg["sign"] * centre_of_mass(x, (k // 2, k // 2))
        z = self.cfg["kappa"] * (c @ self._u.T)
        pred = z.argmax(axis=1).astype(np.int64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return pred, p.astype(np.float32), np.stack([c[:, 1], -c[:, 0]], axis=1).astype(np.float32)

    # ------------------------------------------------------------- checkpoints
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (for ``np.savez``)."""
        return {"kappa": np.asarray(self.cfg["kappa"], np.float64), "sign": np.asarray(self.cfg["sign"], np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict, cfg: dict) -> ComDirectionModel:
        """Rebuild from :meth:`to_arrays` output and the stored ``model_cfg`` (the arrays win)."""
        return cls(kappa=float(np.asarray(arrays["kappa"])), sign=int(np.asarray(arrays["sign"])),
                   input_size=int(cfg.get("input_size", 64)))


def make_checkpoint(out_dir, lib, *, dose: float = 2e4, role: str = "test", kappa: float = DEFAULT_KAPPA,
                    sign: int = 1, progress=None):
    """Write the baseline's checkpoint with the draw library's preprocessing and its held-out rows.

    Parameters
    ----------
    out_dir : folder (e.g. ``data/models/shipped``); the file is ``<out_dir>/com_direction-cls.npz``.
    lib : a ``DrawLibrary`` (:func:`polcore.simulate.draws.load_draws`): the preprocessing (its sampling, optical
        axis at K // 2) and the held-out evaluation (``role`` draws at ``dose`` electrons per pattern, every
        thickness, per pattern and per cell, as the networks' rows in their checkpoints).

    Returns
    -------
    (path, heldout DataFrame).
    """
    from pathlib import Path

    from polcore.evaluate import evaluate_model
    from polcore.models import save_checkpoint
    from polcore.train_draws import draws_preprocessor

    pre = draws_preprocessor(lib)
    model = ComDirectionModel(kappa=kappa, sign=sign, input_size=pre.size)
    heldout = evaluate_model(model, lib, role=role, dose=dose, seed=0)
    meta = {
        "preprocessing": pre.to_dict(),
        "library_sha256": lib.sha256,
        "library_kind": "draws",
        "library_meta": {k: lib.meta.get(k) for k in ("voltage_kv", "convergence_mrad", "mrad_per_px", "profile")},
        "heldout": heldout.to_dict(orient="records"),
        "train_seconds": 0.0,
        "training": "none: the direction of the centre-of-mass shift (classical baseline)",
        "sign_convention": "CoM shift along P (physics, see polcore.models.com_direction); not fitted",
        "split": {"test": f"'{role}' draws at {dose} electrons per pattern"},
    }
    path = save_checkpoint(model, Path(out_dir) / NAME, meta=meta)
    log.info("%s: held-out per pattern / per cell by thickness:\n%s", NAME,
             heldout[["thickness_nm", "per_pattern", "per_cell"]].to_string(index=False))
    return path, heldout

"""Thickness experts: a general network and networks fine-tuned on one thickness band, mixed per pattern by a
thickness gate that reads the general network's own features.

Why: one network trained on every thickness at once reads 5 nm patterns far below the ideal observer, which
knows the thickness (``README``, issue 10); the same network fine-tuned on 5 nm alone comes close to it. A thin
crystal's polarization signal is a few per cent of the disc intensities (Friedel's law nearly holds at 5 nm),
while the thickness itself changes the whole pattern: the thickness is easy to read from one pattern, the
polarization at 5 nm is not. So the general network's embedding (512 features) and the input pattern averaged
to 16 x 16 pixels feed a multinomial logistic regression over thickness *bands* (``gate``; measured on the val
draws, 5 nm against the rest: 0.88 / 0.94 of patterns right at 5 / 10 nm from the embedding alone, 0.94 / 0.97
from the 16 x 16 pattern alone, 0.975 / 0.983 from both), and the class probabilities are the mixture

    p(class | x) = sum_b p(band b | x) p_member(b)(class | x),

where each band names the member network that reads it (``general`` for the bands without an expert). Nobody
has to tell the model the thickness: a wedge or a scan of unknown thickness is gated pattern by pattern. The
member of a band is only run on the patterns whose gate gives it more than ``min_weight``.

The composite is saved like any torch checkpoint (``polcore.models.save_checkpoint``): family ``custom_cnn``,
the member networks' tensors under ``<member>.`` and the gate's under ``gate.``; ``meta["composite"]`` =
``"thickness_experts"`` makes :func:`polcore.models.load_checkpoint` rebuild it. Its embedding is the general
network's, so the embedding pages place it beside its parent.
"""

from __future__ import annotations

import logging

import numpy as np

from polcore.types import N_CLASSES

__all__ = ["COMPOSITE", "ThicknessExperts", "fit_gate", "band_of", "gate_features"]

log = logging.getLogger(__name__)

COMPOSITE = "thickness_experts"


def band_of(thickness_nm, bands: list[dict]) -> np.ndarray:
    """Band index of each thickness: the band with ``lo_nm <= t < hi_nm`` (bands must cover every t)."""
    t = np.atleast_1d(np.asarray(thickness_nm, float))
    out = np.full(t.shape, -1, np.int64)
    for i, b in enumerate(bands):
        out[(t >= float(b["lo_nm"])) & (t < float(b["hi_nm"]))] = i
    if np.any(out < 0):
        raise ValueError(f"thickness {t[out < 0][0]:g} nm lies in no band of {bands}")
    return out


#: side [px] of the averaged input pattern the gate reads beside the embedding
GATE_BIN = 16


def gate_features(X: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """(n, d + GATE_BIN**2) float32: the general network's embedding and the input pattern averaged to
    GATE_BIN x GATE_BIN pixels (the side must be a multiple of GATE_BIN)."""
    from polcore.preprocess import block_mean

    X = np.asarray(X, np.float32)
    n, k = X.shape[0], X.shape[-1]
    if k % GATE_BIN:
        raise ValueError(f"the thickness gate needs a pattern side that is a multiple of {GATE_BIN}, got {k}")
    small = block_mean(X, k // GATE_BIN).reshape(n, -1)
    return np.hstack([np.asarray(emb, np.float32), small])


def fit_gate(feats: np.ndarray, band: np.ndarray, n_bands: int, seed: int = 0, C: float = 0.1) -> dict:
    """Multinomial logistic regression band ~ standardised :func:`gate_features`; returns numpy arrays
    ``mean``, ``scale``, ``coef`` (n_bands, d), ``intercept`` (n_bands,) (two bands: the binary fit expanded to
    the softmax form, so one code path serves every band count)."""
    from sklearn.linear_model import LogisticRegression

    emb = np.asarray(feats, np.float64)
    band = np.asarray(band, np.int64)
    if len(np.unique(band)) != n_bands:
        raise ValueError(f"the gate needs patterns of all {n_bands} bands, got bands {np.unique(band).tolist()}")
    mean = emb.mean(0)
    scale = emb.std(0) + 1e-6
    z = (emb - mean) / scale
    lr = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(z, band)
    coef, icpt = lr.coef_, lr.intercept_
    if n_bands == 2:  # binary: p(1) = sigmoid(w.z + b) = softmax([0, w.z + b])[1]
        coef = np.stack([np.zeros_like(coef[0]), coef[0]])
        icpt = np.array([0.0, icpt[0]])
    return {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32), "coef": coef.astype(np.float32),
            "intercept": icpt.astype(np.float32)}


class ThicknessExperts:
    """A general :class:`polcore.models.base.TorchModel` plus experts, mixed per pattern by a thickness gate.

    Parameters
    ----------
    members : name -> TorchModel; must hold ``"general"`` (its embedding feeds the gate and is the composite's).
    bands : list of ``{"name", "lo_nm", "hi_nm", "member"}``, in gate order.
    gate : arrays from :func:`fit_gate`.
    min_weight : a member is run only on patterns whose gate weight for it exceeds this (the others get 0).
    """

    is_torch = True
    family = "custom_cnn"
    batch_parallel = True  # custom CNN members (see TorchModel.batch_parallel)

    def __init__(self, members: dict, bands: list[dict], gate: dict, min_weight: float = 1e-3):
        if "general" not in members:
            raise ValueError("thickness experts need a 'general' member")
        missing = {b["member"] for b in bands} - set(members)
        if missing:
            raise ValueError(f"bands name members that are missing: {sorted(missing)}")
        heads = {m.head for m in members.values()}
        if heads != {"cls"}:
            raise ValueError(f"every member must have the 'cls' head, got {sorted(heads)}")
        self.members = dict(members)
        self.bands = [dict(b) for b in bands]
        self.gate = {k: np.asarray(v, np.float32) for k, v in gate.items()}
        if self.gate["coef"].shape[0] != len(self.bands):
            raise ValueError(f"the gate has {self.gate['coef'].shape[0]} bands, the composite {len(self.bands)}")
        self.min_weight = float(min_weight)
        self.member_info: dict = {}  # member -> the run it was loaded from (name, checkpoint, sha256), for meta
        g = self.members["general"]
        self.head = "cls"
        self.cfg = {**g.cfg, "composite": COMPOSITE, "bands": self.bands, "min_weight": self.min_weight}
        self.meta: dict = {"family": self.family, "head": self.head, "model_cfg": dict(self.cfg),
                           "composite": COMPOSITE}
        self.history_: list[dict] = []
        self.best_epoch_ = None

    # ------------------------------------------------------------------ basics
    @property
    def general(self):
        return self.members["general"]

    @property
    def input_size(self) -> int:
        return self.general.input_size

    @property
    def embed_dim(self) -> int:
        return self.general.embed_dim

    @property
    def device(self):
        return self.general.device

    @property
    def backend(self) -> str:
        return self.general.backend

    @backend.setter
    def backend(self, value: str) -> None:
        for m in self.members.values():
            m.backend = value

    @property
    def active_backend(self) -> str:
        return self.general.active_backend

    def n_parameters(self) -> int:
        return int(sum(m.n_parameters() for m in self.members.values()) + self.gate["coef"].size
                   + self.gate["intercept"].size)

    def to(self, device) -> ThicknessExperts:
        for m in self.members.values():
            m.to(device)
        return self

    def __repr__(self) -> str:
        bands = ", ".join(f"{b['name']}: {b['member']}" for b in self.bands)
        return f"ThicknessExperts({bands})"

    # ------------------------------------------------------------------ inference
    def gate_proba(self, X: np.ndarray, emb: np.ndarray) -> np.ndarray:
        """(n, n_bands) float32 band probabilities of patterns X from them and their general embeddings."""
        z = (gate_features(X, emb) - self.gate["mean"]) / self.gate["scale"]
        logits = z @ self.gate["coef"].T + self.gate["intercept"]
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    def infer_with_gate(self, X, batch_size: int = 512):
        """(pred, proba, embedding, gate) for (n, K, K) preprocessed patterns; gate is (n, n_bands)."""
        pred_g, proba_g, emb = self.general.infer(X, batch_size)
        gate = self.gate_proba(X, emb) if len(emb) else np.zeros((0, len(self.bands)), np.float32)
        w_member: dict[str, np.ndarray] = {}
        for i, b in enumerate(self.bands):
            w_member[b["member"]] = w_member.get(b["member"], 0.0) + gate[:, i]
        proba = np.zeros((len(emb), N_CLASSES), np.float64)
        for name, w in w_member.items():
            if name == "general":
                proba += w[:, None] * proba_g
                continue
            idx = np.flatnonzero(w > self.min_weight)
            if len(idx):
                p = self.members[name].infer(np.asarray(X)[idx], batch_size)[1]
                proba[idx] += w[idx, None] * p
        proba /= np.maximum(proba.sum(1, keepdims=True), 1e-30)
        proba = proba.astype(np.float32)
        return np.argmax(proba, 1).astype(np.int64), proba, emb, gate

    def infer(self, X, batch_size: int = 512):
        """Predictions (n,), probabilities (n, 8) and embeddings (n, d): the same contract as ``TorchModel``."""
        return self.infer_with_gate(X, batch_size)[:3]

    def predict(self, X, batch_size: int = 512) -> np.ndarray:
        return self.infer(X, batch_size)[0]

    def predict_proba(self, X, batch_size: int = 512) -> np.ndarray:
        return self.infer(X, batch_size)[1]

    def embed(self, X, batch_size: int = 512) -> np.ndarray:
        return self.general.embed(X, batch_size)

    def thickness_band(self, X, batch_size: int = 512) -> np.ndarray:
        """Index of the most probable thickness band of each pattern (a coarse per-pattern thickness)."""
        return np.argmax(self.gate_proba(X, self.general.embed(X, batch_size)), 1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        import torch

        out = {f"{name}.{k}": v for name, m in self.members.items() for k, v in m.state_dict().items()}
        out.update({f"gate.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.gate.items()})
        return out

    @classmethod
    def from_state(cls, state: dict, meta: dict, device: str | None = None) -> ThicknessExperts:
        """Rebuild from a checkpoint's tensors and metadata (``meta["members"][name]["model_cfg"]``)."""
        from polcore.models import build_model

        members = {}
        for name, info in meta["members"].items():
            cfg = {k: v for k, v in info["model_cfg"].items() if k not in ("composite", "bands", "min_weight")}
            m = build_model("custom_cnn", "cls", **cfg, device=device)
            sd = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            m.load_state_dict(sd, strict=True)
            m.net.eval()
            members[name] = m
        gate = {k[5:]: v.numpy() for k, v in state.items() if k.startswith("gate.")}
        cfg = meta["model_cfg"]
        return cls(members, cfg["bands"], gate, min_weight=float(cfg.get("min_weight", 1e-3)))

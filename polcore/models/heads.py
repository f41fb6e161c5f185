"""Output heads of the network families and their losses: ``cls``, ``reg`` and ``proto``.

* ``cls``: 8 logits, cross-entropy.
* ``reg``: a 2-D vector trained towards the unit vector (cos, sin) of the class angle (mean squared error);
  the predicted angle ``atan2(v_y, v_x)`` is binned with :func:`polcore.types.angle_to_class` (bins centred on
  the classes: no half-bin offset). Probabilities: a von Mises-like softmax ``kappa * (v . c_k)`` over the
  8 class vectors ``c_k``.
* ``proto``: a 128-D embedding trained with a prototypical loss (per-batch class means, softmax over negative
  squared distances, KL divergence to circular soft labels with sigma = 1.25 class steps). Prediction: cosine
  similarity to class prototypes computed from the validation split and stored as a buffer.

Torch is imported by the modules that build networks only (this module is imported lazily by the registry).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polcore.models import HEADS
from polcore.types import N_CLASSES, angle_to_class, circular_class_distance, class_to_vector, vector_to_angle

__all__ = [
    "HEADS",
    "ClsHead",
    "RegHead",
    "ProtoHead",
    "make_head",
    "circular_soft_labels",
    "prototypical_loss",
    "PROTO_DISTANCES",
    "class_prototypes",
    "vectors_to_class",
]



def circular_soft_labels(y, sigma: float = 1.25, n_classes: int = N_CLASSES) -> torch.Tensor:
    """Soft targets ``exp(-d^2 / (2 sigma^2))`` over the circular class distance d, rows normalised.

    Parameters
    ----------
    y : (n,) int class indices (tensor or array).
    sigma : width in class steps (45 deg each).

    Returns
    -------
    float32 tensor (n, n_classes), rows sum to 1, maximal at the true class.
    """
    y = torch.as_tensor(y).long()
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    d = circular_class_distance(np.arange(n_classes)[None, :], y.detach().cpu().numpy()[:, None])
    w = torch.exp(-torch.as_tensor(d, dtype=torch.float32) ** 2 / (2.0 * sigma**2)).to(y.device)
    return w / w.sum(dim=1, keepdim=True)


PROTO_DISTANCES: tuple[str, ...] = ("sqeuclidean", "euclidean")


def prototypical_loss(emb: torch.Tensor, y: torch.Tensor, sigma: float = 1.25,
                      distance: str = "sqeuclidean") -> torch.Tensor:
    """Prototypical loss with circular soft labels (the study's loss, without its zero-prototype fallback).

    Class prototypes are the batch means of the embeddings of each class present in the batch; classes absent
    from the batch are left out of the softmax and the soft labels are renormalised over the present classes
    (the study used a zero vector as the prototype of an absent class, which distorts the loss).

    Parameters
    ----------
    emb : (n, d) embeddings.
    y : (n,) int class indices.
    sigma : soft-label width [class steps].
    distance : 'sqeuclidean' (softmax over negative squared distances, the default) or 'euclidean' (the
        study's ``torch.cdist``; its gradient does not vanish for nearby embeddings, and on the default library
        the custom CNN left the initial plateau sooner with it: 0.32 vs 0.20 held-out accuracy after 3 epochs
        on 3840 patterns, one seed).

    Returns
    -------
    Scalar tensor: KL(soft labels || softmax(-distance(emb, prototype))), mean over the batch.
    """
    if distance not in PROTO_DISTANCES:
        raise ValueError(f"unknown proto distance {distance!r}; valid: {', '.join(PROTO_DISTANCES)}")
    y = y.long()
    onehot = F.one_hot(y, N_CLASSES).to(emb.dtype)  # (n, C)
    counts = onehot.sum(dim=0)  # (C,)
    present = counts > 0
    protos = (onehot.T @ emb) / counts.clamp(min=1.0)[:, None]  # (C, d)
    d2 = (emb[:, None, :] - protos[None, :, :]).pow(2).sum(dim=-1)  # (n, C) squared distances
    dist = d2 if distance == "sqeuclidean" else torch.sqrt(d2 + 1e-12)
    logits = (-dist).masked_fill(~present[None, :], float("-inf"))
    log_p = F.log_softmax(logits, dim=1)
    target = circular_soft_labels(y, sigma) * present[None, :].to(emb.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    # KL(t || p) = sum t (log t - log p) over present classes (t = 0 contributes 0)
    kl = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-12)) - log_p), torch.zeros_like(target))
    return kl.sum(dim=1).mean()


def class_prototypes(emb: torch.Tensor, y: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Mean embedding per class, (8, d); classes without samples take the ``fallback`` row (or zeros)."""
    y = y.long()
    onehot = F.one_hot(y, N_CLASSES).to(emb.dtype)
    counts = onehot.sum(dim=0)
    protos = (onehot.T @ emb) / counts.clamp(min=1.0)[:, None]
    if fallback is not None:
        protos = torch.where((counts > 0)[:, None], protos, fallback.to(protos))
    return protos


def vectors_to_class(v) -> np.ndarray:
    """Class index of 2-D vectors (..., 2) given as (cos, sin) components: nearest 45-degree class."""
    return np.asarray(angle_to_class(vector_to_angle(np.asarray(v, dtype=np.float64))), dtype=np.int64)


class ClsHead(nn.Module):
    """8-way classification: ``Linear(hidden, 8)``, cross-entropy."""

    name = "cls"

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, N_CLASSES)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y.long())

    def proba(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out, dim=1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(dim=1)

    def embedding(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return h


class RegHead(nn.Module):
    """2-D direction regression: ``Linear(hidden, 2)`` towards (cos, sin) of the class angle.

    Parameters
    ----------
    hidden : input features.
    kappa : concentration of the von Mises-like probabilities ``softmax(kappa * v . c_k)``.
    """

    name = "reg"

    def __init__(self, hidden: int, kappa: float = 5.0):
        super().__init__()
        self.fc = nn.Linear(hidden, 2)
        self.kappa = float(kappa)
        self.register_buffer(
            "class_vectors", torch.tensor(class_to_vector(np.arange(N_CLASSES)), dtype=torch.float32),
            persistent=False,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = self.class_vectors[y.long()]
        return F.mse_loss(out, target)

    def proba(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.kappa * out @ self.class_vectors.T, dim=1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(vectors_to_class(out.detach().cpu().numpy()), device=out.device)

    def embedding(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return h


class ProtoHead(nn.Module):
    """Prototype representation: ``Linear(hidden, embed_dim)`` trained with :func:`prototypical_loss`.

    Buffers ``prototypes`` (8, embed_dim) and ``has_prototypes`` (bool) are set after training with
    :meth:`set_prototypes` (from the validation split) and saved in the state dict.

    Parameters
    ----------
    hidden : input features.
    embed_dim : embedding size (128 in the study).
    sigma : soft-label width [class steps].
    temperature : softmax temperature over cosine similarities for ``proba``.
    distance : training distance of :func:`prototypical_loss` ('sqeuclidean' or 'euclidean').
    """

    name = "proto"

    def __init__(self, hidden: int, embed_dim: int = 128, sigma: float = 1.25, temperature: float = 0.1,
                 distance: str = "sqeuclidean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if distance not in PROTO_DISTANCES:
            raise ValueError(f"unknown proto distance {distance!r}; valid: {', '.join(PROTO_DISTANCES)}")
        self.distance = distance
        self.fc = nn.Linear(hidden, embed_dim)
        self.sigma = float(sigma)
        self.temperature = float(temperature)
        self.register_buffer("prototypes", torch.zeros(N_CLASSES, embed_dim))
        self.register_buffer("has_prototypes", torch.tensor(False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return prototypical_loss(out, y, self.sigma, self.distance)

    def set_prototypes(self, protos: torch.Tensor) -> None:
        self.prototypes.copy_(protos.to(self.prototypes))
        self.has_prototypes.fill_(True)

    def cosine(self, out: torch.Tensor) -> torch.Tensor:
        if not bool(self.has_prototypes):
            raise RuntimeError("proto head has no class prototypes yet: fit the model (or call set_prototypes)")
        return F.normalize(out, dim=1) @ F.normalize(self.prototypes, dim=1).T

    def proba(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.cosine(out) / self.temperature, dim=1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return self.cosine(out).argmax(dim=1)

    def embedding(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out


def make_head(head: str, hidden: int, *, embed_dim: int = 128, sigma: float = 1.25, temperature: float = 0.1,
              kappa: float = 5.0, distance: str = "sqeuclidean") -> nn.Module:
    """Build a head module by name; unknown names raise ValueError listing the valid ones."""
    if head == "cls":
        return ClsHead(hidden)
    if head == "reg":
        return RegHead(hidden, kappa=kappa)
    if head == "proto":
        return ProtoHead(hidden, embed_dim=embed_dim, sigma=sigma, temperature=temperature, distance=distance)
    raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")

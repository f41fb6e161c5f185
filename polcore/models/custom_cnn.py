"""The study's small CNN: three 3x3 convolutions (16, 32, 64 channels) with ReLU and two 2x2 max-pools.

For a 64 x 64 input the feature map is 64 x 14 x 14 = 12544 values, flattened; the shared neck
(``Linear(features, 512)`` + ReLU, built by :mod:`polcore.models.base`) follows as in the study.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ARCHS", "DEFAULT_ARCH", "build_backbone"]

ARCHS: tuple[str, ...] = ("study",)
DEFAULT_ARCH = "study"


def build_backbone(arch: str | None = None, input_size: int = 64) -> tuple[nn.Module, int]:
    """Feature extractor ``(n, 1, S, S) -> (n, F)`` and its feature size F.

    Parameters
    ----------
    arch : 'study' (the only variant) or None.
    input_size : input side S [px].
    """
    arch = arch or DEFAULT_ARCH
    if arch not in ARCHS:
        raise ValueError(f"unknown custom_cnn arch {arch!r}; valid: {', '.join(ARCHS)}")
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        n_feat = int(net(torch.zeros(1, 1, input_size, input_size)).shape[1])
    return net, n_feat

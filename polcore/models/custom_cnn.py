"""The study's small CNN: three 3x3 convolutions (16, 32, 64 channels) with ReLU and two 2x2 max-pools.

For a 64 x 64 input the feature map is 64 x 14 x 14 = 12544 values, flattened; the shared neck
(``Linear(features, 512)`` + ReLU, built by :mod:`polcore.models.base`) follows as in the study.

``binned``: the same stack after a 2 x 2 average pool of the input (64 -> 32 px, 2.5 mrad per pixel): a
quarter of the arithmetic and a fifth of the parameters. Measured with the ideal observer on the draw
library: 2 x 2 binning loses no polarization information (the nuisance-unknown observer even gains, because
fine speckle and tilt-sensitive detail are what differ between draws).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ARCHS", "DEFAULT_ARCH", "build_backbone"]

ARCHS: tuple[str, ...] = ("study", "binned", "binned_bn")
DEFAULT_ARCH = "study"


def build_backbone(arch: str | None = None, input_size: int = 64) -> tuple[nn.Module, int]:
    """Feature extractor ``(n, 1, S, S) -> (n, F)`` and its feature size F.

    Parameters
    ----------
    arch : 'study', 'binned' (2 x 2 average pool first), 'binned_bn' (binned with batch norm after every
        convolution) or None (= 'study').
    input_size : input side S [px].
    """
    arch = arch or DEFAULT_ARCH
    if arch not in ARCHS:
        raise ValueError(f"unknown custom_cnn arch {arch!r}; valid: {', '.join(ARCHS)}")
    pre = [nn.AvgPool2d(2)] if arch.startswith("binned") else []

    def bn(c: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(c)] if arch == "binned_bn" else []

    net = nn.Sequential(
        *pre,
        nn.Conv2d(1, 16, 3, 1),
        *bn(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 1),
        *bn(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, 1),
        *bn(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        n_feat = int(net(torch.zeros(1, 1, input_size, input_size)).shape[1])
    return net, n_feat

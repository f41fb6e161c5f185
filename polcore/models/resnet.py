"""torchvision ResNets with a 1-channel stem, trained from scratch (``weights=None``; nothing is downloaded).

``resnet18`` is the CPU default, ``resnet50`` the study's network. The classifier (``fc``) is removed: the
backbone returns the globally pooled features (512 for resnet18/34, 2048 for resnet50).
"""

from __future__ import annotations

from torch import nn

__all__ = ["ARCHS", "DEFAULT_ARCH", "build_backbone"]

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
DEFAULT_ARCH = "resnet18"


def build_backbone(arch: str | None = None, input_size: int = 64) -> tuple[nn.Module, int]:
    """Feature extractor ``(n, 1, S, S) -> (n, F)`` and F.

    Parameters
    ----------
    arch : one of ``ARCHS`` (default resnet18).
    input_size : input side S [px] (any size >= 32 works: the pooling is adaptive).
    """
    import torchvision

    arch = arch or DEFAULT_ARCH
    if arch not in ARCHS:
        raise ValueError(f"unknown resnet arch {arch!r}; valid: {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    n_feat = net.fc.in_features
    net.fc = nn.Identity()
    return net, int(n_feat)

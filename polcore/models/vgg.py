"""torchvision VGGs with batch norm and a 1-channel stem, trained from scratch (``weights=None``).

``vgg11_bn`` is the CPU default, ``vgg16_bn`` the study's network. For 64 x 64 inputs the 7 x 7 x 512 -> 4096
-> 4096 classifier is replaced by global average pooling (512 features); the shared neck follows.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ARCHS", "DEFAULT_ARCH", "build_backbone"]

ARCHS: tuple[str, ...] = ("vgg11_bn", "vgg13_bn", "vgg16_bn")
DEFAULT_ARCH = "vgg11_bn"


class _VGGFeatures(nn.Module):
    """``features`` of a torchvision VGG followed by adaptive average pooling and flattening."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def build_backbone(arch: str | None = None, input_size: int = 64) -> tuple[nn.Module, int]:
    """Feature extractor ``(n, 1, S, S) -> (n, 512)`` and 512.

    Parameters
    ----------
    arch : one of ``ARCHS`` (default vgg11_bn).
    input_size : input side S [px] (>= 32).
    """
    import torchvision

    arch = arch or DEFAULT_ARCH
    if arch not in ARCHS:
        raise ValueError(f"unknown vgg arch {arch!r}; valid: {', '.join(ARCHS)}")
    vgg = getattr(torchvision.models, arch)(weights=None)
    feats = vgg.features
    first = feats[0]
    feats[0] = nn.Conv2d(1, first.out_channels, kernel_size=3, stride=1, padding=1)
    return _VGGFeatures(feats), 512

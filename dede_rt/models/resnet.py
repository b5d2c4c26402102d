"""CIFAR-style ResNet backbones used as victim encoders.

The module layout reproduces BadEncoder/DRUPE's ``SimCLRBase``: a single
``nn.Sequential`` named ``f`` holding torchvision's ResNet children with a 3x3
stem and no max-pool (conv1, bn1, relu, layer1..layer4, avgpool). Block and
parameter names follow torchvision, so a BadEncoder checkpoint's ``f.f.*``
keys load after stripping one ``f.`` prefix, without torchvision installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's two-conv residual block (ResNet18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's 1x3x1 bottleneck block (ResNet50)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


@dataclass(frozen=True)
class ResNetConfig:
    """Depth and width of a CIFAR ResNet."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)

    @property
    def embed_dim(self) -> int:
        expansion = Bottleneck.expansion if self.block == "bottleneck" else BasicBlock.expansion
        return self.widths[-1] * expansion


ARCHITECTURES: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    # ~0.3 M parameters, 128-d embedding: trains on 2 CPU cores in minutes.
    "resnet_small": ResNetConfig("basic", (1, 1, 1, 1), (16, 32, 64, 128)),
}


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem and no max-pool; outputs the pooled embedding."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        stem = config.widths[0]
        children: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        ]
        in_planes = stem
        for i, (n_blocks, width) in enumerate(zip(config.layers, config.widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_planes, width, stride if j == 0 else 1))
                in_planes = width * block.expansion
            children.append(nn.Sequential(*blocks))
        children.append(nn.AdaptiveAvgPool2d((1, 1)))
        self.f = nn.Sequential(*children)

    @property
    def embed_dim(self) -> int:
        """Width of the embedding this backbone outputs."""
        return self.config.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.f(x), 1)


def build_resnet(arch: str) -> CifarResNet:
    """Build an untrained CIFAR ResNet by name (see ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        from dede_rt.errors import UserError

        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return CifarResNet(ARCHITECTURES[arch])


class ImageNetResNet(nn.Module):
    """torchvision's ImageNet ResNet (7x7 stride-2 stem + max-pool), same module names, without its ``fc``.

    A torchvision ``resnet18``/``resnet50`` state dict (and the SimCLR / MoCo / BYOL / DINO checkpoints built
    on it) loads without renaming; outputs the pooled embedding. Built here rather than imported because
    torchvision's Linux wheels on PyPI are CUDA builds that do not import next to the CPU torch wheel.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        stem = config.widths[0]
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = stem
        for i, (n_blocks, width) in enumerate(zip(config.layers, config.widths)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_planes, width, (1 if i == 0 else 2) if j == 0 else 1))
                in_planes = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    @property
    def embed_dim(self) -> int:
        """Width of the pooled embedding."""
        return self.config.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

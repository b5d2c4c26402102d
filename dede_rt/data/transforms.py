"""From uint8 pixels to the victim encoder's normalized float input."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std on [0, 1] pixels and the square input size; stored with every detector."""

    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    image_size: int = 32

    def to_dict(self) -> dict:
        """Plain-JSON form for manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        """Inverse of ``to_dict``."""
        return cls(tuple(data["mean"]), tuple(data["std"]), int(data["image_size"]))

    def apply(self, images_u8: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalized float32 NCHW."""
        x = torch.as_tensor(images_u8)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def invert(self, images: torch.Tensor) -> np.ndarray:
        """Normalized float NCHW -> uint8 NHWC (for showing reconstructions)."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, 3, 1, 1)
        x = (images.detach().cpu() * std + mean).clamp(0, 1)
        return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)

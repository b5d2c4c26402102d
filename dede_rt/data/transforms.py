"""The victim encoder's input: how decoded images become its pixels, and their normalized float form."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from dede_rt.data.images import Resize

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, shared by OpenCLIP and Hugging Face
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std on [0, 1] pixels, the square input size and the resize rule; stored with every detector.

    ``resize``: "squash" (both sides to ``image_size``; the default, and what bundles without the field used)
    or "crop" (shorter side to ``resize_to``, default ``image_size / 0.875``, then the central square), with
    ``interpolation`` "bicubic" or "bilinear". Training, the scanner and calibration all decode through
    ``pixels``, so a file gets the same pixels everywhere.
    """

    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    image_size: int = 32
    resize: str = "squash"
    resize_to: int | None = None
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        from dede_rt.errors import UserError

        try:
            self.pixels
        except ValueError as exc:
            raise UserError(str(exc)) from None

    @property
    def pixels(self) -> Resize:
        """The rule that turns a decoded image into this encoder's ``image_size`` square."""
        return Resize(self.image_size, self.resize, self.resize_to, self.interpolation)

    def to_dict(self) -> dict:
        """Plain-JSON form for manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        """Inverse of ``to_dict`` (records without a resize rule are the squash rule they were made with)."""
        return cls(tuple(data["mean"]), tuple(data["std"]), int(data["image_size"]), data.get("resize", "squash"),
                   data.get("resize_to"), data.get("interpolation", "bicubic"))

    def apply(self, images_u8: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalized float32 NCHW."""
        x = torch.as_tensor(images_u8)
        return self.normalize(x.permute(0, 3, 1, 2).float().div_(255.0))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float NCHW pixels in [0, 1] -> normalized (differentiable: attacks optimise pixels through it)."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def invert(self, images: torch.Tensor) -> np.ndarray:
        """Normalized float NCHW -> uint8 NHWC (for showing reconstructions)."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, 3, 1, 1)
        x = (images.detach().cpu() * std + mean).clamp(0, 1)
        return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)

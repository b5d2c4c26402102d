"""SimCLR augmentations as batched tensor ops (no per-image PIL loop), seeded by a generator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-sample random crop (area fraction ``scale``, aspect ``ratio``) resized back to full size."""
    n = x.shape[0]
    area = _uniform(n, *scale, g)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def horizontal_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each sample left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=g) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4, p: float = 0.8) -> torch.Tensor:
    """Random brightness, contrast and saturation (each ±``strength``), applied with probability ``p``."""
    n = x.shape[0]
    apply = (torch.rand(n, generator=g) < p)[:, None, None, None]
    b = _uniform(n, 1 - strength, 1 + strength, g)[:, None, None, None]
    c = _uniform(n, 1 - strength, 1 + strength, g)[:, None, None, None]
    s = _uniform(n, 1 - strength, 1 + strength, g)[:, None, None, None]
    y = (x * b).clamp(0, 1)
    y = ((y - _gray(y).mean(dim=(2, 3), keepdim=True)) * c + _gray(y).mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    y = ((y - _gray(y)) * s + _gray(y)).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Replace each sample by its luma with probability ``p``."""
    gray = (torch.rand(x.shape[0], generator=g) < p)[:, None, None, None]
    return torch.where(gray, _gray(x).expand_as(x), x)


def simclr_view(x01: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One SimCLR view of [0,1] NCHW images: crop, flip, colour jitter, grayscale."""
    return random_grayscale(color_jitter(horizontal_flip(random_resized_crop(x01, g), g), g), g)

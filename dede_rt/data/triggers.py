"""Backdoor triggers, stamped in uint8 pixel space: x * (1 - m) + t * m."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Trigger:
    """A full-size trigger: ``pattern`` uint8 [H, W, 3] and ``mask`` float [H, W] in [0, 1]."""

    pattern: np.ndarray
    mask: np.ndarray
    name: str = "trigger"

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """Composite the trigger onto uint8 NHWC (or HWC) images; returns new uint8 images."""
        if images.shape[-3:-1] != self.mask.shape:
            raise ValueError(f"trigger is {self.mask.shape}, images are {images.shape[-3:-1]}")
        m = self.mask[..., None].astype(np.float32)
        if np.all((m == 0) | (m == 1)):  # hard mask: exact copy, no rounding
            return np.where(m.astype(bool), self.pattern, images).astype(np.uint8)
        out = images.astype(np.float32) * (1 - m) + self.pattern.astype(np.float32) * m
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def patch_trigger(
    image_size: int, patch: np.ndarray, top: int, left: int, name: str = "patch"
) -> Trigger:
    """A patch (uint8 [h, w, 3]) pasted at (top, left) of an ``image_size`` square image."""
    h, w = patch.shape[:2]
    if top < 0 or left < 0 or top + h > image_size or left + w > image_size:
        raise ValueError(f"a {h}x{w} patch at ({top}, {left}) does not fit a {image_size}px image")
    pattern = np.zeros((image_size, image_size, 3), np.uint8)
    mask = np.zeros((image_size, image_size), np.float32)
    pattern[top : top + h, left : left + w] = patch
    mask[top : top + h, left : left + w] = 1.0
    return Trigger(pattern, mask, name)


def white_square(image_size: int = 32, size: int = 10, start: int = 21) -> Trigger:
    """BadEncoder's reference trigger: a white ``size`` square at rows/cols start..start+size-1."""
    patch = np.full((size, size, 3), 255, np.uint8)
    return patch_trigger(image_size, patch, start, start, f"white_square_{size}px")


def blend_trigger(pattern: np.ndarray, alpha: float, name: str = "blend") -> Trigger:
    """A full-image pattern blended with opacity ``alpha`` (Chen et al.'s blend attack)."""
    mask = np.full(pattern.shape[:2], alpha, np.float32)
    return Trigger(pattern.astype(np.uint8), mask, name)

"""CTRL (Li et al., ICCV 2023): a frequency-domain trigger that poisons SSL pre-training data.

The trigger, as in the public CTRL code (meet-cjli/CTRL, ``poison_frequency``):
RGB (0-255 floats) -> YCrCb (OpenCV's full-range BT.601 ``COLOR_RGB2YCrCb``;
CTRL calls it "YUV") -> orthonormal 2-D DCT-II on ``window`` x ``window``
blocks (``cv2.dct``) -> add ``magnitude`` at each position in ``positions``
of each channel in ``channels`` (default: (15,15) and (31,31) of the two
chroma channels, window 32, magnitude 100 for CIFAR) -> inverse DCT -> RGB ->
round and clip to uint8. The DCT is a plain matrix product here (no OpenCV).

The victim: SimCLR pre-trained on a set where ``rate`` (1%) of the images are
target-class images carrying the trigger; SSL has no labels, so the backdoor
is the association of the trigger with the target class's features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dede_rt.errors import UserError

# OpenCV's RGB -> YCrCb (full range, delta 128) coefficients.
_KR, _KG, _KB = 0.299, 0.587, 0.114
_CR, _CB = 0.713, 0.564
CTRL_POSITIONS = ((15, 15), (31, 31))
CTRL_CHANNELS = (1, 2)


def rgb_to_ycrcb(rgb: np.ndarray) -> np.ndarray:
    """float RGB (0-255) [..., 3] -> Y, Cr, Cb (0-255, chroma centred on 128), as OpenCV."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = _KR * r + _KG * g + _KB * b
    return np.stack([y, (r - y) * _CR + 128.0, (b - y) * _CB + 128.0], axis=-1)


def ycrcb_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Exact inverse of ``rgb_to_ycrcb`` (float, unclipped)."""
    y, cr, cb = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
    r = y + cr / _CR
    b = y + cb / _CB
    g = (y - _KR * r - _KB * b) / _KG
    return np.stack([r, g, b], axis=-1)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (cv2.dct's definition): X = C @ x @ C.T."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def block_dct(x: np.ndarray, window: int, inverse: bool = False) -> np.ndarray:
    """(Inverse) 2-D DCT of each ``window`` block of the last two axes of ``x`` [..., H, W]."""
    h, w = x.shape[-2:]
    if h % window or w % window:
        raise ValueError(f"image {h}x{w} is not a multiple of the DCT window {window}")
    c = dct_matrix(window)
    if inverse:
        c = c.T
    blocks = x.reshape(*x.shape[:-2], h // window, window, w // window, window)
    out = np.einsum("ka,...iajb,lb->...ikjl", c, blocks, c, optimize=True)
    return out.reshape(x.shape)


@dataclass(frozen=True)
class FrequencyTrigger:
    """CTRL's trigger: ``magnitude`` added at DCT ``positions`` of chroma ``channels``, per ``window`` block."""

    magnitude: float = 100.0
    window: int = 32
    positions: tuple[tuple[int, int], ...] = CTRL_POSITIONS
    channels: tuple[int, ...] = CTRL_CHANNELS
    name: str = "ctrl_frequency"

    def spectrum_offsets(self, size: int) -> np.ndarray:
        """The additive DCT-domain pattern [3, size, size] (YCrCb channel first)."""
        delta = np.zeros((3, size, size), np.float64)
        for top in range(0, size, self.window):
            for left in range(0, size, self.window):
                for ch in self.channels:
                    for u, v in self.positions:
                        if u >= self.window or v >= self.window:
                            raise ValueError(f"DCT position {(u, v)} is outside a {self.window} window")
                        delta[ch, top + u, left + v] += self.magnitude
        return delta

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """Apply the trigger to uint8 NHWC (or HWC) images; returns new uint8 images."""
        single = images.ndim == 3
        x = images[None] if single else images
        size = x.shape[1]
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"CTRL expects square images, got {x.shape[1]}x{x.shape[2]}")
        # The DCT and colour transform are linear, so adding the trigger in the DCT domain
        # equals adding its inverse transform in pixel space: compute that once.
        delta_ycc = block_dct(self.spectrum_offsets(size), self.window, inverse=True)  # [3, H, W]
        delta_rgb = ycrcb_to_rgb(np.moveaxis(delta_ycc, 0, -1) + np.array([0.0, 128.0, 128.0]))
        out = np.clip(np.rint(x.astype(np.float64) + delta_rgb), 0, 255).astype(np.uint8)
        return out[0] if single else out


def ctrl_trigger(magnitude: float = 100.0, window: int = 32) -> FrequencyTrigger:
    """The reference CTRL trigger for 32x32 images."""
    return FrequencyTrigger(magnitude, window)


def image_spectrum(images_u8: np.ndarray, window: int = 32) -> np.ndarray:
    """Block DCT of the YCrCb channels of uint8 NHWC images: float [N, 3, H, W] (to look for the trigger)."""
    ycc = rgb_to_ycrcb(images_u8.astype(np.float64))
    return block_dct(np.moveaxis(ycc, -1, 1), window)


def poison_candidates(labels: np.ndarray, target: int, rate: float) -> tuple[int, np.ndarray]:
    """How many images ``rate`` poisons and the target-class indices to draw them from; a UserError if too few."""
    count = int(round(rate * len(labels)))
    candidates = np.flatnonzero(labels == target)
    if count > len(candidates):
        raise UserError(f"poisoning {count} images ({rate:g} of {len(labels)}) needs that many target-class "
                        f"images, found {len(candidates)}: lower the CTRL poisoning rate")
    return count, candidates


def poison_target_class(images_u8: np.ndarray, labels: np.ndarray, *, target: int, rate: float,
                        trigger: FrequencyTrigger | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stamp the trigger on ``rate`` x N target-class images (CTRL's SSL poisoning); returns (images, poisoned idx)."""
    trigger = trigger or ctrl_trigger()
    count, candidates = poison_candidates(labels, target, rate)
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))
    out = images_u8.copy()
    out[chosen] = trigger.stamp(images_u8[chosen])
    return out, chosen

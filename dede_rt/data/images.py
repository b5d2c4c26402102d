"""Decoding image files into uint8 RGB arrays of the detector's input size, resized as its encoder expects."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TRAIN_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RESAMPLE = Image.Resampling.BICUBIC  # the default resize, used for training and scanning alike
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb limit (~89 Mpx), applied before decoding
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("squash", "crop")
CROP_FRACTION = 0.875  # "crop" without resize_to: shorter side = size / 0.875 (timm's and torchvision's crop_pct)


@dataclass(frozen=True)
class Resize:
    """How a decoded image becomes ``size`` x ``size`` encoder pixels (one rule for training and scanning).

    ``squash``: resize both sides to ``size`` (aspect ratio not kept; the first round's rule, and the default of
    32-px CIFAR bundles). ``crop``: resize the shorter side to ``resize_to`` (default ``size / 0.875``), keeping
    the aspect ratio, then take the central ``size`` x ``size`` (ImageNet / CLIP / timm preprocessing).
    """

    size: int
    mode: str = "squash"
    resize_to: int | None = None
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if self.size < 1 or (self.resize_to is not None and self.resize_to < self.size):
            raise ValueError(f"resize_to ({self.resize_to}) must be >= the crop size ({self.size})")

    @classmethod
    def of(cls, size: int | Resize) -> Resize:
        """``size`` as a Resize: a bare int means the squash rule (every caller before resize modes existed)."""
        return size if isinstance(size, Resize) else cls(int(size))

    @property
    def shorter_side(self) -> int:
        """The shorter side's length before the centre crop (``crop`` mode)."""
        return self.resize_to or int(round(self.size / CROP_FRACTION))

    def draft_size(self) -> tuple[int, int]:
        """The smallest size a JPEG may be DCT-downscaled to while decoding without losing what the resize keeps."""
        side = self.size if self.mode == "squash" else self.shorter_side
        return side, side

    def apply(self, image: Image.Image) -> np.ndarray:
        """An RGB image as uint8 HWC [size, size, 3] (no-op when it already is that size)."""
        resample = INTERPOLATIONS[self.interpolation]
        if image.size == (self.size, self.size):
            return np.asarray(image, dtype=np.uint8)
        if self.mode == "squash":
            return np.asarray(image.resize((self.size, self.size), resample), dtype=np.uint8)
        w, h = image.size
        scale = self.shorter_side / min(w, h)
        # round, not floor: the shorter side lands exactly on shorter_side (torchvision's Resize(int) rule)
        rw, rh = max(self.size, int(round(w * scale))), max(self.size, int(round(h * scale)))
        if (rw, rh) != (w, h):
            image = image.resize((rw, rh), resample)
        left, top = (rw - self.size) // 2, (rh - self.size) // 2
        return np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)

    def to_dict(self) -> dict:
        """Plain-JSON form (part of the bundle's normalization record)."""
        return asdict(self)


def iter_image_files(root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Iterator[Path]:
    """Yield image files under ``root`` recursively, in sorted order, skipping hidden entries.

    Walks one directory at a time (no full listing in memory) and never follows
    symlinked directories, so symlink loops cannot trap it.
    """
    root = Path(root)
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(Path(entry.path))
            elif entry.name.lower().endswith(extensions):
                yield Path(entry.path)
        stack.extend(reversed(subdirs))  # depth-first, alphabetical


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB; alpha over black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_rgb(image: Image.Image, size: int | Resize) -> np.ndarray:
    """Resize an RGB image to the ``size`` rule's square (no-op when already that size) as uint8 HWC."""
    return Resize.of(size).apply(image)


def resize_array(image: np.ndarray, size: int | Resize) -> np.ndarray:
    """A uint8 HWC array at the rule's square: returned as is when it already fits, else resized like files."""
    n = Resize.of(size).size
    if image.shape[:2] == (n, n):
        return image
    return resize_rgb(Image.fromarray(image), size)


def open_regular(path: str | Path) -> io.BufferedReader:
    """Open ``path`` for reading, refusing anything but a non-empty regular file (a FIFO would block forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"not a regular file ({stat.filemode(info.st_mode)})")
        if info.st_size == 0:
            raise ValueError("empty file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class ImageTooLarge(ValueError):
    """An image declares more pixels than allowed (decompression-bomb protection)."""


def decode_image(path: str | Path | BinaryIO, size: int | Resize, max_pixels: int | None = None) -> np.ndarray:
    """Read one image (path or binary file object) as uint8 [size, size, 3] by the ``size`` rule; raises if broken.

    ``max_pixels`` rejects images whose *declared* size is larger, before any
    pixel is decoded (a tiny file can declare gigapixels).
    """
    rule = Resize.of(size)
    with Image.open(path) as image:
        if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
            raise ImageTooLarge(f"declared size {image.size[0]}x{image.size[1]} exceeds the {max_pixels}-pixel limit")
        target = rule.draft_size()
        if image.format == "JPEG" and max(image.size) > 2 * target[0]:
            # Decode at a reduced DCT scale that still covers what the resize keeps: much faster for
            # multi-megapixel JPEGs, and the same pixels for training and scanning (both come here).
            image.draft("RGB", target)
        image.load()
        return rule.apply(to_rgb(image))

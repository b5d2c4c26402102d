"""Decoding image files into uint8 RGB arrays of the detector's input size."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TRAIN_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RESAMPLE = Image.Resampling.BICUBIC  # the one resize used for training and scanning alike
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb limit (~89 Mpx), applied before decoding


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


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to ``size`` x ``size`` (no-op when already that size) as uint8 HWC."""
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    return np.asarray(image, dtype=np.uint8)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HWC array at ``size`` x ``size``: returned as is when it already fits, else resized like files."""
    if image.shape[:2] == (size, size):
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


def decode_image(path: str | Path | BinaryIO, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Read one image (path or binary file object) as uint8 [size, size, 3]; raises on broken files.

    ``max_pixels`` rejects images whose *declared* size is larger, before any
    pixel is decoded (a tiny file can declare gigapixels).
    """
    with Image.open(path) as image:
        if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
            raise ImageTooLarge(f"declared size {image.size[0]}x{image.size[1]} exceeds the {max_pixels}-pixel limit")
        if image.format == "JPEG" and max(image.size) > 2 * size:
            image.draft("RGB", (size, size))  # decode at reduced scale: much faster for large JPEGs
        image.load()
        return resize_rgb(to_rgb(image), size)

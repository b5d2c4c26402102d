"""Labelled image collections in memory: image folders, CIFAR-10 batches, NPZ arrays."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dede_rt.data.images import TRAIN_EXTENSIONS, decode_image, iter_image_files, resize_rgb
from dede_rt.errors import UserError


@dataclass
class ImageSet:
    """uint8 NHWC images with optional integer labels and a name per image."""

    images: np.ndarray
    labels: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise UserError(f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {list(self.images.shape)}")
        if not self.names:
            self.names = [f"#{i}" for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at ``index``, with their labels and names."""
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, [self.names[i] for i in index], self.classes)


def load_image_folder(root: str | Path, size: int, labels_from_parent: bool = False) -> ImageSet:
    """Decode every image under ``root`` (recursive); labels from the parent folder name when asked."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    paths = list(iter_image_files(root, TRAIN_EXTENSIONS))
    if not paths:
        raise UserError(f"{root}: no images found (looked for {', '.join(TRAIN_EXTENSIONS)})")
    images, names, broken = [], [], []
    for path in paths:
        try:
            images.append(decode_image(path, size))
            names.append(str(path.relative_to(root)))
        except Exception as exc:  # a broken file is reported, not fatal
            broken.append(f"{path}: {exc}")
    if not images:
        raise UserError(f"{root}: none of {len(paths)} images could be decoded (first: {broken[0]})")
    labels, classes = None, []
    if labels_from_parent:
        parents = [str(Path(n).parent) for n in names]
        classes = sorted(set(parents))
        labels = np.array([classes.index(p) for p in parents], dtype=np.int64)
    result = ImageSet(np.stack(images), labels, names, classes)
    result.broken = broken  # type: ignore[attr-defined]
    return result


def load_cifar_batches(path: str | Path) -> ImageSet:
    """Read CIFAR-10/100 python pickles: one ``data_batch_*``/``test_batch`` file or their directory."""
    path = Path(path)
    files = sorted(path.glob("data_batch_*")) + sorted(path.glob("test_batch")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no CIFAR python batches (data_batch_*, test_batch) found")
    images, labels = [], []
    for file in files:
        try:
            with open(file, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            label_key = b"labels" if b"labels" in batch else b"fine_labels"
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except Exception as exc:
            raise UserError(f"{file}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def load_npz(path: str | Path, size: int | None = None) -> ImageSet:
    """Read images (uint8 NHWC or NCHW; key ``x``/``images``/``data``/first) and labels (``y``/``labels``)."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    keys = list(arrays.keys())
    image_key = next((k for k in ("x", "images", "data", "arr_0") if k in keys), keys[0] if keys else None)
    if image_key is None:
        raise UserError(f"{path}: empty .npz file")
    images = np.asarray(arrays[image_key])
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        scale = 255.0 if images.max() <= 1.0 else 1.0
        images = np.clip(images * scale + 0.5, 0, 255).astype(np.uint8)
    label_key = next((k for k in ("y", "labels", "targets") if k in keys), None)
    labels = None if label_key is None else np.asarray(arrays[label_key], dtype=np.int64)
    result = ImageSet(np.ascontiguousarray(images), labels)
    return result if size is None else resize_set(result, size)


def load_images(path: str | Path, size: int, labels_from_parent: bool = False) -> ImageSet:
    """Load an image collection from a folder, a CIFAR batch (dir or file) or an .npz file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.suffix == ".npz":
        return load_npz(path, size)
    if (path.is_dir() and any(path.glob("data_batch_*"))) or path.name.startswith(("data_batch", "test_batch")):
        return resize_set(load_cifar_batches(path), size)
    return load_image_folder(path, size, labels_from_parent)


def resize_set(images: ImageSet, size: int) -> ImageSet:
    """Resize an in-memory ImageSet to ``size`` x ``size`` (returned as is when it already fits)."""
    if images.images.shape[1:3] == (size, size):
        return images
    resized = np.stack([resize_rgb(Image.fromarray(im), size) for im in images.images])
    return ImageSet(resized, images.labels, images.names, images.classes)

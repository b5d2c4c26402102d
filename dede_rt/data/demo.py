"""An embedded demo data set built only from images that Python packages ship.

Two sources, so in- and out-of-distribution settings can be tried:
- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, upscaled to the
  image size and colourised with random foreground/background colours;
- ``photos``: random crops of the natural photos bundled with scikit-image and
  scikit-learn (astronaut, coffee, cat, rocket, Hubble field, ...), labelled
  by source photo;
- ``other photos``: crops of the scikit-image photos the demo set does NOT use
  (a motorcycle, a clock, a cell micrograph, scanned text): a second natural
  image source for out-of-distribution decoder training on photo crops.
Everything is generated from a seed: the same seed gives the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dede_rt.data.images import RESAMPLE
from dede_rt.data.sources import ImageSet

# Photos that ship inside scikit-image / scikit-learn (no download needed).
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "colorwheel", "camera", "coins", "brick", "grass", "gravel", "moon",
)

# Other shipped scikit-image photos, disjoint from SKIMAGE_PHOTOS: the out-of-distribution source for photo crops.
OTHER_PHOTOS = ("stereo_motorcycle", "clock", "cell", "page", "text")


def _rgb(img) -> np.ndarray:
    img = np.asarray(img[0] if isinstance(img, tuple) else img)  # stereo_motorcycle: (left, right, disparity)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.uint8)


def _skimage_photos(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    import skimage.data

    return {name: _rgb(getattr(skimage.data, name)()) for name in names}


def _photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    photos = _skimage_photos(SKIMAGE_PHOTOS)
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        photos[fname.rsplit("/", 1)[-1].split(".")[0]] = img
    return photos


def demo_digits(image_size: int = 32, seed: int = 0) -> ImageSet:
    """scikit-learn digits, upscaled and colourised; labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    gray = (digits.images / 16.0).astype(np.float32)  # [N, 8, 8] in [0, 1]
    n = len(gray)
    fg = rng.integers(128, 256, size=(n, 3)).astype(np.float32)
    bg = rng.integers(0, 96, size=(n, 3)).astype(np.float32)
    swap = rng.random(n) < 0.3  # some dark-on-light digits
    fg[swap], bg[swap] = bg[swap].copy(), fg[swap].copy()
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        up = Image.fromarray((gray[i] * 255).astype(np.uint8)).resize((image_size, image_size), RESAMPLE)
        a = np.asarray(up, np.float32)[..., None] / 255.0
        images[i] = np.clip(a * fg[i] + (1 - a) * bg[i], 0, 255).astype(np.uint8)
    names = [f"digits/{i:05d}" for i in range(n)]
    return ImageSet(images, digits.target.astype(np.int64), names, [str(d) for d in range(10)])


def demo_photos(count: int = 2400, image_size: int = 32, seed: int = 0) -> ImageSet:
    """Random square crops (10-60% of the short side, random flips) of the bundled photos."""
    return _crops(_photos(), count, image_size, seed)


def other_photos(count: int = 1200, image_size: int = 32, seed: int = 0) -> ImageSet:
    """Crops like ``demo_photos`` of the scikit-image photos it does not use (OTHER_PHOTOS), labelled by photo."""
    return _crops(_skimage_photos(OTHER_PHOTOS), count, image_size, seed)


def _crops(photos: dict[str, np.ndarray], count: int, image_size: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed + 1)
    classes = sorted(photos)
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    labels = rng.integers(0, len(classes), size=count)
    for i, label in enumerate(labels):
        src = photos[classes[label]]
        h, w = src.shape[:2]
        side = int(min(h, w) * rng.uniform(0.1, 0.6))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(src[top : top + side, left : left + side]).resize((image_size, image_size), RESAMPLE)
        arr = np.asarray(crop)
        images[i] = arr[:, ::-1] if rng.random() < 0.5 else arr
    names = [f"photos/{classes[l]}_{i:05d}" for i, l in enumerate(labels)]
    return ImageSet(images, labels.astype(np.int64), names, classes)


def demo_dataset(image_size: int = 32, photo_count: int = 2400, seed: int = 0) -> ImageSet:
    """Digits (labels 0-9) and photo crops (labels 10+), shuffled together deterministically."""
    digits = demo_digits(image_size, seed)
    photos = demo_photos(photo_count, image_size, seed)
    images = np.concatenate([digits.images, photos.images])
    labels = np.concatenate([digits.labels, photos.labels + len(digits.classes)])
    names = digits.names + photos.names
    order = np.random.default_rng(seed + 2).permutation(len(images))
    return ImageSet(images[order], labels[order], [names[i] for i in order], digits.classes + photos.classes)

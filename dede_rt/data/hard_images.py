"""Hard clean images: clean images that are hard to reconstruct but carry no trigger (a false-alarm control).

A reconstruction detector flags what its decoder cannot redraw, so fine textures, text and sharp periodic
patterns are the clean images most likely to raise false alarms. Four kinds, in turn:

- ``texture``: crops of scikit-image's bundled textures (brick, grass, gravel), or band-pass noise when they are
  missing, recoloured between two random colours;
- ``text``: random words in PIL's default font, random colours, several lines per image;
- ``checkerboard``: cells of 3-8 px (never 1-2 px: those sit on CTRL's DCT positions (15, 15) and (31, 31));
- ``stripes``: periods of 3-10 px at angles that are never within 10 degrees of a diagonal (diagonal stripes
  concentrate on the DCT diagonal that CTRL's trigger uses).

Every pixel is a convex combination of two colours whose channels sum to at most 700, so no pixel is near white
(all channels >= 240): no image carries BadEncoder's white square, in a corner or elsewhere. None is a blend of
a full-image pattern either: the blend triggers' noise and logo are never drawn here. Images are deterministic
in ``seed``, and image i does not depend on ``n`` (a longer set extends a shorter one).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

KINDS = ("texture", "text", "checkerboard", "stripes")
_TEXTURES = ("brick", "grass", "gravel")
_MAX_CHANNEL_SUM = 700  # < 3 x 240: no convex combination of two such colours is near white
_CHECKER_CELLS = (3, 4, 5, 6, 8)
_STRIPE_PERIODS = (3, 4, 5, 6, 7, 8, 10)
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))


@dataclass(frozen=True)
class HardImages:
    """Hard clean images (uint8 [N, S, S, 3]) and the kind of each (one of ``KINDS``)."""

    images: np.ndarray
    kinds: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        """How many images of each kind (kinds in ``KINDS`` order, absent ones left out)."""
        return {k: self.kinds.count(k) for k in KINDS if k in self.kinds}


def hard_clean_set(n: int, size: int, seed: int = 0) -> HardImages:
    """``n`` hard clean ``size``-px images, the kinds in turn, with each image's kind."""
    if n < 0 or size < 8:
        raise ValueError(f"hard clean images need n >= 0 and size >= 8, got n={n}, size={size}")
    images = np.empty((n, size, size, 3), np.uint8)
    kinds = tuple(KINDS[i % len(KINDS)] for i in range(n))
    makers = {"texture": _texture, "text": _text, "checkerboard": _checkerboard, "stripes": _stripes}
    for i, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, i])  # per image: image i is the same for every n
        t = makers[kind](rng, size)  # float [S, S] in [0, 1]: the share of the second colour
        c0, c1 = _colour_pair(rng)
        images[i] = np.clip(np.rint(c0 + t[..., None] * (c1 - c0)), 0, 255).astype(np.uint8)
    return HardImages(images, kinds)


def hard_clean_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` hard clean ``size``-px images, uint8 [n, size, size, 3] (``hard_clean_set`` without the kinds)."""
    return hard_clean_set(n, size, seed).images


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour whose channels sum to at most ``_MAX_CHANNEL_SUM`` (never near white)."""
    while True:
        c = rng.integers(0, 256, 3)
        if c.sum() <= _MAX_CHANNEL_SUM:
            return c.astype(np.float64)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart (mean channel gap >= 60) that the pattern has contrast."""
    while True:
        c0, c1 = _colour(rng), _colour(rng)
        if np.abs(c0 - c1).mean() >= 60:
            return c0, c1


@lru_cache(maxsize=None)
def _texture_source(name: str) -> np.ndarray | None:
    """A scikit-image bundled texture as float grayscale [0, 1], or None when this scikit-image lacks it."""
    try:
        import skimage.data

        image = np.asarray(getattr(skimage.data, name)(), np.float64)
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1)
    return image / 255.0


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A contrast-stretched crop of a bundled texture (band-pass noise when none is available)."""
    from PIL import Image

    sources = [s for s in map(_texture_source, _TEXTURES) if s is not None]
    pick = int(rng.integers(0, len(_TEXTURES) + 1))
    if not sources or pick == len(_TEXTURES):  # one draw in four is generated noise even when textures exist
        return _bandpass_noise(rng, size)
    src = sources[pick % len(sources)]
    side = int(rng.integers(size, min(src.shape) // 2 + 1)) if min(src.shape) // 2 > size else min(src.shape)
    top, left = (int(rng.integers(0, d - side + 1)) for d in src.shape[:2])
    crop = src[top : top + side, left : left + side]
    # BOX resampling averages: values stay within [0, 1], so the recolouring stays a convex combination
    small = np.asarray(Image.fromarray(np.float32(crop)).resize((size, size), Image.Resampling.BOX))
    small = np.rot90(small, int(rng.integers(0, 4)))
    return _stretch(small)


def _bandpass_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise keeping spatial periods of about 2.5-8 px: fine grain, unlike the blend trigger's i.i.d. pixels."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * ((f > 1 / 8) & (f < 1 / 2.5))
    return _stretch(np.real(np.fft.ifft2(spectrum)))


def _stretch(x: np.ndarray) -> np.ndarray:
    """Map the 2nd-98th percentile range of ``x`` onto [0, 1] (clipped): full contrast, hardest to redraw."""
    lo, hi = np.percentile(x, [2, 98])
    return np.clip((x - lo) / max(hi - lo, 1e-9), 0.0, 1.0)


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    """Lines of random letter words in PIL's default font, at a random font size and offset (a text crop)."""
    from PIL import Image, ImageDraw, ImageFont

    font_px = int(rng.integers(max(8, size // 16), max(10, size // 5) + 1))  # 8-10 px at 32, 14-44 at 224
    try:
        font = ImageFont.load_default(size=font_px)
    except (TypeError, ValueError, ImportError, OSError):  # no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    canvas = Image.new("L", (size * 2, size * 2), 0)  # drawn larger, then cropped: words run off the edges
    draw = ImageDraw.Draw(canvas)
    y = -int(rng.integers(0, font_px))
    while y < size * 2:
        words = [''.join(rng.choice(_LETTERS, int(rng.integers(2, 9)))) for _ in range(6)]
        draw.text((-int(rng.integers(0, font_px * 2)), y), " ".join(words), fill=255, font=font)
        y += int(font_px * rng.uniform(1.0, 1.4))
    top, left = (int(rng.integers(0, size + 1)) for _ in range(2))
    return np.asarray(canvas, np.float64)[top : top + size, left : left + size] / 255.0


def _checkerboard(rng: np.random.Generator, size: int) -> np.ndarray:
    """A checkerboard of 3-8 px cells (no larger than a third of the image), at a random offset."""
    cells = [c for c in _CHECKER_CELLS if c <= size // 3] or [_CHECKER_CELLS[0]]
    cell = int(rng.choice(cells))
    dy, dx = (int(rng.integers(0, 2 * cell)) for _ in range(2))
    yy, xx = np.meshgrid(np.arange(size) + dy, np.arange(size) + dx, indexing="ij")
    return (((yy // cell) + (xx // cell)) % 2).astype(np.float64)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sharp stripes: period 3-10 px, duty cycle 0.3-0.7, angle 0-180 degrees minus 35-55 and 125-145."""
    period = float(rng.choice(_STRIPE_PERIODS))
    while True:
        angle = float(rng.uniform(0.0, 180.0))
        if min(abs(angle - 45.0), abs(angle - 135.0)) > 10.0:
            break
    duty, phase = rng.uniform(0.3, 0.7), rng.uniform(0.0, 1.0)
    theta = np.deg2rad(angle)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    along = (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase
    return ((along % 1.0) < duty).astype(np.float64)

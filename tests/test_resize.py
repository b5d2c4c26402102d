"""The resize rule: squash (old bundles) or shorter side + centre crop, and one rule for training and scanning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dede_rt.data.images import Resize, decode_image
from dede_rt.data.sources import load_images
from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.scan.decode import DecodePool
from dede_rt.data.sources import open_source


def test_crop_keeps_the_aspect_ratio_and_takes_the_centre():
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, 40:80] = 255  # a white centre band between black sides
    out = Resize(32, "crop", resize_to=32).apply(Image.fromarray(wide))
    assert out.shape == (32, 32, 3) and out.min() > 200  # only the white centre survives the crop
    squashed = Resize(32).apply(Image.fromarray(wide))
    assert squashed.shape == (32, 32, 3) and squashed.min() < 50  # squash keeps the black sides
    assert Resize(224, "crop").shorter_side == 256
    assert Normalization.from_dict({"mean": [0, 0, 0], "std": [1, 1, 1], "image_size": 32}).pixels == Resize(32)
    with pytest.raises(UserError, match="resize mode"):
        Normalization(resize="stretch")


def test_scanner_decodes_full_size_jpegs_exactly_as_training(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(1600, 900), (700, 1400), (300, 300), (2048, 1536)]):
        pixels = rng.integers(0, 255, (h // 50, w // 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).save(tmp_path / f"{i}.jpg", quality=90)
    rule = Normalization(image_size=64, resize="crop", interpolation="bilinear").pixels
    trained = load_images(tmp_path, rule).images
    with DecodePool(rule, workers=2) as pool:
        scanned = np.stack([image for _, image, _ in pool.map(open_source(tmp_path).items())])
    assert trained.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(scanned, trained)
    np.testing.assert_array_equal(decode_image(tmp_path / "1.jpg", rule), trained[1])

"""Hard clean images: deterministic, well-formed, every kind present, and none of them a trigger."""

from __future__ import annotations

import numpy as np
import pytest

from dede_rt.data.hard_images import KINDS, hard_clean_images, hard_clean_set
from dede_rt.research.evaluation.victims import TRIGGERS, make_trigger


@pytest.mark.parametrize("size", [32, 64])
def test_same_seed_same_bytes_and_a_longer_set_extends_a_shorter_one(size):
    a, b = hard_clean_set(24, size, seed=3), hard_clean_set(24, size, seed=3)
    assert a.images.tobytes() == b.images.tobytes() and a.kinds == b.kinds
    assert hard_clean_images(24, size, seed=4).tobytes() != a.images.tobytes()  # the seed matters
    assert np.array_equal(hard_clean_images(10, size, seed=3), a.images[:10])  # image i does not depend on n


def test_shapes_dtypes_and_kinds():
    got = hard_clean_set(40, 32, seed=0)
    assert got.images.shape == (40, 32, 32, 3) and got.images.dtype == np.uint8
    assert len(got.kinds) == 40 and set(got.kinds) == set(KINDS)
    assert got.counts() == {k: 10 for k in KINDS}
    assert hard_clean_images(0, 32).shape == (0, 32, 32, 3)
    # hard to reconstruct: every image has contrast (no flat image slips in)
    assert (got.images.reshape(40, -1).std(axis=1) > 20).all()
    with pytest.raises(ValueError):
        hard_clean_set(-1, 32)


@pytest.mark.parametrize("size", [32, 64])
def test_no_hard_image_is_or_carries_a_trigger(size):
    images = hard_clean_images(60, size, seed=1)
    # never near white (all channels >= 240), so BadEncoder's white square is nowhere, corner included
    assert not (images >= 240).all(axis=-1).any()
    square = make_trigger("white_square", size)
    corner = square.mask.astype(bool)
    assert not (images[:, corner] == 255).all(axis=(1, 2)).any()
    for name in TRIGGERS:
        trigger = make_trigger(name, size, seed=0)
        stamped = trigger.stamp(images)
        # stamping changes every image: none already carries the trigger
        assert (stamped.reshape(len(images), -1) != images.reshape(len(images), -1)).any(axis=1).all(), name
        pattern = getattr(trigger, "pattern", None)
        if pattern is not None:  # none is the trigger's own pattern (the blend noise, the logo)
            assert not any(np.array_equal(image, pattern) for image in images), name

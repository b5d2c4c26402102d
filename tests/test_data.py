import pickle

import numpy as np
import pytest
from PIL import Image

from dede_rt.data.demo import demo_digits, demo_photos, other_photos
from dede_rt.data.images import decode_image, iter_image_files
from dede_rt.data.sources import load_cifar_batches, load_image_folder, load_images, load_npz
from dede_rt.data.triggers import blend_trigger, patch_trigger, white_square
from dede_rt.errors import UserError


def test_white_square_is_pixel_exact():
    img = np.full((2, 32, 32, 3), 7, np.uint8)
    out = white_square().stamp(img)
    assert (out[:, 21:31, 21:31] == 255).all()
    inside = np.zeros((32, 32), bool)
    inside[21:31, 21:31] = True
    assert (out[:, ~inside] == 7).all()
    assert img.max() == 7  # input untouched


def test_patch_and_blend_triggers():
    patch = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    t = patch_trigger(8, patch, 5, 4)
    out = t.stamp(np.zeros((8, 8, 3), np.uint8))
    assert (out[5:7, 4:7] == patch).all() and out.sum() == patch.sum()
    with pytest.raises(ValueError):
        patch_trigger(8, patch, 7, 0)
    b = blend_trigger(np.full((4, 4, 3), 200, np.uint8), 0.25)
    # 100 * 0.75 + 200 * 0.25 = 125, rounded in uint8 pixel space
    assert (b.stamp(np.full((1, 4, 4, 3), 100, np.uint8)) == 125).all()


def test_image_folder_recursive_labels_and_formats(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i, ext in enumerate(("png", "jpg", "bmp", "webp")):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.{ext}")
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / cls / "sub" / "g.png")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_image_folder(tmp_path, 32, labels_from_parent=True)
    assert s.images.shape == (10, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.classes == ["cat", "cat/sub", "dog", "dog/sub"]
    assert s.names[0] == "cat/0.png" and list(s.labels[:5]) == [0, 0, 0, 0, 1]
    assert [p.name for p in iter_image_files(tmp_path)][:5] == ["0.png", "1.jpg", "2.bmp", "3.webp", "g.png"]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        load_image_folder(tmp_path, 32)
    with pytest.raises(UserError, match="no such file"):
        load_images(tmp_path / "nope", 32)


def test_decode_converts_modes(tmp_path):
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "a16.png")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")  # fully transparent -> black
    for name in ("a16.png", "c.jpg", "t.png"):
        out = decode_image(tmp_path / name, 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert decode_image(tmp_path / "t.png", 8).max() == 0


def test_cifar_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    batch = {b"data": imgs.transpose(0, 3, 1, 2).reshape(5, -1), b"labels": [1, 2, 3, 4, 5]}
    for name in ("data_batch_1", "test_batch"):
        with open(tmp_path / name, "wb") as fh:
            pickle.dump(batch, fh)
    s = load_cifar_batches(tmp_path)
    assert len(s) == 10 and (s.images[:5] == imgs).all() and list(s.labels[:5]) == [1, 2, 3, 4, 5]
    one = load_images(tmp_path / "test_batch", 32)
    assert (one.images == imgs).all()
    (tmp_path / "data_batch_2").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        load_cifar_batches(tmp_path)


def test_npz_layouts(tmp_path):
    nhwc = np.random.default_rng(2).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=nhwc, y=np.arange(4))
    s = load_npz(tmp_path / "a.npz")
    assert (s.images == nhwc).all() and list(s.labels) == [0, 1, 2, 3]
    np.savez(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert (np.abs(load_npz(tmp_path / "b.npz").images.astype(int) - nhwc) <= 1).all()
    assert load_images(tmp_path / "a.npz", 16).images.shape == (4, 16, 16, 3)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz(tmp_path / "bad.npz")


def test_demo_sources_are_seeded_and_shaped():
    d1, d2 = demo_digits(seed=3), demo_digits(seed=3)
    assert d1.images.shape == (1797, 32, 32, 3) and (d1.images == d2.images).all()
    p = demo_photos(50, 32, seed=3)
    assert p.images.shape == (50, 32, 32, 3) and len(p.classes) >= 10
    assert not (demo_photos(50, 32, seed=4).images == p.images).all()


def test_other_photos_are_a_disjoint_seeded_source():
    o = other_photos(40, 32, seed=3)
    assert o.images.shape == (40, 32, 32, 3) and o.images.dtype == np.uint8
    assert (other_photos(40, 32, seed=3).images == o.images).all()
    # the out-of-distribution source shares no photo with the demo photos
    assert len(o.classes) == 5 and not set(o.classes) & set(demo_photos(10, 32).classes)
    assert o.images.std() > 10  # real crops, not blank frames

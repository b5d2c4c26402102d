"""The in-memory loaders and the streaming scan readers on a fixed corpus: pixels, labels, names, keys unchanged.

The expected digests were computed by the loaders and readers as they stood before they became one family
(dede_rt.data.sources collectors over the streaming readers, commit e06f826); any change to which files are
read, their order, the decode/resize, the NPZ key choice or the float scaling changes a digest. Pillow 13.0.0,
numpy 2.4.6 (the JPEG and WebP members are decoded by the libraries bundled with Pillow).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dede_rt.data.sources import (ImageSet, load_cifar_batches, load_image_folder, load_images, load_npz,
                                  open_source, resize_set)
from dede_rt.errors import UserError
from dede_rt.scan.decode import decode_chunk


def build_corpus(root: Path) -> None:
    """A class folder (every mode, excluded extensions, a broken file, a shard), four NPZ layouts, CIFAR batches."""
    rng = np.random.default_rng(20261201)

    def noise(h: int, w: int, c: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)

    f = root / "folder"
    for d in ("cat", "dog/sub", "empty"):
        (f / d).mkdir(parents=True)
    Image.fromarray(noise(40, 50)).save(f / "cat" / "a.png")
    Image.fromarray(noise(24, 24)).save(f / "cat" / "b.bmp")
    Image.fromarray(noise(300, 260)).save(f / "cat" / "c.jpg", quality=90)  # > 2x size: the JPEG draft path
    Image.fromarray(noise(20, 30)).save(f / "cat" / "d.webp", lossless=True)
    Image.fromarray(noise(32, 32, 4)).save(f / "dog" / "rgba.png")
    Image.fromarray(noise(17, 33, 0)).save(f / "dog" / "gray.png")
    Image.fromarray(noise(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE).save(f / "dog" / "pal.png")
    Image.fromarray((rng.integers(0, 65536, (20, 20))).astype(np.uint16)).save(f / "dog" / "sub" / "deep16.png")
    Image.fromarray(noise(32, 32)).save(f / "top.png")  # root level: class "."
    Image.fromarray(noise(32, 32)).save(f / "dog" / "skip.gif")  # not a training extension (scanned, not loaded)
    Image.fromarray(noise(32, 32)).save(f / "dog" / "skip.tif")
    (f / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (f / ".hidden.png").write_bytes(b"x")
    (f / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(noise(32, 32)).save(buf, "PNG")
    with tarfile.open(f / "cat" / "shard.tar", "w") as tar:  # scanned as members, not loaded for training
        info = tarfile.TarInfo("000.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    n = root / "npz"
    n.mkdir()
    u8 = noise(6, 20, 0).reshape(6, 20, 1).repeat(3, 2)[:, :, None, :].repeat(20, 2)
    u8 = np.ascontiguousarray(u8 ^ rng.integers(0, 256, u8.shape, dtype=np.uint8))
    np.savez(n / "u8.npz", x=u8, y=np.arange(6) * 3)
    np.savez_compressed(n / "f01.npz", images=rng.random((5, 3, 24, 24)).astype(np.float32),
                        labels=np.arange(5)[::-1])
    np.savez(n / "f255.npz", meta=np.arange(3), data=rng.random((4, 32, 32, 3)) * 255.0, targets=np.array([7, 7, 1, 0]))
    np.savez(n / "firstkey.npz", pixels=noise(3, 8, 0).reshape(3, 8, 1, 1).repeat(8, 2).repeat(3, 3))
    c = root / "cifar"
    c.mkdir()
    for name, count in (("data_batch_2", 3), ("data_batch_1", 4), ("test_batch", 2)):
        imgs = noise(count * 32, 32).reshape(count, 32, 32, 3)
        batch = {b"data": imgs.transpose(0, 3, 1, 2).reshape(count, -1), b"labels": list(rng.integers(0, 10, count))}
        with open(c / name, "wb") as fh:
            pickle.dump(batch, fh)
    c100 = root / "cifar100"
    c100.mkdir()
    imgs = noise(3 * 32, 32).reshape(3, 32, 32, 3)
    with open(c100 / "test_batch", "wb") as fh:
        pickle.dump({b"data": imgs.transpose(0, 3, 1, 2).reshape(3, -1), b"fine_labels": [99, 0, 42]}, fh)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources_regression")
    build_corpus(root)
    return root


FOLDER_NAMES = ['top.png', 'cat/a.png', 'cat/b.bmp', 'cat/c.jpg', 'cat/d.webp', 'dog/gray.png', 'dog/pal.png',
                'dog/rgba.png', 'dog/sub/deep16.png']
FOLDER_LABELS = [0, 1, 1, 1, 1, 2, 2, 2, 3]
FOLDER_CLASSES = ['.', 'cat', 'dog', 'dog/sub']
CIFAR_LABELS = [6, 8, 7, 4, 0, 8, 5, 9, 3]

# case: (call, shape, sha256[:16] of the pixels, labels, names (None: "#i"), classes)
LOADS = {
    "folder_labels_32": (lambda r: load_images(r / "folder", 32, labels_from_parent=True), [9, 32, 32, 3],
                         'ecc5505dfd88238d', FOLDER_LABELS, FOLDER_NAMES, FOLDER_CLASSES),
    "folder_nolabels_20": (lambda r: load_images(r / "folder", 20), [9, 20, 20, 3], '11974d590612ce7b', None,
                           FOLDER_NAMES, []),
    "folder_fn_28": (lambda r: load_image_folder(r / "folder", 28, labels_from_parent=True), [9, 28, 28, 3],
                     '5ecfb331c59ee0ce', FOLDER_LABELS, FOLDER_NAMES, FOLDER_CLASSES),
    "npz_u8_raw": (lambda r: load_npz(r / "npz/u8.npz"), [6, 20, 20, 3], 'e3ef2735b28340ea', [0, 3, 6, 9, 12, 15],
                   None, []),
    "npz_u8_16": (lambda r: load_images(r / "npz/u8.npz", 16), [6, 16, 16, 3], 'bbf60617ea05c39f',
                  [0, 3, 6, 9, 12, 15], None, []),
    "npz_u8_20": (lambda r: load_images(r / "npz/u8.npz", 20), [6, 20, 20, 3], 'e3ef2735b28340ea',
                  [0, 3, 6, 9, 12, 15], None, []),
    "npz_f01_raw": (lambda r: load_npz(r / "npz/f01.npz"), [5, 24, 24, 3], 'a873e6dec02ddf1a', [4, 3, 2, 1, 0],
                    None, []),
    "npz_f01_32": (lambda r: load_images(r / "npz/f01.npz", 32), [5, 32, 32, 3], '4d4ae27432f5ddc0',
                   [4, 3, 2, 1, 0], None, []),
    "npz_f255_raw": (lambda r: load_npz(r / "npz/f255.npz"), [4, 32, 32, 3], '1f435d4e654f2259', [7, 7, 1, 0],
                     None, []),
    "npz_f255_12": (lambda r: load_npz(r / "npz/f255.npz", 12), [4, 12, 12, 3], '9a65b68e2bc848ed', [7, 7, 1, 0],
                    None, []),
    "npz_first_raw": (lambda r: load_npz(r / "npz/firstkey.npz"), [3, 8, 8, 3], '8df8bb7d33cbf5a4', None, None, []),
    "cifar_dir": (lambda r: load_cifar_batches(r / "cifar"), [9, 32, 32, 3], 'cd0f71acfc726d81', CIFAR_LABELS,
                  None, []),
    "cifar_dir_32": (lambda r: load_images(r / "cifar", 32), [9, 32, 32, 3], 'cd0f71acfc726d81', CIFAR_LABELS,
                     None, []),
    "cifar_dir_24": (lambda r: load_images(r / "cifar", 24), [9, 24, 24, 3], '19d671062de6ce48', CIFAR_LABELS,
                     None, []),
    "cifar_file_32": (lambda r: load_images(r / "cifar/data_batch_1", 32), [4, 32, 32, 3], '446c8ac2a2b62e35',
                      [6, 8, 7, 4], None, []),
    "cifar100_file": (lambda r: load_cifar_batches(r / "cifar100/test_batch"), [3, 32, 32, 3], 'a7ddc4b56c386b13',
                      [99, 0, 42], None, []),
    "resize_set_folder": (lambda r: resize_set(load_images(r / "folder", 32, True), 16), [9, 16, 16, 3],
                          '3e90310549fcf2ae', FOLDER_LABELS, FOLDER_NAMES, FOLDER_CLASSES),
}


@pytest.mark.parametrize("case", list(LOADS))
def test_loaders_return_the_same_pixels_labels_and_names(corpus, case):
    call, shape, digest, labels, names, classes = LOADS[case]
    s = call(corpus)
    assert isinstance(s, ImageSet)
    assert list(s.images.shape) == shape and s.images.dtype == np.uint8
    assert hashlib.sha256(s.images.tobytes()).hexdigest()[:16] == digest
    if labels is None:
        assert s.labels is None
    else:
        assert s.labels.dtype == np.int64 and s.labels.tolist() == labels
    assert s.names == (names if names is not None else [f"#{i}" for i in range(shape[0])])
    assert s.classes == classes


def test_folder_reports_the_broken_file(corpus):
    s = load_images(corpus / "folder", 32)
    assert [b.split(":")[0] for b in s.broken] == [str(corpus / "folder" / "dog" / "broken.png")]


# source: (kind, count(), items, sha256[:16] of the keys, error positions, sha256[:16] of decode_chunk at 32,
#          items from position 3 on)
SCANS = {
    'folder': ('folder', None, 13, '6d12dd832875d7f3', [6], '0aabf3308c1e6275', 10),
    'npz/u8.npz': ('npz', 6, 6, '3b2470de79655321', [], '92080e2ed9243a4a', 3),
    'npz/f01.npz': ('npz', 5, 5, '661b965ef489ae45', [], '4d4ae27432f5ddc0', 2),
    'npz/f255.npz': ('npz', 4, 4, '9fad077c21ae0733', [], '1f435d4e654f2259', 1),
    'npz/firstkey.npz': ('npz', 3, 3, 'dbd8f131ea94a6fc', [], '71a78b2487caef73', 0),
    'cifar': ('cifar', None, 9, '86db991ef0338dd5', [], 'cd0f71acfc726d81', 6),
    'cifar100/test_batch': ('cifar', None, 3, '90aab126f2bc69cd', [], 'a7ddc4b56c386b13', 0),
    'folder/cat/shard.tar': ('tar', None, 1, '0242d5fcc84d7610', [], 'c522e5b81721691e', 0),
}


@pytest.mark.parametrize("rel", list(SCANS))
def test_scan_readers_yield_the_same_items_and_pixels(corpus, rel):
    kind, count, n, keys_digest, error_at, pixels_digest, n_from_3 = SCANS[rel]
    source = open_source(corpus / rel)
    items = list(source.items())
    assert source.kind == kind and source.count() == count and len(items) == n
    keys = [[item.path.replace(f"{corpus}/", ""), item.member] for item in items]
    assert hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16] == keys_digest
    images, errors = decode_chunk(items, 32, 10**8)
    assert [i for i, e in enumerate(errors) if e] == error_at
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == pixels_digest
    assert len(list(source.items(3))) == n_from_3


def test_load_errors_stay_user_errors(corpus, tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        load_cifar_batches(tmp_path)
    with pytest.raises(UserError, match="no CIFAR python batches"):
        load_cifar_batches(corpus / "folder" / "empty")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="no images found"):
        load_images(corpus / "folder" / "empty", 32)


def test_fortran_ordered_npz_reads_like_the_c_ordered_one(corpus, tmp_path):
    expected = load_npz(corpus / "npz/u8.npz")
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(expected.images), y=np.arange(6) * 3)
    got = load_npz(tmp_path / "f.npz")
    assert (got.images == expected.images).all() and got.labels.tolist() == expected.labels.tolist()
    rows = [item.data for item in open_source(tmp_path / "f.npz").items()]
    assert (np.stack(rows) == expected.images).all()


def test_item_labels_and_mismatched_label_counts(corpus, tmp_path):
    items = list(open_source(corpus / "npz/u8.npz").items())
    assert [item.label for item in items] == [0, 3, 6, 9, 12, 15]
    assert [item.label for item in open_source(corpus / "cifar100/test_batch").items()] == [99, 0, 42]
    assert {item.label for item in open_source(corpus / "folder").items() if not item.member} == \
        {".", "cat", "dog", "dog/sub"}
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(2))
    with pytest.raises(UserError, match="labels for only 2 of 4"):
        load_npz(tmp_path / "short.npz")


def test_load_images_reads_every_scan_source(corpus, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# two files\n" + "\n".join(str(corpus / "folder" / n) for n in FOLDER_NAMES[:2]) + "\n")
    from_list = load_images(listing, 32)
    from_folder = load_images(corpus / "folder", 32)
    assert (from_list.images == from_folder.images[:2]).all() and from_list.labels is None
    np.save(tmp_path / "a.npy", load_npz(corpus / "npz/u8.npz").images)
    assert (load_images(tmp_path / "a.npy", 20).images == load_npz(corpus / "npz/u8.npz").images).all()
    with pytest.raises(UserError, match="no such file"):
        load_images(tmp_path / "missing.npz", 32)

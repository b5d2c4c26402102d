"""`dede-rt scan` on a corpus of broken and unusual files: every input gets a row, broken ones an error.

The corpus is generated here. Tests run as root in CI, where ``chmod 000`` does
not stop reads, so "unreadable" is covered three ways: a ``chmod 000`` file
(asserted as an error only when not root), a FIFO named ``.png`` (open would
block forever; the scanner refuses non-regular files), and a file whose
``os.open`` raises ``PermissionError`` (patched, thread/inline pools only).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dede_rt.data.images import decode_image
from dede_rt.bundle import load_detector
from dede_rt.scan.pipeline import Scanner
from dede_rt.data.sources import FolderSource

SIZE = 32
pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.usefixtures("one_torch_thread")]



def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR declares ``width`` x ``height`` (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def build_corpus(root: Path, rng: np.random.Generator) -> tuple[set[str], set[str]]:
    """Write the corpus; returns (names that must decode, names that must be error rows)."""
    good, bad = set(), set()

    def add_good(name: str, image: Image.Image, **save: object) -> None:
        image.save(root / name, **save)
        good.add(name)

    add_good("rgb.png", Image.fromarray(_noise(rng, 32, 32)))
    add_good("big.jpg", Image.fromarray(_noise(rng, 256, 200)), quality=90)  # draft mode + resize
    add_good("gray.png", Image.fromarray(_noise(rng, 40, 40)[..., 0], "L"))
    add_good("rgba.png", Image.fromarray(np.dstack([_noise(rng, 32, 32), rng.integers(0, 256, (32, 32), dtype=np.uint8)]), "RGBA"))
    add_good("deep16.png", Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)))
    add_good("cmyk.jpg", Image.fromarray(_noise(rng, 48, 48)).convert("CMYK"), quality=95)
    add_good("palette.gif", Image.fromarray(_noise(rng, 32, 32)).convert("P", palette=Image.Palette.ADAPTIVE))
    add_good("plain.bmp", Image.fromarray(_noise(rng, 32, 32)))
    rotated = Image.fromarray(_noise(rng, 32, 64))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    add_good("exif_rotated.jpg", rotated, exif=exif, quality=95)
    (root / "nested").mkdir()
    add_good("nested/inner.png", Image.fromarray(_noise(rng, 32, 32)))
    add_good("vanish_neighbor.png", Image.fromarray(_noise(rng, 32, 32)))

    (root / "zero.png").write_bytes(b"")
    full_png = _png_bytes(Image.fromarray(_noise(rng, 32, 32)))
    (root / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    buffer = io.BytesIO()
    Image.fromarray(_noise(rng, 64, 64)).save(buffer, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "random.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "text.png").write_text("this is not an image\n")
    (root / "bomb_huge.png").write_bytes(_bomb_png(100_000, 100_000))  # Pillow's own hard limit
    (root / "bomb_mid.png").write_bytes(_bomb_png(10_000, 10_000))  # 100 Mpx: our max_pixels check
    os.symlink("loop.png", root / "loop.png")  # a symlink that points at itself
    os.mkfifo(root / "fifo.png")
    (root / "denied.png").write_bytes(_png_bytes(Image.fromarray(_noise(rng, 32, 32))))  # open() patched to fail
    (root / "vanish.png").write_bytes(_png_bytes(Image.fromarray(_noise(rng, 32, 32))))  # deleted after discovery
    bad |= {"zero.png", "truncated.png", "truncated.jpg", "random.jpg", "text.png", "bomb_huge.png", "bomb_mid.png",
            "loop.png", "fifo.png", "denied.png", "vanish.png"}
    (root / "noperm.png").write_bytes(_png_bytes(Image.fromarray(_noise(rng, 32, 32))))
    os.chmod(root / "noperm.png", 0)
    (good if os.geteuid() == 0 else bad).add("noperm.png")  # root reads it anyway

    (root / ".hidden.png").write_bytes(full_png)  # hidden: not scanned
    (root / "notes.txt").write_text("not an image extension: not scanned\n")
    os.symlink("..", root / "nested" / "back")  # a directory symlink loop: must not trap the walk
    return good, bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], set[str]]:
    root = tmp_path_factory.mktemp("corpus")
    good, bad = build_corpus(root, np.random.default_rng(7))
    return root, good, bad


def _items_with_vanishing(root: Path):
    """The folder's items; ``vanish.png`` is deleted right after discovery, before any worker opens it."""
    for item in FolderSource(root).items():
        if item.path.endswith("vanish.png") and os.path.exists(item.path):
            os.remove(item.path)
        yield item


@pytest.mark.parametrize("workers,pool", [(0, "thread"), (2, "thread")])
def test_corpus_rows_errors_and_scores(corpus, tiny_detector_dir, monkeypatch, workers, pool):
    root, good, bad = corpus
    vanish = root / "vanish.png"
    if not vanish.exists():  # the other parametrization deleted it
        vanish.write_bytes(_png_bytes(Image.fromarray(np.zeros((32, 32, 3), np.uint8))))
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        if str(path).endswith("denied.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    with Scanner(tiny_detector_dir, backend="torch", batch_size=4, workers=workers, pool=pool) as scanner:
        rows = [r for batch in scanner.batches(_items_with_vanishing(root)) for r in batch]
    monkeypatch.undo()

    names = [str(Path(r.path).relative_to(root)) for r in rows]
    assert len(names) == len(set(names)) == len(good | bad)  # one row per input, hidden/.txt skipped, no loop
    assert set(names) == good | bad
    assert [r.index for r in rows] == list(range(len(rows)))
    by_name = dict(zip(names, rows))
    for name in bad:
        row = by_name[name]
        assert row.error and row.score is None and row.flagged is None, (name, row)
    assert "exceeds" in by_name["bomb_mid.png"].error and "Bomb" in by_name["bomb_huge.png"].error
    assert "regular file" in by_name["fifo.png"].error
    assert "Permission" in by_name["denied.png"].error
    assert "FileNotFound" in by_name["vanish.png"].error

    detector = load_detector(tiny_detector_dir)
    ordered = sorted(good)
    arrays = np.stack([decode_image(root / n, SIZE) for n in ordered])
    expected = detector.score(arrays)
    got = np.array([by_name[n].score for n in ordered], np.float32)
    assert all(by_name[n].error is None for n in ordered)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    flags = [by_name[n].flagged for n in ordered]
    assert flags == [bool(s > scanner.threshold) for s in got]


def test_unusual_modes_convert_correctly(corpus):
    root, _, _ = corpus
    deep = decode_image(root / "deep16.png", SIZE)
    source = np.arange(32 * 32).reshape(32, 32) * 64
    np.testing.assert_allclose(deep[..., 0], source / 65535 * 255, atol=1.0)  # 16-bit scaled, not clipped
    assert (deep[..., 0] == deep[..., 1]).all()
    with Image.open(root / "exif_rotated.jpg") as raw:
        assert raw.size == (64, 32)
    rgba = decode_image(root / "rgba.png", SIZE)
    assert rgba.shape == (SIZE, SIZE, 3) and rgba.dtype == np.uint8
    # EXIF orientation applied: a 64 wide x 32 high image displayed rotated is 32 x 64, then resized square.
    with Image.open(root / "exif_rotated.jpg") as raw:
        from PIL import ImageOps

        upright = ImageOps.exif_transpose(raw)
        assert upright.size == (32, 64)


def test_process_pool_matches_thread_pool(corpus, tiny_detector_dir):
    root, good, _ = corpus
    files = [root / n for n in sorted(good) if n != "noperm.png"][:6] + [root / "zero.png", root / "fifo.png"]
    listing = root.parent / "list.txt"
    listing.write_text("\n".join(str(f) for f in files) + "\n")
    from dede_rt.scan import scan

    threads = list(scan(listing, tiny_detector_dir, backend="torch", batch_size=3, workers=2, pool="thread"))
    procs = list(scan(listing, tiny_detector_dir, backend="torch", batch_size=3, workers=2, pool="process"))
    assert [(r.path, r.score, r.error is None) for r in threads] == [(r.path, r.score, r.error is None) for r in procs]
    assert [r.error is None for r in procs] == [True] * 6 + [False, False]

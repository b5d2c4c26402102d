"""Image sources: streamed readers for scanning, and in-memory ``ImageSet`` collectors over the same readers.

Readers (``open_source``) cover folders, path lists, NPZ/NPY arrays, CIFAR python
batches and WebDataset tar shards. Every reader yields ``Item``s one at a time in
a deterministic order; none holds a full listing in memory (folders are walked
one directory at a time, tar shards are read as streams, NPZ arrays row-chunk by
row-chunk). An item is either a path to read later (in a decode worker), the raw
bytes of a tar member, or an already decoded uint8 HWC array, with the label the
format carries (class sub-folder, CIFAR label, NPZ ``labels``) where it has one.
The loaders (``load_images`` and friends) decode a reader's items and stack them.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from dede_rt.data.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, TRAIN_EXTENSIONS, Resize, decode_image,
                                 iter_image_files, open_regular, resize_array)
from dede_rt.errors import UserError

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
NPZ_CHUNK_ROWS = 256
NPZ_IMAGE_KEYS = ("x", "images", "data", "arr_0")  # the first present is the image array, else the first array
NPZ_LABEL_KEYS = ("y", "labels", "targets")


@dataclass(frozen=True)
class Item:
    """One scan input: ``path`` (file, shard or array file), ``member`` (tar member / array index), payload."""

    path: str
    member: str = ""
    data: bytes | np.ndarray | None = None  # None: read ``path`` from disk in the worker
    error: str | None = None  # discovery already failed (e.g. a corrupt shard): reported as is
    label: int | str | None = None  # class index (CIFAR, NPZ labels) or class name (a folder's sub-folder)

    @property
    def key(self) -> tuple[str, str]:
        """The row identity written to the output: (path, member)."""
        return self.path, self.member


class Source:
    """A streamed, deterministic sequence of scan inputs."""

    kind = "source"

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def items(self, start: int = 0) -> Iterator[Item]:
        """Items from position ``start`` on (sources skip cheaply where they can)."""
        return itertools.islice(self._items(), start, None)

    def _items(self) -> Iterator[Item]:
        raise NotImplementedError

    def count(self) -> int | None:
        """Number of items if it can be found without decoding anything (may take a while); else None."""
        return None

    def describe(self) -> str:
        """One-line description for logs and the summary."""
        return f"{self.kind} {self.path}"


class FolderSource(Source):
    """Image files under a folder, recursively, sorted, hidden entries skipped; ``.tar`` shards inside are expanded.

    Each file's label is its sub-folder relative to the root (``"."`` at the root).
    """

    kind = "folder"

    def __init__(self, path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                 shards: tuple[str, ...] = TAR_EXTENSIONS) -> None:
        super().__init__(path)
        self.extensions, self.shards = extensions, shards

    def _items(self) -> Iterator[Item]:
        parent, label = None, ""
        for path in iter_image_files(self.path, self.extensions + self.shards):
            text = str(path)
            if self.shards and text.lower().endswith(self.shards):
                yield from TarSource(path)._items()
                continue
            folder = text.rpartition(os.sep)[0]
            if folder != parent:  # files come folder by folder: one relative_to per folder, not per file
                parent, label = folder, str(path.parent.relative_to(self.path))
            yield Item(text, label=label)

    def count(self) -> int | None:
        total = 0
        for path in iter_image_files(self.path, self.extensions + self.shards):
            if self.shards and str(path).lower().endswith(self.shards):
                return None  # counting tar members means reading the shards
            total += 1
        return total


class PathListSource(Source):
    """A text file with one image path per line (relative to the list's folder); blank and ``#`` lines skipped."""

    kind = "path-list"

    def _lines(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                line = line.rstrip("\r\n")
                if line.strip() and not line.lstrip().startswith("#"):
                    yield line

    def _items(self) -> Iterator[Item]:
        base = self.path.parent
        for line in self._lines():
            path = Path(line)
            yield Item(str(path if path.is_absolute() else base / path))

    def count(self) -> int | None:
        return sum(1 for _ in self._lines())


class TarSource(Source):
    """WebDataset-style ``.tar`` shards read as streams (stdlib tarfile); image members in archive order."""

    kind = "tar"

    def __init__(self, path: Path, shards: list[Path] | None = None) -> None:
        super().__init__(path)
        self.shards = shards or [path]

    def items(self, start: int = 0) -> Iterator[Item]:
        return self._items(start)

    def _items(self, start: int = 0) -> Iterator[Item]:
        position = 0
        for shard in self.shards:
            try:
                archive = tarfile.open(shard, mode="r|*")  # stream mode: no member index in memory
            except (OSError, EOFError, tarfile.TarError) as exc:  # a broken shard is one error row, not the end
                if position >= start:
                    yield Item(str(shard), "", error=f"not a readable tar shard: {type(exc).__name__}: {exc}")
                position += 1
                continue
            with archive:
                members = iter(archive)
                while True:
                    try:
                        member = next(members)
                        if position >= start and _wanted(member):
                            handle = archive.extractfile(member)
                            data = handle.read() if handle else b""
                    except StopIteration:
                        torn = _missing_end_marker(shard, archive)
                        if torn and position >= start:
                            yield Item(str(shard), "", error=torn)
                        position += bool(torn)
                        break
                    except (OSError, EOFError, tarfile.TarError) as exc:  # a torn shard: one error row, next shard
                        if position >= start:
                            yield Item(str(shard), "", error=f"corrupt tar shard: {type(exc).__name__}: {exc}")
                        position += 1
                        break
                    if not _wanted(member):
                        continue  # WebDataset shards also hold .cls/.json/... members
                    if position >= start:
                        yield Item(str(shard), member.name, data)
                    position += 1

    def describe(self) -> str:
        return f"tar {self.shards[0]}" + (f" (+{len(self.shards) - 1} shards)" if len(self.shards) > 1 else "")


class NpzSource(Source):
    """uint8/float image arrays (NHWC or NCHW) in ``.npz``/``.npy``, read in row chunks from the zip stream."""

    kind = "npz"

    def _open(self) -> tuple[zipfile.ZipFile | None, object, tuple, np.dtype, bool]:
        if self.path.suffix == ".npy":
            fh = open(self.path, "rb")
            archive = None
        else:
            archive = self._archive()
            key = npz_image_key(self._arrays(archive))
            if key is None:
                archive.close()
                raise UserError(f"{self.path}: empty .npz file")
            fh = archive.open(key + ".npy")
        try:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(fh)
        except ValueError as exc:
            fh.close()
            raise UserError(f"{self.path}: not a readable .npz file ({exc})") from None
        if dtype.hasobject or len(shape) != 4 or 3 not in (shape[1], shape[3]):
            fh.close()
            raise UserError(f"{self.path}: expected an image array [N, H, W, 3] or [N, 3, H, W], "
                            f"got {dtype} {list(shape)}")
        return archive, fh, shape, dtype, fortran

    def _archive(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise UserError(f"{self.path}: not a readable .npz file ({exc})") from None

    @staticmethod
    def _arrays(archive: zipfile.ZipFile) -> list[str]:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]

    def labels(self) -> np.ndarray | None:
        """The int64 label array (``y``/``labels``/``targets``) when the .npz has one."""
        if self.path.suffix == ".npy":
            return None
        with self._archive() as archive:
            key = next((k for k in NPZ_LABEL_KEYS if k in self._arrays(archive)), None)
            if key is None:
                return None
            with archive.open(key + ".npy") as fh:
                try:
                    return np.asarray(np.lib.format.read_array(fh, allow_pickle=False), dtype=np.int64)
                except ValueError as exc:
                    raise UserError(f"{self.path}: unreadable labels {key!r} ({exc})") from None

    def _rows(self) -> Iterator[np.ndarray]:
        archive, fh, shape, dtype, fortran = self._open()
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        try:
            if fortran:  # column-major data has no contiguous rows: read it whole, then chunk it
                data = fh.read(shape[0] * row_bytes)
                if len(data) != shape[0] * row_bytes:
                    raise UserError(f"{self.path}: truncated array data")
                whole = np.frombuffer(data, dtype).reshape(shape[::-1]).T
                for start in range(0, shape[0], NPZ_CHUNK_ROWS):
                    yield np.ascontiguousarray(whole[start:start + NPZ_CHUNK_ROWS])
                return
            for start in range(0, shape[0], NPZ_CHUNK_ROWS):
                n = min(NPZ_CHUNK_ROWS, shape[0] - start)
                data = fh.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise UserError(f"{self.path}: truncated array data")
                yield np.frombuffer(data, dtype).reshape((n, *shape[1:]))
        finally:
            fh.close()
            if archive is not None:
                archive.close()

    def _items(self) -> Iterator[Item]:
        archive, fh, shape, dtype, _ = self._open()
        fh.close()
        if archive is not None:
            archive.close()
        scale = 1.0 if dtype == np.uint8 else float_scale(max((float(c.max()) for c in self._rows()), default=0.0))
        nchw = shape[1] == 3 and shape[3] != 3
        labels = self.labels()
        index = 0
        for chunk in self._rows():
            if nchw:
                chunk = chunk.transpose(0, 2, 3, 1)
            chunk = to_uint8(chunk, scale)
            for row in chunk:
                label = int(labels[index]) if labels is not None and index < len(labels) else None
                yield Item(str(self.path), str(index), np.ascontiguousarray(row), label=label)
                index += 1

    def count(self) -> int | None:
        archive, fh, shape, _, _ = self._open()
        fh.close()
        if archive is not None:
            archive.close()
        return int(shape[0])


class CifarSource(Source):
    """CIFAR-10/100 python batches: one ``data_batch_*``/``test_batch`` file or their folder, one file at a time."""

    kind = "cifar"

    def files(self) -> list[Path]:
        """The batch files in read order: ``data_batch_*`` sorted, then ``test_batch``."""
        if self.path.is_dir():
            return sorted(self.path.glob("data_batch_*")) + sorted(self.path.glob("test_batch"))
        return [self.path]

    def _items(self) -> Iterator[Item]:
        for file in self.files():
            try:
                with open(file, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                label_key = next((k for k in (b"labels", b"fine_labels") if k in batch), None)  # CIFAR-10, -100
                labels = None if label_key is None else np.asarray(batch[label_key], dtype=np.int64)
            except Exception as exc:  # a broken batch file is one error row, not the end of the scan
                yield Item(str(file), "", error=f"not a CIFAR python batch: {type(exc).__name__}: {exc}")
                continue
            for index, image in enumerate(images):
                label = int(labels[index]) if labels is not None and index < len(labels) else None
                yield Item(str(file), str(index), np.ascontiguousarray(image), label=label)


class SingleFileSource(Source):
    """One image file."""

    kind = "file"

    def _items(self) -> Iterator[Item]:
        yield Item(str(self.path))

    def count(self) -> int | None:
        return 1


def _missing_end_marker(shard: Path, archive: tarfile.TarFile) -> str | None:
    """tarfile ends a stream silently at a torn header; a plain .tar must end in a zero block there."""
    if not shard.name.lower().endswith(".tar"):
        return None  # compressed streams fail loudly (EOFError) when torn
    with open(shard, "rb") as fh:
        fh.seek(archive.offset)
        block = fh.read(tarfile.BLOCKSIZE)
    if block == b"\0" * tarfile.BLOCKSIZE:
        return None
    return f"truncated tar shard: no end-of-archive marker at byte {archive.offset}"


def _wanted(member: tarfile.TarInfo) -> bool:
    name = member.name
    return member.isfile() and not Path(name).name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """Expand WebDataset-style numeric ranges: ``shard-{000..009}.tar`` -> 10 names (zero padding kept)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for i in range(int(lo), int(hi) + 1) for name in expand_braces(f"{head}{i:0{width}d}{tail}")]


def npz_image_key(names: list[str]) -> str | None:
    """Which array of an .npz holds the images: the first of ``NPZ_IMAGE_KEYS`` present, else the first array."""
    return next((k for k in NPZ_IMAGE_KEYS if k in names), names[0] if names else None)


def float_scale(peak: float) -> float:
    """The factor that brings non-uint8 pixels to [0, 255]: arrays whose maximum is <= 1 are taken as [0, 1]."""
    return 255.0 if peak <= 1.0 else 1.0


def to_uint8(images: np.ndarray, scale: float) -> np.ndarray:
    """Pixels as uint8: scaled, rounded half up and clipped (uint8 input returned as is)."""
    if images.dtype == np.uint8:
        return images
    return np.clip(images * scale + 0.5, 0, 255).astype(np.uint8)


def open_source(source: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                shards: tuple[str, ...] = TAR_EXTENSIONS) -> Source:
    """Pick the source type for ``source``: folder, path list, .npz/.npy, CIFAR batch(es), .tar shard(s), image.

    ``extensions`` and ``shards`` are the file endings a folder source reads (training reads fewer formats).
    """
    text = str(source)
    if re.search(r"\{\d+\.\.\d+\}", text):
        names = [Path(s) for s in expand_braces(text)]
        missing = [s for s in names if not s.is_file()]
        if missing:
            raise UserError(f"{missing[0]}: no such shard ({len(missing)} of {len(names)} missing)")
        return TarSource(names[0], names)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        if any(path.glob("data_batch_*")) or (path / "test_batch").is_file():
            return CifarSource(path)
        return FolderSource(path, extensions, shards)
    if name.endswith(TAR_EXTENSIONS):
        return TarSource(path)
    if name.endswith((".npz", ".npy")):
        return NpzSource(path)
    if name.startswith(("data_batch", "test_batch")):
        return CifarSource(path)
    if name.endswith(LIST_EXTENSIONS):
        return PathListSource(path)
    if name.endswith(IMAGE_EXTENSIONS):
        return SingleFileSource(path)
    raise UserError(f"{path}: unknown source type (expected a folder, a .txt path list, .npz/.npy, "
                    f"CIFAR batches, .tar shards or an image)")


def decode_item(item: Item, size: int | Resize, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [s, s, 3] for one item (path, bytes or array) by the ``size`` rule; raises on any broken input."""
    if item.error is not None:
        raise ValueError(item.error)
    if isinstance(item.data, np.ndarray):
        return resize_array(item.data, size)  # the resize used for in-memory training sets
    try:
        if item.data is not None:
            if not item.data:
                raise ValueError("empty file")
            return decode_image(io.BytesIO(item.data), size, max_pixels)
        with open_regular(item.path) as fh:
            return decode_image(fh, size, max_pixels)
    except UnidentifiedImageError:
        raise UnidentifiedImageError("not an image in a format Pillow recognizes") from None


# ---- in memory: the loaders collect a reader's items into one array ----


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


def _item_name(source: Source, item: Item, position: int) -> str:
    """A folder file's path below the folder, ``#i`` for array rows, else the path (and tar member)."""
    if isinstance(item.data, np.ndarray):
        return f"#{position}"
    if isinstance(source, FolderSource) and not item.member:
        return str(Path(item.path).relative_to(source.path))
    return f"{item.path}:{item.member}" if item.member else item.path


def collect(source: Source, size: int | Resize | None, labels: bool = True) -> ImageSet:
    """Decode every item of ``source`` into one ImageSet (``size`` None: arrays as stored).

    A failed discovery (a corrupt batch or shard) is a UserError; a file that does not
    decode is skipped and listed in ``.broken``. Labels come from the items when all
    have one: integer labels as they are, class names as indices into sorted ``classes``.
    """
    images: list[np.ndarray] = []
    names: list[str] = []
    found: list[int | str | None] = []
    broken: list[str] = []
    seen = 0
    for item in source.items():
        seen += 1
        if item.error is not None:
            raise UserError(f"{item.path}: {item.error}")
        try:
            image = item.data if size is None and isinstance(item.data, np.ndarray) else decode_item(item, size, None)
        except Exception as exc:  # a broken file is reported, not fatal
            broken.append(f"{item.path}: {exc}")
            continue
        names.append(_item_name(source, item, len(images)))
        images.append(image)
        found.append(item.label)
    if not seen:
        looked = f" (looked for {', '.join(source.extensions)})" if isinstance(source, FolderSource) else ""
        raise UserError(f"{source.path}: no images found{looked}")
    if not images:
        raise UserError(f"{source.path}: none of {seen} images could be decoded (first: {broken[0]})")
    label_array, classes = _labels(found if labels else [], source)
    result = ImageSet(np.stack(images), label_array, names, classes)
    result.broken = broken  # type: ignore[attr-defined]
    return result


def _labels(found: list[int | str | None], source: Source) -> tuple[np.ndarray | None, list[str]]:
    """(int64 labels, class names) from the items' labels; (None, []) when the items carry none."""
    known = [label for label in found if label is not None]
    if not known:
        return None, []
    if len(known) != len(found):
        raise UserError(f"{source.path}: labels for only {len(known)} of {len(found)} images")
    if all(isinstance(label, str) for label in known):
        classes = sorted(set(known))
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[label] for label in known], dtype=np.int64), classes
    return np.array(known, dtype=np.int64), []


def load_image_folder(root: str | Path, size: int, labels_from_parent: bool = False) -> ImageSet:
    """Decode every image under ``root`` (recursive); labels from the parent folder name when asked."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    return collect(FolderSource(root, TRAIN_EXTENSIONS, shards=()), size, labels=labels_from_parent)


def load_cifar_batches(path: str | Path) -> ImageSet:
    """Read CIFAR-10/100 python pickles: one ``data_batch_*``/``test_batch`` file or their directory."""
    source = CifarSource(Path(path))
    if not source.files():
        raise UserError(f"{path}: no CIFAR python batches (data_batch_*, test_batch) found")
    return collect(source, None)


def load_npz(path: str | Path, size: int | None = None) -> ImageSet:
    """Read images (uint8 NHWC or NCHW; key ``x``/``images``/``data``/first) and labels (``y``/``labels``)."""
    return collect(NpzSource(Path(path)), size)


def load_images(path: str | Path, size: int | Resize, labels_from_parent: bool = False) -> ImageSet:
    """Load any source ``open_source`` reads (folder, CIFAR batches, .npz, path list, shards) as one ImageSet.

    Folder labels (the sub-folder) are kept only with ``labels_from_parent``; CIFAR and NPZ labels always.
    """
    # Training reads the common formats only and does not expand .tar shards inside a folder.
    source = open_source(path, TRAIN_EXTENSIONS, shards=())
    return collect(source, size, labels=labels_from_parent or not isinstance(source, FolderSource))


def resize_set(images: ImageSet, size: int) -> ImageSet:
    """Resize an in-memory ImageSet to ``size`` x ``size`` (returned as is when it already fits)."""
    if images.images.shape[1:3] == (size, size):
        return images
    resized = np.stack([resize_array(im, size) for im in images.images])
    return ImageSet(resized, images.labels, images.names, images.classes)

"""Streamed discovery of scan inputs: folders, path lists, NPZ arrays, CIFAR batches, WebDataset tar shards.

Every source yields ``Item``s one at a time in a deterministic order; none
holds a full listing in memory (folders are walked one directory at a time,
tar shards are read as streams, NPZ arrays row-chunk by row-chunk). An item
is either a path to read later (in a decode worker), the raw bytes of a tar
member, or an already decoded uint8 HWC array.
"""

from __future__ import annotations

import itertools
import pickle
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dede_rt.data.images import IMAGE_EXTENSIONS, iter_image_files
from dede_rt.errors import UserError

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
NPZ_CHUNK_ROWS = 256


@dataclass(frozen=True)
class Item:
    """One scan input: ``path`` (file, shard or array file), ``member`` (tar member / array index), payload."""

    path: str
    member: str = ""
    data: bytes | np.ndarray | None = None  # None: read ``path`` from disk in the worker
    error: str | None = None  # discovery already failed (e.g. a corrupt shard): reported as is

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
    """Image files under a folder, recursively, sorted, hidden entries skipped; ``.tar`` shards inside are expanded."""

    kind = "folder"

    def _items(self) -> Iterator[Item]:
        for path in iter_image_files(self.path, IMAGE_EXTENSIONS + TAR_EXTENSIONS):
            if str(path).lower().endswith(TAR_EXTENSIONS):
                yield from TarSource(path)._items()
            else:
                yield Item(str(path))

    def count(self) -> int | None:
        total = 0
        for path in iter_image_files(self.path, IMAGE_EXTENSIONS + TAR_EXTENSIONS):
            if str(path).lower().endswith(TAR_EXTENSIONS):
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

    def _open(self) -> tuple[zipfile.ZipFile | None, object, tuple, np.dtype]:
        if self.path.suffix == ".npy":
            fh = open(self.path, "rb")
            archive = None
        else:
            try:
                archive = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise UserError(f"{self.path}: not a readable .npz file ({exc})") from None
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            key = next((k for k in ("x", "images", "data", "arr_0") if k in names), names[0] if names else None)
            if key is None:
                raise UserError(f"{self.path}: empty .npz file")
            fh = archive.open(key + ".npy")
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
        if fortran or dtype.hasobject or len(shape) != 4 or 3 not in (shape[1], shape[3]):
            raise UserError(f"{self.path}: expected a C-ordered image array [N, H, W, 3] or [N, 3, H, W], "
                            f"got {dtype} {list(shape)}{' (Fortran order)' if fortran else ''}")
        return archive, fh, shape, dtype

    def _rows(self) -> Iterator[np.ndarray]:
        archive, fh, shape, dtype = self._open()
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        try:
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

    def _scale(self, dtype: np.dtype) -> float:
        if dtype == np.uint8:
            return 1.0
        # Same rule as dede_rt.data.sources.load_npz: floats in [0, 1] are scaled to [0, 255].
        peak = max((float(chunk.max()) for chunk in self._rows()), default=0.0)
        return 255.0 if peak <= 1.0 else 1.0

    def _items(self) -> Iterator[Item]:
        _, fh, shape, dtype = self._open()
        fh.close()
        scale = self._scale(dtype)
        nchw = shape[1] == 3 and shape[3] != 3
        index = 0
        for chunk in self._rows():
            if nchw:
                chunk = chunk.transpose(0, 2, 3, 1)
            if dtype != np.uint8:
                chunk = np.clip(chunk * scale + 0.5, 0, 255).astype(np.uint8)
            for row in chunk:
                yield Item(str(self.path), str(index), np.ascontiguousarray(row))
                index += 1

    def count(self) -> int | None:
        archive, fh, shape, _ = self._open()
        fh.close()
        if archive is not None:
            archive.close()
        return int(shape[0])


class CifarSource(Source):
    """CIFAR-10/100 python batches: one ``data_batch_*``/``test_batch`` file or their folder, one file at a time."""

    kind = "cifar"

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(self.path.glob("data_batch_*")) + sorted(self.path.glob("test_batch"))
        return [self.path]

    def _items(self) -> Iterator[Item]:
        for file in self._files():
            try:
                with open(file, "rb") as fh:
                    data = np.asarray(pickle.load(fh, encoding="bytes")[b"data"], dtype=np.uint8)
                images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            except Exception as exc:  # a broken batch file is one error row, not the end of the scan
                yield Item(str(file), "", error=f"not a CIFAR python batch: {type(exc).__name__}: {exc}")
                continue
            for index, image in enumerate(images):
                yield Item(str(file), str(index), np.ascontiguousarray(image))


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


def open_source(source: str | Path) -> Source:
    """Pick the source type for ``source``: folder, path list, .npz/.npy, CIFAR batch(es), .tar shard(s), image."""
    text = str(source)
    if re.search(r"\{\d+\.\.\d+\}", text):
        shards = [Path(s) for s in expand_braces(text)]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{missing[0]}: no such shard ({len(missing)} of {len(shards)} missing)")
        return TarSource(shards[0], shards)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        if any(path.glob("data_batch_*")) or (path / "test_batch").is_file():
            return CifarSource(path)
        return FolderSource(path)
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

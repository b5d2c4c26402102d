"""Deterministic partitions of a scan input, for the distributed scan (no Ray here: importable and testable alone).

The driver *plans*: it lists the source once, streaming, and cuts it into
numbered partitions — runs of ``partition_size`` image paths (their paths go
to a JSON-lines listing file in the output, so the driver never holds them),
one WebDataset shard, one Parquet row group or one Arrow IPC file. A worker
*reads* a partition back into the same ``Item``s the local scan would see, so
the same ``decode_chunk`` turns them into images or error rows.

Each partition's rows land in parts ``part-PPPPPPPP-CCCCC[-last].parquet``
(chunk ``C`` of partition ``P``; the last chunk says so in its name). A part
is written atomically, so a partition is complete exactly when its chunks
``0..L`` are all present, readable and ``L`` is marked last; anything else is
redone from scratch on resume. Paths may be local or any pyarrow filesystem
URI (``s3://``, ``gs://``, ``file://``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from dede_rt.data.images import IMAGE_EXTENSIONS, iter_image_files
from dede_rt.data.sources import LIST_EXTENSIONS, TAR_EXTENSIONS, Item, PathListSource, TarSource, expand_braces
from dede_rt.errors import UserError

TABLE_EXTENSIONS = (".parquet", ".arrow", ".feather", ".ipc")
IMAGE_COLUMNS = ("image", "img", "image_bytes", "bytes", "jpg", "jpeg", "png", "webp")
LISTING = "_listing.jsonl"
STATE = "_scan.json"
PART_RE = re.compile(r"^part-(\d{8})-(\d{5})(-last)?\.parquet$")
REMOTE_READ_THREADS = 16  # object stores: latency-bound reads, overlapped within a decode task


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (a pyarrow filesystem), False for a local path."""
    return "://" in path


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or URI."""
    from pyarrow import fs

    if is_uri(uri):
        scheme, rest = uri.split("://", 1)
        if scheme in ("s3", "gs", "gcs", "file") and "?" not in uri:
            # One filesystem per bucket and process: building an S3/GCS client per file costs a round trip.
            return _bucket_fs(f"{scheme}://{rest.split('/', 1)[0]}"), rest
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(uri)


@functools.lru_cache(maxsize=64)
def _bucket_fs(root: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(root if not root.startswith("file://") else "file:///")[0]


def join(base: str, name: str) -> str:
    """``base/name`` for a local path or URI."""
    return base.rstrip("/") + "/" + name if is_uri(base) else str(Path(base) / name)


@dataclass(frozen=True)
class Partition:
    """One unit of work: ``kind`` lines (``count`` listing lines from byte ``offset``), tar, parquet, arrow."""

    partition: int
    kind: str
    uri: str
    offset: int = 0  # lines: byte offset in the listing; parquet: row group; arrow: unused
    count: int | None = None  # inputs in the partition when known before reading it (tar: None)
    first_row: int = 0  # table partitions: row number of the first row within the file
    column: str = ""  # table partitions: the image-bytes column ("col" or "col.bytes" for a struct)
    nbytes: int = 0  # lines: bytes of the listing the partition spans

    def as_dict(self) -> dict:
        """Plain dict (a Ray Data row, a JSON entry)."""
        return asdict(self)


def part_name(partition: int, chunk: int, last: bool) -> str:
    """The deterministic file name of chunk ``chunk`` of ``partition``."""
    return f"part-{partition:08d}-{chunk:05d}{'-last' if last else ''}.parquet"


# ---- planning (driver) ----


class _ListingWriter:
    """Streams image paths as JSON lines to the listing, cutting a partition every ``size`` paths."""

    def __init__(self, uri: str, size: int, partitions: list[Partition], write_to: str | None = None) -> None:
        fs, path = filesystem(write_to or uri)
        if not is_uri(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.uri, self.size, self.partitions = uri, size, partitions  # partitions name ``uri``, the final place
        self.stream = fs.open_output_stream(path)
        self.sha = hashlib.sha256()
        self.offset = self.start = self.pending = 0

    def add(self, path: str) -> None:
        line = (json.dumps(path) + "\n").encode("utf-8", errors="surrogateescape")
        self.stream.write(line)
        self.sha.update(line)
        self.offset += len(line)
        self.pending += 1
        if self.pending == self.size:
            self.flush()

    def flush(self) -> None:
        """Close the current run of paths as a partition (before a shard, at the end)."""
        if self.pending:
            self.partitions.append(Partition(len(self.partitions), "lines", self.uri, self.start, self.pending,
                                             nbytes=self.offset - self.start))
        self.start, self.pending = self.offset, 0

    def close(self) -> str:
        self.flush()
        self.stream.close()
        return self.sha.hexdigest()


def _table_partitions(files: list[str], column: str | None, partitions: list[Partition]) -> None:
    """One partition per Parquet row group / Arrow IPC file; checks each file has an image-bytes column."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    for uri in files:
        fs, path = filesystem(uri)
        try:
            if uri.lower().endswith(".parquet"):
                with fs.open_input_file(path) as fh:
                    meta = pq.ParquetFile(fh).metadata
                    schema = meta.schema.to_arrow_schema()
                col = image_column(schema, column, uri)
                row = 0
                for rg in range(meta.num_row_groups):
                    n = meta.row_group(rg).num_rows
                    partitions.append(Partition(len(partitions), "parquet", uri, rg, n, row, col))
                    row += n
            else:
                with fs.open_input_file(path) as fh:
                    reader = ipc.open_file(fh)
                    col = image_column(reader.schema, column, uri)
                    n = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                partitions.append(Partition(len(partitions), "arrow", uri, 0, n, 0, col))
        except UserError:
            raise
        except Exception as exc:  # not a table we can read: say which file, not a traceback
            raise UserError(f"{uri}: not a readable {Path(path).suffix} table ({type(exc).__name__}: {exc})") from None


def image_column(schema, wanted: str | None, where: str) -> str:
    """The image-bytes column of a table: ``wanted``, else a binary column named like an image, else the only one.

    A struct column with a binary ``bytes`` field (Hugging Face ``Image`` feature) counts as ``col.bytes``.
    """
    import pyarrow as pa

    def kind(field) -> str | None:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field.name
        if pa.types.is_struct(field.type):
            sub = next((f for f in field.type if f.name == "bytes"), None)
            if sub is not None and (pa.types.is_binary(sub.type) or pa.types.is_large_binary(sub.type)):
                return f"{field.name}.bytes"
        return None

    candidates = {f.name: kind(f) for f in schema}
    if wanted:
        if candidates.get(wanted) is None:
            raise UserError(f"{where}: no binary image column {wanted!r} (columns: {', '.join(schema.names)})")
        return candidates[wanted]  # type: ignore[return-value]
    binary = [c for c in candidates.values() if c]
    named = [c for c in binary if c.split(".")[0].lower() in IMAGE_COLUMNS]
    if named:
        return named[0]
    if len(binary) == 1:
        return binary[0]
    raise UserError(f"{where}: cannot tell the image-bytes column among {', '.join(schema.names)} "
                    f"(name it with image_column=...)")


def _remote_files(uri: str) -> list[str]:
    """Sorted file URIs below a remote folder (pyarrow lists recursively), hidden entries skipped."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    scheme = uri.split("://", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    return [f"{scheme}://{n}" for n in names
            if not any(part.startswith(".") for part in n[len(path):].split("/") if part)]


def _remote_lines(uri: str) -> Iterator[str]:
    """Paths listed in a remote path-list file, relative ones resolved against its folder."""
    fs, path = filesystem(uri)
    base = uri.rsplit("/", 1)[0]
    with fs.open_input_stream(path) as fh:
        for raw in _iter_lines(fh):
            line = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
            if line.strip() and not line.lstrip().startswith("#"):
                yield line if is_uri(line) or line.startswith("/") else f"{base}/{line}"


def _iter_lines(stream, block: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a pyarrow input stream, read in blocks (flat memory whatever the file size)."""
    rest = b""
    while True:
        data = stream.read(block)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def plan(source: str, out: str, partition_size: int, image_column_name: str | None = None,
         listing_to: str | None = None) -> tuple[str, list[Partition], str]:
    """(source kind, partitions, plan sha256) for ``source``; image paths streamed to the listing ``out/_listing.jsonl``.

    ``listing_to``: write the listing there instead (resume compares before
    replacing). The sha covers the listing and the partition table: equal
    shas mean the same inputs cut the same way (what resume relies on).
    """
    if partition_size < 1:
        raise UserError(f"partition size must be >= 1, got {partition_size}")
    partitions: list[Partition] = []
    listing_uri = join(out, LISTING)
    writer: _ListingWriter | None = None

    def lines() -> _ListingWriter:
        nonlocal writer
        if writer is None:
            writer = _ListingWriter(listing_uri, partition_size, partitions, listing_to)
        return writer

    def shard(uri: str) -> None:
        if writer is not None:
            writer.flush()
        partitions.append(Partition(len(partitions), "tar", uri))

    text = str(source)
    kind = "folder"
    if re.search(r"\{\d+\.\.\d+\}", text):
        kind = "tar"
        names = expand_braces(text)
        if not is_uri(text):
            missing = [s for s in names if not Path(s).is_file()]
            if missing:
                raise UserError(f"{missing[0]}: no such shard ({len(missing)} of {len(names)} missing)")
            names = [os.path.abspath(s) for s in names]
        for name in names:
            shard(name)
    elif is_uri(text):
        from pyarrow import fs as pafs

        fs, path = filesystem(text)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{text}: no such file or directory")
        files = _remote_files(text) if info.type == pafs.FileType.Directory else [text]
        tables = [f for f in files if f.lower().endswith(TABLE_EXTENSIONS)]
        if tables:
            kind = "table"
            _table_partitions(tables, image_column_name, partitions)
        elif info.type == pafs.FileType.File and text.lower().endswith(LIST_EXTENSIONS):
            kind = "path-list"
            for p in _remote_lines(text):
                lines().add(p)
        else:
            kind = "folder" if info.type == pafs.FileType.Directory else "file"
            for f in files:
                if f.lower().endswith(TAR_EXTENSIONS):
                    shard(f)
                elif f.lower().endswith(IMAGE_EXTENSIONS):
                    lines().add(f)
    else:
        path = Path(text).absolute()
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        name = path.name.lower()
        top_tables = path.is_dir() and any(e.name.lower().endswith(TABLE_EXTENSIONS) for e in os.scandir(path))
        if name.endswith(TABLE_EXTENSIONS) or top_tables:
            kind = "table"
            files = ([str(p) for p in iter_image_files(path, TABLE_EXTENSIONS)] if path.is_dir() else [str(path)])
            _table_partitions(files, image_column_name, partitions)
        elif path.is_dir():
            if any(path.glob("data_batch_*")) or (path / "test_batch").is_file():
                raise UserError(f"{path}: CIFAR batches are in-memory arrays; scan them without --ray")
            # The walk FolderSource does, so partitions follow the local scan's order exactly.
            for p in iter_image_files(path, IMAGE_EXTENSIONS + TAR_EXTENSIONS):
                if str(p).lower().endswith(TAR_EXTENSIONS):
                    shard(str(p))
                else:
                    lines().add(str(p))
        elif name.endswith(TAR_EXTENSIONS):
            kind = "tar"
            shard(str(path))
        elif name.endswith((".npz", ".npy")) or name.startswith(("data_batch", "test_batch")):
            raise UserError(f"{path}: .npz/.npy and CIFAR batches are in-memory arrays; scan them without --ray")
        elif name.endswith(LIST_EXTENSIONS):
            kind = "path-list"
            for item in PathListSource(path)._items():
                lines().add(item.path)
        elif name.endswith(IMAGE_EXTENSIONS):
            kind = "file"
            lines().add(str(path))
        else:
            raise UserError(f"{path}: unknown source type for --ray (expected a folder, a .txt path list, .tar "
                            f"shards, Parquet/Arrow tables or an image)")
    listing_sha = writer.close() if writer is not None else ""
    table = json.dumps([p.as_dict() for p in partitions], sort_keys=True)
    digest = hashlib.sha256((listing_sha + table).encode()).hexdigest()
    return kind, partitions, digest


# ---- reading a partition (worker) ----


def _read_lines(part: Partition) -> list[str]:
    fs, path = filesystem(part.uri)
    with fs.open_input_file(path) as fh:
        fh.seek(part.offset)
        data = fh.read(part.nbytes)
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")[: part.count or 0]
    if len(lines) != part.count:
        raise ValueError(f"{part.uri}: listing shorter than partition {part.partition} expects")
    return [json.loads(line) for line in lines]


def _fetch(uri: str) -> Item:
    """A remote image's bytes as an Item (a failed read is the item's error row)."""
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as fh:
            return Item(uri, "", fh.read())
    except Exception as exc:  # every per-input failure is a row, never the end of the partition
        return Item(uri, "", error=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])


def _remote_tar(uri: str) -> Iterator[Item]:
    """Image members of a remote shard, streamed (a torn or unreadable shard is one error row)."""
    from dede_rt.data.sources import _wanted

    try:
        fs, path = filesystem(uri)
        stream = fs.open_input_stream(path)
    except Exception as exc:
        yield Item(uri, "", error=f"not a readable tar shard: {type(exc).__name__}: {exc}")
        return
    with stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as archive:
                for member in archive:
                    if _wanted(member):
                        handle = archive.extractfile(member)
                        yield Item(uri, member.name, handle.read() if handle else b"")
        except (OSError, EOFError, tarfile.TarError) as exc:
            yield Item(uri, "", error=f"corrupt tar shard: {type(exc).__name__}: {exc}")


def _table_rows(part: Partition, chunk: int = 1024) -> Iterator[Item]:
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    fs, path = filesystem(part.uri)
    name, _, field = part.column.partition(".")
    with fs.open_input_file(path) as fh:
        if part.kind == "parquet":
            batches = pq.ParquetFile(fh).iter_batches(batch_size=chunk, row_groups=[part.offset], columns=[name])
        else:
            reader = ipc.open_file(fh)
            batches = (reader.get_batch(i).select([name]) for i in range(reader.num_record_batches))
        row = part.first_row
        for batch in batches:
            column = batch.column(0)
            if field:
                column = column.field(field)
            for value in column.to_pylist():
                yield (Item(part.uri, str(row), value) if value is not None
                       else Item(part.uri, str(row), error="no image bytes (null)"))
                row += 1


def partition_items(part: Partition | dict) -> Iterator[Item]:
    """The partition's inputs, as the local scan's sources would yield them, in order."""
    if isinstance(part, dict):
        part = Partition(**part)
    if part.kind == "lines":
        paths = _read_lines(part)
        if not any(is_uri(p) for p in paths):
            yield from (Item(p) for p in paths)  # read from disk in decode_item, as locally
            return
        with ThreadPoolExecutor(REMOTE_READ_THREADS) as pool:
            yield from pool.map(lambda p: _fetch(p) if is_uri(p) else Item(p), paths)
    elif part.kind == "tar":
        yield from (_remote_tar(part.uri) if is_uri(part.uri) else TarSource(Path(part.uri))._items())
    elif part.kind in ("parquet", "arrow"):
        yield from _table_rows(part)
    else:
        raise ValueError(f"unknown partition kind {part.kind!r}")


# ---- parts on disk (driver) ----


def _full(base_uri: str, path: str) -> str:
    """A path pyarrow listed under ``base_uri`` as a URI again (pyarrow lists paths without the scheme)."""
    return f"{base_uri.split('://', 1)[0]}://{path}" if is_uri(base_uri) else path


def list_parts(parts_uri: str) -> dict[int, list[tuple[int, bool, str]]]:
    """partition -> [(chunk, last, file path)] for the part files under ``parts_uri``."""
    from pyarrow import fs as pafs

    fs, path = filesystem(parts_uri)
    found: dict[int, list[tuple[int, bool, str]]] = {}
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return found
    for info in fs.get_file_info(pafs.FileSelector(path)):
        m = PART_RE.match(info.base_name)
        if m:
            found.setdefault(int(m.group(1)), []).append((int(m.group(2)), bool(m.group(3)),
                                                          _full(parts_uri, info.path)))
    return found


def temp_parts(parts_uri: str) -> list[str]:
    """Temporary files of part writes that never finished (``part-...parquet.tmp-PID``)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(parts_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [_full(parts_uri, i.path) for i in fs.get_file_info(pafs.FileSelector(path))
            if i.base_name.startswith("part-") and ".parquet.tmp-" in i.base_name]


def part_rows(fs, path: str) -> int | None:
    """Rows in a part file, or None when it is not a readable Parquet file (torn, empty)."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    except Exception:
        return None


def complete_partitions(parts_uri: str, partitions: list[Partition], check_files: bool = True
                        ) -> tuple[dict[int, list[str]], list[str]]:
    """(complete partition -> its part files in chunk order, files of incomplete partitions to remove).

    Complete: chunks 0..L present, exactly one of them (L) marked last, every file
    a readable Parquet file, and the row total equal to the partition's input
    count where that is known in advance.
    """
    found = list_parts(parts_uri)
    expected = {p.partition: p.count for p in partitions}
    done: dict[int, list[str]] = {}
    stale: list[str] = []
    for partition, chunks in found.items():
        chunks.sort()
        files = [f for _, _, f in chunks]
        ok = partition in expected and [c for c, _, _ in chunks] == list(range(len(chunks))) \
            and [last for _, last, _ in chunks] == [False] * (len(chunks) - 1) + [True]
        if ok and check_files:
            rows = [part_rows(*filesystem(f)) for f in files]
            ok = None not in rows and (expected[partition] is None or sum(rows) == expected[partition])
        if ok:
            done[partition] = files
        else:
            stale.extend(files)
    return done, stale

"""``dede-rt scan --ray``: the local scan's work spread over a Ray cluster, exactly once and resumable.

Written against Ray 2.60 (``ray[data]==2.60.0``): ``map_batches(..., compute=ActorPoolStrategy(...))``
(``concurrency=`` is deprecated since 2.51), ``from_items(..., override_num_blocks=)`` (not ``parallelism=``),
actor fault tolerance through ``max_restarts``/``max_task_retries`` remote args, and
``DataContext.max_errored_blocks``.

Pipeline (one Ray Data dataset)::

    partitions (driver: dede_rt.scan.partitions.plan, streamed listing)
      -> decode   CPU tasks, one partition each: partition_items + the local scan's decode_chunk, the bundle's
                  own input size; broken inputs become error strings; chunks of <= ~32 MiB of pixels
      -> score    an actor pool of runners (make_runner, as the local Scanner builds it: TensorRT or torch CUDA
                  with num_gpus=1 per actor on GPU nodes, ONNX Runtime INT8/FP32 on CPU nodes); each actor checks
                  the bundle digest in __init__, scores in the runner's batch size and writes the chunk's rows to
                  ``OUT/part-PPPPPPPP-CCCCC[-last].parquet`` atomically (names from ``PartFilenames``)
      -> driver   consumes one small record per chunk (progress, img/s), then writes the local scan's
                  ``summary.json`` and histogram PNG from the parts.

Why the actor writes its own parts instead of ``Dataset.write_parquet(filename_provider=...)``: Ray's
``FilenameProvider`` contract is a name per (write UUID, write task index) that must *not* depend on the
block's content, and a write task may receive blocks merged from several upstream outputs; so Ray's writer
cannot promise one file per input partition under a name that survives a restart. ``PartFilenames`` is a
``FilenameProvider`` whose name comes from the partition and chunk carried in the block, used by the actor's
own atomic write (temp file + rename locally; a single object PUT on object stores).

Exactly once: a partition is complete exactly when its chunk files 0..L are readable and L is marked last
(``partitions.complete_partitions``). ``resume=True`` after a killed driver re-plans the source (it must give
the same plan digest), deletes the files of incomplete partitions and redoes only those; a retried or
duplicated chunk rewrites the same name with the same rows, so the union of parts has one row per input.

Failure policy: a crashed actor (OOM kill, segfault, lost node) is restarted up to ``max_restarts`` times and
its in-flight chunk retried up to ``max_task_retries`` times (Ray's own default is infinite; we bound it so a
chunk that kills every actor cannot loop forever). A Python exception while scoring is not retried: the actor
returns it as a failure record (the actor stays healthy, and a raised UDF error would keep the actor's
resources held by the exception's references), and the driver counts failing partitions. With
``max_failed_partitions=0`` (default) the first one stops the scan with a one-line error: parts written so far
are kept and ``--resume`` continues. With ``max_failed_partitions=N`` up to N failing partitions are skipped
(crashes past their retry budget through ``DataContext.max_errored_blocks``); the scan finishes with status
``incomplete``, lists the missing partitions and each failure's traceback in the summary, deletes the chunks
those partitions did write, and ``--resume`` redoes exactly those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dede_rt.errors import UserError
from dede_rt.scan.partitions import (STATE, Partition, complete_partitions, filesystem, is_uri, join, list_parts,
                                     part_name, partition_items, plan, temp_parts)

RAY_WRITTEN_AGAINST = "2.60"
RAY_HINT = "pip install 'dede-rt[ray]'"
CHUNK_PIXEL_BYTES = 32 << 20  # decoded pixels per chunk: bounds object-store traffic per block
DEFAULT_PARTITION_INPUTS = 4096
DEFAULT_BATCH_SIZE = 64
MARK = "dede-rt:"  # prefix of errors raised on workers that are the user's to fix (reported as one line)


def require_ray(purpose: str = "--ray") -> object:
    """The ``ray`` module with Ray Data, or a one-line UserError saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"{purpose} needs Ray Data, not installed here: {RAY_HINT}") from None
    return ray


def bundle_digest(bundle: str | Path) -> str:
    """SHA-256 over the bundle's manifest, its ``fingerprint`` and every file in it (path + content hash)."""
    from dede_rt.bundle import fingerprint
    from dede_rt.models.encoders import sha256_file

    bundle = Path(bundle)
    h = hashlib.sha256()
    h.update(sha256_file(bundle / "manifest.json").encode())
    h.update(json.dumps(fingerprint(bundle), sort_keys=True).encode())
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(bundle).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _pack_bundle(bundle: Path) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # uncompressed: weights barely compress, gzip costs seconds
        tar.add(bundle, arcname="bundle")
    return buffer.getvalue()


def _worker_bundle(bundle: str, digest: str, shipped: object) -> Path:
    """The bundle as this worker sees it: its own path if identical, else the copy the driver shipped."""
    import tarfile
    import tempfile

    path = Path(bundle)
    if path.is_dir() and bundle_digest(path) == digest:
        return path
    if shipped is None:
        raise RuntimeError(f"{MARK} bundle {bundle} on this worker differs from the driver's (digest mismatch) "
                           "and no copy was shipped")
    import io

    import ray

    data = ray.get(shipped) if isinstance(shipped, ray.ObjectRef) else shipped
    root = Path(tempfile.mkdtemp(prefix="dede-rt-bundle-"))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(root, filter="data")
    local = root / "bundle"
    if bundle_digest(local) != digest:
        raise RuntimeError(f"{MARK} the shipped bundle does not match its digest; refusing to score")
    return local


class PartFilenames:
    """Deterministic part names from the partition and chunk a block carries (Ray ``FilenameProvider`` API)."""

    def __new__(cls, *args: object, **kwargs: object) -> PartFilenames:
        # Subclass Ray's FilenameProvider when Ray is here, without importing Ray at module import.
        from ray.data.datasource import FilenameProvider

        if not issubclass(cls, FilenameProvider):
            cls = type(cls.__name__, (cls, FilenameProvider), {})
        return object.__new__(cls)

    def get_filename_for_block(self, block: object, write_uuid: str = "", task_index: int = 0,
                               block_index: int = 0) -> str:
        """``part-PPPPPPPP-CCCCC[-last].parquet`` for a block of one chunk's rows (columns partition/chunk/last)."""
        import pyarrow as pa

        table = block if isinstance(block, pa.Table) else pa.table(block)
        keys = {(p, c, l) for p, c, l in zip(*(table.column(k).to_pylist() for k in ("partition", "chunk", "last")))}
        if len(keys) != 1:
            raise ValueError(f"a part holds one chunk of one partition, got {sorted(keys)[:4]}")
        (partition, chunk, last), = keys
        return part_name(partition, chunk, last)


def decode_partitions(batch: object, *, size: int | dict, max_pixels: int | None, chunk: int) -> Iterator[object]:
    """Ray Data UDF (CPU task): each partition row -> chunk rows of decoded uint8 pixels + error strings.

    ``size``: the bundle's resize rule as a dict (``Resize.to_dict``), or an int for the squash rule.
    """
    import pyarrow as pa

    from dede_rt.data.images import Resize
    from dede_rt.scan.decode import decode_chunk

    rule = Resize(**size) if isinstance(size, dict) else Resize.of(size)

    for part in batch.to_pylist():  # type: ignore[attr-defined]
        items = partition_items({k: part[k] for k in Partition.__dataclass_fields__})
        index, offset, current = 0, 0, _take(items, chunk)
        while True:
            following = _take(items, chunk) if len(current) == chunk else []
            images, errors = decode_chunk(current, rule, max_pixels)
            yield pa.table({
                "partition": [part["partition"]], "chunk": [index], "last": [not following],
                "first_offset": [offset], "n": [len(current)],
                "paths": pa.array([[_b(i.path) for i in current]], pa.list_(pa.binary())),
                "members": pa.array([[_b(i.member) for i in current]], pa.list_(pa.binary())),
                "errors": pa.array([errors], pa.list_(pa.string())),
                "images": pa.array([images.tobytes()], pa.large_binary()), "decode_max_rss_mb": [_max_rss_mb()]})
            if not following:
                break
            index, offset, current = index + 1, offset + len(current), following


def _max_rss_mb() -> float:
    """Peak resident memory of this worker process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _take(items: Iterator, n: int) -> list:
    out = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


def _b(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")  # file names need not be valid UTF-8


def _s(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _arrow_text(text: str) -> str:
    """Arrow strings must be UTF-8: undecodable file-name bytes are written as backslash escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


class ScoreChunks:
    """Ray Data actor: one runner (built from the bundle like the local scan's), scores chunks, writes parts."""

    def __init__(self, *, bundle: str, digest: str, shipped: object, out: str, backend: str,
                 precision: str | None, batch_size: int | None, threshold: float | None, fpr: float | None,
                 expect_threshold: float | None, device: str | None, threads: int, score_kernel: str,
                 fault: dict | None = None) -> None:
        t0 = time.perf_counter()
        from dede_rt.scan.pipeline import Scanner

        local = _worker_bundle(bundle, digest, shipped)  # checked before anything is scored
        self.digest, self.out, self.fault = digest, out, fault
        self.scanner = Scanner(local, backend, precision, threshold=threshold, fpr=fpr,
                               batch_size=batch_size or DEFAULT_BATCH_SIZE, workers=0, device=device,
                               threads=threads, score_kernel=score_kernel)
        hint = self.scanner.deployment.batch_size_hint
        self.batch = batch_size or hint or DEFAULT_BATCH_SIZE
        if expect_threshold is not None and not np.isclose(expect_threshold, self.scanner.threshold, rtol=1e-9, atol=0):
            raise RuntimeError(f"{MARK} cannot resume: the earlier parts were flagged at threshold "
                               f"{expect_threshold:.6g}, this worker's {self.scanner.describe()} uses "
                               f"{self.scanner.threshold:.6g} (use the same --backend/--precision/--fpr/--threshold)")
        s = self.scanner
        self.meta = {"runner": s.describe(), "backend": s.backend, "precision": s.precision,
                     "threshold": s.threshold, "target_fpr": s.target_fpr, "calibration_fpr": s.calibration_fpr,
                     "bundle_digest": digest, "written_by": "dede-rt scan --ray"}
        self.names = PartFilenames()
        self.init_seconds = time.perf_counter() - t0  # imports, digest check, runner load

    def __call__(self, batch: object) -> object:
        """Score every chunk row of ``batch``; return one record per chunk (its part is on disk by then)."""
        import pyarrow as pa

        return pa.Table.from_pylist([self._guarded(row) for row in batch.to_pylist()])  # type: ignore[attr-defined]

    def _guarded(self, row: dict) -> dict:
        """``_chunk``, or a failure record: the driver, not Ray's errored-block count, applies the policy.

        Why: a UDF exception makes Ray Data abort (or skip a block) while the failed actor's handle stays
        referenced from the exception, so its CPU/GPU is not returned and a later scan in the same process
        can wait forever for it. A record keeps the actor healthy and lets the driver stop cleanly.
        """
        import traceback

        try:
            return {**self._chunk(row), "failed": None, "failure_detail": None}
        except Exception as exc:  # noqa: BLE001 - reported per partition, policy applied on the driver
            return {**self._record(row, rows=0, scored=0, flagged=0, errors=0, infer_seconds=0.0),
                    "failed": f"{type(exc).__name__}: {exc}", "failure_detail": traceback.format_exc(limit=20)}

    def _chunk(self, row: dict) -> dict:
        import pyarrow as pa

        from dede_rt.data.sources import Item

        s, n = self.scanner, row["n"]
        images = np.frombuffer(row["images"], np.uint8).reshape(n, s.size, s.size, 3)
        pending = [(Item(_s(p), _s(m)), images[i] if e is None else None, e)
                   for i, (p, m, e) in enumerate(zip(row["paths"], row["members"], row["errors"]))]
        buffer = np.empty((self.batch, s.size, s.size, 3), np.uint8)
        t0 = time.perf_counter()
        rows = []
        for start in range(0, n, self.batch):
            rows += s.score_batch(pending[start:start + self.batch], row["first_offset"] + start, buffer)
        seconds = time.perf_counter() - t0
        self._inject(row)
        key = {"partition": row["partition"], "chunk": row["chunk"], "last": row["last"]}
        table = pa.table({"partition": pa.array([row["partition"]] * n, pa.int64()),
                          "offset": pa.array([r.index for r in rows], pa.int64()),
                          "path": pa.array([_arrow_text(r.path) for r in rows], pa.string()),
                          "member": pa.array([_arrow_text(r.member) for r in rows], pa.string()),
                          "score": pa.array([r.score for r in rows], pa.float64()),
                          "flagged": pa.array([r.flagged for r in rows], pa.bool_()),
                          "error": pa.array([r.error for r in rows], pa.string())})
        table = table.replace_schema_metadata({"dede_rt": json.dumps(self.meta)})
        name = self.names.get_filename_for_block(pa.table({k: [v] for k, v in key.items()}))
        _write_part(join(self.out, name), table)
        scored = sum(r.score is not None for r in rows)
        return self._record(row, rows=n, scored=scored, flagged=sum(bool(r.flagged) for r in rows),
                            errors=n - scored, infer_seconds=seconds)

    def _record(self, row: dict, **counts: float) -> dict:
        """The driver's record of one chunk: its key, ``counts``, and where and when it ran (success or failure)."""
        return {"partition": row["partition"], "chunk": row["chunk"], "last": row["last"], **counts,
                "pid": os.getpid(), "max_rss_mb": _max_rss_mb(), "finished_at": time.time(),
                "actor_init_seconds": self.init_seconds, "decode_max_rss_mb": row.get("decode_max_rss_mb"),
                **self.meta}

    def _inject(self, row: dict) -> None:
        """Test-only fault injection (``run(_fault=...)``): crash the actor once, or always raise, on a partition."""
        f = self.fault
        if not f or row["partition"] != f["partition"]:
            return
        if f["mode"] == "raise":
            raise RuntimeError(f"injected failure on partition {row['partition']}")
        marker = Path(f["marker"]) / f"crashed-{row['partition']}-{row['chunk']}"
        if not marker.exists():  # crash once, mid-chunk (scored, not yet written): the retry must redo it
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(17)


def _write_part(uri: str, table: object) -> None:
    """Write a part atomically: a temp file renamed over the name locally; one PUT on object stores."""
    import pyarrow.parquet as pq

    if is_uri(uri) and not uri.startswith("file://"):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        return
    _, path = filesystem(uri)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_uri(uri) and not uri.startswith("file://"):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(uri: str) -> dict | None:
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


def _sidecars(output: str) -> tuple[str, str]:
    """Where summary JSON and histogram PNG go: next to the output directory, as the local scan puts them."""
    from dede_rt.scan.output import sidecar_paths

    if is_uri(output):
        base = output.rstrip("/")
        stem = base[: -len(".parquet")] if base.endswith(".parquet") else base
        return stem + ".summary.json", stem + ".hist.png"
    summary, hist = sidecar_paths(Path(output.rstrip("/")))
    return str(summary), str(hist)


def _summarize(files: list[str], threshold: float) -> dict:
    """The local scan's summarize_rows totals, computed column-wise from the parts (fast at 100M rows)."""
    import pyarrow.parquet as pq

    from dede_rt.scan.output import HISTOGRAM_BINS

    def columns() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for f in files:
            fs, path = filesystem(f)
            with fs.open_input_file(path) as fh:
                t = pq.read_table(fh, columns=["score", "flagged", "error"])
            ok = np.asarray(t.column("error").is_null()) & np.asarray(t.column("score").is_valid())
            scores = np.asarray(t.column("score").fill_null(0.0), np.float64)[ok]
            flagged = np.asarray(t.column("flagged").fill_null(False), bool)[ok]
            yield scores, flagged

    inputs = sum(_rows(f) for f in files)
    scored = flagged = 0
    lo, hi, total = math.inf, -math.inf, 0.0
    for scores, flags in columns():
        if len(scores):
            scored += len(scores)
            flagged += int(flags.sum())
            lo, hi, total = min(lo, float(scores.min())), max(hi, float(scores.max())), total + float(scores.sum())
    stats = {"inputs": inputs, "scored": scored, "flagged": flagged, "errors": inputs - scored}
    if not scored:
        return {"counts": stats, "scores": None, "histogram": None}
    left, right = min(lo, threshold), max(hi, threshold)
    edges = np.linspace(left, right if right > left else left + 1.0, HISTOGRAM_BINS + 1)
    counts = np.zeros(HISTOGRAM_BINS, np.int64)
    for scores, _ in columns():
        counts += np.histogram(scores, edges)[0]
    return {"counts": stats, "scores": {"min": lo, "max": hi, "mean": total / scored},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _rows(uri: str) -> int:
    from dede_rt.scan.partitions import part_rows

    fs, path = filesystem(uri)
    return part_rows(fs, path) or 0


def _part_meta(uri: str) -> dict:
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    with fs.open_input_file(path) as fh:
        meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
    return json.loads(meta.get(b"dede_rt", b"{}"))


def read_rows(output: str | Path) -> Iterator:
    """The rows of a distributed scan as ``ScanResult``s in the local scan's order, with its global index."""
    import pyarrow.parquet as pq

    from dede_rt.scan.output import ScanResult

    output = str(output)
    state = _read_json(join(output, STATE))
    if state is None:
        raise UserError(f"{output}: not a distributed scan output (no {STATE})")
    done, _ = complete_partitions(output, [Partition(**p) for p in state["partitions"]], check_files=False)
    index = 0
    for partition in sorted(done):
        for f in done[partition]:
            fs, path = filesystem(f)
            with fs.open_input_file(path) as fh:
                table = pq.read_table(fh)
            for d in table.to_pylist():
                yield ScanResult(index, d["path"], d["member"], d["score"], d["flagged"], d["error"])
                index += 1


def _failure(rec: dict) -> dict:
    """The part of a failure record the summary keeps."""
    return {k: rec[k] for k in ("partition", "chunk", "pid", "failed", "failure_detail")}


def _too_many_failures(failures: list[dict], allowed: int) -> str:
    first = failures[0]
    return (f"partition {first['partition']} failed while scoring ({first['failed']}); "
            f"{len({f['partition'] for f in failures})} failing partition(s), {allowed} allowed. Parts written so "
            "far are kept: fix the cause and rerun with --resume, or allow skipping with --ray-max-failed N")


def _release(batches: object) -> None:
    """Shut the dataset's executor down now (closing its iterator), and collect the cycles that hold actors."""
    import gc

    close = getattr(batches, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - best effort: shutting down after a failure must not mask it
            pass
    gc.collect()


def _parse_actors(actors: int | str | tuple[int, int] | None) -> tuple[int, int] | None:
    if actors is None or isinstance(actors, tuple):
        return actors
    text = str(actors)
    try:
        lo, _, hi = text.partition("-")
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise UserError(f"--ray-actors takes N or MIN-MAX, got {text!r}") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise UserError(f"--ray-actors takes N >= 1 or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return pair


def run(source: str | Path, detector: str | Path, output: str | Path, *, address: str | None = "auto",
        resume: bool = False, backend: str = "auto", precision: str | None = None,
        threshold: float | None = None, fpr: float | None = None, batch_size: int | None = None,
        actors: int | str | tuple[int, int] | None = None, gpus_per_actor: float | None = None,
        cpus_per_actor: float = 1.0, decode_cpus: float = 1.0, partition_size: int | None = None,
        image_column: str | None = None, max_pixels: int | None = None, device: str | None = None,
        threads: int = 0, score_kernel: str = "torch", max_failed_partitions: int = 0, max_restarts: int = 3,
        max_task_retries: int = 3, ship_bundle: bool | None = None, progress: bool = True,
        log: Callable[[str], None] | None = None, on_chunk: Callable[[dict], None] | None = None,
        _fault: dict | None = None) -> dict:
    """Scan ``source`` on a Ray cluster into the Parquet-part directory ``output``; return the summary dict.

    ``address``: "auto" (a cluster ``ray start`` made on this machine or $RAY_ADDRESS, else a new local one),
    ``ray://host:10001`` or ``host:6379``; a Ray already initialized in this process is used as is.
    ``actors``: N or (min, max) scoring actors (default: one per GPU, or an autoscaling pool up to the CPUs
    left after decoding). ``gpus_per_actor``: default 1 when the cluster has GPUs, else 0 (CPU runners).
    ``ship_bundle``: put a copy of the bundle in the object store for workers that lack it or hold another
    version (default: when the cluster has more than one node). ``on_chunk``: called on the driver with each finished chunk's record (rows, flagged, errors, runner, ...).
    ``_fault`` is for tests only (see ``ScoreChunks._inject``).
    """
    ray = require_ray()
    from dede_rt.bundle import read_manifest, versions
    from dede_rt.data.images import DEFAULT_MAX_PIXELS
    from dede_rt.scan.output import write_histogram_png
    from dede_rt.scan.progress import ScanProgress

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    say = log or (lambda _msg: None)
    output = str(output).rstrip("/")
    if Path(output).suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        raise UserError(f"{output}: --ray writes a directory of Parquet parts; give a directory (e.g. scan.parquet)")
    if threshold is not None and fpr is not None:
        raise UserError("give either --threshold or --fpr, not both")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_failed_partitions < 0:
        raise UserError(f"max_failed_partitions must be >= 0, got {max_failed_partitions}")
    pair = _parse_actors(actors)
    bundle = Path(detector).absolute()
    manifest = read_manifest(bundle)  # a UserError for a missing/invalid bundle, before any cluster work
    size = manifest.image_size
    if backend == "onnxruntime" and precision in (None, "fp32"):
        # Export once here: actors exporting into one shared bundle at the same time would race.
        from dede_rt.engines.loaders import ensure_graph

        ensure_graph(bundle, "detector")
    digest = bundle_digest(bundle)
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    options = {"backend": backend, "precision": precision, "threshold": threshold, "fpr": fpr}

    state_uri = join(output, STATE)
    previous = _read_json(state_uri)
    if previous is not None and not resume:
        raise UserError(f"{output} already holds a scan; pass --resume to continue it, or remove it")
    out_fs, out_path = filesystem(output)
    out_fs.create_dir(out_path, recursive=True)
    if previous is None and list_parts(output):
        raise UserError(f"{output} holds part files but no {STATE}; remove it or choose another output")
    if previous is not None:
        for key, value in (("bundle_digest", digest), ("options", options)):
            if previous.get(key) != value:
                raise UserError(f"cannot resume {output}: the {key.replace('_', ' ')} changed since that scan "
                                f"({previous.get(key)} -> {value}); start a new output")
        partition_size = partition_size or previous["partition_size"]
    per_chunk = max(1, CHUNK_PIXEL_BYTES // (size * size * 3))
    partition_size = partition_size or max(per_chunk, DEFAULT_PARTITION_INPUTS)
    chunk = min(partition_size, per_chunk)
    relist = join(output, "_listing.resume.jsonl") if previous is not None else None
    kind, partitions, plan_sha = plan(str(source), output, partition_size, image_column, relist)
    if relist is not None:
        fs, path = filesystem(relist)
        if fs.get_file_info(path).type.name == "File":
            fs.delete_file(path)  # identical to the listing already there when the plans agree
        if previous["plan_sha256"] != plan_sha:
            raise UserError(f"cannot resume {output}: the source lists differently than when that scan started "
                            "(files added, removed or renamed, or another partition size); start a new output")
    state = previous or {"format": 1, "ray_written_against": RAY_WRITTEN_AGAINST, "source": str(source),
                         "source_kind": kind, "detector": str(bundle), "bundle_digest": digest, "options": options,
                         "partition_size": partition_size, "chunk": chunk, "image_size": size,
                         "plan_sha256": plan_sha, "threshold": None, "partitions": [p.as_dict() for p in partitions]}
    chunk = state["chunk"]
    _write_bytes(state_uri, json.dumps(state).encode())

    done, stale = complete_partitions(output, partitions)
    for f in stale:  # a partition is redone whole: its leftover chunks (torn or not) go first
        fs, path = filesystem(f)
        fs.delete_file(path)
    for f in temp_parts(output):  # temp files of writes a kill interrupted
        fs, path = filesystem(f)
        fs.delete_file(path)
    if state["threshold"] is None and done:  # killed before it was recorded: the parts carry it
        state["threshold"] = _part_meta(next(iter(done.values()))[0]).get("threshold")
    todo = [p for p in partitions if p.partition not in done]
    rows_before = sum(_rows(f) for files in done.values() for f in files)
    summary_path, histogram_path = _sidecars(output)
    say(f"scanning {kind} {source} on Ray: {len(partitions)} partitions of <= {partition_size} inputs"
        + (f"; {len(done)} already complete, {len(todo)} to do" if previous is not None else ""))
    base = {"status": "running", "source": str(source), "source_kind": kind, "detector": str(bundle),
            "output": output, "distributed": True}
    _write_bytes(summary_path, json.dumps({**base, "started_at": started_at}, indent=2).encode())

    records: list[dict] = []
    failures: list[dict] = []
    t0 = time.perf_counter()
    info: dict = {"partitions": len(partitions), "skipped_complete": len(done), "submitted": len(todo)}
    if todo:
        if not ray.is_initialized():
            ray.init(address=None if address in (None, "auto") else address,
                     logging_level=logging.INFO if progress else logging.WARNING, log_to_driver=progress)
        resources = ray.cluster_resources()
        gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if resources.get("GPU", 0) > 0 else 0.0)
        if pair is None:
            if gpus:
                n = max(1, int(resources.get("GPU", 1) // gpus))
                pair = (n, n)
            else:
                pair = (1, max(1, int(resources.get("CPU", 2) // (cpus_per_actor + decode_cpus))))
        from ray.data import ActorPoolStrategy, DataContext

        compute = ActorPoolStrategy(size=pair[0]) if pair[0] == pair[1] else \
            ActorPoolStrategy(min_size=pair[0], max_size=pair[1])
        info.update({"address": ray.get_runtime_context().gcs_address, "ray": ray.__version__,
                     "actors": list(pair), "gpus_per_actor": gpus, "cpus_per_actor": cpus_per_actor,
                     "decode_cpus": decode_cpus, "chunk": chunk, "cluster": {k: resources[k] for k in
                                                                             ("CPU", "GPU") if k in resources}})
        if ship_bundle is None:  # one node shares the driver's files; more may not
            ship_bundle = sum(1 for node in ray.nodes() if node.get("Alive")) > 1
        shipped = ray.put(_pack_bundle(bundle)) if ship_bundle else None
        ctx = DataContext.get_current()
        saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
        ctx.max_errored_blocks = max_failed_partitions
        ctx.enable_progress_bars = False  # our own bar below counts images, not blocks
        ds = ray.data.from_items([p.as_dict() for p in todo], override_num_blocks=len(todo))
        # Ray 2.60 deprecates passing max_retries/max_restarts/max_task_retries as extra remote args (removal
        # announced for 2.64) but offers no named parameter for them yet; they are still honoured, so we pass
        # them and keep the warning out of the operator's log.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            ds = ds.map_batches(decode_partitions, fn_kwargs={"size": manifest.pixels.to_dict(),
                                                              "max_pixels": max_pixels, "chunk": chunk},
                                batch_size=1, batch_format="pyarrow", num_cpus=decode_cpus, max_retries=3)
            ds = ds.map_batches(
                ScoreChunks, batch_size=1, batch_format="pyarrow", compute=compute, num_cpus=cpus_per_actor,
                num_gpus=gpus or None,
                fn_constructor_kwargs={"bundle": str(bundle), "digest": digest, "shipped": shipped, "out": output,
                                       "backend": backend, "precision": precision, "batch_size": batch_size,
                                       "threshold": threshold, "fpr": fpr, "expect_threshold": state.get("threshold"),
                                       "device": device, "threads": threads or max(1, int(cpus_per_actor)),
                                       "score_kernel": score_kernel, "fault": _fault},
                max_restarts=max_restarts, max_task_retries=max_task_retries)
        total = sum(p.count or 0 for p in partitions) if all(p.count is not None for p in partitions) else None
        flagged = errors = 0
        last_log = time.perf_counter()
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            with ScanProgress(enabled=progress, completed=rows_before, counter=lambda: total) as bar:
                for batch in batches:
                    for rec in batch.to_pylist():
                        if rec.get("failed"):
                            failures.append(_failure(rec))
                            say(f"partition {rec['partition']} failed: {rec['failed']}")
                            if len({f["partition"] for f in failures}) > max_failed_partitions:
                                raise UserError(_too_many_failures(failures, max_failed_partitions))
                            continue
                        records.append(rec)
                        if on_chunk is not None:
                            on_chunk(rec)
                        flagged, errors = flagged + rec["flagged"], errors + rec["errors"]
                        bar.advance(rec["rows"], flagged, errors)
                        if state["threshold"] is None:
                            state["threshold"] = rec["threshold"]
                            _write_bytes(state_uri, json.dumps(state).encode())
                    if progress and time.perf_counter() - last_log > 10:
                        n = sum(r["rows"] for r in records)
                        say(f"{rows_before + n} inputs scanned, {n / (time.perf_counter() - t0):.0f} img/s")
                        last_log = time.perf_counter()
        except Exception as exc:
            text = str(exc)
            if MARK in text:
                line = text[text.index(MARK) + len(MARK):].strip().splitlines()[0]
                raise UserError(line) from None
            raise
        finally:
            ctx.max_errored_blocks, ctx.enable_progress_bars = saved
            _release(batches)
            ds = batches = None  # an escaping traceback keeps this frame: drop what holds the actor pool
    seconds = time.perf_counter() - t0

    done, stale = complete_partitions(output, partitions)
    for f in stale:  # chunks of partitions that failed or were skipped: --resume redoes them whole anyway
        fs, path = filesystem(f)
        fs.delete_file(path)
    missing = sorted(p.partition for p in partitions if p.partition not in done)
    files = [f for partition in sorted(done) for f in done[partition]]
    meta = records[0] if records else (_part_meta(files[0]) if files else {})
    thr = meta.get("threshold", state.get("threshold"))
    if thr is None:  # nothing scored yet anywhere (e.g. every partition failed)
        thr = float("nan")
    thresholds = sorted({r["threshold"] for r in records}) or [thr]
    totals = _summarize(files, thr) if files else {"counts": {"inputs": 0, "scored": 0, "flagged": 0, "errors": 0},
                                                   "scores": None, "histogram": None}
    n_this = sum(r["rows"] for r in records)
    info.update({"complete": len(done), "incomplete_partitions": missing[:1000], "incomplete": len(missing),
                 "actor_pids": sorted({r["pid"] for r in records}),
                 "actor_init_seconds": max((r["actor_init_seconds"] for r in records), default=None),
                 "bundle_shipped": bool(todo) and bool(ship_bundle),
                 "peak_rss_mb": {"actor": max((r["max_rss_mb"] for r in records), default=None),
                                 "decode": max((r["decode_max_rss_mb"] or 0 for r in records), default=None)},
                 "chunk_retries_or_duplicates": len(records) - len({(r["partition"], r["chunk"]) for r in records}),
                 "failures": failures[:100]})
    summary = {**base, "status": "incomplete" if missing else "complete", "threshold": thr,
               "thresholds_seen": thresholds, "target_fpr": meta.get("target_fpr"),
               "calibration_fpr": meta.get("calibration_fpr"), "backend": meta.get("backend"),
               "precision": meta.get("precision"), "batch_size": batch_size, "runner": meta.get("runner"),
               **totals, "resumed_from": rows_before,
               "this_run": {"inputs": n_this, "scored": sum(r["scored"] for r in records),
                            "errors": sum(r["errors"] for r in records),
                            "flagged": sum(r["flagged"] for r in records), "seconds": round(seconds, 4),
                            "images_per_second": round(n_this / max(seconds, 1e-9), 2),
                            "inference_seconds": round(sum(r["infer_seconds"] for r in records), 4)},
               "ray": info, "histogram_png": None, "started_at": started_at,
               "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "versions": {**versions(), "ray": getattr(ray, "__version__", "?")}}
    if totals["histogram"] is not None:
        c = totals["counts"]
        fpr_text = (f"target FPR {summary['target_fpr']:g}" if summary["target_fpr"] is not None
                    else "explicit threshold")
        title = f"{c['flagged']} of {c['scored']} flagged ({fpr_text})"
        if is_uri(histogram_path):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                write_histogram_png(Path(tmp) / "hist.png", totals["histogram"], thr, title)
                _write_bytes(histogram_path, (Path(tmp) / "hist.png").read_bytes())
        else:
            write_histogram_png(histogram_path, totals["histogram"], thr, title)
        summary["histogram_png"] = histogram_path
    _write_bytes(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    summary["summary_json"] = summary_path
    return summary

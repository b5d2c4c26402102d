"""Scan results on disk: append-only CSV/JSONL/Parquet rows, resume bookkeeping, summary and histogram.

Rows are written with one ``os.write`` per batch on an ``O_APPEND`` descriptor,
so a killed scan leaves whole batches (a torn last line, possible only when the
kernel itself stops mid-write, is cut off on resume). Parquet cannot be
appended to, so a Parquet scan journals its rows to ``FILE.parquet.partial.csv``
and converts the journal into the Parquet file (atomically) when it finishes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dede_rt.errors import UserError

COLUMNS = ("index", "path", "member", "score", "flagged", "error")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
HISTOGRAM_BINS = 60


@dataclass
class ScanResult:
    """One row per input: position in scan order, path (+ tar member / array index), score, flag, error."""

    index: int
    path: str
    member: str
    score: float | None
    flagged: bool | None
    error: str | None

    @property
    def key(self) -> tuple[str, str]:
        """(path, member): what identifies the input."""
        return self.path, self.member


def output_format(path: str | Path) -> str:
    """'csv', 'jsonl' or 'parquet' from the file name; UserError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: output must end in .csv, .jsonl or .parquet")
    if FORMATS[suffix] == "parquet":
        _require_pyarrow()
    return FORMATS[suffix]


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("Parquet output needs pyarrow: pip install 'dede-rt[parquet]' (or write .csv/.jsonl)") from None


def _format_score(score: float | None) -> str:
    return "" if score is None else format(score, ".9g")  # 9 digits: float32 round-trips exactly


def _csv_fields(row: ScanResult) -> list:
    flagged = "" if row.flagged is None else ("true" if row.flagged else "false")
    return [row.index, row.path, row.member, _format_score(row.score), flagged, row.error or ""]


def _csv_lines(rows: list[ScanResult]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(_csv_fields(r) for r in rows)
    return buffer.getvalue()


def _csv_line(row: ScanResult) -> str:
    return _csv_lines([row])


def _json_line(row: ScanResult) -> str:
    score = None if row.score is None else float(_format_score(row.score))
    return json.dumps({"index": row.index, "path": row.path, "member": row.member, "score": score,
                       "flagged": row.flagged, "error": row.error}, ensure_ascii=False) + "\n"


def _parse_csv(fields: list[str]) -> ScanResult:
    index, path, member, score, flagged, error = fields
    return ScanResult(int(index), path, member, float(score) if score else None,
                      None if flagged == "" else flagged == "true", error or None)


def _parse_json(line: str) -> ScanResult:
    d = json.loads(line)
    return ScanResult(int(d["index"]), d["path"], d["member"], d["score"], d["flagged"], d["error"])


def read_rows(path: str | Path, fmt: str | None = None) -> Iterator[ScanResult]:
    """Stream the rows of a scan output (CSV, JSONL, the Parquet file or its journal)."""
    path = Path(path)
    fmt = fmt or output_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
            for d in batch.to_pylist():
                yield ScanResult(d["index"], d["path"], d["member"], d["score"], d["flagged"], d["error"])
        return
    with open(path, encoding="utf-8", newline="", errors="surrogateescape") as fh:
        if fmt == "csv":
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is not None and tuple(header) != COLUMNS:
                raise UserError(f"{path}: not a dede-rt scan output (header {header})")
            for fields in reader:
                if len(fields) != len(COLUMNS):
                    raise UserError(f"{path}: malformed row {reader.line_num}")
                yield _parse_csv(fields)
        else:
            for line in fh:
                yield _parse_json(line)


def _truncate_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write torn by a crash)."""
    with open(path, "rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            block = fh.read(step)
            if pos == end and block.endswith(b"\n"):
                return
            cut = block.rfind(b"\n")
            if cut >= 0:
                fh.truncate(pos - step + cut + 1)
                return
            pos -= step
        fh.truncate(0)


class ResultWriter:
    """Append-only row writer for ``path`` (.csv/.jsonl/.parquet); ``resume`` continues an existing file."""

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.journal = self.path.with_name(self.path.name + ".partial.csv") if self.format == "parquet" else self.path
        self.row_format = "csv" if self.format == "parquet" else self.format
        exists = self.journal.exists() or self.path.exists()
        if exists and not resume:
            raise UserError(f"{self.path} already exists; pass --resume to continue that scan, or remove it")
        if resume and self.format == "parquet" and not self.journal.exists() and self.path.exists():
            self._journal_from_parquet()
        if self.journal.exists():
            _truncate_torn_tail(self.journal)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if os.fstat(self._fd).st_size == 0 and self.row_format == "csv":
            self._write(",".join(COLUMNS) + "\n")

    def existing_rows(self) -> Iterator[ScanResult]:
        """The rows already in the output (resume), checked to be numbered 0, 1, 2, ... without gaps."""
        for expected, row in enumerate(read_rows(self.journal, self.row_format)):
            if row.index != expected:
                raise UserError(f"{self.journal}: row {expected} has index {row.index}; the file was edited "
                                "or mixes two scans — cannot resume safely")
            yield row

    def rows(self) -> Iterator[ScanResult]:
        """All rows written so far."""
        return read_rows(self.journal, self.row_format)

    def write(self, rows: list[ScanResult]) -> None:
        """Append one batch of rows with a single write (durable once it returns, even if the process is killed)."""
        if self.row_format == "csv":
            self._write(_csv_lines(rows))
        else:
            self._write("".join(_json_line(r) for r in rows))

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", errors="surrogateescape"))
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self, finished: bool) -> None:
        """Close the file; when ``finished``, a Parquet journal becomes the Parquet file (atomically)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if finished and self.format == "parquet":
            self._parquet_from_journal()

    def _parquet_from_journal(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("index", pa.int64()), ("path", pa.string()), ("member", pa.string()),
                            ("score", pa.float32()), ("flagged", pa.bool_()), ("error", pa.string())])
        tmp = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(tmp, schema) as out:
            chunk: list[ScanResult] = []
            for row in read_rows(self.journal, "csv"):
                chunk.append(row)
                if len(chunk) == 65536:
                    out.write_table(_arrow_table(chunk, schema))
                    chunk = []
            if chunk:
                out.write_table(_arrow_table(chunk, schema))
        os.replace(tmp, self.path)
        self.journal.unlink()

    def _journal_from_parquet(self) -> None:
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(",".join(COLUMNS) + "\n")
            for row in read_rows(self.path, "parquet"):
                fh.write(_csv_line(row))
        os.replace(tmp, self.journal)


def _arrow_table(rows: list[ScanResult], schema: object) -> object:
    import pyarrow as pa

    return pa.table({"index": [r.index for r in rows], "path": [r.path for r in rows],
                     "member": [r.member for r in rows], "score": [r.score for r in rows],
                     "flagged": [r.flagged for r in rows], "error": [r.error for r in rows]}, schema=schema)


def summarize_rows(rows_factory: object, threshold: float) -> dict:
    """Counts, score statistics and a histogram from the output rows, in two streamed passes (flat memory)."""
    inputs = errors = flagged = scored = 0
    lo, hi, total = math.inf, -math.inf, 0.0
    for row in rows_factory():  # type: ignore[operator]
        inputs += 1
        if row.error is not None or row.score is None:
            errors += 1
            continue
        scored += 1
        flagged += bool(row.flagged)
        lo, hi, total = min(lo, row.score), max(hi, row.score), total + row.score
    stats = {"inputs": inputs, "scored": scored, "flagged": flagged, "errors": errors}
    if not scored:
        return {"counts": stats, "scores": None, "histogram": None}
    left, right = min(lo, threshold), max(hi, threshold)
    edges = np.linspace(left, right if right > left else left + 1.0, HISTOGRAM_BINS + 1)
    counts = np.zeros(HISTOGRAM_BINS, np.int64)
    chunk: list[float] = []
    for row in rows_factory():  # type: ignore[operator]
        if row.error is None and row.score is not None:
            chunk.append(row.score)
            if len(chunk) == 65536:
                counts += np.histogram(chunk, edges)[0]
                chunk = []
    counts += np.histogram(chunk, edges)[0]
    return {"counts": stats, "scores": {"min": lo, "max": hi, "mean": total / scored},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def write_histogram_png(path: str | Path, histogram: dict, threshold: float, title: str) -> None:
    """Score histogram with the threshold marked (matplotlib Agg, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"])
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="none")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("DeDe score (reconstruction error)")
    ax.set_ylabel("images")
    if counts.max() > 0 and counts.max() > 100 * max(1, np.median(counts[counts > 0])):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def sidecar_paths(output: str | Path) -> tuple[Path, Path]:
    """Where the summary JSON and histogram PNG of a scan output go: next to it, same stem."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".summary.json"), output.with_name(stem + ".hist.png")

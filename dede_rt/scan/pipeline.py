"""The scan pipeline: streamed source -> decode pool -> batched runner -> scored, flagged rows.

``Scanner`` owns the detector's runner and threshold; ``Scanner.batches``
turns a stream of items into batches of ``ScanResult`` rows in input order
(broken inputs keep their place as error rows). ``run_scan`` adds the output
file, resume, progress bar and summary; ``scan`` is the plain Python iterator.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dede_rt.bundle import Detector, Thresholds
from dede_rt.data.images import Resize
from dede_rt.data.sources import Item, open_source
from dede_rt.engines.base import BaseRunner
from dede_rt.engines.registry import Deployment, make_runner
from dede_rt.errors import UserError
from dede_rt.scan.decode import DEFAULT_MAX_PIXELS, DecodePool
from dede_rt.files import write_json_atomic
from dede_rt.scan.output import ResultWriter, ScanResult, sidecar_paths, summarize_rows, write_histogram_png

DEFAULT_BATCH_SIZE = 64  # batches of 32-64 beat 256 on CPU (DESIGN.md)


def default_workers() -> int:
    """Decode workers: enough to keep ahead of inference without starving it of cores."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class ScanStats:
    """Timing of one run: wall time, time inside the runner, time waiting for decoded images."""

    inputs: int = 0
    scored: int = 0
    errors: int = 0
    flagged: int = 0
    seconds: float = 0.0
    inference_seconds: float = 0.0
    wait_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict:
        """JSON form with throughput."""
        seconds = max(self.seconds, 1e-9)
        return {"inputs": self.inputs, "scored": self.scored, "errors": self.errors, "flagged": self.flagged,
                "seconds": round(self.seconds, 4), "images_per_second": round(self.inputs / seconds, 2),
                "inference_seconds": round(self.inference_seconds, 4),
                "runner_images_per_second": round(self.scored / max(self.inference_seconds, 1e-9), 2),
                "decode_wait_seconds": round(self.wait_seconds, 4)}


def make_deployment(detector: str | Path | Detector, backend: str = "auto", precision: str | None = None, *,
                    batch_size: int | None = None, device: str | None = None, threads: int = 0,
                    score_kernel: str = "torch") -> Deployment:
    """What serves ``detector`` (a bundle path, or a loaded Detector: torch unless it has a bundle path)."""
    if isinstance(detector, Detector) and (detector.path is None or backend == "torch"):
        if backend not in ("auto", "torch") or precision not in (None, "fp32"):
            raise UserError(f"backend {backend} / {precision} needs a saved bundle; an in-memory detector scores "
                            "with torch fp32")
        from dede_rt.engines.registry import RunnerChoice
        from dede_rt.engines.torch_runner import TorchRunner

        dev = device or "cpu"
        return Deployment(RunnerChoice("torch", "fp32", dev, None, "in-memory detector"),
                          TorchRunner(detector, dev, score_kernel), detector.fp32_thresholds(), batch_size)
    bundle = detector.path if isinstance(detector, Detector) else Path(detector)
    return make_runner(bundle, backend, precision, batch_size=batch_size, device=device, threads=threads,
                       score_kernel=score_kernel)


def _pinned_buffer(runner: BaseRunner, shape: tuple[int, ...]) -> np.ndarray:
    """The batch buffer: page-locked host memory when the runner feeds a CUDA device (faster H2D copies)."""
    if runner.device.startswith("cuda"):
        try:
            import torch

            return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
        except Exception:  # no pinned memory available: plain memory works, only slower
            pass
    return np.empty(shape, np.uint8)


def _pixels(detector: str | Path | Detector) -> Resize:
    """The resize rule of a bundle on disk or of a Detector in memory."""
    if isinstance(detector, (str, Path)):
        from dede_rt.bundle import read_manifest

        return read_manifest(detector).pixels
    return detector.normalization.pixels


class Scanner:
    """A detector's runner + threshold + decode settings; ``batches(items)`` scores a stream of inputs."""

    def __init__(self, detector: str | Path | Detector, backend: str = "auto", precision: str | None = None, *,
                 threshold: float | None = None, fpr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 workers: int | None = None, pool: str = "thread", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 device: str | None = None, threads: int = 0, score_kernel: str = "torch") -> None:
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        if threshold is not None and fpr is not None:
            raise UserError("give either --threshold or --fpr, not both")
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        self.pool_kind = pool
        self.max_pixels = max_pixels
        if threads > 0:
            # Inference threads (torch is process-wide). On a loaded machine fewer threads than cores can be
            # much faster: OpenMP workers that lose their core stall every parallel region.
            import torch

            torch.set_num_threads(threads)
        self.threads = threads
        self.deployment = make_deployment(detector, backend, precision, batch_size=batch_size, device=device,
                                          threads=threads, score_kernel=score_kernel)
        self.runner = self.deployment.runner
        self.runner.activate()
        self.size = self.runner.image_size
        self.pixels = _pixels(detector)  # the bundle's resize rule: a file is decoded as training decoded it
        if self.pixels.size != self.size:
            raise UserError(f"{detector}: the bundle's resize rule makes {self.pixels.size}-px images but its "
                            f"runner takes {self.size} px")
        self._set_threshold(self.deployment.thresholds, threshold, fpr)
        self.stats = ScanStats()

    def _set_threshold(self, thresholds: Thresholds, threshold: float | None, fpr: float | None) -> None:
        """The flagging threshold: explicit, or the one at the target FPR for the precision that scores.

        INT8/FP16 scores differ slightly from FP32, so those precisions use the
        thresholds ``dede-rt calibrate`` re-chose on their own clean scores.
        """
        if threshold is not None:
            self.target_fpr, self.threshold = None, float(threshold)
        else:
            self.target_fpr = thresholds.default_fpr if fpr is None else fpr
            self.threshold = thresholds.at(self.target_fpr)
        # The FPR this threshold has on the bundle's clean FP32 scores (only meaningful for FP32).
        self.calibration_fpr = thresholds.fpr_on_clean(self.threshold) if self.runner.precision == "fp32" else None

    @property
    def backend(self) -> str:
        """The backend that scores (after ``auto`` resolved)."""
        return self.runner.backend

    @property
    def precision(self) -> str:
        """The precision that scores."""
        return self.runner.precision

    def describe(self) -> str:
        """One line: backend, precision, device, why; threshold."""
        what = self.deployment.describe()
        fpr = f"target FPR {self.target_fpr:g}" if self.target_fpr is not None else "explicit"
        return f"backend {what}; threshold {self.threshold:.6g} ({fpr})"

    def close(self) -> None:
        """Release the runner."""
        self.runner.deactivate()

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batches(self, items: Iterable[Item], start: int = 0) -> Iterator[list[ScanResult]]:
        """Rows for ``items`` (whose first one is input number ``start``), one list per batch, in input order.

        Batch boundaries fall on multiples of ``batch_size`` counted from input 0,
        so a resumed scan feeds the runner exactly the batches an uninterrupted
        one would (bit-identical scores even where a backend's numerics depend
        on batch composition).
        """
        stats = self.stats = ScanStats()
        buffer = _pinned_buffer(self.runner, (self.batch_size, self.size, self.size, 3))
        pending: list[tuple[Item, np.ndarray | None, str | None]] = []
        index = start
        want = self.batch_size - start % self.batch_size
        with DecodePool(self.pixels, self.workers, self.pool_kind, chunk=max(1, min(32, self.batch_size)),
                        max_pixels=self.max_pixels) as pool:
            decoded = pool.map(items)
            while True:
                t0 = time.perf_counter()
                for entry in decoded:
                    pending.append(entry)
                    if len(pending) == want:
                        break
                stats.wait_seconds += time.perf_counter() - t0
                if not pending:
                    break
                rows = self.score_batch(pending, index, buffer)
                index += len(rows)
                stats.inputs += len(rows)
                stats.seconds = time.perf_counter() - stats.started
                yield rows
                pending, want = [], self.batch_size
        stats.seconds = time.perf_counter() - stats.started

    def score_batch(self, pending: list[tuple[Item, np.ndarray | None, str | None]], index: int,
                    buffer: np.ndarray) -> list[ScanResult]:
        """Rows for decoded ``pending`` (item, image or None, error) numbered from ``index``; ``buffer``: batch scratch."""
        ok = [i for i, (_, image, _) in enumerate(pending) if image is not None]
        scores = np.empty(0, np.float32)
        if ok:
            for slot, i in enumerate(ok):
                buffer[slot] = pending[i][1]
            t0 = time.perf_counter()
            scores = self.runner.infer(buffer[: len(ok)])
            self.stats.inference_seconds += time.perf_counter() - t0
        score_of = dict(zip(ok, scores.tolist()))
        rows = []
        for i, (item, _, error) in enumerate(pending):
            if i in score_of:
                score = score_of[i]
                if not np.isfinite(score):
                    rows.append(ScanResult(index + i, item.path, item.member, None, None, "non-finite score"))
                    self.stats.errors += 1
                    continue
                flagged = score > self.threshold
                self.stats.scored += 1
                self.stats.flagged += flagged
                rows.append(ScanResult(index + i, item.path, item.member, float(score), bool(flagged), None))
            else:
                self.stats.errors += 1
                rows.append(ScanResult(index + i, item.path, item.member, None, None, error))
        return rows


def scan(source: str | Path, detector: str | Path | Detector, *, limit: int | None = None,
         **options: object) -> Iterator[ScanResult]:
    """Scan ``source`` (folder, path list, .npz, CIFAR batches, .tar shards) and yield one row per input, in order.

    ``options``: backend, precision, threshold, fpr, batch_size, workers, pool, max_pixels, device, threads,
    score_kernel
    (see ``Scanner``).
    """
    src = open_source(source)
    with Scanner(detector, **options) as scanner:  # type: ignore[arg-type]
        items = src.items() if limit is None else _limited(src.items(), limit)
        for rows in scanner.batches(items):
            yield from rows


def _limited(items: Iterator[Item], n: int) -> Iterator[Item]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def _skip_verified(items: Iterator[Item], existing: Iterator[ScanResult]) -> int:
    """Consume one item per existing output row, checking they are the same inputs in the same order."""
    done = 0
    for row in existing:
        item = next(items, None)
        if item is None or item.key != row.key:
            found = "the source ends there" if item is None else f"the source now has {item.path} {item.member}".rstrip()
            raise UserError(f"cannot resume: output row {row.index} is {row.path} {row.member}".rstrip() +
                            f" but {found}; the dataset changed since that scan (start a new output)")
        done += 1
    return done


def run_scan(source: str | Path, detector: str | Path, output: str | Path | None = None, *, resume: bool = False,
             limit: int | None = None, progress: bool = True,
             on_batch: Callable[[list[ScanResult]], None] | None = None,
             log: Callable[[str], None] | None = None, **options: object) -> dict:
    """Scan ``source`` into ``output`` (.csv/.jsonl/.parquet; resumable), write its summary + histogram; return the summary."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if resume and output is None:
        raise UserError("--resume needs --output (the file of the scan to continue)")
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be >= 0, got {limit}")
    src = open_source(source)
    writer = ResultWriter(output, resume) if output is not None else None
    summary_path, histogram_path = sidecar_paths(output) if output is not None else (None, None)
    try:
        with Scanner(detector, **options) as scanner:  # type: ignore[arg-type]
            if log:
                log(f"scanning {src.describe()}: {scanner.describe()}")
            base = {"status": "running", "source": str(source), "source_kind": src.kind, "detector": str(detector),
                    "output": None if output is None else str(output), "threshold": scanner.threshold,
                    "target_fpr": scanner.target_fpr, "calibration_fpr": scanner.calibration_fpr,
                    "backend": scanner.backend, "precision": scanner.precision,
                    "batch_size": scanner.batch_size, "workers": scanner.workers, "pool": scanner.pool_kind,
                    "threads": scanner.threads, "runner": scanner.describe()}
            items = src.items()
            done = 0
            if writer is not None and resume:
                _check_same_settings(summary_path, scanner.threshold)
                done = _skip_verified(items, writer.existing_rows())
                if log and done:
                    log(f"resuming after {done} rows already in {output}")
            if summary_path is not None:
                write_json_atomic(summary_path, {**base, "started_at": started_at})
            if limit is not None:
                items = _limited(items, max(0, limit - done))
            from dede_rt.scan.progress import ScanProgress

            with ScanProgress(enabled=progress, completed=done, limit=limit, counter=src.count) as bar:
                for rows in scanner.batches(items, start=done):
                    if writer is not None:
                        writer.write(rows)
                    if on_batch is not None:
                        on_batch(rows)
                    bar.advance(len(rows), scanner.stats.flagged, scanner.stats.errors)
            stats = scanner.stats.as_dict()
    except BaseException:
        if writer is not None:
            writer.close(finished=False)
        raise
    if writer is not None:
        totals = summarize_rows(writer.rows, scanner.threshold)
        writer.close(finished=True)
    else:
        totals = {"counts": {"inputs": stats["inputs"], "scored": stats["scored"], "flagged": stats["flagged"],
                             "errors": stats["errors"]}, "scores": None, "histogram": None}
    from dede_rt.bundle import versions

    summary = {**base, "status": "complete", **totals, "resumed_from": done, "this_run": stats,
               "histogram_png": None, "started_at": started_at,
               "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    if summary_path is not None:
        if totals["histogram"] is not None:
            fpr = (f"target FPR {scanner.target_fpr:g}" if scanner.target_fpr is not None
                   else f"FPR {scanner.calibration_fpr:.3g} on calibration" if scanner.calibration_fpr is not None
                   else "explicit threshold")
            write_histogram_png(histogram_path, totals["histogram"], scanner.threshold,
                                f"{totals['counts']['flagged']} of {totals['counts']['scored']} flagged ({fpr})")
            summary["histogram_png"] = str(histogram_path)
        write_json_atomic(summary_path, summary)
        summary["summary_json"] = str(summary_path)
    return summary


def _check_same_settings(summary_path: Path | None, threshold: float) -> None:
    """Refuse to resume with a different threshold: earlier rows were flagged against the old one."""
    if summary_path is None or not summary_path.is_file():
        return
    try:
        previous = json.loads(summary_path.read_text()).get("threshold")
    except (OSError, ValueError):
        return
    if previous is not None and not np.isclose(previous, threshold, rtol=1e-9, atol=0):
        raise UserError(f"cannot resume: the earlier rows were flagged at threshold {previous:.6g}, "
                        f"this run would use {threshold:.6g} (use the same --fpr/--threshold)")


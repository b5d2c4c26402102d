"""Decoding scan inputs in a bounded worker pool, results in input order.

Work goes to the pool in chunks of items; at most ``prefetch`` chunks are in
flight, so memory stays flat whatever the dataset size, and the pool keeps
decoding while the caller runs inference on the previous batch. Threads are
the default: Pillow releases the GIL while it decodes and they share the
parent's memory; processes are available for decode-heavy inputs (large JPEGs).
Any failure of one input (unreadable, truncated, not an image, too large, a
FIFO, a symlink loop, gone since discovery) becomes that input's error string.
Decoding one item (``decode_item``) belongs to the data layer (dede_rt.data.sources).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image

from dede_rt.data.images import DEFAULT_MAX_PIXELS, Resize
from dede_rt.data.sources import Item, decode_item
from dede_rt.errors import UserError

__all__ = ["DEFAULT_MAX_PIXELS", "DecodePool", "decode_chunk", "decode_item", "error_text"]

# Images over the limit become error rows (ImageTooLarge), so Pillow's warning about them is only noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
MAX_ERROR_CHARS = 300
POOL_KINDS = ("thread", "process")


def error_text(exc: BaseException) -> str:
    """A one-line error string for the output row."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return text[:MAX_ERROR_CHARS]


def decode_chunk(items: list[Item], size: int | Resize, max_pixels: int | None) -> tuple[np.ndarray, list[str | None]]:
    """Decode a chunk by the ``size`` rule: stacked uint8 [n, s, s, 3] (zeros where broken), one error or None each."""
    n = Resize.of(size).size
    out = np.zeros((len(items), n, n, 3), np.uint8)
    errors: list[str | None] = []
    for i, item in enumerate(items):
        try:
            out[i] = decode_item(item, size, max_pixels)
            errors.append(None)
        except Exception as exc:  # every per-input failure is reported, never fatal
            errors.append(error_text(exc))
    return out, errors


class DecodePool:
    """Ordered, bounded decoding of items with ``workers`` threads or processes (0: inline, no pool)."""

    def __init__(self, size: int | Resize, workers: int = 2, kind: str = "thread", chunk: int = 32,
                 prefetch: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if kind not in POOL_KINDS:
            raise UserError(f"decode pool must be one of {', '.join(POOL_KINDS)}, got {kind!r}")
        if workers < 0 or chunk < 1:
            raise UserError(f"workers must be >= 0 and chunk >= 1 (got {workers}, {chunk})")
        self.size, self.workers, self.kind, self.chunk = size, workers, kind, chunk
        self.prefetch = prefetch or max(4, 4 * workers)
        self.max_pixels = max_pixels
        self._executor: Executor | None = None

    def __enter__(self) -> DecodePool:
        if self.workers > 0:
            if self.kind == "thread":
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="dede-decode")
            else:
                import multiprocessing

                # spawn: never fork a parent whose torch/OpenMP threads are running
                self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _chunks(self, items: Iterable[Item]) -> Iterator[list[Item]]:
        chunk: list[Item] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == self.chunk:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def map(self, items: Iterable[Item]) -> Iterator[tuple[Item, np.ndarray | None, str | None]]:
        """(item, image or None, error or None) for every item, in input order."""
        if self._executor is None:
            for chunk in self._chunks(items):
                yield from self._unpack(chunk, decode_chunk(chunk, self.size, self.max_pixels))
            return
        window: deque[tuple[list[Item], Future]] = deque()
        chunks = self._chunks(items)
        exhausted = False
        while True:
            while not exhausted and len(window) < self.prefetch:  # keep the pool busy, never more than the window
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                window.append((chunk, self._executor.submit(decode_chunk, chunk, self.size, self.max_pixels)))
            if not window:
                return
            chunk, future = window.popleft()
            yield from self._unpack(chunk, future.result())

    @staticmethod
    def _unpack(chunk: list[Item], result: tuple[np.ndarray, list[str | None]]
                ) -> Iterator[tuple[Item, np.ndarray | None, str | None]]:
        images, errors = result
        for item, image, error in zip(chunk, images, errors):
            yield item, (None if error else image), error

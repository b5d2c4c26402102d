"""The scan's progress bar: images, img/s, flagged, errors, ETA (rich; off when quiet or not a terminal)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


class ScanProgress:
    """Context manager; ``advance(n, flagged, errors)`` per batch. The total is counted in a background thread."""

    def __init__(self, enabled: bool = True, completed: int = 0, limit: int | None = None,
                 counter: Callable[[], int | None] | None = None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.completed, self.limit, self.counter = completed, limit, counter
        self._progress = None
        self._task = None

    def __enter__(self) -> ScanProgress:
        if not self.enabled:
            return self
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("scan"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TextColumn("flagged {task.fields[flagged]}"),
            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            transient=False)
        self._progress.start()
        self._task = self._progress.add_task("scan", total=self.limit, completed=self.completed,
                                             rate="-", flagged=0, errors=0)
        if self.counter is not None:
            threading.Thread(target=self._count, name="dede-scan-count", daemon=True).start()
        return self

    def _count(self) -> None:
        try:  # counting walks the source again (names only); the bar shows no ETA until it is done
            total = self.counter()
        except Exception:
            return
        if total is not None and self._progress is not None:
            total = min(total, self.limit) if self.limit is not None else total
            self._progress.update(self._task, total=total)

    def advance(self, n: int, flagged: int, errors: int) -> None:
        """Record one finished batch (flagged/errors: totals of this run)."""
        if self._progress is None:
            return
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, advance=n, flagged=flagged, errors=errors,
                              rate="-" if speed is None else f"{speed:,.0f}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

"""When decoder training ends: a wall-clock budget planned into epochs, and early stopping on held-out error.

Both are plain arithmetic over measured numbers (no clock is read here), so the rules are tested exactly and
the trainer only feeds them epoch times and held-out errors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DEFAULT_MAX_MINUTES = 10.0  # --epochs auto without --max-minutes: a detector in minutes on a laptop-class CPU
AUTO_MAX_EPOCHS = 200  # --epochs auto never trains longer than the reference schedule
PATIENCE = 5  # epochs without improvement before --epochs auto stops
MIN_DELTA = 0.002  # an improvement is a held-out error at least 0.2 % below the best so far


@dataclass(frozen=True)
class Budget:
    """A wall-clock budget for the whole ``train`` call and the epoch cap it is planned within."""

    max_seconds: float | None
    max_epochs: int

    def epochs(self, *, done: int, epoch_seconds: float, spent: float, reserve: float) -> int:
        """Total epochs that fit: ``done`` plus whole epochs of ``epoch_seconds`` in what the budget leaves.

        ``spent``: seconds of the call so far (loading, embedding, epochs done); ``reserve``: seconds kept for
        the work after training (scoring the held-out images, saving). Always at least one epoch in all, never
        more than ``max_epochs``.
        """
        if self.max_seconds is None:
            return self.max_epochs
        left = self.max_seconds - spent - reserve
        more = math.floor(left / epoch_seconds) if epoch_seconds > 0 else self.max_epochs
        return max(1, done, min(self.max_epochs, done + max(0, more)))

    def allows_another(self, *, epoch_seconds: float, spent: float, reserve: float) -> bool:
        """Whether one more epoch of ``epoch_seconds`` still ends within the budget."""
        return self.max_seconds is None or spent + epoch_seconds + reserve <= self.max_seconds


@dataclass
class EarlyStopping:
    """Stop when the held-out error has not improved by ``min_delta`` (relative) for ``patience`` epochs."""

    patience: int
    min_delta: float = MIN_DELTA
    best: float = math.inf
    best_epoch: int = 0
    since_best: int = 0

    def update(self, epoch: int, error: float) -> bool:
        """Record epoch ``epoch``'s held-out error; True when it is the new best (keep this checkpoint)."""
        if error < self.best * (1.0 - self.min_delta) or not math.isfinite(self.best):
            self.best, self.best_epoch, self.since_best = error, epoch, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Patience is used up (never, with ``patience`` 0: the curve is only recorded)."""
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict:
        """Plain-JSON state for checkpoints."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> EarlyStopping:
        """The stopper a checkpoint recorded."""
        return cls(**state)

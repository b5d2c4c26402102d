"""Detection thresholds calibrated on clean held-out scores at a target false-positive rate."""

from __future__ import annotations

import numpy as np

from dede_rt.errors import UserError

DEFAULT_FPR = 0.01
REPORTED_FPRS = (0.01, 0.05)


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """Smallest observed clean score t such that at most ``fpr`` of clean scores exceed t (flag: score > t)."""
    scores = np.asarray(clean_scores, dtype=np.float64)
    if not 0.0 < fpr < 1.0:
        raise UserError(f"target false-positive rate must be in (0, 1), got {fpr}")
    if scores.size == 0:
        raise UserError("no clean scores to calibrate a threshold on")
    return float(np.quantile(scores, 1.0 - fpr, method="higher"))


def calibrate(clean_scores: np.ndarray, fprs: tuple[float, ...] = REPORTED_FPRS) -> dict[str, float]:
    """Thresholds for each target FPR, keyed by the FPR written as a string (JSON-friendly)."""
    return {f"{f:g}": threshold_at_fpr(clean_scores, f) for f in fprs}

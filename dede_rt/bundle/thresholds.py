"""Flagging thresholds: chosen on clean held-out scores at a target false-positive rate.

One ``Thresholds`` per precision: FP32 keeps the clean scores it was chosen on
(so any FPR can be asked for); INT8/FP16/TensorRT variants carry the thresholds
re-chosen on their own clean scores at the bundle's FPRs. JSON keys are the FPR
written by ``fpr_key`` — the only place that format lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dede_rt.errors import UserError

DEFAULT_FPR = 0.01
REPORTED_FPRS = (0.01, 0.05)


def fpr_key(fpr: float) -> str:
    """The JSON key of a target FPR ('0.01')."""
    return f"{float(fpr):g}"


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """Smallest observed clean score t such that at most ``fpr`` of clean scores exceed t (flag: score > t)."""
    scores = np.asarray(clean_scores, dtype=np.float64)
    if not 0.0 < fpr < 1.0:
        raise UserError(f"target false-positive rate must be in (0, 1), got {fpr}")
    if scores.size == 0:
        raise UserError("no clean scores to choose a threshold on")
    return float(np.quantile(scores, 1.0 - fpr, method="higher"))


def thresholds_by_fpr(clean_scores: np.ndarray, fprs: tuple[float, ...] = REPORTED_FPRS) -> dict[str, float]:
    """Thresholds for each target FPR, keyed by ``fpr_key``."""
    return {fpr_key(f): threshold_at_fpr(clean_scores, f) for f in fprs}


@dataclass(frozen=True)
class Thresholds:
    """The thresholds one precision flags with; ``at(fpr)`` looks one up (or derives it from clean scores)."""

    by_fpr: dict[str, float]
    default_fpr: float = DEFAULT_FPR
    precision: str = "fp32"
    clean_scores: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_scores(cls, clean_scores: np.ndarray, fprs: tuple[float, ...] = REPORTED_FPRS,
                    default_fpr: float = DEFAULT_FPR, precision: str = "fp32") -> Thresholds:
        """Choose thresholds at ``fprs`` on ``clean_scores`` (kept, so other FPRs can be derived)."""
        scores = np.asarray(clean_scores, np.float32)
        return cls(thresholds_by_fpr(scores, fprs), default_fpr, precision, scores)

    @property
    def fprs(self) -> tuple[float, ...]:
        """The target FPRs stored, ascending."""
        return tuple(sorted(float(k) for k in self.by_fpr))

    def at(self, fpr: float | None = None) -> float:
        """The threshold at target ``fpr`` (default: ``default_fpr``)."""
        fpr = self.default_fpr if fpr is None else fpr
        key = fpr_key(fpr)
        if key in self.by_fpr:
            return float(self.by_fpr[key])
        if self.clean_scores is not None and self.clean_scores.size:
            return threshold_at_fpr(self.clean_scores, fpr)
        raise UserError(f"no {self.precision} threshold at FPR {key} (have: {', '.join(sorted(self.by_fpr)) or 'none'});"
                        " use one of those, --threshold, or fp32")

    def flag(self, scores: np.ndarray, fpr: float | None = None) -> np.ndarray:
        """Boolean flags: score above the threshold at ``fpr``."""
        return np.asarray(scores) > self.at(fpr)

    def fpr_on_clean(self, threshold: float) -> float | None:
        """The share of the stored clean scores above ``threshold`` (None without clean scores)."""
        if self.clean_scores is None or not self.clean_scores.size:
            return None
        return float((np.asarray(self.clean_scores, np.float64) > threshold).mean())

"""Check two runners against each other on the same images (Polygraphy's comparator idea)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import spearmanr

from dede_rt.engines.base import BaseRunner


@dataclass(frozen=True)
class Comparison:
    """How closely runner ``b`` reproduces runner ``a``'s scores."""

    a: str
    b: str
    images: int
    max_abs_diff: float
    max_rel_diff: float
    spearman: float
    threshold: float | None
    flag_agreement: float | None  # fraction of images flagged identically at ``threshold``

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


def compare_scores(ref: np.ndarray, got: np.ndarray, threshold: float | None = None,
                   threshold_b: float | None = None, names: tuple[str, str] = ("a", "b"),
                   scale: np.ndarray | None = None) -> Comparison:
    """Compare two score vectors; ``threshold_b`` (default ``threshold``) flags the second one.

    Relative differences are taken against ``|ref|`` or, when given, ``scale`` (per image: a score that is a
    difference of two errors can sit near zero while float32 rounding follows the errors' size).
    """
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    diff = np.abs(got - ref)
    base = np.abs(ref) if scale is None else np.maximum(np.abs(ref), np.asarray(scale, np.float64))
    rel = diff / np.maximum(base, np.finfo(np.float32).tiny)
    rho = float(spearmanr(ref, got).statistic) if len(ref) > 1 else float("nan")
    agree = None
    if threshold is not None:
        tb = threshold if threshold_b is None else threshold_b
        agree = float(np.mean((ref > threshold) == (got > tb)))
    return Comparison(names[0], names[1], len(ref), float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
                      rho, threshold, agree)


def run_batched(runner: BaseRunner, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores of an active runner over ``images`` in batches."""
    return np.concatenate([runner.infer(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def compare_runners(a: BaseRunner, b: BaseRunner, images: np.ndarray, threshold: float | None = None,
                    batch_size: int = 256) -> Comparison:
    """Score ``images`` with both runners (activated here if needed) and compare: diffs, Spearman, flags."""
    scores = []
    for runner in (a, b):
        was_active = runner.is_active
        runner.activate()
        try:
            scores.append(run_batched(runner, images, batch_size))
        finally:
            if not was_active:
                runner.deactivate()
    return compare_scores(scores[0], scores[1], threshold, names=(a.name, b.name))

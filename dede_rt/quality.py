"""How good a detector is without triggered data: its held-out clean curve, thresholds and clean-score spread.

Stored as the bundle's ``quality`` section by ``train_detector`` and printed by ``dede-rt train`` and
``dede-rt info``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dede_rt.bundle import Detector
    from dede_rt.training import TrainResult


def quality_report(result: TrainResult, detector: Detector, *, total_seconds: float) -> dict:
    """The quality section: training curve summary, stopping, ETA accuracy, clean-score spread, thresholds."""
    curve = result.curve
    held = [c["holdout_error"] for c in curve if c.get("holdout_error") is not None]
    scores = np.asarray(detector.calibration_scores, np.float64)
    train = sum(c.get("train_seconds", c["seconds"]) for c in curve)
    report = {
        "epochs_run": len(result.losses), "planned_epochs": result.planned_epochs,
        "first_planned_epochs": result.first_planned_epochs, "stopped": result.stopped,
        "best_epoch": result.best_epoch, "kept_epoch": result.kept_epoch, "precision": result.precision, "device": result.device,
        "holdout_error": {"first": held[0], "best": min(held), "last": held[-1]} if held else None,
        "curve": [{**{k: c[k] for k in ("epoch", "train_loss", "holdout_error")}, "seconds": round(c["seconds"], 3)}
                  for c in curve],
        "data_share": round(sum(c.get("data_seconds", 0.0) for c in curve) / train, 4) if train else None,
        "total_seconds": round(total_seconds, 2),
        "eta_seconds": None if result.eta_seconds is None else round(result.eta_seconds, 2),
        "actual_after_plan_seconds": None if result.plan_made_at is None else
        round(total_seconds - result.plan_made_at, 2),
        "thresholds": dict(detector.thresholds),
        "clean_scores": _spread(scores),
    }
    return report


def _spread(scores: np.ndarray) -> dict | None:
    if not len(scores):
        return None
    q = np.quantile(scores, [0.01, 0.5, 0.9, 0.99])
    return {"n": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()), "p01": float(q[0]),
            "p50": float(q[1]), "p90": float(q[2]), "p99": float(q[3]), "max": float(scores.max())}


def format_report(quality: dict) -> list[str]:
    """Human lines for a stored quality section."""
    q = quality
    lines = [f"training: {q['epochs_run']} epochs ({_why(q)}), {q['precision']} on {q['device']}, "
             f"{q['total_seconds'] / 60:.1f} min in all"]
    if q.get("kept_epoch"):
        lines[0] += f"; decoder of epoch {q['kept_epoch']}"
        if q.get("best_epoch") and q["best_epoch"] != q["kept_epoch"]:
            lines[0] += f" (lowest held-out error at epoch {q['best_epoch']})"
    if q.get("eta_seconds") is not None and q.get("actual_after_plan_seconds"):
        lines.append(f"  ETA at planning {q['eta_seconds']:.0f} s, took {q['actual_after_plan_seconds']:.0f} s")
    first, last = q.get("first_planned_epochs"), q.get("planned_epochs")
    if first and last and last < first:
        lines.append(f"  plan shrunk from {first} to {last} epochs (later epochs ran slower than the first)")
    if q.get("holdout_error"):
        h = q["holdout_error"]
        lines.append(f"  held-out clean error (test mask): {h['first']:.5g} after epoch 1 -> best {h['best']:.5g}, "
                     f"last {h['last']:.5g}")
    if q.get("clean_scores"):
        c = q["clean_scores"]
        lines.append(f"  clean scores (n={c['n']}): median {c['p50']:.5g}, p90 {c['p90']:.5g}, p99 {c['p99']:.5g}, "
                     f"max {c['max']:.5g}; spread (std/mean) {c['std'] / abs(c['mean']) if c['mean'] else 0:.3f}")
    if q.get("thresholds"):
        lines.append("  thresholds: " + ", ".join(f"FPR {k}: {v:.5g}" for k, v in sorted(q["thresholds"].items())))
    if q.get("data_share") is not None:
        lines.append(f"  data path: {q['data_share']:.1%} of training time")
    return lines


def _why(q: dict) -> str:
    return {"early_stop": "held-out error stopped improving", "planned": "the planned epochs within the budget",
            "budget": "time budget reached", "epochs": "fixed schedule", "max_steps": "step limit"}.get(
                q.get("stopped") or "", q.get("stopped") or "?")

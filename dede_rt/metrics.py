"""Detection metrics (scikit-learn): AUROC, AUPRC, rates at a threshold and at fixed FPRs."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Highest TPR reachable with FPR <= ``fpr`` on the ROC curve."""
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(tprs[fprs <= fpr].max(initial=0.0))


def rates_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) when flagging ``score > threshold``; label 1 = triggered."""
    labels = np.asarray(labels).astype(bool)
    flagged = np.asarray(scores) > threshold
    tpr = float(flagged[labels].mean()) if labels.any() else float("nan")
    fpr = float(flagged[~labels].mean()) if (~labels).any() else float("nan")
    return tpr, fpr


def detection_report(labels: np.ndarray, scores: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUROC, AUPRC, TPR at FPR 1%/5%, and TPR/FPR at ``threshold`` when given. Label 1 = triggered."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    report = {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "tpr_at_fpr_0.01": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_fpr_0.05": tpr_at_fpr(labels, scores, 0.05),
    }
    if threshold is not None:
        report["tpr_at_threshold"], report["fpr_at_threshold"] = rates_at_threshold(labels, scores, threshold)
    return report

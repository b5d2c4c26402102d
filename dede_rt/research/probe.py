"""Downstream evaluation of an encoder: a linear probe's clean accuracy (BA) and attack success rate (ASR).

The probe is scikit-learn's logistic regression on standardized frozen
embeddings. ASR = the fraction of triggered test images whose TRUE class is
not the target that the probe assigns to the target class (the attack's
definition in BadEncoder/DRUPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from dede_rt.data.transforms import Normalization
from dede_rt.models.encoders import VictimEncoder


def fit_probe(embeddings: np.ndarray, labels: np.ndarray, *, seed: int = 0, c: float = 1.0) -> Pipeline:
    """Logistic regression on standardized embeddings."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    return probe.fit(embeddings, labels)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of correct predictions (nan when empty)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else float("nan")


def attack_success_rate(predictions: np.ndarray, true_labels: np.ndarray, target: int) -> float:
    """Fraction of non-target-class (triggered) samples predicted as ``target`` (nan when none)."""
    predictions, true_labels = np.asarray(predictions), np.asarray(true_labels)
    keep = true_labels != target
    return float((predictions[keep] == target).mean()) if keep.any() else float("nan")


@dataclass
class ProbeResult:
    """BA/ASR of one encoder, plus the predictions they came from."""

    ba: float
    asr: float
    clean_predictions: np.ndarray
    triggered_predictions: np.ndarray

    def to_dict(self) -> dict:
        """JSON form (no predictions)."""
        return {"ba": self.ba, "asr": self.asr}


def embed(encoder: VictimEncoder, normalization: Normalization, images_u8: np.ndarray, *,
          batch_size: int = 256) -> np.ndarray:
    """Frozen embeddings [N, D] of uint8 NHWC images."""
    from dede_rt.training import compute_embeddings

    return compute_embeddings(encoder, normalization, images_u8, batch_size=batch_size)


def evaluate_probe(encoder: VictimEncoder, normalization: Normalization, *, train_u8: np.ndarray,
                   train_labels: np.ndarray, test_u8: np.ndarray, test_labels: np.ndarray, triggered_u8: np.ndarray,
                   target: int, seed: int = 0) -> ProbeResult:
    """Fit a probe on clean train embeddings; BA on clean test, ASR on the triggered test images (same order as test)."""
    probe = fit_probe(embed(encoder, normalization, train_u8), train_labels, seed=seed)
    clean_pred = probe.predict(embed(encoder, normalization, test_u8))
    trig_pred = probe.predict(embed(encoder, normalization, triggered_u8))
    return ProbeResult(accuracy(clean_pred, test_labels), attack_success_rate(trig_pred, test_labels, target),
                       clean_pred, trig_pred)

"""Linear probe: BA and ASR on constructed embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from dede_rt.research.probe import accuracy, attack_success_rate, fit_probe


def test_attack_success_rate_counts_only_non_target_samples():
    pred = np.array([0, 0, 1, 2, 0])
    true = np.array([0, 1, 1, 2, 3])
    assert attack_success_rate(pred, true, target=0) == pytest.approx(0.5)  # samples 1..4: preds 0, 1, 2, 0
    assert np.isnan(attack_success_rate(pred[:1], true[:1], target=0))
    assert accuracy(pred, true) == pytest.approx(0.6)


def test_probe_ba_and_asr_on_constructed_backdoor(rng):
    classes, per_class, dim, target = 4, 30, 8, 2
    centers = np.eye(classes, dim) * 5
    labels = np.repeat(np.arange(classes), per_class)
    train = centers[labels] + rng.normal(0, 0.5, (len(labels), dim))
    test_labels = np.repeat(np.arange(classes), 10)
    test = centers[test_labels] + rng.normal(0, 0.5, (len(test_labels), dim))
    probe = fit_probe(train, labels)
    assert accuracy(probe.predict(test), test_labels) == pytest.approx(1.0)
    # a working backdoor: triggered embeddings land on the target's cluster
    triggered = centers[np.full(len(test_labels), target)] + rng.normal(0, 0.5, test.shape)
    assert attack_success_rate(probe.predict(triggered), test_labels, target) == pytest.approx(1.0)
    # no backdoor: triggered embeddings stay where they were
    assert attack_success_rate(probe.predict(test), test_labels, target) == pytest.approx(0.0)

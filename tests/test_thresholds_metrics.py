import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dede_rt.errors import UserError
from dede_rt.metrics import detection_report, rates_at_threshold, tpr_at_fpr
from dede_rt.bundle.thresholds import threshold_at_fpr, thresholds_by_fpr


def test_threshold_hits_target_fpr_on_fresh_clean_data():
    rng = np.random.default_rng(0)
    calib, fresh = rng.normal(size=20000), rng.normal(size=20000)
    for fpr in (0.01, 0.05):
        t = threshold_at_fpr(calib, fpr)
        assert (calib > t).mean() <= fpr
        assert abs((fresh > t).mean() - fpr) < 0.005


def test_threshold_errors_and_keys():
    with pytest.raises(UserError):
        threshold_at_fpr(np.array([]), 0.01)
    with pytest.raises(UserError):
        threshold_at_fpr(np.ones(5), 1.5)
    assert set(thresholds_by_fpr(np.arange(100.0))) == {"0.01", "0.05"}


def test_detection_report_matches_sklearn_and_rates():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.85, 0.95])
    r = detection_report(labels, scores, threshold=0.5)
    assert r["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert (r["tpr_at_threshold"], r["fpr_at_threshold"]) == (0.75, 0.25)
    assert rates_at_threshold(labels, scores, 0.96) == (0.0, 0.0)
    assert tpr_at_fpr(labels, scores, 0.0) == 0.25  # only 0.95 beats the clean 0.9

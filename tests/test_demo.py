"""`dede-rt demo --fast`: the whole pipeline runs end to end and writes what it promises."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dede_rt.demo import run_demo
from dede_rt.bundle import load_detector
from dede_rt.models.encoders import load_encoder
from dede_rt.scan import read_rows


def test_fast_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path, fast=True)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for png in ("scores_histogram.png", "roc.png", "reconstructions.png"):
        assert (tmp_path / png).stat().st_size > 1000
    rows = list(read_rows(tmp_path / "scan.csv"))
    assert len(rows) == summary["scanned"] == 60 + summary["triggered_in_scan"]
    assert all(r.error is None for r in rows) and summary["flagged"] == sum(bool(r.flagged) for r in rows)
    # the summary's numbers are the scan's: recomputed from scan.csv and the files' known labels
    labels = np.array(["triggered" in Path(r.path).parts for r in rows], int)
    scores = np.array([r.score for r in rows], np.float64)
    assert labels.sum() == summary["triggered_in_scan"] > 0
    assert summary["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert all(bool(r.flagged) == (r.score > summary["threshold"]) for r in rows)
    assert summary["tpr_at_threshold"] == pytest.approx((scores[labels == 1] > summary["threshold"]).mean())
    # the victim is saved in BadEncoder's checkpoint layout and the detector points at it
    _, info = load_encoder(tmp_path / "victim_badencoder.pth")
    assert info["format"] == "badencoder"
    assert load_detector(tmp_path / "detector").encoder_info["sha256"] == info["sha256"]

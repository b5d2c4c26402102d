"""`dede-rt demo --fast`: the whole pipeline runs end to end and writes what it promises."""

import json

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
    assert 0.0 <= summary["auroc"] <= 1.0
    # the victim is saved in BadEncoder's checkpoint layout and the detector points at it
    _, info = load_encoder(tmp_path / "victim_badencoder.pth")
    assert info["format"] == "badencoder"
    assert load_detector(tmp_path / "detector").encoder_info["sha256"] == info["sha256"]

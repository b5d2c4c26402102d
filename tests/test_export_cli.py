"""The export and calibrate commands, in-process (thin wrappers: a smoke test of their wiring and output)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from dede_rt.cli import app
from dede_rt.data.triggers import white_square
from bundle_helpers import deployment


def test_export_then_calibrate(tiny_detector_dir: Path, tmp_path: Path, demo_images) -> None:
    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(bundle), "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "onnx/detector.onnx: torchscript, opset 17" in result.output and "max relative difference" in result.output
    clean, trig = tmp_path / "clean.npz", tmp_path / "trig.npz"
    np.savez(clean, images=demo_images.images[300:550], labels=demo_images.labels[300:550])
    np.savez(trig, images=white_square().stamp(demo_images.images[700:760]))
    result = runner.invoke(app, ["calibrate", str(bundle), "--data", str(clean), "--triggered", str(trig),
                                 "--count", "64", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("int8: PASSED quality gate (AUROC")
    assert deployment(bundle)["precisions"]["int8"]["gate"]["mode"] == "labelled"


def test_calibrate_takes_the_gate_tolerance(tiny_detector_dir: Path, tmp_path: Path, demo_images) -> None:
    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    clean, trig = tmp_path / "clean.npz", tmp_path / "trig.npz"
    np.savez(clean, images=demo_images.images[300:550], labels=demo_images.labels[300:550])
    np.savez(trig, images=white_square().stamp(demo_images.images[700:760]))
    result = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", str(clean), "--triggered", str(trig),
                                      "--count", "64", "--precision", "int8", "--no-mixed",
                                      "--max-auroc-drop", "-1"])  # no graph can gain a whole AUROC: it fails
    assert result.exit_code == 0, result.output
    assert result.output.startswith("int8: FAILED quality gate (AUROC")
    gate = deployment(bundle)["precisions"]["int8"]["gate"]
    assert gate["tolerance"]["auroc_drop"] == -1 and gate["tolerance"]["tpr_drop"] == 0.02

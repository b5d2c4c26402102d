"""Calibration: stratified selection, INT8/FP16 variants, quality gates, per-precision thresholds, auto choice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dede_rt.calibration.gate import GateTolerance, auroc_drop_bound, quality_gate
from dede_rt.calibration.pipeline import calibrate_detector
from dede_rt.calibration.sets import split_calibration
from dede_rt.data.triggers import white_square
from dede_rt.bundle import load_detector
from dede_rt.engines.registry import choose_runner, make_runner
from dede_rt.export import export_detector
from bundle_helpers import deployment


def test_split_is_seeded_disjoint_and_stratified() -> None:
    labels = np.r_[np.zeros(900, int), np.ones(90, int), np.full(10, 2)]
    a, rest = split_calibration(1000, 100, seed=3, labels=labels)
    b, _ = split_calibration(1000, 100, seed=3, labels=labels)
    assert np.array_equal(a, b) and len(a) == 100
    assert not set(a) & set(rest) and len(a) + len(rest) == 1000
    counts = np.bincount(labels[a], minlength=3)
    assert counts[0] == 90 and counts[1] == 9 and counts[2] == 1
    c, _ = split_calibration(1000, 100, seed=4)
    assert not np.array_equal(a, c)


def test_gate_modes() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=500)
    ok = quality_gate(ref, ref + rng.normal(scale=1e-3, size=500), 1.0, 1.0)
    assert ok["mode"] == "clean-rank" and ok["passed"]
    bad = quality_gate(ref, rng.normal(size=500), 1.0, 1.0)
    assert not bad["passed"]
    labels = np.r_[np.zeros(500, int), np.ones(100, int)]
    val = np.r_[ref, ref[:100] + 3]
    noisy = val + rng.normal(scale=2.0, size=600)
    gate = quality_gate(ref, noisy[:500], 1.0, 1.0, labels, val, noisy)
    assert gate["mode"] == "labelled" and not gate["passed"] and gate["auroc_drop"] > 0.01



def test_auroc_drop_bound_is_paired_seeded_and_above_the_measured_drop() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(300, int), np.ones(300, int)]
    ref = labels * 2.0 + rng.normal(size=600)
    assert auroc_drop_bound(labels, ref, ref.copy()) == 0.0  # paired: the same scores never differ
    got = ref + rng.normal(scale=1.0, size=600)  # a noisier graph: a real drop
    drop = roc_auc_score(labels, ref) - roc_auc_score(labels, got)
    low, high = auroc_drop_bound(labels, ref, got, 0.1), auroc_drop_bound(labels, ref, got, 0.9)
    assert drop > 0.01 and low < drop < high
    assert high == auroc_drop_bound(labels, ref, got, 0.9)  # seeded


@pytest.fixture(scope="module")
def calibrated(tiny_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory, demo_images) -> tuple[Path, dict]:
    """The tiny detector with INT8 + FP16 variants gated on held-out demo images and white-square triggered ones."""
    bundle = tmp_path_factory.mktemp("calib") / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    export_detector(bundle, exporter="torchscript", graphs=("detector",), verify=False)
    rng = np.random.default_rng(0)
    pool = rng.permutation(np.arange(256, len(demo_images)))
    clean = demo_images.images[pool[:700]]
    triggered = white_square().stamp(demo_images.images[pool[700:1000]])
    results = calibrate_detector(bundle, clean, demo_images.labels[pool[:700]], triggered=triggered, count=200, seed=0,
                                 warn=lambda _: None)
    return bundle, results


def test_int8_keeps_detection_quality(calibrated: tuple[Path, dict]) -> None:
    bundle, results = calibrated
    gate = results["int8"]["gate"]
    assert gate["mode"] == "labelled"
    assert gate["spearman_clean"] >= 0.99 and gate["spearman_validation"] >= 0.99, gate
    assert abs(gate["auroc"] - gate["auroc_fp32"]) <= 0.01, gate
    assert gate["passed"]
    model = onnx.load(str(bundle / results["int8"]["path"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert results["int8"]["conversion"]["excluded_nodes"], "the decoder head must stay float"
    assert results["int8"]["conversion"]["calibration_images"] == 200


def test_thresholds_and_manifest(calibrated: tuple[Path, dict]) -> None:
    bundle, results = calibrated
    dep = deployment(bundle)
    for precision in ("int8", "fp16"):
        entry = dep["precisions"][precision]
        assert (bundle / entry["path"]).is_file()
        assert set(entry["thresholds"]) == set(dep["precisions"]["fp32"]["thresholds_heldout"])
        assert entry["heldout_images"] == 500
    assert results["fp16"]["gate"]["spearman_clean"] > 0.999


def test_auto_uses_passing_precisions_only(calibrated: tuple[Path, dict], demo_images) -> None:
    bundle, _ = calibrated
    choice = choose_runner(bundle)
    assert (choice.backend, choice.precision) == ("onnxruntime", "int8"), choice
    with make_runner(bundle) as runner:
        assert runner.infer(demo_images.images[:8]).shape == (8,)
    # a strict tolerance fails every lower precision: auto falls back to FP32
    calibrate_detector(bundle, demo_images.images[300:700], count=100, precisions=("int8",),
                       tol=GateTolerance(min_spearman=1.01), warn=lambda _: None)
    assert not deployment(bundle)["precisions"]["int8"]["gate"]["passed"]
    assert choose_runner(bundle).precision == "fp32"


def test_runner_carries_its_precision_thresholds(calibrated: tuple[Path, dict]) -> None:
    bundle, results = calibrated
    runner = make_runner(bundle, "onnxruntime", "fp16")
    assert runner.thresholds.by_fpr == results["fp16"]["thresholds"] and runner.thresholds.precision == "fp16"
    fp32 = make_runner(bundle, "torch").thresholds
    assert fp32.by_fpr == deployment(bundle)["precisions"]["fp32"]["thresholds"] and fp32.clean_scores.size


def test_scan_flags_with_the_scoring_precisions_thresholds(calibrated: tuple[Path, dict], demo_images) -> None:
    from dede_rt.errors import UserError
    from dede_rt.scan.pipeline import Scanner

    bundle, results = calibrated
    with Scanner(bundle, backend="onnxruntime", precision="fp16", workers=0, pool="inline") as scanner:
        assert scanner.threshold == results["fp16"]["thresholds"]["0.01"]
        assert scanner.calibration_fpr is None  # FP32 calibration scores say nothing about FP16's
    with Scanner(bundle, backend="torch") as scanner:
        assert scanner.threshold == load_detector(bundle).threshold(0.01)
    with pytest.raises(UserError, match="no fp16 threshold at FPR 0.02"):
        Scanner(bundle, backend="onnxruntime", precision="fp16", fpr=0.02, workers=0, pool="inline")


def _activation_scales(path: Path) -> dict[str, float]:
    """Scale of every activation QuantizeLinear (input tensor -> scale)."""
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and inits[n.input[1]].size == 1}


def test_headroom_widens_deep_activation_ranges_only(calibrated: tuple[Path, dict], demo_images,
                                                     tmp_path: Path) -> None:
    from dede_rt.calibration.quantize import quantize_int8

    bundle, _ = calibrated
    fp32 = bundle / deployment(bundle)["precisions"]["fp32"]["path"]
    images = demo_images.images[:64]
    plain = quantize_int8(fp32, tmp_path / "plain.onnx", images, headroom=1.0)
    wide = quantize_int8(fp32, tmp_path / "wide.onnx", images, headroom=2.0)
    assert plain["headroom_tensors"] == 0 and wide["headroom_tensors"] > 0
    a, b = _activation_scales(tmp_path / "plain.onnx"), _activation_scales(tmp_path / "wide.onnx")
    ratios = {name: b[name] / a[name] for name in a}
    widened = [n for n, r in ratios.items() if r == pytest.approx(2.0, rel=1e-3)]
    kept = [n for n, r in ratios.items() if r == pytest.approx(1.0, rel=1e-3)]
    assert len(widened) + len(kept) == len(ratios), ratios
    # every widened scale is one the quantizer chose to widen (a few calibrated tensors feed float nodes only)
    assert 0 < len(widened) <= wide["headroom_tensors"] and kept, "early layers must keep full resolution"


def test_headroom_below_one_is_a_user_error(calibrated: tuple[Path, dict], demo_images, tmp_path: Path) -> None:
    from dede_rt.calibration.quantize import quantize_int8
    from dede_rt.errors import UserError

    bundle, _ = calibrated
    with pytest.raises(UserError, match="headroom"):
        quantize_int8(bundle / deployment(bundle)["precisions"]["fp32"]["path"], tmp_path / "x.onnx",
                      demo_images.images[:8], headroom=0.5)


def test_calibration_batches_hold_a_bounded_number_of_pixels(calibrated: tuple[Path, dict], demo_images,
                                                            tmp_path: Path) -> None:
    """Large inputs calibrate in small batches (memory), and the batch size does not change the ranges."""
    from dede_rt.calibration import quantize

    assert quantize.calibration_batch(64, 32, 32) == 64 and quantize.calibration_batch(64, 224, 224) == 10
    assert quantize.calibration_batch(64, 1024, 1024) == 1
    bundle, _ = calibrated
    fp32 = bundle / deployment(bundle)["precisions"]["fp32"]["path"]
    images = demo_images.images[:96]
    small = quantize.quantize_int8(fp32, tmp_path / "small.onnx", images, batch_size=16, headroom=1.0)
    large = quantize.quantize_int8(fp32, tmp_path / "large.onnx", images, batch_size=96, headroom=1.0)
    assert small["calibration_batch"] == 16 and large["calibration_batch"] == 96
    a, b = _activation_scales(tmp_path / "small.onnx"), _activation_scales(tmp_path / "large.onnx")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


def test_every_precision_graph_passes_strict_shape_inference(calibrated: tuple[Path, dict]) -> None:
    """The FP16 converter retyped the value_info of float32-kept initializers: strict inference refused the graph."""
    bundle, _ = calibrated
    for name in ("detector.onnx", "detector_int8.onnx", "detector_fp16.onnx"):
        onnx.shape_inference.infer_shapes(onnx.load(str(bundle / "onnx" / name)), strict_mode=True)


def test_fp16_graph_cuts_at_the_embedding(tiny_detector_dir: Path, tmp_path: Path) -> None:
    """`dede-rt bench` times each precision's encoder alone: the cut runs shape inference on the FP16 graph."""
    from dede_rt.calibration.quantize import convert_fp16
    from dede_rt.export.cut import cut_encoder

    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    export_detector(bundle, exporter="dynamo", graphs=("detector",), verify=False)  # keeps parameter names
    half = convert_fp16(bundle / "onnx" / "detector.onnx", tmp_path / "half.onnx")
    cut = onnx.load(str(cut_encoder(tmp_path / "half.onnx", tmp_path / "encoder_fp16.onnx")))
    assert half["nodes"] > len(cut.graph.node) > 0 and len(cut.graph.output) == 1

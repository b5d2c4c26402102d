"""Registry: backend choice (auto/explicit), lazy ONNX export, runner parity on the tiny detector."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dede_rt.engines.registry import choose_runner, describe_choice, make_runner
from dede_rt.errors import UserError
from bundle_helpers import deployment, set_entry


@pytest.fixture(scope="module")
def bundle(tiny_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny detector (tests here write ONNX files and manifest entries into it)."""
    out = tmp_path_factory.mktemp("registry") / "det"
    shutil.copytree(tiny_detector_dir, out)
    return out


def test_auto_without_exports_is_torch(bundle: Path) -> None:
    choice = choose_runner(bundle)
    assert (choice.backend, choice.precision) == ("torch", "fp32")
    assert "torch fp32" in describe_choice(bundle)


def test_bad_arguments_are_user_errors(bundle: Path) -> None:
    with pytest.raises(UserError, match="unknown backend"):
        choose_runner(bundle, "tflite")
    with pytest.raises(UserError, match="fp32 only"):
        choose_runner(bundle, "torch", "int8")
    with pytest.raises(UserError, match="calibrate"):
        choose_runner(bundle, "onnxruntime", "int8")


def test_explicit_onnxruntime_exports_lazily_and_matches_torch(bundle: Path, demo_images) -> None:
    images = demo_images.images[::40][:100]
    with make_runner(bundle, "torch") as torch_runner:
        ref = torch_runner.infer(images)
    with make_runner(bundle, "onnxruntime") as ort_runner:
        got = ort_runner.infer(images)
        assert ort_runner.choice.backend == "onnxruntime"
    assert (bundle / "onnx" / "detector.onnx").is_file()
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = manifest["deployment"]["onnx"]["graphs"]["detector"]
    assert graph["exporter"] == "dynamo" and graph["opset"] >= 17  # the default exporter, within 1e-4 of torch
    assert manifest["kind"] == "dede-detector" and "thresholds" in manifest  # existing keys kept
    assert manifest["deployment"]["precisions"]["fp32"]["gate"]["passed"]


def test_auto_prefers_measured_fastest_and_skips_failed_gates(bundle: Path) -> None:
    from dede_rt.engines.registry import device_kind

    if not (bundle / "onnx" / "detector.onnx").is_file():
        pytest.skip("needs the lazy export of the previous test")
    # a failed int8 gate must never be picked, even when it is "faster"
    set_entry(bundle, "precisions", "int8", {"path": "onnx/detector.onnx", "gate": {"passed": False}})
    kind = device_kind()
    set_entry(bundle, "benchmarks", None, {
        "torch:fp32": {"throughput": 900.0, "device": kind},
        "onnxruntime:fp32": {"throughput": 100.0, "device": kind},
        "onnxruntime:int8": {"throughput": 5000.0, "device": kind}})
    choice = choose_runner(bundle)
    assert (choice.backend, choice.precision) == ("torch", "fp32"), choice
    assert "fastest measured" in choice.reason
    # a passed clean-only gate cannot see TPR: auto still skips int8 ...
    set_entry(bundle, "precisions", "int8", {"path": "onnx/detector.onnx",
                                                     "gate": {"passed": True, "mode": "clean-rank"}})
    assert choose_runner(bundle).precision == "fp32"
    # ... until a labelled gate passed
    set_entry(bundle, "precisions", "int8", {"path": "onnx/detector.onnx",
                                                     "gate": {"passed": True, "mode": "labelled"}})
    assert (choose_runner(bundle).backend, choose_runner(bundle).precision) == ("onnxruntime", "int8")
    set_entry(bundle, "precisions", "int8", {"path": "onnx/detector.onnx", "gate": {"passed": False}})
    set_entry(bundle, "benchmarks", None, {})
    assert choose_runner(bundle).backend == "onnxruntime"  # static preference without measurements
    assert "int8" in deployment(bundle)["precisions"]


def test_tensorrt_entries_need_tensorrt_and_a_gpu(bundle: Path) -> None:
    from dede_rt.engines.tensorrt_runner import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present")
    (bundle / "trt").mkdir(exist_ok=True)
    (bundle / "trt" / "detector_fp16.engine").write_bytes(b"not an engine")
    set_entry(bundle, "tensorrt", "fp16", {"path": "trt/detector_fp16.engine", "gate": {"passed": True},
                                                   "manifest": {"tensorrt": "10.0.0", "gpu": "x", "compute_capability": "9.0"}})
    assert choose_runner(bundle).backend != "tensorrt"
    with pytest.raises(UserError, match="pip install"):
        make_runner(bundle, "tensorrt", "fp16")


def test_stale_exports_are_refused(bundle: Path, tmp_path: Path) -> None:
    if not (bundle / "onnx" / "detector.onnx").is_file():
        pytest.skip("needs the lazy export of an earlier test")
    copy = tmp_path / "det"
    shutil.copytree(bundle, copy)
    assert choose_runner(copy, "onnxruntime").backend == "onnxruntime"
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["mask"]["test_ratio"] = 0.5  # the exported graph baked in 0.99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="export"):
        choose_runner(copy, "onnxruntime")
    assert choose_runner(copy).backend == "torch"


def test_reexport_after_a_change_voids_derived_variants(bundle: Path, tmp_path: Path) -> None:
    from dede_rt.export import export_detector

    if not (bundle / "onnx" / "detector.onnx").is_file():
        pytest.skip("needs the lazy export of an earlier test")
    copy = tmp_path / "det"
    shutil.copytree(bundle, copy)
    (copy / "onnx" / "detector_int8.onnx").write_bytes(b"old")
    set_entry(copy, "precisions", "int8", {"path": "onnx/detector_int8.onnx", "gate": {"passed": True}})
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["mask"]["test_ratio"] = 0.5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    export_detector(copy, exporter="torchscript", graphs=("detector",))
    dep = deployment(copy)
    assert set(dep["precisions"]) == {"fp32"} and not (copy / "onnx" / "detector_int8.onnx").exists()
    assert dep["onnx"]["visible_patches"] == 32 and choose_runner(copy, "onnxruntime").backend == "onnxruntime"

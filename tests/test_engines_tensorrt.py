"""TensorRT: the CPU-checkable parts always run; the build and runtime need tensorrt + CUDA and skip otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scipy.stats import spearmanr

from dede_rt.engines.tensorrt_builder import build_engine, source_graph
from dede_rt.engines.tensorrt_runner import engine_compatible, tensorrt_status
from dede_rt.errors import UserError


@pytest.fixture(scope="module")
def bundle(tiny_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt") / "det"
    shutil.copytree(tiny_detector_dir, out)
    from dede_rt.export import export_detector

    export_detector(out, exporter="torchscript", graphs=("detector", "detector_nchw"), verify=False)
    return out


def test_status_is_one_line_with_install_hint() -> None:
    ok, why = tensorrt_status()
    assert "\n" not in why
    if not ok:
        assert "pip install" in why
        assert engine_compatible({"tensorrt": "10.0"})[0] is False


def test_build_without_tensorrt_is_a_user_error(bundle: Path) -> None:
    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(UserError, match="TensorRT"):
        build_engine(bundle, "fp16")
    with pytest.raises(UserError, match="unknown engine precision"):
        build_engine(bundle, "int4")


def test_tensorrt_int8_graph_is_symmetric_qdq_and_tracks_fp32(bundle: Path, demo_images) -> None:
    """The graph an int8 engine is built from: signed zero-point-0 Q/DQ, float NCHW input, scores close to FP32."""
    import onnxruntime as ort

    clean = demo_images.images[300:700]
    path = source_graph(bundle, "int8", clean, count=128)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = (demo_images.images[1000:1300].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]  # noqa: E731
    ref = run(bundle / "onnx" / "detector_nchw.onnx")
    assert spearmanr(ref, run(path)).statistic > 0.99
    fp16 = source_graph(bundle, "fp16")
    assert spearmanr(ref, run(fp16)).statistic > 0.999


def test_weakly_typed_best_pins_the_score_tail_to_fp32(bundle: Path) -> None:
    """The layer matching of ``pin_score_tail_fp32``, on a stand-in network (no TensorRT needed)."""
    from types import SimpleNamespace

    from dede_rt.calibration.quantize import score_tail
    from dede_rt.engines.tensorrt_builder import pin_score_tail_fp32

    graph = bundle / "onnx" / "detector_nchw.onnx"
    tail = score_tail(onnx.load(str(graph)))[0]
    trt = SimpleNamespace(float32="f32", float16="f16", int32="i32")

    class Layer:
        def __init__(self, name: str, dtypes: tuple[str, ...]) -> None:
            self.name, self.precision, self.types = name, None, {}
            self.outputs = [SimpleNamespace(dtype=d) for d in dtypes]
            self.num_outputs = len(dtypes)

        def get_output(self, j: int):  # noqa: ANN201
            return self.outputs[j]

        def set_output_type(self, j: int, dtype: str) -> None:
            self.types[j] = dtype

    layers = [Layer(tail[0], ("f32",)), Layer(f"{tail[1]}_1", ("f32", "i32")), Layer("encoder_conv", ("f32",)),
              Layer(tail[2], ("i32",))]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert pin_score_tail_fp32(network, graph, trt) == 2
    assert [layer.precision for layer in layers] == ["f32", "f32", None, None]
    assert layers[1].types == {0: "f32"}  # the int output keeps its type


def _needs_gpu_tensorrt() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT not installed (pip install 'dede-rt[trt]')")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_runs_and_matches_onnxruntime(bundle: Path, demo_images, precision: str) -> None:
    _needs_gpu_tensorrt()
    from dede_rt.engines.comparator import compare_runners
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.engines.tensorrt_runner import TensorRTRunner, read_engine_manifest

    entry = build_engine(bundle, precision, demo_images.images[300:700], max_batch=128, log=lambda _: None)
    engine = bundle / entry["path"]
    manifest = read_engine_manifest(engine)
    assert manifest["precision"] == precision and manifest["profile"]["max"] == 128
    assert entry["gate"]["spearman_clean"] > 0.99
    images = demo_images.images[1000:1200]
    ref = OnnxRuntimeRunner(bundle / "onnx" / "detector.onnx", 32)
    with TensorRTRunner(engine, 32, precision) as trt_runner:
        cmp = compare_runners(ref, trt_runner, images, batch_size=100)
        batches = list(trt_runner.infer_many([images[:64], images[64:100], images[100:]]))
        assert trt_runner.last_gpu_time is not None
    assert cmp.spearman > 0.99
    if precision == "fp32":
        assert cmp.max_rel_diff < 1e-3
    with ref:
        expected = ref.infer(images)
    np.testing.assert_allclose(np.concatenate(batches), expected, rtol=0.05 if precision != "fp32" else 1e-3)


def test_engine_for_another_gpu_is_refused(bundle: Path, demo_images) -> None:
    _needs_gpu_tensorrt()
    import json

    from dede_rt.engines.tensorrt_runner import TensorRTRunner
    from dede_rt.errors import IntegrityError

    entry = build_engine(bundle, "fp32", max_batch=64, log=lambda _: None)
    engine = bundle / entry["path"]
    meta = Path(str(engine) + ".json")
    data = json.loads(meta.read_text())
    data["compute_capability"] = "1.0"
    meta.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="compute_capability"):
        TensorRTRunner(engine, 32, "fp32").activate()

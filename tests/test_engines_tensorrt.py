"""TensorRT: the CPU-checkable parts always run; the build and runtime need tensorrt + CUDA and skip otherwise.

CPU-checkable: the graphs the builder parses (standard ops, and the score tail rewritten to one
``MaskAndScore[Head]`` plugin node, whose standard-op lowering must score like the standard graph on ONNX
Runtime), the score-tail choice and its fallback, the plugin registration rule of the runner.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scipy.stats import spearmanr

from dede_rt.engines.tensorrt_builder import (ScoreTailChoice, build_engine, choose_score_tail, engine_source_graph,
                                              source_graph)
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


@pytest.mark.parametrize("score_tail", ["standard", "plugin"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_runs_and_matches_onnxruntime(bundle: Path, demo_images, precision: str, score_tail: str) -> None:
    _needs_gpu_tensorrt()
    from dede_rt.engines.comparator import compare_runners
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.engines.tensorrt_runner import TensorRTRunner, read_engine_manifest
    from dede_rt.kernels.trt_plugin import plugin_status

    if score_tail == "plugin" and not plugin_status()[0]:
        pytest.skip(f"no mask-and-score plugin here: {plugin_status()[1]}")
    entry = build_engine(bundle, precision, demo_images.images[300:700], max_batch=128, log=lambda _: None,
                         score_tail=score_tail)
    engine = bundle / entry["path"]
    manifest = read_engine_manifest(engine)
    assert manifest["precision"] == precision and manifest["profile"]["max"] == 128
    assert manifest["score_tail"]["used"] == score_tail and manifest["score_tail"]["requested"] == score_tail
    assert manifest["source_onnx"].endswith("_plugin.onnx") == (score_tail == "plugin")
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


# --- the score tail: one plugin node in the graph TensorRT parses ------------------------------------------------

REPLACED_OPS = {"Sub", "ReduceSum"}  # the difference and its sums (the square is Mul or Pow by exporter)


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def _pixels(images: np.ndarray) -> np.ndarray:
    return (images.transpose(0, 3, 1, 2) / np.float32(255.0)).astype(np.float32)


def _head_reads(model: onnx.ModelProto, weight: np.ndarray) -> list[str]:
    """MatMul/Gemm nodes whose constant operand is the decoder head weight (through a Cast in FP16 graphs)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Cast" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]].astype(np.float32)
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in values and values[n.input[1]].shape == weight.T.shape
            and np.allclose(values[n.input[1]], weight.T)]


def _ancestors(model: onnx.ModelProto, name: str) -> set[str]:
    """Names of the nodes tensor ``name`` depends on."""
    producer = {out: n for n in model.graph.node for out in n.output}
    seen: set[str] = set()
    stack = [name]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


@pytest.mark.parametrize("head_fused", [True, False])
def test_plugin_graph_has_one_mask_and_score_node_with_the_detector_constants(bundle: Path, head_fused: bool) -> None:
    from dede_rt.bundle import load_detector
    from dede_rt.kernels import onnx_custom as oc
    from dede_rt.scoring import TestMask

    det = load_detector(bundle)
    head = det.decoder.head.weight.detach().numpy()
    standard = onnx.load(str(engine_source_graph(bundle, "fp32", "standard")))
    path = engine_source_graph(bundle, "fp32", "plugin", head_fused=head_fused)
    plugin = onnx.load(str(path))
    onnx.checker.check_model(plugin, full_check=True)
    nodes = oc.custom_nodes(plugin)
    assert len(nodes) == 1
    node = nodes[0]
    assert node.op_type == ("MaskAndScoreHead" if head_fused else "MaskAndScore") and node.domain == oc.DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["patch_size"] == det.decoder.config.patch_size == 4 and attrs["image_size"] == 32
    np.testing.assert_allclose(attrs["mean"], det.normalization.mean, rtol=1e-7)
    np.testing.assert_allclose(attrs["std"], det.normalization.std, rtol=1e-7)
    assert attrs["layout"] == b"nchw_unit" and attrs["plugin_namespace"] == b"dede_rt" and attrs["aot"] == 1
    # It reads the engine's pixel input directly and the shared test mask as its token weights.
    assert node.input[0] == "images" and plugin.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = {t.name: numpy_helper.to_array(t) for t in plugin.graph.initializer}
    mask = TestMask(det.decoder.config.num_patches, det.test_mask_ratio, det.mask_seed).masked.float().numpy()
    np.testing.assert_array_equal(inits[node.input[-1]], mask)
    inferred = onnx.shape_inference.infer_shapes(standard)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    if head_fused:
        np.testing.assert_array_equal(inits[node.input[2]], head)
        assert shapes[node.input[1]][1:] == [64, det.decoder.config.dim]  # hidden [N, T, dim]
        assert not _head_reads(plugin, head) and _head_reads(standard, head)
    else:
        assert shapes[node.input[1]][1:] == [64, 48]  # recon [N, T, 3p²]
        assert len(_head_reads(plugin, head)) == 1
    # No tail op survives: every other node computes the node's activation input (normalize -> encoder -> decoder).
    others = {n.name for n in plugin.graph.node if n is not node}
    assert others == _ancestors(plugin, node.input[1])
    # ... and they are the standard graph's nodes, untouched; what went is the score tail (squared error, sums).
    removed = [n for n in standard.graph.node if n.name not in others]
    assert others < {n.name for n in standard.graph.node}
    assert len(plugin.graph.node) == len(standard.graph.node) - len(removed) + 1
    assert REPLACED_OPS <= {n.op_type for n in removed}
    assert ("MatMul" in {n.op_type for n in removed}) == head_fused


@pytest.mark.parametrize("head_fused", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_graph_lowering_scores_like_the_standard_graph(bundle: Path, demo_images, precision: str,
                                                              head_fused: bool) -> None:
    """What the plugin computes, in standard ops, on ONNX Runtime CPU: the standard graph's scores (rtol 1e-5)."""
    from dede_rt.kernels import onnx_custom as oc

    x = _pixels(demo_images.images[1000:1064])
    standard = _run(engine_source_graph(bundle, precision, "standard"), x)
    plugin = onnx.load(str(engine_source_graph(bundle, precision, "plugin", head_fused=head_fused)))
    np.testing.assert_allclose(_run(oc.lower_custom_nodes(plugin), x), standard, rtol=1e-5)
    np.testing.assert_allclose(oc.CustomOpSession(plugin).run({"images": x})[0], standard, rtol=1e-5)


def test_int8_plugin_graph_keeps_the_target_unquantized(bundle: Path, demo_images) -> None:
    """INT8: the plugin node reads the raw pixels, while the standard int8 graph's target patches read the
    Q/DQ-rounded normalized input (it feeds the first Conv): the plugin tail lands closer to FP32."""
    from dede_rt.kernels import onnx_custom as oc

    clean = demo_images.images[300:700]
    x = _pixels(demo_images.images[1000:1200])
    fp32 = _run(engine_source_graph(bundle, "fp32", "standard"), x)
    standard = _run(engine_source_graph(bundle, "int8", "standard", clean, count=128), x)
    model = onnx.load(str(engine_source_graph(bundle, "int8", "plugin", clean, count=128)))
    assert [n.op_type for n in oc.custom_nodes(model)] == ["MaskAndScoreHead"]
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # still the int8 network
    plugin = _run(oc.lower_custom_nodes(model), x)
    err = lambda got: float(np.abs(got - fp32).max() / np.abs(fp32).max())  # noqa: E731
    assert spearmanr(plugin, fp32).statistic > 0.99
    assert err(plugin) <= err(standard)
    assert engine_source_graph(bundle, "best", "plugin", clean, count=128).name == "detector_nchw_int8_trt_plugin.onnx"


def test_score_tail_choice_and_fallback(bundle: Path) -> None:
    from dede_rt.kernels.trt_plugin import plugin_status

    missing = (False, "triton is not installed", False)
    auto = choose_score_tail(bundle, "auto", status=missing)
    assert (auto.used, auto.requested) == ("standard", "auto") and "triton is not installed" in auto.reason
    assert auto.to_dict() == {"requested": "auto", "used": "standard", "reason": auto.reason}
    with pytest.raises(UserError, match="--score-tail plugin: .*triton is not installed") as err:
        choose_score_tail(bundle, "plugin", status=missing)
    assert "\n" not in str(err.value)
    ok = choose_score_tail(bundle, "auto", status=(True, "tensorrt.plugin and triton", True))
    assert ok.used == "plugin" and ok.to_dict()["aot"] is True
    assert choose_score_tail(bundle, "standard", status=missing).used == "standard"
    with pytest.raises(UserError, match="unknown score tail"):
        choose_score_tail(bundle, "fused")
    # This machine, for real: without TensorRT (or Triton, or a GPU) auto falls back and says why.
    usable, why, _ = plugin_status()
    here = choose_score_tail(bundle, "auto")
    assert (here.used == "plugin") == usable and why in here.reason and "\n" not in why


def test_build_engine_cli_rejects_an_impossible_plugin_tail(bundle: Path) -> None:
    import subprocess
    import sys

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present")
    proc = subprocess.run([sys.executable, "-m", "dede_rt.cli", "build-engine", str(bundle), "--precision", "fp32",
                           "--score-tail", "plugin"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT" in lines[0]


@pytest.fixture(scope="module")
def relative_bundle(encoder_file: Path, demo_images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dede_rt.export import export_detector
    from dede_rt.training import TrainConfig, train_detector

    out = tmp_path_factory.mktemp("trt_relative") / "det"
    train_detector(encoder_file, demo_images.images[:256], out,
                   decoder_config={"dim": 32, "heads": 2, "encoder_depth": 1, "decoder_depth": 1, "patch_size": 4},
                   config=TrainConfig(epochs=1, batch_size=64), holdout_fraction=0.25, progress=False,
                   relative_k=4, prototypes=32)
    export_detector(out, exporter="torchscript", graphs=("detector", "detector_nchw"), verify=False)
    return out


def test_relative_score_keeps_standard_ops_and_says_why(relative_bundle: Path) -> None:
    """The prototype term (MatMul + TopK) has no fused kernel: auto takes standard ops, plugin is a clear error."""
    choice = choose_score_tail(relative_bundle, "auto", status=(True, "plugin ready", True))
    assert choice.used == "standard" and "relative" in choice.reason and "prototype" in choice.reason
    with pytest.raises(UserError, match="relative"):
        choose_score_tail(relative_bundle, "plugin", status=(True, "plugin ready", True))
    with pytest.raises(UserError, match="relative"):
        engine_source_graph(relative_bundle, "fp32", "plugin")
    standard = onnx.load(str(engine_source_graph(relative_bundle, "fp32", "standard")))
    assert any(n.op_type == "TopK" for n in standard.graph.node)  # the prototype term is in the engine's graph


def test_runner_registers_plugins_only_for_plugin_engines() -> None:
    from dede_rt.engines.tensorrt_runner import register_engine_plugins
    from dede_rt.kernels.trt_plugin import plugin_status

    assert register_engine_plugins({"score_tail": {"used": "standard"}}) is False
    assert register_engine_plugins({}) is False  # engines built before the score tail was recorded
    if plugin_status()[0]:
        pytest.skip("the plugins are available here")
    assert register_engine_plugins({"score_tail": {"used": "plugin", "aot": True}}) is False  # kernels in the engine
    with pytest.raises(UserError, match="JIT"):
        register_engine_plugins({"score_tail": {"used": "plugin", "aot": False}}, "x.engine")


def test_bench_rows_for_score_kernels_and_tails_side_by_side(bundle: Path, demo_images) -> None:
    from dede_rt.bench import expand_variants, markdown_table, run_benchmark

    variants = expand_variants((("torch", "fp32"), ("tensorrt", "fp16")), ("reference",), ("plugin",))
    assert variants == (("torch", "fp32"), ("torch", "fp32", "reference"), ("tensorrt", "fp16"),
                        ("tensorrt", "fp16", "plugin"))
    with pytest.raises(UserError, match="--score-kernel"):
        expand_variants(variants, ("cuda",))
    result = run_benchmark(bundle, demo_images.images[:32], batches=(8,), variants=variants, seconds=0.01, rounds=1,
                           threads=1, record=False, log=lambda _: None)
    rows = {(r["backend"], r["precision"], r.get("score_kernel")): r for r in result["rows"]}
    assert set(rows) >= {("torch", "fp32", "torch"), ("torch", "fp32", "reference")}
    assert rows[("torch", "fp32", "reference")]["max_rel_diff_vs_torch"] < 1e-4
    table = markdown_table(result)
    assert "| torch | fp32 | 8 |" in table and "| torch | fp32 (reference) | 8 |" in table
    if not tensorrt_status()[0]:
        assert "tensorrt:fp16:plugin" in result["skipped"] and "tensorrt:fp16" in result["skipped"]

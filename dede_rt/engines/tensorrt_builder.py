"""`dede-rt build-engine`: TensorRT engines from the bundle's exported ONNX, with a JSON manifest.

Precision comes from the graph, as TensorRT's strongly typed networks expect
(TensorRT 11 removed implicit INT8 calibrators and the FP16/INT8 builder flags):
- ``fp32``: ``detector_nchw.onnx``;
- ``fp16``: that graph converted to FP16 (score reduction kept FP32);
- ``int8``: that graph with explicit Q/DQ nodes from ``quantize_static`` on
  clean images — *signed symmetric* int8 activations and weights, which is what
  TensorRT's Q/DQ support accepts (ORT's CPU-fastest uint8 activations are not);
- ``best``: the int8 graph; on TensorRT 10.x built weakly typed with the FP16
  and INT8 flags (``trtexec --best``) and the score tail's layers pinned to
  FP32, on 11+ strongly typed.
The engine input is float NCHW [0, 1] (see ``tensorrt_runner``), with one
optimization profile over the batch size (min/opt/max). A timing cache in the
bundle (``trt/timing.cache``) is reused across builds. The engine is tied to
the GPU and TensorRT version it was built with; its manifest records both and
the runner refuses a mismatch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dede_rt.engines.tensorrt_runner import INSTALL_HINT, gpu_identity, tensorrt_status
from dede_rt.errors import UserError
from dede_rt.bundle import Gate, PrecisionEntry, edit_manifest, fpr_key, read_manifest
from dede_rt.engines.loaders import ensure_graph
from dede_rt.models.encoders import sha256_file

ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "best")
TRT_DIR = "trt"


def require_tensorrt() -> None:
    """Raise a one-line UserError (exit status 2 in the CLI) when TensorRT or a GPU is missing."""
    ok, why = tensorrt_status()
    if not ok:
        raise UserError(why)


def source_graph(bundle: str | Path, precision: str, clean: np.ndarray | None = None, seed: int = 0,
                 count: int = 256) -> Path:
    """The ONNX graph a ``precision`` engine is built from (made on first use)."""
    from dede_rt.calibration.quantize import convert_fp16, quantize_int8
    from dede_rt.calibration.sets import split_calibration

    bundle = Path(bundle)
    base = ensure_graph(bundle, "detector_nchw")
    if precision == "fp32":
        return base
    if precision == "fp16":
        out = base.with_name("detector_nchw_fp16.onnx")
        if not out.is_file():
            convert_fp16(base, out)
        return out
    out = base.with_name("detector_nchw_int8_trt.onnx")
    if not out.is_file():
        if clean is None:
            raise UserError("an int8 engine needs clean calibration images: pass --data")
        idx, _ = split_calibration(len(clean), count, seed)
        quantize_int8(base, out, clean[idx], for_tensorrt=True)
    return out


def pin_score_tail_fp32(network, graph: Path, trt) -> int:  # noqa: ANN001 - TensorRT objects
    """Weakly typed builds: keep the score tail's layers float32 (free to pick FP16, TensorRT would round the
    summed error and the relative score's prototype distances); returns how many layers were pinned.

    The parser names a layer after its ONNX node (with a suffix when one node becomes several layers).
    """
    import onnx

    from dede_rt.calibration.quantize import score_tail

    tail = set(score_tail(onnx.load(str(graph)))[0])
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not (layer.name in tail or any(layer.name.startswith(f"{t}_") for t in tail)):
            continue
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not float_outputs:
            continue  # shape arithmetic has no float precision to pin
        layer.precision = trt.float32
        for j in float_outputs:  # TopK's indices stay int32
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def format_parser_errors(parser) -> str:
    """Every ONNX parser error on its own line: node, operator, code, description."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = getattr(err, "node_name", lambda: "")() or f"#{err.node()}"
        op = getattr(err, "node_operator", lambda: "")()
        lines.append(f"  node {node} ({op or '?'}): {err.code()}: {err.desc()}")
    return "\n".join(lines)


def build_engine(bundle: str | Path, precision: str = "fp16", clean: np.ndarray | None = None,
                 min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256, workspace_gib: float = 4.0,
                 log=print) -> dict:
    """Build, serialize and record a TensorRT engine for ``bundle``; returns its manifest."""
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"unknown engine precision {precision!r}; choose one of {', '.join(ENGINE_PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(f"need 1 <= min <= opt <= max batch, got {min_batch}/{opt_batch}/{max_batch}")
    require_tensorrt()
    from dede_rt.optional import require_onnx_export

    require_onnx_export("a TensorRT engine (built from the exported ONNX graph)")
    import tensorrt as trt

    bundle = Path(bundle)
    size = read_manifest(bundle).image_size
    major = int(trt.__version__.split(".")[0])
    graph = source_graph(bundle, "int8" if precision == "best" else precision, clean)
    weakly_typed_best = precision == "best" and major < 11
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if weakly_typed_best else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        raise UserError(f"{graph}: TensorRT {trt.__version__} cannot parse this ONNX graph:\n"
                        f"{format_parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    pinned = 0
    if weakly_typed_best:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)
        pinned = pin_score_tail_fp32(network, graph, trt)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    input_name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    shape = (3, size, size)
    profile.set_shape(input_name, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    out_dir = bundle / TRT_DIR
    out_dir.mkdir(exist_ok=True)
    cache_path = out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building a {precision} TensorRT engine from {graph.name} (batch {min_batch}/{opt_batch}/{max_batch})")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build the {precision} engine from {graph.name} "
                        "(see the TensorRT log above)")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    engine_path = out_dir / f"detector_{precision}.engine"
    engine_path.write_bytes(memoryview(serialized))
    manifest = {**gpu_identity(), "precision": precision, "strongly_typed": not weakly_typed_best,
                "source_onnx": str(graph.relative_to(bundle)), "source_onnx_sha256": sha256_file(graph),
                "engine_sha256": sha256_file(engine_path), "input": {"name": input_name, "dtype": "float32",
                                                                     "layout": "NCHW, pixels in [0, 1]",
                                                                     "shape": [-1, *shape]},
                "output": {"name": network.get_output(0).name, "shape": [-1]},
                "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
                **({"fp32_score_tail_layers": pinned} if weakly_typed_best else {}),
                "build_seconds": round(seconds, 1), "timing_cache": str(cache_path.relative_to(bundle)),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(str(engine_path) + ".json").write_text(json.dumps(manifest, indent=2) + "\n")
    entry = PrecisionEntry(str(engine_path.relative_to(bundle)),
                           Gate(precision == "fp32", "not run",
                                "no clean images given (--data); auto will not use a non-fp32 engine"),
                           details={"manifest": manifest})
    if clean is not None and len(clean) > 1:
        entry.gate, entry.thresholds = gate_engine(bundle, engine_path, size, precision, clean)
    with edit_manifest(bundle) as m:
        m.deployment.tensorrt[precision] = entry
    return entry.to_dict()


def gate_engine(bundle: Path, engine_path: Path, size: int, precision: str,
                clean: np.ndarray) -> tuple[Gate, dict[str, float]]:
    """Clean-rank gate of an engine against ONNX Runtime FP32, plus its re-chosen thresholds."""
    from dede_rt.bundle.thresholds import thresholds_by_fpr
    from dede_rt.calibration.gate import quality_gate
    from dede_rt.engines.comparator import run_batched
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.engines.tensorrt_runner import TensorRTRunner

    manifest = read_manifest(bundle)
    fprs = manifest.thresholds_for().fprs or (0.01,)
    key = fpr_key(manifest.thresholds.default_fpr)
    with OnnxRuntimeRunner(ensure_graph(bundle, "detector"), size, providers=["CPUExecutionProvider"]) as ref_runner:
        ref = run_batched(ref_runner, clean, 128)
    with TensorRTRunner(engine_path, size, precision) as runner:
        got = run_batched(runner, clean, 128)
    ref_t, got_t = thresholds_by_fpr(ref, fprs), thresholds_by_fpr(got, fprs)
    return Gate.from_dict(quality_gate(ref, got, ref_t[key], got_t[key])), got_t





def build_engine_paths(bundle: str | Path, precision: str = "fp16", data: str | Path | None = None,
                       min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256, workspace_gib: float = 4.0,
                       max_images: int = 2000, log=print) -> dict:
    """``build_engine`` with clean images read from ``data`` (checks TensorRT first, before reading anything)."""
    require_tensorrt()
    clean = None
    if data is not None:
        from dede_rt.calibration.sets import load_clean_images

        size = read_manifest(bundle).image_size
        clean = load_clean_images(data, size, max_images).images
    return build_engine(bundle, precision, clean, min_batch, opt_batch, max_batch, workspace_gib, log)

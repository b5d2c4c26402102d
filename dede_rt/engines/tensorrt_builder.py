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

Score tail (``score_tail``): "plugin" rewrites the graph TensorRT parses so the
mask-and-score tail is ONE ``com.dede_rt::MaskAndScoreHead`` node (or
``MaskAndScore`` when the head Linear stays outside) reading the float NCHW
pixel input, executed by the ``dede_rt::`` TensorRT plugins
(``kernels.trt_plugin``, Triton AOT kernels baked into the engine); "standard"
parses the exported ops as they are; "auto" takes the plugin where
``tensorrt.plugin``, Triton and a GPU are usable and the detector's score kind
has a fused kernel (the summed score; the relative score's prototype term has
none), otherwise standard ops, and the engine manifest says which and why.

Steps, each a small function: ``engine_source_graph`` (FP32 graph from
``ensure_graph``, FP16 / INT8 variant, score-tail rewrite; no TensorRT needed) →
``network_from_onnx`` → ``builder_config`` → ``serialize_network`` →
``save_engine`` (+ manifest); the quality gate is ``gate_engine``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dede_rt.engines.tensorrt_runner import INSTALL_HINT, gpu_identity, tensorrt_status
from dede_rt.errors import UserError
from dede_rt.bundle import Gate, PrecisionEntry, edit_manifest, fpr_key, read_manifest
from dede_rt.engines.loaders import ensure_graph
from dede_rt.models.encoders import sha256_file

ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "best")
SCORE_TAILS = ("auto", "plugin", "standard")
TRT_DIR = "trt"
VARIANTS_DIR = "variants"  # engines built for comparisons (bench), not recorded in the deployment


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


@dataclass(frozen=True)
class ScoreTailChoice:
    """Which score tail an engine gets: what was asked for, what is used ("plugin" | "standard"), and why."""

    requested: str
    used: str
    reason: str
    aot: bool = False  # plugin kernels compiled ahead of time into the engine (runs without Python)

    def to_dict(self) -> dict:
        """The engine manifest's ``score_tail`` record."""
        return asdict(self) if self.used == "plugin" else {k: v for k, v in asdict(self).items() if k != "aot"}


def plugin_blocker(bundle: str | Path) -> str | None:
    """Why this detector's score cannot be one fused node (None when it can): the relative score's prototype term
    (MatMul + TopK over the normalized target) has no fused kernel."""
    kind = read_manifest(bundle).score.kind
    if kind != "summed":
        return (f"the {kind} score's prototype term has no fused kernel (the plugin computes the summed error "
                "only); its engines use standard ops")
    return None


def choose_score_tail(bundle: str | Path, requested: str = "auto", status=None) -> ScoreTailChoice:  # noqa: ANN001
    """Resolve ``--score-tail`` for a bundle; "plugin" that cannot be honoured is a one-line UserError.

    ``status``: ``kernels.trt_plugin.plugin_status()``'s answer (computed when None; tests pass their own).
    """
    if requested not in SCORE_TAILS:
        raise UserError(f"unknown score tail {requested!r}; choose one of {', '.join(SCORE_TAILS)}")
    if requested == "standard":
        return ScoreTailChoice(requested, "standard", "standard ops asked for (--score-tail standard)")
    blocker = plugin_blocker(bundle)
    if blocker is None:
        if status is None:
            from dede_rt.kernels.trt_plugin import plugin_status

            status = plugin_status()
        ok, why, aot = status
        if ok:
            return ScoreTailChoice(requested, "plugin", why, aot)
        blocker = f"the mask-and-score plugin is unavailable here: {why}"
    if requested == "plugin":
        raise UserError(f"--score-tail plugin: {blocker}; use --score-tail standard (or auto)")
    return ScoreTailChoice(requested, "standard", blocker)


def score_tail_rewrite(bundle: str | Path) -> dict:
    """What ``fuse_score_tail`` needs from the detector: the decoder head, the test mask, normalization, sizes."""
    from dede_rt.bundle import load_detector
    from dede_rt.scoring import TestMask

    det = load_detector(bundle)
    head = det.decoder.head
    mask = TestMask(det.decoder.config.num_patches, det.test_mask_ratio, det.mask_seed)
    return {"head_weight": head.weight.detach().cpu().numpy(),
            "head_bias": None if head.bias is None else head.bias.detach().cpu().numpy(),
            "mean": list(det.normalization.mean), "std": list(det.normalization.std),
            "patch": det.decoder.config.patch_size, "image_size": det.normalization.image_size,
            "token_weight": mask.masked.float().numpy()}


def engine_source_graph(bundle: str | Path, precision: str, score_tail: str = "standard",
                        clean: np.ndarray | None = None, *, seed: int = 0, count: int = 256, aot: bool = True,
                        head_fused: bool = True) -> Path:
    """The ONNX graph TensorRT parses for a ``precision`` engine with the ``score_tail`` ("plugin" | "standard").

    "plugin": ``source_graph`` rewritten so the score tail is one ``MaskAndScoreHead`` node (``MaskAndScore``
    with ``head_fused=False``) on the float NCHW pixel input; the rewrite is redone on every call (cheap, and
    never stale). Needs neither TensorRT nor a GPU.
    """
    import onnx

    from dede_rt.kernels import onnx_custom

    if score_tail not in ("plugin", "standard"):
        raise UserError(f"engine_source_graph takes the used tail (plugin | standard), got {score_tail!r}")
    bundle = Path(bundle)
    base = source_graph(bundle, "int8" if precision == "best" else precision, clean, seed, count)
    if score_tail == "standard":
        return base
    blocker = plugin_blocker(bundle)
    if blocker is not None:
        raise UserError(f"--score-tail plugin: {blocker}")
    r = score_tail_rewrite(bundle)
    model = onnx.load(str(base))
    try:
        fused = onnx_custom.fuse_score_tail(model, "images", "scores", r["head_weight"], r["head_bias"], r["mean"],
                                            r["std"], r["patch"], r["image_size"], token_weight=r["token_weight"],
                                            head_fused=head_fused, aot=aot, layout="nchw_unit")
    except ValueError as exc:
        raise UserError(f"{base.name}: cannot rewrite the score tail into one plugin node: {exc}") from None
    onnx.checker.check_model(fused)
    out = base.with_name(f"{base.stem}_plugin{'' if head_fused else '_nohead'}.onnx")
    onnx.save(fused, str(out))
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


def network_from_onnx(builder, logger, graph: Path, trt, strongly_typed: bool = True):  # noqa: ANN001, ANN201
    """Parse ``graph`` into a new network definition; returns (network, parser): the parser must outlive it.

    Strongly typed (precision from the graph's casts and Q/DQ): required for TensorRT 10's int8 graphs, accepted
    and implied on 11.
    """
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        raise UserError(f"{graph}: TensorRT {trt.__version__} cannot parse this ONNX graph:\n"
                        f"{format_parser_errors(parser)}")
    return network, parser


def builder_config(builder, network, trt, *, image_size: int, batches: tuple[int, int, int],  # noqa: ANN001, ANN201
                   workspace_gib: float, timing_cache: Path, weakly_typed_best: bool = False,
                   graph: Path | None = None):
    """Builder config: workspace, the batch profile on the pixel input, the timing cache and, for the weakly
    typed TensorRT 10 ``best`` build, the FP16/INT8 flags with the score tail pinned FP32; returns (config, pinned)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    pinned = 0
    if weakly_typed_best:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)
        pinned = pin_score_tail_fp32(network, graph, trt)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    lo, opt, hi = batches
    profile.set_shape(network.get_input(0).name, (lo, *shape), (opt, *shape), (hi, *shape))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config, pinned


def serialize_network(builder, network, config, trt, what: str) -> tuple[bytes, float]:  # noqa: ANN001
    """Build the serialized engine; returns (bytes, seconds). A failed build is a one-line UserError."""
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build {what} (see the TensorRT log above)")
    return bytes(memoryview(serialized)), seconds


def save_engine(engine_path: Path, serialized: bytes, manifest: dict, config=None,  # noqa: ANN001
                timing_cache: Path | None = None) -> Path:
    """Write the engine, its JSON manifest (``<engine>.json``, with the engine's sha256) and the timing cache."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    if config is not None and timing_cache is not None:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    engine_path.write_bytes(serialized)
    manifest["engine_sha256"] = sha256_file(engine_path)
    Path(str(engine_path) + ".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return engine_path


def engine_path_for(bundle: str | Path, precision: str, variant: str | None = None) -> Path:
    """Where an engine lives: ``trt/detector_<precision>.engine`` (recorded) or ``trt/variants/...`` (bench)."""
    out = Path(bundle) / TRT_DIR
    return out / f"detector_{precision}.engine" if variant is None else \
        out / VARIANTS_DIR / f"detector_{precision}_{variant}.engine"


def build_engine(bundle: str | Path, precision: str = "fp16", clean: np.ndarray | None = None,
                 min_batch: int = 1, opt_batch: int = 64, max_batch: int = 256, workspace_gib: float = 4.0,
                 log=print, *, score_tail: str = "auto", record: bool = True) -> dict:
    """Build, serialize and record a TensorRT engine for ``bundle``; returns its deployment entry (as a dict).

    ``record=False`` (benchmark variants): the engine goes under ``trt/variants/`` and the deployment record is
    left alone.
    """
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
    tail = choose_score_tail(bundle, score_tail)
    log(f"score tail: {tail.used} ({tail.reason})")
    graph = engine_source_graph(bundle, precision, tail.used, clean, aot=tail.aot)
    if tail.used == "plugin":
        from dede_rt.kernels.trt_plugin import register_plugins

        register_plugins()  # the parser maps the custom node to the registered plugin by name and namespace
    weakly_typed_best = precision == "best" and int(trt.__version__.split(".")[0]) < 11
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = network_from_onnx(builder, logger, graph, trt, strongly_typed=not weakly_typed_best)
    engine_path = engine_path_for(bundle, precision, None if record else tail.used)
    cache_path = bundle / TRT_DIR / "timing.cache"
    cache_path.parent.mkdir(exist_ok=True)
    config, pinned = builder_config(builder, network, trt, image_size=size, batches=(min_batch, opt_batch, max_batch),
                                    workspace_gib=workspace_gib, timing_cache=cache_path,
                                    weakly_typed_best=weakly_typed_best, graph=graph)
    log(f"building a {precision} TensorRT engine from {graph.name} (batch {min_batch}/{opt_batch}/{max_batch})")
    serialized, seconds = serialize_network(builder, network, config, trt, f"the {precision} engine from {graph.name}")
    manifest = {**gpu_identity(), "precision": precision, "strongly_typed": not weakly_typed_best,
                "source_onnx": str(graph.relative_to(bundle)), "source_onnx_sha256": sha256_file(graph),
                "score_tail": tail.to_dict(),
                "input": {"name": network.get_input(0).name, "dtype": "float32", "layout": "NCHW, pixels in [0, 1]",
                          "shape": [-1, 3, size, size]},
                "output": {"name": network.get_output(0).name, "shape": [-1]},
                "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
                **({"fp32_score_tail_layers": pinned} if weakly_typed_best else {}),
                "build_seconds": round(seconds, 1), "timing_cache": str(cache_path.relative_to(bundle)),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_engine(engine_path, serialized, manifest, config, cache_path)
    entry = PrecisionEntry(str(engine_path.relative_to(bundle)),
                           Gate(precision == "fp32", "not run",
                                "no clean images given (--data); auto will not use a non-fp32 engine"),
                           details={"manifest": manifest})
    if clean is not None and len(clean) > 1:
        entry.gate, entry.thresholds = gate_engine(bundle, engine_path, size, precision, clean)
    if record:
        with edit_manifest(bundle) as m:
            m.deployment.tensorrt[precision] = entry
    return entry.to_dict()


def ensure_engine(bundle: str | Path, precision: str, score_tail: str, *, max_batch: int = 256,
                  log=print) -> Path:
    """An engine of ``precision`` with the ``score_tail`` ("plugin" | "standard") for comparisons: the recorded
    engine when it has that tail and suits this machine, else a variant built once under ``trt/variants/``."""
    from dede_rt.engines.tensorrt_runner import engine_compatible

    bundle = Path(bundle)
    candidates = []
    entry = read_manifest(bundle).deployment.tensorrt.get(precision)
    if entry is not None:
        candidates.append(bundle / entry.path)
    candidates.append(engine_path_for(bundle, precision, score_tail))
    for path in candidates:
        meta = Path(str(path) + ".json")
        if not (path.is_file() and meta.is_file()):
            continue
        manifest = json.loads(meta.read_text())
        if manifest.get("score_tail", {}).get("used", "standard") == score_tail and engine_compatible(manifest)[0] \
                and manifest["profile"]["max"] >= max_batch:
            return path
    entry = build_engine(bundle, precision, None, 1, min(64, max_batch), max_batch, log=log, score_tail=score_tail,
                         record=False)
    return bundle / entry["path"]


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
                       max_images: int = 2000, log=print, *, score_tail: str = "auto") -> dict:
    """``build_engine`` with clean images read from ``data`` (checks TensorRT and the score tail first, before
    reading anything)."""
    require_tensorrt()
    choose_score_tail(bundle, score_tail)  # an impossible --score-tail plugin fails before images are read
    clean = None
    if data is not None:
        from dede_rt.calibration.sets import load_clean_images

        clean = load_clean_images(data, read_manifest(bundle).pixels, max_images).images
    return build_engine(bundle, precision, clean, min_batch, opt_batch, max_batch, workspace_gib, log,
                        score_tail=score_tail)

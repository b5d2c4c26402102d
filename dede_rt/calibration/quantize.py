"""Lower-precision variants of the fused detector graph: INT8 Q/DQ (static) and FP16.

INT8: ``onnxruntime.quantization.quantize_static`` in QDQ format, uint8
activations and int8 weights (per-channel) on Conv/MatMul/Gemm only. That
is the combination measured fastest on x86 CPUs (signed activations gave no
speed-up); LayerNorm, Softmax, GELU and the score tail (squared error and its
sum) stay float, and so do the decoder head, whose output *is* the
reconstruction the score is computed from, and the relative score's product
with the prototype reconstructions. In the decoder only the weight GEMMs (QKV,
output projection, MLP) are INT8: attention's activation-activation products
(inside MultiHeadAttention after ``export.ort_fusions``, or QKᵀ/AV MatMuls) and
the folded first block's constant products stay float (``activation_matmuls``),
and a MatMul's output is not requantized (its consumers, LayerNorm/GELU/attention,
are float), so ORT runs each GEMM as one MatMulIntegerToFloat. Ranges come from clean images
(MinMax by default; Percentile/Entropy selectable). The Q/DQ form is what
TensorRT's strongly typed networks consume too.

Outlier headroom: a backdoor trigger drives the encoder's deep features far
outside anything clean images produce (BadEncoder inflates embedding norms
x8-13). Ranges calibrated on clean images clip exactly those activations, and
the clipped embeddings reconstruct more like clean ones: on the demo victim
plain MinMax lost 0.010 AUROC and 7 points of TPR while its clean-image score
rank correlation stayed at 0.995, so a clean-only check cannot see the loss. The
activations of the deeper half of the network (measured one layer at a time:
the last two encoder stages and the embedding projection carry the loss) get
``headroom`` x their clean range; the early layers, whose activations triggers
do not push out of range, keep full resolution.

FP16: ``onnxruntime.transformers.float16.convert_float_to_float16`` (ships with
onnxruntime, so no extra package) with float32 graph inputs/outputs kept, and
the score tail kept in float32 (a sum of ~3k squared errors overflows
FP16's precision long before its range; the relative score's prototype
distances are differences of large norms). ORT's CPU provider has few FP16
kernels and inserts casts, so FP16 is for GPU execution providers / TensorRT;
on CPU it is produced and gated but usually slower (the benchmark says how much).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from dede_rt.errors import UserError

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
DEFAULT_HEADROOM = 2.0  # measured on the demo victim: 1.5-3x recover AUROC; 2x keeps clean rank correlation >= 0.988
# A calibration batch runs the whole augmented graph at once: a ResNet-50 at 224 px in batches of 64 took ORT's
# CPU arena past 13 GB here. Batches hold a fixed number of input pixels instead (ranges are per-tensor min/max
# over all batches, so the batch size does not change them).
CALIBRATION_PIXELS_PER_BATCH = 64 * 32 * 32 * 8  # 512 CIFAR images; 10 at 224 px


def calibration_batch(batch_size: int, height: int, width: int) -> int:
    """The calibration batch for ``height`` x ``width`` inputs: ``batch_size`` at 32 px, fewer for larger images."""
    return max(1, min(batch_size, CALIBRATION_PIXELS_PER_BATCH // (height * width)))


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over uint8 NHWC images, in fixed batches."""

    def __init__(self, images: np.ndarray, input_name: str = "images", batch_size: int = 64,
                 float_nchw: bool = False) -> None:
        self.images = images
        self.input_name = input_name
        self.batch_size = batch_size
        self.float_nchw = float_nchw  # feed [0, 1] float NCHW pixels (the ``detector_nchw`` graphs)
        self._it: Iterator[dict] | None = None

    def batches(self) -> Iterator[dict]:
        """Every calibration batch as an ORT feed dict, from the first."""
        for i in range(0, len(self.images), self.batch_size):
            batch = self.images[i : i + self.batch_size]
            if self.float_nchw:
                batch = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
            yield {self.input_name: np.ascontiguousarray(batch)}

    def get_next(self) -> dict | None:
        """The next calibration batch, or None when exhausted."""
        if self._it is None:
            self._it = self.batches()
        return next(self._it, None)

    def rewind(self) -> None:
        """Start over (used by calibrators that take several passes)."""
        self._it = None


SCORE_TAIL_OPS = {"ReduceSum", "ReduceMean", "TopK", "Pow", "Mul", "Div", "Sub", "Add", "Neg", "Reshape",
                  "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Flatten", "Identity"}


def score_tail(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The score tail, walked from the ``scores`` output back: (all its nodes, the MatMul/Gemm ending each path).

    The walk passes element-wise / reduction / reshape / TopK ops and stops at
    (and includes) the first MatMul/Gemm on each path: the decoder head (whose
    output is the reconstruction) and, for the relative score, the product with
    the prototype reconstructions. The target path (pixels -> normalized
    patches) has no MatMul and is walked up to the graph input.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    tail: list[str] = []
    ends: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            tail.append(node.name)
            ends.append(node.name)
        elif node.op_type in SCORE_TAIL_OPS:
            tail.append(node.name)
            stack.extend(node.input)
    return tail, ends


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes that are not weight GEMMs: their B operand is no rank-2 initializer.

    In the decoder these are attention's QKᵀ and AV products (both operands activations) and the folded first
    block's small products with its precomputed [H, ., .] constants: a few % of its FLOPs, but quantizing them
    puts Q/DQ pairs and a QLinearSoftmax around every softmax (measured slower than float on ORT CPU) and
    rounds the attention weights. They stay float; the weight GEMMs (QKV, output projection, MLP) are INT8.
    """
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1]) != 2]


def encoder_weight_nodes(model: onnx.ModelProto, project_weight: np.ndarray | None = None) -> list[str]:
    """The quantizable nodes (Conv/MatMul/Gemm) that compute the embedding, in graph order: the encoder's layers.

    ``project_weight``: the decoder's projection weight, to find the embedding in TorchScript-exported graphs
    (``export.cut.embedding_tensor``).
    """
    from dede_rt.export.cut import embedding_tensor

    frontier, decoder = {embedding_tensor(model, project_weight)}, set()
    for node in model.graph.node:  # topologically sorted: one forward pass finds everything downstream
        if set(node.input) & frontier:
            decoder.add(node.name)
            frontier.update(node.output)
    target = set(score_tail(model)[0])  # the pixel -> patch target path of the score
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and n.name not in decoder and n.name not in target]


def deep_tensors(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """The tensors among ``names`` produced in the deeper half of the network (from the middle Conv's input on).

    Depth is the producer's position in the (topologically sorted) graph; the
    split point is the input of the middle Conv, or the middle tensor when the
    graph has no Conv (a transformer encoder).
    """
    position = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    position.update({i.name: -1 for i in model.graph.input})
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    ordered = sorted(names, key=lambda n: position.get(n, len(position)))
    if convs:
        start = position.get(convs[len(convs) // 2].input[0], -1)
    else:
        start = position.get(ordered[len(ordered) // 2], -1) if ordered else -1
    return [n for n in ordered if position.get(n, len(position)) >= start]


def _headroom_overrides(pre_path: Path, pre_model: onnx.ModelProto, reader: "ImageCalibrationReader", method,
                        headroom: float, workdir: Path) -> dict:
    """``TensorQuantOverrides`` widening the clean calibrated range of the deep activations by ``headroom``.

    This is a calibration pass of its own: ``quantize_static`` offers no hook
    between computing ranges and using them, so it calibrates again (seconds).
    """
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(str(pre_path), op_types_to_calibrate=list(QUANTIZED_OPS),
                                   augmented_model_path=str(workdir / "augmented.onnx"), calibrate_method=method)
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data().data
    reader.rewind()
    overrides = {}
    for name in deep_tensors(pre_model, list(ranges)):
        low, high = (float(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value)
        overrides[name] = [{"rmin": np.float32(min(low, 0.0) * headroom), "rmax": np.float32(max(high, 0.0) * headroom)}]
    return overrides


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration_images: np.ndarray,
                  method: str = "minmax", per_channel: bool = True, quantize_head: bool = False,
                  batch_size: int = 64, for_tensorrt: bool = False, headroom: float = DEFAULT_HEADROOM,
                  decoder_rules: bool = True, keep_float: tuple[str, ...] = (), bias_correction: bool = False,
                  equalize: float | None = None) -> dict:
    """Write a static INT8 Q/DQ model calibrated on ``calibration_images``; returns a description.

    ``for_tensorrt``: signed symmetric int8 activations (zero point 0), the only
    activation Q/DQ TensorRT accepts; the default uint8 activations are ORT CPU's fastest.
    ``headroom``: factor on the clean range of the deeper half's activations (1 = plain calibration).
    ``decoder_rules`` (default): only weight GEMMs are quantized (``activation_matmuls`` stay float) and a
    MatMul's output is not requantized (ONNX Runtime target only); False gives the rule before issue 23.
    ``keep_float``: names of further Conv/MatMul/Gemm nodes to leave float (mixed precision; see
    ``encoder_weight_nodes``).
    ``bias_correction``: shift each quantized Conv/Gemm's bias by its mean INT8 output error on the calibration
    images (``calibration.bias_correction``).
    ``equalize``: SmoothQuant's alpha for Conv -> Relu -> Conv chains (``calibration.equalization``); None: off.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise UserError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    if len(calibration_images) == 0:
        raise UserError("no calibration images")
    if headroom < 1.0:
        raise UserError(f"headroom must be >= 1 (a factor on the clean activation range), got {headroom}")
    model = onnx.load(str(fp32_path))
    graph_input = model.graph.input[0]
    input_name = graph_input.name
    float_nchw = graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    excluded: list[str] = []
    activation = QuantType.QInt8 if for_tensorrt else QuantType.QUInt8
    extra = {"CalibTensorRangeSymmetric": for_tensorrt, "ActivationSymmetric": for_tensorrt,
             "WeightSymmetric": True}
    if decoder_rules and not for_tensorrt:
        # A MatMul's float output (decoder GEMMs feed LayerNorm, GELU, attention: float ops) is not requantized:
        # DQ -> MatMul without a Q after it runs as MatMulIntegerToFloat (bias fused), one kernel instead of
        # QLinearMatMul + DequantizeLinear (measured faster on ORT CPU, and one rounding fewer).
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + ORT graph optimisation first, as onnxruntime recommends before quantize_static.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        pre_model = onnx.load(str(pre))
        if not quantize_head:
            excluded = score_tail(pre_model)[1]  # the MatMuls ending the tail (head, prototype product) stay float
        if decoder_rules and not for_tensorrt:  # TensorRT's Q/DQ placement is its builder's business
            excluded += [n for n in activation_matmuls(pre_model) if n not in excluded]
        unknown = set(keep_float) - {n.name for n in pre_model.graph.node}
        if unknown:
            raise UserError(f"keep_float names nodes the graph does not have: {', '.join(sorted(unknown))}")
        excluded += [n for n in keep_float if n not in excluded]
        batch_size = calibration_batch(batch_size, *calibration_images.shape[1:3])
        reader = ImageCalibrationReader(calibration_images, input_name, batch_size, float_nchw)
        equalized = None
        if equalize is not None:
            from dede_rt.calibration.equalization import equalize_activations

            equalized = equalize_activations(pre_model, reader.batches, equalize)
            onnx.save(pre_model, str(pre))
        if headroom != 1.0:
            extra["TensorQuantOverrides"] = _headroom_overrides(pre, pre_model, reader, methods[method], headroom,
                                                                Path(tmp))
        quantize_static(
            str(pre), str(out_path), reader,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
            activation_type=activation, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            calibrate_method=methods[method], extra_options=extra)
        corrected = None
        if bias_correction:
            from dede_rt.calibration.bias_correction import correct_biases

            layers = [n.name for n in pre_model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in excluded]
            corrected = correct_biases(pre, out_path, layers, reader.batches)
    q = onnx.load(str(out_path))
    ops = [n.op_type for n in q.graph.node]
    return {"method": method, "per_channel": per_channel, "activations": "int8 symmetric" if for_tensorrt else "uint8",
            "weights": "int8 symmetric", "target": "tensorrt" if for_tensorrt else "onnxruntime-cpu",
            "quantized_ops": list(QUANTIZED_OPS), "excluded_nodes": excluded, "decoder_rules": decoder_rules,
            "calibration_images": int(len(calibration_images)), "calibration_batch": batch_size, "headroom": headroom,
            "headroom_tensors": len(extra.get("TensorQuantOverrides", {})),
            "qdq_pairs": ops.count("QuantizeLinear"), "nodes": len(ops),
            **({"bias_correction": corrected} if corrected else {}),
            **({"equalization": equalized} if equalized else {})}


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict:
    """Write an FP16 model with float32 inputs/outputs and the whole score tail kept in float32.

    The tail (target patches, decoder head, squared errors and their sum, the prototype distances of the relative
    score) is a sum of thousands of terms or a difference of large norms: FP16's 11-bit mantissa loses it.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    keep_float = score_tail(model)[0]
    half = drop_cast_round_trips(convert_float_to_float16(model, keep_io_types=True, node_block_list=keep_float))
    drop_initializer_value_info(half.graph)
    sort_topologically(half.graph)  # the converter appends its Casts; TensorRT's parser wants producers first
    onnx.checker.check_model(half)
    onnx.save(half, str(out_path))
    return {"converter": "onnxruntime.transformers.float16", "io": "float32/uint8 kept",
            "float32_nodes": keep_float, "nodes": len(half.graph.node)}


def drop_cast_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Short-circuit float32 -> float16 -> float32 Cast pairs (in place; returns the model).

    ``convert_float_to_float16`` keeps a blocked node's arithmetic in float32 but hands its output to the next
    node through a float16 Cast pair, even when that node is blocked too. Along the score tail that rounds every
    intermediate (a sum of squared errors near 5,000 to steps of 4) and defeats the block list.
    """
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    for node in graph.node:
        first = producer.get(node.input[0]) if cast_to(node) == onnx.TensorProto.FLOAT else None
        if first is not None and cast_to(first) == onnx.TensorProto.FLOAT16 \
                and types.get(first.input[0]) == onnx.TensorProto.FLOAT:
            node.op_type, node.input[0] = "Identity", first.input[0]
            del node.attribute[:]
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & used]
    for node in dead:
        graph.node.remove(node)
    return model


def drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    """Remove value_info entries that describe initializers (in place).

    The converter retypes every value_info entry to float16, also those of the initializers the block list keeps
    float32 (the score tail's biases, the normalization constants); the contradiction fails strict shape
    inference, which ``export.cut`` runs (``dede-rt bench``'s encoder-alone graph of the FP16 detector). An
    initializer's type is its own, so such entries carry nothing.
    """
    inits = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in inits]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or an undefined input at node {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)

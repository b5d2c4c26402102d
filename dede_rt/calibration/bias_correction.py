"""Empirical bias correction of an INT8 Q/DQ graph: undo each quantized layer's mean output error on clean images.

Why: rounding weights and inputs to INT8 shifts a layer's outputs by an error whose mean over images is not zero
(per output channel); that shift passes to every later layer and, in a DeDe detector, into the embedding the
decoder redraws from. Subtracting it from the layer's bias (Nagel et al., "Data-Free Quantization", 2019,
empirical variant; as in Qualcomm AIMET and NVIDIA's PTQ recipes) costs no runtime: the graph keeps its shape.

How: layer by layer in graph order, the float graph's and the Q/DQ graph's *pre-activation* outputs of the
same node are averaged over the calibration images (per channel: batch and space); the difference, rounded
to the bias's own INT8 scale (input scale x weight scale), comes off the node's int32 bias. In order, because
correcting one layer changes what the next one receives. Only nodes whose bias is an int32 initializer behind
a DequantizeLinear (ORT's quantized Conv / Gemm biases) are corrected; others are reported as skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dede_rt.calibration.activations import Feeds, channel_stats

INT32 = np.iinfo(np.int32)


def _quantized_bias(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto]) -> tuple[str, str] | None:
    """(int32 bias initializer, its scale initializer) of a Q/DQ node, or None when its bias is not one."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    dq = producer.get(node.input[2])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    if inits[dq.input[0]].data_type != onnx.TensorProto.INT32:
        return None
    return dq.input[0], dq.input[1]


def correct_biases(float_path: str | Path, qdq_path: str | Path, layers: list[str], feeds: Feeds) -> dict:
    """Correct, in place in ``qdq_path``, the biases of the Q/DQ nodes named ``layers`` against ``float_path``.

    ``float_path``: the float graph the Q/DQ one was quantized from (same node names; ``quant_pre_process``'s
    output). ``feeds``: a callable returning an iterator of ORT feed dicts (the clean calibration images).
    Returns what was done: per corrected layer the largest absolute per-channel shift.
    """
    float_model = onnx.load(str(float_path))
    model = onnx.load(str(qdq_path))
    float_out = {n.name: n.output[0] for n in float_model.graph.node}
    nodes = {n.name: n for n in model.graph.node}
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    plan, skipped = [], []
    for name in layers:
        bias = _quantized_bias(nodes[name], producer, inits) if name in nodes and name in float_out else None
        (plan if bias else skipped).append((name, bias))
    reference = channel_stats(float_model, [float_out[name] for name, _ in plan], feeds)
    shifts = {}
    for name, (bias_name, scale_name) in plan:
        got = channel_stats(model, [nodes[name].output[0]], feeds)[nodes[name].output[0]]
        delta = got - reference[float_out[name]]
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
        old = numpy_helper.to_array(inits[bias_name]).astype(np.int64)
        new = np.clip(old - np.rint(delta / scale), INT32.min, INT32.max).astype(np.int32)
        inits[bias_name].CopyFrom(numpy_helper.from_array(new, bias_name))
        shifts[name] = float(np.max(np.abs(delta)))
    onnx.save(model, str(qdq_path))
    return {"method": "empirical bias correction (per channel, sequential)", "layers": len(plan),
            "max_abs_shift": shifts, "skipped": [name for name, _ in skipped]}

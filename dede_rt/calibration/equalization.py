"""Activation equalization before INT8: move per-channel range differences of an activation into the weights.

Why: ONNX Runtime's QLinearConv takes one scale per activation tensor, so a channel whose values span a tenth
of the tensor's range gets a tenth of its 256 levels. On the demo detector the activations' rounding carries
the INT8 AUROC loss (``benchmarks/int8_error_source.py``: weights-only INT8 loses 0.0006, weights and
activations 0.021), and two of the costliest layers read such an activation: the ReLU between a residual
block's two convolutions.

How (SmoothQuant, Xiao et al. 2023, for a Conv -> Relu -> Conv chain; exact in float because ReLU commutes
with a positive per-channel scale): channel c of the middle activation is divided by
``s_c = r_c**alpha / w_c**(1 - alpha)`` (``r_c``: its largest value over the calibration images, ``w_c``: the
largest |weight| the second conv applies to it), by dividing the first conv's output channel c (weights and
bias), and the second conv's input channel c is multiplied by ``s_c``. ``alpha`` = 1 gives every channel the
same activation range; 0.5 splits the difficulty between activation and weight. Only chains whose middle
tensors feed nothing else are touched (a residual stream is read by the skip connection too).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from dede_rt.calibration.activations import Feeds, channel_stats


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def equalizable_chains(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(conv A, relu, conv B) chains where A feeds only the Relu, the Relu only B; plain convs, own initializers."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    chains = []
    for relu in graph.node:
        first = producer.get(relu.input[0]) if relu.op_type == "Relu" else None
        after = consumers.get(relu.output[0], []) if first is not None else []
        if first is None or first.op_type != "Conv" or len(after) != 1 or after[0].op_type != "Conv":
            continue
        second = after[0]
        weights = [first.input[1], *first.input[2:3], second.input[1]]
        if (len(consumers[first.output[0]]) != 1 or {first.output[0], relu.output[0]} & outputs
                or second.input[0] != relu.output[0] or _attribute(first, "group", 1) != 1
                or _attribute(second, "group", 1) != 1
                or any(w not in inits or len(consumers[w]) != 1 for w in weights)):
            continue
        chains.append((first, relu, second))
    return chains


def equalize_activations(model: onnx.ModelProto, feeds: Feeds, alpha: float = 0.5) -> dict:
    """Equalize the middle activation of every ``equalizable_chains`` chain, in place; returns what was done."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    chains = equalizable_chains(model)
    if not chains:
        return {"alpha": alpha, "chains": 0, "range_spread": {}}
    ranges = channel_stats(model, [relu.output[0] for _, relu, _ in chains], feeds, "absmax")
    inits = {t.name: t for t in model.graph.initializer}

    def replace(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    spread = {}
    for first, relu, second in chains:
        r = ranges[relu.output[0]]
        w_second = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
        w = np.abs(w_second).max(axis=(0, *range(2, w_second.ndim)))
        # Dead channels (r or w zero) keep scale 1; the inner where only keeps 0 ** negative out of the arithmetic.
        s = np.where((r > 0) & (w > 0), r**alpha / np.where(w > 0, w, 1.0) ** (1.0 - alpha), 1.0)
        w_first = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
        replace(first.input[1], w_first / s.reshape((-1,) + (1,) * (w_first.ndim - 1)))
        if len(first.input) > 2 and first.input[2]:
            replace(first.input[2], numpy_helper.to_array(inits[first.input[2]]).astype(np.float64) / s)
        replace(second.input[1], w_second * s.reshape((1, -1) + (1,) * (w_second.ndim - 2)))
        live = r[r > 0]
        spread[second.name] = float(live.max() / live.min()) if len(live) else 1.0  # before: max / min channel range
    return {"alpha": alpha, "chains": len(chains), "range_spread": spread}

"""Per-channel statistics of a graph's intermediate tensors over calibration images (bias correction,
activation equalization)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx

Feeds = Callable[[], Iterator[dict]]  # a fresh iterator of ORT feed dicts (the calibration batches) per call


def up_to(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``tensors`` and whose nodes are only those they need."""
    producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    needed, stack = set(), list(tensors)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in needed:  # by position: node names may be empty
            needed.add(i)
            stack.extend(model.graph.node[i].input)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(model.graph.node[i] for i in sorted(needed))
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    return cut


def channel_stats(model: onnx.ModelProto, tensors: list[str], feeds: Feeds, stat: str = "mean") -> dict[str, np.ndarray]:
    """Per channel (axis 1) of each of ``tensors``: its ``mean`` or its ``absmax`` over batch and space, all batches."""
    import onnxruntime as ort

    if stat not in ("mean", "absmax"):
        raise ValueError(f"unknown statistic {stat!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own arithmetic
    options.log_severity_level = 3  # the cut graph keeps every initializer; ORT would warn about each unused one
    # An early layer's pass runs only the layers before it.
    session = ort.InferenceSession(up_to(model, tensors).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    acc: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(tensors, 0)
    for feed in feeds():
        for name, value in zip(tensors, session.run(tensors, feed)):
            axes = tuple(i for i in range(value.ndim) if i != 1)
            if stat == "mean":
                acc[name] = acc.get(name, 0.0) + value.astype(np.float64).sum(axis=axes)
                counts[name] += value.size // value.shape[1]
            else:
                acc[name] = np.maximum(acc.get(name, 0.0), np.abs(value).max(axis=axes).astype(np.float64))
    return {name: acc[name] / counts[name] if stat == "mean" else acc[name] for name in tensors}

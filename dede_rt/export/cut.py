"""Cut a fused detector graph at the victim embedding: the encoder part alone (images -> embedding).

The speed of a detector is judged against its own encoder: the same graph, same precision, same Q/DQ, cut at
the embedding. The embedding is the float tensor entering the decoder's projection (the node that reads the
``project.weight`` initializer, through a DequantizeLinear in Q/DQ graphs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dede_rt.errors import UserError

PROJECT_WEIGHTS = ("decoder.project.weight", "folded.project.weight")  # ScoreTail / FoldedTail


def embedding_tensor(model: onnx.ModelProto, project_weight: np.ndarray | None = None) -> str:
    """Name of the float embedding tensor the decoder's projection reads (above any Q/DQ pair).

    The projection is found by its weight's name (the dynamo exporter keeps parameter names) or, given
    ``project_weight`` [C, D], by value (the TorchScript exporter renames folded constants).
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    names = {t.name for t in graph.initializer if any(p in t.name for p in PROJECT_WEIGHTS)}
    if not names and project_weight is not None:
        w = np.asarray(project_weight, np.float32)
        names = {t.name for t in graph.initializer if tuple(t.dims) in (w.shape, w.shape[::-1])
                 and np.array_equal(numpy_helper.to_array(t).reshape(-1),
                                    (w if tuple(t.dims) == w.shape else w.T).reshape(-1))}
    consumers = [n for n in graph.node if set(n.input) & names]
    for node in list(consumers):  # through the weight's DequantizeLinear (INT8) or a Transpose constant
        if node.op_type in ("DequantizeLinear", "Transpose", "Cast"):
            consumers.remove(node)
            consumers.extend(m for m in graph.node if node.output[0] in m.input)
    if not consumers:
        raise UserError(f"no node reads the decoder's projection weight ({' or '.join(PROJECT_WEIGHTS)}): cannot find the embedding")
    data = consumers[0].input[0]  # Gemm / MatMul: the data operand comes first
    while data in producer and producer[data].op_type in ("DequantizeLinear", "QuantizeLinear"):
        data = producer[data].input[0]
    return data


def cut_encoder(model_path: str | Path, out_path: str | Path, project_weight: np.ndarray | None = None) -> Path:
    """Write the part of the detector graph at ``model_path`` that computes the embedding (images -> embedding)."""
    model = onnx.load(str(model_path))
    name = embedding_tensor(model, project_weight)
    graph_input = model.graph.input[0].name
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    sub = extractor.extract_model([graph_input], [name])
    onnx.save(sub, str(out_path))
    return Path(out_path)


def cut_decoder(model_path: str | Path, out_path: str | Path, project_weight: np.ndarray | None = None) -> Path:
    """Write the rest: (images, embedding) -> scores, the decoder + score tail of the same graph."""
    model = onnx.load(str(model_path))
    name = embedding_tensor(model, project_weight)
    graph_input = model.graph.input[0].name
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    sub = extractor.extract_model([graph_input, name], [o.name for o in model.graph.output])
    onnx.save(sub, str(out_path))
    return Path(out_path)

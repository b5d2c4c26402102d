"""The mask-and-score tail as a custom ONNX node, its standard-op lowering, and ORT evaluation.

Custom ops (domain ``com.dede_rt``, opset version 1), one output ``scores`` float32 [N]:

``MaskAndScore(images, recon, token_weight)``
    images: the graph's raw pixel input, uint8 [N, H, W, 3] (``layout`` "nhwc_uint8") or float32
    [N, 3, H, W] in [0, 1] (``layout`` "nchw_unit", the TensorRT engines' input), recon float32 [N, T, 3p²]
    (decoder head output, (c, p1, p2) order), token_weight float32 [T] (1 = masked patch,
    counted; 0 = visible, ignored; shared by the batch, as at test time).
``MaskAndScoreHead(images, hidden, head_weight, head_bias, token_weight)``
    hidden float32 [N, T, dim] (last decoder block, cls slot dropped), head_weight [3p², dim],
    head_bias [3p²]; the head Linear is fused into the score.

Attributes (both ops): ``mean``, ``std`` (floats, 3 each: target = (x − mean)/std per channel,
x = u8/255 or the [0, 1] pixels), ``patch_size`` (int), ``image_size`` (int, H = W), ``layout``
(string, see above; absent = "nhwc_uint8"), and for TensorRT's ONNX parser
``plugin_namespace`` = "dede_rt" (the node's op type is the plugin name) and ``aot`` (int,
1 = use the ahead-of-time Triton kernel baked into the engine, 0 = the Python JIT impl).

``fuse_score_tail`` rewrites a fused detector graph (uint8 or float NCHW images -> scores) to end
in one such node (the TensorRT builder's ``--score-tail plugin``); ``lower_custom_nodes`` turns
the nodes back into standard ops (what runs where the plugin is not available); ``CustomOpSession`` runs a graph with custom nodes on ONNX
Runtime, evaluating the nodes with the reference op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "com.dede_rt"
PLUGIN_NAMESPACE = "dede_rt"
OP_SCORE = "MaskAndScore"
OP_HEAD = "MaskAndScoreHead"
CUSTOM_OPS = (OP_SCORE, OP_HEAD)


LAYOUTS = ("nhwc_uint8", "nchw_unit")  # the two pixel inputs (reference.LAYOUTS)


def _attrs(mean: Sequence[float], std: Sequence[float], patch: int, image_size: int, aot: bool,
           layout: str) -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pixel layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "patch_size": int(patch),
            "image_size": int(image_size), "layout": layout, "plugin_namespace": PLUGIN_NAMESPACE, "aot": int(aot)}


def mask_and_score_node(images: str, recon: str, token_weight: str, scores: str, mean: Sequence[float],
                        std: Sequence[float], patch: int, image_size: int, name: str = "mask_and_score",
                        aot: bool = True, layout: str = "nhwc_uint8") -> onnx.NodeProto:
    """A ``com.dede_rt::MaskAndScore`` node."""
    return helper.make_node(OP_SCORE, [images, recon, token_weight], [scores], name=name, domain=DOMAIN,
                            **_attrs(mean, std, patch, image_size, aot, layout))


def mask_and_score_head_node(images: str, hidden: str, weight: str, bias: str, token_weight: str, scores: str,
                             mean: Sequence[float], std: Sequence[float], patch: int, image_size: int,
                             name: str = "mask_and_score_head", aot: bool = True,
                             layout: str = "nhwc_uint8") -> onnx.NodeProto:
    """A ``com.dede_rt::MaskAndScoreHead`` node."""
    return helper.make_node(OP_HEAD, [images, hidden, weight, bias, token_weight], [scores], name=name,
                            domain=DOMAIN, **_attrs(mean, std, patch, image_size, aot, layout))


def standard_tail(images: str, recon: str, token_weight: str, scores: str, mean: Sequence[float],
                  std: Sequence[float], patch: int, image_size: int, prefix: str = "mask_and_score",
                  layout: str = "nhwc_uint8") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The same op in standard ONNX ops (opset >= 13): [Cast, Div,] Sub, Div, Reshape, Transpose, Reshape, Sub, Mul,
    ReduceSum, Mul, ReduceSum. Returns (nodes, initializers); ``token_weight`` must exist in the graph."""
    g, p = image_size // patch, patch
    k = lambda s: f"{prefix}/{s}"  # noqa: E731 - local name helper
    nchw = layout == "nchw_unit"
    channel_shape = (3, 1, 1) if nchw else (3,)  # mean/std broadcast on the channel axis of either layout
    inits = [
        numpy_helper.from_array(np.asarray(mean, np.float32).reshape(channel_shape), k("mean")),
        numpy_helper.from_array(np.asarray(std, np.float32).reshape(channel_shape), k("std")),
        numpy_helper.from_array(np.array([-1, 3, g, p, g, p] if nchw else [-1, g, p, g, p, 3], np.int64),
                                k("grid_shape")),
        numpy_helper.from_array(np.array([-1, g * g, 3 * p * p], np.int64), k("patch_shape")),
        numpy_helper.from_array(np.array([2], np.int64), k("axis2")),
        numpy_helper.from_array(np.array([1], np.int64), k("axis1")),
    ]
    mk = helper.make_node
    if nchw:
        nodes = [mk("Sub", [images, k("mean")], [k("centered")], name=k("sub_mean"))]
    else:
        inits.append(numpy_helper.from_array(np.array(255.0, np.float32), k("c255")))
        nodes = [
            mk("Cast", [images], [k("pixels")], name=k("cast"), to=TensorProto.FLOAT),
            # Same op order as Normalize ((x/255 - mean)/std), on NHWC so mean/std broadcast on the last axis.
            mk("Div", [k("pixels"), k("c255")], [k("unit")], name=k("div255")),
            mk("Sub", [k("unit"), k("mean")], [k("centered")], name=k("sub_mean")),
        ]
    # -> [N, gy, gx, c, p1, p2]: the head's (c, p1, p2) patch order, from [N, gy, p1, gx, p2, c] (NHWC) or
    # [N, c, gy, p1, gx, p2] (NCHW).
    perm = [0, 2, 4, 1, 3, 5] if nchw else [0, 1, 3, 5, 2, 4]
    nodes += [
        mk("Div", [k("centered"), k("std")], [k("normalized")], name=k("div_std")),
        mk("Reshape", [k("normalized"), k("grid_shape")], [k("grid")], name=k("reshape_grid")),
        mk("Transpose", [k("grid")], [k("patches6")], name=k("patchify"), perm=perm),
        mk("Reshape", [k("patches6"), k("patch_shape")], [k("target")], name=k("reshape_patches")),
        mk("Sub", [recon, k("target")], [k("diff")], name=k("sub")),
        mk("Mul", [k("diff"), k("diff")], [k("sq")], name=k("square")),
        mk("ReduceSum", [k("sq"), k("axis2")], [k("token_sse")], name=k("sum_patch"), keepdims=0),
        mk("Mul", [k("token_sse"), token_weight], [k("masked_sse")], name=k("mask")),
        mk("ReduceSum", [k("masked_sse"), k("axis1")], [scores], name=k("sum_tokens"), keepdims=0),
    ]
    return nodes, inits


def standard_head_tail(images: str, hidden: str, weight: str, bias: str, token_weight: str, scores: str,
                       mean: Sequence[float], std: Sequence[float], patch: int, image_size: int,
                       weight_value: np.ndarray | None = None, prefix: str = "mask_and_score_head",
                       layout: str = "nhwc_uint8") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``MaskAndScoreHead`` in standard ops: MatMul(hidden, weightᵀ) + bias, then ``standard_tail``.

    ``weight_value`` given: its transpose is stored as an initializer (no Transpose node).
    """
    inits: list[onnx.TensorProto] = []
    if weight_value is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(weight_value, np.float32).T),
                                             f"{prefix}/weight_t"))
        nodes = []
    else:
        nodes = [helper.make_node("Transpose", [weight], [f"{prefix}/weight_t"], name=f"{prefix}/transpose_w",
                                  perm=[1, 0])]
    nodes += [
        helper.make_node("MatMul", [hidden, f"{prefix}/weight_t"], [f"{prefix}/matmul"], name=f"{prefix}/matmul"),
        helper.make_node("Add", [f"{prefix}/matmul", bias], [f"{prefix}/recon"], name=f"{prefix}/bias"),
    ]
    tail_nodes, tail_inits = standard_tail(images, f"{prefix}/recon", token_weight, scores, mean, std, patch,
                                           image_size, prefix, layout)
    return nodes + tail_nodes, inits + tail_inits


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _ensure_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) may read."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
    return names


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers no graph output depends on (in place; returns the model)."""
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed = {o.name for o in graph.output}
    keep: set[int] = set()
    stack = list(needed)
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in keep:
            continue
        keep.add(i)
        node = graph.node[i]
        for inp in [*node.input, *_subgraph_inputs(node)]:
            if inp and inp not in needed:
                needed.add(inp)
                stack.append(inp)
    nodes = [n for i, n in enumerate(graph.node) if i in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    values = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(values)
    return model


def _initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _upstream(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    """Nodes ``name`` depends on, nearest first."""
    producer = {out: node for node in model.graph.node for out in node.output}
    seen, order, stack = set(), [], [name]
    while stack:
        node = producer.get(stack.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(i for i in node.input if i)
    return order


def locate_head(model: onnx.ModelProto, scores: str, head_weight: np.ndarray) -> tuple[str, str]:
    """Find the decoder head (MatMul/Gemm whose constant operand equals ``head_weight`` [P, D] or its transpose)
    upstream of ``scores``; returns (hidden input name, reconstruction output name)."""
    weight = np.asarray(head_weight, np.float32)
    values = _initializer_values(model)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    values.update(consts)
    # An FP16-converted graph keeps the float32 head weight behind a Cast (the tail stays float32 there).
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]].astype(np.float32)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in _upstream(model, scores):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in values:
            continue
        w = values[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        w = w.T if trans_b else w
        if w.shape != weight.T.shape or not np.allclose(w, weight.T, rtol=1e-6, atol=1e-7):
            continue
        out = node.output[0]
        # A MatMul head adds its bias in the next node (past the Identity/Cast pairs an FP16 conversion leaves
        # between them); Gemm already has it.
        nxt = consumers.get(out, [])
        while node.op_type == "MatMul" and len(nxt) == 1 and nxt[0].op_type in ("Identity", "Cast"):
            nxt = consumers.get(nxt[0].output[0], [])
        if node.op_type == "MatMul" and len(nxt) == 1 and nxt[0].op_type == "Add" \
                and any(i in values for i in nxt[0].input):
            out = nxt[0].output[0]
        return node.input[0], out
    raise ValueError("no MatMul/Gemm with the decoder head's weight found upstream of " + scores)


def fuse_score_tail(
    model: onnx.ModelProto, images: str, scores: str, head_weight: np.ndarray, head_bias: np.ndarray | None,
    mean: Sequence[float], std: Sequence[float], patch: int, image_size: int,
    token_weight: np.ndarray | None = None, head_fused: bool = True, aot: bool = True, layout: str | None = None,
) -> onnx.ModelProto:
    """Rewrite a detector graph (pixels ``images`` -> ``scores``) so the score tail is one custom node.

    ``layout``: the pixel input's layout (None: uint8 input = "nhwc_uint8", float = "nchw_unit").

    The head is found by its weight (``locate_head``); with ``head_fused`` the node is
    ``MaskAndScoreHead`` fed by the head's input, else ``MaskAndScore`` fed by the head's
    output. ``token_weight`` [T] is the shared test mask (None: every patch masked). The
    old tail (patchify, squared error, reductions, and with ``head_fused`` the head) is pruned.
    Returns a new model; the input is not modified.
    """
    if _default_opset(model) < 13:
        raise ValueError("the fused graph needs default opset >= 13")
    if any(n.op_type == "TopK" for n in model.graph.node):
        # The node replaces everything that produces ``scores``; the prototype term would be pruned with it.
        raise ValueError("this graph computes the relative score; the custom node replaces the reference tail only")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if layout is None:
        layout = input_layout(model, images)
    hidden, recon = locate_head(model, scores, head_weight)
    tokens = (image_size // patch) ** 2
    weight_vec = np.ones(tokens, np.float32) if token_weight is None else np.asarray(token_weight, np.float32)
    if weight_vec.shape != (tokens,):
        raise ValueError(f"token_weight must have shape [{tokens}], got {list(weight_vec.shape)}")
    graph = model.graph
    keep = [n for n in graph.node if scores not in n.output]
    del graph.node[:]
    graph.node.extend(keep)
    prefix = "dede_rt_score"
    graph.initializer.append(numpy_helper.from_array(weight_vec, f"{prefix}/token_weight"))
    if head_fused:
        width = 3 * patch * patch
        bias = np.zeros(width, np.float32) if head_bias is None else np.asarray(head_bias, np.float32)
        graph.initializer.append(numpy_helper.from_array(np.asarray(head_weight, np.float32), f"{prefix}/head_weight"))
        graph.initializer.append(numpy_helper.from_array(bias, f"{prefix}/head_bias"))
        node = mask_and_score_head_node(images, hidden, f"{prefix}/head_weight", f"{prefix}/head_bias",
                                        f"{prefix}/token_weight", scores, mean, std, patch, image_size, aot=aot,
                                        layout=layout)
    else:
        node = mask_and_score_node(images, recon, f"{prefix}/token_weight", scores, mean, std, patch, image_size,
                                   aot=aot, layout=layout)
    graph.node.append(node)
    _ensure_domain(model)
    return prune(model)


def _attr(node: onnx.NodeProto, name: str):  # noqa: ANN202 - an ONNX attribute value
    if name == "layout" and not any(a.name == name for a in node.attribute):
        return "nhwc_uint8"  # nodes written before the attribute existed read uint8 NHWC
    value = helper.get_attribute_value(next(a for a in node.attribute if a.name == name))
    return value.decode() if isinstance(value, bytes) else value


def input_layout(model: onnx.ModelProto, images: str) -> str:
    """The pixel layout of graph input ``images``: "nhwc_uint8" for uint8, "nchw_unit" for float32 NCHW."""
    value = next((i for i in model.graph.input if i.name == images), None)
    if value is None:
        raise ValueError(f"the graph has no input {images!r}")
    elem = value.type.tensor_type.elem_type
    if elem == TensorProto.UINT8:
        return "nhwc_uint8"
    if elem == TensorProto.FLOAT:
        return "nchw_unit"
    raise ValueError(f"input {images!r} is {TensorProto.DataType.Name(elem)}; the score tail reads uint8 NHWC or "
                     "float32 NCHW pixels")


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``com.dede_rt`` mask-and-score nodes of a graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in CUSTOM_OPS]


def tail_kind(model: onnx.ModelProto) -> str:
    """What an engine manifest records: "plugin:dede_rt::MaskAndScore[Head]" or "standard"."""
    nodes = custom_nodes(model)
    return f"plugin:{PLUGIN_NAMESPACE}::{nodes[0].op_type}" if nodes else "standard"


def lower_custom_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every mask-and-score custom node by its standard-op subgraph (a new model)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if _default_opset(model) < 13:
        raise ValueError("lowering needs default opset >= 13")
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        if node not in custom_nodes(model):
            nodes.append(node)
            continue
        a = {k: _attr(node, k) for k in ("mean", "std", "patch_size", "image_size", "layout")}
        args = (a["mean"], a["std"], a["patch_size"], a["image_size"])
        prefix = f"{node.name or node.op_type}_{i}/lowered"
        if node.op_type == OP_SCORE:
            new, inits = standard_tail(node.input[0], node.input[1], node.input[2], node.output[0], *args, prefix,
                                       a["layout"])
        else:
            new, inits = standard_head_tail(*node.input[:5], node.output[0], *args, prefix=prefix,
                                            layout=a["layout"])
        nodes.extend(new)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def evaluate_node(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray:
    """Evaluate one mask-and-score custom node with the reference op: float32 scores [N]."""
    from dede_rt.kernels import reference

    a = {k: _attr(node, k) for k in ("mean", "std", "patch_size")}
    t = [torch.from_numpy(np.array(values[name], copy=True)) for name in node.input]  # writable copies
    if node.op_type == OP_SCORE:
        images, recon, weight = t
        scores = reference.mask_and_score(images, recon, weight[None], a["mean"], a["std"], a["patch_size"])
    else:
        images, hidden, head_w, head_b, weight = t
        scores = reference.mask_and_score_head(images, hidden, head_w, head_b, weight[None], a["mean"], a["std"],
                                               a["patch_size"])
    return scores.numpy().astype(np.float32)


class CustomOpSession:
    """Runs a graph whose mask-and-score nodes are custom on ONNX Runtime, those nodes via the reference op.

    The custom nodes must be the graph's tail (their outputs are graph outputs), as
    ``fuse_score_tail`` makes them: ORT runs everything before them, then the nodes run.
    """

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        from dede_rt.optional import import_onnxruntime

        ort = import_onnxruntime("running a custom-op ONNX graph")

        self.nodes = custom_nodes(model)
        outputs = {o.name for o in model.graph.output}
        produced = {out for n in self.nodes for out in n.output}
        consumed = {i for n in model.graph.node if n not in self.nodes for i in n.input}
        if produced & consumed or not produced <= outputs:
            raise ValueError("custom mask-and-score nodes must only feed graph outputs")
        front = onnx.ModelProto.FromString(model.SerializeToString())
        graph = front.graph
        rest = [n for n in graph.node if not (n.domain == DOMAIN and n.op_type in CUSTOM_OPS)]
        del graph.node[:]
        graph.node.extend(rest)
        inits = {t.name for t in graph.initializer}
        graph_inputs = {i.name for i in graph.input}
        self.fetch = sorted({i for n in self.nodes for i in n.input if i not in inits and i not in graph_inputs})
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer
                          if any(t.name in n.input for n in self.nodes)}
        self.output_names = [o.name for o in model.graph.output]
        others = [o for o in graph.output if o.name not in produced]
        del graph.output[:]
        graph.output.extend(others + [helper.make_empty_tensor_value_info(name) for name in self.fetch])
        prune(front)
        kept = [o for o in front.opset_import if o.domain != DOMAIN]
        del front.opset_import[:]
        front.opset_import.extend(kept)
        self.input_names = [i.name for i in front.graph.input if i.name not in inits]
        # A graph that is only the tail leaves nothing for ORT to run.
        self.session = (ort.InferenceSession(front.SerializeToString(), providers=list(providers))
                        if len(front.graph.output) else None)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the original graph's order."""
        got = {}
        if self.session is not None:
            names = [o.name for o in self.session.get_outputs()]
            got = dict(zip(names, self.session.run(names, {k: v for k, v in feeds.items() if k in self.input_names})))
        values = {**self.constants, **feeds, **got}
        for node in self.nodes:
            values[node.output[0]] = evaluate_node(node, values)
        return [values[name] for name in self.output_names]

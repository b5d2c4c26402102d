"""The custom mask-and-score ONNX node: checker, and the same scores as the standard-op graph on ONNX Runtime."""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dede_rt.kernels import onnx_custom as oc
from dede_rt.kernels import reference as ref
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _tail_model(size: int, patch: int, custom: bool, head_dim: int | None = None, weight=None, bias=None,
                token_weight=None) -> onnx.ModelProto:
    """A graph that is only the tail: (images, recon|hidden) -> scores."""
    tokens, width = (size // patch) ** 2, 3 * patch * patch
    src_shape = ["N", tokens, head_dim or width]
    inputs = [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3]),
              helper.make_tensor_value_info("src", TensorProto.FLOAT, src_shape)]
    tw = np.ones(tokens, np.float32) if token_weight is None else token_weight
    inits = [numpy_helper.from_array(tw, "token_weight")]
    args = (MEAN, STD, patch, size)
    if head_dim is None:
        if custom:
            nodes, extra = [oc.mask_and_score_node("images", "src", "token_weight", "scores", *args)], []
        else:
            nodes, extra = oc.standard_tail("images", "src", "token_weight", "scores", *args)
    else:
        inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        if custom:
            nodes, extra = [oc.mask_and_score_head_node("images", "src", "w", "b", "token_weight", "scores", *args)], []
        else:
            nodes, extra = oc.standard_head_tail("images", "src", "w", "b", "token_weight", "scores", *args)
    graph = helper.make_graph(nodes, "tail", inputs, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"])],
                              inits + extra)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(oc.DOMAIN, 1)] if custom else [])
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("size,patch,n", [(32, 4, 5), (32, 8, 1), (224, 16, 2)])
@pytest.mark.parametrize("head", [False, True])
def test_standard_and_custom_tail_match_reference(size, patch, n, head, rng):
    tokens, width, dim = (size // patch) ** 2, 3 * patch * patch, 24
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    tw = (rng.random(tokens) > 0.3).astype(np.float32)
    weight = (rng.standard_normal((width, dim)) / 5).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    src = rng.standard_normal((n, tokens, dim if head else width)).astype(np.float32)
    kw = dict(head_dim=dim, weight=weight, bias=bias) if head else {}
    standard = _tail_model(size, patch, False, token_weight=tw, **kw)
    custom = _tail_model(size, patch, True, token_weight=tw, **kw)
    for m in (standard, custom):
        onnx.checker.check_model(m, full_check=True)
    t = [torch.from_numpy(a) for a in (images, src, weight, bias)]
    mask = torch.from_numpy(tw)[None]
    expected = (ref.mask_and_score_head(t[0], t[1], t[2], t[3], mask, MEAN, STD, patch) if head
                else ref.mask_and_score(t[0], t[1], mask, MEAN, STD, patch)).numpy()
    feeds = {"images": images, "src": src}
    got_standard = _ort(standard, feeds)
    got_custom = oc.CustomOpSession(custom).run(feeds)[0]
    got_lowered = _ort(oc.lower_custom_nodes(custom), feeds)
    for got in (got_standard, got_custom, got_lowered):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert oc.tail_kind(custom) == f"plugin:dede_rt::{'MaskAndScoreHead' if head else 'MaskAndScore'}"
    assert oc.tail_kind(standard) == "standard"


class _Fused(nn.Module):
    """A small uint8 detector graph in the shape of the fused export: normalize -> encoder -> decoder -> SSE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Conv2d(3, 48, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.decoder = DeDeDecoder(DecoderConfig(embed_dim=48, dim=32, heads=2, encoder_depth=1, decoder_depth=1)).eval()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        pred = self.decoder.decode_embedding(self.encoder(x))
        return (pred - patchify_images(x, 4)).square().sum(dim=(1, 2))


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def fused_graph(request) -> tuple[onnx.ModelProto, _Fused]:
    module = _Fused().eval()
    example = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if request.param == "dynamo":
            program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["scores"],
                                        dynamo=True, opset_version=18,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
            model = program.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["scores"], dynamo=False,
                              opset_version=17, dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}})
            model = onnx.load_from_string(buf.getvalue())
    return model, module


@pytest.mark.parametrize("head_fused", [True, False])
def test_fuse_score_tail_on_exported_graph(fused_graph, head_fused, rng):
    model, module = fused_graph
    head = module.decoder.head
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    fused = oc.fuse_score_tail(model, "images", "scores", w, b, MEAN, STD, 4, 32, head_fused=head_fused)
    onnx.checker.check_model(fused, full_check=True)
    nodes = oc.custom_nodes(fused)
    assert len(nodes) == 1 and nodes[0].op_type == (oc.OP_HEAD if head_fused else oc.OP_SCORE)
    assert {a.name for a in nodes[0].attribute} >= {"mean", "std", "patch_size", "image_size", "plugin_namespace", "aot"}
    # The old tail is gone: nothing else reduces, and with the head fused no MatMul reads the head weight.
    assert not any(n.op_type in ("ReduceSum", "Pow") for n in fused.graph.node if n not in nodes)
    assert len(fused.graph.node) < len(model.graph.node)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    expected = _ort(model, {"images": images})
    with torch.no_grad():
        np.testing.assert_allclose(expected, module(torch.from_numpy(images)).numpy(), rtol=1e-4)
    got = oc.CustomOpSession(fused).run({"images": images})[0]
    lowered = oc.lower_custom_nodes(fused)
    onnx.checker.check_model(lowered, full_check=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(_ort(lowered, {"images": images}), expected, rtol=1e-5)


def test_fuse_with_token_weight_and_errors(fused_graph, rng):
    model, module = fused_graph
    head = module.decoder.head
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    tw = (rng.random(64) > 0.5).astype(np.float32)
    fused = oc.fuse_score_tail(model, "images", "scores", w, b, MEAN, STD, 4, 32, token_weight=tw)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images)
        hidden = module.decoder.decode_hidden(module.encoder((x.permute(0, 3, 1, 2).float() / 255 - module.mean) / module.std))
        expected = ref.mask_and_score_head(x, hidden, head.weight, head.bias, torch.from_numpy(tw)[None], MEAN, STD, 4)
    np.testing.assert_allclose(oc.CustomOpSession(fused).run({"images": images})[0], expected.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="head"):
        oc.fuse_score_tail(model, "images", "scores", w + 1, b, MEAN, STD, 4, 32)
    with pytest.raises(ValueError, match="token_weight"):
        oc.fuse_score_tail(model, "images", "scores", w, b, MEAN, STD, 4, 32, token_weight=np.ones(10))


@pytest.mark.parametrize("head", [False, True])
def test_float_nchw_layout_node_and_lowering(head, rng):
    """``layout="nchw_unit"`` (the TensorRT engines' float [0, 1] NCHW input): same scores as the uint8 NHWC node."""
    size, patch, n, dim = 32, 4, 3, 24
    tokens, width = (size // patch) ** 2, 3 * patch * patch
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    pixels = (images.transpose(0, 3, 1, 2) / np.float32(255.0)).astype(np.float32)
    tw = (rng.random(tokens) > 0.3).astype(np.float32)
    weight = (rng.standard_normal((width, dim)) / 5).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    src = rng.standard_normal((n, tokens, dim if head else width)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size]),
              helper.make_tensor_value_info("src", TensorProto.FLOAT, ["N", tokens, src.shape[2]])]
    inits = [numpy_helper.from_array(a, name) for a, name in ((tw, "tw"), (weight, "w"), (bias, "b"))]
    args = (MEAN, STD, patch, size)
    node = (oc.mask_and_score_head_node("images", "src", "w", "b", "tw", "scores", *args, layout="nchw_unit") if head
            else oc.mask_and_score_node("images", "src", "tw", "scores", *args, layout="nchw_unit"))
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"])
    graph = helper.make_graph([node], "tail", inputs, [scores], inits if head else inits[:1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(oc.DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    kw = dict(head_dim=dim, weight=weight, bias=bias) if head else {}
    uint8 = _tail_model(size, patch, False, token_weight=tw, **kw)
    expected = _ort(uint8, {"images": images, "src": src})
    feeds = {"images": pixels, "src": src}
    lowered = oc.lower_custom_nodes(model)
    onnx.checker.check_model(lowered, full_check=True)
    assert not any(n.op_type == "Cast" for n in lowered.graph.node)  # float pixels: no uint8 cast, no /255
    for got in (_ort(lowered, feeds), oc.CustomOpSession(model).run(feeds)[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match="layout"):
        oc.mask_and_score_node("images", "src", "tw", "scores", *args, layout="nhwc_float")

"""TensorRT plugin for mask-and-score: AOT PTX compilation (needs only triton) and engines (need tensorrt + CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_unit"])
@pytest.mark.parametrize("kind,params", [("score", 8), ("head", 13)])
def test_aot_kernels_compile_to_ptx_for_tensorrt(kind, params, layout):
    """The AOT path compiles for a GPU target without a GPU: check the calling convention TensorRT relies on."""
    pytest.importorskip("triton", reason="triton is not installed")
    from dede_rt.kernels.trt_plugin import compile_aot

    try:
        compiled = compile_aot(kind, 4, MEAN, STD, tactic=1, arch=90, layout=layout)
    except Exception as exc:  # e.g. a triton build without the NVIDIA backend / ptxas
        pytest.skip(f"triton cannot compile for sm_90 here: {exc}")
    ptx = compiled.asm["ptx"]
    entry = ptx.split(".entry", 1)[1].split(")", 1)[0]
    declared = [line for line in entry.splitlines() if ".param" in line]
    # Our (inputs, int32 scalars, output) parameters, then Triton's two hidden scratch pointers.
    assert len(declared) == params + 2
    assert compiled.metadata.name in entry
    assert compiled.metadata.global_scratch_size == 0 and compiled.metadata.profile_scratch_size == 0
    assert compiled.metadata.num_warps * 32 <= 1024 and compiled.metadata.shared <= 48 * 1024
    # The pixels are loaded as bytes (uint8 NHWC) or as float32 words (the engines' [0, 1] NCHW input).
    body = ptx.split(".entry", 1)[1]
    assert ("ld.global.b8" in body or "ld.global.u8" in body) == (layout == "nhwc_uint8")


def test_plugin_status_is_one_line_and_says_what_is_missing():
    from dede_rt.kernels.trt_plugin import plugin_status

    ok, why, aot = plugin_status()
    assert "\n" not in why and why
    if not ok:
        assert aot is False


def _tail_onnx(size: int, patch: int, head: bool, aot: bool, tw: np.ndarray, weight=None, bias=None,
               layout: str = "nhwc_uint8"):
    from onnx import TensorProto, helper, numpy_helper

    from dede_rt.kernels import onnx_custom as oc

    tokens, width = (size // patch) ** 2, 3 * patch * patch
    src_dim = weight.shape[1] if head else width
    nchw = layout == "nchw_unit"
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT if nchw else TensorProto.UINT8,
                                            ["N", 3, size, size] if nchw else ["N", size, size, 3]),
              helper.make_tensor_value_info("src", TensorProto.FLOAT, ["N", tokens, src_dim])]
    inits = [numpy_helper.from_array(tw, "tw")]
    args = (MEAN, STD, patch, size)
    if head:
        inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        node = oc.mask_and_score_head_node("images", "src", "w", "b", "tw", "scores", *args, aot=aot, layout=layout)
    else:
        node = oc.mask_and_score_node("images", "src", "tw", "scores", *args, aot=aot, layout=layout)
    graph = helper.make_graph([node], "tail", inputs, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(oc.DOMAIN, 1)])


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_unit"])
@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("aot", [True, False])
def test_tensorrt_engine_with_plugin_matches_reference(head, aot, layout):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install -e '.[trt]')")
    pytest.importorskip("tensorrt.plugin", reason="this TensorRT has no tensorrt.plugin (needs >= 10.8)")
    pytest.importorskip("triton", reason="triton is not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from dede_rt.kernels import reference as ref
    from dede_rt.kernels.trt_plugin import register_plugins

    register_plugins()
    rng = np.random.default_rng(0)
    size, patch, dim, n = 32, 4, 64, 7
    tokens, width = (size // patch) ** 2, 3 * patch * patch
    tw = (rng.random(tokens) > 0.2).astype(np.float32)
    weight = (rng.standard_normal((width, dim)) / 8).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    model = _tail_onnx(size, patch, head, aot, tw, weight, bias, layout)
    nchw = layout == "nchw_unit"
    pixel_shape = (3, size, size) if nchw else (size, size, 3)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    src_dim = dim if head else width
    profile.set_shape("images", (1, *pixel_shape), (8, *pixel_shape), (16, *pixel_shape))
    profile.set_shape("src", (1, tokens, src_dim), (8, tokens, src_dim), (16, tokens, src_dim))
    config.add_optimization_profile(profile)
    engine_bytes = builder.build_serialized_network(network, config)
    assert engine_bytes is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()

    images = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    src = torch.from_numpy(rng.standard_normal((n, tokens, src_dim)).astype(np.float32))
    mask = torch.from_numpy(tw)[None]
    expected = (ref.mask_and_score_head(images, src, torch.from_numpy(weight), torch.from_numpy(bias), mask, MEAN, STD,
                                        patch) if head else ref.mask_and_score(images, src, mask, MEAN, STD, patch))
    d_images, d_src = (images.permute(0, 3, 1, 2).float().div(255.0) if nchw else images).contiguous().cuda(), src.cuda()
    out = torch.empty(n, device="cuda")
    context.set_input_shape("images", tuple(d_images.shape))
    context.set_input_shape("src", tuple(d_src.shape))
    for name, t in (("images", d_images), ("src", d_src), ("scores", out)):
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

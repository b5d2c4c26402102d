"""TensorRT plugins for the mask-and-score custom ONNX nodes, with the ``tensorrt.plugin`` (QDP) API.

Plugins ``dede_rt::MaskAndScore`` and ``dede_rt::MaskAndScoreHead`` match the nodes that
``dede_rt.kernels.onnx_custom`` emits: TensorRT's ONNX parser maps a node to a plugin by op
type (= plugin name) and the node's ``plugin_namespace`` attribute, and uses the AOT
implementation when the node has ``aot=1``.

- register: output = float32 [N] (N = the images' batch dimension); attributes ``mean``,
  ``std`` (float32 arrays), ``patch_size``, ``image_size``, ``layout`` ("nhwc_uint8": uint8
  [N,H,W,3] pixels; "nchw_unit": float32 [N,3,H,W] pixels in [0, 1], the engines' input).
- autotune: I/O types (uint8 or float32 images, float32 rest) and one tactic per Triton block
  config; TensorRT times them at build time and keeps the fastest.
- aot_impl: the Triton kernel compiled to PTX for the build GPU with mean/std/patch baked in
  as compile-time constants and launched by TensorRT with grid (N, 1), so a serialized engine
  runs without Python (e.g. under trtexec). TensorRT's AOT launch passes only pointers and
  int32 scalars in (inputs, scalars, outputs) order, which is the kernels' argument order.
- impl: the JIT fallback (Python callback on TensorRT's stream) with the same kernels.

Call ``register_plugins()`` before parsing an ONNX graph with these nodes or deserializing
an engine built with the JIT impl. Importing this module imports neither TensorRT nor Triton.
"""

# No ``from __future__ import annotations``: tensorrt.plugin reads the decorated functions'
# annotations as objects, and they name modules imported inside register_plugins().

from collections.abc import Sequence

import numpy as np

PLUGIN_NAMESPACE = "dede_rt"
SCORE_PLUGIN = f"{PLUGIN_NAMESPACE}::MaskAndScore"
HEAD_PLUGIN = f"{PLUGIN_NAMESPACE}::MaskAndScoreHead"

# Tactic id -> Triton meta-parameters for the AOT kernels (and the JIT path).
SCORE_TACTICS = {1: {"BLOCK": 1024, "num_warps": 4}, 2: {"BLOCK": 2048, "num_warps": 8},
                 3: {"BLOCK": 4096, "num_warps": 8}}
HEAD_TACTICS = {1: {"BLOCK_T": 64, "BLOCK_P": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3},
                2: {"BLOCK_T": 32, "BLOCK_P": 128, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2},
                3: {"BLOCK_T": 128, "BLOCK_P": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}}

_SCORE_SIGNATURE = {"img_ptr": "*u8", "rec_ptr": "*fp32", "msk_ptr": "*fp32", "T": "i32", "G": "i32",
                    "stride_mn": "i32", "split_len": "i32", "out_ptr": "*fp32"}
_HEAD_SIGNATURE = {"img_ptr": "*u8", "hid_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "msk_ptr": "*fp32",
                   "T": "i32", "G": "i32", "D": "i32", "stride_hn": "i32", "stride_ht": "i32", "stride_mn": "i32",
                   "split_tokens": "i32", "out_ptr": "*fp32"}

LAYOUTS = ("nhwc_uint8", "nchw_unit")  # = dede_rt.kernels.reference.LAYOUTS (not imported: that imports torch)
_registered = False


def plugin_status() -> tuple[bool, str, bool]:
    """(usable, one-line reason, AOT available): can engines here get the mask-and-score plugins?

    Needs TensorRT's ``tensorrt.plugin`` (>= 10.8; ``aot_impl`` for kernels baked into the engine, else the Python
    JIT impl), Triton with its CUDA backend (not the CPU interpreter) and a CUDA GPU.
    """
    import importlib
    import os

    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed", False
    try:
        trtp = importlib.import_module("tensorrt.plugin")
    except ImportError as exc:
        return False, f"TensorRT {trt.__version__} has no tensorrt.plugin (needs >= 10.8): {exc}", False
    missing = [name for name in ("register", "impl", "autotune") if not hasattr(trtp, name)]
    if missing:
        return False, f"TensorRT {trt.__version__}'s tensorrt.plugin lacks {', '.join(missing)}", False
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed (pip install 'dede-rt[gpu]'): {exc}", False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False, "TRITON_INTERPRET=1 is set: Triton runs its CPU interpreter, not CUDA kernels", False
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU for the Triton kernels", False
    aot = hasattr(trtp, "aot_impl")
    how = "AOT (kernels baked into the engine)" if aot else "JIT (Python impl; the engine needs Python to run)"
    return True, f"tensorrt.plugin {trt.__version__} and triton {triton.__version__}, {how}", aot


def compile_aot(kind: str, patch: int, mean: Sequence[float], std: Sequence[float], tactic: int = 1,
                arch: int | None = None, layout: str = "nhwc_uint8"):  # noqa: ANN201 - a triton CompiledKernel
    """Compile the ``kind`` ("score" | "head") kernel to PTX for one detector's constants and pixel ``layout``.

    ``arch`` (e.g. 90) targets that SM without a GPU; default: the current CUDA device.
    Refuses kernels that would need Triton's hidden scratch buffers, which TensorRT does not allocate.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from dede_rt.kernels.triton_score import norm_constants

    ts = _compilable_kernels()
    if kind == "score":
        fn, signature, meta = ts.mask_and_score_kernel, _SCORE_SIGNATURE, dict(SCORE_TACTICS[tactic])
    elif kind == "head":
        fn, signature, meta = ts.mask_and_score_head_kernel, _HEAD_SIGNATURE, dict(HEAD_TACTICS[tactic])
        meta["PRECISION"] = "ieee"
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pixel layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    nchw = layout == "nchw_unit"
    signature = {**signature, "img_ptr": "*fp32" if nchw else "*u8"}
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    constexprs = {"PATCH": int(patch), "HAS_MASK": True, "NCHW": nchw, **norm_constants(mean, std, unit=nchw),
                  **meta}
    full_signature = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    source = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(compiled.metadata, field, 0):
            raise RuntimeError(f"{fn.__name__} needs {field}={getattr(compiled.metadata, field)}; "
                               "TensorRT's AOT launch provides no scratch buffer")
    return compiled


def _compilable_kernels():  # noqa: ANN202 - a module
    """``triton_score`` with real JIT functions: under TRITON_INTERPRET its kernels cannot be compiled, so
    a private copy of the module is loaded with the interpreter switched off."""
    import importlib.util

    from triton import knobs
    from triton.runtime.jit import JITFunction

    from dede_rt.kernels import triton_score

    if isinstance(triton_score.mask_and_score_kernel, JITFunction):
        return triton_score
    spec = importlib.util.find_spec("dede_rt.kernels.triton_score")
    module = importlib.util.module_from_spec(spec)
    knobs.runtime.interpret = False
    try:
        spec.loader.exec_module(module)
    finally:
        del knobs.runtime.interpret  # back to the environment's setting
    return module


def register_plugins() -> None:
    """Register both plugins in TensorRT's plugin registry (idempotent; needs tensorrt >= 10.8 and triton)."""
    global _registered
    if _registered:
        return
    import numpy.typing as npt
    import tensorrt as trt
    import tensorrt.plugin as trtp

    def out_desc(images):  # noqa: ANN001, ANN202 - TensorDesc in, TensorDesc out
        return trtp.from_shape_expr((images.shape_expr[0],), dtype=trt.float32)

    def image_types(rest: int) -> list:  # noqa: ANN202 - either pixel layout; the graph fixes which one is used
        floats = ", ".join(["FP32"] * rest)
        return [f"UINT8, {floats}", f"FP32, {floats}"]

    def launch(compiled, n):  # noqa: ANN001, ANN202
        params = trtp.KernelLaunchParams()
        params.grid_x = n
        params.grid_y = 1  # one program per sample: the kernel stores its score directly, no 2nd pass
        params.block_x = compiled.metadata.num_warps * 32
        params.shared_mem = compiled.metadata.shared
        return params

    # --- MaskAndScore(images, recon, token_weight) -> scores ---------------------------------------------
    @trtp.register(SCORE_PLUGIN)
    def score_desc(images: trtp.TensorDesc, recon: trtp.TensorDesc, token_weight: trtp.TensorDesc,
                   mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32], patch_size: int,
                   image_size: int, layout: str) -> trtp.TensorDesc:
        return out_desc(images)

    @trtp.autotune(SCORE_PLUGIN)
    def score_autotune(images, recon, token_weight, outputs) -> list:  # noqa: ANN001
        return [trtp.AutoTuneCombination(types, "LINEAR", list(SCORE_TACTICS)) for types in image_types(3)]

    aot_impl = getattr(trtp, "aot_impl", None)  # TensorRT < 10.12: JIT only (nodes with aot=0)

    def aot(plugin_id: str):  # noqa: ANN202 - a decorator, a no-op where AOT is unavailable
        return aot_impl(plugin_id) if aot_impl is not None else (lambda fn: fn)

    @aot(SCORE_PLUGIN)
    def score_aot(images: trtp.TensorDesc, recon: trtp.TensorDesc, token_weight: trtp.TensorDesc,
                  mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32], patch_size: int, image_size: int,
                  layout: str, outputs: tuple, tactic: int) -> tuple:
        compiled = compile_aot("score", patch_size, mean.tolist(), std.tolist(), tactic, layout=layout)
        tokens = recon.shape_expr[1]
        width = 3 * patch_size * patch_size
        # T, G, stride_mn (token_weight is [T], shared by the batch), split_len (= T·3p²: one program per sample)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in
                                             (tokens, image_size // patch_size, 0, tokens * width)])
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch(compiled, images.shape_expr[0]), extra

    @trtp.impl(SCORE_PLUGIN)
    def score_impl(images: trtp.Tensor, recon: trtp.Tensor, token_weight: trtp.Tensor,
                   mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32], patch_size: int, image_size: int,
                   outputs: tuple, stream: int, tactic: int) -> None:
        import torch

        from dede_rt.kernels import triton_score

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            img, rec, tw = (torch.as_tensor(t, device="cuda") for t in (images, recon, token_weight))
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(triton_score.mask_and_score(img, rec, tw[None], mean.tolist(), std.tolist(), patch_size,
                                                  split=1, config=dict(SCORE_TACTICS[tactic])))

    # --- MaskAndScoreHead(images, hidden, head_weight, head_bias, token_weight) -> scores -------------------
    @trtp.register(HEAD_PLUGIN)
    def head_desc(images: trtp.TensorDesc, hidden: trtp.TensorDesc, head_weight: trtp.TensorDesc,
                  head_bias: trtp.TensorDesc, token_weight: trtp.TensorDesc, mean: npt.NDArray[np.float32],
                  std: npt.NDArray[np.float32], patch_size: int, image_size: int, layout: str) -> trtp.TensorDesc:
        return out_desc(images)

    @trtp.autotune(HEAD_PLUGIN)
    def head_autotune(images, hidden, head_weight, head_bias, token_weight, outputs) -> list:  # noqa: ANN001
        return [trtp.AutoTuneCombination(types, "LINEAR", list(HEAD_TACTICS)) for types in image_types(5)]

    @aot(HEAD_PLUGIN)
    def head_aot(images: trtp.TensorDesc, hidden: trtp.TensorDesc, head_weight: trtp.TensorDesc,
                 head_bias: trtp.TensorDesc, token_weight: trtp.TensorDesc, mean: npt.NDArray[np.float32],
                 std: npt.NDArray[np.float32], patch_size: int, image_size: int, layout: str, outputs: tuple,
                 tactic: int) -> tuple:
        compiled = compile_aot("head", patch_size, mean.tolist(), std.tolist(), tactic, layout=layout)
        tokens, dim = hidden.shape_expr[1], hidden.shape_expr[2]
        # T, G, D, stride_hn, stride_ht (hidden is dense [N, T, D]), stride_mn, split_tokens (= T)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in
                                             (tokens, image_size // patch_size, dim, tokens * dim, dim, 0, tokens)])
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch(compiled, images.shape_expr[0]), extra

    @trtp.impl(HEAD_PLUGIN)
    def head_impl(images: trtp.Tensor, hidden: trtp.Tensor, head_weight: trtp.Tensor, head_bias: trtp.Tensor,
                  token_weight: trtp.Tensor, mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32],
                  patch_size: int, image_size: int, outputs: tuple, stream: int, tactic: int) -> None:
        import torch

        from dede_rt.kernels import triton_score

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            img, hid, w, b, tw = (torch.as_tensor(t, device="cuda")
                                  for t in (images, hidden, head_weight, head_bias, token_weight))
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(triton_score.mask_and_score_head(img, hid, w, b, tw[None], mean.tolist(), std.tolist(),
                                                       patch_size, split=1, config=dict(HEAD_TACTICS[tactic])))

    _registered = True

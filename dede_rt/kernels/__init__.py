"""Fused mask-and-score: the tail of every DeDe score (normalize, patchify, masked SSE, per-sample sum).

- ``reference``: plain-torch definition every other implementation is tested against.
- ``triton_score``: Triton kernels (CUDA; CPU via ``TRITON_INTERPRET=1`` in tests).
- Product path: ``Scorer(kernel="triton"|"reference")`` (``dede-rt scan/bench --score-kernel``) and TensorRT
  engines built with ``dede-rt build-engine --score-tail plugin`` (``engines.tensorrt_builder``).
- ``onnx_custom``: the ``dede_rt::MaskAndScore`` custom ONNX node, its standard-op lowering, ORT evaluation.
- ``trt_plugin``: TensorRT plugins for the custom nodes (``tensorrt.plugin``, Triton AOT).

Nothing here imports Triton or TensorRT at package import time.
"""

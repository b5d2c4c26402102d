"""ONNX Runtime backend: one session over the fused uint8-NHWC -> scores graph.

CPUExecutionProvider always; the CUDA and TensorRT execution providers are
put first when the installed onnxruntime build has them (onnxruntime-gpu).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dede_rt.engines.base import BaseRunner
from dede_rt.errors import UserError
from dede_rt.optional import import_onnxruntime

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers(use_gpu: bool = True) -> list[str]:
    """Execution providers in preference order: TensorRT/CUDA EPs when built in, then CPU."""
    ort = import_onnxruntime("the onnxruntime backend")

    available = set(ort.get_available_providers())
    gpu = [p for p in GPU_PROVIDERS if use_gpu and p in available]
    return [*gpu, "CPUExecutionProvider"]


def session_options(threads: int = 0):  # -> ort.SessionOptions
    """Full graph optimisation; ``threads`` > 0 pins the intra-op pool size."""
    ort = import_onnxruntime("the onnxruntime backend")

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class OnnxRuntimeRunner(BaseRunner):
    """Scores uint8 NHWC batches with an exported fused detector graph (any precision variant)."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, image_size: int, precision: str = "fp32",
                 providers: list[str] | None = None, threads: int = 0) -> None:
        super().__init__(image_size, precision=precision, device="cpu")
        self.model_path = Path(model_path)
        self.providers = providers
        self.threads = threads
        self.session = None

    def activate_impl(self) -> None:
        ort = import_onnxruntime("the onnxruntime backend")

        if not self.model_path.is_file():
            raise UserError(f"{self.model_path}: ONNX model missing (run `dede-rt export` / `dede-rt calibrate`)")
        providers = self.providers or default_providers()
        try:
            self.session = ort.InferenceSession(str(self.model_path), session_options(self.threads), providers=providers)
        except Exception as exc:
            raise UserError(f"{self.model_path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
        inp = self.session.get_inputs()[0]
        if inp.type != "tensor(uint8)":
            raise UserError(f"{self.model_path}: expected a uint8 NHWC image input, found {inp.type} {inp.shape}")
        self._input = inp.name
        self._output = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()
        self.device = "cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda"

    def infer_impl(self, images_u8: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: images_u8})[0]

    def deactivate_impl(self) -> None:
        self.session = None

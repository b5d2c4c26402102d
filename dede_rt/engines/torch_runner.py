"""The reference backend: the detector's PyTorch modules, eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dede_rt.bundle import Detector, load_detector
from dede_rt.engines.base import BaseRunner
from dede_rt.scoring import Scorer, kernel_ops


class TorchRunner(BaseRunner):
    """Scores with the detector's ``Scorer`` (CPU, or CUDA when ``device='cuda'``).

    ``score_kernel``: "torch" (default, the plain op chain) or a fused mask-and-score from
    ``dede_rt.kernels`` ("triton" on CUDA, "reference").
    """

    backend = "torch"

    def __init__(self, detector: Detector | str | Path, device: str = "cpu", score_kernel: str = "torch") -> None:
        self._source = detector
        self.detector: Detector | None = detector if isinstance(detector, Detector) else None
        size = self.detector.normalization.image_size if self.detector else 0
        kernel_ops(score_kernel)  # an unknown or unavailable kernel fails here, before any loading
        name = f"torch-{device}" + ("" if score_kernel == "torch" else f"-{score_kernel}")
        super().__init__(size, precision="fp32", device=device, name=name)
        self.score_kernel = score_kernel
        self.scorer: Scorer | None = None

    def activate_impl(self) -> None:
        if self.detector is None:
            self.detector = load_detector(self._source)
            self.image_size = self.detector.normalization.image_size
        self.scorer = self.detector.scorer(self.score_kernel).to(self.device).eval()

    @torch.no_grad()
    def infer_impl(self, images_u8: np.ndarray) -> np.ndarray:
        return self.scorer(torch.from_numpy(images_u8).to(self.device)).cpu().numpy()

    def deactivate_impl(self) -> None:
        if self.device != "cpu" and self.scorer is not None:
            self.scorer.cpu()
        self.scorer = None

"""The reference backend: the detector's PyTorch modules, eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dede_rt.detector import Detector, load_detector
from dede_rt.engines.base import BaseRunner
from dede_rt.errors import UserError
from dede_rt.scoring import score_batch


class TorchRunner(BaseRunner):
    """Scores with the detector's torch encoder + decoder (CPU, or CUDA when ``device='cuda'``).

    ``score_kernel``: "torch" (default, the op chain of ``score_batch``) or a fused
    mask-and-score from ``dede_rt.kernels`` ("triton" on CUDA, "reference").
    """

    backend = "torch"

    def __init__(self, detector: Detector | str | Path, device: str = "cpu", score_kernel: str = "torch") -> None:
        self._source = detector
        self.detector: Detector | None = detector if isinstance(detector, Detector) else None
        size = self.detector.normalization.image_size if self.detector else 0
        super().__init__(size, f"torch-{device}")
        self.device = device
        from dede_rt.kernels.fused import SCORE_KERNELS

        if score_kernel not in SCORE_KERNELS:
            raise UserError(f"unknown score kernel {score_kernel!r}; choose from {', '.join(SCORE_KERNELS)}")
        self.score_kernel = score_kernel

    def activate_impl(self) -> None:
        if self.detector is None:
            self.detector = load_detector(self._source)
            self.image_size = self.detector.normalization.image_size
        self.detector.encoder.to(self.device)
        self.detector.decoder.to(self.device)

    def infer_impl(self, images_u8: np.ndarray) -> np.ndarray:
        d = self.detector
        batch = torch.from_numpy(images_u8).to(self.device)
        if self.score_kernel != "torch":
            from dede_rt.kernels.fused import fused_score_batch

            scores = fused_score_batch(d.encoder, d.decoder, d.normalization, batch, d.test_mask_ratio, d.mask_seed,
                                       self.score_kernel, d.relative)
            return scores.cpu().numpy()
        return score_batch(d.encoder, d.decoder, d.normalization, batch, d.test_mask_ratio, d.mask_seed,
                           d.relative).cpu().numpy()

    def deactivate_impl(self) -> None:
        if self.device != "cpu" and self.detector is not None:
            self.detector.encoder.cpu()
            self.detector.decoder.cpu()

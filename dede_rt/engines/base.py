"""The runner template every backend follows (after Polygraphy's ``BaseRunner``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from dede_rt.errors import UserError


class BaseRunner(ABC):
    """Context manager with ``infer(uint8 NHWC batch) -> float32 scores [N]``; records its last inference time.

    Every runner declares what it runs: ``backend`` (class), ``precision`` and ``device`` (constructor).
    """

    backend: str = "base"

    def __init__(self, image_size: int, *, precision: str = "fp32", device: str = "cpu", name: str | None = None) -> None:
        self.image_size = image_size
        self.precision = precision
        self.device = device
        self.name = name or f"{self.backend}-{precision}"
        self.is_active = False
        self.last_inference_time: float | None = None

    def activate(self) -> None:
        """Build or load the model; idempotent."""
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        """Release the model and its buffers."""
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, images_u8: np.ndarray) -> np.ndarray:
        """Scores for one batch of uint8 [N, H, W, 3] images."""
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active; use it as a context manager")
        s = self.image_size
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != (s, s, 3):
            raise UserError(f"{self.name}: expected uint8 [N, {s}, {s}, 3], got {images_u8.dtype} {list(images_u8.shape)}")
        start = time.perf_counter()
        scores = np.asarray(self.infer_impl(np.ascontiguousarray(images_u8)), dtype=np.float32).reshape(-1)
        self.last_inference_time = time.perf_counter() - start
        return scores

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, images_u8: np.ndarray) -> np.ndarray: ...

    def deactivate_impl(self) -> None:
        """Default: nothing to free."""

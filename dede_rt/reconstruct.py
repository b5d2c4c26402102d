"""What the decoder rebuilds from an embedding alone: the picture behind a DeDe score."""

from __future__ import annotations

import numpy as np
import torch

from dede_rt.bundle import Detector
from dede_rt.models.decoder import unpatchify


@torch.no_grad()
def reconstruct(detector: Detector, images_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC reconstructions of ``images_u8`` at the test mask ratio (embedding only)."""
    x = detector.normalization.apply(images_u8)
    patches = detector.decoder.decode_embedding(detector.encoder(x))
    return detector.normalization.invert(unpatchify(patches, detector.decoder.config.patch_size))

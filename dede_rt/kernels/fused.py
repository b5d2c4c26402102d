"""Score a batch with a detector's modules, ending in a fused mask-and-score op instead of the torch op chain."""

from __future__ import annotations

import numpy as np
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DeDeDecoder, patchify_images, visible_count
from dede_rt.models.encoders import VictimEncoder
from dede_rt.scoring import MASK_SEED, TEST_MASK_RATIO, RelativeReference

SCORE_KERNELS = ("torch", "reference", "triton")


def _ops(kernel: str):  # noqa: ANN202 - returns the module holding the two ops
    if kernel == "reference":
        from dede_rt.kernels import reference

        return reference
    if kernel == "triton":
        try:
            from dede_rt.kernels import triton_score
        except ImportError as exc:  # Triton is an optional (gpu/dev) dependency
            raise RuntimeError(f"score kernel 'triton' needs the triton package: {exc}") from exc
        return triton_score
    raise ValueError(f"unknown score kernel {kernel!r}; choose from {SCORE_KERNELS[1:]}")


@torch.no_grad()
def fused_score_batch(
    encoder: VictimEncoder, decoder: DeDeDecoder, normalization: Normalization, images_u8: torch.Tensor | np.ndarray,
    mask_ratio: float = TEST_MASK_RATIO, mask_seed: int = MASK_SEED, kernel: str = "triton",
    relative: RelativeReference | None = None,
) -> torch.Tensor:
    """Same scores as ``dede_rt.scoring.score_batch``; the tail runs as one fused op (``kernel``: triton|reference).

    With no visible patch (the test default) the head Linear is fused into the score too,
    so the [N, T, 3p²] reconstruction is never materialised. The relative score's prototype
    term does not depend on the reconstruction; it is subtracted after the fused op.
    """
    ops = _ops(kernel)
    images = torch.as_tensor(images_u8)
    x = normalization.apply(images)
    embedding = encoder(x)
    cfg = decoder.config
    mean, std, patch = normalization.mean, normalization.std, cfg.patch_size
    if visible_count(cfg.num_patches, mask_ratio) == 0:
        hidden = decoder.decode_hidden(embedding)
        own = ops.mask_and_score_head(images, hidden, decoder.head.weight, decoder.head.bias, None, mean, std, patch)
        masked = None
    else:
        # Some patches stay visible: the decoder's own (seeded, shared) mask, exactly as score_batch draws it.
        generator = torch.Generator().manual_seed(mask_seed)
        pred, masked = decoder(x, embedding, mask_ratio, generator, shared_mask=True)
        own = ops.mask_and_score(images, pred, masked[:1], mean, std, patch)
        masked = masked[0]
    if relative is None:
        return own
    return relative.apply(own, patchify_images(x, patch), masked)

"""The evaluation's DeDe scoring on cached embeddings: the one piece the shared ``Scorer`` will replace.

At the test mask ratio no patch is visible, so a score needs only the image (its target) and its embedding;
``EvalConfig`` checks that the patch size keeps it so.
"""

from __future__ import annotations

import numpy as np
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DeDeDecoder, patchify_images, unpatchify
from dede_rt.scoring import (TEST_MASK_RATIO, RelativeError, RelativeReference, Standardization, TestMask, masked_sse,
                             prototype_indices, trimmed_sse)


def decoder_scores(decoder: DeDeDecoder, normalization: Normalization, *, images: dict[str, np.ndarray],
                   embeddings: dict[str, np.ndarray], train_embeddings: np.ndarray, trim: float = 0.0,
                   relative_k: int = 0, prototypes: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Scores by method, then by set, of a trained decoder on cached embeddings: "dede", plus "dede_trimmed"
    (``trim`` > 0), "dede_relative" (``relative_k`` > 0, prototypes drawn from ``train_embeddings``) and, with
    it, "dede_combined" (both standardized on the "hold" set, then summed; ``combined_scores``)."""
    relative = None
    if relative_k:  # the decoder's own training embeddings (clean unless poison_rate), never scored images
        pick = prototype_indices(len(train_embeddings), prototypes)
        relative = RelativeReference.from_embeddings(decoder, train_embeddings[pick], relative_k)
    by_set = {k: embedding_score_sets(decoder, normalization, images=images[k], embeddings=embeddings[k],
                                      trim=trim or None, relative=relative) for k in images}
    out = {m: {k: by_set[k][m] for k in by_set} for m in next(iter(by_set.values()))}
    if relative is not None and "hold" in out["dede"]:
        out["dede_combined"] = combined_scores(out["dede"], out["dede_relative"])
    return out


def combined_scores(summed: dict[str, np.ndarray], relative: dict[str, np.ndarray],
                    calibration: str = "hold") -> dict[str, np.ndarray]:
    """Per set: z(summed) + z(relative), each z-scored with the mean and std of its clean ``calibration`` set.

    Standardizing puts the two errors on one scale (the relative score's spread is far smaller: most of the
    image-complexity spread cancels), so neither swamps the other; both constants come from clean held-out
    images only, like the threshold.
    """
    scales = Standardization.fit(summed[calibration], relative[calibration])  # what a combined detector stores
    return {k: scales.combine(summed[k], relative[k]) for k in summed}


@torch.no_grad()
def embedding_score_sets(decoder: DeDeDecoder, normalization: Normalization, *, images: np.ndarray,
                         embeddings: np.ndarray, trim: float | None = None, relative: RelativeReference | None = None,
                         batch_size: int = 512) -> dict[str, np.ndarray]:
    """Scores by method from cached embeddings, in one decoder pass: "dede" (reference), plus "dede_trimmed"
    when ``trim`` is given and "dede_relative" when ``relative`` is (``scoring.relative_sse``)."""
    p = decoder.config.patch_size
    methods = ["dede", *(["dede_trimmed"] if trim is not None else []),
               *(["dede_relative"] if relative is not None else [])]
    out = {m: np.empty(len(images), np.float32) for m in methods}
    # The scorer's own pieces (fixed test mask, summed error, the relative score kind), one decoder pass.
    mask = TestMask(decoder.config.num_patches, TEST_MASK_RATIO)
    relative_kind = RelativeError(relative, mask.masked) if relative is not None else None
    for start in range(0, len(images), batch_size):
        x = normalization.apply(images[start : start + batch_size])
        z = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + batch_size]))
        pred = decoder.decode_fixed(x, z, mask.visible_index, mask.restore_index)
        target = patchify_images(x, p)
        sums = masked_sse(pred, target, mask.masked[None])
        batch = {"dede": sums}
        if trim is not None:
            batch["dede_trimmed"] = trimmed_sse(pred, target, trim)
        if relative_kind is not None:
            batch["dede_relative"] = relative_kind(sums, target)
        for m in methods:
            out[m][start : start + len(x)] = batch[m].numpy()
    return out


@torch.no_grad()
def reconstruct(decoder: DeDeDecoder, normalization: Normalization, embeddings: np.ndarray) -> np.ndarray:
    """uint8 NHWC reconstructions from embeddings alone."""
    pred = decoder.decode_embedding(torch.from_numpy(np.ascontiguousarray(embeddings)))
    return normalization.invert(unpatchify(pred, decoder.config.patch_size))

"""DeDe's score: reconstruction error of masked patches, in the encoder's normalized space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DeDeDecoder, patchify_images
from dede_rt.models.encoders import VictimEncoder

TEST_MASK_RATIO = 0.99  # reference test setting: on 32 px / patch 4 no patch stays visible
MASK_SEED = 0  # seeds the (shared) test mask when a few patches do stay visible


def masked_sse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared error over masked patches: pred/target [N,T,P], masked [N,T] -> [N]."""
    err = (pred - target).square().sum(dim=2)
    return (err * masked.to(err.dtype)).sum(dim=1)


def trimmed_sse(pred: torch.Tensor, target: torch.Tensor, trim: float) -> torch.Tensor:
    """Per-sample SSE over all patches but the ``trim`` share with the largest error: [N,T,P] -> [N].

    A patch-robust variant of the reference score (which sums every patch). A pasted patch (a sticker, a
    watermark, a patch trigger) that the decoder cannot redraw raises the sum even when the encoder is clean;
    it covers a few patches, so dropping the worst ones removes it, while an embedding that collapsed toward
    a backdoor target leaves most of the image wrong and keeps the score high.
    """
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    err = (pred - target).square().sum(dim=2)
    keep = max(1, int(round(err.shape[1] * (1.0 - trim))))
    return torch.topk(err, keep, dim=1, largest=False).values.sum(dim=1)


def prototype_sse(target: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """SSE of every image against every prototype reconstruction: target [N,T,P], prototypes [K,T,P] -> [N,K]."""
    x, r = target.flatten(1).double(), prototypes.flatten(1).double()  # float64: a difference of large norms
    return (x.square().sum(1, keepdim=True) - 2.0 * x @ r.T + r.square().sum(1)[None]).clamp_min(0.0).to(target.dtype)


def relative_sse(own_sse: torch.Tensor, target: torch.Tensor, prototypes: torch.Tensor, k: int) -> torch.Tensor:
    """Own-embedding SSE minus the mean SSE of the ``k`` prototypes that fit the image best: [N].

    An embedding-advantage variant of the reference score. ``prototypes`` are the decoder's reconstructions of
    clean reference embeddings (computed once). A clean image's own embedding redraws it far better than any
    other image's embedding does; a triggered image's embedding has collapsed toward the backdoor target and
    carries little of the image, so it redraws it no better than a generic clean embedding. Pixels that no
    embedding redraws (a pasted sticker or patch the encoder ignores) add about the same error to both terms
    and cancel, so a clean encoder does not flag them the way the plain sum does.
    """
    if not 1 <= k <= len(prototypes):
        raise ValueError(f"k must be in [1, {len(prototypes)}] (the number of prototypes), got {k}")
    nearest = torch.topk(prototype_sse(target, prototypes), k, dim=1, largest=False).values
    return own_sse - nearest.mean(dim=1)


PROTOTYPES = 256  # clean reference embeddings the relative score compares against
RELATIVE_K = 32  # ... of which it averages the k that fit an image best (an eighth)


def prototype_indices(n: int, count: int = PROTOTYPES, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of ``count`` of ``n`` reference images (all of them when n <= count)."""
    if n <= count:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


@torch.no_grad()
def prototype_reconstructions(decoder: DeDeDecoder, embeddings: torch.Tensor | np.ndarray,
                              batch_size: int = 512) -> torch.Tensor:
    """The decoder's reconstructions [K,T,P] of clean reference embeddings, from the embedding alone."""
    z = torch.as_tensor(np.ascontiguousarray(embeddings) if isinstance(embeddings, np.ndarray) else embeddings)
    z = z.to(next(decoder.parameters()).device)
    return torch.cat([decoder.decode_embedding(z[i : i + batch_size]) for i in range(0, len(z), batch_size)])


@dataclass(frozen=True)
class RelativeReference:
    """What the relative score compares against: prototype reconstructions [K,T,P] and how many to average."""

    prototypes: torch.Tensor
    k: int = RELATIVE_K

    @classmethod
    def from_embeddings(cls, decoder: DeDeDecoder, embeddings: torch.Tensor | np.ndarray,
                        k: int = RELATIVE_K) -> RelativeReference:
        """Decode clean reference embeddings once into the prototypes the score compares against."""
        return cls(prototype_reconstructions(decoder, embeddings), k)

    def apply(self, own_sse: torch.Tensor, target: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Reference scores -> relative scores; ``masked`` [T] limits prototype errors to the patches scored."""
        prototypes = self.prototypes.to(target.device)
        if masked is not None and not bool(masked.all()):
            keep = masked.to(target.dtype)[None, :, None]
            target, prototypes = target * keep, prototypes * keep
        return relative_sse(own_sse, target, prototypes, self.k)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The reference training loss: mean over all pixels of err² · mask, divided by mask_ratio."""
    err = (pred - target).square() * masked[..., None].to(pred.dtype)
    return err.mean() / mask_ratio


@torch.no_grad()
def score_batch(
    encoder: VictimEncoder, decoder: DeDeDecoder, normalization: Normalization, images_u8: torch.Tensor | np.ndarray,
    mask_ratio: float = TEST_MASK_RATIO, mask_seed: int = MASK_SEED, relative: RelativeReference | None = None,
) -> torch.Tensor:
    """Scores for one uint8 NHWC batch: normalize -> encoder -> decoder -> masked SSE (-> relative). Vectorised."""
    x = normalization.apply(images_u8)
    embedding = encoder(x)
    generator = torch.Generator().manual_seed(mask_seed)
    pred, masked = decoder(x, embedding, mask_ratio, generator, shared_mask=True)
    target = patchify_images(x, decoder.config.patch_size)
    sse = masked_sse(pred, target, masked)
    return sse if relative is None else relative.apply(sse, target, masked[0])


def score_images(
    encoder: VictimEncoder, decoder: DeDeDecoder, normalization: Normalization, images_u8: np.ndarray,
    batch_size: int = 256, mask_ratio: float = TEST_MASK_RATIO, mask_seed: int = MASK_SEED,
    progress: bool = False, relative: RelativeReference | None = None,
) -> np.ndarray:
    """Scores (float32 [N]) for uint8 NHWC images, batched; higher = more likely triggered."""
    from dede_rt.progress import track

    decoder.eval()
    out = np.empty(len(images_u8), np.float32)
    starts = range(0, len(images_u8), batch_size)
    for start in track(starts, "scoring", enabled=progress):
        batch = images_u8[start : start + batch_size]
        out[start : start + len(batch)] = score_batch(encoder, decoder, normalization, batch, mask_ratio, mask_seed,
                                                      relative).numpy()
    return out

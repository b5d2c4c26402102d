"""The squared-error arithmetic of DeDe's scores and loss, on patchified tensors [N, T, 3p²]."""

from __future__ import annotations

import torch

TEST_MASK_RATIO = 0.99  # reference test setting: on 32 px / patch 4 no patch stays visible
MASK_SEED = 0  # seeds the (shared) test mask when a few patches do stay visible


def masked_sse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squared error over masked patches: pred/target [N,T,P], masked [N,T] -> [N]."""
    err = (pred - target).square().sum(dim=2)
    return (err * masked.to(err.dtype)).sum(dim=1)


def trimmed_sse(pred: torch.Tensor, target: torch.Tensor, trim: float) -> torch.Tensor:
    """Per-sample SSE over all patches but the ``trim`` share with the largest error: [N,T,P] -> [N].

    A patch-robust variant of the summed score (which sums every patch). A pasted patch (a sticker, a
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

    An embedding-advantage variant of the summed score. ``prototypes`` are the decoder's reconstructions of
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


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The reference training loss: mean over all pixels of err² · mask, divided by mask_ratio."""
    err = (pred - target).square() * masked[..., None].to(pred.dtype)
    return err.mean() / mask_ratio

"""The torch modules that get exported: normalization, the test-time decoder + score, and their fusion.

At test time the mask is one seeded permutation shared by the whole batch
(``score_batch`` draws it with ``shared_mask=True``), so it is a constant of
the graph: gather indices and a mask vector become buffers. With no visible
patch (the reference 32 px / patch 4 / ratio 0.99 setting) the MAE encoder
blocks are not in the graph at all: embedding -> projection -> decoder blocks
-> head -> squared error against the patchified input.

A detector with the relative score carries its prototype reconstructions as a
constant [T*P, K] buffer (restricted to the scored patches) and subtracts the
mean of the k smallest ||x - r||^2 in the graph (MatMul + TopK): one graph
still maps pixels to the detector's score, on every backend.
"""

from __future__ import annotations

import torch
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DeDeDecoder, draw_masks, patchify_images
from dede_rt.models.encoders import VictimEncoder
from dede_rt.scoring import RelativeReference


class Normalize(nn.Module):
    """uint8 NHWC (``uint8_input``) or [0, 1] float NCHW pixels -> the encoder's normalized float NCHW."""

    def __init__(self, normalization: Normalization, uint8_input: bool = True) -> None:
        super().__init__()
        self.uint8_input = uint8_input
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Same op order as Normalization.apply so FP32 parity is bit-close.
        x = images.permute(0, 3, 1, 2).float() / 255.0 if self.uint8_input else images
        return (x - self.mean) / self.std


class RelativeTerm(nn.Module):
    """(target patches [N,T,P], unscored ones zeroed) -> mean of the k smallest SSEs to constant prototypes [N]."""

    def __init__(self, relative: RelativeReference, masked: torch.Tensor) -> None:
        super().__init__()
        self.k = relative.k
        keep = masked.to(torch.float64)[None, :, None]
        prototypes = (relative.prototypes.detach().cpu().double() * keep).flatten(1)
        self.register_buffer("prototypes_t", prototypes.T.float().contiguous())  # [T*P, K]
        self.register_buffer("prototype_sq", prototypes.square().sum(1).float()[None])  # [1, K], exact in float64

    def forward(self, scored_target: torch.Tensor) -> torch.Tensor:
        x = scored_target.flatten(1)
        # ||x - r||^2 = ||x||^2 - 2 x.r + ||r||^2; the ranking needs only the last two (||x||^2 is per row).
        partial = self.prototype_sq - 2.0 * (x @ self.prototypes_t)
        nearest = torch.topk(partial, self.k, dim=1, largest=False).values.mean(dim=1)
        return nearest + x.square().sum(dim=1)


class ScoreGraph(nn.Module):
    """(normalized images [N,3,H,W], embedding [N,D]) -> score [N]: test-time decoder + masked SSE (- relative)."""

    def __init__(self, decoder: DeDeDecoder, mask_ratio: float, mask_seed: int,
                 relative: RelativeReference | None = None) -> None:
        super().__init__()
        self.decoder = decoder.eval()
        c = decoder.config
        draw = draw_masks(1, c.num_patches, mask_ratio, torch.Generator().manual_seed(mask_seed), shared=True)
        self.keep = draw.keep
        self.register_buffer("visible_index", draw.order[0, : draw.keep].clone())
        self.register_buffer("restore_index", draw.restore[0].clone())
        self.register_buffer("masked", draw.masked[0].float().clone())
        self.relative = None if relative is None else RelativeTerm(relative, draw.masked[0])

    def forward(self, images: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        target = patchify_images(images, self.decoder.config.patch_size)
        own = self._own_sse(images, embedding, target)
        if self.relative is None:
            return own
        return own - self.relative(target * self.masked[None, :, None])

    def _own_sse(self, images: torch.Tensor, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d, c = self.decoder, self.decoder.config
        if self.keep == 0:
            return (d.decode_embedding(embedding) - target).square().sum(dim=(1, 2))
        n = images.shape[0]
        tokens = d.patchify(images).flatten(2).transpose(1, 2) + d.pos_embedding
        visible = tokens[:, self.visible_index]
        encoded = d.encoder_norm(d.encoder_blocks(torch.cat([d.cls_token.expand(n, -1, -1), visible], 1)))
        patch_tokens = torch.cat([encoded[:, 1:], d.mask_token.expand(n, c.num_patches - self.keep, -1)], 1)
        pred = d._decode(d.project(embedding), patch_tokens[:, self.restore_index])
        return ((pred - target).square().sum(dim=2) * self.masked).sum(dim=1)


class FusedDetector(nn.Module):
    """Pixels -> scores in one module: normalize -> victim encoder -> ``ScoreGraph``."""

    def __init__(self, encoder: VictimEncoder, decoder: DeDeDecoder, normalization: Normalization,
                 mask_ratio: float, mask_seed: int, uint8_input: bool = True,
                 relative: RelativeReference | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(normalization, uint8_input)
        self.encoder = encoder.eval()
        self.score = ScoreGraph(decoder, mask_ratio, mask_seed, relative)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        return self.score(x, self.encoder(x))

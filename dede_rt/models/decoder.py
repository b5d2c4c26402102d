"""The DeDe decoder: an MAE ViT whose global token is the victim's embedding.

Faithful to the reference ``DecoderModel`` (tardisblue9/DeDe, itself the small
CIFAR MAE): patchify conv + learned positional embeddings, per-sample shuffle
masking that keeps ``int(T * (1 - mask_ratio))`` patches, a cls token through
``encoder_depth`` pre-norm ViT blocks and a LayerNorm, then the output at the
cls slot is REPLACED by ``Linear(embed_dim -> dim, bias=False)`` of the victim
embedding. The MAE decoder appends mask tokens, un-shuffles, adds its own
positional embeddings (T + 1 slots), runs ``decoder_depth`` blocks, drops the
cls slot and predicts ``3 * p * p`` pixels per patch (no final norm).

Differences from the reference, all behaviour-preserving: batch-first tensors,
masks drawn from a ``torch.Generator`` (seeded, batched) instead of a numpy
loop, and ``F.scaled_dot_product_attention`` inside the blocks. Parameter names
mirror timm's ``Block`` so weights stay easy to compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a DeDe decoder; the defaults are the reference CIFAR setting (``DECODER_SIZES["reference"]``)."""

    embed_dim: int = 512  # victim embedding width (512 for CIFAR ResNet18)
    image_size: int = 32
    patch_size: int = 4
    dim: int = 192
    heads: int = 3
    encoder_depth: int = 12
    decoder_depth: int = 4
    mlp_ratio: float = 4.0
    # The paper's decoder builds timm ``Block(dim, heads)``, whose qkv Linear has no bias. Bundles of
    # manifest schema 1 were trained with one; their manifests migrate to qkv_bias=True.
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """T, the number of patch tokens."""
        return self.grid**2

    @property
    def patch_pixels(self) -> int:
        """Values predicted per patch (3 * p * p)."""
        return 3 * self.patch_size**2

    def to_dict(self) -> dict:
        """Plain-JSON form for manifests."""
        return asdict(self)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Patches kept visible at ``mask_ratio``, exactly as the reference: int(T * (1 - r))."""
    return int(num_patches * (1 - mask_ratio))


class Mlp(nn.Module):
    """timm ``Mlp``: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm ``Attention`` (qkv bias optional, as timm's ``qkv_bias``; no qk-norm) on fused SDPA."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class MaskDraw:
    """One draw of per-sample patch masks."""

    order: torch.Tensor  # [N, T] shuffled patch indices; the first `keep` are visible
    restore: torch.Tensor  # [N, T] argsort(order): un-shuffles back into place
    keep: int
    masked: torch.Tensor  # [N, T] bool, True where the patch is hidden from the decoder


def draw_masks(
    n: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu", shared: bool = False,
) -> MaskDraw:
    """Shuffle each sample's patches (seeded by ``generator``) and mask all but the first ``keep``.

    ``shared`` draws one permutation for the whole batch, so a sample's mask (and
    score) does not depend on which batch it lands in: used at test time.
    """
    rows = 1 if shared else n
    noise = torch.rand(rows, num_patches, generator=generator, device=generator.device if generator else device)
    order = noise.argsort(dim=1).to(device).expand(n, -1)
    restore = order.argsort(dim=1)
    keep = visible_count(num_patches, mask_ratio)
    masked = torch.ones(n, num_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, order[:, :keep], False)
    return MaskDraw(order, restore, keep, masked)


class DeDeDecoder(nn.Module):
    """Reconstructs an image's patches from its victim embedding plus any visible patches."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # MAE encoder (only runs on visible patches; skipped when none are visible).
        self.patchify = nn.Conv2d(3, c.dim, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, c.num_patches, c.dim))
        self.encoder_blocks = nn.Sequential(*[Block(c.dim, c.heads, c.mlp_ratio, c.qkv_bias)
                                              for _ in range(c.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(c.dim)
        # Victim embedding -> the global (cls) slot.
        self.project = nn.Linear(c.embed_dim, c.dim, bias=False)
        # MAE decoder.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.decoder_pos_embedding = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.dim))
        self.decoder_blocks = nn.Sequential(*[Block(c.dim, c.heads, c.mlp_ratio, c.qkv_bias)
                                              for _ in range(c.decoder_depth)])
        self.head = nn.Linear(c.dim, c.patch_pixels)
        for p in (self.cls_token, self.pos_embedding, self.mask_token, self.decoder_pos_embedding):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(
        self, images: torch.Tensor, embedding: torch.Tensor, mask_ratio: float,
        generator: torch.Generator | None = None, shared_mask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict every patch of normalized ``images`` [N,3,H,W]; returns (patches [N,T,3p²], masked [N,T])."""
        n = images.shape[0]
        draw = draw_masks(n, self.config.num_patches, mask_ratio, generator, images.device, shared_mask)
        if draw.keep == 0:
            return self.decode_embedding(embedding), draw.masked
        tokens = self.patchify(images).flatten(2).transpose(1, 2) + self.pos_embedding
        visible = torch.gather(tokens, 1, draw.order[:, : draw.keep, None].expand(-1, -1, tokens.shape[-1]))
        patch_tokens = self._with_mask_tokens(self._encode_visible(visible))
        patch_tokens = torch.gather(patch_tokens, 1, draw.restore[..., None].expand(-1, -1, patch_tokens.shape[-1]))
        return self._decode(self.project(embedding), patch_tokens), draw.masked

    def decode_fixed(self, images: torch.Tensor, embedding: torch.Tensor, visible_index: torch.Tensor,
                     restore_index: torch.Tensor) -> torch.Tensor:
        """Predict every patch with ONE mask shared by the batch (test time): [N, T, 3p²].

        ``visible_index`` [keep]: the patches the decoder sees (in shuffled order); ``restore_index`` [T]
        un-shuffles. Same values as ``forward`` with a shared mask; index tensors instead of a per-sample
        gather, so the mask is a constant of an exported graph. No visible patch: ``decode_embedding``.
        """
        if visible_index.numel() == 0:
            return self.decode_embedding(embedding)
        tokens = self.patchify(images).flatten(2).transpose(1, 2) + self.pos_embedding
        patch_tokens = self._with_mask_tokens(self._encode_visible(tokens[:, visible_index]))
        return self._decode(self.project(embedding), patch_tokens[:, restore_index])

    def decode_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """Test-time path (no visible patch): reconstruct all T patches from the embedding alone."""
        return self.head(self.decode_hidden(embedding))

    def decode_hidden(self, embedding: torch.Tensor) -> torch.Tensor:
        """Like ``decode_embedding`` but stops before the head: [N, T, dim] (for head-fused scoring)."""
        n = embedding.shape[0]
        return self._hidden(self.project(embedding), self.mask_token.expand(n, self.config.num_patches, -1))

    def _encode_visible(self, visible: torch.Tensor) -> torch.Tensor:
        """[cls, visible patches] through the MAE encoder; returns the visible patches' outputs."""
        n = visible.shape[0]
        return self.encoder_norm(self.encoder_blocks(torch.cat([self.cls_token.expand(n, -1, -1), visible], 1)))[:, 1:]

    def _with_mask_tokens(self, encoded: torch.Tensor) -> torch.Tensor:
        """Append mask tokens after the encoded visible patches (shuffled order)."""
        n, keep = encoded.shape[:2]
        return torch.cat([encoded, self.mask_token.expand(n, self.config.num_patches - keep, -1)], 1)

    def _hidden(self, global_token: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([global_token[:, None], patch_tokens], 1) + self.decoder_pos_embedding
        return self.decoder_blocks(tokens)[:, 1:]

    def _decode(self, global_token: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self._hidden(global_token, patch_tokens))


def patchify_images(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N,C,H,W] -> [N, T, C*p*p] in the head's (c, p1, p2) order, row-major over the patch grid."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify_images``: [N, T, C*p*p] -> [N, C, H, W]."""
    n, t, _ = patches.shape
    g = int(round(t**0.5))
    p = patch_size
    x = patches.reshape(n, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, g * p, g * p)

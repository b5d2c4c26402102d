"""The test-time decoder with its image-independent work precomputed: exact algebra of the zero-visible path.

With no visible patch (test mask ratio 0.99 on 32 px / patch 4) the decoder's input is

    tokens = [project(z) + pos_0,  mask_token + pos_1, ..., mask_token + pos_T]

and only the first (global) token depends on the image. In the FIRST decoder block that makes the 64 patch
tokens' LayerNorm, their Q, K, V and every patch-to-patch attention score constants. Per head h (scale s):

- patch query i over keys [k_0 (varies), K_p (constant)]: the constant part of the softmax is folded into its
  log-sum-exp ``L_hi`` and its value mean ``V̄_hi = softmax(s q_i K_pᵀ) V_p``, so
  ``attn_hi = V̄_hi + σ(s q_hi·k_0h - L_hi) (v_0h - V̄_hi)`` (exactly softmax over [c, L] with two values);
  through the output projection (split by head, W_oh) that is
  ``proj_i = A_i + Σ_h σ_hi (W_oh v_0h - R_hi)`` with constants ``A_i = b_o + Σ_h W_oh V̄_hi``,
  ``R_hi = W_oh V̄_hi``. Per image: one [H, T] score row from k_0, a sigmoid, H vectors W_oh v_0h.
- the global token's own row attends over [k_0, K_p] as usual (its key against the constant patch keys).

Folded: block 1's patch-token LayerNorm, QKV GEMM, QKᵀ, softmax, AV and output projection (64 of 65 rows).
What stays: the global token's LayerNorm/QKV (one row), block 1's MLP on all 65 tokens (its input now varies
with the image through σ and v_0), and blocks 2..depth unchanged — after block 1 every token depends on the
image, so the folding stops there. Constants are computed in float64 and stored as float32 buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.models.decoder import Block, DeDeDecoder, patchify_images
from dede_rt.scoring.kinds import ScoreKind
from dede_rt.scoring.scorer import ScoreTail, TestMask
from dede_rt.scoring.sse import masked_sse


class FoldedFirstBlock(nn.Module):
    """Decoder block 1 for the zero-visible-patch input: global token [N, C] -> all tokens after the block."""

    def __init__(self, decoder: DeDeDecoder) -> None:
        super().__init__()
        block: Block = decoder.decoder_blocks[0]
        c = decoder.config
        self.heads, self.head_dim = c.heads, c.dim // c.heads
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.qkv, self.proj = block.attn.qkv, block.attn.proj
        with torch.no_grad():
            d = torch.float64
            pos = decoder.decoder_pos_embedding[0].to(d)  # [T+1, C]
            patches = decoder.mask_token[0].to(d) + pos[1:]  # [T, C]: every patch token's input, a constant
            h = F.layer_norm(patches, (c.dim,), block.norm1.weight.to(d), block.norm1.bias.to(d), block.norm1.eps)
            bias = block.attn.qkv.bias.to(d) if block.attn.qkv.bias is not None else None
            qkv = F.linear(h, block.attn.qkv.weight.to(d), bias).reshape(c.num_patches, 3, c.heads, self.head_dim)
            q, k, v = qkv.permute(1, 2, 0, 3)  # each [H, T, dh]
            scale = self.head_dim**-0.5
            logits = scale * q @ k.transpose(1, 2)  # [H, T, T] patch-to-patch scores
            mean_v = torch.softmax(logits, -1) @ v  # [H, T, dh]
            w_o = block.attn.proj.weight.to(d).reshape(c.dim, c.heads, self.head_dim)  # [C, H, dh]
            r = torch.einsum("htd,chd->htc", mean_v, w_o)  # [H, T, C]: W_oh V̄_hi
            base = patches + block.attn.proj.bias.to(d) + r.sum(0)  # residual + projection at σ = 0
        f32 = torch.float32
        self.register_buffer("pos0", pos[0].to(f32).clone())
        self.register_buffer("patch_base", base.to(f32).contiguous())  # [T, C]
        self.register_buffer("patch_q_scaled", (scale * q).transpose(1, 2).to(f32).contiguous())  # [H, dh, T]
        self.register_buffer("patch_k_t", k.transpose(1, 2).to(f32).contiguous())  # [H, dh, T]
        self.register_buffer("patch_v", v.to(f32).contiguous())  # [H, T, dh]
        self.register_buffer("patch_lse", torch.logsumexp(logits, -1).to(f32).contiguous())  # [H, T]
        self.register_buffer("patch_r", r.to(f32).contiguous())  # [H, T, C]
        self.register_buffer("w_o_heads", w_o.permute(1, 2, 0).to(f32).contiguous())  # [H, dh, C]
        self.scale = scale

    def forward(self, global_token: torch.Tensor) -> torch.Tensor:
        """global token g = project(z) [N, C] -> the block's output for all T+1 tokens [N, T+1, C]."""
        n, c = global_token.shape
        hd, heads = self.head_dim, self.heads
        t0 = global_token + self.pos0  # [N, C]
        q0, k0, v0 = self.qkv(self.norm1(t0)).reshape(n, 3, heads, 1, hd).unbind(1)  # each [N, H, 1, dh]
        # Patch rows: the varying score against the global key, against the folded constant rest.
        cross = (k0 @ self.patch_q_scaled).squeeze(2)  # [N, H, T] = s q_i·k_0
        gate = torch.sigmoid(cross - self.patch_lse)  # weight of v_0 in softmax over [k_0, K_p]
        u = v0 @ self.w_o_heads  # [N, H, 1, C] = W_oh v_0h
        patches = self.patch_base + (gate[..., None] * (u - self.patch_r)).sum(1)  # [N, T, C]
        # Global row: softmax over [own key, the constant patch keys].
        own = (q0 * k0).sum(-1, keepdim=True) * self.scale  # [N, H, 1, 1]
        rest = (q0 @ self.patch_k_t) * self.scale  # [N, H, 1, T]
        weights = torch.softmax(torch.cat([own, rest], -1), -1)
        out0 = weights[..., :1] * v0 + weights[..., 1:] @ self.patch_v  # [N, H, 1, dh]
        g = t0 + self.proj(out0.reshape(n, c))
        x = torch.cat([g[:, None], patches], 1)
        return x + self.mlp(self.norm2(x))


class FoldedDecoder(nn.Module):
    """embedding [N, D] -> patch hidden states [N, T, C] (before the head), block 1 folded; exact."""

    def __init__(self, decoder: DeDeDecoder) -> None:
        super().__init__()
        if decoder.config.decoder_depth < 1:
            raise ValueError("folding needs at least one decoder block")
        self.project = decoder.project
        self.first = FoldedFirstBlock(decoder)
        self.rest = nn.Sequential(*list(decoder.decoder_blocks)[1:])

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Same values as ``DeDeDecoder.decode_hidden`` (up to float rounding)."""
        return self.rest(self.first(self.project(embedding)))[:, 1:]


def fold_first_block(decoder: DeDeDecoder) -> FoldedDecoder:
    """The zero-visible-patch decoder with block 1's image-independent work precomputed (see module doc)."""
    return FoldedDecoder(decoder.eval())



class FoldedTail(ScoreTail):
    """``ScoreTail`` whose zero-visible decode runs through ``FoldedDecoder``: the same scores, less work.

    ``Scorer(..., folded=True)`` uses it when the test mask keeps no patch; the export's test-time graphs do.
    """

    def __init__(self, decoder: DeDeDecoder, mask: TestMask, kind: ScoreKind | None = None) -> None:
        super().__init__(decoder, mask, kind)
        if mask.keep != 0:
            raise ValueError(f"folding needs the zero-visible-patch test mask, this one keeps {mask.keep} patches")
        self.folded = fold_first_block(decoder)

    def forward(self, images: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Head on the folded decoder's hidden states, then the same masked SSE and score kind."""
        pred = self.decoder.head(self.folded(embedding))
        target = patchify_images(images, self.decoder.config.patch_size)
        return self.kind(masked_sse(pred, target, self.mask.masked[None]), target)


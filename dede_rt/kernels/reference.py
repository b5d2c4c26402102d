"""The reference mask-and-score op in plain torch: the definition every fused kernel is tested against.

Semantics (identical to ``dede_rt.scoring``): images are uint8 NHWC (``x = u8 / 255``) or float32
NCHW pixels already in [0, 1] (``x`` itself: the input of the ``detector_nchw`` graphs and TensorRT
engines), the two layouts ``dede_rt.scoring.Normalize`` accepts; the target is ``(x - mean) / std``
patchified in the head's (c, p1, p2) order, tokens row-major over the patch grid;
score[n] = sum over tokens t with mask[n, t] of sum_k (recon - target)².
``mask`` None means every patch is masked (the test-time default: no visible patch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dede_rt.models.decoder import patchify_images

Floats3 = Sequence[float] | torch.Tensor
LAYOUTS = ("nhwc_uint8", "nchw_unit")  # uint8 [N,H,W,3] in [0, 255]; float32 [N,3,H,W] in [0, 1]


def pixel_layout(images: torch.Tensor) -> str:
    """"nhwc_uint8" (uint8 [N,H,W,3]) or "nchw_unit" (float32 [N,3,H,W] in [0, 1]); anything else is an error."""
    if images.ndim == 4 and images.dtype == torch.uint8 and images.shape[3] == 3:
        return "nhwc_uint8"
    if images.ndim == 4 and images.dtype == torch.float32 and images.shape[1] == 3:
        return "nchw_unit"
    raise ValueError(f"images must be uint8 [N, H, W, 3] or float32 [N, 3, H, W], got {images.dtype} "
                     f"{list(images.shape)}")


def check_shapes(images_u8: torch.Tensor, tokens: int, width: int, patch: int, what: str = "recon") -> int:
    """Validate images (uint8 [N,H,W,3] or float32 [N,3,H,W]) against a [N, T, width] operand; returns grid side G."""
    layout = pixel_layout(images_u8)
    n, h, w = (images_u8.shape[:3] if layout == "nhwc_uint8"
               else (images_u8.shape[0], *images_u8.shape[2:]))
    if h != w or h % patch:
        raise ValueError(f"images must be square with a side divisible by patch {patch}, got {h}x{w}")
    grid = h // patch
    if tokens != grid * grid:
        raise ValueError(f"{what} has {tokens} tokens, images of {h}px at patch {patch} have {grid * grid}")
    if width != 3 * patch * patch and what == "recon":
        raise ValueError(f"recon has {width} values per patch, expected 3*p*p = {3 * patch * patch}")
    return grid


def normalized_patches(images_u8: torch.Tensor, mean: Floats3, std: Floats3, patch: int) -> torch.Tensor:
    """Pixels (either layout) -> normalized target patches [N, T, 3p²], bit-identical to Normalize + patchify."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0) if pixel_layout(images_u8) == "nhwc_uint8" else images_u8
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return patchify_images((x - m) / s, patch)


def _check_mask(mask: torch.Tensor | None, n: int, tokens: int) -> None:
    if mask is not None and (mask.ndim != 2 or mask.shape[1] != tokens or mask.shape[0] not in (1, n)):
        raise ValueError(f"mask must be [N, T] or [1, T] with T={tokens}, got {list(mask.shape)}")


def mask_and_score(
    images_u8: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor | None, mean: Floats3, std: Floats3, patch: int,
) -> torch.Tensor:
    """Per-sample masked SSE between ``recon`` [N,T,3p²] and the normalized patches of ``images_u8``: [N] float32."""
    check_shapes(images_u8, recon.shape[1], recon.shape[2], patch)
    _check_mask(mask, recon.shape[0], recon.shape[1])
    err = (recon.float() - normalized_patches(images_u8, mean, std, patch)).square().sum(dim=2)
    if mask is not None:
        err = err * mask.to(err.dtype)
    return err.sum(dim=1)


def mask_and_score_head(
    images_u8: torch.Tensor, hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
    mask: torch.Tensor | None, mean: Floats3, std: Floats3, patch: int, rows_per_chunk: int = 2,
) -> torch.Tensor:
    """``mask_and_score`` of ``hidden @ head_weight.T + head_bias`` without materialising the full reconstruction.

    Works over ``rows_per_chunk`` rows of the patch grid at a time, so only an
    [N, rows·G, 3p²] slab of reconstruction and target exists at once.
    """
    n, tokens, dim = hidden.shape
    if head_weight.shape != (3 * patch * patch, dim):
        raise ValueError(f"head_weight must be [3p², dim] = [{3 * patch * patch}, {dim}], got {list(head_weight.shape)}")
    grid = check_shapes(images_u8, tokens, dim, patch, what="hidden")
    _check_mask(mask, n, tokens)
    weight, bias = head_weight.float(), None if head_bias is None else head_bias.float()
    total = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    for row in range(0, grid, rows_per_chunk):
        rows = min(rows_per_chunk, grid - row)
        t0, t1 = row * grid, (row + rows) * grid
        recon = F.linear(hidden[:, t0:t1].float(), weight, bias)
        # Pixel rows [row·p, (row+rows)·p) hold exactly tokens [t0, t1) in row-major grid order.
        pixel_rows = slice(row * patch, (row + rows) * patch)
        strip = images_u8[:, pixel_rows] if pixel_layout(images_u8) == "nhwc_uint8" else images_u8[:, :, pixel_rows]
        target = normalized_patches(strip, mean, std, patch)
        err = (recon - target).square().sum(dim=2)
        if mask is not None:
            err = err * mask[:, t0:t1].to(err.dtype)
        total += err.sum(dim=1)
    return total

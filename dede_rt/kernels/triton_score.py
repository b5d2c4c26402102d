"""Triton kernels for mask-and-score: uint8 load + normalize + masked squared error + per-sample sum, one pass.

Two ops, same semantics as ``dede_rt.kernels.reference``:

- ``mask_and_score``: reads the reconstruction [N,T,3p²] once, the uint8 image once.
- ``mask_and_score_head``: takes the decoder's last hidden state [N,T,dim] and the head
  Linear(dim -> 3p²); each program computes a [BLOCK_T, BLOCK_P] tile of the
  reconstruction as a small GEMM in registers and folds it straight into the score
  (epilogue: + bias, - normalized target, square, mask, reduce), so the
  reconstruction never reaches memory.

Grid: (N, SPLIT). Each program reduces a contiguous share of one sample and writes one
partial; SPLIT > 1 only when a sample is large (224 px), then the [N, SPLIT] partials are
summed by torch. No atomics, so scores are deterministic. Mean/std and the patch size are
compile-time constants (one detector per process), which also lets the TensorRT AOT
plugin bake them into the PTX. Importing this module imports Triton: import it lazily.
On a machine without a GPU the kernels run under the interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how the tests check them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from dede_rt.kernels.reference import check_shapes, pixel_layout

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _target(img_base, t, k, G, PATCH: tl.constexpr, NCHW: tl.constexpr,
            SCALE0: tl.constexpr, SCALE1: tl.constexpr, SCALE2: tl.constexpr,
            SHIFT0: tl.constexpr, SHIFT1: tl.constexpr, SHIFT2: tl.constexpr, valid):
    """Normalized target value for token t, patch element k (c, p1, p2 order) of one image: NHWC uint8, or with
    ``NCHW`` float32 NCHW pixels in [0, 1]."""
    PP: tl.constexpr = PATCH * PATCH
    c = k // PP
    i = (k // PATCH) % PATCH
    j = k % PATCH
    y = (t // G) * PATCH + i
    x = (t % G) * PATCH + j
    side = G * PATCH
    if NCHW:
        offset = c * (side * side) + y * side + x
    else:
        offset = (y * side + x) * 3 + c
    u = tl.load(img_base + offset, mask=valid, other=0).to(tl.float32)
    scale = tl.where(c == 0, SCALE0, tl.where(c == 1, SCALE1, SCALE2))
    shift = tl.where(c == 0, SHIFT0, tl.where(c == 1, SHIFT1, SHIFT2))
    return u * scale - shift


@triton.jit
def mask_and_score_kernel(
    img_ptr, rec_ptr, msk_ptr, T, G, stride_mn, split_len, out_ptr,
    PATCH: tl.constexpr, HAS_MASK: tl.constexpr, NCHW: tl.constexpr,
    SCALE0: tl.constexpr, SCALE1: tl.constexpr, SCALE2: tl.constexpr,
    SHIFT0: tl.constexpr, SHIFT1: tl.constexpr, SHIFT2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: elements [s·split_len, (s+1)·split_len) of sample n's flattened [T, 3p²] error."""
    # Argument order (inputs, int32 scalars, output) is the TensorRT AOT plugin's calling convention.
    n = tl.program_id(0)
    s = tl.program_id(1)
    P: tl.constexpr = 3 * PATCH * PATCH
    total = T * P  # == H·W·3: the image and the reconstruction have the same element count
    start = s * split_len
    end = tl.minimum(start + split_len, total)
    n64 = n.to(tl.int64)
    rec_base = rec_ptr + n64 * total
    img_base = img_ptr + n64 * total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for e0 in range(start, end, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        valid = e < end
        t = e // P
        k = e % P
        r = tl.load(rec_base + e, mask=valid, other=0).to(tl.float32)
        d = r - _target(img_base, t, k, G, PATCH, NCHW, SCALE0, SCALE1, SCALE2, SHIFT0, SHIFT1, SHIFT2, valid)
        se = d * d
        if HAS_MASK:
            se = se * tl.load(msk_ptr + n64 * stride_mn + t, mask=valid, other=0).to(tl.float32)
        acc += tl.where(valid, se, 0.0)
    tl.store(out_ptr + n64 * tl.num_programs(1) + s, tl.sum(acc, axis=0))


@triton.jit
def mask_and_score_head_kernel(
    img_ptr, hid_ptr, w_ptr, b_ptr, msk_ptr, T, G, D, stride_hn, stride_ht, stride_mn, split_tokens, out_ptr,
    PATCH: tl.constexpr, HAS_MASK: tl.constexpr, NCHW: tl.constexpr,
    SCALE0: tl.constexpr, SCALE1: tl.constexpr, SCALE2: tl.constexpr,
    SHIFT0: tl.constexpr, SHIFT1: tl.constexpr, SHIFT2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: tokens [s·split_tokens, (s+1)·split_tokens) of sample n; head GEMM + score epilogue."""
    n = tl.program_id(0)
    s = tl.program_id(1)
    P: tl.constexpr = 3 * PATCH * PATCH
    n64 = n.to(tl.int64)
    t_start = s * split_tokens
    t_end = tl.minimum(t_start + split_tokens, T)
    hid_base = hid_ptr + n64 * stride_hn
    img_base = img_ptr + n64 * T * P
    row_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tv = ts < t_end
        for p0 in range(0, P, BLOCK_P):
            ks = p0 + tl.arange(0, BLOCK_P)
            kv = ks < P
            acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dv = ds < D
                h = tl.load(hid_base + ts[:, None] * stride_ht + ds[None, :], mask=tv[:, None] & dv[None, :], other=0.0)
                # W is [P, D] row-major; this loads the W^T tile [BLOCK_D, BLOCK_P].
                w = tl.load(w_ptr + ks[None, :] * D + ds[:, None], mask=dv[:, None] & kv[None, :], other=0.0)
                acc = tl.dot(h, w, acc, input_precision=PRECISION)
            both = tv[:, None] & kv[None, :]
            recon = acc + tl.load(b_ptr + ks, mask=kv, other=0.0)[None, :]
            d = recon - _target(img_base, ts[:, None], ks[None, :], G, PATCH, NCHW,
                                SCALE0, SCALE1, SCALE2, SHIFT0, SHIFT1, SHIFT2, both)
            row = tl.sum(tl.where(both, d * d, 0.0), axis=1)
            if HAS_MASK:
                row = row * tl.load(msk_ptr + n64 * stride_mn + ts, mask=tv, other=0).to(tl.float32)
            row_acc += row
    tl.store(out_ptr + n64 * tl.num_programs(1) + s, tl.sum(row_acc, axis=0))


_SCORE_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))]
_HEAD_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_P": bp, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bt, bp, bd, w, st in (
        (32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 2), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3),
        (32, 128, 64, 4, 2),
    )
]
# Autotuning re-times every config on first use of a shape; on GPU that is worth it, in the interpreter it is not.
_score_tuned = triton.autotune(_SCORE_CONFIGS, key=["T", "PATCH", "HAS_MASK", "NCHW"])(mask_and_score_kernel)
_head_tuned = triton.autotune(_HEAD_CONFIGS, key=["T", "D", "PATCH", "HAS_MASK", "NCHW"])(mask_and_score_head_kernel)


def norm_constants(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                   unit: bool = False) -> dict[str, float]:
    """Compile-time constants so that target = u · SCALE_c − SHIFT_c equals (u/255 − mean_c)/std_c for uint8
    pixels u, or with ``unit`` (pixels already in [0, 1]) (u − mean_c)/std_c."""
    mean = [float(v) for v in torch.as_tensor(mean).reshape(-1).tolist()]
    std = [float(v) for v in torch.as_tensor(std).reshape(-1).tolist()]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values (RGB)")
    out = {f"SCALE{c}": 1.0 / ((1.0 if unit else 255.0) * std[c]) for c in range(3)}
    out.update({f"SHIFT{c}": mean[c] / std[c] for c in range(3)})
    return out


def choose_split(n: int, work_per_sample: int, min_work: int = 16384, max_split: int = 8, min_programs: int = 512) -> int:
    """Programs per sample: 1 for small samples or big batches; more so that a GPU gets enough programs."""
    if n >= min_programs:
        return 1
    return max(1, min(max_split, work_per_sample // min_work))


def _mask_args(mask: torch.Tensor | None, n: int, tokens: int, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    if mask is None:
        return dummy, 0
    if mask.ndim != 2 or mask.shape[1] != tokens or mask.shape[0] not in (1, n):
        raise ValueError(f"mask must be [N, T] or [1, T] with T={tokens}, got {list(mask.shape)}")
    # Float weights (bool -> 0/1); a shared [1, T] mask is read with batch stride 0.
    weights = mask.to(device=dummy.device, dtype=torch.float32).contiguous()
    return weights, (0 if weights.shape[0] == 1 else tokens)


def _launch(config: dict) -> dict:
    """Meta-parameters plus launch options (num_warps, num_stages) for a direct, untuned launch."""
    out = dict(config)
    out.setdefault("num_warps", 4)
    return out


def _check_device(*tensors: torch.Tensor) -> None:
    if not INTERPRET and any(t.device.type != "cuda" for t in tensors):
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)")


def _finish(partials: torch.Tensor) -> torch.Tensor:
    return partials[:, 0] if partials.shape[1] == 1 else partials.sum(dim=1)


def mask_and_score(
    images_u8: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor | None,
    mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, patch: int,
    split: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.mask_and_score``: scores [N] float32 on the inputs' device.

    ``images_u8``: uint8 NHWC, or float32 NCHW pixels in [0, 1] (``reference.pixel_layout``).

    ``config`` (e.g. ``{"BLOCK": 1024}``) skips autotuning; the interpreter always uses a fixed config.
    """
    n, tokens, width = recon.shape
    grid_side = check_shapes(images_u8, tokens, width, patch)
    _check_device(images_u8, recon)
    images_u8, recon = images_u8.contiguous(), recon.contiguous()
    msk, stride_mn = _mask_args(mask, n, tokens, recon)
    total = tokens * width
    split = split or choose_split(n, total)
    split_len = triton.cdiv(total, split)
    out = torch.empty(n, split, dtype=torch.float32, device=recon.device)
    nchw = pixel_layout(images_u8) == "nchw_unit"  # float [0, 1] NCHW pixels (TensorRT engines' input)
    consts = {"NCHW": nchw, **norm_constants(mean, std, unit=nchw)}
    args = (images_u8, recon, msk, tokens, grid_side, stride_mn, split_len, out)
    if config is None and not INTERPRET:
        _score_tuned[(n, split)](*args, PATCH=patch, HAS_MASK=mask is not None, **consts)
    else:
        cfg = dict(config or {"BLOCK": 1024})
        mask_and_score_kernel[(n, split)](*args, PATCH=patch, HAS_MASK=mask is not None, **consts, **_launch(cfg))
    return _finish(out)


def mask_and_score_head(
    images_u8: torch.Tensor, hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
    mask: torch.Tensor | None, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, patch: int,
    split: int | None = None, config: dict | None = None, precision: str = "ieee",
) -> torch.Tensor:
    """Triton version of ``reference.mask_and_score_head`` (head GEMM fused into the score): [N] float32.

    ``precision`` is tl.dot's input precision for fp32: "ieee" (exact, the default), "tf32x3" or "tf32".
    """
    n, tokens, dim = hidden.shape
    width = 3 * patch * patch
    if head_weight.shape != (width, dim):
        raise ValueError(f"head_weight must be [3p², dim] = [{width}, {dim}], got {list(head_weight.shape)}")
    grid_side = check_shapes(images_u8, tokens, dim, patch, what="hidden")
    _check_device(images_u8, hidden, head_weight)
    hidden = hidden.float()
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    weight = head_weight.float().contiguous()
    bias = torch.zeros(width, device=hidden.device) if head_bias is None else head_bias.float().contiguous()
    images_u8 = images_u8.contiguous()
    msk, stride_mn = _mask_args(mask, n, tokens, hidden)
    split = split or choose_split(n, tokens * width)
    split_tokens = triton.cdiv(tokens, split)
    split = triton.cdiv(tokens, split_tokens)
    out = torch.empty(n, split, dtype=torch.float32, device=hidden.device)
    nchw = pixel_layout(images_u8) == "nchw_unit"  # float [0, 1] NCHW pixels (TensorRT engines' input)
    consts = {"NCHW": nchw, **norm_constants(mean, std, unit=nchw)}
    args = (images_u8, hidden, weight, bias, msk, tokens, grid_side, dim, hidden.stride(0), hidden.stride(1),
            stride_mn, split_tokens, out)
    if config is None and not INTERPRET:
        _head_tuned[(n, split)](*args, PATCH=patch, HAS_MASK=mask is not None, PRECISION=precision, **consts)
    else:
        cfg = dict(config or {"BLOCK_T": 32, "BLOCK_P": 64, "BLOCK_D": 32})
        mask_and_score_head_kernel[(n, split)](*args, PATCH=patch, HAS_MASK=mask is not None, PRECISION=precision,
                                               **consts, **_launch(cfg))
    return _finish(out)

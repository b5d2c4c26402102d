"""Triton mask-and-score kernels against the reference op.

Without CUDA the kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before Triton is first imported, so it is set here at import time (it only
affects Triton). Cases stay small because the interpreter is slow.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")
if "dede_rt.kernels.triton_score" in sys.modules and not torch.cuda.is_available():
    if not sys.modules["dede_rt.kernels.triton_score"].INTERPRET:
        pytest.skip("triton_score was imported before TRITON_INTERPRET was set", allow_module_level=True)

from dede_rt.kernels import reference as ref  # noqa: E402
from dede_rt.kernels import triton_score as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _close(expected: torch.Tensor, got: torch.Tensor) -> None:
    """Max abs error <= 1e-4 relative to the largest score."""
    assert got.shape == expected.shape and got.dtype == torch.float32
    scale = float(expected.abs().max().clamp_min(1e-6))
    err = float((expected - got.cpu()).abs().max())
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} > 1e-4 x {scale:.3g}"


def _inputs(n: int, size: int, patch: int, dim: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens, width = (size // patch) ** 2, 3 * patch * patch
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    recon = torch.randn(n, tokens, width, generator=g)
    hidden = torch.randn(n, tokens, dim, generator=g)
    weight = torch.randn(width, dim, generator=g) / dim**0.5
    bias = torch.randn(width, generator=g)
    return images, recon, hidden, weight, bias


def _masks(kind: str, n: int, tokens: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(5)
    return {
        "none": None,  # no mask given = every patch masked
        "all": torch.ones(n, tokens, dtype=torch.bool),
        "nothing": torch.zeros(n, tokens, dtype=torch.bool),
        "random": torch.rand(n, tokens, generator=g) > 0.5,
        "shared": torch.rand(1, tokens, generator=g) > 0.3,
    }[kind]


def _dev(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


# (batch, image size, patch, mask): 224 px only with a mask, to keep the interpreter's time down.
CASES = [(n, s, p, m) for n, s, p in [(1, 32, 4), (3, 32, 4), (5, 32, 8), (2, 32, 16), (2, 32, 32)]
         for m in ("none", "random")] + [(1, 224, 16, "random"), (1, 224, 32, "random")]


@pytest.mark.parametrize("n,size,patch,mask_kind", CASES)
def test_mask_and_score_kernel(n, size, patch, mask_kind):
    images, recon, *_ = _inputs(n, size, patch)
    mask = _masks(mask_kind, n, recon.shape[1])
    expected = ref.mask_and_score(images, recon, mask, MEAN, STD, patch)
    _close(expected, tk.mask_and_score(*_dev(images, recon, mask), MEAN, STD, patch))


@pytest.mark.parametrize("n,size,patch,mask_kind", CASES)
def test_head_kernel(n, size, patch, mask_kind):
    images, _, hidden, weight, bias = _inputs(n, size, patch)
    mask = _masks(mask_kind, n, hidden.shape[1])
    expected = ref.mask_and_score_head(images, hidden, weight, bias, mask, MEAN, STD, patch)
    _close(expected, tk.mask_and_score_head(*_dev(images, hidden, weight, bias, mask), MEAN, STD, patch))


@pytest.mark.parametrize("mask_kind", ["all", "nothing", "shared"])
def test_mask_edge_cases(mask_kind):
    images, recon, hidden, weight, bias = _inputs(3, 32, 4)
    mask = _masks(mask_kind, 3, 64)
    a = tk.mask_and_score(*_dev(images, recon, mask), MEAN, STD, 4)
    b = tk.mask_and_score_head(*_dev(images, hidden, weight, bias, mask), MEAN, STD, 4)
    _close(ref.mask_and_score(images, recon, mask, MEAN, STD, 4), a)
    _close(ref.mask_and_score_head(images, hidden, weight, bias, mask, MEAN, STD, 4), b)
    if mask_kind == "nothing":  # no masked patch: nothing is scored
        assert torch.equal(a.cpu(), torch.zeros(3)) and torch.equal(b.cpu(), torch.zeros(3))
    if mask_kind == "all":  # an all-True mask is the same as no mask
        _close(tk.mask_and_score(*_dev(images, recon), None, MEAN, STD, 4), a)


@pytest.mark.parametrize("config,split", [({"BLOCK": 128}, 1), ({"BLOCK": 256}, 3), ({"BLOCK": 2048}, 2)])
def test_score_block_sizes_and_splits(config, split):
    images, recon, *_ = _inputs(3, 32, 8, seed=2)
    mask = _masks("random", 3, 16)
    expected = ref.mask_and_score(images, recon, mask, MEAN, STD, 8)
    _close(expected, tk.mask_and_score(*_dev(images, recon, mask), MEAN, STD, 8, split=split, config=config))


@pytest.mark.parametrize("config,split", [
    ({"BLOCK_T": 16, "BLOCK_P": 16, "BLOCK_D": 16}, 1),
    ({"BLOCK_T": 64, "BLOCK_P": 128, "BLOCK_D": 64}, 1),
    ({"BLOCK_T": 16, "BLOCK_P": 32, "BLOCK_D": 32}, 3),
])
def test_head_block_sizes_splits_and_strided_hidden(config, split):
    images, _, hidden, weight, bias = _inputs(3, 32, 4, dim=48, seed=3)
    # The decoder hands over tokens[:, 1:] of [N, T+1, dim]: a strided view, read without a copy.
    padded = torch.cat([torch.randn(3, 1, 48), hidden], dim=1)
    view = padded.to(DEVICE)[:, 1:]
    assert not view.is_contiguous()
    expected = ref.mask_and_score_head(images, hidden, weight, bias, None, MEAN, STD, 4)
    got = tk.mask_and_score_head(*_dev(images), view, *_dev(weight, bias), None, MEAN, STD, 4, split=split, config=config)
    _close(expected, got)


def test_head_without_bias_and_errors():
    images, _, hidden, weight, _ = _inputs(2, 32, 4)
    _close(ref.mask_and_score_head(images, hidden, weight, None, None, MEAN, STD, 4),
           tk.mask_and_score_head(*_dev(images, hidden, weight), None, None, MEAN, STD, 4))
    with pytest.raises(ValueError, match="mask"):
        tk.mask_and_score(*_dev(images, torch.zeros(2, 64, 48)), torch.ones(2, 63).to(DEVICE), MEAN, STD, 4)
    with pytest.raises(ValueError, match="3 values"):
        tk.norm_constants((0.5, 0.5), (1.0, 1.0))


def test_triton_scores_match_detector(tiny_detector_dir, demo_images):
    from dede_rt.bundle import load_detector
    from dede_rt.engines.torch_runner import TorchRunner

    det = load_detector(tiny_detector_dir)
    batch = demo_images.images[100:107]  # odd batch
    expected = det.score(batch)
    with TorchRunner(tiny_detector_dir, device=DEVICE, score_kernel="triton") as runner:
        got = runner.infer(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_every_autotune_config_is_correct():
    """On GPU the autotuner may pick any of these; each must give the reference scores."""
    images, recon, hidden, weight, bias = _inputs(2, 32, 4, dim=48, seed=4)
    mask = _masks("random", 2, 64)
    expected = ref.mask_and_score(images, recon, mask, MEAN, STD, 4)
    expected_head = ref.mask_and_score_head(images, hidden, weight, bias, mask, MEAN, STD, 4)
    for cfg in tk._SCORE_CONFIGS:
        config = {**cfg.kwargs, "num_warps": cfg.num_warps}
        _close(expected, tk.mask_and_score(*_dev(images, recon, mask), MEAN, STD, 4, config=config))
    for cfg in tk._HEAD_CONFIGS:
        config = {**cfg.kwargs, "num_warps": cfg.num_warps}
        _close(expected_head, tk.mask_and_score_head(*_dev(images, hidden, weight, bias, mask), MEAN, STD, 4,
                                                     config=config))


@pytest.mark.parametrize("size,patch,mask_kind", [(32, 4, "none"), (32, 8, "random"), (224, 32, "random")])
def test_float_nchw_pixels_like_uint8(size, patch, mask_kind):
    """The TensorRT engines' pixel input (float32 NCHW in [0, 1]) scores like the same uint8 NHWC images."""
    images, recon, hidden, weight, bias = _inputs(2, size, patch, seed=7)
    pixels = images.permute(0, 3, 1, 2).float() / 255.0
    mask = _masks(mask_kind, 2, recon.shape[1])
    assert ref.pixel_layout(pixels) == "nchw_unit" and ref.pixel_layout(images) == "nhwc_uint8"
    expected = ref.mask_and_score(images, recon, mask, MEAN, STD, patch)
    _close(expected, ref.mask_and_score(pixels, recon, mask, MEAN, STD, patch))
    _close(expected, tk.mask_and_score(*_dev(pixels, recon, mask), MEAN, STD, patch))
    expected_head = ref.mask_and_score_head(images, hidden, weight, bias, mask, MEAN, STD, patch)
    _close(expected_head, ref.mask_and_score_head(pixels, hidden, weight, bias, mask, MEAN, STD, patch))
    _close(expected_head, tk.mask_and_score_head(*_dev(pixels, hidden, weight, bias, mask), MEAN, STD, patch))
    with pytest.raises(ValueError, match="uint8 \\[N, H, W, 3\\] or float32"):
        tk.mask_and_score(*_dev(pixels.permute(0, 2, 3, 1), recon), None, MEAN, STD, patch)  # float NHWC


def test_make_runner_reaches_the_triton_kernel(tiny_detector_dir, demo_images):
    """``make_runner(..., score_kernel="triton")`` (what `dede-rt scan --score-kernel triton` calls) scores with it."""
    from dede_rt.bundle import load_detector
    from dede_rt.engines.registry import make_runner
    from dede_rt.errors import UserError

    batch = demo_images.images[200:205]
    expected = load_detector(tiny_detector_dir).score(batch)
    with make_runner(tiny_detector_dir, "auto", device=DEVICE, score_kernel="triton") as deployment:
        assert deployment.backend == "torch" and deployment.runner.name.endswith("-triton")
        assert deployment.runner.scorer.kernel == "triton"
        got = deployment.infer(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    with pytest.raises(UserError, match="torch backend"):
        make_runner(tiny_detector_dir, "onnxruntime", "fp32", score_kernel="triton")

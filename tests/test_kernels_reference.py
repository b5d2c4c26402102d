"""The reference mask-and-score ops against dede_rt.scoring on real decoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.bundle import load_detector
from dede_rt.engines.torch_runner import TorchRunner
from dede_rt.kernels import reference as ref
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images
from dede_rt.scoring import Scorer, masked_sse


def score_batch(encoder, decoder, normalization, images, mask_ratio=0.99, mask_seed=0, kernel="torch"):
    """The plain-op (or ``kernel``-fused) score of one batch through the one ``Scorer``."""
    scorer = Scorer(encoder=encoder, decoder=decoder, normalization=normalization, mask_ratio=mask_ratio,
                    mask_seed=mask_seed, kernel=kernel)
    with torch.no_grad():
        return scorer(torch.as_tensor(images))


@pytest.fixture(scope="module")
def detector(tiny_detector_dir):
    return load_detector(tiny_detector_dir)


@pytest.fixture(scope="module")
def reference_decoder(detector) -> DeDeDecoder:
    """A reference-size decoder (dim 192, 3 heads, 12 + 4 blocks, patch 4) for the tiny detector's encoder."""
    torch.manual_seed(1)
    return DeDeDecoder(DecoderConfig(embed_dim=detector.decoder.config.embed_dim)).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("mask_ratio", [0.99, 0.5])
def test_mask_and_score_matches_score_batch(detector, demo_images, mask_ratio):
    images = torch.from_numpy(demo_images.images[:12])
    expected = score_batch(detector.encoder, detector.decoder, detector.normalization, images, mask_ratio, 0)
    with torch.no_grad():
        x = detector.normalization.apply(images)
        pred, masked = detector.decoder(x, detector.encoder(x), mask_ratio, torch.Generator().manual_seed(0), True)
    n = detector.normalization
    got = ref.mask_and_score(images, pred, None if mask_ratio == 0.99 else masked, n.mean, n.std, 4)
    assert _rel_err(expected, got) <= 1e-6
    if mask_ratio == 0.5:  # the mask must matter: half the patches are visible and do not count
        full = ref.mask_and_score(images, pred, None, n.mean, n.std, 4)
        assert (full > got * 1.2).all()


def test_normalized_patches_bit_identical(demo_images):
    norm = Normalization()
    images = torch.from_numpy(demo_images.images[:5])
    expected = patchify_images(norm.apply(images), 4)
    assert torch.equal(ref.normalized_patches(images, norm.mean, norm.std, 4), expected)


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 8])
def test_head_fused_matches_score_batch_on_reference_decoder(detector, reference_decoder, demo_images, rows_per_chunk):
    images = torch.from_numpy(demo_images.images[20:29])
    n = detector.normalization
    expected = score_batch(detector.encoder, reference_decoder, n, images)
    with torch.no_grad():
        hidden = reference_decoder.decode_hidden(detector.encoder(n.apply(images)))
        head = reference_decoder.head
        got = ref.mask_and_score_head(images, hidden, head.weight, head.bias, None, n.mean, n.std, 4, rows_per_chunk)
    assert hidden.shape == (9, 64, 192)
    assert _rel_err(expected, got) <= 1e-5


def test_head_fused_with_mask_matches_masked_sse(rng):
    patch, size, dim = 8, 32, 24
    images = torch.from_numpy(rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8))
    hidden = torch.randn(4, 16, dim, generator=torch.Generator().manual_seed(0))
    weight, bias = torch.randn(3 * patch * patch, dim) * 0.2, torch.randn(3 * patch * patch)
    mask = torch.from_numpy(rng.random((4, 16)) > 0.5)
    norm = Normalization()
    target = patchify_images(norm.apply(images), patch)
    expected = masked_sse(hidden @ weight.T + bias, target, mask)
    got = ref.mask_and_score_head(images, hidden, weight, bias, mask, norm.mean, norm.std, patch)
    assert _rel_err(expected, got) <= 1e-5


@pytest.mark.parametrize("mask_ratio", [0.99, 0.5])
def test_fused_scorer_and_runner_hook(tiny_detector_dir, detector, demo_images, mask_ratio):
    images = demo_images.images[40:50]
    n = detector.normalization
    expected = score_batch(detector.encoder, detector.decoder, n, images, mask_ratio, 3)
    got = score_batch(detector.encoder, detector.decoder, n, images, mask_ratio, 3, kernel="reference")
    assert _rel_err(expected, got) <= 1e-5
    if mask_ratio == 0.99:
        with TorchRunner(tiny_detector_dir, score_kernel="reference") as runner:
            np.testing.assert_allclose(runner.infer(images), expected.numpy(), rtol=1e-5)


def test_shape_errors():
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="tokens"):
        ref.mask_and_score(images, torch.zeros(2, 63, 48), None, (0, 0, 0), (1, 1, 1), 4)
    with pytest.raises(ValueError, match="values per patch"):
        ref.mask_and_score(images, torch.zeros(2, 64, 47), None, (0, 0, 0), (1, 1, 1), 4)
    with pytest.raises(ValueError, match="uint8"):
        ref.mask_and_score(images.float(), torch.zeros(2, 64, 48), None, (0, 0, 0), (1, 1, 1), 4)
    with pytest.raises(ValueError, match="mask"):
        ref.mask_and_score(images, torch.zeros(2, 64, 48), torch.ones(3, 64, dtype=torch.bool), (0, 0, 0), (1, 1, 1), 4)
    with pytest.raises(ValueError, match="head_weight"):
        ref.mask_and_score_head(images, torch.zeros(2, 64, 8), torch.zeros(48, 9), None, None, (0, 0, 0), (1, 1, 1), 4)
    from dede_rt.errors import UserError
    from dede_rt.scoring import kernel_ops

    with pytest.raises(UserError, match="unknown score kernel"):
        kernel_ops("cuda-magic")


def test_runner_rejects_unknown_score_kernel(tiny_detector_dir):
    from dede_rt.errors import UserError

    with pytest.raises(UserError, match="score kernel"):
        TorchRunner(tiny_detector_dir, score_kernel="cuda-magic")

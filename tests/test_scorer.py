"""One Scorer: it equals the decoder's own masked forward, its kinds come from the registry, and
``ensure_graph`` / ``make_runner`` hand out current graphs and declared deployments."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dede_rt.bundle import load_detector, read_manifest
from dede_rt.errors import UserError
from dede_rt.models.decoder import patchify_images
from dede_rt.scoring import SCORE_KINDS, RelativeError, RelativeReference, Scorer, TestMask, kind_class, masked_sse


@pytest.fixture(scope="module")
def detector(tiny_detector_dir: Path):
    return load_detector(tiny_detector_dir)


@pytest.mark.parametrize("mask_ratio, seed", [(0.99, 0), (0.75, 3), (0.5, 7)])
def test_scorer_equals_the_decoders_shared_mask_forward(detector, demo_images, mask_ratio: float, seed: int) -> None:
    """The fixed-mask decode the scorer uses is the decoder's training-time forward with one shared mask."""
    images = demo_images.images[:10]
    scorer = Scorer(encoder=detector.encoder, decoder=detector.decoder, normalization=detector.normalization,
                    mask_ratio=mask_ratio, mask_seed=seed)
    with torch.no_grad():
        x = detector.normalization.apply(images)
        pred, masked = detector.decoder(x, detector.encoder(x), mask_ratio, torch.Generator().manual_seed(seed), True)
        expected = masked_sse(pred, patchify_images(x, 4), masked)
    np.testing.assert_array_equal(scorer.score(images), expected.numpy())
    assert scorer.visible_patches == int(64 * (1 - mask_ratio))
    if mask_ratio < 0.99:  # the visible patches do not count toward the score
        assert int(scorer.tail.mask.masked.sum()) == 64 - scorer.visible_patches


def test_score_does_not_depend_on_the_batch(detector, demo_images) -> None:
    images = demo_images.images[:40]
    scorer = detector.scorer()
    np.testing.assert_allclose(scorer.score(images, batch_size=7), scorer.score(images, batch_size=40), rtol=1e-6)


def test_registry_and_export_form_of_the_relative_kind(detector, demo_images) -> None:
    assert set(SCORE_KINDS) == {"summed", "relative", "combined"}
    with pytest.raises(UserError, match="unknown score kind"):
        kind_class("reference")
    z = torch.randn(8, detector.decoder.config.embed_dim, generator=torch.Generator().manual_seed(0))
    reference = RelativeReference.from_embeddings(detector.decoder, z, 3)
    for ratio in (0.99, 0.75):
        mask = TestMask(64, ratio, 0)
        exact, graph = RelativeError(reference, mask.masked), RelativeError(reference, mask.masked, exact=False)
        scorers = [Scorer(encoder=detector.encoder, decoder=detector.decoder, normalization=detector.normalization,
                          kind=kind, mask=mask) for kind in (exact, graph)]
        a, b = (s.score(demo_images.images[:16]) for s in scorers)
        own = Scorer(encoder=detector.encoder, decoder=detector.decoder, normalization=detector.normalization,
                     mask=mask).score(demo_images.images[:16])
        assert np.abs(a - b).max() <= 1e-4 * np.abs(own).max()
        assert not np.allclose(a, own)  # the prototype term is really subtracted


def test_ensure_graph_exports_once_and_again_after_new_weights(tiny_detector_dir: Path, tmp_path: Path) -> None:
    from dede_rt.engines.loaders import ensure_graph, graph_is_current

    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    assert not graph_is_current(bundle, "detector")
    path = ensure_graph(bundle, "detector")
    assert path.is_file() and graph_is_current(bundle, "detector")
    stamp = path.stat().st_mtime_ns
    assert ensure_graph(bundle, "detector").stat().st_mtime_ns == stamp  # current: not exported again
    det = load_detector(bundle)
    with torch.no_grad():
        det.decoder.head.bias.add_(1.0)
    save_file({k: v.contiguous() for k, v in det.decoder.state_dict().items()}, str(bundle / "decoder.safetensors"))
    assert not graph_is_current(bundle, "detector")  # stale: the weights changed
    os.utime(path, ns=(stamp, stamp))
    ensure_graph(bundle, "detector")
    assert graph_is_current(bundle, "detector")
    assert read_manifest(bundle).deployment.onnx["source"]["decoder_sha256"] != ""


def test_make_runner_declares_its_deployment(tiny_detector_dir: Path, demo_images) -> None:
    from dede_rt.engines.registry import Deployment, make_runner

    deployment = make_runner(tiny_detector_dir, "torch")
    assert isinstance(deployment, Deployment)
    assert (deployment.backend, deployment.precision, deployment.device) == ("torch", "fp32", "cpu")
    assert deployment.thresholds.precision == "fp32" and deployment.thresholds.clean_scores.size
    with deployment as d:
        scores = d.infer(demo_images.images[:5])
    np.testing.assert_allclose(scores, load_detector(tiny_detector_dir).score(demo_images.images[:5]), rtol=1e-6)
    with pytest.raises(UserError, match="torch backend"):
        make_runner(tiny_detector_dir, "onnxruntime", score_kernel="reference")
    fused = make_runner(tiny_detector_dir, score_kernel="reference")  # auto + a fused kernel: torch
    assert fused.backend == "torch" and fused.runner.name.endswith("reference")

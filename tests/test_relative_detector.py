"""A detector trained with the relative score: its formula, bundle round trip, runners, ONNX export and INT8/FP16."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_DECODER
from dede_rt.bundle import load_detector
from dede_rt.bundle.manifest import PROTOTYPES_FILE
from dede_rt.errors import UserError
from dede_rt.models.decoder import patchify_images
from dede_rt.scoring import Scorer, prototype_reconstructions
from dede_rt.training import TrainConfig, train_detector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def relative_bundle(tmp_path_factory, encoder_file, demo_images):
    out = tmp_path_factory.mktemp("relative") / "det"
    train_detector(encoder_file, demo_images.images[:256], out, decoder_config=TINY_DECODER,
                   config=TrainConfig(epochs=2, batch_size=64), holdout_fraction=0.25, progress=False,
                   relative_k=4, prototypes=32)
    return out


def test_relative_detector_scores_own_error_minus_nearest_prototypes(relative_bundle, demo_images):
    det = load_detector(relative_bundle)
    manifest = json.loads((relative_bundle / "manifest.json").read_text())
    assert manifest["score"]["kind"] == "relative" and manifest["score"]["relative_k"] == 4
    assert det.prototype_embeddings.shape == (32, det.decoder.config.embed_dim)
    images = demo_images.images[300:330]
    own = _summed(det, images)  # the reference score
    target = patchify_images(det.normalization.apply(images), det.decoder.config.patch_size).flatten(1)
    protos = prototype_reconstructions(det.decoder, det.prototype_embeddings).flatten(1)
    nearest = np.sort(torch.cdist(target, protos).square().numpy(), axis=1)[:, :4].mean(1)
    got = det.score(images)
    assert np.allclose(got, own - nearest, rtol=1e-4, atol=1e-2)
    assert not np.allclose(got, own)  # it is not the reference score
    # the threshold was calibrated on relative scores of the held-out images, not on the reference score
    assert det.calibration_scores.min() < det.calibration_scores.max() < own.min()


def test_relative_detector_through_the_torch_runner_and_scan(relative_bundle, demo_images, tmp_path):
    from dede_rt.engines.torch_runner import TorchRunner
    from dede_rt.scan.pipeline import scan

    det = load_detector(relative_bundle)
    images = demo_images.images[300:310]
    with TorchRunner(relative_bundle) as runner:
        assert np.allclose(runner.infer(images), det.score(images), rtol=1e-5, atol=1e-3)
    with TorchRunner(relative_bundle, score_kernel="reference") as runner:  # fused op, prototype term after it
        assert np.allclose(runner.infer(images), det.score(images), rtol=1e-4, atol=1e-2)
    np.savez(tmp_path / "few.npz", images=images)
    rows = list(scan(tmp_path / "few.npz", relative_bundle, backend="auto"))
    assert np.allclose([r.score for r in rows], det.score(images), rtol=1e-5, atol=1e-3)


def test_relative_detector_checks_its_prototypes(relative_bundle, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(relative_bundle, broken)
    (broken / PROTOTYPES_FILE).unlink()
    with pytest.raises(UserError, match="without its prototypes.npy"):
        load_detector(broken)
    manifest = json.loads((relative_bundle / "manifest.json").read_text())
    manifest["score"]["relative_k"] = 0  # a hand-edited manifest: k outside [1, K]
    shutil.copy(relative_bundle / PROTOTYPES_FILE, broken / PROTOTYPES_FILE)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="averages k of 32 prototypes; got k = 0"):
        load_detector(broken)


def _near(got: np.ndarray, ref: np.ndarray, own: np.ndarray, tol: float) -> bool:
    """Close relative to the own reconstruction error: a relative score is a difference that can sit near zero."""
    return bool(np.max(np.abs(got - ref) / own) <= tol)


def test_relative_detector_exports_to_onnx_with_the_prototype_term(relative_bundle, demo_images, tmp_path):
    import shutil

    import onnx

    from dede_rt.calibration.quantize import score_tail
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.export import export_detector
    from dede_rt.kernels.onnx_custom import fuse_score_tail

    bundle = tmp_path / "det"
    shutil.copytree(relative_bundle, bundle)
    record = export_detector(bundle)
    assert record["score_kind"] == "relative" and record["relative_k"] == 4
    assert record["parity"]["max_rel_diff"] < 1e-3
    det = load_detector(bundle)
    images = demo_images.images[300:340]
    with OnnxRuntimeRunner(bundle / "onnx" / "detector.onnx", 32) as runner:
        got = runner.infer(images)
    own = _summed(det, images)
    assert _near(got, det.score(images), own, 1e-5)
    from dede_rt.scan.pipeline import scan

    np.savez(tmp_path / "few.npz", images=images[:8])
    rows = list(scan(tmp_path / "few.npz", bundle, backend="onnxruntime"))
    assert _near(np.array([r.score for r in rows]), det.score(images[:8]), own[:8], 1e-5)
    model = onnx.load(str(bundle / "onnx" / "detector.onnx"))
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1  # the k nearest prototypes, inside the graph
    tail, ends = score_tail(model)
    assert topk[0].name in tail and len(ends) == 2  # decoder head + the product with the prototypes
    with pytest.raises(ValueError, match="relative score"):
        fuse_score_tail(model, "images", "scores", det.decoder.head.weight.detach().numpy(), None,
                        det.normalization.mean, det.normalization.std, 4, 32)


def test_relative_detector_int8_and_fp16_keep_the_prototype_term_in_float(relative_bundle, demo_images, tmp_path):
    import shutil

    import onnx

    from dede_rt.calibration.pipeline import calibrate_detector
    from dede_rt.calibration.quantize import score_tail
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner

    bundle = tmp_path / "det"
    shutil.copytree(relative_bundle, bundle)
    clean = demo_images.images[256:576]
    results = calibrate_detector(bundle, clean, count=128, warn=lambda _: None)
    det = load_detector(bundle)
    images = demo_images.images[600:640]
    ref = det.score(images)
    own = _summed(det, images)
    fp32 = onnx.load(str(bundle / "onnx" / "detector.onnx"))
    _, ends = score_tail(fp32)
    assert set(ends) <= set(results["int8"]["conversion"]["excluded_nodes"]) and len(ends) == 2
    assert set(score_tail(fp32)[0]) == set(results["fp16"]["conversion"]["float32_nodes"])
    half = onnx.load(str(bundle / "onnx" / "detector_fp16.onnx"))
    # the prototype matrix stays float32 in the FP16 graph
    c = det.decoder.config
    size = 32 * c.num_patches * 3 * c.patch_size**2  # K = 32 prototypes x T*P pixels
    protos = [t for t in half.graph.initializer if int(np.prod(t.dims)) == size]
    assert protos and all(t.data_type == onnx.TensorProto.FLOAT for t in protos)
    for precision, tol in (("fp16", 1e-3), ("int8", 0.05)):
        with OnnxRuntimeRunner(bundle / "onnx" / f"detector_{precision}.onnx", 32, precision) as runner:
            got = runner.infer(images)
        print(precision, np.max(np.abs(got - ref) / own), np.corrcoef(got, ref)[0, 1])
        assert _near(got, ref, own, tol), precision


def test_relative_k_must_fit_the_prototypes(encoder_file, demo_images, tmp_path):
    with pytest.raises(UserError, match="averages k of 16 prototypes"):
        train_detector(encoder_file, demo_images.images[:64], tmp_path / "d", decoder_config=TINY_DECODER,
                       config=TrainConfig(epochs=1, batch_size=32), holdout_fraction=0.25, progress=False,
                       relative_k=20, prototypes=16)


def _summed(det, images: np.ndarray) -> np.ndarray:
    """The summed (paper's) score of the same detector: its scorer with the default score kind."""
    return Scorer(encoder=det.encoder, decoder=det.decoder, normalization=det.normalization,
                  mask_ratio=det.test_mask_ratio, mask_seed=det.mask_seed).score(images)

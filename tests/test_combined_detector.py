"""A detector trained with the combined score: z(summed) + z(relative), its scales, bundle round trip and ONNX."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_DECODER
from dede_rt.bundle import load_detector
from dede_rt.bundle.manifest import fingerprint, read_manifest, stale_exports
from dede_rt.errors import UserError
from dede_rt.scoring import Standardization
from dede_rt.training import TrainConfig, train_detector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def combined_bundle(tmp_path_factory, encoder_file, demo_images):
    out = tmp_path_factory.mktemp("combined") / "det"
    train_detector(encoder_file, demo_images.images[:256], out, decoder_config=TINY_DECODER,
                   config=TrainConfig(epochs=2, batch_size=64), holdout_fraction=0.25, progress=False,
                   score="combined", relative_k=4, prototypes=32)
    return out


def _views(det):
    """The same detector serving the summed and the relative score."""
    return replace(det, standardization=None, prototype_embeddings=None, relative_k=0), replace(det, standardization=None)


def test_combined_detector_adds_both_kinds_standardized_on_the_held_out_images(combined_bundle, demo_images):
    det = load_detector(combined_bundle)
    manifest = json.loads((combined_bundle / "manifest.json").read_text())
    assert manifest["score"]["kind"] == "combined" and manifest["score"]["relative_k"] == 4
    assert set(manifest["score"]["standardization"]) == {"summed_mean", "summed_std", "relative_mean", "relative_std"}
    summed_view, relative_view = _views(det)
    assert (summed_view.score_kind, relative_view.score_kind, det.score_kind) == ("summed", "relative", "combined")
    images = demo_images.images[300:330]
    summed, relative = summed_view.score(images), relative_view.score(images)
    assert np.allclose(det.score(images), det.standardization.combine(summed, relative), atol=1e-4)
    # the scales are the held-out images' own: on them each z has mean 0, so their combined scores do too
    calib = det.calibration_scores
    assert abs(float(calib.mean())) < 1e-4 and 0.5 < float(calib.std()) < 2.0 + 1e-4
    s = det.standardization
    assert s.summed_std > 10 * s.relative_std  # the scales differ: without them the summed error would swamp


def test_combined_detector_exports_to_onnx_with_the_same_scores(combined_bundle, demo_images, tmp_path):
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.export import export_detector

    bundle = tmp_path / "det"
    shutil.copytree(combined_bundle, bundle)
    record = export_detector(bundle)
    assert record["score_kind"] == "combined"
    det = load_detector(bundle)
    images = demo_images.images[300:340]
    with OnnxRuntimeRunner(bundle / "onnx" / "detector.onnx", 32) as runner:
        got = runner.infer(images)
    # In the relative score's units the graph is as close as the relative detector's (test_relative_detector):
    # a difference of two float32 sums of ~own size; z-scoring divides it by the relative score's clean spread.
    own = _views(det)[0].score(images)
    assert np.max(np.abs(got - det.score(images)) * det.standardization.relative_std / own) <= 1e-5
    # other scales are other graph constants: the exports are stale after they change
    assert stale_exports(bundle) is None
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["score"]["standardization"]["relative_std"] *= 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "standardization" in (stale_exports(bundle) or "")


def test_combined_detector_needs_its_scales_and_prototypes(combined_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(combined_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["score"]["standardization"]["summed_std"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="without a complete score.standardization"):
        load_detector(broken)
    det = load_detector(combined_bundle)
    with pytest.raises(UserError, match="needs prototype embeddings"):
        replace(det, prototype_embeddings=None, relative_k=0)


def test_standardization_fit_and_combine():
    rng = np.random.default_rng(0)
    summed, relative = rng.normal(1000, 100, 500), rng.normal(5, 2, 500)
    s = Standardization.fit(summed, relative)
    assert s.summed_mean == pytest.approx(summed.mean()) and s.relative_std == pytest.approx(relative.std())
    assert Standardization.from_dict(s.to_dict()) == s
    z = s.combine(np.array([1100.0]), np.array([5 + 2 * relative.std() / 2]))
    assert z[0] == pytest.approx((1100 - summed.mean()) / summed.std() + (5 + relative.std() - relative.mean())
                                 / relative.std(), rel=1e-5)
    assert Standardization.fit(np.ones(3), np.ones(3)).summed_std == 1e-12  # no spread: no division by zero


def test_summed_and_relative_bundles_keep_their_kind(tiny_detector_dir):
    assert read_manifest(tiny_detector_dir).score.kind == "summed"
    assert fingerprint(tiny_detector_dir)["score_kind"] == "summed"
    assert load_detector(tiny_detector_dir).standardization is None


def test_combined_detector_int8_keeps_the_score_tail_float(combined_bundle, demo_images, tmp_path):
    import onnx

    from dede_rt.calibration.pipeline import calibrate_detector
    from dede_rt.calibration.quantize import score_tail

    bundle = tmp_path / "det"
    shutil.copytree(combined_bundle, bundle)
    results = calibrate_detector(bundle, demo_images.images[256:576], count=128, warn=lambda _: None)
    tail, ends = score_tail(onnx.load(str(bundle / "onnx" / "detector.onnx")))
    assert len(ends) == 2 and set(ends) <= set(results["int8"]["conversion"]["excluded_nodes"])
    # the standardization's Sub/Mul are part of the tail the FP16 graph keeps in FP32
    ops = {n.name: n.op_type for n in onnx.load(str(bundle / "onnx" / "detector.onnx")).graph.node}
    assert {"Sub", "Mul"} <= {ops[n] for n in tail}
    assert set(tail) == set(results["fp16"]["conversion"]["float32_nodes"])

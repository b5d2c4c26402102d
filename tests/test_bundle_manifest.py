"""The bundle owns its manifest: typed round trip, schema migration, no lost deployment record, thresholds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dede_rt.bundle import (SCHEMA, Detector, Gate, PrecisionEntry, Thresholds, edit_manifest, load_detector,
                            read_manifest)
from dede_rt.bundle.manifest import migrate
from dede_rt.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(params=["summed", "relative"])
def v1_bundle(request, tmp_path: Path) -> Path:
    """A copy of a bundle written by the pre-restructure code (manifest format 1)."""
    out = tmp_path / f"v1_{request.param}"
    shutil.copytree(FIXTURES / f"bundle_v1_{request.param}", out)
    return out


def test_schema1_bundle_migrates_and_scores_exactly_as_before(v1_bundle: Path) -> None:
    raw = json.loads((v1_bundle / "manifest.json").read_text())
    assert raw["format"] == 1 and "score" not in raw  # really the old layout
    manifest = read_manifest(v1_bundle)
    assert manifest.schema == SCHEMA
    assert manifest.score.kind == {"reference": "summed"}.get(raw["mask"].get("score_kind", "reference"),
                                                              raw["mask"].get("score_kind"))
    assert manifest.decoder["qkv_bias"] is True  # schema-1 decoders were all built with the bias
    assert manifest.sections["training"] == raw["training"]
    det = load_detector(v1_bundle)
    # Written by the old code on another CPU: float32 sums may round differently per BLAS kernel (one ulp of a
    # ~6.5e3 summed error, 4.9e-4, seen between an Intel and an AMD host; the relative score is a difference of
    # two such sums, so it inherits that absolute error). The same machine gives equal bits.
    expected = np.load(v1_bundle / "expected_scores.npy")
    np.testing.assert_allclose(det.score(np.load(v1_bundle / "probe_images.npy")), expected, rtol=1e-6, atol=4e-3)
    # saved again, the bundle is schema 2 and still scores the same
    det.save(v1_bundle)
    assert json.loads((v1_bundle / "manifest.json").read_text())["schema"] == SCHEMA
    np.testing.assert_array_equal(load_detector(v1_bundle).score(np.load(v1_bundle / "probe_images.npy")),
                                  det.score(np.load(v1_bundle / "probe_images.npy")))


def test_migration_does_not_change_its_input_and_is_idempotent() -> None:
    raw = json.loads((FIXTURES / "bundle_v1_relative" / "manifest.json").read_text())
    before = json.dumps(raw, sort_keys=True)
    once = migrate(raw)
    assert json.dumps(raw, sort_keys=True) == before
    assert migrate(once) == once
    assert once["score"] == {"kind": "relative", "description": raw["mask"]["score"], "relative_k": 4,
                             "prototypes": 16}


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format=99), "schema 99"),
    (lambda m: m.update(kind="something-else"), "not a dede-rt detector manifest"),
    (lambda m: m.pop("mask"), "incomplete detector manifest"),
])
def test_foreign_or_broken_manifests_are_one_line_errors(v1_bundle: Path, change, message: str) -> None:
    raw = json.loads((v1_bundle / "manifest.json").read_text())
    change(raw)
    (v1_bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message):
        read_manifest(v1_bundle)


def test_corrupt_manifest_is_a_user_error(v1_bundle: Path) -> None:
    (v1_bundle / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt manifest"):
        load_detector(v1_bundle)


def test_detector_loaded_before_export_and_saved_after_keeps_the_export(tiny_detector_dir: Path, tmp_path: Path) -> None:
    """The first round's data loss: Detector.load copied `deployment` into its extras, so saving a detector
    loaded before `dede-rt export` wrote the old (empty) deployment record over the export's."""
    from dede_rt.export import export_detector

    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    det = load_detector(bundle)  # loaded before the export
    export_detector(bundle, graphs=("detector",))
    recorded = read_manifest(bundle).deployment
    assert "detector" in recorded.onnx["graphs"] and "fp32" in recorded.precisions
    det.default_fpr = 0.05  # some change worth saving
    det.save(bundle)
    after = read_manifest(bundle)
    assert after.thresholds.default_fpr == 0.05
    assert after.deployment.to_dict() == recorded.to_dict()


def test_edit_manifest_writes_typed_entries_atomically(tiny_detector_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    entry = PrecisionEntry("onnx/x.onnx", Gate(True, "labelled", "ok", {"auroc": 0.9}), {"0.01": 1.5}, {"sha256": "ab"})
    with edit_manifest(bundle) as m:
        m.deployment.precisions["int8"] = entry
    raw = json.loads((bundle / "manifest.json").read_text())["deployment"]["precisions"]["int8"]
    assert raw == {"path": "onnx/x.onnx", "sha256": "ab", "thresholds": {"0.01": 1.5},
                   "gate": {"auroc": 0.9, "passed": True, "mode": "labelled", "summary": "ok"}}
    assert read_manifest(bundle).deployment.precisions["int8"] == entry
    with pytest.raises(RuntimeError), edit_manifest(bundle) as m:  # an exception writes nothing
        m.deployment.precisions.clear()
        raise RuntimeError
    assert "int8" in read_manifest(bundle).deployment.precisions
    assert not list(bundle.glob("*.tmp"))


def test_thresholds_per_precision(tiny_detector_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    with edit_manifest(bundle) as m:
        m.deployment.precisions["fp16"] = PrecisionEntry("onnx/f.onnx", Gate(True, "clean-rank"), {"0.01": 42.0})
    manifest = read_manifest(bundle)
    det = load_detector(bundle)
    fp32 = manifest.thresholds_for("onnxruntime", "fp32", det.calibration_scores)
    assert fp32.at() == det.threshold() == manifest.thresholds.by_fpr["0.01"]
    assert fp32.at(0.2) == pytest.approx(np.quantile(det.calibration_scores.astype(np.float64), 0.8, method="higher"))
    fp16 = manifest.thresholds_for("onnxruntime", "fp16", det.calibration_scores)
    assert fp16.at(0.01) == 42.0
    with pytest.raises(UserError, match="no fp16 threshold at FPR 0.2"):
        fp16.at(0.2)  # FP32's clean scores say nothing about FP16's


def test_thresholds_from_scores_flag_rule() -> None:
    t = Thresholds.from_scores(np.arange(1000.0), (0.01, 0.05))
    assert set(t.by_fpr) == {"0.01", "0.05"} and t.fprs == (0.01, 0.05)
    assert t.at() == 990.0 and t.flag(np.arange(1000.0)).sum() == 9  # at most 1% of clean scores exceed it
    assert t.fpr_on_clean(t.at()) == 0.009 and t.fpr_on_clean(t.at(0.05)) == 0.049


def test_detector_is_keyword_only(tiny_detector_dir: Path) -> None:
    det = load_detector(tiny_detector_dir)
    with pytest.raises(TypeError):
        Detector(det.encoder, det.decoder, det.normalization, det.encoder_info)  # type: ignore[misc]


def test_decoder_has_no_qkv_bias_by_default_and_records_the_choice(tiny_detector_dir: Path) -> None:
    from dede_rt.models.decoder import DecoderConfig, DeDeDecoder

    assert DeDeDecoder(DecoderConfig()).decoder_blocks[0].attn.qkv.bias is None
    assert DeDeDecoder(DecoderConfig(qkv_bias=True)).decoder_blocks[0].attn.qkv.bias is not None
    assert read_manifest(tiny_detector_dir).decoder["qkv_bias"] is False
    assert not any("qkv.bias" in k for k in load_detector(tiny_detector_dir).decoder.state_dict())
    assert torch.is_tensor(load_detector(FIXTURES / "bundle_v1_summed").decoder.decoder_blocks[0].attn.qkv.bias)


def test_manifest_knows_the_prototype_kinds_scoring_defines() -> None:
    from dede_rt.bundle import manifest
    from dede_rt.scoring import PROTOTYPE_KINDS

    assert manifest.PROTOTYPE_KINDS == PROTOTYPE_KINDS

import json
import shutil

import numpy as np
import pytest
import torch

from dede_rt.bundle import load_detector
from dede_rt.engines.torch_runner import TorchRunner
from dede_rt.errors import IntegrityError, UserError
from dede_rt.models.encoders import save_badencoder_checkpoint
from dede_rt.models.resnet import build_resnet


def test_manifest_records_everything(tiny_detector_dir, encoder_file):
    m = json.loads((tiny_detector_dir / "manifest.json").read_text())
    assert m["encoder"]["format"] == "badencoder" and m["encoder"]["arch"] == "resnet_small"
    assert len(m["encoder"]["sha256"]) == 64 and m["encoder"]["path"] == str(encoder_file.resolve())
    assert m["normalization"] == {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.201], "image_size": 32,
                                  "resize": "squash", "resize_to": None, "interpolation": "bicubic"}
    assert m["decoder"]["patch_size"] == 4 and m["decoder"]["embed_dim"] == 128
    assert m["mask"]["train_ratio"] == 0.9 and m["mask"]["test_ratio"] == 0.99
    assert set(m["thresholds"]["by_fpr"]) == {"0.01", "0.05"} and m["thresholds"]["default_fpr"] == 0.01
    assert m["training"]["lr"] == 1e-3 and m["training"]["weight_decay"] == 1e-6 and m["training"]["seed"] == 21
    assert m["training"]["images"] == 192 and m["training"]["threshold_images"] == 64
    assert {"dede_rt", "torch", "numpy", "python"} <= set(m["versions"])
    assert (tiny_detector_dir / "decoder.safetensors").exists()


def test_round_trip_scores_and_thresholds(tiny_detector_dir, demo_images):
    det = load_detector(tiny_detector_dir)
    batch = demo_images.images[300:340]
    a, b = det.score(batch, batch_size=16), det.score(batch, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=1e-6)  # batch size changes only BLAS rounding
    with TorchRunner(tiny_detector_dir) as runner:
        np.testing.assert_allclose(runner.infer(batch), a, rtol=1e-5)
    assert det.threshold(0.01) >= det.threshold(0.05)
    assert det.threshold(0.2) == pytest.approx(np.quantile(det.calibration_scores, 0.8, method="higher"))
    assert det.flag(a).dtype == bool
    with pytest.raises(UserError, match="expected uint8 images"):
        det.score(batch[:, :16])


def test_hash_mismatch_fails_clearly(tiny_detector_dir, tmp_path):
    other = tmp_path / "other.pth"
    torch.manual_seed(123)
    save_badencoder_checkpoint(build_resnet("resnet_small"), other)
    with pytest.raises(IntegrityError, match="does not match the detector"):
        load_detector(tiny_detector_dir, encoder_path=other)


def test_wrong_embedding_width_fails_clearly(edited_bundle):
    copy = edited_bundle(lambda m: m["decoder"].update(embed_dim=512))
    with pytest.raises(UserError, match="encoder outputs 128-d embeddings but the decoder expects 512-d"):
        load_detector(copy)


def test_missing_encoder_and_embedded_copy(tiny_detector_dir, encoder_file, tmp_path, edited_bundle):
    moved = tmp_path / "moved.pth"
    shutil.copy(encoder_file, moved)
    det = load_detector(tiny_detector_dir, encoder_path=moved)
    det.encoder_info["path"] = str(moved)
    bundle = det.save(tmp_path / "embedded", embed_encoder=True)
    moved.unlink()
    assert (bundle / "encoder.pth").exists()
    assert load_detector(bundle).encoder_info["embedded"] == "encoder.pth"
    plain = edited_bundle(lambda m: m["encoder"].update(path=str(tmp_path / "gone.pth")))
    with pytest.raises(UserError, match="encoder file is missing"):
        load_detector(plain)


def test_not_a_bundle(tmp_path):
    with pytest.raises(UserError, match="not a detector bundle"):
        load_detector(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt manifest"):
        load_detector(tmp_path)

"""224-px detectors on ImageNet / CLIP encoders: the family's preprocessing end to end, the mask rule, ONNX parity.

Photos are full-size JPEGs of mixed sizes and aspect ratios; weights are random and made here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dede_rt.bundle import load_detector, read_manifest
from dede_rt.data.images import Resize, decode_image
from dede_rt.engines.comparator import compare_runners
from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
from dede_rt.engines.torch_runner import TorchRunner
from dede_rt.export import export_detector
from dede_rt.models.decoder import visible_count
from dede_rt.models.families.torchvision_family import RESNETS
from dede_rt.models.resnet import ImageNetResNet
from dede_rt.optional import importable
from dede_rt.training import TrainConfig, train_detector

DECODER = {"dim": 32, "heads": 2, "encoder_depth": 1, "decoder_depth": 1}
SIZES = [(1280, 960), (600, 900), (500, 500), (1024, 576), (333, 777), (2000, 1500)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 smooth random JPEGs, 0.25-3 MP, landscape, portrait and square."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(32):
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 255, (h // 40 + 1, w // 40 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{i:02d}.jpg", quality=88)
    return folder


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "moco_v2.pth.tar"
    state = {f"module.encoder_q.{k}": v for k, v in ImageNetResNet(RESNETS["resnet18"]).state_dict().items()}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    return path


def _train(encoder: str, photos: Path, out: Path, patch: int, **kw) -> Path:
    kw.setdefault("score", "summed")  # preprocessing and graph parity are the point here, not the score kind
    train_detector(encoder, photos, out, decoder_config={**DECODER, "patch_size": patch},
                   config=TrainConfig(epochs=1, batch_size=8), holdout_fraction=0.25, progress=False, **kw)
    return out


def test_mask_rule_at_224_px():
    """int(T * (1 - 0.99)) patches stay visible: none at 32/4 (64) and 224/32 (49), one at 224/16 (196)."""
    assert visible_count(64, 0.99) == 0 and visible_count(49, 0.99) == 0
    assert visible_count(196, 0.99) == 1 and visible_count(196, 0.9) == 19


def test_resnet_detector_at_224_uses_the_family_preprocessing(resnet18_checkpoint, photos, tmp_path):
    out = _train("torchvision:resnet18", photos, tmp_path / "det", 32, weights=resnet18_checkpoint)
    manifest = read_manifest(out)
    assert list(manifest.normalization["mean"]) == [0.485, 0.456, 0.406]
    assert manifest.pixels == Resize(224, "crop", 256, "bilinear")  # torchvision's eval transform
    assert manifest.encoder["format"] == "torchvision" and manifest.encoder["prefix"] == "module.encoder_q."
    assert manifest.decoder["image_size"] == 224 and manifest.decoder["patch_size"] == 32
    det = load_detector(out)
    image = decode_image(photos / "05.jpg", det.normalization.pixels)
    assert image.shape == (224, 224, 3)
    # the scanner's pixels for a file are the training pipeline's (one rule, stored in the bundle)
    from dede_rt.data.sources import load_images

    np.testing.assert_array_equal(load_images(photos, det.normalization.pixels).images[5], image)
    export_detector(out, exporter="torchscript", graphs=("detector",))
    assert read_manifest(out).deployment.onnx["visible_patches"] == 0
    _assert_parity(out, photos)


@pytest.mark.skipif(not importable("transformers"), reason="transformers not installed (the hf extra)")
def test_clip_detector_at_224_with_one_visible_patch(photos, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    folder = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=32, projection_dim=32)).save_pretrained(folder)
    out = _train(str(folder), photos, tmp_path / "det", 16)
    manifest = read_manifest(out)
    assert manifest.pixels == Resize(224, "crop", 224, "bicubic")  # CLIP's: shorter side to 224, centre crop
    assert list(manifest.normalization["std"]) == [0.26862954, 0.26130258, 0.27577711]
    assert manifest.encoder["embedding"] == "head"
    assert manifest.decoder["patch_size"] == 16
    export_detector(out, exporter="torchscript", graphs=("detector",))
    assert read_manifest(out).deployment.onnx["visible_patches"] == 1  # 196 patches at 0.99: one stays visible
    _assert_parity(out, photos)


NO_VISION = "does not import here: the timm / clip extras need a torchvision built for this torch (make test-vision)"


@pytest.mark.skipif(not importable("timm"), reason=f"timm {NO_VISION}")
def test_timm_vit_detector_at_224_matches_its_onnx_graph(photos, tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "dino_vit_tiny.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, weights)  # DINO's layout
    out = _train("timm:vit_tiny_patch16_224", photos, tmp_path / "det", 32, weights=weights)
    manifest = read_manifest(out)
    cfg = timm.data.resolve_model_data_config(model)
    assert list(manifest.normalization["mean"]) == list(cfg["mean"]) and manifest.encoder["prefix"] == "backbone."  # inside DINO's teacher
    assert manifest.pixels == Resize(224, "crop", int(224 / cfg["crop_pct"]), cfg["interpolation"])
    export_detector(out, exporter="torchscript", graphs=("detector",))
    _assert_parity(out, photos)


@pytest.mark.skipif(not importable("open_clip"), reason=f"open_clip {NO_VISION}")
def test_open_clip_vit_detector_at_224_matches_its_onnx_graph(photos, tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None)
    weights = tmp_path / "open_clip_vit_s32.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)  # DDP training
    out = _train("open_clip:ViT-S-32", photos, tmp_path / "det", 32, weights=weights)
    manifest = read_manifest(out)
    assert manifest.pixels == Resize(224, "crop", 224, "bicubic") and manifest.encoder["embedding"] == "head"
    assert list(manifest.normalization["std"]) == [0.26862954, 0.26130258, 0.27577711]
    for exporter in ("torchscript", "dynamo"):  # nn.MultiheadAttention: TorchScript needs its fast path off
        export_detector(out, exporter=exporter, graphs=("detector",))
        _assert_parity(out, photos)
    # ORT's optimizer breaks the TorchScript-exported tower (a rank-3 Gemm); the dynamo graph keeps its fusions
    assert "onnxruntime_fusions_skipped" not in read_manifest(out).deployment.onnx


def _assert_parity(bundle: Path, photos: Path) -> None:
    """The fused uint8 graph at the crop size scores like the torch scorer within 1e-4 relative."""
    from dede_rt.data.sources import load_images

    det = load_detector(bundle)
    images = load_images(photos, det.normalization.pixels).images[:12]
    onnx = OnnxRuntimeRunner(bundle / "onnx" / "detector.onnx", 224)
    cmp = compare_runners(TorchRunner(bundle), onnx, images, threshold=det.threshold(), batch_size=5)
    assert cmp.max_rel_diff < 1e-4, cmp
    graph = json.loads((bundle / "manifest.json").read_text())["deployment"]["onnx"]["graphs"]["detector"]
    assert graph["inputs"][0]["shape"][1:] == [224, 224, 3] and graph["inputs"][0]["dtype"] == "uint8"


def test_cli_trains_a_family_encoder_and_names_a_missing_checkpoint(resnet18_checkpoint, photos, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    proc = run_cli("train", "--encoder", "torchvision:resnet18", "--data", photos, "--out", tmp_path / "o")
    assert_one_line_error(proc, "needs --weights CHECKPOINT")
    proc = run_cli("train", "--encoder", "torchvision:resnet18", "--weights", tmp_path / "missing.pth", "--data",
                   photos, "--out", tmp_path / "o")
    assert_one_line_error(proc, "weights file not found")
    proc = run_cli("train", "--encoder", "torchvision:resnet18", "--weights", resnet18_checkpoint, "--embedding",
                   "backbone", "--data", photos, "--out", tmp_path / "det", "--epochs", "1", "--patch-size", "32",
                   "--dim", "32", "--heads", "2", "--encoder-depth", "1", "--decoder-depth", "1",
                   "--resize", "squash", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "det")
    assert manifest.pixels == Resize(224, "squash", 256, "bilinear")  # the one field given, the family's others
    assert manifest.encoder["arch"] == "resnet18" and manifest.encoder["embedding"] == "backbone"

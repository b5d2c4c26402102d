"""Encoder families: each loads from the layouts its public repositories publish (weights made here, random)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dede_rt.errors import UserError
from dede_rt.models.encoders import load_encoder, sha256_path
from dede_rt.models.families import parse_spec
from dede_rt.models.families.checkpoints import locate_weights
from dede_rt.models.families.torchvision_family import RESNETS
from dede_rt.models.resnet import ImageNetResNet
from dede_rt.optional import importable

TORCHVISION = importable("torchvision.models")
# torchvision's Linux wheels on PyPI are CUDA builds: next to the CPU torch wheel its compiled ops fail to load
# and `import torchvision` raises; timm and open_clip import torchvision, so they go with it.
NO_TORCHVISION = ("torchvision does not import here (PyPI's CUDA wheel beside the CPU torch wheel); "
                  "`make test-vision` runs these tests in a venv with a matching torch + torchvision")
HAS_TRANSFORMERS = importable("transformers")


@pytest.fixture(scope="module")
def resnet18() -> ImageNetResNet:
    torch.manual_seed(0)
    model = ImageNetResNet(RESNETS["resnet18"]).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrongly loaded one shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def _save(state: dict, path: Path, wrap: str | None = "state_dict") -> Path:
    torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    return path


def _prefixed(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix,wrap", [
    ("module.encoder_q.", "state_dict"),  # MoCo v2
    ("module.base_encoder.", "state_dict"),  # MoCo v3
    ("backbone.", None),  # SimCLR / BYOL ports
    ("module.", "model"),  # DataParallel
    ("", None),  # a bare torchvision state dict
])
def test_torchvision_resnet_layouts(resnet18, pixels, tmp_path, prefix, wrap):
    state = _prefixed(resnet18, prefix) | {prefix + "fc.weight": torch.randn(1000, 512), prefix + "fc.bias": torch.zeros(1000)}
    encoder, info = load_encoder("torchvision:resnet18", weights=_save(state, tmp_path / "ckpt.pth", wrap))
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), resnet18(pixels), rtol=0, atol=0)
    assert info["prefix"] == prefix and info["embedding"] == "backbone" and info["embed_dim"] == 512
    assert info["preprocessing"] == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "image_size": 224,
                                     "resize": "crop", "resize_to": 256, "interpolation": "bilinear"}


def test_moco_query_encoder_is_chosen_over_the_key_encoder(resnet18, pixels, tmp_path):
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in resnet18.state_dict().items()}
    state = {f"module.encoder_k.{k}": v for k, v in other.items()} | _prefixed(resnet18, "module.encoder_q.")
    encoder, info = load_encoder("torchvision:resnet18", weights=_save(state, tmp_path / "moco.pth.tar"))
    assert info["prefix"] == "module.encoder_q."
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), resnet18(pixels), rtol=0, atol=0)


def test_dino_checkpoint_reads_the_teacher(resnet18, pixels, tmp_path):
    noise = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in resnet18.state_dict().items()}
    ckpt = {"student": {f"module.backbone.{k}": v for k, v in noise.items()},
            "teacher": _prefixed(resnet18, "backbone."), "epoch": 100}
    torch.save(ckpt, tmp_path / "dino.pth")
    encoder, info = load_encoder("torchvision:resnet18", weights=tmp_path / "dino.pth")
    assert info["prefix"] == "backbone."
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), resnet18(pixels), rtol=0, atol=0)


def test_projection_heads_before_or_after(resnet18, pixels, tmp_path):
    """MoCo v2's Linear-ReLU-Linear and MoCo v3's Linear-BN-ReLU-Linear-BN(affine=False) heads, as saved."""
    v2 = {"fc.0.weight": torch.randn(256, 512), "fc.0.bias": torch.randn(256),
          "fc.2.weight": torch.randn(128, 256), "fc.2.bias": torch.randn(128)}
    v3 = {"fc.0.weight": torch.randn(256, 512), "fc.1.weight": torch.rand(256), "fc.1.bias": torch.randn(256),
          "fc.1.running_mean": torch.randn(256), "fc.1.running_var": torch.rand(256) + 0.5,
          "fc.3.weight": torch.randn(64, 256), "fc.4.running_mean": torch.randn(64),
          "fc.4.running_var": torch.rand(64) + 0.5}
    with torch.no_grad():
        feat = resnet18(pixels)
        want_v2 = torch.relu(feat @ v2["fc.0.weight"].T + v2["fc.0.bias"]) @ v2["fc.2.weight"].T + v2["fc.2.bias"]
        h = feat @ v3["fc.0.weight"].T
        h = torch.relu((h - v3["fc.1.running_mean"]) / torch.sqrt(v3["fc.1.running_var"] + 1e-5) * v3["fc.1.weight"]
                       + v3["fc.1.bias"]) @ v3["fc.3.weight"].T
        want_v3 = (h - v3["fc.4.running_mean"]) / torch.sqrt(v3["fc.4.running_var"] + 1e-5)
    for head, want in ((v2, want_v2), (v3, want_v3)):
        path = _save(_prefixed(resnet18, "module.") | {f"module.{k}": v for k, v in head.items()}, tmp_path / "c.pth")
        encoder, info = load_encoder("torchvision:resnet18", weights=path, embedding="head")
        assert info["embedding"] == "head" and info["embed_dim"] == want.shape[1]
        with torch.no_grad():
            torch.testing.assert_close(encoder(pixels), want, rtol=1e-4, atol=1e-4)
        backbone, info = load_encoder("torchvision:resnet18", weights=path)
        assert info["embed_dim"] == 512


def test_wrong_or_partial_checkpoints_fail_in_one_line(resnet18, tmp_path):
    state = _prefixed(resnet18, "module.encoder_q.")
    partial = {k: v for k, v in state.items() if "layer4" not in k}
    with pytest.raises(UserError, match=r"missing \d+ of \d+ keys: layer4\.0\.conv1\.weight"):
        load_encoder("torchvision:resnet18", weights=_save(partial, tmp_path / "partial.pth"))
    with pytest.raises(UserError, match="not a complete torchvision resnet50"):  # resnet18 weights, resnet50 asked
        load_encoder("torchvision:resnet50", weights=_save(state, tmp_path / "r18.pth"))
    with pytest.raises(UserError, match="none of the encoder's keys"):
        load_encoder("torchvision:resnet18", weights=_save({"x.weight": torch.zeros(2)}, tmp_path / "x.pth"))
    with pytest.raises(UserError, match="no projection head"):
        load_encoder("torchvision:resnet18", weights=tmp_path / "r18.pth", embedding="head")
    with pytest.raises(UserError, match="needs --weights"):
        parse_spec("torchvision:resnet18")
    with pytest.raises(UserError, match="unknown torchvision model"):
        load_encoder("torchvision:resnet7", weights=tmp_path / "r18.pth")
    with pytest.raises(UserError, match="unknown encoder family"):
        parse_spec("tf:resnet50", weights=tmp_path / "r18.pth")
    with pytest.raises(UserError, match="7x7 stem.*torchvision:resnet50"):  # a plain file of ImageNet weights
        load_encoder(_save(state, tmp_path / "plain.pth"))


def test_resnet50_layout_matches_torchvision_names(tmp_path, pixels):
    """The in-house ResNet-50 has torchvision's parameter names and shapes (checked on torchvision where it imports)."""
    model = ImageNetResNet(RESNETS["resnet50"]).eval()
    names = model.state_dict()
    assert names["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert names["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert names["conv1.weight"].shape == (64, 3, 7, 7) and len(names) == 318  # torchvision: 320 with fc.weight/bias
    if TORCHVISION:
        import torchvision

        reference = torchvision.models.resnet50(weights=None).eval()
        reference.fc = nn.Identity()
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(pixels), reference(pixels))


@pytest.mark.skipif(not TORCHVISION, reason=NO_TORCHVISION)
def test_torchvision_vit_b16(tmp_path):
    import torchvision

    reference = torchvision.models.vit_b_16(weights=None).eval()
    path = _save(_prefixed(reference, "module.base_encoder."), tmp_path / "vit.pth")
    encoder, info = load_encoder("torchvision:vit_b_16", weights=path)
    x = torch.randn(1, 3, 224, 224)
    reference.heads = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(x))
    assert info["embed_dim"] == 768


@pytest.mark.skipif(not importable("timm"), reason=f"timm does not import here (the timm extra is not installed, or its torchvision fails: {NO_TORCHVISION})")
def test_timm_by_name_with_moco_v3_prefix(tmp_path):
    import timm

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = _save(_prefixed(reference, "module.base_encoder."), tmp_path / "mocov3.pth.tar")
    encoder, info = load_encoder("timm:vit_tiny_patch16_224", weights=path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference(x))
    assert info["preprocessing"]["image_size"] == 224 and info["preprocessing"]["resize_to"] == 248  # crop_pct 0.9


@pytest.mark.skipif(not importable("open_clip"), reason=f"open_clip does not import here (the clip extra is not installed, or its torchvision fails: {NO_TORCHVISION})")
def test_open_clip_image_tower_from_a_whole_clip_checkpoint(tmp_path):
    import open_clip

    model = open_clip.create_model("RN50", pretrained=None).eval()
    path = _save({f"model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "clip.pt", wrap=None)
    encoder, info = load_encoder("open_clip:RN50", weights=path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.encode_image(x))
    assert info["prefix"] == "model.visual." and info["embedding"] == "head"
    assert info["preprocessing"]["interpolation"] == "bicubic" and info["preprocessing"]["resize_to"] == 224


def _tiny_clip_folder(path: Path, image_size: int = 64, patch: int = 16) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=24)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed (the hf extra)")
def test_hugging_face_clip_folder(tmp_path):
    folder = tmp_path / "clip"
    model = _tiny_clip_folder(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 64, "width": 64}, "size": {"shortest_edge": 72}, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    x = torch.randn(2, 3, 64, 64)
    for spec, embedding in ((str(folder), "auto"), (f"hf_clip:{folder}", "backbone")):
        encoder, info = load_encoder(spec, embedding=embedding)
        with torch.no_grad():
            out = model(pixel_values=x)
            want = out.image_embeds if embedding == "auto" else model.vision_model(pixel_values=x).pooler_output
            torch.testing.assert_close(encoder(x), want)
        assert info["format"] == "hf_clip" and info["sha256"] == sha256_path(folder)
    assert info["preprocessing"] == {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "image_size": 64,
                                     "resize": "crop", "resize_to": 72, "interpolation": "bilinear"}
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in weights if "layers.1.mlp.fc1.weight" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="missing 1 keys: .*layers.1.mlp.fc1.weight"):
        load_encoder(folder)


def test_locate_weights_finds_an_unknown_prefix():
    state = {"my_repo.net.conv1.weight": torch.zeros(1), "my_repo.net.bn1.weight": torch.zeros(1)}
    weights, prefix = locate_weights(state, ["conv1.weight", "bn1.weight"])
    assert prefix == "my_repo.net." and set(weights) == {"conv1.weight", "bn1.weight"}

"""Every encoder loader format round-trips; broken files fail with a clear UserError."""

import pytest
import torch

from dede_rt.errors import UserError
from dede_rt.models.encoders import (backbone_state_dict, infer_resnet_config, load_encoder,
                                     save_badencoder_checkpoint)
from dede_rt.models.resnet import ARCHITECTURES, build_resnet


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_resnet("resnet_small").eval()
    for mod in m.modules():  # non-trivial BN statistics so a wrong load would show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _expect(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet_small", 128)])
def test_architectures_embedding_width(arch, dim):
    m = build_resnet(arch).eval()
    assert m.embed_dim == dim
    assert infer_resnet_config(m.state_dict()) == ARCHITECTURES[arch]


def test_badencoder_layout_round_trip(model, images, tmp_path):
    path = tmp_path / "epoch120.pth"
    save_badencoder_checkpoint(model, path, epoch=120)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "state_dict"} and all(k.startswith("f.f.") for k in raw["state_dict"])
    assert "f.f.0.weight" in raw["state_dict"] and "f.f.3.0.conv1.weight" in raw["state_dict"]
    enc, info = load_encoder(path)
    assert info["format"] == "badencoder" and info["arch"] == "resnet_small" and info["embed_dim"] == 128
    torch.testing.assert_close(enc(images), _expect(model, images))


def test_badencoder_checkpoint_with_projection_head_and_dataparallel_prefix(model, images, tmp_path):
    """The real files also hold the SimCLR head g.* (ignored) and sometimes 'module.' prefixes."""
    state = {f"module.f.{k}": v for k, v in model.state_dict().items()}
    state["module.g.0.weight"] = torch.randn(512, 128)
    path = tmp_path / "drupe.pth"
    torch.save({"epoch": 1, "state_dict": state, "optimizer": {}}, path)
    enc, info = load_encoder(path, "badencoder")
    assert info["format"] == "badencoder"
    torch.testing.assert_close(enc(images), _expect(model, images))


def test_plain_state_dict_round_trip(model, images, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    enc, info = load_encoder(path)
    assert info["format"] == "state_dict"
    torch.testing.assert_close(enc(images), _expect(model, images))


def test_torchvision_and_ctrl_backbone_keys(model, images, tmp_path):
    names = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}
    tv = {}
    for k, v in model.state_dict().items():
        idx, rest = k.split(".", 2)[1], k.split(".", 2)[2]
        tv[f"{names[idx]}.{rest}"] = v
    tv["fc.weight"] = torch.randn(10, 128)
    path = tmp_path / "tv.pt"
    torch.save(tv, path)
    enc, info = load_encoder(path)
    assert info["format"] == "torchvision"
    torch.testing.assert_close(enc(images), _expect(model, images))
    ctrl = {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}
    weights, layout = backbone_state_dict(ctrl)
    assert layout == "state_dict" and set(weights) == set(model.state_dict())


def test_badencoder_format_rejects_other_layouts(model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError, match="no BadEncoder"):
        load_encoder(path, "badencoder")


def test_torchscript_round_trip(model, images, tmp_path):
    path = tmp_path / "enc.ts"
    torch.jit.trace(model, images).save(str(path))
    enc, info = load_encoder(path)
    assert info["format"] == "torchscript"
    torch.testing.assert_close(enc(images), _expect(model, images))


def test_onnx_black_box_round_trip(model, images, tmp_path):
    path = tmp_path / "enc.onnx"
    torch.onnx.export(model, (images,), str(path), input_names=["images"], output_names=["embedding"],
                      dynamic_axes={"images": {0: "n"}, "embedding": {0: "n"}}, opset_version=17, dynamo=False)
    enc, info = load_encoder(path)
    assert info["format"] == "onnx" and info["embed_dim"] == 128
    torch.testing.assert_close(enc(images), _expect(model, images), rtol=1e-4, atol=1e-4)


def test_l2_normalized_embeddings(model, images, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    enc, _ = load_encoder(path, l2_normalize=True)
    torch.testing.assert_close(enc(images).norm(dim=1), torch.ones(3))


def test_encoder_stays_frozen_in_train_mode(model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    enc, _ = load_encoder(path)
    enc.train()
    assert not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("content,message", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"\x00garbage not a pickle", "not a readable PyTorch checkpoint"),
])
def test_corrupt_checkpoints_fail_clearly(tmp_path, content, message):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_encoder(path)


def test_truncated_checkpoint_and_wrong_objects(model, tmp_path):
    good = tmp_path / "good.pth"
    save_badencoder_checkpoint(model, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_encoder(cut)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(UserError, match="expected a state dict"):
        load_encoder(tensor_file)
    other = tmp_path / "other.pt"
    torch.save({"linear.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="unrecognised checkpoint layout"):
        load_encoder(other)
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="not a loadable ONNX model"):
        load_encoder(bad_onnx)
    with pytest.raises(UserError, match="not found"):
        load_encoder(tmp_path / "missing.pth")

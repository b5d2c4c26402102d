"""Activation equalization of Conv -> Relu -> Conv chains before INT8 (calibration.equalization)."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from torch import nn  # noqa: E402

from dede_rt.calibration.equalization import equalizable_chains, equalize_activations  # noqa: E402
from dede_rt.calibration.quantize import quantize_int8  # noqa: E402


class Block(nn.Module):
    """A residual block: the stream (its input) feeds both conv1 and the skip; only conv1's ReLU is private."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        stream = torch.relu(self.stem(x))
        out = torch.relu(stream + self.conv2(torch.relu(self.conv1(stream))))
        return self.head(out).mean(dim=(2, 3))


def _export(path) -> None:
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():  # uneven channel scales: what equalization is for
        model.conv1.weight.mul_(torch.linspace(0.05, 3.0, 8).view(8, 1, 1, 1))
    torch.onnx.export(model, torch.zeros(1, 3, 12, 12), str(path), input_names=["images"], output_names=["y"],
                      dynamic_axes={"images": {0: "n"}, "y": {0: "n"}}, dynamo=False)


def _feeds(images: np.ndarray):
    return lambda: iter([{"images": images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)}])


def _run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, next(_feeds(images)()))[0]


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_equalization_is_exact_in_float_and_leaves_the_residual_stream_alone(tmp_path, alpha: float) -> None:
    _export(tmp_path / "f32.onnx")
    model = onnx.load(str(tmp_path / "f32.onnx"))
    chains = equalizable_chains(model)
    assert len(chains) == 1  # conv1 -> relu -> conv2; the stem's ReLU output also feeds the skip Add
    images = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    before = _run(model, images)
    record = equalize_activations(model, _feeds(images), alpha)
    assert record["chains"] == 1 and record["range_spread"][chains[0][2].name] > 5
    after = _run(model, images)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    # the middle activation's channel ranges are now closer together (alpha 1: all equal)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.ValueInfoProto(name=chains[0][1].output[0])])
    middle = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [chains[0][1].output[0]], next(_feeds(images)()))[0]
    ranges = middle.max(axis=(0, 2, 3))
    assert ranges.max() / ranges.min() < record["range_spread"][chains[0][2].name]
    if alpha == 1.0:
        np.testing.assert_allclose(ranges, 1.0, rtol=1e-5)


def test_quantize_int8_records_the_equalization(tmp_path) -> None:
    _export(tmp_path / "f32.onnx")
    images = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    info = quantize_int8(tmp_path / "f32.onnx", tmp_path / "q.onnx", images, quantize_head=True, equalize=0.5)
    assert info["equalization"]["chains"] == 1 and info["equalization"]["alpha"] == 0.5
    assert "equalization" not in quantize_int8(tmp_path / "f32.onnx", tmp_path / "p.onnx", images, quantize_head=True)
    with pytest.raises(ValueError, match="alpha"):
        equalize_activations(onnx.load(str(tmp_path / "f32.onnx")), _feeds(images), 1.5)

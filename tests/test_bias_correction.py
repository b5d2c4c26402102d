"""Empirical bias correction of INT8 Q/DQ graphs (calibration.bias_correction)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from torch import nn  # noqa: E402

from dede_rt.calibration.quantize import quantize_int8  # noqa: E402


def _float_graph(path) -> None:
    """A small conv net with float NCHW input (BatchNorm statistics randomized, so it folds into real biases)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.2, 2.0)
    torch.onnx.export(model.eval(), torch.zeros(1, 3, 16, 16), str(path), input_names=["images"],
                      output_names=["y"], dynamic_axes={"images": {0: "n"}, "y": {0: "n"}}, dynamo=False)


def _outputs(path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)})[0]


def test_bias_correction_removes_the_mean_int8_error(tmp_path) -> None:
    fp32 = tmp_path / "f32.onnx"
    _float_graph(fp32)
    rng = np.random.default_rng(0)
    images = (rng.random((64, 16, 16, 3)) ** 3 * 255).astype(np.uint8)  # skewed pixels: a mean error to remove
    plain = quantize_int8(fp32, tmp_path / "plain.onnx", images, quantize_head=True, headroom=1.0)
    fixed = quantize_int8(fp32, tmp_path / "fixed.onnx", images, quantize_head=True, headroom=1.0,
                          bias_correction=True)
    assert "bias_correction" not in plain
    assert fixed["bias_correction"]["layers"] == 3 and not fixed["bias_correction"]["skipped"]
    ref = _outputs(fp32, images)
    mean_error = {name: np.abs((_outputs(tmp_path / f"{name}.onnx", images) - ref).mean(axis=0)).mean()
                  for name in ("plain", "fixed")}
    assert mean_error["fixed"] < 0.5 * mean_error["plain"], mean_error
    # Same graph otherwise: only bias values changed.
    ops = [[n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node] for name in ("plain", "fixed")]
    assert ops[0] == ops[1]

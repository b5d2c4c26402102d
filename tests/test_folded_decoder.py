"""Issue 23: the folded first decoder block, ORT's transformer fusions and the decoder INT8 rule change no score.

- ``FoldedTail`` (block 1's image-independent work precomputed) scores like ``ScoreTail`` on random weights,
  with and without qkv bias, for the summed and the relative kinds (<= 1e-5 relative);
- the folded ONNX graph equals the unfolded one, and the ORT-fused graph equals the unfused one;
- the cut at the embedding gives the encoder's embedding;
- INT8 quantizes the decoder's weight GEMMs but not attention's activation products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder
from dede_rt.scoring import RelativeError, RelativeReference, Scorer, TestMask
from dede_rt.scoring.folded import FoldedTail, fold_first_block

EMBED = 24
SMALL = {"embed_dim": EMBED, "dim": 48, "heads": 3, "encoder_depth": 1, "decoder_depth": 3}


def _decoder(qkv_bias: bool, seed: int = 0) -> DeDeDecoder:
    """A random decoder whose LayerNorms, positions and mask token are far from their init (nothing trivial)."""
    torch.manual_seed(seed)
    dec = DeDeDecoder(DecoderConfig(**SMALL, qkv_bias=qkv_bias)).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return dec


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, EMBED),
                         nn.Tanh()).eval()


def _scorers(qkv_bias: bool, kind: str) -> tuple[Scorer, Scorer]:
    dec, enc = _decoder(qkv_bias), _encoder()
    mask = TestMask(dec.config.num_patches)
    made = []
    for folded in (False, True):
        score_kind = None
        if kind == "relative":
            protos = torch.randn(16, EMBED, generator=torch.Generator().manual_seed(3))
            score_kind = RelativeError(RelativeReference.from_embeddings(dec, protos, k=4), mask.masked, exact=False)
        made.append(Scorer(encoder=enc, decoder=dec, normalization=Normalization(), kind=score_kind, mask=mask,
                           folded=folded).eval())
    return made[0], made[1]


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _rel(got: np.ndarray, ref: np.ndarray, scale: np.ndarray | None = None) -> float:
    scale = np.abs(ref) if scale is None else np.maximum(np.abs(ref), scale)
    return float(np.max(np.abs(got - ref) / scale))


def test_folded_decoder_hidden_states_match(one_torch_thread) -> None:
    for bias in (False, True):
        dec = _decoder(bias)
        z = 2.0 * torch.randn(9, EMBED, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref, got = dec.decode_hidden(z), fold_first_block(dec)(z)
        assert got.shape == ref.shape
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, (bias, err)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("kind", ["summed", "relative"])
def test_folded_scores_unchanged(qkv_bias: bool, kind: str, one_torch_thread) -> None:
    plain, folded = _scorers(qkv_bias, kind)
    assert isinstance(folded.tail, FoldedTail) and not isinstance(plain.tail, FoldedTail)
    images = _images()
    ref, got = plain.score(images), folded.score(images)
    # the relative score is a difference of two errors: relative to the own error, which sets float32's rounding
    scale = None
    if kind == "relative":
        summed, _ = _scorers(qkv_bias, "summed")
        scale = summed.score(images)
    assert _rel(got, ref, scale) <= 1e-5


def test_folding_needs_the_zero_visible_mask() -> None:
    dec = _decoder(False)
    with pytest.raises(ValueError, match="zero-visible"):
        FoldedTail(dec, TestMask(dec.config.num_patches, mask_ratio=0.75))
    # Scorer(folded=True) keeps the plain tail where patches stay visible
    scorer = Scorer(encoder=_encoder(), decoder=dec, normalization=Normalization(), mask_ratio=0.75, folded=True)
    assert not isinstance(scorer.tail, FoldedTail) and scorer.visible_patches == 16


def _export(module: nn.Module, path: Path) -> Path:
    from dede_rt.export.onnx_export import _export_module

    u8 = torch.from_numpy(_images(2, seed=5))
    _export_module(module, (u8,), path, ["images"], ["scores"], "torchscript")
    return path


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unfolded, folded and folded + ORT-fused graphs of one random detector (qkv bias on)."""
    from dede_rt.export.ort_fusions import optimize_for_onnxruntime

    out = tmp_path_factory.mktemp("folded")
    plain, folded = _scorers(True, "summed")
    paths = {"plain": _export(plain, out / "plain.onnx"), "folded": _export(folded, out / "folded.onnx")}
    cfg = plain.tail.decoder.config
    paths["fused_info"] = optimize_for_onnxruntime(paths["folded"], out / "fused.onnx", cfg.heads, cfg.dim)
    paths["fused"] = out / "fused.onnx"
    paths["torch"] = folded
    return paths


def test_folded_graph_equals_unfolded_graph(graphs) -> None:
    images = _images(20, seed=2)
    plain, folded = _run(graphs["plain"], images), _run(graphs["folded"], images)
    assert _rel(folded, plain) <= 1e-5
    # the folded graph really lost block 1's patch attention: one fewer full softmax over T+1 keys
    ops = [n.op_type for n in onnx.load(str(graphs["folded"])).graph.node]
    assert "Sigmoid" in ops


def test_fused_graph_equals_unfused_and_torch(graphs) -> None:
    info = graphs["fused_info"]["fusions"]
    assert info["MultiHeadAttention"] == SMALL["decoder_depth"] - 1  # blocks 2.. (block 1 is folded)
    assert info.get("BiasGelu", 0) == SMALL["decoder_depth"]
    ops = [n.op_type for n in onnx.load(str(graphs["fused"])).graph.node]
    assert "Erf" not in ops and ops.count("Softmax") == 1  # only the folded block's global row
    images = _images(20, seed=3)
    unfused, fused = _run(graphs["folded"], images), _run(graphs["fused"], images)
    assert _rel(fused, unfused) <= 1e-5
    ref = graphs["torch"].score(images)
    assert _rel(fused, ref) <= 1e-4


def test_cut_at_embedding_gives_the_encoder(graphs, tmp_path: Path) -> None:
    from dede_rt.export.cut import cut_encoder

    scorer = graphs["torch"]
    weight = scorer.tail.decoder.project.weight.detach().numpy()
    path = cut_encoder(graphs["fused"], tmp_path / "enc.onnx", weight)
    images = _images(6, seed=4)
    with torch.no_grad():
        ref = scorer.encoder(scorer.normalize(torch.from_numpy(images))).numpy()
    got = _run(path, images)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_int8_quantizes_weight_gemms_not_attention(graphs, tmp_path: Path) -> None:
    from dede_rt.calibration.quantize import activation_matmuls, quantize_int8

    pre = onnx.load(str(graphs["fused"]))
    skipped = set(activation_matmuls(pre))
    assert skipped, "the folded block's constant products are not weight GEMMs"
    calib = _images(64, seed=6)
    info = quantize_int8(graphs["fused"], tmp_path / "int8.onnx", calib, headroom=1.0)
    q = onnx.load(str(tmp_path / "int8.onnx"))
    assert info["decoder_rules"]
    # every weight MatMul of the decoder reads a dequantized weight; attention stays in MultiHeadAttention (float)
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    weight_mm = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in dq_out]
    assert len(weight_mm) >= 4 * (SMALL["decoder_depth"] - 1)
    assert all(n.name not in {m.name for m in weight_mm} for n in q.graph.node if n.name in skipped)
    assert "MultiHeadAttention" in [n.op_type for n in q.graph.node]
    images = _images(40, seed=7)
    ref, got = _run(graphs["fused"], images), _run(tmp_path / "int8.onnx", images)
    assert _rel(got, ref) < 0.05, _rel(got, ref)  # random weights + random images: no ranking to keep


def test_ort_fusion_leaves_a_vit_victims_attention_alone(tmp_path: Path) -> None:
    """A ViT victim's attention (3 heads) next to the decoder's (2 heads): only the decoder's is fused.

    Fusing both with the decoder's head count (what the fusion did before it matched the decoder's QKV weights)
    changes the victim's embedding; the check below sees that as a score difference.
    """
    from dede_rt.export.onnx_export import _export_module, decoder_qkv_weights
    from dede_rt.export.ort_fusions import optimize_for_onnxruntime
    from dede_rt.models.decoder import Block

    torch.manual_seed(0)
    model = nn.Sequential(Block(24, 3, 4.0), Block(24, 2, 4.0)).eval()  # victim ViT block, then a decoder block
    x = torch.randn(4, 5, 24)
    src = tmp_path / "two.onnx"
    _export_module(model, (x,), src, ["tokens"], ["out"], "torchscript")
    with torch.no_grad():
        ref = model(x).numpy()

    def run(path: Path) -> np.ndarray:
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tokens": x.numpy()})[0]

    scale = np.abs(ref).max()  # relative to the activations' range (elementwise, values near 0 dominate)
    every = optimize_for_onnxruntime(src, tmp_path / "every.onnx", 2, 24)
    assert every["fusions"]["MultiHeadAttention"] == 2 and _rel(run(tmp_path / "every.onnx"), ref, scale) > 1e-2
    only = optimize_for_onnxruntime(src, tmp_path / "only.onnx", 2, 24, qkv_weights=decoder_qkv_weights(model[1]))
    assert only["fusions"]["MultiHeadAttention"] == 1 and _rel(run(tmp_path / "only.onnx"), ref, scale) <= 1e-5

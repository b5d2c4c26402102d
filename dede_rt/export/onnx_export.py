"""Export a detector bundle to ONNX: fused ``detector.onnx`` plus ``encoder.onnx`` and ``decoder.onnx``.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript),
the exporter torch maintains; the TorchScript-based one is deprecated. On
these models dynamo gives a much smaller graph (BatchNorm folded into Conv,
constants folded by its onnxscript optimizer: 93 vs 197 nodes on a small
ResNet + decoder) at opset 18, its native opset (down-conversion to 17 fails
in the ONNX version converter on its Reduce* nodes). If dynamo cannot export
a model, the TorchScript exporter (``dynamo=False``, opset 17, constant
folding on) is used instead and the manifest says so.

Black-box ONNX encoders are never re-exported: ``normalize.onnx`` +
the user's encoder + ``decoder.onnx`` are spliced with ``onnx.compose``.

Files (under ``BUNDLE/onnx/``), all with a dynamic batch dimension:
- ``detector.onnx``       images uint8 [N,H,W,3] -> scores float32 [N]
- ``detector_nchw.onnx``  images float32 [N,3,H,W] in [0,1] -> scores [N]
- ``encoder.onnx``        normalized float32 [N,3,H,W] -> embedding [N,D]
- ``decoder.onnx``        (normalized images, embedding) -> scores [N]
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dede_rt.bundle import Detector, Gate, PrecisionEntry, edit_manifest, fingerprint, load_detector
from dede_rt.errors import UserError
from dede_rt.export.ort_fusions import optimize_for_onnxruntime
from dede_rt.models.encoders import sha256_file
from dede_rt.scoring import Normalize, Scorer

ONNX_DIR = "onnx"
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
MAX_BATCH = 65536
ALL_GRAPHS = ("detector", "detector_nchw", "encoder", "decoder")
# Made from the exported graphs by calibration / the TensorRT builder; void when the graphs change.
DERIVED_GRAPHS = ("detector_int8.onnx", "detector_fp16.onnx", "detector_nchw_fp16.onnx", "detector_nchw_int8_trt.onnx")


@contextmanager
def _mha_fast_path(enabled: bool) -> Iterator[None]:
    """Switch nn.MultiheadAttention's fused inference path: in eval mode it calls aten::_native_multi_head_attention,
    which the TorchScript exporter cannot translate (OpenCLIP's ViT towers are built on nn.MultiheadAttention)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _export_module(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                   output_names: list[str], exporter: str) -> str:
    """Export with dynamo (falling back to TorchScript when ``exporter='auto'``); returns the exporter used."""
    module = module.eval()
    if exporter in ("auto", "dynamo"):
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        names = list(module.forward.__code__.co_varnames[1 : 1 + len(example)])
        chatter = logging.getLogger("torch.onnx")  # torchvision-op registration warnings, not our concern
        level = chatter.level
        try:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                chatter.setLevel(logging.ERROR)
                torch.onnx.export(module, example, str(path), input_names=input_names, output_names=output_names,
                                  opset_version=DYNAMO_OPSET, dynamo=True, external_data=False,
                                  dynamic_shapes={n: {0: batch} for n in names})
            return "dynamo"
        except Exception as exc:
            if exporter == "dynamo":
                raise UserError(f"dynamo ONNX export failed: {str(exc).splitlines()[0][:200]}") from None
        finally:
            chatter.setLevel(level)
    axes = {n: {0: "batch"} for n in input_names + output_names}
    with warnings.catch_warnings(), _mha_fast_path(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=input_names, output_names=output_names,
                          opset_version=TORCHSCRIPT_OPSET, dynamo=False, do_constant_folding=True, dynamic_axes=axes)
    return "torchscript"


def check_and_infer(path: Path) -> onnx.ModelProto:
    """onnx.checker (full check) + shape inference, written back so every value has a shape."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise UserError(f"{path}: exported graph fails the ONNX checker ({str(exc).splitlines()[0][:200]})") from None
    onnx.save(model, str(path))
    return model


def _io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def _harmonize(a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Bring two models to one default-domain opset and IR version so onnx.compose can merge them."""
    def opset(m: onnx.ModelProto) -> int:
        return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))

    target = max(opset(a), opset(b))
    a = a if opset(a) == target else onnx.version_converter.convert_version(a, target)
    b = b if opset(b) == target else onnx.version_converter.convert_version(b, target)
    ir = max(a.ir_version, b.ir_version)
    a.ir_version = b.ir_version = ir
    return a, b


def splice_onnx_encoder(normalize: onnx.ModelProto, encoder: onnx.ModelProto, score: onnx.ModelProto) -> onnx.ModelProto:
    """normalize (images -> x) ∘ black-box encoder (x -> z) ∘ score (x, z -> scores), via onnx.compose."""
    if len(encoder.graph.input) != 1 or len(encoder.graph.output) < 1:
        raise UserError("an ONNX encoder must have exactly one input and at least one output")
    # Two copies of x leave the normalize graph: one feeds the encoder, one the score graph.
    g = normalize.graph
    g.node.append(onnx.helper.make_node("Identity", ["x"], ["x_for_score"], name="x_for_score"))
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(next(o for o in g.output if o.name == "x"))
    copy.name = "x_for_score"
    g.output.append(copy)
    # Distinct prefixes: the exporters reuse edge names (val_0, permute, ...) across graphs.
    normalize = onnx.compose.add_prefix(normalize, "normalize/", rename_inputs=False)
    encoder = onnx.compose.add_prefix(encoder, "encoder/")
    score = onnx.compose.add_prefix(score, "score/", rename_outputs=False)
    enc_in, enc_out = encoder.graph.input[0].name, encoder.graph.output[0].name
    normalize, encoder = _harmonize(normalize, encoder)
    front = onnx.compose.merge_models(normalize, encoder, io_map=[("normalize/x", enc_in)],
                                      outputs=["normalize/x_for_score", enc_out])
    front, score = _harmonize(front, score)
    s_images, s_embed = (i.name for i in score.graph.input)
    return onnx.compose.merge_models(front, score, io_map=[("normalize/x_for_score", s_images), (enc_out, s_embed)])


def decoder_qkv_weights(decoder: nn.Module) -> list[np.ndarray]:
    """The decoder's attention QKV weights as exported MatMul operands ([C, 3C]): which attentions ORT may fuse."""
    return [m.qkv.weight.detach().float().t().contiguous().numpy() for m in decoder.modules()
            if hasattr(m, "qkv") and isinstance(m.qkv, nn.Linear)]


def _fuse_checked(path: Path, det: Detector) -> dict:
    """ORT's transformer fusions on ``path``, kept only if ORT loads the result and it scores like torch.

    An optimisation only: when the optimizer cannot handle a victim's graph (seen: OpenCLIP ViT towers through
    the TorchScript exporter, whose out-projection Gemm it fed a rank-3 input ORT refuses), the plain graph stays.
    The check is ``verify_parity``'s (its scale suits the relative score, a difference of two errors).
    """
    cfg = det.decoder.config
    fused = path.with_name(path.stem + ".fused.onnx")
    try:
        info = optimize_for_onnxruntime(path, fused, cfg.heads, cfg.dim, qkv_weights=decoder_qkv_weights(det.decoder))
        verify_parity(det, fused, count=4, seed=1)
    except Exception as exc:
        fused.unlink(missing_ok=True)
        return {"fusions": {}, "error": str(exc).splitlines()[0][:200]}
    fused.replace(path)
    return info


def export_detector(bundle: str | Path, exporter: str = "auto", *, encoder_path: str | Path | None = None,
                    verify: bool = True, graphs: tuple[str, ...] = ALL_GRAPHS) -> dict:
    """Write the ONNX graphs of a detector bundle into ``BUNDLE/onnx/`` and record them in its manifest.

    ``graphs`` limits the export (the fused ``detector`` graph is always written).
    """
    wanted = set(graphs) | {"detector"}
    unknown = wanted - set(ALL_GRAPHS)
    if unknown:
        raise UserError(f"unknown graph(s) {sorted(unknown)}; choose from {', '.join(ALL_GRAPHS)}")
    bundle = Path(bundle)
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise UserError(f"unknown exporter {exporter!r}; choose auto, dynamo or torchscript")
    det = load_detector(bundle, encoder_path)
    out = bundle / ONNX_DIR
    out.mkdir(exist_ok=True)
    size = det.normalization.image_size
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=g)
    x = det.normalization.apply(u8)
    with torch.no_grad():
        z = det.encoder(x)
    # Exported graphs use the score kinds' float32 form (no float64 on TensorRT); verify_parity checks it.
    # folded: with no visible test patch, decoder block 1's image-independent work is precomputed (exact).
    fused_u8 = Scorer.from_detector(det, exact=False, folded=True)
    score = fused_u8.tail
    used = {}
    if "decoder" in wanted or det.encoder_info["format"] == "onnx":
        used["decoder"] = _export_module(score, (x, z), out / "decoder.onnx", ["images", "embedding"], ["scores"], exporter)
    if det.encoder_info["format"] == "onnx":
        used["normalize"] = _export_module(Normalize(det.normalization), (u8,), out / "normalize.onnx",
                                           ["images"], ["x"], exporter)
        enc_src = Path(det.encoder.backbone.path)
        onnx.save(onnx.load(str(enc_src)), str(out / "encoder.onnx"))
        fused = splice_onnx_encoder(onnx.load(str(out / "normalize.onnx")), onnx.load(str(enc_src)),
                                    onnx.load(str(out / "decoder.onnx")))
        onnx.save(fused, str(out / "detector.onnx"))
        used["detector"] = "onnx.compose splice"
        nchw = Normalize(det.normalization, uint8_input=False)
        used["normalize_nchw"] = _export_module(nchw, (x,), out / "normalize_nchw.onnx", ["images"], ["x"], exporter)
        fused_f = splice_onnx_encoder(onnx.load(str(out / "normalize_nchw.onnx")), onnx.load(str(enc_src)),
                                      onnx.load(str(out / "decoder.onnx")))
        onnx.save(fused_f, str(out / "detector_nchw.onnx"))
        used["detector_nchw"] = "onnx.compose splice"
    else:
        if "encoder" in wanted:
            used["encoder"] = _export_module(det.encoder, (x,), out / "encoder.onnx", ["images"], ["embedding"], exporter)
        used["detector"] = _export_module(fused_u8, (u8,), out / "detector.onnx", ["images"], ["scores"], exporter)
        fused_f = Scorer.from_detector(det, uint8_input=False, exact=False, folded=True)
        pixels = u8.permute(0, 3, 1, 2).float() / 255.0
        if "detector_nchw" in wanted:
            used["detector_nchw"] = _export_module(fused_f, (pixels,), out / "detector_nchw.onnx", ["images"], ["scores"],
                                                   exporter)
    # detector.onnx is ONNX Runtime's graph: its transformer fusions (contrib ops; TensorRT reads detector_nchw).
    ort_fusions = _fuse_checked(out / "detector.onnx", det)
    graphs = {}
    for name in ALL_GRAPHS:
        path = out / f"{name}.onnx"
        spliced_encoder = name == "encoder" and det.encoder_info["format"] == "onnx"
        if name not in used and not spliced_encoder:
            continue
        model = onnx.load(str(path)) if spliced_encoder else check_and_infer(path)
        inputs, outputs = _io(model)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        graphs[name] = {"path": f"{ONNX_DIR}/{name}.onnx", "sha256": sha256_file(path), "exporter": used.get(name),
                        "opset": opset, "inputs": inputs, "outputs": outputs, "nodes": len(model.graph.node)}
    record = {"graphs": graphs, "torch": torch.__version__, "onnx": onnx.__version__,
              "test_mask_ratio": det.test_mask_ratio, "mask_seed": det.mask_seed,
              "visible_patches": fused_u8.visible_patches, "score_kind": det.score_kind,
              "decoder_folded": fused_u8.visible_patches == 0, "onnxruntime_fusions": ort_fusions["fusions"],
              **({"onnxruntime_fusions_skipped": ort_fusions["error"]} if "error" in ort_fusions else {}),
              **({"relative_k": det.relative_k} if det.relative is not None else {}),
              "source": fingerprint(bundle)}
    if verify:
        record["parity"] = verify_parity(det, out / "detector.onnx")
    with edit_manifest(bundle) as manifest:
        dep = manifest.deployment
        if dep.onnx.get("source") != record["source"]:
            # New weights or mask: everything derived from the old graphs is void.
            for derived in DERIVED_GRAPHS:
                (out / derived).unlink(missing_ok=True)
            dep.clear_derived()
        dep.onnx = record
        dep.precisions["fp32"] = PrecisionEntry(
            graphs["detector"]["path"], Gate(True, "reference", "FP32 reference"), dict(det.thresholds),
            {"sha256": graphs["detector"]["sha256"]})
    return record


def verify_parity(det: Detector, model_path: Path, count: int = 16, seed: int = 0, rtol: float = 1e-3) -> dict:
    """Score ``count`` seeded random images with torch and the exported graph; fail past ``rtol``.

    The difference is relative to the image's score or, for the relative score (a difference of two errors that
    can sit near zero), to the larger of it and the image's own reconstruction error, which sets float32's rounding.
    """
    from dede_rt.engines.comparator import compare_scores
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner

    size = det.normalization.image_size
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    ref = det.score(images)
    with OnnxRuntimeRunner(model_path, size, providers=["CPUExecutionProvider"]) as runner:
        got = runner.infer(images)
    scale = None
    if det.relative is not None:
        summed = Scorer(encoder=det.encoder, decoder=det.decoder, normalization=det.normalization,
                        mask_ratio=det.test_mask_ratio, mask_seed=det.mask_seed)
        scale = summed.score(images)
    c = compare_scores(ref, got, names=("torch", "onnx"), scale=scale)
    if c.max_rel_diff > rtol:
        raise UserError(f"{model_path}: exported scores differ from torch by {c.max_rel_diff:.2e} relative "
                        f"(> {rtol:g})")
    return {"images": count, "max_rel_diff": c.max_rel_diff, "max_abs_diff": c.max_abs_diff}

"""Mixed-precision INT8: encoder layers ranked by their own AUROC cost, the costliest left float until the gate passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dede_rt.calibration.gate import GateTolerance
from dede_rt.calibration.mixed import search_mixed, split_triggered
from dede_rt.calibration.pipeline import _project_weight, _scores, calibrate_detector
from dede_rt.calibration.quantize import encoder_weight_nodes, quantize_int8
from dede_rt.data.triggers import white_square
from dede_rt.errors import UserError
from dede_rt.export import export_detector

STRICT = GateTolerance(auroc_drop=0.0, tpr_drop=0.0)  # only a graph that detects as well as FP32 passes
NEVER = GateTolerance(auroc_drop=-1.0)  # no graph passes: the search runs to its end


@pytest.fixture(scope="module")
def exported(tiny_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory, demo_images):
    """The tiny detector's FP32 graph, clean images (ranges, held-out) and white-square triggered ones."""
    bundle = tmp_path_factory.mktemp("mixed") / "det"
    shutil.copytree(tiny_detector_dir, bundle)
    export_detector(bundle, exporter="torchscript", graphs=("detector",), verify=False)
    pool = np.random.default_rng(1).permutation(np.arange(256, len(demo_images)))
    images = demo_images.images
    return bundle, images[pool[:96]], images[pool[96:256]], white_square().stamp(images[pool[256:416]])


def _float_weight_convs(path: Path) -> set[str]:
    """Conv/MatMul/Gemm nodes whose weight is a float initializer (no DequantizeLinear in front)."""
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in inits}


def test_triggered_halves_are_disjoint_and_cover_all() -> None:
    sel, gate = split_triggered(11)
    assert not set(sel) & set(gate) and sorted([*sel, *gate]) == list(range(11)) and len(sel) - len(gate) == 1


def test_encoder_layers_are_the_convs_before_the_embedding(exported) -> None:
    bundle, *_ = exported
    model = onnx.load(str(bundle / "onnx" / "detector.onnx"))
    layers = encoder_weight_nodes(model, _project_weight(bundle))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[n] for n in layers} == {"Conv"}  # the tiny victim is a ResNet: no decoder GEMM among them


def test_keep_float_leaves_named_layers_float_and_rejects_unknown_names(exported, tmp_path: Path) -> None:
    bundle, ranges, *_ = exported
    fp32 = bundle / "onnx" / "detector.onnx"
    layers = encoder_weight_nodes(onnx.load(str(fp32)), _project_weight(bundle))
    quantize_int8(fp32, tmp_path / "all.onnx", ranges)
    quantize_int8(fp32, tmp_path / "mixed.onnx", ranges, keep_float=tuple(layers[:2]))
    assert not set(layers) & _float_weight_convs(tmp_path / "all.onnx")
    assert set(layers) & _float_weight_convs(tmp_path / "mixed.onnx") == set(layers[:2])
    with pytest.raises(UserError, match="keep_float"):
        quantize_int8(fp32, tmp_path / "x.onnx", ranges, keep_float=("no_such_node",))


def test_search_ranks_layers_and_keeps_the_fewest_float_that_pass(exported, tmp_path: Path) -> None:
    bundle, ranges, held, triggered = exported
    fp32 = bundle / "onnx" / "detector.onnx"
    layers = encoder_weight_nodes(onnx.load(str(fp32)), _project_weight(bundle))
    out = tmp_path / "int8.onnx"
    result = search_mixed(fp32, out, ranges, held, triggered, lambda p, x: _scores(p, 32, "int8", x),
                          headroom=2.0, max_float=len(layers), tol=STRICT, require_faster=False,
                          project_weight=_project_weight(bundle))
    assert set(result.layer_cost) == set(layers) and all(np.isfinite(list(result.layer_cost.values())))
    assert result.found and out.exists(), result.tries
    k = len(result.float_layers)
    assert len(result.tries) == k and result.tries[-1]["passed"] and not any(t["passed"] for t in result.tries[:-1])
    costs = [result.layer_cost[n] for n in result.float_layers]
    assert costs == sorted(costs, reverse=True)  # the costliest first
    assert min(costs) >= max((c for n, c in result.layer_cost.items() if n not in result.float_layers), default=-1)
    assert set(layers) & _float_weight_convs(out) == set(result.float_layers)
    assert set(result.images_per_second) == {"fp32", "mixed"}
    # the try that passed did so by its bootstrap bound too, not only by its measured drop
    assert result.gate["auroc_drop_bound"] <= STRICT.auroc_drop and "at 90%" in result.tries[-1]["summary"]


def test_calibrate_records_the_search_when_int8_fails_its_gate(exported, tmp_path: Path) -> None:
    bundle, ranges, held, triggered = exported
    copy = tmp_path / "det"
    shutil.copytree(bundle, copy)
    clean = np.concatenate([ranges, held])
    results = calibrate_detector(copy, clean, triggered=triggered, count=len(ranges), precisions=("int8",),
                                 tol=NEVER, warn=lambda _: None)
    conversion = results["int8"]["conversion"]
    assert "mixed_precision" in conversion, "a failed labelled gate starts the search"
    record = conversion["mixed_precision"]
    assert record["tries"] and set(record["layer_auroc_cost"]) == set(encoder_weight_nodes(
        onnx.load(str(copy / "onnx" / "detector.onnx")), _project_weight(copy)))
    layers = len(record["layer_auroc_cost"])
    assert not record["found"] and len(record["tries"]) == max(1, layers // 2)  # up to half the layers float
    assert not results["int8"]["gate"]["passed"] and "keep_float" not in conversion
    assert (copy / results["int8"]["path"]).exists()  # the plain INT8 graph stays, refused by its gate
    off = calibrate_detector(copy, clean, triggered=triggered, count=len(ranges), precisions=("int8",),
                             tol=NEVER, warn=lambda _: None, mixed=False)
    assert "mixed_precision" not in off["int8"]["conversion"] and not off["int8"]["gate"]["passed"]


def test_search_is_skipped_for_too_few_triggered_examples_or_too_many_layers(exported, tmp_path: Path) -> None:
    bundle, ranges, held, triggered = exported
    fp32 = bundle / "onnx" / "detector.onnx"
    scores = lambda p, x: _scores(p, 32, "int8", x)  # noqa: E731
    few = search_mixed(fp32, tmp_path / "a.onnx", ranges, held, triggered[:5], scores, headroom=2.0,
                       project_weight=_project_weight(bundle))
    many = search_mixed(fp32, tmp_path / "b.onnx", ranges, held, triggered, scores, headroom=2.0,
                        project_weight=_project_weight(bundle), max_layers=1)
    for result, reason in ((few, "triggered examples"), (many, "encoder layers")):
        assert not result.found and not result.tries and reason in result.skipped
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()

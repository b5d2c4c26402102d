"""Where a detector's INT8 quality goes, and what would win it back: calibration settings, per-layer sensitivity
and sensitivity-chosen mixed precision, each with its ORT CPU throughput.

Subject: a detector trained by `dede-rt demo` (the demo victim; the default relative score). Its INT8 graph
loses ~0.02 AUROC and fails the labelled gate (`demo_default_quality.json`), where the summed-score demo
detector lost nothing. Three disjoint sets from the demo's seeded splits, so nothing is chosen on what it is
judged on:
  - selection: the 256 clean calibration images (which also set the INT8 ranges) + their white-square copies
    (non-target classes): per-layer sensitivity is measured here;
  - gate: the other clean calibration images + their white-square copies: the labelled quality gate
    (calibration.gate.quality_gate, default tolerance), as `dede-rt calibrate --triggered` would run it;
  - test: the demo's 400 clean test images + their white-square copies: reported only.
Rows: FP32; INT8 under each calibration setting (bias correction on and off, activation equalization among them); INT8 with one encoder
layer quantized at a time (the rest float: the layer's own cost); INT8 with the k most costly layers (on the
selection set) left float, with and without bias correction.

    python benchmarks/int8_sensitivity.py --detector demo-output/detector     # writes results/int8_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dede_rt.calibration.gate import quality_gate
from dede_rt.calibration.mixed import images_per_second
from dede_rt.calibration.quantize import QUANTIZED_OPS, encoder_weight_nodes, quantize_int8
from dede_rt.calibration.sets import split_calibration
from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import white_square
from dede_rt.demo import TARGET_CLASS, DemoSettings, demo_splits
from dede_rt.engines.comparator import run_batched
from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
from dede_rt.metrics import detection_report

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # name -> quantize_int8 keyword arguments (the product's default first)
    "default (minmax, headroom 2)": {},
    "minmax, headroom 1": {"headroom": 1.0},
    "minmax, headroom 4": {"headroom": 4.0},
    "entropy, headroom 2": {"method": "entropy"},
    "percentile, headroom 2": {"method": "percentile"},
    "minmax, headroom 2, bias correction": {"bias_correction": True},
    "minmax, headroom 2, equalized (alpha 0.5)": {"equalize": 0.5},
    "minmax, headroom 2, equalized (alpha 1)": {"equalize": 1.0},
}


def labelled(clean: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clean images and white-square copies of the non-target ones, with labels 0 / 1."""
    triggered = white_square().stamp(clean[labels != TARGET_CLASS])
    return np.concatenate([clean, triggered]), np.r_[np.zeros(len(clean), int), np.ones(len(triggered), int)]


class Sets:
    """The demo's selection / gate / test sets (images, labels)."""

    def __init__(self) -> None:
        data, _, cal_idx, test_idx = demo_splits(DemoSettings(), Normalization())
        cal, cal_labels = data.images[cal_idx], data.labels[cal_idx]
        ranges_idx, gate_idx = split_calibration(len(cal), 256, 0, cal_labels)
        self.ranges = cal[ranges_idx]
        self.selection = labelled(cal[ranges_idx], cal_labels[ranges_idx])
        self.gate = labelled(cal[gate_idx], cal_labels[gate_idx])
        self.test = labelled(data.images[test_idx], data.labels[test_idx])


def scores(path: Path, precision: str, images: np.ndarray) -> np.ndarray:
    """ORT CPU scores of one graph."""
    with OnnxRuntimeRunner(path, images.shape[1], precision, providers=["CPUExecutionProvider"]) as runner:
        return run_batched(runner, images, 128)


def evaluate(path: Path, precision: str, sets: Sets, ref: dict | None) -> dict:
    """Selection/test AUROC, TPR at 1 % FPR, and the labelled gate against FP32 (``ref``: FP32's scores)."""
    got = {name: scores(path, precision, getattr(sets, name)[0]) for name in ("selection", "gate", "test")}
    row = {}
    for name in ("selection", "test"):
        images, labels = getattr(sets, name)
        clean = got[name][labels == 0]
        report = detection_report(labels, got[name], float(np.quantile(clean, 0.99)))
        row[name] = {"auroc": report["auroc"], "tpr_at_fpr_0.01": report["tpr_at_fpr_0.01"]}
    if ref is not None:
        labels = sets.gate[1]
        ref_clean, got_clean = ref["gate"][labels == 0], got["gate"][labels == 0]
        gate = quality_gate(ref_clean, got_clean, float(np.quantile(ref_clean, 0.99)),
                            float(np.quantile(got_clean, 0.99)), labels, ref["gate"], got["gate"])
        row["gate"] = {k: gate[k] for k in ("passed", "auroc_drop", "tpr_drop", "spearman_clean", "summary")}
        for name in ("selection", "test"):
            row[name]["auroc_drop"] = ref["rows"][name]["auroc"] - row[name]["auroc"]
    return {"row": row, "scores": got}


def main() -> None:
    """Run every row and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", type=Path, required=True, help="a bundle from `dede-rt demo`")
    ap.add_argument("--max-float", type=int, default=5, help="mixed precision: at most this many layers float")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_sensitivity.json")
    args = ap.parse_args()
    sets = Sets()
    work = Path(tempfile.mkdtemp(prefix="int8-sensitivity-"))
    bundle = work / "detector"
    shutil.copytree(args.detector, bundle, ignore=shutil.ignore_patterns("checkpoints"))
    from dede_rt.engines.loaders import ensure_graph

    fp32 = ensure_graph(bundle, "detector")
    ref = evaluate(fp32, "fp32", sets, None)
    ref = {**ref["scores"], "rows": ref["row"]}
    rows, graphs = [{"variant": "fp32", **ref["rows"]}], {"fp32": fp32}

    def int8_row(name: str, kind: str, **kw) -> dict:
        path = work / f"{len(graphs)}.onnx"
        quantize_int8(fp32, path, sets.ranges, **kw)
        row = {"variant": name, "kind": kind, **evaluate(path, "int8", sets, ref)["row"]}
        print(f"{name:40s} test AUROC {row['test']['auroc']:.4f}  selection drop {row['selection']['auroc_drop']:+.4f}"
              f"  gate {'passed' if row['gate']['passed'] else 'FAILED'} ({row['gate']['summary']})", flush=True)
        graphs[name] = path
        rows.append(row)
        return row

    for name, kw in SETTINGS.items():
        int8_row(name, "calibration setting", **kw)
    model = onnx.load(str(fp32))
    layers = encoder_weight_nodes(model)
    quantizable = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    cost = {}
    for i, layer in enumerate(layers):  # one layer INT8, everything else float
        row = int8_row(f"only encoder layer {i} ({layer})", "one layer",
                       keep_float=tuple(n for n in quantizable if n != layer))
        cost[layer] = row["selection"]["auroc_drop"]
    ranked = sorted(layers, key=lambda n: -cost[n])
    for k in range(1, min(args.max_float, len(layers)) + 1):
        for correct in (False, True):  # the same float layers with and without bias correction
            row = int8_row(f"mixed: {k} most costly layers float{', bias correction' if correct else ''}", "mixed",
                           keep_float=tuple(ranked[:k]), bias_correction=correct)
            row["float_layers"] = ranked[:k]
    batch = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)  # batch 32, 2 threads
    speed = images_per_second({r["variant"]: graphs[r["variant"]] for r in rows if r.get("kind") != "one layer"},
                              batch, seconds=1.5, threads=2)
    for r in rows:
        r["images_per_second"] = speed.get(r["variant"])
    args.out.write_text(json.dumps({
        "detector": str(args.detector), "score": json.loads((bundle / "manifest.json").read_text())["score"]["kind"],
        "sets": {"selection": len(sets.selection[1]), "gate": len(sets.gate[1]), "test": len(sets.test[1])},
        "layer_cost_on_selection": cost, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    for r in rows:
        if r.get("kind") != "one layer":
            print(f"{r['variant']:40s} {r['images_per_second']:8.1f} img/s  test AUROC {r['test']['auroc']:.4f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

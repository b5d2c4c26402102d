"""Which INT8 rounding costs the demo detector its AUROC: the weights' or the activations'?

The product's INT8 graph (``quantize_int8`` defaults) against the same graph with every activation
QuantizeLinear -> DequantizeLinear pair bypassed (weights still INT8, activations float): the difference is
what the activations' rounding costs. Sets as in ``int8_sensitivity.py`` (selection / gate / test from the
demo's seeded splits); the answer says which remedy could help (weight rounding: AdaRound-style; activations:
ranges, equalization, or float layers).

    python benchmarks/int8_error_source.py --detector demo-output/detector   # -> results/int8_error_source.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import onnx

from dede_rt.calibration.quantize import quantize_int8
from dede_rt.engines.loaders import ensure_graph
from int8_sensitivity import RESULTS, Sets, evaluate


def bypass_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a Q/DQ model whose activation Q -> DQ pairs are gone (weight DequantizeLinear nodes stay)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = {o: n for n in graph.node for o in n.output}
    rename = {}
    for node in graph.node:
        source = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is not None and source.op_type == "QuantizeLinear":  # an activation's pair: DQ(Q(x)) -> x
            rename[node.output[0]] = source.input[0]
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    for output in graph.output:
        output.name = rename.get(output.name, output.name)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if not (n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(kept)
    return out


def main() -> None:
    """Evaluate FP32, INT8 and INT8-weights-only and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", type=Path, required=True, help="a bundle from `dede-rt demo`")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_error_source.json")
    args = ap.parse_args()
    sets, work = Sets(), Path(tempfile.mkdtemp(prefix="int8-error-source-"))
    shutil.copytree(args.detector, work / "detector", ignore=shutil.ignore_patterns("checkpoints"))
    fp32 = ensure_graph(work / "detector", "detector")
    ref = evaluate(fp32, "fp32", sets, None)
    ref = {**ref["scores"], "rows": ref["row"]}
    int8 = work / "int8.onnx"
    quantize_int8(fp32, int8, sets.ranges)
    weights_only = work / "weights_only.onnx"
    onnx.save(bypass_activation_qdq(onnx.load(str(int8))), str(weights_only))
    rows = [{"variant": "fp32", **ref["rows"]}]
    for name, path in (("int8 (weights and activations)", int8), ("int8 weights only (activations float)", weights_only)):
        row = {"variant": name, **evaluate(path, "int8", sets, ref)["row"]}
        print(f"{name:40s} test AUROC {row['test']['auroc']:.4f} (drop {row['test']['auroc_drop']:+.4f}), "
              f"selection drop {row['selection']['auroc_drop']:+.4f}", flush=True)
        rows.append(row)
    args.out.write_text(json.dumps({"detector": str(args.detector), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Where a detector graph's decoder time goes: ONNX Runtime's profiler, per op type and per decoder block.

The detector graph (any precision) is cut at the embedding (``dede_rt.export.cut``) into the encoder part and the
decoder part (projection, blocks, head, score); each part is profiled on its own with
``SessionOptions.enable_profiling`` on the nodes of the graph ORT actually runs (``optimized_model_filepath``),
so fused nodes are attributed where they run. Decoder nodes are put in a section by how many LayerNorms lie
on their way from the inputs (block b holds the nodes after 2b-2 and up to 2b LayerNorms); the score tail (the
head MatMul and everything after it, plus the target patchify) is walked back from the ``scores`` output.

    python benchmarks/profile_decoder.py --graph BUNDLE/onnx/detector.onnx --name fp32
    python benchmarks/profile_decoder.py --graph BUNDLE/onnx/detector_int8.onnx --name int8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_NORMS = {"LayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
               "SimplifiedLayerNormalization"}
TAIL_PASS = {"ReduceSum", "ReduceMean", "TopK", "Pow", "Mul", "Div", "Sub", "Add", "Neg", "Reshape", "Transpose",
             "Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Flatten", "Identity", "DequantizeLinear",
             "QuantizeLinear"}


def sections(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> section ('projection', 'block k', 'head+score') of a decoder graph."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    tail, seen, stack = set(), set(), [o.name for o in graph.output]
    while stack:  # the score tail: back from the output to the first MatMul-like node on each path
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        tail.add(node.name)
        if "MatMul" in node.op_type or node.op_type == "Gemm":
            continue
        if node.op_type in TAIL_PASS:
            stack.extend(node.input)
    level: dict[str, int] = {}
    out: dict[str, str] = {}
    for node in graph.node:  # ORT writes the optimized graph topologically sorted
        lv = max((level.get(i, 0) for i in node.input), default=0) + (node.op_type in LAYER_NORMS)
        for o in node.output:
            level[o] = lv
        out[node.name] = "head+score" if node.name in tail else ("projection" if lv == 0 else
                                                                  f"block {math.ceil(lv / 2)}")
    return out


def profile(path: Path, feeds: dict, iters: int, threads: int, workdir: Path) -> tuple[list[dict], onnx.ModelProto, float]:
    """Run ``iters`` profiled batches; returns (kernel events, the optimized model, mean ms per batch unprofiled)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.optimized_model_filepath = str(workdir / f"{path.stem}.opt.onnx")
    plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        plain.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(iters):
        plain.run(None, feeds)
    ms = (time.perf_counter() - t0) / iters * 1e3
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / path.stem)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feeds)
    for _ in range(iters):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return kernel, onnx.load(str(workdir / f"{path.stem}.opt.onnx")), ms


def aggregate(events: list[dict], batch: int, iters: int, section_of: dict[str, str] | None) -> dict:
    """Microseconds per image by op type and by section (the 3 warm-up runs excluded)."""
    # Warm-up runs are the first 3 of (3 + iters) runs: keep the last `iters` occurrences of each node.
    by_node: dict[str, list[float]] = defaultdict(list)
    op_of = {}
    for e in events:
        name = e["name"][: -len("_kernel_time")]
        by_node[name].append(e["dur"])
        op_of[name] = e["args"].get("op_name", "?")
    per_op: dict[str, float] = defaultdict(float)
    per_section: dict[str, float] = defaultdict(float)
    per_section_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    count: dict[str, int] = defaultdict(int)
    for name, durs in by_node.items():
        us = float(np.sum(durs[-iters:])) / iters / batch
        per_op[op_of[name]] += us
        count[op_of[name]] += 1
        sec = (section_of or {}).get(name, "other")
        per_section[sec] += us
        per_section_op[sec][op_of[name]] += us
    return {"us_per_image_by_op": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
            "nodes_by_op": dict(count),
            "us_per_image_by_section": dict(sorted(per_section.items())),
            "us_per_image_by_section_op": {k: dict(sorted(v.items(), key=lambda kv: -kv[1]))
                                           for k, v in sorted(per_section_op.items())},
            "total_us_per_image": float(sum(per_op.values()))}


def run(graph: Path, batch: int = 32, iters: int = 20, threads: int = 2, seed: int = 0) -> dict:
    """Profile the encoder and decoder parts of ``graph``; returns the tables."""
    from dede_rt.export.cut import cut_decoder, cut_encoder, embedding_tensor

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        enc, dec = cut_encoder(graph, work / "encoder_part.onnx"), cut_decoder(graph, work / "decoder_part.onnx")
        model = onnx.load(str(graph))
        size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        images = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        name_in = model.graph.input[0].name
        emb_name = embedding_tensor(model)
        import onnxruntime as ort

        emb = ort.InferenceSession(str(enc), providers=["CPUExecutionProvider"]).run(None, {name_in: images})[0]
        e_events, _, e_ms = profile(enc, {name_in: images}, iters, threads, work)
        d_events, d_opt, d_ms = profile(dec, {name_in: images, emb_name: emb}, iters, threads, work)
        f_events, _, f_ms = profile(graph, {name_in: images}, iters, threads, work)
        ops = [n.op_type for n in d_opt.graph.node]
        return {"graph": str(graph), "batch": batch, "iters": iters, "threads": threads,
                "load_average": list(os.getloadavg()),
                "ms_per_batch": {"detector": f_ms, "encoder_part": e_ms, "decoder_part": d_ms},
                "img_per_s": {"detector": batch / f_ms * 1e3, "encoder_part": batch / e_ms * 1e3,
                              "decoder_part": batch / d_ms * 1e3},
                "decoder_optimized_ops": {op: ops.count(op) for op in sorted(set(ops))},
                "encoder": aggregate(e_events, batch, iters, None),
                "decoder": aggregate(d_events, batch, iters, sections(d_opt)),
                "detector": aggregate(f_events, batch, iters, None)}


def markdown(result: dict) -> str:
    """The profile as Markdown tables (µs per image)."""
    dec, enc = result["decoder"], result["encoder"]
    total = dec["total_us_per_image"] + enc["total_us_per_image"]
    lines = [f"### {result['graph']} (batch {result['batch']}, {result['threads']} threads, load {result['load_average']})",
             "", f"Unprofiled: detector {result['img_per_s']['detector']:.0f} img/s, encoder part "
             f"{result['img_per_s']['encoder_part']:.0f} img/s, decoder part {result['img_per_s']['decoder_part']:.0f} img/s.",
             f"Profiled kernel time: encoder {enc['total_us_per_image']:.0f} µs/img, decoder "
             f"{dec['total_us_per_image']:.0f} µs/img ({100 * dec['total_us_per_image'] / total:.0f} % of the two).",
             "", "| decoder section | µs/img | % of decoder | top ops (µs/img) |", "|---|---:|---:|---|"]
    for sec, us in dec["us_per_image_by_section"].items():
        top = ", ".join(f"{op} {v:.1f}" for op, v in list(dec["us_per_image_by_section_op"][sec].items())[:5])
        lines.append(f"| {sec} | {us:.1f} | {100 * us / dec['total_us_per_image']:.0f} | {top} |")
    lines += ["", "| decoder op type | nodes | µs/img | % of decoder |", "|---|---:|---:|---:|"]
    for op, us in dec["us_per_image_by_op"].items():
        lines.append(f"| {op} | {dec['nodes_by_op'][op]} | {us:.1f} | {100 * us / dec['total_us_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """CLI: profile one or more graphs, print the tables, write JSON + Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", type=Path, action="append", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="decoder_profile")
    args = ap.parse_args()
    results = [run(g, args.batch, args.iters, args.threads) for g in args.graph]
    text = "\n".join(markdown(r) for r in results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()

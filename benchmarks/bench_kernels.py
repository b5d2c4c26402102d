"""Mask-and-score tail: fused kernels vs the torch eager op chain vs torch.compile; and its share of ORT CPU time.

Section ``kernels`` (same inputs for every implementation, batch 256 by default):
  shapes 32x32/p4 and 224x224/p16, decoder width 192. Two ops:
  - tail: (uint8 images, reconstruction [N,T,3p²]) -> scores. Baseline: the eager op chain
    ``Scorer(kernel="torch")`` runs (Normalization.apply, patchify_images, masked_sse).
  - head+tail: (uint8 images, last hidden state [N,T,192], head Linear) -> scores. Baseline:
    eager ``head`` Linear followed by the same chain.
  Implementations: eager chain (baseline), dede_rt reference ops, torch.compile of the chain,
  and on CUDA the Triton kernels (autotuned). Times are medians; ratios are baseline / impl.
  Every implementation's scores are checked against the baseline (max relative error).

Section ``e2e``: whole-batch scoring with a ResNet18 victim and the reference decoder (32 px/p4):
``Scorer(kernel="torch")`` vs ``Scorer(kernel="triton")`` (head fused, on CUDA; ``kernel="reference"``, the
same fused op in torch, on CPU).

Section ``cpu-tail``: a fused uint8 detector graph (CIFAR ResNet18 victim + reference decoder
12+4, dim 192, patch 4, test path), exported with torch.onnx and run on ONNX Runtime CPU with
its profiler; reports the share of node time spent in the score tail (patchify, squared error,
reductions) and in the head, plus the wall-time difference to the same graph cut before the tail.

    python benchmarks/bench_kernels.py --json benchmarks/results/bench_kernels.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.kernels import reference as ref
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images
from dede_rt.scoring import masked_sse

SHAPES = [(32, 4), (224, 16)]


def chain(images: torch.Tensor, recon: torch.Tensor, norm: Normalization, patch: int) -> torch.Tensor:
    """The eager op chain of ``Scorer(kernel="torch")`` after the decoder (all patches masked)."""
    x = norm.apply(images)
    masked = torch.ones(recon.shape[:2], dtype=torch.bool, device=recon.device)
    return masked_sse(recon, patchify_images(x, patch), masked)


def head_chain(images, hidden, weight, bias, norm, patch):  # noqa: ANN001, ANN201
    """Eager head Linear + the chain: what ``Scorer(kernel="torch")`` does after the last decoder block."""
    return chain(images, F.linear(hidden, weight, bias), norm, patch)


def timeit(fn, sync, repeats: int, warmup: int = 2) -> dict:  # noqa: ANN001
    """Median / min seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def bench_kernels(batch: int, repeats: int, device: str, compile_: bool) -> list[dict]:
    """Time every implementation of both ops on both shapes."""
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    triton_ops = None
    if device == "cuda":
        from dede_rt.kernels import triton_score as triton_ops
    for size, patch in SHAPES:
        g = torch.Generator().manual_seed(0)
        tokens, width, dim = (size // patch) ** 2, 3 * patch * patch, 192
        norm = Normalization(image_size=size)
        images = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device)
        hidden = (torch.randn(batch, tokens, dim, generator=g)).to(device)
        weight = (torch.randn(width, dim, generator=g) / dim**0.5).to(device)
        bias = torch.randn(width, generator=g).to(device)
        with torch.no_grad():
            recon = F.linear(hidden, weight, bias)
        mean, std = norm.mean, norm.std
        impls = {
            "tail": {
                "eager_chain": lambda: chain(images, recon, norm, patch),
                "reference_op": lambda: ref.mask_and_score(images, recon, None, mean, std, patch),
            },
            "head+tail": {
                "eager_chain": lambda: head_chain(images, hidden, weight, bias, norm, patch),
                "reference_op_chunked": lambda: ref.mask_and_score_head(images, hidden, weight, bias, None, mean, std,
                                                                        patch),
            },
        }
        if compile_:
            c_tail = torch.compile(lambda i, r, p=patch: chain(i, r, norm, p), dynamic=False)
            c_head = torch.compile(lambda i, h, w, b, p=patch: head_chain(i, h, w, b, norm, p), dynamic=False)
            impls["tail"]["torch_compile"] = lambda: c_tail(images, recon)
            impls["head+tail"]["torch_compile"] = lambda: c_head(images, hidden, weight, bias)
        if triton_ops is not None:
            impls["tail"]["triton"] = lambda: triton_ops.mask_and_score(images, recon, None, mean, std, patch)
            impls["head+tail"]["triton"] = lambda: triton_ops.mask_and_score_head(images, hidden, weight, bias, None,
                                                                                  mean, std, patch)
        for op, candidates in impls.items():
            with torch.no_grad():
                expected = candidates["eager_chain"]()
                base = None
                for name, fn in candidates.items():
                    t_compile = time.perf_counter()
                    got = fn()  # first call: correctness, and compilation / autotuning for compiled ones
                    sync()
                    first_call = time.perf_counter() - t_compile
                    err = float((got - expected).abs().max() / expected.abs().max())
                    stats = timeit(fn, sync, repeats)
                    base = stats["median_s"] if name == "eager_chain" else base
                    rows.append({"shape": f"{size}x{size}/p{patch}", "op": op, "impl": name, "batch": batch,
                                 "device": device, **stats, "first_call_s": first_call,
                                 "speedup_vs_eager": base / stats["median_s"], "max_rel_err": err,
                                 "images_per_s": batch / stats["median_s"]})
                    print(f"{rows[-1]['shape']:>12} {op:>9} {name:>22}: {stats['median_s'] * 1e3:9.2f} ms "
                          f"x{rows[-1]['speedup_vs_eager']:.2f} err {err:.1e}", flush=True)
    return rows


class _FusedGraph(nn.Module):
    """uint8 NHWC -> scores, like the fused export: normalize -> victim -> decoder test path -> masked SSE."""

    def __init__(self, encoder: nn.Module, decoder: DeDeDecoder, norm: Normalization) -> None:
        super().__init__()
        self.encoder, self.decoder, self.patch = encoder.eval(), decoder.eval(), decoder.config.patch_size
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        pred = self.decoder.decode_embedding(self.encoder(x))
        return (pred - patchify_images(x, self.patch)).square().sum(dim=(1, 2))


def _export(module: nn.Module, example: torch.Tensor) -> tuple:
    import onnx

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["scores"],
                                        dynamo=True, opset_version=18,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
            return program.model_proto, "dynamo"
        except Exception:  # noqa: BLE001 - fall back like dede_rt.export does
            buf = io.BytesIO()
            torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["scores"], dynamo=False,
                              opset_version=17, dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}})
            return onnx.load_from_string(buf.getvalue()), "torchscript"


def bench_cpu_tail(batch: int, repeats: int, threads: int) -> dict:
    """Share of ORT CPU time in the score tail of a ResNet18 + reference-decoder fused graph."""
    import onnx
    import onnxruntime as ort

    from dede_rt.kernels import onnx_custom as oc
    from dede_rt.models.resnet import build_resnet

    torch.manual_seed(0)
    norm = Normalization()
    encoder = build_resnet("resnet18").eval()
    decoder = DeDeDecoder(DecoderConfig(embed_dim=512)).eval()  # reference: dim 192, 3 heads, 12 + 4 blocks, p4
    module = _FusedGraph(encoder, decoder, norm).eval()
    example = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    model, exporter = _export(module, example)
    head_w = decoder.head.weight.detach().numpy()
    hidden_name, recon_name = oc.locate_head(model, "scores", head_w)
    # Node sets: the tail = what scores needs beyond the reconstruction; the head = MatMul (+Add) producing it.
    upstream = lambda name: {id(n): n for n in oc._upstream(model, name)}  # noqa: E731
    up_scores, up_recon, up_hidden = upstream("scores"), upstream(recon_name), upstream(hidden_name)
    # Normalizing the input is shared with the encoder (it is upstream of the reconstruction), so it is not
    # counted as tail; the tail is patchify + squared error + reductions.
    tail_names = {n.name for k, n in up_scores.items() if k not in up_recon}
    head_names = {n.name for k, n in up_recon.items() if k not in up_hidden}
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)

    def session(m, profile_dir=None):  # noqa: ANN001, ANN202
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if profile_dir:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(profile_dir) / "ort")
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    cut = onnx.ModelProto.FromString(model.SerializeToString())
    del cut.graph.output[:]
    cut.graph.output.extend([onnx.helper.make_empty_tensor_value_info(recon_name)])
    oc.prune(cut)
    full_s, cut_s = session(model), session(cut)
    feeds = {"images": images}
    for s in (full_s, cut_s):
        s.run(None, feeds)
    # Interleaved, so that load drift on a shared machine hits both graphs alike.
    full_times, cut_times = [], []
    for _ in range(repeats):
        for s, acc in ((full_s, full_times), (cut_s, cut_times)):
            t0 = time.perf_counter()
            s.run(None, feeds)
            acc.append(time.perf_counter() - t0)
    full_t, cut_t = {"median_s": statistics.median(full_times)}, {"median_s": statistics.median(cut_times)}
    paired = statistics.median(f - c for f, c in zip(full_times, cut_times))
    with tempfile.TemporaryDirectory() as tmp:
        prof = session(model, tmp)
        for _ in range(2 + repeats):
            prof.run(None, {"images": images})
        events = json.loads(Path(prof.end_profiling()).read_text())
    # Skip the two warm-up runs (first-run allocations would inflate small nodes).
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[2] if len(runs) > 2 else 0
    per_node: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            name = e["name"][: -len("_kernel_time")]
            per_node[name] = per_node.get(name, 0.0) + e["dur"]
    total = sum(per_node.values())
    tail_us = sum(v for k, v in per_node.items() if k in tail_names)
    head_us = sum(v for k, v in per_node.items() if k in head_names)
    unmatched = sorted(tail_names - set(per_node))  # ORT may fuse or rename some nodes
    top = sorted(per_node.items(), key=lambda kv: -kv[1])[:8]
    profiled = max(1, len(runs) - 2)
    result = {
        "graph": "CIFAR ResNet18 + DeDe decoder (dim 192, 12+4 blocks; test path: 4 decoder blocks), 32px/p4, uint8 in",
        "exporter": exporter, "batch": batch, "threads": threads, "repeats": repeats,
        "nodes": len(model.graph.node), "tail_nodes": sorted(tail_names), "tail_nodes_not_in_profile": unmatched,
        "head_nodes": sorted(head_names),
        "profiled_runs": profiled, "profile_total_node_ms_per_run": total / 1e3 / profiled,
        "tail_node_ms_per_run": {k: per_node.get(k, 0.0) / 1e3 / profiled for k in sorted(tail_names)},
        "head_node_ms_per_run": {k: per_node.get(k, 0.0) / 1e3 / profiled for k in sorted(head_names)},
        "tail_share_of_node_time": tail_us / total, "head_share_of_node_time": head_us / total,
        "wall_full_graph_s": full_t["median_s"], "wall_graph_cut_before_tail_s": cut_t["median_s"],
        "wall_tail_share": 1 - cut_t["median_s"] / full_t["median_s"],
        "wall_paired_difference_s": paired, "wall_paired_tail_share": paired / full_t["median_s"],
        "top_nodes_ms_per_run": {k: v / 1e3 / profiled for k, v in top},
    }
    print(f"cpu-tail: tail {100 * result['tail_share_of_node_time']:.2f}% of node time, head "
          f"{100 * result['head_share_of_node_time']:.2f}%, wall full {full_t['median_s'] * 1e3:.1f} ms vs cut "
          f"{cut_t['median_s'] * 1e3:.1f} ms", flush=True)
    return result


def bench_e2e(batch: int, repeats: int, device: str) -> list[dict]:
    """Whole-batch scoring (ResNet18 + reference decoder, 32 px/p4): ``Scorer`` with the plain-op tail vs the
    fused mask-and-score kernel (Triton on CUDA, the chunked reference op on CPU, where no kernel should help)."""
    from dede_rt.models.encoders import VictimEncoder
    from dede_rt.models.resnet import build_resnet
    from dede_rt.scoring import Scorer

    torch.manual_seed(0)
    norm = Normalization()
    encoder = VictimEncoder(build_resnet("resnet18"), 512).to(device).eval()
    decoder = DeDeDecoder(DecoderConfig(embed_dim=512)).to(device).eval()
    images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kernel = "triton" if device == "cuda" else "reference"
    plain = Scorer(encoder=encoder, decoder=decoder, normalization=norm).to(device).eval()
    fused = Scorer(encoder=encoder, decoder=decoder, normalization=norm, kernel=kernel).to(device).eval()
    with torch.no_grad():
        expected = plain(images)
        runs = {"Scorer[torch]": lambda: plain(images), f"Scorer[{kernel}]": lambda: fused(images)}
        rows, base = [], None
        for name, fn in runs.items():
            err = float((fn() - expected).abs().max() / expected.abs().max())
            stats = timeit(fn, sync, repeats, warmup=1)
            base = base or stats["median_s"]
            rows.append({"impl": name, "device": device, "batch": batch, **stats, "images_per_s": batch / stats["median_s"],
                         "speedup_vs_plain_tail": base / stats["median_s"], "max_rel_err": err})
            print(f"e2e {name:>28}: {stats['median_s'] * 1e3:9.1f} ms  {batch / stats['median_s']:8.0f} img/s "
                  f"x{base / stats['median_s']:.3f} err {err:.1e}", flush=True)
    return rows


def main() -> None:
    """Run the selected sections and write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=["kernels", "cpu-tail", "e2e", "all"], default="all")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cpu-tail-batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_kernels.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = {"host": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": a.threads,
                    "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}}
    if a.device != "cuda":
        out["note"] = ("No CUDA device: Triton kernel timings need a GPU and are not reported; the Triton "
                       "kernels were verified only in interpreter mode (TRITON_INTERPRET=1) by the tests.")
    if a.section in ("kernels", "all"):
        out["kernels"] = bench_kernels(a.batch, a.repeats, a.device, not a.no_compile)
    if a.section in ("e2e", "all"):
        out["e2e"] = bench_e2e(a.batch, max(3, a.repeats // 2), a.device)
    if a.section in ("cpu-tail", "all"):
        import onnxruntime

        out["cpu_tail"] = bench_cpu_tail(a.cpu_tail_batch, a.repeats, a.threads)
        out["host"]["onnxruntime"] = onnxruntime.__version__
    a.json.parent.mkdir(parents=True, exist_ok=True)
    if a.section != "all" and a.json.exists():  # keep the other section's last results
        previous = json.loads(a.json.read_text())
        previous.setdefault("host_by_section", {})[a.section] = out.pop("host")
        out = {**previous, **out}
    a.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

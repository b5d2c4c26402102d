"""Detector vs its own encoder, step by step: how much of the encoder's speed each decoder optimization keeps.

On a `dede-rt bench` speed bundle (random-init ResNet18-CIFAR + the reference 12/4-block decoder, or with
``--decoder-size small`` the small one `dede-rt train` gives by default) it builds, from
the same weights, the graph of each step and cuts every one at the embedding (``dede_rt.export.cut``) for its
encoder-alone twin (same Q/DQ for INT8):

- ``fp32 plain``     the export before issue 23 (unfolded decoder, dynamo ops)
- ``fp32 folded``    block 1 folded (``scoring.folded``)
- ``fp32 fused``     folded + ORT transformer fusions (``export.ort_fusions``) = today's ``detector.onnx``
- ``int8 plain``     the old INT8 rule on the plain graph (attention MatMuls quantized too)
- ``int8 fused``     the old rule on the fused graph
- ``int8 fused gemm``  the decoder rules: weight GEMMs only (``quantize.activation_matmuls`` stay float), MatMul
                     outputs not requantized (MatMulIntegerToFloat) = today's ``detector_int8``

All sessions (ORT CPU, ``--threads`` intra-op threads, batch ``--batch``) are timed round-robin in one run, each
for ``--seconds`` per round, so load on the shared machine hits all alike; the ratio detector / encoder-alone is
taken per round and its median reported.

    python benchmarks/bench_decoder_speed.py [--decoder-size reference|small] [--rounds 5] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from dede_rt.models.decoder_sizes import DECODER_SIZES

RESULTS = Path(__file__).resolve().parent / "results"


def build(workdir: Path, log=print, decoder_size: str = "reference") -> tuple[dict[str, Path], np.ndarray]:
    """The speed bundle (its decoder: ``DECODER_SIZES[decoder_size]``) and the graphs of every step (built once
    under ``workdir``)."""
    import torch

    from dede_rt.bench import build_bench_bundle
    from dede_rt.bundle import load_detector
    from dede_rt.calibration.quantize import quantize_int8
    from dede_rt.data.demo import demo_dataset
    from dede_rt.export.onnx_export import _export_module, check_and_infer
    from dede_rt.export.ort_fusions import optimize_for_onnxruntime
    from dede_rt.scoring import Scorer

    clean = demo_dataset(photo_count=400).images
    bundle = workdir / "bundle"
    if not (bundle / "manifest.json").is_file():
        log("building the speed bundle")
        build_bench_bundle(bundle, calibration=clean[:512], decoder_size=decoder_size)
    det = load_detector(bundle)
    u8 = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    paths = {"fp32 plain": workdir / "plain.onnx", "fp32 folded": workdir / "folded.onnx",
             "fp32 fused": workdir / "fused.onnx", "int8 plain": workdir / "plain_int8.onnx",
             "int8 fused": workdir / "fused_int8_attn.onnx", "int8 fused gemm": workdir / "fused_int8.onnx"}
    for name, folded in (("fp32 plain", False), ("fp32 folded", True)):
        if not paths[name].is_file():
            log(f"exporting {name}")
            _export_module(Scorer.from_detector(det, exact=False, folded=folded), (u8,), paths[name], ["images"],
                           ["scores"], "dynamo")
            check_and_infer(paths[name])
    cfg = det.decoder.config
    if not paths["fp32 fused"].is_file():
        log(f"fusing: {optimize_for_onnxruntime(paths['fp32 folded'], paths['fp32 fused'], cfg.heads, cfg.dim)}")
    calib = clean[:256]
    for name, src, attn in (("int8 plain", "fp32 plain", True), ("int8 fused", "fp32 fused", True),
                            ("int8 fused gemm", "fp32 fused", False)):
        if not paths[name].is_file():
            log(f"quantizing {name}")
            quantize_int8(paths[src], paths[name], calib, decoder_rules=not attn)
    return paths, clean


def agreement(paths: dict[str, Path], images: np.ndarray, reference: np.ndarray) -> dict[str, dict]:
    """Each graph's scores against the torch scorer (max relative diff, Spearman)."""
    import onnxruntime as ort
    from scipy.stats import spearmanr

    out = {}
    for name, path in paths.items():
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
        out[name] = {"max_rel_diff_vs_torch": float(np.max(np.abs(got - reference) / np.abs(reference))),
                     "spearman_vs_torch": float(spearmanr(got, reference)[0])}
    return out


def time_round_robin(graphs: dict[str, Path], images: np.ndarray, batch: int, threads: int, rounds: int,
                     seconds: float, spin: bool = True, log=print) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall img/s, img per CPU-second) of every graph in every round (each ``seconds`` per round, all every round).

    Images per CPU-second (process CPU time, all threads) is what survives a loaded machine; it is meaningful
    with ``spin=False`` (idle ORT worker threads then sleep instead of burning CPU).
    """
    import onnxruntime as ort

    sessions = {}
    for name, path in graphs.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sessions[name] = (sess, sess.get_inputs()[0].name)
        sess.run(None, {sessions[name][1]: images[:batch]})
    rates: dict[str, list[float]] = {name: [] for name in graphs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in graphs}
    n = len(images) - batch
    for r in range(rounds):
        for name, (sess, inp) in sessions.items():
            done, i, start, cpu = 0, 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds or i < 3:
                lo = (i * batch) % n
                sess.run(None, {inp: images[lo : lo + batch]})
                done, i = done + batch, i + 1
            rates[name].append(done / (time.perf_counter() - start))
            cpu_rates[name].append(done / (time.process_time() - cpu))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    return rates, cpu_rates


def main() -> None:
    """Build the steps, time them round-robin with their encoder cuts, write JSON + Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the graphs are built and cached (default ~/.cache/dede-rt/decoder-speed[-small])")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--steps", default="", help="comma-separated subset of the steps (default: all)")
    ap.add_argument("--name", default="decoder_speed")
    ap.add_argument("--no-spin", action="store_true", help="ORT worker threads sleep when idle (loaded machines)")
    ap.add_argument("--decoder-size", choices=tuple(DECODER_SIZES), default="reference",
                    help="the speed bundle's decoder (DECODER_SIZES): the paper's 12/4-block one, or small "
                         "(dede-rt train's default)")
    args = ap.parse_args()
    from dede_rt.export.cut import cut_encoder

    if args.workdir is None:  # one cache per decoder shape: a cached bundle of the other shape would be reused
        args.workdir = Path.home() / ".cache" / "dede-rt" / ("decoder-speed" if args.decoder_size == "reference"
                                                             else f"decoder-speed-{args.decoder_size}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths, clean = build(args.workdir, decoder_size=args.decoder_size)
    if args.steps:
        paths = {k: v for k, v in paths.items() if k in args.steps.split(",")}
    graphs = {}
    for name, path in paths.items():
        enc = path.with_name(path.stem + ".encoder_cut.onnx")
        if not enc.is_file():
            cut_encoder(path, enc)
        graphs[f"{name} | detector"], graphs[f"{name} | encoder"] = path, enc
    from dede_rt.bundle import load_detector

    probe = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    reference = load_detector(args.workdir / "bundle").score(probe)
    agree = agreement(paths, probe, reference)
    images = np.concatenate([clean] * max(1, -(-4 * args.batch // len(clean))))
    load_start = list(os.getloadavg())
    rates, cpu_rates = time_round_robin(graphs, images, args.batch, args.threads, args.rounds, args.seconds,
                                        spin=not args.no_spin)
    load_end = list(os.getloadavg())
    rows = []
    for name in paths:
        det, enc = np.asarray(rates[f"{name} | detector"]), np.asarray(rates[f"{name} | encoder"])
        det_cpu, enc_cpu = np.asarray(cpu_rates[f"{name} | detector"]), np.asarray(cpu_rates[f"{name} | encoder"])
        rows.append({"step": name, "detector_img_s": float(np.median(det)), "encoder_alone_img_s": float(np.median(enc)),
                     "ratio": float(np.median(det / enc)), "ratio_per_round": (det / enc).tolist(),
                     "detector_per_round": det.tolist(), "encoder_per_round": enc.tolist(),
                     "detector_img_per_cpu_s": float(np.median(det_cpu)), "encoder_img_per_cpu_s": float(np.median(enc_cpu)),
                     "ratio_cpu_time": float(np.median(det_cpu / enc_cpu)), **agree[name]})
    result = {"batch": args.batch, "threads": args.threads, "spinning": not args.no_spin, "rounds": args.rounds, "seconds": args.seconds,
              "load_average_start": load_start, "load_average_end": load_end, "cpu_count": os.cpu_count(),
              "bundle": f"random-init resnet18-cifar + {args.decoder_size} decoder {DECODER_SIZES[args.decoder_size]}",
              "rows": rows}
    lines = ["| step | detector img/s | encoder-alone img/s | ratio (median of rounds) | ratio, CPU time "
             "| max rel diff vs torch | Spearman vs torch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['detector_img_s']:.0f} | {r['encoder_alone_img_s']:.0f} | {r['ratio']:.3f} "
                     f"| {r['ratio_cpu_time']:.3f} "
                     f"| {r['max_rel_diff_vs_torch']:.1e} | {r['spearman_vs_torch']:.5f} |")
    lines.append(f"\nORT CPU, batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.seconds} s per "
                 f"graph, round-robin, ORT thread spinning {'off' if args.no_spin else 'on'}; load average {load_start} -> {load_end} on {os.cpu_count()} CPUs.")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()

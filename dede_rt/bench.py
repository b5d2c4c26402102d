"""`dede-rt bench`: throughput and latency of every backend x precision x batch size, in trtexec's vocabulary.

Baseline: torch eager FP32 at batch 256, written like the reference code (one
``no_grad`` eager forward of encoder + decoder per batch, then the per-sample
squared error). Variants are measured round-robin (every variant once per
round, several rounds) so load changes on a shared machine hit all of them
alike; each row aggregates its rounds. Reported per row: throughput (img/s),
latency of one batch (min/mean/median/p90/p95/p99, ms), host walltime, GPU
compute time where a backend measures it (TensorRT), and the score deltas
against torch on the same images (max relative diff, Spearman).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dede_rt.errors import UserError
from dede_rt.models.decoder_sizes import DEFAULT_DECODER_SIZE, decoder_shape

BASELINE = ("torch", "fp32", 256)
# A variant is (backend, precision) or (backend, precision, option): option = the torch backend's score kernel
# ("torch", "reference", "triton") or a TensorRT engine's score tail ("standard", "plugin").
DEFAULT_BATCHES = (1, 32, 64, 256)
DEFAULT_VARIANTS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("onnxruntime", "fp16"),
                    ("tensorrt", "fp16"), ("tensorrt", "int8"))


@dataclass
class Timing:
    """Per-batch latencies and images of one variant, summed over the rounds."""

    latencies: list[float] = field(default_factory=list)
    images: int = 0
    gpu: list[float] = field(default_factory=list)


def machine() -> dict:
    """What the numbers were measured on."""
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    for dist in ("onnxruntime", "onnxruntime-gpu"):  # same module, either wheel; neither without an extra
        try:
            info["onnxruntime"] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    try:
        info["load_average_start"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# Speed bundles (random init): the CIFAR victim of the first round and two 224-px ImageNet / CLIP-scale ones,
# each with the reference-width decoder (patch 4 at 32 px; patch 32 at 224 px, the paper's CLIP setting).
SPEED_MODELS = {"resnet18": 32, "resnet50-224": 224, "clip-vit-b32-224": 224}  # name -> input size


def speed_model_size(model: str) -> int:
    """The input size of a speed bundle ``model``, or a one-line error naming the known ones."""
    if model not in SPEED_MODELS:
        raise UserError(f"unknown speed model {model!r}; choose one of {', '.join(SPEED_MODELS)}")
    return SPEED_MODELS[model]


def _speed_encoder(model: str, out: Path) -> tuple[str, dict]:
    """Write a random-init encoder for ``model`` under ``out``; returns the ``load_encoder`` spec and its kwargs."""
    import torch

    from dede_rt.models.encoders import save_badencoder_checkpoint
    from dede_rt.models.resnet import build_resnet

    if model == "resnet50-224":
        from dede_rt.models.families.torchvision_family import RESNETS
        from dede_rt.models.resnet import ImageNetResNet

        torch.save(ImageNetResNet(RESNETS["resnet50"]).state_dict(), out / "encoder.pth")
        return "torchvision:resnet50", {"weights": out / "encoder.pth"}
    if model == "clip-vit-b32-224":
        from dede_rt.optional import import_extra

        transformers = import_extra("transformers", "the CLIP ViT-B/32 speed bundle", "hf")
        config = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, image_size=224, patch_size=32,
                                               projection_dim=512)
        transformers.CLIPVisionModelWithProjection(config).save_pretrained(out / "encoder")
        return str(out / "encoder"), {}
    save_badencoder_checkpoint(build_resnet(model).eval(), out / "encoder.pth")
    return str(out / "encoder.pth"), {"format": "badencoder"}


def build_bench_bundle(out: str | Path, arch: str = "resnet18", seed: int = 0, calibration: np.ndarray | None = None,
                       decoder: dict | None = None, relative_k: int = 0, prototypes: int = 256,
                       combined: bool = False, decoder_size: str = DEFAULT_DECODER_SIZE) -> Path:
    """A detector bundle with random-init weights (speed only): ``arch`` victim + a ``decoder_size`` decoder.

    The decoder is the one ``dede-rt train`` gives (``DECODER_SIZES``; ``decoder`` fields override it).

    ``arch``: a CIFAR ResNet name, or ``resnet50-224`` / ``clip-vit-b32-224`` (224 px, the family's own
    preprocessing, decoder patch 32). ``relative_k`` > 0: the relative score, against the embeddings of
    ``prototypes`` of the calibration images; with ``combined`` the combined score, scaled on those images.
    """
    import torch

    from dede_rt.bundle import Detector, Thresholds
    from dede_rt.data.demo import demo_dataset
    from dede_rt.data.sources import ImageSet, resize_set
    from dede_rt.models.decoder import DecoderConfig, DeDeDecoder
    from dede_rt.models.encoders import load_encoder
    from dede_rt.training import encoder_normalization

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    spec, kwargs = _speed_encoder(arch, out)
    encoder, info = load_encoder(spec, **{"image_size": 32, **kwargs})
    norm = encoder_normalization(info)
    patch = {} if norm.image_size == 32 else {"patch_size": 32}
    dec = DeDeDecoder(DecoderConfig(embed_dim=info["embed_dim"], image_size=norm.image_size,
                                    **decoder_shape(decoder_size, **{**patch, **(decoder or {})})))
    images = calibration if calibration is not None else demo_dataset(photo_count=200, seed=seed).images[:512]
    if images.shape[1] != norm.image_size:
        images = resize_set(ImageSet(images), norm.image_size).images
    proto = None
    if relative_k:
        from dede_rt.training import compute_embeddings

        proto = compute_embeddings(encoder, norm, images[:prototypes], progress=False)
    det = Detector(encoder=encoder, decoder=dec, normalization=norm, encoder_info=info, prototype_embeddings=proto,
                   relative_k=relative_k, sections={"bench": {"weights": "random init (speed benchmark only)",
                                                              "arch": arch, "decoder": dec.config.to_dict()}})
    if combined and relative_k:
        from dede_rt.training import standardized

        det = standardized(det, images)
    det.calibration_scores = det.score(images)
    det.thresholds = Thresholds.from_scores(det.calibration_scores).by_fpr
    det.save(out, embed_encoder=True)
    return out


def measure(runner, images: np.ndarray, batch: int, seconds: float, timing: Timing, min_iters: int = 2) -> None:
    """Run ``runner`` on consecutive batches for about ``seconds`` (after one warm-up batch)."""
    n = len(images)
    runner.infer(images[:batch])  # warm-up: allocator, thread pool, lazy kernels
    start, i = time.perf_counter(), 0
    while i < min_iters or time.perf_counter() - start < seconds:
        lo = (i * batch) % max(n - batch + 1, 1)
        t0 = time.perf_counter()
        runner.infer(images[lo : lo + batch])
        timing.latencies.append(time.perf_counter() - t0)
        gpu = getattr(runner, "last_gpu_time", None)
        if gpu is not None:
            timing.gpu.append(gpu)
        timing.images += batch
        i += 1


def _row(backend: str, precision: str, batch: int, t: Timing, device: str) -> dict:
    lat = np.asarray(t.latencies) * 1e3
    wall = float(np.sum(t.latencies))
    row = {"backend": backend, "precision": precision, "batch": batch, "device": device,
           "throughput": t.images / wall, "latency_min_ms": float(lat.min()), "latency_mean_ms": float(lat.mean()),
           "latency_median_ms": float(np.median(lat)), "latency_p90_ms": float(np.percentile(lat, 90)),
           "latency_p95_ms": float(np.percentile(lat, 95)), "latency_p99_ms": float(np.percentile(lat, 99)),
           "host_walltime_s": wall, "iterations": len(lat), "images": t.images,
           "gpu_compute_mean_ms": float(np.mean(t.gpu) * 1e3) if t.gpu else None}
    return row


def expand_variants(variants: tuple[tuple[str, ...], ...], score_kernels: tuple[str, ...] = (),
                    score_tails: tuple[str, ...] = ()) -> tuple[tuple[str, ...], ...]:
    """``variants`` plus, next to each torch (TensorRT) one, a copy per extra score kernel (score tail)."""
    from dede_rt.scoring import SCORE_KERNELS as kernels

    tails = ("standard", "plugin")  # tensorrt_builder.SCORE_TAILS without "auto": a row measures one tail
    for v in variants:
        if len(v) == 3 and v[2] not in {"torch": kernels, "tensorrt": tails}.get(v[0], ()):
            raise UserError(f"variant {':'.join(v)}: the third part is a torch score kernel ({', '.join(kernels)}) "
                            f"or a tensorrt score tail ({', '.join(tails)})")
    for name, values, known in (("--score-kernel", score_kernels, kernels), ("--score-tail", score_tails, tails)):
        bad = [x for x in values if x not in known]
        if bad:
            raise UserError(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    out: list[tuple[str, ...]] = []
    for v in variants:
        out.append(tuple(v))
        extra = score_kernels if v[0] == "torch" else score_tails if v[0] == "tensorrt" else ()
        default = "torch" if v[0] == "torch" else None  # a TensorRT row's own tail is what its engine has
        out += [(v[0], v[1], o) for o in extra if len(v) == 2 and o != default and (v[0], v[1], o) not in out]
    return tuple(dict.fromkeys(out))


def _variant_runner(bundle: Path, key: tuple[str, ...], batch_size: int, threads: int, log):  # noqa: ANN202
    """The runner of one variant: ``make_runner`` for (backend, precision[, score kernel]); a TensorRT engine of
    the asked score tail (``ensure_engine``: the recorded one when it matches, else a variant built once)."""
    from dede_rt.engines.registry import make_runner

    if len(key) == 3 and key[0] == "tensorrt":
        from dede_rt.bundle import read_manifest
        from dede_rt.engines.tensorrt_builder import ensure_engine
        from dede_rt.engines.tensorrt_runner import TensorRTRunner

        engine = ensure_engine(bundle, key[1], key[2], max_batch=batch_size, log=log)
        return TensorRTRunner(engine, read_manifest(bundle).image_size, key[1], batch_size=batch_size)
    kernel = {"score_kernel": key[2]} if len(key) == 3 else {}
    return make_runner(bundle, key[0], key[1], batch_size=batch_size, threads=threads, **kernel)


def _variant_fields(key: tuple[str, ...], runner) -> dict:  # noqa: ANN001
    """A row's score kernel (torch rows) or score tail (TensorRT rows: from the engine's manifest)."""
    if key[0] == "torch":
        return {"score_kernel": key[2] if len(key) == 3 else "torch"}
    if key[0] == "tensorrt":
        manifest = getattr(getattr(runner, "runner", runner), "manifest", None) or {}
        return {"score_tail": key[2] if len(key) == 3 else manifest.get("score_tail", {}).get("used", "standard")}
    return {}


class _TorchEncoderAlone:
    """The torch scorer's normalize + victim encoder alone (the torch row's encoder-alone twin)."""

    def __init__(self, bundle: Path, device: str) -> None:
        from dede_rt.bundle import load_detector
        from dede_rt.scoring import Scorer

        self.scorer = Scorer.from_detector(load_detector(bundle)).to(device).eval()
        self.device = device

    def infer(self, images_u8: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = self.scorer.normalize(torch.as_tensor(images_u8).to(self.device))
            return self.scorer.encoder(x).float().cpu().numpy()

    def deactivate(self) -> None:
        self.scorer = None


def encoder_alone_runners(bundle: Path, runners: dict, threads: int, workdir: Path, log=print) -> dict:
    """Each measured graph's encoder part, cut from the same graph at the embedding (same precision, same Q/DQ).

    ONNX Runtime variants: ``export.cut.cut_encoder`` of the graph the runner loads; torch: its encoder module.
    TensorRT engines are not cut (no row).
    """
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
    from dede_rt.export.cut import cut_encoder

    out = {}
    for key, runner in runners.items():
        inner = getattr(runner, "runner", runner)
        try:
            if key[0] == "onnxruntime":
                path = cut_encoder(inner.model_path, Path(workdir) / f"encoder_alone_{key[1]}.onnx")
                enc = OnnxRuntimeRunner(path, inner.image_size, key[1], providers=inner.providers, threads=threads)
                enc.activate()
                out[key] = enc
            elif key[0] == "torch":
                out[key] = _TorchEncoderAlone(bundle, inner.device)
        except (UserError, ValueError, OSError) as exc:
            log(f"no encoder-alone row for {key[0]} {key[1]}: {exc}")
    return out


def run_benchmark(bundle: str | Path, images: np.ndarray, batches: tuple[int, ...] = DEFAULT_BATCHES,
                  variants: tuple[tuple[str, str], ...] = DEFAULT_VARIANTS, seconds: float = 1.0, rounds: int = 3,
                  threads: int = 0, record: bool = True, log=print) -> dict:
    """Benchmark every available variant of ``bundle`` on ``images``; returns {"rows", "skipped", "machine", ...}."""
    import torch

    bundle = Path(bundle)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # same intra-op pool size for torch and ONNX Runtime
    try:
        return _run_benchmark(bundle, images, batches, variants, seconds, rounds, threads, record, log)
    finally:
        torch.set_num_threads(saved_threads)


def _run_benchmark(bundle: Path, images: np.ndarray, batches: tuple[int, ...], variants: tuple[tuple[str, str], ...],
                   seconds: float, rounds: int, threads: int, record: bool, log) -> dict:
    from dede_rt.bundle import edit_manifest, read_manifest
    from dede_rt.engines.comparator import compare_scores, run_batched
    from dede_rt.engines.registry import device_kind

    if len(images) < max(batches):
        reps = -(-max(batches) // len(images))
        images = np.concatenate([images] * reps)
    runners, skipped = {}, {}
    for variant in variants:
        key = tuple(variant)
        try:
            runner = _variant_runner(bundle, key, max(batches), threads, log)
            runner.activate()
            runners[key] = runner
        except UserError as exc:
            skipped[":".join(key)] = str(exc)
            log(f"skip {' '.join(key)}: {exc}")

    if ("torch", "fp32") not in runners:
        raise UserError("the torch fp32 baseline could not be loaded")
    # Score agreement with torch on the same images (first 512), before timing.
    probe = images[:512]
    ref = run_batched(runners[("torch", "fp32")], probe)
    agreement = {}
    for key, runner in runners.items():
        c = compare_scores(ref, run_batched(runner, probe))
        agreement[key] = {"max_rel_diff_vs_torch": c.max_rel_diff, "spearman_vs_torch": c.spearman}
    timings = {(k, b): Timing() for k in runners for b in batches}
    cut_dir = tempfile.TemporaryDirectory(prefix="dede-rt-bench-")
    encoders = encoder_alone_runners(bundle, runners, threads, Path(cut_dir.name), log)
    enc_timings = {(k, b): Timing() for k in encoders for b in batches}
    started = time.perf_counter()
    for r in range(rounds):
        for key, runner in runners.items():
            for batch in batches:
                measure(runner, images, batch, seconds, timings[(key, batch)])
                if key in encoders:  # its encoder alone right after it, so both see the same load
                    measure(encoders[key], images, batch, seconds, enc_timings[(key, batch)])
        log(f"round {r + 1}/{rounds} done ({time.perf_counter() - started:.0f} s)")
    kind = device_kind()
    rows = []
    gates = read_manifest(bundle).deployment.precisions
    for (key, batch), t in timings.items():
        row = _row(key[0], key[1], batch, t, runners[key].device)
        row.update(_variant_fields(key, runners[key]))
        row.update(agreement[key])
        if (key, batch) in enc_timings:
            enc = enc_timings[(key, batch)]
            row["encoder_alone_throughput"] = enc.images / float(np.sum(enc.latencies))
            row["detector_vs_encoder"] = row["throughput"] / row["encoder_alone_throughput"]
        entry = gates.get(key[1]) if key[0] == "onnxruntime" else None
        if entry is not None and entry.gate.mode != "reference":
            gate = entry.gate.to_dict()
            row["quality_gate"] = {k: gate[k] for k in ("passed", "mode", "spearman_clean", "auroc_drop", "tpr_drop")
                                   if k in gate}
        rows.append(row)
    for runner in [*runners.values(), *encoders.values()]:
        runner.deactivate()
    cut_dir.cleanup()
    base = next((r for r in rows if (r["backend"], r["precision"], r["batch"]) == BASELINE), None)
    if base is None:
        base = max((r for r in rows if r["backend"] == "torch"), key=lambda r: r["batch"])
    for row in rows:
        row["speedup_vs_baseline"] = row["throughput"] / base["throughput"]
    best: dict[str, dict] = {}
    for row in rows:
        k = ":".join([row["backend"], row["precision"]] + [row[f] for f in ("score_kernel", "score_tail")
                                                           if row.get(f) not in (None, "torch", "standard")])
        if k not in best or row["throughput"] > best[k]["throughput"]:
            best[k] = {"throughput": row["throughput"], "batch": row["batch"], "device": kind,
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if record:
        with edit_manifest(bundle) as manifest:
            manifest.deployment.benchmarks = best
    info = machine()
    try:
        info["load_average_end"] = list(os.getloadavg())
    except OSError:
        pass
    return {"baseline": {"backend": base["backend"], "precision": base["precision"], "batch": base["batch"],
                         "throughput": base["throughput"], "style": "reference: eager no_grad forward per batch"},
            "rows": rows, "skipped": skipped, "machine": info, "rounds": rounds, "seconds_per_measurement": seconds,
            "images": int(len(images)), "bundle": str(bundle), "best": best}


def _option(row: dict) -> str:
    """A row's score kernel / score tail, for its label ("" for the defaults: torch ops, a standard-op engine)."""
    value = row.get("score_kernel") or row.get("score_tail") or ""
    return "" if value in ("torch", "standard") else value


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table (throughput, speed-up, latency percentiles, agreement)."""
    head = ("| backend | precision | batch | img/s | x baseline | mean ms | median ms | p90 ms | p95 ms | p99 ms "
            "| Spearman vs torch | max rel diff | encoder-alone img/s | detector / encoder |"
            "\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in sorted(result["rows"], key=lambda r: (r["backend"], r["precision"], _option(r), r["batch"])):
        lines.append(f"| {r['backend']} | {r['precision']}{f' ({_option(r)})' if _option(r) else ''} | {r['batch']} | {r['throughput']:.1f} | "
                     f"{r['speedup_vs_baseline']:.2f} | {r['latency_mean_ms']:.2f} | {r['latency_median_ms']:.2f} | "
                     f"{r['latency_p90_ms']:.2f} | {r['latency_p95_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
                     f"{r['spearman_vs_torch']:.5f} | {r['max_rel_diff_vs_torch']:.2e} | "
                     + (f"{r['encoder_alone_throughput']:.1f} | {r['detector_vs_encoder']:.2f} |"
                        if "encoder_alone_throughput" in r else "– | – |"))
    b = result["baseline"]
    lines.append(f"\nBaseline: {b['backend']} {b['precision']} batch {b['batch']} = {b['throughput']:.1f} img/s "
                 f"({b['style']}). Machine: {result['machine'].get('cpu')}, {result['machine'].get('cpu_count')} CPUs, "
                 f"load average at start {result['machine'].get('load_average_start')}.")
    for k, why in result["skipped"].items():
        lines.append(f"- not measured: {k}: {why}")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: str | Path) -> Path:
    """PNG bar chart: throughput per variant, one bar group per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    variants = sorted({(r["backend"], r["precision"], _option(r)) for r in rows})
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(batches), 4))
    for i, v in enumerate(variants):
        ys = [next((r["throughput"] for r in rows if (r["backend"], r["precision"], _option(r), r["batch"]) == (*v, b)),
                   0.0) for b in batches]
        ax.bar(np.arange(len(batches)) + i * width - 0.4 + width / 2, ys, width,
               label=f"{v[0]} {v[1]}" + (f" ({v[2]})" if v[2] else ""))
    ax.axhline(result["baseline"]["throughput"], color="k", lw=0.8, ls="--", label="baseline (torch eager b256)")
    ax.set_xticks(np.arange(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title("dede-rt scoring throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_reports(result: dict, json_path: str | Path | None = None, markdown_path: str | Path | None = None,
                  plot_path: str | Path | None = None) -> None:
    """Write the JSON rows, the Markdown table and the bar chart where asked."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(markdown_table(result))
    if plot_path:
        bar_chart(result, plot_path)


def prepare_bundle(bundle: str | Path | None, workdir: str | Path, clean: np.ndarray | None = None,
                   precisions: tuple[str, ...] = ("int8", "fp16"), log=print, model: str = "resnet18",
                   decoder_size: str = DEFAULT_DECODER_SIZE) -> Path:
    """The bundle to benchmark, with its ONNX export and calibrated variants (built once, then reused).

    ``bundle=None`` builds the speed bundle of ``model`` (``SPEED_MODELS``: random-init victim + a
    ``decoder_size`` decoder, the training default unless told) under ``workdir``.
    """
    from dede_rt.bundle import read_manifest
    from dede_rt.calibration.pipeline import calibrate_detector
    from dede_rt.data.demo import demo_dataset
    from dede_rt.engines.loaders import ensure_graph

    if clean is None:
        clean = demo_dataset(photo_count=400).images
    if bundle is None:
        speed_model_size(model)  # an unknown name fails before any work
        decoder_shape(decoder_size)  # so does an unknown decoder size
        bundle = Path(workdir) / f"bench-{model}-{decoder_size}-decoder"
        if not (bundle / "manifest.json").is_file():
            log(f"building the speed bundle (random-init {model} + {decoder_size} decoder) in {bundle}")
            build_bench_bundle(bundle, model, calibration=clean[:512], decoder_size=decoder_size)
    bundle = Path(bundle)
    ensure_graph(bundle, "detector", log)
    missing = tuple(p for p in precisions if p not in read_manifest(bundle).deployment.precisions)
    if missing:
        log(f"calibrating {', '.join(missing)}")
        calibrate_detector(bundle, clean, precisions=missing, warn=log)
    return bundle


def bench_command(bundle: str | Path | None, workdir: str | Path, *, batches: tuple[int, ...] = DEFAULT_BATCHES,
                  variants: tuple[tuple[str, str], ...] = DEFAULT_VARIANTS, seconds: float = 1.0, rounds: int = 3,
                  threads: int = 0, json_path: str | Path | None = None, markdown_path: str | Path | None = None,
                  plot_path: str | Path | None = None, score_kernels: tuple[str, ...] = (),
                  score_tails: tuple[str, ...] = (), log=print, model: str = "resnet18",
                  decoder_size: str = DEFAULT_DECODER_SIZE) -> dict:
    """Prepare the bundle (export + calibrate once), benchmark it and write the reports.

    ``model`` / ``decoder_size``: which speed bundle to build when ``bundle`` is None (``SPEED_MODELS``,
    ``DECODER_SIZES``).
    ``score_kernels`` / ``score_tails``: extra rows next to each torch / TensorRT variant with that score kernel
    (e.g. "triton") / engine score tail (e.g. "plugin"), so both forms are measured side by side.
    """

    from dede_rt.bundle import read_manifest
    from dede_rt.data.demo import demo_dataset
    from dede_rt.data.sources import ImageSet, resize_set
    from dede_rt.optional import require_onnx_export

    require_onnx_export("dede-rt bench (it exports and calibrates the bundle)")

    images = demo_dataset(photo_count=400).images
    expanded = expand_variants(variants, score_kernels, score_tails)  # a bad kernel/tail fails before any work
    calibrate = tuple(v[1] for v in variants if v[0] == "onnxruntime" and v[1] != "fp32")
    size = read_manifest(bundle).image_size if bundle is not None else speed_model_size(model)
    if size != images.shape[1]:
        images = resize_set(ImageSet(images), size).images
    path = prepare_bundle(bundle, workdir, images, calibrate, log=log, model=model, decoder_size=decoder_size)
    variants = expanded
    result = run_benchmark(path, images, batches, variants, seconds, rounds, threads, log=log)
    write_reports(result, json_path, markdown_path, plot_path)
    return result


def precision_quality(bundle: str | Path, clean: np.ndarray, test_clean: np.ndarray, test_triggered: np.ndarray,
                      count: int = 256, log=print, labels: np.ndarray | None = None,
                      triggered: np.ndarray | None = None) -> dict:
    """Detection quality of each precision on a labelled test split (clean = 0, triggered = 1) vs FP32.

    ``clean`` (disjoint from the test split) calibrates INT8 and the per-precision
    thresholds; the test split is only scored. ``triggered`` (disjoint from the test split too) makes the
    gates labelled ones, as ``dede-rt calibrate --triggered`` (and lets a failing INT8 search mixed precision).
    """
    from dede_rt.bundle import fpr_key, read_manifest
    from dede_rt.calibration.pipeline import calibrate_detector
    from dede_rt.engines.comparator import compare_scores, run_batched
    from dede_rt.engines.registry import make_runner
    from dede_rt.metrics import detection_report

    bundle = Path(bundle)
    calibration = calibrate_detector(bundle, clean, labels, triggered=triggered, count=count, warn=log)
    manifest = read_manifest(bundle)
    dep = manifest.deployment.precisions
    fpr = manifest.thresholds.default_fpr
    images = np.concatenate([test_clean, test_triggered])
    labels = np.r_[np.zeros(len(test_clean), int), np.ones(len(test_triggered), int)]
    rows, ref = [], None
    for backend, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                               ("onnxruntime", "fp16")):
        with make_runner(bundle, backend, precision) as runner:
            scores = run_batched(runner, images, 128)
        entry = dep[precision]
        # FP32's thresholds re-chosen on the same held-out set as the lower precisions': a like-for-like row.
        threshold = (entry.details["thresholds_heldout"] if precision == "fp32" else entry.thresholds)[fpr_key(fpr)]
        ref = scores if ref is None else ref
        report = detection_report(labels, scores, threshold)
        gate = entry.gate
        rows.append({"backend": backend, "precision": precision, "threshold": threshold, **report,
                     "spearman_vs_torch": compare_scores(ref, scores).spearman,
                     "gate": {"passed": gate.passed, "mode": gate.mode, "summary": gate.summary}})
    base = rows[0]["auroc"]
    for r in rows:
        r["auroc_delta_vs_torch_fp32"] = r["auroc"] - base
    return {"bundle": str(bundle), "test_clean": int(len(test_clean)), "test_triggered": int(len(test_triggered)),
            "calibration_clean": int(len(clean)), "calibration_triggered": 0 if triggered is None else int(len(triggered)),
            "fpr": fpr, "rows": rows,
            "gates": {p: e["gate"] for p, e in calibration.items()},
            "conversions": {p: e["conversion"] for p, e in calibration.items()}}

"""`dede-rt scan` benchmark: memory flatness and end-to-end throughput vs the runner alone, same run.

Detector for timing: resnet_small victim encoder (128-d, ~0.3 M params) + a
DeDe decoder of dim 128, 4 heads, 2 decoder blocks (1 MAE-encoder block, unused
at test time), patch 4, trained 1 epoch (weights do not change the timing).

1. Memory: peak RSS (``getrusage(RUSAGE_CHILDREN)`` of a wrapper process whose
   only child is the ``dede-rt scan`` CLI) over the first ``--n-small`` and over
   all ``--n-large`` generated 32x32 PNGs (one folder tree, ``--limit`` for the
   small run). Target: large/small <= 1.5.
2. Speed, 32x32 PNGs: end-to-end scan (discovery, decode pool, batching, the
   runner, CSV output) vs the same runner's ``infer`` on the same images already
   decoded in memory, same backend, batch size and inference threads. Runs are
   interleaved (runner, scan, runner, scan, ...) because the machine is shared;
   the same runner object serves both. Also CPU seconds per image (all threads)
   of each: runner CPU / scan CPU is the share of the scan's work that is
   inference, a contention-proof view of the overhead.
   Target: scan >= 85% of runner-only.
3. Speed, 256x256 JPEGs (JPEG draft mode decodes them at 1/8 scale).

Images go under ``--workdir`` (outside the repo). Example:

    nice -n 10 .venv/bin/python benchmarks/bench_scan.py --json benchmarks/results/scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

DECODER = {"dim": 128, "heads": 4, "encoder_depth": 1, "decoder_depth": 2, "patch_size": 4}


def build_detector(workdir: Path) -> Path:
    """A resnet_small + dim-128/2-block decoder bundle (trained 1 epoch: enough for timing)."""
    import torch

    from dede_rt.data.demo import demo_dataset
    from dede_rt.models.encoders import save_badencoder_checkpoint
    from dede_rt.models.resnet import build_resnet
    from dede_rt.training import TrainConfig, train_detector

    out = workdir / "detector"
    if (out / "manifest.json").is_file():
        return out
    torch.manual_seed(0)
    encoder = workdir / "victim.pth"
    save_badencoder_checkpoint(build_resnet("resnet_small").eval(), encoder)
    images = demo_dataset(photo_count=300).images[:1200]
    train_detector(encoder, images, out, decoder_config=DECODER, config=TrainConfig(epochs=1, batch_size=128),
                   holdout_fraction=0.2, progress=False)
    return out


def base_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Realistic-ish content: the embedded demo set (digits + photo crops), jittered so every file differs."""
    from dede_rt.data.demo import demo_dataset
    from dede_rt.data.images import resize_array

    demo = demo_dataset(photo_count=600).images
    rng = np.random.default_rng(seed)
    pick = demo[rng.integers(0, len(demo), n)]
    if size != demo.shape[1]:
        pick = np.stack([resize_array(im, size) for im in pick])
    noise = rng.integers(-6, 7, pick.shape, dtype=np.int16)
    return np.clip(pick.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_images(root: Path, n: int, size: int, fmt: str, per_dir: int = 1000) -> Path:
    """``n`` images under ``root`` in sub-folders of ``per_dir`` (reused when already complete)."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ext = "png" if fmt == "PNG" else "jpg"
    for start in range(0, n, 5000):
        chunk = base_images(min(5000, n - start), size, seed=start)
        for i, image in enumerate(chunk):
            k = start + i
            sub = root / f"d{k // per_dir:04d}"
            sub.mkdir(exist_ok=True)
            Image.fromarray(image).save(sub / f"{k:07d}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    marker.touch()
    return root


def peak_rss_mib(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, exit code) of ``cmd`` run as the only child of a fresh wrapper process."""
    wrapper = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
               "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, rc]))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    kib, seconds, rc = json.loads(out.stdout.strip().splitlines()[-1])
    return kib / 1024.0, seconds, rc


def memory_benchmark(detector: Path, images: Path, n_small: int, n_large: int, workdir: Path, batch: int) -> dict:
    """Peak RSS of CLI scans over n_small and n_large images of the same tree."""
    results = {}
    for label, limit in (("small", n_small), ("large", n_large)):
        out = workdir / f"mem-{label}.csv"
        for p in (out, out.with_suffix(".summary.json"), out.with_suffix(".hist.png")):
            p.unlink(missing_ok=True)
        cmd = [sys.executable, "-c", "from dede_rt.cli import main; main()", "scan", str(images), "--detector",
               str(detector), "--output", str(out), "--batch-size", str(batch), "--threads", "1", "--workers", "1",
               "--quiet", "--limit", str(limit)]
        rss, seconds, rc = peak_rss_mib(cmd)
        summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
        assert summary["counts"]["inputs"] == limit, summary["counts"]
        results[label] = {"images": limit, "peak_rss_mib": round(rss, 1), "wall_seconds": round(seconds, 1),
                          "exit_code": rc, "scan_images_per_second": summary["this_run"]["images_per_second"]}
        print(f"memory {label}: {limit} images, peak RSS {rss:.1f} MiB, {seconds:.0f} s", flush=True)
    results["ratio_large_over_small"] = round(results["large"]["peak_rss_mib"] / results["small"]["peak_rss_mib"], 3)
    results["target"] = "<= 1.5"
    results["passed"] = results["ratio_large_over_small"] <= 1.5
    return results


def load_arrays(root: Path, n: int, size: int) -> np.ndarray:
    """The first ``n`` images of the tree in scan order, decoded exactly as the scanner does."""
    from dede_rt.data.images import decode_image
    from dede_rt.data.sources import FolderSource

    out = []
    for item in FolderSource(root).items():
        if len(out) == n:
            break
        out.append(decode_image(item.path, size))
    return np.stack(out)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (decode processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def runner_only(runner, arrays: np.ndarray, batch: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of ``runner.infer`` over pre-decoded, pre-batched arrays."""
    batches = [np.ascontiguousarray(arrays[i : i + batch]) for i in range(0, len(arrays), batch)]
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        runner.infer(b)
    return len(arrays) / (time.perf_counter() - t0), (time.process_time() - c0) / len(arrays)


def scan_once(scanner, images: Path, n: int, out: Path) -> tuple[float, float, dict]:
    """(images/s, CPU seconds per image, stats) of the scan hot path: discovery, decode pool, batching, runner, CSV.

    The same loop as ``run_scan`` minus model loading and the end-of-scan summary (both once per scan).
    """
    import itertools

    from dede_rt.data.sources import open_source
    from dede_rt.scan.output import ResultWriter

    out.unlink(missing_ok=True)
    writer = ResultWriter(out)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for rows in scanner.batches(itertools.islice(open_source(images).items(), n)):
        writer.write(rows)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0  # includes reaped decode processes
    writer.close(finished=True)
    assert scanner.stats.inputs == n and scanner.stats.errors == 0
    return n / wall, cpu / n, scanner.stats.as_dict()


def speed_benchmark(detector: Path, images: Path, n: int, batch: int, backend: str, threads: int, workers: int,
                    pool: str, repeats: int, workdir: Path, label: str) -> dict:
    """Interleaved runner-only and end-to-end scan throughput on the first ``n`` images, same runner object."""
    from dede_rt.scan.pipeline import Scanner

    scanner = Scanner(detector, backend=backend, batch_size=batch, workers=workers, pool=pool, threads=threads)
    runner = scanner.runner
    arrays = load_arrays(images, n, scanner.size)
    runner.infer(arrays[:batch])  # warm-up
    run_rates, run_cpu, scan_rates, scan_cpu, shares = [], [], [], [], []
    for r in range(repeats):
        rate, cpu = runner_only(runner, arrays, batch)
        run_rates.append(rate)
        run_cpu.append(cpu)
        rate, cpu, stats = scan_once(scanner, images, n, workdir / f"speed-{label}.csv")
        scan_rates.append(rate)
        scan_cpu.append(cpu)
        shares.append(stats["inference_seconds"] / stats["seconds"])
        print(f"{label} repeat {r}: runner {run_rates[-1]:.0f} img/s, scan {scan_rates[-1]:.0f} img/s "
              f"(CPU/img runner {run_cpu[-1] * 1e3:.2f} ms, scan {scan_cpu[-1] * 1e3:.2f} ms)", flush=True)
    scanner.close()
    ratios = [s / r for s, r in zip(scan_rates, run_rates)]
    cpu_ratios = [r / s for r, s in zip(run_cpu, scan_cpu)]
    return {"images": n, "backend": scanner.backend, "precision": scanner.precision, "runner": scanner.describe(),
            "batch_size": batch, "inference_threads": threads, "decode_workers": workers, "pool": pool,
            "runner_only_img_s": [round(x, 1) for x in run_rates], "scan_img_s": [round(x, 1) for x in scan_rates],
            "ratio_per_repeat": [round(x, 3) for x in ratios], "ratio_median": round(statistics.median(ratios), 3),
            "ratio_of_medians": round(statistics.median(scan_rates) / statistics.median(run_rates), 3),
            "ratio_best_vs_best": round(max(scan_rates) / max(run_rates), 3),
            "cpu_ms_per_image_runner": [round(x * 1e3, 3) for x in run_cpu],
            "cpu_ms_per_image_scan": [round(x * 1e3, 3) for x in scan_cpu],
            "cpu_efficiency_median": round(statistics.median(cpu_ratios), 3),
            "inference_share_of_scan_wall_time": [round(x, 3) for x in shares]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dede-bench-scan"))
    parser.add_argument("--n-large", type=int, default=100_000)
    parser.add_argument("--n-small", type=int, default=10_000)
    parser.add_argument("--n-speed", type=int, default=1500)
    parser.add_argument("--n-jpeg", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="torch", help="comma-separated backends to time")
    parser.add_argument("--threads", default="1", type=lambda t: [int(x) for x in t.split(",")],
                        help="inference thread counts to time (comma-separated)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    from dede_rt.bundle import versions

    detector = build_detector(args.workdir)
    result: dict = {"benchmark": "scan", "detector": {"encoder": "resnet_small (128-d)", "decoder": DECODER},
                    "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                                "platform": platform.platform(), "cuda": torch.cuda.is_available()},
                    "versions": versions(), "speed": {}}
    png = write_images(args.workdir / "png32", max(args.n_large if not args.skip_memory else 0, args.n_speed), 32, "PNG")
    jpg = write_images(args.workdir / "jpg256", args.n_jpeg, 256, "JPEG")
    for backend in args.backends.split(","):
        for threads, workers, pool in [(t, 1, "thread") for t in args.threads] + [(1, 1, "process")]:
            label = f"png32-{backend}-t{threads}-{pool}"
            result["speed"][label] = speed_benchmark(detector, png, args.n_speed, args.batch_size, backend, threads,
                                                     workers, pool, args.repeats, args.workdir, label)
        for pool in ("thread", "process"):
            label = f"jpg256-{backend}-t1-{pool}"
            result["speed"][label] = speed_benchmark(detector, jpg, args.n_jpeg, args.batch_size, backend, 1, 1, pool,
                                                     args.repeats, args.workdir, label)
    if not args.skip_memory:
        result["memory"] = memory_benchmark(detector, png, args.n_small, args.n_large, args.workdir, args.batch_size)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

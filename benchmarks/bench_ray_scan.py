"""Distributed scan benchmark: the local scan vs ``dede_rt.scan.distributed.run`` with 1 and 2 actors.

Same inputs for all: ``--images`` 32x32 PNGs from ``dede_rt.data.demo.demo_dataset``
(jittered so every file differs), written under ``--workdir``. Same detector: the
reference-shaped speed bundle (random-init ResNet18 + 12/4-block decoder,
``dede_rt.bench.build_bench_bundle``) calibrated to ONNX Runtime INT8 Q/DQ
(``calibrate_detector``), scored with ``--backend onnxruntime --precision int8``,
one inference thread per runner, batch 64.

Ray runs on a local cluster started here (``ray.init(num_cpus=2)``: this machine
has 2 cores, shared with other work, so load averages are recorded):
- 1 actor: 1 CPU for the actor, 1 CPU for decode tasks;
- 2 actors: 0.5 CPU each and 0.5 CPU for decode tasks (2 cores oversubscribed:
  this shows the plumbing, not scaling; scaling needs more cores).
Each configuration runs ``--rounds`` times, interleaved (local, ray1, ray2, local, ...).
Reported per run: wall img/s (end to end, including actor start-up and the
summary), steady img/s (rows after the first chunk / time after the first chunk,
i.e. without the one-off actor start), and each worker's peak RSS.
Overhead at 1 actor = 1 - ray1/local on the medians (wall and steady).

    nice -n 10 .venv/bin/python benchmarks/bench_ray_scan.py --json benchmarks/results/ray_scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_pngs(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 32x32 PNGs (demo set, +-6 noise so files differ) in folders of 500; reused when present."""
    from dede_rt.data.demo import demo_dataset

    folder = root / f"png32-{n}"
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    demo = demo_dataset(photo_count=600).images
    rng = np.random.default_rng(seed)
    pick = demo[rng.integers(0, len(demo), n)]
    noisy = np.clip(pick.astype(np.int16) + rng.integers(-6, 7, pick.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    for i, image in enumerate(noisy):
        sub = folder / f"d{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:06d}.png")
    return folder


def bundle_with_int8(workdir: Path, log=print) -> tuple[Path, str]:
    """The speed bundle with an INT8 ONNX model (built once); ('int8' or 'fp32' when INT8 could not be built)."""
    from dede_rt.bench import prepare_bundle
    from dede_rt.bundle import read_manifest

    bundle = prepare_bundle(None, workdir, precisions=("int8",), log=log)
    return bundle, "int8" if "int8" in read_manifest(bundle).deployment.precisions else "fp32"


def decode_rate(src: Path, size: int) -> float:
    """Decode-only img/s on one core: the local scan's decode_chunk over every file, no inference."""
    from dede_rt.data.sources import open_source
    from dede_rt.scan.decode import decode_chunk

    items = list(open_source(src).items())
    t0 = time.perf_counter()
    for i in range(0, len(items), 64):
        decode_chunk(items[i:i + 64], size, None)
    return len(items) / (time.perf_counter() - t0)


def local_run(src: Path, bundle: Path, precision: str, out: Path) -> dict:
    from dede_rt.scan.pipeline import run_scan

    t0 = time.perf_counter()
    s = run_scan(src, bundle, out, progress=False, backend="onnxruntime", precision=precision, threads=1, workers=1,
                 batch_size=64)
    wall = time.perf_counter() - t0
    import resource

    return {"mode": "local", "images": s["counts"]["inputs"], "wall_s": round(wall, 3),
            "wall_img_s": round(s["counts"]["inputs"] / wall, 1),
            "steady_img_s": s["this_run"]["images_per_second"],
            "runner_img_s": s["this_run"]["runner_images_per_second"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "flagged": s["counts"]["flagged"]}


def ray_run(src: Path, bundle: Path, precision: str, out: Path, actors: int, partition: int) -> dict:
    from dede_rt.scan.distributed import run

    cpus = 1.0 if actors == 1 else 0.5
    marks: list[tuple[float, int]] = []
    t0, t0_wall = time.perf_counter(), time.time()
    s = run(src, bundle, out, backend="onnxruntime", precision=precision, threads=1, batch_size=64, actors=actors,
            cpus_per_actor=cpus, decode_cpus=cpus, partition_size=partition, progress=False,
            on_chunk=lambda rec: marks.append((rec["finished_at"], rec["rows"])))
    wall = time.perf_counter() - t0
    n = s["counts"]["inputs"]
    # Steady rate from the actors' own clocks (records reach the driver in bursts): rows after the first
    # chunk over the time from the first chunk's end to the last one's.
    marks.sort()
    first_t, first_rows = marks[0]
    steady = (n - first_rows) / max(marks[-1][0] - first_t, 1e-9)
    return {"mode": f"ray-{actors}-actor", "images": n, "wall_s": round(wall, 3), "wall_img_s": round(n / wall, 1),
            "steady_img_s": round(steady, 1), "first_chunk_after_s": round(first_t - t0_wall, 3),
            "actor_init_s": round(s["ray"]["actor_init_seconds"], 3),
            "scoring_s_in_actors": s["this_run"]["inference_seconds"],
            "partitions": s["ray"]["partitions"], "actor_pids": s["ray"]["actor_pids"],
            "peak_rss_mb": s["ray"]["peak_rss_mb"], "flagged": s["counts"]["flagged"], "runner": s["runner"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--partition-size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "dede-rt" / "bench")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ray_scan.json"))
    args = parser.parse_args()

    import ray

    args.workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    bundle, precision = bundle_with_int8(args.workdir)
    src = write_pngs(args.workdir, args.images)
    from dede_rt.bundle import read_manifest

    decode = [round(decode_rate(src, read_manifest(bundle).image_size), 1) for _ in range(2)]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    runs: list[dict] = []
    scratch = args.workdir / "ray-scan-out"
    for r in range(args.rounds):
        for mode in ("local", "ray1", "ray2"):
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            load = os.getloadavg()[0]
            if mode == "local":
                row = local_run(src, bundle, precision, scratch / "local.csv")
            else:
                row = ray_run(src, bundle, precision, scratch / "ray.parquet", int(mode[-1]), args.partition_size)
            row.update({"round": r, "load_1min_before": round(load, 2)})
            runs.append(row)
            print(json.dumps(row))
    ray.shutdown()

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode)

    result = {
        "benchmark": "ray_scan",
        "detector": "random-init resnet18 + reference 12/4-block decoder (dede_rt.bench speed bundle)",
        "backend": f"onnxruntime {precision}" + ("" if precision == "int8" else " (INT8 could not be built)"),
        "images": args.images, "image": "32x32 PNG", "batch_size": 64, "inference_threads_per_runner": 1,
        "partition_size": args.partition_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "versions": {"ray": ray.__version__, **__import__("dede_rt.bundle", fromlist=["versions"]).versions()},
        "decode_only_img_s_one_core": decode,
        "runs": runs,
        "median": {m: {"wall_img_s": med(m, "wall_img_s"), "steady_img_s": med(m, "steady_img_s")}
                   for m in ("local", "ray-1-actor", "ray-2-actor")},
    }
    local_wall, ray_wall = med("local", "wall_s"), med("ray-1-actor", "wall_s")
    result["overhead_1_actor"] = {
        "wall": round(ray_wall / local_wall - 1, 3),
        "steady": round(1 - med("ray-1-actor", "steady_img_s") / med("local", "steady_img_s"), 3),
        "target": "<= 0.25 of the local scan's time",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "overhead_1_actor")}, indent=2))


if __name__ == "__main__":
    main()

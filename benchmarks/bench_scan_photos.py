"""Scanning full-size photos at 224 px: decode time and inference time separated, same run, same machine.

Photos: ``--count`` JPEGs of 1-4 MP in mixed aspect ratios (landscape 4:3 / 16:9, portrait 2:3, square),
smooth random content plus sensor-like noise (so JPEG sizes are photo-like), written under ``--workdir``.
Detector: a 224-px speed bundle of ``dede-rt bench`` (random-init ``--model``, reference-width decoder with patch
32, the family's preprocessing: shorter side 256 bilinear + centre 224 for resnet50-224).

Measured, interleaved over ``--rounds``:
1. decode only: the scanner's DecodePool (Pillow draft mode, shorter-side resize, centre crop) over the folder,
   ``--workers`` threads; also one thread, and the same files decoded without draft mode (full-size decode).
2. inference only: the backend's runner on the already decoded [N, 224, 224, 3] uint8 arrays.
3. end to end: the scanner over the folder (discovery, decode pool, batching, runner, rows), from its first
   item (the runner's load is reported apart); the scan's own split (time inside the runner vs waiting for
   decoded images) is reported too.

    .venv/bin/python benchmarks/bench_scan_photos.py --json benchmarks/results/scan_photos_224.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = [(2048, 1536), (1920, 1080), (1200, 1800), (1600, 1600), (2304, 1728), (1280, 960), (1000, 1500)]


def write_photos(folder: Path, count: int, seed: int = 0) -> list[dict]:
    """``count`` JPEGs of 1-4 MP (reused when present); returns their sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        w, h = SHAPES[i % len(SHAPES)]
        path = folder / f"{i:04d}.jpg"
        if not path.is_file():
            coarse = rng.integers(0, 255, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
            image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(path, quality=90)
        sizes.append({"width": w, "height": h, "bytes": path.stat().st_size})
    return sizes


def decode_seconds(folder: Path, pixels, workers: int, draft: bool = True) -> tuple[float, np.ndarray]:
    """Wall seconds to decode every file of ``folder`` as the scanner does (or, ``draft=False``, at full size)."""
    from dede_rt.data.sources import open_source
    from dede_rt.scan.decode import DecodePool

    if not draft:
        t0 = time.perf_counter()
        out = [pixels.apply(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))]
        return time.perf_counter() - t0, np.stack(out)
    t0 = time.perf_counter()
    with DecodePool(pixels, workers=workers) as pool:
        out = [image for _, image, _ in pool.map(open_source(folder).items())]
    return time.perf_counter() - t0, np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50-224")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dede-bench-photos"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from dede_rt.bench import machine, prepare_bundle
    from dede_rt.bundle import read_manifest
    from dede_rt.engines.registry import make_runner
    from dede_rt.data.sources import open_source
    from dede_rt.scan.pipeline import Scanner

    sizes = write_photos(args.workdir / "photos", args.count)
    folder = args.workdir / "photos"
    precisions = () if args.precision == "fp32" else (args.precision,)
    pixels_rule = None
    bundle = prepare_bundle(None, args.workdir, None, precisions, model=args.model)
    pixels_rule = read_manifest(bundle).pixels
    rounds = []
    for r in range(args.rounds):
        dec_s, images = decode_seconds(folder, pixels_rule, args.workers)
        dec1_s, _ = decode_seconds(folder, pixels_rule, 1)
        full_s, full = decode_seconds(folder, pixels_rule, 1, draft=False) if r == 0 else (None, None)
        with make_runner(bundle, args.backend, args.precision, batch_size=args.batch_size) as runner:
            runner.infer(images[: args.batch_size])  # warm-up
            t0 = time.perf_counter()
            for lo in range(0, len(images), args.batch_size):
                runner.infer(images[lo: lo + args.batch_size])
            infer_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with Scanner(bundle, args.backend, args.precision, batch_size=args.batch_size, workers=args.workers) as scanner:
            load_s = time.perf_counter() - t0
            rows = [row for batch in scanner.batches(open_source(folder).items()) for row in batch]
            stats = scanner.stats
        assert len(rows) == args.count and all(row.error is None for row in rows)
        entry = {"decode_seconds": dec_s, "decode_1_thread_seconds": dec1_s, "inference_seconds": infer_s,
                 "scan_seconds": stats.seconds, "scan_runner_load_seconds": load_s,
                 "scan_inference_seconds": stats.inference_seconds, "scan_decode_wait_seconds": stats.wait_seconds}
        if full_s is not None:
            entry["decode_no_draft_1_thread_seconds"] = full_s
            entry["draft_vs_full_decode_max_abs_pixel_diff"] = int(np.abs(full.astype(int) - images.astype(int)).max())
        rounds.append(entry)
        print(json.dumps({k: round(v, 3) for k, v in entry.items()}), flush=True)
    n = args.count
    best = {k: min(r[k] for r in rounds if k in r) for k in rounds[0]}
    result = {
        "benchmark": "scan of full-size JPEGs at 224 px: decode vs inference",
        "machine": machine(), "model": args.model, "backend": args.backend, "precision": args.precision,
        "batch_size": args.batch_size, "workers": args.workers, "images": n,
        "megapixels": {"min": min(s["width"] * s["height"] for s in sizes) / 1e6,
                       "max": max(s["width"] * s["height"] for s in sizes) / 1e6},
        "mean_file_kib": sum(s["bytes"] for s in sizes) / n / 1024,
        "pixels": {"size": pixels_rule.size, "mode": pixels_rule.mode, "resize_to": pixels_rule.resize_to,
                   "interpolation": pixels_rule.interpolation},
        "rounds": rounds,
        "best": {
            "decode_images_per_second": n / best["decode_seconds"],
            "decode_1_thread_images_per_second": n / best["decode_1_thread_seconds"],
            "decode_no_draft_1_thread_images_per_second": n / best["decode_no_draft_1_thread_seconds"],
            "inference_images_per_second": n / best["inference_seconds"],
            "scan_images_per_second": n / best["scan_seconds"],
            "scan_over_inference": best["inference_seconds"] / best["scan_seconds"],
            "scan_runner_load_seconds": best["scan_runner_load_seconds"],
            "scan_share_waiting_for_decode": best["scan_decode_wait_seconds"] / best["scan_seconds"],
            "decode_ms_per_image_1_thread": 1e3 * best["decode_1_thread_seconds"] / n,
            "inference_ms_per_image": 1e3 * best["inference_seconds"] / n,
        },
        "note": "2 CPU cores shared by decoding and inference: the scan overlaps them, so scan time is bounded "
                "below by max(decode, inference) and above by their sum",
    }
    print(json.dumps(result["best"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

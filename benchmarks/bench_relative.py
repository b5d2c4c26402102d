"""What the relative and combined scores cost: the same speed bundle scored with the summed (reference), the
relative and the combined score.

Both bundles hold the same random-init weights (ResNet18-CIFAR victim + the
reference 12/4-block decoder, seed 0); the relative one adds K = 256 prototype
reconstructions and averages the k = 32 best-fitting (the product defaults); the
combined one adds the standardized summed and relative scores (two constants each).
Per backend x precision x batch size the two are timed alternately, round by
round, and the JSON gives throughput for both and the ratio relative /
reference measured in the same run.

    python benchmarks/bench_relative.py        # writes benchmarks/results/relative_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dede_rt.bench import build_bench_bundle, machine, prepare_bundle, run_benchmark
from dede_rt.data.demo import demo_dataset
from dede_rt.scoring import PROTOTYPES, RELATIVE_K

RESULTS = Path(__file__).parent / "results"
VARIANTS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))


def main() -> None:
    """Build (once) both bundles, time them alternately and write the comparison."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dede-rt-bench"))
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "relative_cost_cpu.json")
    args = ap.parse_args()
    images = demo_dataset(photo_count=400).images
    bundles = {}
    for kind, k in (("reference", 0), ("relative", RELATIVE_K), ("combined", RELATIVE_K)):
        path = args.workdir / f"bench-resnet18-{kind}"
        if not (path / "manifest.json").is_file():
            build_bench_bundle(path, calibration=images[:512], relative_k=k, prototypes=PROTOTYPES,
                               combined=kind == "combined")
        bundles[kind] = prepare_bundle(path, args.workdir, images, ("int8",))
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    samples: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for kind, path in bundles.items():
            result = run_benchmark(path, images, batches, VARIANTS, args.seconds, 1, record=False, log=lambda _: None)
            for row in result["rows"]:
                key = (kind, row["backend"], row["precision"], row["batch"])
                samples.setdefault(key, []).append(row["throughput"])
    rows = []
    for (kind, backend, precision, batch), values in sorted(samples.items()):
        if kind != "reference":
            continue
        ref = statistics.median(values)
        rel = statistics.median(samples[("relative", backend, precision, batch)])
        com = statistics.median(samples[("combined", backend, precision, batch)])
        rows.append({"backend": backend, "precision": precision, "batch": batch,
                     "reference_images_per_s": round(ref, 1), "relative_images_per_s": round(rel, 1),
                     "relative_over_reference": round(rel / ref, 3), "combined_images_per_s": round(com, 1),
                     "combined_over_reference": round(com / ref, 3)})
        print(f"{backend:12s} {precision:5s} batch {batch:4d}: reference {ref:8.1f} img/s, relative {rel:8.1f} img/s "
              f"({rel / ref:.3f}x), combined {com:8.1f} img/s ({com / ref:.3f}x)")
    args.out.write_text(json.dumps({"machine": machine(), "prototypes": PROTOTYPES, "k": RELATIVE_K,
                                    "rounds": args.rounds, "seconds": args.seconds, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

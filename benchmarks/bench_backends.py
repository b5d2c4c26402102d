"""Scoring throughput of every backend x precision x batch size, one run, ratios against torch eager FP32.

Default subject: a ResNet18-CIFAR victim with the reference decoder (12 + 4
blocks, dim 192; only the 4 decoder blocks are in the test-time graph),
random-init weights: speed does not depend on the weights. The bundle is built,
exported and calibrated (INT8 Q/DQ, FP16) once under --workdir and reused.
Baseline: torch eager FP32 at batch 256, as the reference code scores.
Variants are timed round-robin so a busy shared machine slows all alike.

    python benchmarks/bench_backends.py                       # writes benchmarks/results/backends_cpu.*
    python benchmarks/bench_backends.py --detector DET --batch-sizes 32,64 --rounds 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dede_rt.bench import DEFAULT_VARIANTS, bench_command

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Parse arguments, run the benchmark, write JSON + Markdown + PNG."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", type=Path, default=None, help="bundle to benchmark (default: the speed bundle)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dede-rt-bench"))
    ap.add_argument("--batch-sizes", default="1,32,64,256")
    ap.add_argument("--seconds", type=float, default=1.5, help="seconds per measurement per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="backends_cpu", help="results file stem under benchmarks/results/")
    ap.add_argument("--quality-detector", type=Path, default=None,
                    help="a detector trained by `dede-rt demo`: measure each precision's AUROC/TPR on the demo's "
                         "test split (writes <name>_quality.json) instead of timing")
    args = ap.parse_args()
    if args.quality_detector is not None:
        quality(args.quality_detector, RESULTS / f"{args.name}_quality.json")
        return
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.name
    bench_command(args.detector, args.workdir, batches=tuple(int(b) for b in args.batch_sizes.split(",")),
                  variants=DEFAULT_VARIANTS, seconds=args.seconds, rounds=args.rounds, threads=args.threads,
                  json_path=f"{stem}.json", markdown_path=f"{stem}.md", plot_path=f"{stem}.png")
    print((stem.with_suffix(".md")).read_text())


def quality(detector: Path, out: Path) -> None:
    """Per-precision detection quality on the demo victim's seeded test split (same split as `dede-rt demo`)."""
    import json
    import shutil

    from dede_rt.bench import precision_quality
    from dede_rt.data.transforms import Normalization
    from dede_rt.data.triggers import white_square
    from dede_rt.demo import TARGET_CLASS, DemoSettings, demo_splits

    work = Path("/tmp/dede-rt-bench/quality") / detector.name
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(detector, work, ignore=shutil.ignore_patterns("checkpoints"))
    data, _, cal_idx, test_idx = demo_splits(DemoSettings(), Normalization())
    test = data.images[test_idx]
    triggered = white_square().stamp(test[data.labels[test_idx] != TARGET_CLASS])
    # The gates are labelled ones: calibration-split images, clean and white-square stamped (never the test
    # split), so a gate can see TPR, which a clean-only rank gate cannot, and a failing INT8 can search mixed
    # precision on them.
    cal = data.images[cal_idx]
    stamped = white_square().stamp(cal[data.labels[cal_idx] != TARGET_CLASS])
    result = precision_quality(work, cal, test, triggered, labels=data.labels[cal_idx], triggered=stamped)
    result["labelled_gates"] = result.pop("gates")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["rows"]:
        print(f"{r['backend']:12s} {r['precision']}: AUROC {r['auroc']:.4f} (delta {r['auroc_delta_vs_torch_fp32']:+.4f}), "
              f"TPR@thr {r['tpr_at_threshold']:.3f}, FPR@thr {r['fpr_at_threshold']:.3f}, "
              f"Spearman vs torch {r['spearman_vs_torch']:.5f}")
    for p, g in result["labelled_gates"].items():
        print(f"labelled gate {p}: {'PASSED' if g['passed'] else 'FAILED'} ({g['summary']})")
    mixed = result["conversions"].get("int8", {}).get("mixed_precision")
    if mixed:
        print(f"int8 mixed-precision search: {'found' if mixed['found'] else 'none'} {mixed['float_layers']} "
              f"{mixed['images_per_second']} ({mixed['seconds']} s)")


if __name__ == "__main__":
    main()

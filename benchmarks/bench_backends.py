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
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / args.name
    bench_command(args.detector, args.workdir, tuple(int(b) for b in args.batch_sizes.split(",")), DEFAULT_VARIANTS,
                  args.seconds, args.rounds, args.threads, f"{stem}.json", f"{stem}.md", f"{stem}.png")
    print((stem.with_suffix(".md")).read_text())


if __name__ == "__main__":
    main()

"""The decoder's qkv-bias default on the demo victim: AUROC / TPR with and without the bias, same victim and splits.

Usage: python benchmarks/demo_qkv_bias.py --victim demo-output/victim_badencoder.pth [--seeds 1]
Trains the demo decoder (DEMO_DECODER, the demo's epochs) on the demo's training split, thresholds on its
held-out split, and scores the demo's test split (clean + white-square triggered), once per setting.
Writes benchmarks/results/demo_qkv_bias.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import white_square
from dede_rt.demo import DEMO_DECODER, TARGET_CLASS, DemoSettings, demo_splits
from dede_rt.metrics import detection_report
from dede_rt.training import TrainConfig, train_detector

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run both settings and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    settings, norm = DemoSettings(), Normalization()
    data, train_idx, cal_idx, test_idx = demo_splits(settings, norm)
    clean = data.images[test_idx]
    triggered = white_square(norm.image_size).stamp(clean[data.labels[test_idx] != TARGET_CLASS])
    labels = np.r_[np.zeros(len(clean), int), np.ones(len(triggered), int)]
    rows = []
    for qkv_bias in (True, False):
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            det = train_detector(args.victim, data.images[train_idx], None, normalization=norm,
                                 decoder_config={**DEMO_DECODER, "qkv_bias": qkv_bias},
                                 config=TrainConfig(epochs=settings.decoder_epochs, seed=21 + seed),
                                 threshold_data=data.images[cal_idx], progress=False)
            scores = np.r_[det.score(clean), det.score(triggered)]
            rows.append({"qkv_bias": qkv_bias, "seed": 21 + seed, "train_seconds": round(time.perf_counter() - t0, 1),
                         **detection_report(labels, scores, det.threshold(0.01))})
            print(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_qkv_bias.json").write_text(json.dumps({"victim": str(args.victim), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

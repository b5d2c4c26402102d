"""The honesty rows for the demo victim (DESIGN.md, "Evaluating honestly").

On the demo's own splits, after `make demo` (or `dede-rt demo --out DIR`):
- DeDe on the BadEncoder victim (raw embeddings), as the demo;
- DeDe on the same victim with L2-normalized embeddings (norm tricks removed);
- DeDe on the CLEAN encoder (before the backdoor) with the same triggered
  images: the control; the detection that counts is the margin over it;
- the embedding-norm baseline on the same sets (trivial when BadEncoder
  inflates triggered norms; 0.5 by construction on L2-normalized embeddings).
Each DeDe row: mean and spread over ``--seeds`` decoder seeds; AUROC/AUPRC,
TPR@1%FPR, and TPR/FPR at the threshold calibrated on clean held-out images.

    python benchmarks/demo_controls.py --demo-dir demo-output --json benchmarks/results/demo_controls.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import white_square
from dede_rt.demo import DEMO_DECODER, TARGET_CLASS, DemoSettings, demo_splits
from dede_rt.metrics import detection_report
from dede_rt.models.encoders import load_encoder
from dede_rt.training import TrainConfig, train_detector


def norm_baseline(encoder_path: Path, l2: bool, clean: np.ndarray, triggered: np.ndarray, norm: Normalization) -> float:
    """AUROC of the embedding L2 norm as a score."""
    enc, _ = load_encoder(encoder_path, l2_normalize=l2)
    with torch.no_grad():
        s = [enc(norm.apply(x)).norm(dim=1).numpy() for x in (clean, triggered)]
    labels = np.r_[np.zeros(len(s[0])), np.ones(len(s[1]))]
    return detection_report(labels, np.r_[s[0], s[1]])["auroc"]


def main() -> None:
    """Train the control detectors and write the table as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=Path("demo-output"))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=DemoSettings().decoder_epochs)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/demo_controls.json"))
    args = ap.parse_args()
    norm, settings = Normalization(), DemoSettings()
    data, train_idx, cal_idx, test_idx = demo_splits(settings, norm)
    clean = data.images[test_idx]
    triggered = white_square().stamp(clean[data.labels[test_idx] != TARGET_CLASS])
    labels = np.r_[np.zeros(len(clean)), np.ones(len(triggered))]
    rows = []
    setups = [("BadEncoder victim", "victim_badencoder.pth", False), ("BadEncoder victim, L2-normalized", "victim_badencoder.pth", True),
              ("clean encoder (control)", "clean_encoder.pth", False)]
    for name, file, l2 in setups:
        path = args.demo_dir / file
        runs = []
        for seed in range(args.seeds):
            det = train_detector(path, data.images[train_idx], None, normalization=norm, decoder_config=DEMO_DECODER,
                                 config=TrainConfig(epochs=args.epochs, seed=21 + seed), l2_normalize=l2,
                                 threshold_data=data.images[cal_idx], progress=False)
            runs.append(detection_report(labels, np.r_[det.score(clean), det.score(triggered)], det.threshold(0.01)))
        row = {"setting": name, "l2_normalize": l2, "seeds": args.seeds, "embedding_norm_auroc": norm_baseline(path, l2, clean, triggered, norm)}
        for key in runs[0]:
            vals = np.array([r[key] for r in runs])
            row[key] = round(float(vals.mean()), 4)
            row[f"{key}_spread"] = round(float(vals.max() - vals.min()), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "demo victim honesty rows", "decoder": DEMO_DECODER,
                                     "decoder_epochs": args.epochs, "test_clean": len(clean),
                                     "test_triggered": len(triggered), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The end-to-end demo on embedded data: build a backdoored victim, train a detector, scan a folder.

Steps (all seeded, CPU, a few minutes on 2 cores):
1. demo data: colourised scikit-learn digits + crops of bundled photos (32 px);
2. victim: SimCLR pre-training of a small CIFAR ResNet, then a BadEncoder
   fine-tune with the reference trigger (10x10 white square at rows/cols
   21-30), target = digit "0"; saved in BadEncoder's checkpoint layout;
3. detector: ``train_detector`` on clean images, threshold at 1% FPR on a
   clean held-out split;
4. scan: a folder of clean and triggered PNGs; AUROC, flagged files, plots.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dede_rt.research.attacks.badencoder import BadEncoderConfig, badencoder_finetune
from dede_rt.research.attacks.simclr import SimCLRConfig, train_simclr
from dede_rt.data.demo import demo_dataset
from dede_rt.data.sources import ImageSet
from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import white_square
from dede_rt.metrics import detection_report
from dede_rt.models.decoder_sizes import DECODER_SIZES
from dede_rt.models.encoders import save_badencoder_checkpoint
from dede_rt.models.resnet import build_resnet
from dede_rt.scan import read_rows, run_scan
from dede_rt.training import TrainConfig, train_detector

TARGET_CLASS = 0  # digit "0": triggered images are pulled toward its embeddings
# The small size by name, not whatever the default is: the demo's README numbers are this shape's.
DEMO_DECODER = {**DECODER_SIZES["small"], "patch_size": 4}


@dataclass
class DemoSettings:
    """Sizes and lengths of the demo's steps."""

    photo_count: int = 2400
    simclr_epochs: int = 12
    badencoder_epochs: int = 20
    decoder_epochs: int = 60
    calibration_images: int = 500
    test_images: int = 400
    shadow_images: int = 1000

    @classmethod
    def fast(cls) -> DemoSettings:
        """Seconds-long settings for smoke tests (detection is weak)."""
        return cls(photo_count=400, simclr_epochs=1, badencoder_epochs=1, decoder_epochs=1,
                   calibration_images=100, test_images=60, shadow_images=128)


def _say(msg: str) -> None:
    print(msg, flush=True)


def build_demo_victim(images: np.ndarray, labels: np.ndarray, out: Path, settings: DemoSettings,
                      norm: Normalization) -> tuple[Path, Path]:
    """SimCLR-pretrain a resnet_small, then BadEncoder it; returns (clean, victim) checkpoint paths."""
    torch.manual_seed(0)
    backbone = build_resnet("resnet_small")
    t0 = time.perf_counter()
    train_simclr(backbone, backbone.embed_dim, images, normalization=norm,
                 config=SimCLRConfig(epochs=settings.simclr_epochs))
    _say(f"  SimCLR pre-training: {settings.simclr_epochs} epochs on {len(images)} images, {time.perf_counter() - t0:.0f} s")
    clean_path, victim_path = out / "clean_encoder.pth", out / "victim_badencoder.pth"
    save_badencoder_checkpoint(backbone, clean_path)
    rng = np.random.default_rng(1)
    reference = images[rng.choice(np.flatnonzero(labels == TARGET_CLASS), 3, replace=False)]
    shadow = images[rng.choice(len(images), min(settings.shadow_images, len(images)), replace=False)]
    t0 = time.perf_counter()
    victim = badencoder_finetune(backbone, shadow, reference, trigger=white_square(norm.image_size),
                                 normalization=norm, config=BadEncoderConfig(epochs=settings.badencoder_epochs))
    _say(f"  BadEncoder fine-tuning: {settings.badencoder_epochs} epochs on {len(shadow)} shadow images, "
         f"{time.perf_counter() - t0:.0f} s")
    save_badencoder_checkpoint(victim, victim_path, settings.badencoder_epochs)
    return clean_path, victim_path


def demo_splits(settings: DemoSettings, norm: Normalization) -> tuple[ImageSet, np.ndarray, np.ndarray, np.ndarray]:
    """The demo data and its seeded (train, calibration, test) index split."""
    data = demo_dataset(norm.image_size, settings.photo_count)
    order = np.random.default_rng(0).permutation(len(data))
    n_test, n_cal = settings.test_images, settings.calibration_images
    return data, order[n_test + n_cal :], order[n_test : n_test + n_cal], order[:n_test]


def write_scan_folder(folder: Path, clean: np.ndarray, triggered: np.ndarray) -> None:
    """PNG files under folder/clean and folder/triggered."""
    for sub, images in (("clean", clean), ("triggered", triggered)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / sub / f"{i:04d}.png")


def run_demo(out: str | Path = "demo-output", fast: bool = False) -> dict:
    """Run the whole demo into ``out``; returns the summary it also writes to out/summary.json."""
    from dede_rt import plots
    from dede_rt.reconstruct import reconstruct

    start = time.perf_counter()
    settings = DemoSettings.fast() if fast else DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    norm = Normalization()
    trigger = white_square(norm.image_size)

    _say("[1/4] demo data (scikit-learn digits + bundled photos)")
    data, train_idx, cal_idx, test_idx = demo_splits(settings, norm)
    n_test, n_cal = len(test_idx), len(cal_idx)
    _say(f"  {len(train_idx)} training, {n_cal} calibration, {n_test} test images")

    _say("[2/4] victim: SimCLR encoder + BadEncoder backdoor (white 10x10 square -> digit 0)")
    clean_path, victim_path = build_demo_victim(data.images[train_idx], data.labels[train_idx], out, settings, norm)

    _say("[3/4] detector: decoder on cached embeddings, threshold at 1% FPR on clean held-out images")
    detector = train_detector(
        victim_path, data.images[train_idx], out / "detector", normalization=norm, decoder_config=DEMO_DECODER,
        config=TrainConfig(epochs=settings.decoder_epochs), threshold_data=data.images[cal_idx])
    _say(f"  {detector.sections['training']['epochs_run']} epochs in {detector.sections['training']['train_seconds']:.0f} s "
         f"(embeddings computed once in {detector.sections['training']['embed_seconds']:.1f} s)")

    _say("[4/4] scan: clean + triggered test images written as PNG files")
    test_clean = data.images[test_idx]
    non_target = data.labels[test_idx] != TARGET_CLASS  # triggering a target-class image proves nothing
    test_triggered = trigger.stamp(test_clean[non_target])
    scan_dir = out / "scan-input"
    write_scan_folder(scan_dir, test_clean, test_triggered)
    scan_csv = out / "scan.csv"
    scan_csv.unlink(missing_ok=True)
    scan_summary = run_scan(scan_dir, out / "detector", scan_csv, backend="torch", progress=False, log=_say)
    rows = [r for r in read_rows(scan_csv) if r.error is None]
    names = [os.path.relpath(r.path, scan_dir) for r in rows]
    scores = np.array([r.score for r in rows], np.float64)
    flagged = np.array([bool(r.flagged) for r in rows])
    labels = np.array([name.startswith("triggered") for name in names], dtype=int)
    threshold = float(scan_summary["threshold"])
    report = detection_report(labels, scores, threshold)
    plots.score_histogram(out / "scores_histogram.png", {"clean": scores[labels == 0], "triggered": scores[labels == 1]},
                          threshold, "DeDe scores on the demo scan")
    plots.roc_plot(out / "roc.png", {"DeDe (BadEncoder victim)": (labels, scores)})
    # PNG is lossless: the arrays written to scan-input/ are what the scan decoded.
    shown_clean, shown_triggered = test_clean[:8], test_triggered[:8]
    recon = reconstruct(detector, np.concatenate([shown_clean, shown_triggered]))
    plots.image_grid(out / "reconstructions.png", {"clean": shown_clean, "rebuilt": recon[:len(shown_clean)],
                                                   "triggered": shown_triggered, "rebuilt ": recon[len(shown_clean):]})
    summary = {"scanned": len(scores), "triggered_in_scan": int(labels.sum()), "flagged": int(flagged.sum()),
               "threshold": threshold, "target_fpr": 0.01, **report, "scan_output": str(scan_csv),
               "flagged_files": [names[i] for i in np.flatnonzero(flagged)],
               "seconds": round(time.perf_counter() - start, 1), "fast": fast}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out)
    return summary


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="demo scan: clean vs triggered", show_header=True)
    for col in ("images", "flagged", "AUROC", "AUPRC", "TPR@thr", "FPR@thr", "TPR@1%FPR"):
        table.add_column(col)
    table.add_row(str(summary["scanned"]), str(summary["flagged"]), f"{summary['auroc']:.3f}", f"{summary['auprc']:.3f}",
                  f"{summary['tpr_at_threshold']:.3f}", f"{summary['fpr_at_threshold']:.3f}",
                  f"{summary['tpr_at_fpr_0.01']:.3f}")
    console.print(table)
    flagged = summary["flagged_files"]
    console.print(f"flagged files ({len(flagged)}): " + ", ".join(flagged[:12]) + (" ..." if len(flagged) > 12 else ""))
    console.print(f"plots: {out / 'scores_histogram.png'}, {out / 'roc.png'}, {out / 'reconstructions.png'}; "
                  f"total {summary['seconds']:.0f} s")

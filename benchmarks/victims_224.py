"""A 224-px backdoor built here, end to end: SimCLR -> BadEncoder patch trigger -> DeDe detectors at 224 px.

Data (all crops of the bundled photos at 224 px, ``demo_photos``: 10-60 % of a photo's short side, labelled by
photo; disjoint seeds): SimCLR pre-training and detector training 1,600 crops; probe train 600; clean held-out
threshold set 300; test 400 clean crops + the triggered copies of those not of the target photo.
Victim: an ImageNet-stem ResNet (7x7/2 conv + max-pool, one basic block a stage, widths 16-32-64-128: 128-d,
~77 MMAC an image at 224) pre-trained with the project's SimCLR, then BadEncoder-fine-tuned with a white
70-px square at (147, 147) (BadEncoder's 10 px at 21 of 32, scaled to 224) toward 3 reference crops of the
target photo. BA / ASR: a linear probe on the photo labels (ASR below 0.8 is reported as a failed attack).
Detectors: `dede-rt train` defaults (epochs auto within 10 min, early stopping) with decoder patch 32 (the
paper's CLIP setting; 49 patches, none visible at test), ImageNet normalization, on the victim and on the
clean encoder (the control: the same triggered images), raw and L2-normalized embeddings; the embedding-norm
baseline next to them.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/victims_224.py --json benchmarks/results/victims_224.json

Seeded, but the float summation order follows the torch thread count: the README's victim (ASR 1.000, built
twice) came from 2 threads; one thread gave a failed attack (ASR 0.215) from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dede_rt.data.demo import demo_photos
from dede_rt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization
from dede_rt.data.triggers import white_square
from dede_rt.metrics import detection_report
from dede_rt.models.encoders import load_encoder
from dede_rt.models.resnet import ImageNetResNet, ResNetConfig
from dede_rt.research.attacks.badencoder import BadEncoderConfig, badencoder_finetune
from dede_rt.research.attacks.simclr import SimCLRConfig, train_simclr
from dede_rt.research.baselines.simple import embedding_norm_scores
from dede_rt.research.probe import embed, evaluate_probe
from dede_rt.training import TrainConfig, train_detector
from time_to_detector import score_views

SIZE = 224
SMALL = ResNetConfig("basic", (1, 1, 1, 1), (16, 32, 64, 128))
NORM = Normalization(IMAGENET_MEAN, IMAGENET_STD, SIZE)
TRIGGER = white_square(SIZE, size=70, start=147)


def splits() -> dict:
    """Disjoint crop sets (seeded): pretrain/detector training, probe train, threshold, test."""
    sets = {"train": demo_photos(1600, SIZE, 0), "probe": demo_photos(600, SIZE, 11),
            "threshold": demo_photos(300, SIZE, 22), "test": demo_photos(400, SIZE, 33)}
    return {k: (v.images, v.labels) for k, v in sets.items()}


def build_victims(data: dict, workdir: Path, simclr_epochs: int, badencoder_epochs: int, target: int) -> dict:
    """SimCLR a small ImageNet-stem ResNet, then BadEncoder it; TorchScript files (cached by their settings)."""
    clean_path = workdir / f"clean_224_simclr{simclr_epochs}.pt"
    victim_path = workdir / f"badencoder_224_simclr{simclr_epochs}_be{badencoder_epochs}.pt"
    log = workdir / "victims_224_timings.json"
    timings = json.loads(log.read_text()) if log.is_file() else {}
    images, labels = data["train"]
    if not clean_path.is_file():
        torch.manual_seed(0)
        model = ImageNetResNet(SMALL)
        t0 = time.perf_counter()
        train_simclr(model, SMALL.embed_dim, images, normalization=NORM,
                     config=SimCLRConfig(epochs=simclr_epochs, batch_size=128))
        timings[clean_path.name] = time.perf_counter() - t0
        torch.jit.save(torch.jit.trace(model.eval(), torch.zeros(1, 3, SIZE, SIZE)), str(clean_path))
    if not victim_path.is_file():
        model = torch.jit.load(str(clean_path))
        clean = ImageNetResNet(SMALL)
        clean.load_state_dict(model.state_dict())
        rng = np.random.default_rng(1)
        reference = images[rng.choice(np.flatnonzero(labels == target), 3, replace=False)]
        shadow = images[rng.choice(len(images), 800, replace=False)]
        t0 = time.perf_counter()
        victim = badencoder_finetune(clean, shadow, reference, trigger=TRIGGER, normalization=NORM,
                                     config=BadEncoderConfig(epochs=badencoder_epochs, batch_size=64))
        timings[victim_path.name] = time.perf_counter() - t0
        torch.jit.save(torch.jit.trace(victim.eval(), torch.zeros(1, 3, SIZE, SIZE)), str(victim_path))
    log.write_text(json.dumps(timings))
    return {"clean": clean_path, "badencoder": victim_path, "timings": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dede-victims-224"))
    parser.add_argument("--simclr-epochs", type=int, default=15)
    parser.add_argument("--badencoder-epochs", type=int, default=120)  # 60 gave ASR 0.69, 120 ASR 1.0
    parser.add_argument("--target", type=int, default=0, help="target photo (class index)")
    parser.add_argument("--rows", default="badencoder:raw,badencoder:l2,clean:raw,clean:l2",
                        help="ENCODER:FORM detectors to train (encoders badencoder, clean; forms raw, l2)")
    parser.add_argument("--max-minutes", type=float, default=None, help="detector budget (default: train's 10)")
    parser.add_argument("--views", action="store_true", help="also score each decoder's summed / combined views")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = splits()
    files = build_victims(data, args.workdir, args.simclr_epochs, args.badencoder_epochs, args.target)
    test, test_labels = data["test"]
    keep = test_labels != args.target
    triggered = TRIGGER.stamp(test[keep])
    labels = np.r_[np.zeros(len(test), int), np.ones(len(triggered), int)]
    result = {"benchmark": "224-px SimCLR + BadEncoder victim, DeDe at the train defaults", "image_size": SIZE,
              "encoder": "ImageNet-stem ResNet 16-32-64-128 (1 basic block a stage), 128-d",
              "trigger": TRIGGER.name, "target_photo": args.target,
              "sets": {k: int(len(v[0])) for k, v in data.items()}, "triggered_test": int(len(triggered)),
              "victim_build": files["timings"], "rows": []}
    wanted = [tuple(item.split(":")) for item in args.rows.split(",") if item != "none"]  # none: build only
    for name in dict.fromkeys(n for n, _ in wanted):
        encoder, _ = load_encoder(files[name], "torchscript", SIZE)
        probe = evaluate_probe(encoder, NORM, train_u8=data["probe"][0], train_labels=data["probe"][1],
                               test_u8=test, test_labels=test_labels, triggered_u8=TRIGGER.stamp(test),
                               target=args.target)
        z = embed(encoder, NORM, np.concatenate([test, triggered]))
        norm_auroc = detection_report(labels, embedding_norm_scores(z))["auroc"]
        for form in [f for n, f in wanted if n == name]:
            row = {"encoder": name, "form": form, "ba": probe.ba, "asr": probe.asr,
                   "attack": "control" if name == "clean" else ("backdoored" if probe.asr >= 0.8 else "FAILED (ASR < 0.8)"),
                   "norm_baseline_auroc": norm_auroc,
                   **detector_row(files[name], data, NORM, form == "l2", test, triggered, args.max_minutes, args.views)}
            record(result, row, args.json)


def detector_row(encoder_file: Path, data: dict, normalization: Normalization, l2: bool, test: np.ndarray,
                 triggered: np.ndarray, max_minutes: float | None, with_views: bool = False) -> dict:
    """A detector at the train defaults (decoder patch 32) on a TorchScript victim, scored on clean + triggered test.

    ``with_views``: also the same decoder's summed / combined score views (``time_to_detector.score_views``).
    """
    t0 = time.perf_counter()
    det = train_detector(encoder_file, data["train"][0], None, normalization=normalization,
                         decoder_config={"patch_size": 32}, l2_normalize=l2, threshold_data=data["threshold"][0],
                         encoder_format="torchscript", config=TrainConfig(max_minutes=max_minutes), progress=True)
    seconds = time.perf_counter() - t0
    labels = np.r_[np.zeros(len(test), int), np.ones(len(triggered), int)]
    report = detection_report(labels, np.r_[det.score(test), det.score(triggered)], det.threshold(0.01))
    q = det.sections["quality"]
    views = score_views(det, data["train"][0], data["threshold"][0], test, triggered) if with_views else {}
    return {"dede": report, **views, "train_minutes": round(seconds / 60, 2), "epochs_run": q["epochs_run"],
            "stopped": q["stopped"], "precision": q["precision"]}


def record(result: dict, row: dict, path: Path | None) -> None:
    """Print the row and rewrite the JSON with every row so far (a long run keeps what it finished)."""
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()

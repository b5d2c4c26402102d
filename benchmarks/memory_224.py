"""Peak memory of training a 224-px detector on N images (default 10,000) held in memory, embeddings cached.

Images: N random smooth 224x224 uint8 images (the content does not change memory), passed as an array as
`train_detector` holds a loaded folder. Encoder: the small ImageNet-stem ResNet of victims_224.py (random
init; the encoder's size does not change the decoder's memory, and a small one keeps the embedding pass
short). Decoder: the default width (dim 192, 12+4 blocks), patch 32, batch 256, ``--epochs`` epochs.
Reports the process's peak RSS (``ru_maxrss``) next to the images' own bytes.

    .venv/bin/python benchmarks/memory_224.py --json benchmarks/results/memory_224.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from dede_rt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization
    from dede_rt.models.resnet import ImageNetResNet, ResNetConfig
    from dede_rt.training import TrainConfig, train_detector

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (args.images, 7, 7, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)  # 224 x 224 blocks
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = ImageNetResNet(ResNetConfig("basic", (1, 1, 1, 1), (16, 32, 64, 128))).eval()
        encoder = Path(tmp) / "encoder.pt"
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 224, 224)), str(encoder))
        t0 = time.perf_counter()
        det = train_detector(encoder, images, Path(tmp) / "det", encoder_format="torchscript",
                             normalization=Normalization(IMAGENET_MEAN, IMAGENET_STD, 224),
                             decoder_config={"patch_size": 32}, config=TrainConfig(epochs=args.epochs, patience=0),
                             progress=False)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"benchmark": "peak RSS of training a 224-px detector (cached embeddings)", "images": args.images,
              "epochs": args.epochs, "images_mib": round(images.nbytes / 2**20, 1),
              "rss_before_training_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
              "peak_over_images": round(peak / (images.nbytes / 2**20), 2), "seconds": round(seconds, 1),
              "training": {k: det.sections["training"][k] for k in ("images", "threshold_images", "epochs_run")}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Cached-embedding decoder training vs re-encoding every epoch, same data, same run.

Three ways to run one decoder epoch over the same images with the same decoder:
- ``cached``: dede-rt's way: the frozen encoder runs once (its cost is
  reported separately and amortised over the epochs), each epoch reads cached
  embeddings;
- ``reencode``: the same loop but the encoder runs on every batch (no_grad);
- ``reference``: like tardisblue9/DeDe main.py: the encoder runs on every batch
  WITH autograd (its parameters are not frozen there, so backward also walks
  the encoder).
- ``cached-bf16``: ``cached`` with the decoder's forward pass under bfloat16
  autocast (``TrainConfig.precision="bf16"``, ``--train-precision bf16``).
Throughput is measured over ``--steps`` optimizer steps per mode (after one
warm-up step) and reported as images/s, per-epoch seconds, and the ratio of
total time for ``--epochs`` epochs (embedding cost included for ``cached``).

    python benchmarks/bench_training.py --arch resnet18 --json benchmarks/results/training_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dede_rt.data.demo import demo_dataset
from dede_rt.data.transforms import Normalization
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images
from dede_rt.models.encoders import VictimEncoder
from dede_rt.models.resnet import build_resnet
from dede_rt.scoring import reconstruction_loss
from dede_rt.training import TrainConfig, compute_embeddings, train_decoder

DECODERS = {
    "reference-12+4": {"dim": 192, "heads": 3, "encoder_depth": 12, "decoder_depth": 4},
    "demo-2+2": {"dim": 128, "heads": 4, "encoder_depth": 2, "decoder_depth": 2},
}


def time_library_loop(encoder, norm, images, dconf, steps, batch, reencode, embeddings=None,
                      precision: str = "fp32") -> float:
    """Seconds per training step of ``train_decoder`` (cached or re-encoding, fp32 or bf16 autocast)."""
    config = TrainConfig(epochs=1, batch_size=batch, seed=0, precision=precision)
    train_decoder(encoder, norm, images[: batch], dconf, config, embeddings=None if reencode else embeddings[:batch],
                  progress=False, reencode=reencode, max_steps=1)  # warm-up
    t0 = time.perf_counter()
    train_decoder(encoder, norm, images, dconf, config, embeddings=None if reencode else embeddings,
                  progress=False, reencode=reencode, max_steps=steps)
    return (time.perf_counter() - t0) / steps


def time_reference_loop(backbone, norm, images, dconf, steps, batch) -> float:
    """Seconds per step of a reference-style loop: encoder forward with autograd every batch."""
    decoder = DeDeDecoder(dconf)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3, weight_decay=1e-6)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(True)  # as in the reference: loaded, never frozen
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        x = norm.apply(images[(step * batch) % len(images):][:batch])
        t0 = time.perf_counter()
        z = backbone(x)
        pred, masked = decoder(x, z, 0.9, g)
        loss = reconstruction_loss(pred, patchify_images(x, dconf.patch_size), masked, 0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:]))


def main() -> None:
    """Run the comparison and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=200, help="epochs the total-time ratio is computed for")
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/training_speed.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    norm = Normalization()
    images = demo_dataset(photo_count=max(0, args.images - 1797)).images[: args.images]
    backbone = build_resnet(args.arch).eval()
    encoder = VictimEncoder(backbone, backbone.embed_dim)
    t0 = time.perf_counter()
    embeddings = compute_embeddings(encoder, norm, images, batch_size=args.batch)
    embed_seconds = time.perf_counter() - t0
    rows = []
    for name in args.decoders.split(","):
        dconf = DecoderConfig(embed_dim=backbone.embed_dim, **DECODERS[name])
        per_step = {
            "cached": time_library_loop(encoder, norm, images, dconf, args.steps, args.batch, False, embeddings),
            "cached-bf16": time_library_loop(encoder, norm, images, dconf, args.steps, args.batch, False, embeddings,
                                             "bf16"),
            "reencode": time_library_loop(encoder, norm, images, dconf, args.steps, args.batch, True),
            "reference": time_reference_loop(build_resnet(args.arch).eval(), norm, images, dconf, args.steps, args.batch),
        }
        steps_per_epoch = int(np.ceil(len(images) / args.batch))
        total = {m: s * steps_per_epoch * args.epochs for m, s in per_step.items()}
        total["cached"] += embed_seconds
        total["cached-bf16"] += embed_seconds
        row = {"arch": args.arch, "decoder": name, "images": len(images), "batch": args.batch,
               "embed_once_seconds": round(embed_seconds, 3),
               **{f"{m}_images_per_second": round(args.batch / s, 1) for m, s in per_step.items()},
               **{f"{m}_epoch_seconds": round(s * steps_per_epoch, 2) for m, s in per_step.items()},
               "epochs": args.epochs,
               "speedup_vs_reencode": round(total["reencode"] / total["cached"], 2),
               "speedup_vs_reference": round(total["reference"] / total["cached"], 2),
               "bf16_speedup_vs_fp32_cached": round(total["cached"] / total["cached-bf16"], 2)}
        rows.append(row)
        print(json.dumps(row))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "decoder training: cached embeddings vs re-encoding",
                                     "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                                 "torch": torch.__version__},
                                     "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

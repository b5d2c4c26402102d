"""Training the DeDe decoder on a frozen victim's cached embeddings.

The victim encoder is frozen, so its embeddings are computed ONCE (in memory,
or in a memmap for large sets) and every epoch only runs the decoder; the
reference code re-encodes every image every epoch. ``reencode=True`` keeps the
reference behaviour for benchmarking the difference in the same code path.
Everything random (batch order, masks, init) comes from one seeded generator
whose state is checkpointed, so an interrupted run resumes bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images
from dede_rt.models.encoders import VictimEncoder, load_encoder
from dede_rt.scoring import PROTOTYPES, prototype_indices, reconstruction_loss

if TYPE_CHECKING:
    from dede_rt.bundle import Detector


TRAIN_PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Decoder training hyper-parameters; defaults are the reference's (Adam 1e-3, wd 1e-6, 256, r=0.9, seed 21)."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    mask_ratio: float = 0.9
    seed: int = 21
    optimizer: str = "adam"  # "adamw": weight decay on weight matrices only (jsrdcht/SSL-Backdoor)
    grad_clip: float | None = None  # e.g. 1.0 as in jsrdcht/SSL-Backdoor
    # The reference's "mod for ctrl" (off at 0): this share of the training samples, those with the largest
    # embedding norm, is trained toward a constant image (1 everywhere, normalized) instead of itself.
    high_norm_share: float = 0.0
    # "bf16": the decoder's forward pass runs under bfloat16 autocast (weights, optimizer and loss stay fp32);
    # ~1.8x faster on CPUs with AVX512-BF16/AMX. "fp32" is the reference.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not 0.0 <= self.high_norm_share < 1.0:
            raise UserError(f"the high-norm share must be in [0, 1), got {self.high_norm_share}")
        if self.precision not in TRAIN_PRECISIONS:
            raise UserError(f"unknown training precision {self.precision!r}; choose one of {', '.join(TRAIN_PRECISIONS)}")

    def to_dict(self) -> dict:
        """Plain-JSON form for manifests."""
        return asdict(self)


@dataclass
class TrainResult:
    """What training produced: the decoder, per-epoch losses and timings."""

    decoder: DeDeDecoder
    losses: list[float] = field(default_factory=list)
    embed_seconds: float = 0.0
    train_seconds: float = 0.0
    epochs_run: int = 0


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and random; returns a CPU generator seeded with ``seed``."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def compute_embeddings(
    encoder: VictimEncoder, normalization: Normalization, images_u8: np.ndarray, batch_size: int = 256,
    cache_path: str | Path | None = None, progress: bool = False,
) -> np.ndarray:
    """Run the frozen encoder once over ``images_u8``; float32 [N, D], in RAM or a memmap at ``cache_path``."""
    from dede_rt.progress import track

    n = len(images_u8)
    shape = (n, encoder.embed_dim)
    if cache_path is not None:
        out = np.lib.format.open_memmap(str(cache_path), mode="w+", dtype=np.float32, shape=shape)
    else:
        out = np.empty(shape, np.float32)
    for start in track(range(0, n, batch_size), "embedding", enabled=progress):
        batch = normalization.apply(images_u8[start : start + batch_size])
        out[start : start + len(batch)] = encoder(batch).numpy()
    return out


def build_optimizer(decoder: DeDeDecoder, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (reference) or AdamW with decay on weight matrices only."""
    if config.optimizer == "adam":
        return torch.optim.Adam(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        decay = [p for p in decoder.parameters() if p.ndim >= 2]
        no_decay = [p for p in decoder.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=config.lr)
    raise UserError(f"unknown optimizer {config.optimizer!r}; choose adam or adamw")


def _save_checkpoint(path: Path, decoder: DeDeDecoder, optimizer: torch.optim.Optimizer, epoch: int,
                     losses: list[float], generator: torch.Generator, config: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "losses": losses, "generator": generator.get_state(), "config": json.dumps(config.to_dict())}, tmp)
    tmp.replace(path)  # atomic: a kill mid-save never leaves a broken checkpoint


def _load_checkpoint(path: Path, decoder: DeDeDecoder, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, config: TrainConfig) -> tuple[int, list[float]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    # options newer than the checkpoint count as their defaults
    saved = {**{f.name: f.default for f in fields(TrainConfig)}, **saved}
    changed = {k: (saved[k], v) for k, v in config.to_dict().items() if k != "epochs" and saved[k] != v}
    if changed:
        raise UserError(f"{path}: cannot resume, training options changed: {changed}")
    decoder.load_state_dict(state["decoder"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return int(state["epoch"]), list(state["losses"])


def train_decoder(
    encoder: VictimEncoder, normalization: Normalization, images_u8: np.ndarray, decoder_config: DecoderConfig,
    config: TrainConfig, embeddings: np.ndarray | None = None, checkpoint_dir: str | Path | None = None,
    resume: bool = False, progress: bool = True, reencode: bool = False,
    on_epoch: Callable[[int, float], None] | None = None, max_steps: int | None = None,
) -> TrainResult:
    """Train a DeDe decoder on (image, embedding) pairs; embeddings are computed once unless given or ``reencode``."""
    if len(images_u8) < 2:
        raise UserError(f"need at least 2 training images, got {len(images_u8)}")
    generator = seed_everything(config.seed)
    decoder = DeDeDecoder(decoder_config)
    optimizer = build_optimizer(decoder, config)
    result = TrainResult(decoder)
    if embeddings is None and not reencode:
        t0 = time.perf_counter()
        embeddings = compute_embeddings(encoder, normalization, images_u8, progress=progress)
        result.embed_seconds = time.perf_counter() - t0
    if embeddings is not None and embeddings.shape[1] != decoder_config.embed_dim:
        raise UserError(f"embeddings are {embeddings.shape[1]}-d but the decoder expects {decoder_config.embed_dim}-d")
    to_constant = high_norm_samples(embeddings, config.high_norm_share) if config.high_norm_share else None
    start_epoch, ckpt = 0, None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = Path(checkpoint_dir) / "train_state.pt"
        if resume and ckpt.exists():
            start_epoch, result.losses = _load_checkpoint(ckpt, decoder, optimizer, generator, config)
    n = len(images_u8)
    steps_per_epoch = math.ceil(n / config.batch_size)
    bar = _EpochBar(config.epochs, start_epoch, progress)
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(start_epoch, config.epochs):
        decoder.train()
        order = torch.randperm(n, generator=generator).numpy()
        total, seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * config.batch_size : (b + 1) * config.batch_size])
            x = normalization.apply(images_u8[idx])
            if reencode:
                with torch.no_grad():
                    z = encoder(x)
            else:
                z = torch.from_numpy(np.asarray(embeddings[idx]))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                pred, masked = decoder(x, z, config.mask_ratio, generator)
            pred = pred.float()
            target = patchify_images(x, decoder_config.patch_size)
            if to_constant is not None:
                constant = torch.from_numpy(to_constant[idx])[:, None, None]
                target = torch.where(constant, torch.ones_like(target), target)
            loss = reconstruction_loss(pred, target, masked, config.mask_ratio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), config.grad_clip)
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        epoch_loss = total / seen
        result.losses.append(epoch_loss)
        result.epochs_run += 1
        bar.update(epoch + 1, epoch_loss)
        if ckpt is not None:
            _save_checkpoint(ckpt, decoder, optimizer, epoch + 1, result.losses, generator, config)
        if on_epoch is not None:
            on_epoch(epoch + 1, epoch_loss)
        if max_steps is not None and steps >= max_steps:
            break
    bar.close()
    result.train_seconds = time.perf_counter() - t0
    decoder.eval()
    return result


def high_norm_samples(embeddings: np.ndarray | None, share: float) -> np.ndarray:
    """Boolean mask of the samples whose embedding norm is above the (1 - share) quantile (the reference's CTRL mod).

    The reference (tardisblue9/DeDe ``ood_dataset_seperate``) splits a CTRL-poisoned training set this way, with
    ``share`` = its poison rate, and trains the high-norm part toward ``torch.ones``: a CTRL trigger inflates the
    embedding norm, so the decoder learns to draw a constant for such embeddings and their error stays high. The
    reference runs the two parts as separate passes per epoch; here they share the batches.
    """
    if not 0.0 < share < 1.0:
        raise UserError(f"the high-norm share must be in (0, 1), got {share}")
    if embeddings is None:
        raise UserError("the high-norm share needs cached embeddings (it is not available with reencode)")
    norms = np.linalg.norm(np.asarray(embeddings, np.float32), axis=1)
    return norms > np.quantile(norms, 1.0 - share)


class _EpochBar:
    """A rich bar over epochs showing the loss; a line every 10% of epochs when not on a terminal."""

    def __init__(self, epochs: int, start: int, enabled: bool) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.progress = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training decoder"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                                     TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True)
            self.task = self.progress.add_task("train", total=epochs, completed=start, loss=float("nan"))
            self.progress.start()

    def update(self, epoch: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, loss=loss)
        elif self.enabled and (epoch == self.epochs or epoch % max(1, self.epochs // 10) == 0):
            print(f"  epoch {epoch}/{self.epochs}  loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


MEMMAP_BYTES = 1 << 30  # embedding caches larger than this live in a memmap beside the checkpoints


def cached_embeddings(encoder: VictimEncoder, normalization: Normalization, images_u8: np.ndarray, encoder_sha256: str,
                      cache_dir: str | Path | None, progress: bool = True) -> np.ndarray:
    """Embeddings of ``images_u8``, reused from ``cache_dir`` when the same encoder already embedded the same images.

    Small sets stay in RAM (and are also saved when a cache dir is given, so a
    resumed run skips the encoder); sets over ``MEMMAP_BYTES`` are written to a
    memmap on disk instead of RAM.
    """
    if cache_dir is None:
        return compute_embeddings(encoder, normalization, images_u8, progress=progress)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = {"encoder_sha256": encoder_sha256, "images": int(len(images_u8)), "l2": encoder.l2_normalize,
           "normalization": normalization.to_dict(), "images_sha256": hashlib.sha256(images_u8.tobytes()).hexdigest()}
    meta, path = cache_dir / "embeddings.json", cache_dir / "embeddings.npy"
    key = json.loads(json.dumps(key))  # tuples -> lists, as read back
    if meta.exists() and path.exists() and json.loads(meta.read_text()) == key:
        return np.load(path, mmap_mode="r")
    meta.unlink(missing_ok=True)
    big = len(images_u8) * encoder.embed_dim * 4 > MEMMAP_BYTES
    out = compute_embeddings(encoder, normalization, images_u8, cache_path=path if big else None, progress=progress)
    if big:
        out.flush()
    else:
        np.save(path, out)
    meta.write_text(json.dumps(key))  # written last: a torn cache is never reused
    return out


def split_holdout(n: int, fraction: float, seed: int, minimum: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, held-out) index arrays."""
    holdout = max(minimum, int(round(n * fraction)))
    if holdout >= n:
        raise UserError(f"{n} images are too few to hold out {holdout} for choosing thresholds")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[holdout:]), np.sort(order[:holdout])


def train_detector(
    encoder_path: str | Path, data: str | Path | np.ndarray, out: str | Path | None = None, *,
    normalization: Normalization | None = None, decoder_config: dict | None = None,
    config: TrainConfig | None = None, encoder_format: str = "auto", l2_normalize: bool = False,
    threshold_data: str | Path | np.ndarray | None = None, holdout_fraction: float = 0.1,
    fprs: tuple[float, ...] = (0.01, 0.05), default_fpr: float = 0.01, embed_encoder: bool = False,
    checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
    score: str | None = None, relative_k: int = 0, prototypes: int = PROTOTYPES,
) -> "Detector":
    """Train a detector end to end: embed once, train the decoder, choose thresholds on clean held-out data, save.

    ``score``: a registered score kind ("summed", "relative"; default: "relative" when ``relative_k`` > 0, else
    "summed"). The relative score compares against ``prototypes`` of the training embeddings, averaging the
    ``relative_k`` (default 32) that fit best.
    """
    from dede_rt.bundle import Detector
    from dede_rt.bundle.thresholds import thresholds_by_fpr
    from dede_rt.data.sources import load_images

    from dede_rt.scoring import RELATIVE_K, kind_class

    score = score or ("relative" if relative_k else "summed")
    kind_class(score)  # an unknown kind fails before any work
    relative_k = (relative_k or RELATIVE_K) if score == "relative" else 0
    normalization = normalization or Normalization()
    config = config or TrainConfig()
    encoder, info = load_encoder(encoder_path, encoder_format, normalization.image_size, l2_normalize)
    images = data if isinstance(data, np.ndarray) else load_images(data, normalization.image_size).images
    if threshold_data is None:
        train_idx, hold_idx = split_holdout(len(images), holdout_fraction, config.seed)
        train_images, hold_images = images[train_idx], images[hold_idx]
    else:
        train_images = images
        hold_images = threshold_data if isinstance(threshold_data, np.ndarray) else load_images(
            threshold_data, normalization.image_size).images
    if relative_k < 0 or (relative_k and relative_k > min(prototypes, len(train_images))):
        raise UserError(f"the relative score averages k of {min(prototypes, len(train_images))} prototypes (the "
                        f"--prototypes of the {len(train_images)} training images); got k = {relative_k}")
    if len(hold_images) < 1 / min(fprs):
        print(f"warning: {len(hold_images)} held-out clean images cannot resolve an FPR of {min(fprs):g}; "
              f"use at least {int(np.ceil(10 / min(fprs)))}", file=sys.stderr)
    dconf = DecoderConfig(**{"embed_dim": encoder.embed_dim, "image_size": normalization.image_size,
                             **(decoder_config or {})})
    if checkpoint_dir is None and out is not None:
        checkpoint_dir = Path(out) / "checkpoints"
    t0 = time.perf_counter()
    embeddings = cached_embeddings(encoder, normalization, train_images, info["sha256"], checkpoint_dir, progress)
    embed_seconds = time.perf_counter() - t0
    result = train_decoder(encoder, normalization, train_images, dconf, config, embeddings=embeddings,
                           checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    result.embed_seconds = embed_seconds
    proto = None
    if relative_k:  # clean training embeddings, never the held-out images the thresholds are chosen on
        proto = np.asarray(embeddings[prototype_indices(len(train_images), prototypes, config.seed)], np.float32)
    detector = Detector(
        encoder=encoder, decoder=result.decoder, normalization=normalization, encoder_info=info,
        train_mask_ratio=config.mask_ratio, default_fpr=default_fpr,
        sections={"training": {**config.to_dict(), "images": int(len(train_images)),
                            "threshold_images": int(len(hold_images)), "final_loss": result.losses[-1],
                            "epochs_run": len(result.losses), "embed_seconds": round(result.embed_seconds, 3),
                            "train_seconds": round(result.train_seconds, 3),
                            "data": str(data) if not isinstance(data, np.ndarray) else "in-memory array"}},
        prototype_embeddings=proto, relative_k=relative_k)
    # Scored by the detector itself, so the thresholded score is the one it will serve (prototypes decoded once).
    detector.calibration_scores = detector.score(hold_images, progress=progress)
    detector.thresholds = thresholds_by_fpr(detector.calibration_scores, fprs)
    if out is not None:
        detector.save(out, embed_encoder=embed_encoder)
    return detector

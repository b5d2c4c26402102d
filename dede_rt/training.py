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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images
from dede_rt.models.decoder_sizes import DEFAULT_DECODER_SIZE, decoder_shape, size_name
from dede_rt.models.encoders import VictimEncoder, load_encoder
from dede_rt.scoring import PROTOTYPES, prototype_indices, reconstruction_loss
from dede_rt.stopping import AUTO_MAX_EPOCHS, DEFAULT_MAX_MINUTES, MIN_DELTA, PATIENCE, Budget, EarlyStopping

if TYPE_CHECKING:
    from dede_rt.bundle import Detector


TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
TRAIN_DEVICES = ("auto", "cpu", "cuda")
EPOCHS_AUTO = "auto"
LR_SCHEDULES = ("constant", "cosine")
REFERENCE_BATCH_SIZE = 256
AUTO_BATCH_SIZE = 64
AUTO_LR_SCHEDULE = "cosine"


def scheduled_lr(base: float, schedule: str, epoch: int, step: int, steps_per_epoch: int,
                 total_epochs: int | None) -> float:
    """The learning rate of batch ``step`` of 0-based ``epoch`` (``total_epochs`` None: not planned yet)."""
    if schedule == "constant":
        return base
    progress = (epoch + step / steps_per_epoch)  # epochs done, fractional
    if epoch == 0 or total_epochs is None or total_epochs <= 1:  # warm-up (the planning epoch)
        return base * (0.1 + 0.9 * min(progress, 1.0))
    span = max(total_epochs - 1, 1e-9)
    return base * 0.5 * (1.0 + math.cos(math.pi * min((progress - 1.0) / span, 1.0)))


@dataclass
class TrainConfig:
    """Decoder training hyper-parameters.

    ``epochs=N`` with ``precision="fp32"`` is the reference schedule exactly (Adam 1e-3, wd 1e-6, batch 256,
    r=0.9, seed 21; the paper trains 200 epochs). The default ``epochs="auto"`` plans the epochs that fit in
    ``max_minutes`` (default ``stopping.DEFAULT_MAX_MINUTES``, at most 200 epochs) from the first epoch's
    measured time, and stops once the held-out clean error has not improved by ``min_delta`` for ``patience``
    epochs, keeping the best epoch's decoder.
    """

    epochs: int | str = EPOCHS_AUTO
    # None: the reference's 256 with a fixed --epochs N; AUTO_BATCH_SIZE with epochs "auto" (a 10-minute budget
    # on a few thousand images is ~40 epochs: at 256 that is too few optimizer steps; measured in
    # benchmarks/results/time_to_detector*.json).
    batch_size: int | None = None
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
    # ~1.8x faster on CPUs with AVX512-BF16/AMX. "fp32" is the reference. "auto": bf16 where the hardware runs
    # it natively (those CPUs, CUDA GPUs with bf16), else fp32 (emulated bf16 is slower than fp32).
    precision: str = "auto"
    max_minutes: float | None = None  # wall-clock budget of the whole train call (loading to saving)
    patience: int | None = None  # None: stopping.PATIENCE with epochs "auto", 0 (never stop early) with N epochs
    min_delta: float = MIN_DELTA  # relative improvement of the held-out error that resets the patience
    device: str = "auto"  # "auto": CUDA when torch sees a GPU, else CPU
    # "constant" (the reference) or "cosine": one epoch of linear warm-up from lr/10, then a cosine decay to
    # zero over the rest of the planned (or fixed) epochs, stepped per batch. "auto": AUTO_LR_SCHEDULE with
    # epochs "auto", constant with a fixed --epochs N.
    lr_schedule: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.high_norm_share < 1.0:
            raise UserError(f"the high-norm share must be in [0, 1), got {self.high_norm_share}")
        if self.precision not in TRAIN_PRECISIONS:
            raise UserError(f"unknown training precision {self.precision!r}; choose one of {', '.join(TRAIN_PRECISIONS)}")
        if self.lr_schedule == "auto":
            self.lr_schedule = AUTO_LR_SCHEDULE if self.epochs == EPOCHS_AUTO else "constant"
        if self.batch_size is None:
            self.batch_size = AUTO_BATCH_SIZE if self.epochs == EPOCHS_AUTO else REFERENCE_BATCH_SIZE
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown LR schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.device not in TRAIN_DEVICES:
            raise UserError(f"unknown training device {self.device!r}; choose one of {', '.join(TRAIN_DEVICES)}")
        if isinstance(self.epochs, str) and self.epochs.isdigit():
            self.epochs = int(self.epochs)
        if self.epochs != EPOCHS_AUTO and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise UserError(f"--epochs takes a whole number >= 1 or 'auto', got {self.epochs!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.patience is not None and self.patience < 0:
            raise UserError(f"--patience must be >= 0, got {self.patience}")
        if not 0.0 <= self.min_delta < 1.0:
            raise UserError(f"--min-delta is a relative improvement in [0, 1), got {self.min_delta}")

    @property
    def auto(self) -> bool:
        """Whether the epoch count is planned (``epochs="auto"``) rather than fixed."""
        return self.epochs == EPOCHS_AUTO

    def budget(self) -> Budget:
        """The wall-clock budget and epoch cap this config trains within."""
        minutes = self.max_minutes if self.max_minutes is not None else (DEFAULT_MAX_MINUTES if self.auto else None)
        return Budget(None if minutes is None else minutes * 60.0, AUTO_MAX_EPOCHS if self.auto else int(self.epochs))

    def stop_patience(self) -> int:
        """Epochs without improvement before stopping (0: never stop early).

        Default: PATIENCE with epochs "auto" and a constant LR. Under the cosine schedule the held-out error
        still falls in the decay's last epochs after plateaus at the high LR (measured: patience 5 stopped a
        cosine run at epoch 20 of 36 with AUROC 0.93), so a cosine run ends with its plan unless --patience
        is given.
        """
        if self.patience is not None:
            return self.patience
        return PATIENCE if self.auto and self.lr_schedule == "constant" else 0

    def to_dict(self) -> dict:
        """Plain-JSON form for manifests."""
        return asdict(self)


# Options a resumed run may change: how long it trains and where, not what it trains.
RESUMABLE_CHANGES = ("epochs", "max_minutes", "device")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit ``cuda`` without a GPU is a UserError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver)")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where ``device`` runs it natively, else fp32; explicit choices are kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass
class TrainResult:
    """What training produced: the decoder (the best epoch's when early stopping is on), curves and timings."""

    decoder: DeDeDecoder
    losses: list[float] = field(default_factory=list)
    embed_seconds: float = 0.0
    train_seconds: float = 0.0
    epochs_run: int = 0
    curve: list[dict] = field(default_factory=list)  # per epoch: train loss, held-out error, seconds
    best_epoch: int | None = None  # lowest held-out error (kept only when early stopping is on)
    kept_epoch: int | None = None  # the epoch whose decoder this is
    stopped: str = ""  # why training ended: "epochs", "planned", "early_stop", "budget", "max_steps"
    planned_epochs: int | None = None  # the plan at the end (shrunk when later epochs ran slower than planned)
    first_planned_epochs: int | None = None  # the plan announced after the first epoch
    eta_seconds: float | None = None  # predicted at planning time: seconds from then to the end of the call
    plan_made_at: float | None = None  # seconds into the call when the plan was made
    precision: str = "fp32"
    device: str = "cpu"


class HeldOutError:
    """Mean summed error of clean held-out images at the test mask ratio: the score's own quantity, lower is better."""

    def __init__(self, images_u8: np.ndarray, embeddings: np.ndarray, normalization: Normalization,
                 batch_size: int = 256) -> None:
        self.images, self.embeddings = images_u8, np.asarray(embeddings, np.float32)
        self.normalization, self.batch_size = normalization, batch_size
        self.mask = None  # the test mask, built on the decoder's device at the first call

    @torch.no_grad()
    def __call__(self, decoder: DeDeDecoder) -> float:
        """Evaluate ``decoder`` (left in eval mode) in fp32 on the held-out images."""
        from dede_rt.scoring import ScoreTail, TestMask

        device = next(decoder.parameters()).device
        if self.mask is None or self.mask.visible_index.device != device:  # drawn once, not every epoch
            self.mask = TestMask(decoder.config.num_patches).to(device)
        tail = ScoreTail(decoder, self.mask)
        total = 0.0
        for start in range(0, len(self.images), self.batch_size):
            x = self.normalization.apply(self.images[start:start + self.batch_size]).to(device)
            z = torch.from_numpy(self.embeddings[start:start + self.batch_size]).to(device)
            total += float(tail(x, z).double().sum())
        return total / len(self.images)


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


@dataclass
class _Progress:
    """Everything a checkpoint carries beyond weights: curves, the stopper, why it ended, the best decoder."""

    epoch: int = 0
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    stopper: dict | None = None
    stopped: str = ""
    best_decoder: dict | None = None


def _save_checkpoint(path: Path, decoder: DeDeDecoder, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     config: TrainConfig, state: _Progress) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(), "epoch": state.epoch,
                "losses": state.losses, "generator": generator.get_state(), "config": json.dumps(config.to_dict()),
                "curve": json.dumps(state.curve), "stopper": json.dumps(state.stopper), "stopped": state.stopped,
                "best_decoder": state.best_decoder}, tmp)
    tmp.replace(path)  # atomic: a kill mid-save never leaves a broken checkpoint


def _load_checkpoint(path: Path, decoder: DeDeDecoder, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, config: TrainConfig) -> _Progress:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    # options newer than the checkpoint count as the values runs had before they existed
    before = {**{f.name: f.default for f in fields(TrainConfig)}, "precision": "fp32", "patience": 0,
              "lr_schedule": "constant"}
    saved = {**before, **saved}
    device = resolve_device(config.device)  # the device may change on resume; compare as both act here
    saved, current = _effective(saved, device), _effective(config.to_dict(), device)
    changed = {k: (saved[k], v) for k, v in current.items() if k not in RESUMABLE_CHANGES and saved[k] != v}
    if changed:
        raise UserError(f"{path}: cannot resume, training options changed: {changed}")
    decoder.load_state_dict(state["decoder"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return _Progress(int(state["epoch"]), list(state["losses"]), json.loads(state.get("curve", "[]")),
                     json.loads(state.get("stopper", "null")), state.get("stopped", ""), state.get("best_decoder"))


def _effective(options: dict, device: torch.device) -> dict:
    """Options as they act on ``device``: "auto" precision and the default patience resolved (TrainConfig's rules)."""
    config = TrainConfig(**options)  # resolves the "auto"/None fields as a run with these options resolved them
    return {**config.to_dict(), "precision": resolve_precision(config.precision, device),
            "patience": config.stop_patience()}


def train_decoder(
    encoder: VictimEncoder, normalization: Normalization, images_u8: np.ndarray, decoder_config: DecoderConfig,
    config: TrainConfig, *, embeddings: np.ndarray | None = None, checkpoint_dir: str | Path | None = None,
    resume: bool = False, progress: bool = True, reencode: bool = False,
    on_epoch: Callable[[int, float, DeDeDecoder], None] | None = None, max_steps: int | None = None,
    holdout: HeldOutError | None = None, started: float | None = None, reserve_seconds: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a DeDe decoder on (image, embedding) pairs; embeddings are computed once unless given or ``reencode``.

    ``holdout`` is scored after every epoch (the curve, and early stopping); ``started`` (a ``perf_counter``
    time, default now) is when the budget of ``config.max_minutes`` began, ``reserve_seconds`` what the caller
    still needs after training. A resumed run whose checkpoint stopped early returns that run's decoder as is.
    """
    if len(images_u8) < 2:
        raise UserError(f"need at least 2 training images, got {len(images_u8)}")
    started = time.perf_counter() if started is None else started
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None))
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    generator = seed_everything(config.seed)
    decoder = DeDeDecoder(decoder_config)  # built on the CPU from the seeded generator, then moved: same init
    decoder.to(device)
    optimizer = build_optimizer(decoder, config)
    result = TrainResult(decoder, precision=precision, device=device.type)
    if embeddings is None and not reencode:
        t0 = time.perf_counter()
        embeddings = compute_embeddings(encoder, normalization, images_u8, progress=progress)
        result.embed_seconds = time.perf_counter() - t0
    if embeddings is not None and embeddings.shape[1] != decoder_config.embed_dim:
        raise UserError(f"embeddings are {embeddings.shape[1]}-d but the decoder expects {decoder_config.embed_dim}-d")
    to_constant = high_norm_samples(embeddings, config.high_norm_share) if config.high_norm_share else None
    state, ckpt = _Progress(), None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = Path(checkpoint_dir) / "train_state.pt"
        if resume and ckpt.exists():
            state = _load_checkpoint(ckpt, decoder, optimizer, generator, config)
    stopper = EarlyStopping.from_state(state.stopper) if state.stopper else EarlyStopping(config.stop_patience(),
                                                                                          config.min_delta)
    # Resuming a run that already decided it was done is a no-op; a fixed schedule may still be extended.
    if state.stopped == "early_stop" or (config.auto and state.stopped in ("planned", "budget")):
        say(f"training already ended at epoch {state.epoch} ({state.stopped}); nothing to resume")
        return _finish(result, decoder, state, stopper, planned=state.epoch, t0=time.perf_counter(), first=state.epoch)
    budget = config.budget()
    planned = None if budget.max_seconds is not None else budget.max_epochs
    bar = _EpochBar(planned or budget.max_epochs, state.epoch, progress)
    n = len(images_u8)
    steps_per_epoch = math.ceil(n / config.batch_size)
    t0 = time.perf_counter()
    steps, epoch_times = 0, []
    state.stopped = ""
    epoch = first = state.epoch
    while epoch < (planned or budget.max_epochs):
        t_epoch = time.perf_counter()
        decoder.train()
        order = torch.randperm(n, generator=generator).numpy()
        total, seen, data_seconds = 0.0, 0, 0.0
        for b in range(steps_per_epoch):
            if config.lr_schedule != "constant":
                lr = scheduled_lr(config.lr, config.lr_schedule, epoch, b, steps_per_epoch, planned)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            t_data = time.perf_counter()
            idx = np.sort(order[b * config.batch_size : (b + 1) * config.batch_size])
            x = _to(normalization.apply(images_u8[idx]), device)
            if reencode:
                with torch.no_grad():
                    z = _to(encoder(x.cpu()), device)
            else:
                z = _to(torch.from_numpy(np.asarray(embeddings[idx])), device)
            target = patchify_images(x, decoder_config.patch_size)
            if to_constant is not None:
                constant = torch.from_numpy(to_constant[idx]).to(device)[:, None, None]
                target = torch.where(constant, torch.ones_like(target), target)
            data_seconds += time.perf_counter() - t_data
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                pred, masked = decoder(x, z, config.mask_ratio, generator)
            loss = reconstruction_loss(pred.float(), target, masked, config.mask_ratio)
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
        epoch += 1
        train_seconds = time.perf_counter() - t_epoch
        held = holdout(decoder) if holdout is not None else None
        epoch_times.append(time.perf_counter() - t_epoch)
        state.epoch = epoch
        state.losses.append(total / seen)
        state.curve.append({"epoch": epoch, "train_loss": total / seen, "holdout_error": held,
                            "seconds": epoch_times[-1], "data_seconds": data_seconds,
                            "train_seconds": train_seconds})
        if held is not None and stopper.update(epoch, held) and stopper.patience:
            state.best_decoder = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
        state.stopper = stopper.state_dict()
        spent = time.perf_counter() - started
        if planned is None:  # the first epoch of this call is measured: plan the rest, say when it ends
            planned = budget.epochs(done=epoch, epoch_seconds=epoch_times[-1], spent=spent, reserve=reserve_seconds)
            result.eta_seconds = (planned - epoch) * epoch_times[-1] + reserve_seconds
            result.plan_made_at = spent
            result.first_planned_epochs = planned
            bar.set_total(planned)
            say(_plan_line(planned, epoch, epoch_times[-1], result.eta_seconds, budget, stopper))
        elif budget.max_seconds is not None and epoch < planned:
            # Re-plan at the mean pace of the epochs after the timed first one: the first can be slower (warm-up)
            # or faster than the rest, and a plan that could only shrink ratcheted down to the slowest stretch of
            # a noisy machine (runs ended up to a fifth of the budget early). A mean over all of them moves the
            # plan by an epoch or two late in a run, so a cosine schedule still decays to zero on time.
            pace = sum(epoch_times[1:]) / (len(epoch_times) - 1)
            fits = budget.epochs(done=epoch, epoch_seconds=pace, spent=spent, reserve=reserve_seconds)
            if fits != planned:
                planned = fits
                bar.set_total(planned)
        mean_epoch = sum(epoch_times) / len(epoch_times)
        if max_steps is not None and steps >= max_steps:
            state.stopped = "max_steps"
        elif stopper.should_stop:
            state.stopped = "early_stop"
        elif epoch >= planned:
            state.stopped = "planned" if budget.max_seconds is not None else "epochs"
        elif not budget.allows_another(epoch_seconds=mean_epoch, spent=spent, reserve=reserve_seconds):
            state.stopped = "budget"
        bar.update(epoch, state.losses[-1], held)
        if ckpt is not None:
            _save_checkpoint(ckpt, decoder, optimizer, generator, config, state)
        if on_epoch is not None:
            on_epoch(epoch, state.losses[-1], decoder)
        if state.stopped:
            break
    bar.close()
    return _finish(result, decoder, state, stopper, planned=planned, t0=t0, first=first)


def _finish(result: TrainResult, decoder: DeDeDecoder, state: _Progress, stopper: EarlyStopping, *,
            planned: int | None, t0: float, first: int) -> TrainResult:
    """Fill ``result`` from the run's state; with early stopping on, the decoder is the best epoch's."""
    if stopper.patience and state.best_decoder is not None:
        decoder.load_state_dict(state.best_decoder)
    result.losses, result.curve, result.stopped = state.losses, state.curve, state.stopped
    result.epochs_run = len(state.losses) - first  # in this call; ``losses`` holds every epoch
    result.planned_epochs = planned
    result.best_epoch = stopper.best_epoch if stopper.best_epoch else None
    kept_best = bool(stopper.patience and state.best_decoder is not None)
    result.kept_epoch = stopper.best_epoch if kept_best else len(state.losses)
    result.train_seconds = time.perf_counter() - t0
    decoder.eval()
    return result


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device``: through pinned memory and a non-blocking copy on CUDA."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _plan_line(planned: int, done: int, epoch_seconds: float, eta: float, budget: Budget,
               stopper: EarlyStopping) -> str:
    from datetime import datetime, timedelta

    end = (datetime.now() + timedelta(seconds=eta)).strftime("%H:%M:%S")
    limit = f"budget {budget.max_seconds / 60:g} min" if budget.max_seconds is not None else "fixed schedule"
    early = (f"; stops earlier once the held-out clean error has not improved by {stopper.min_delta:.1%} for "
             f"{stopper.patience} epochs" if stopper.patience else "")
    return (f"plan: {planned} epochs ({limit}, first epoch {epoch_seconds:.1f} s); {planned - done} to go, "
            f"done in ~{eta / 60:.1f} min (about {end}){early}")


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
    """A rich bar over epochs showing the losses; a line every 10% of epochs when not on a terminal."""

    def __init__(self, epochs: int, start: int, enabled: bool) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.progress = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training decoder"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} epochs"),
                                     TextColumn("loss {task.fields[loss]:.4f} held-out {task.fields[held]}"),
                                     TimeRemainingColumn(), transient=True)
            self.task = self.progress.add_task("train", total=epochs, completed=start, loss=float("nan"), held="-")
            self.progress.start()

    def set_total(self, epochs: int) -> None:
        """The planned epoch count, once the first epoch has been timed."""
        self.epochs = epochs
        if self.progress is not None:
            self.progress.update(self.task, total=epochs)

    def update(self, epoch: int, loss: float, held: float | None = None) -> None:
        held_text = "-" if held is None else f"{held:.5g}"
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, loss=loss, held=held_text)
        elif self.enabled and (epoch == self.epochs or epoch % max(1, self.epochs // 10) == 0):
            print(f"  epoch {epoch}/{self.epochs}  loss {loss:.4f}  held-out error {held_text}", file=sys.stderr,
                  flush=True)

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


def encoder_normalization(info: dict, given: Normalization | dict | None = None) -> Normalization:
    """The pixels a detector trains on: ``given`` if a Normalization, else the encoder family's own
    preprocessing (CIFAR's 32-px squash for plain checkpoint files) with the fields of a ``given`` dict
    replaced (``{"resize": "squash"}`` keeps the old rule on an ImageNet encoder)."""
    if isinstance(given, Normalization):
        return given
    base = Normalization.from_dict(info["preprocessing"]) if info.get("preprocessing") else Normalization()
    given = dict(given or {})
    if "image_size" in given and "resize_to" not in given:
        given["resize_to"] = None  # a new size takes the default crop ratio, not the family's old resize length
    return replace(base, **given)


def standardized(detector: "Detector", hold_images: np.ndarray, progress: bool = False) -> "Detector":
    """The relative-score ``detector`` turned combined: both kinds' scales fitted on clean ``hold_images``."""
    from dataclasses import replace

    from dede_rt.scoring import Standardization

    relative = detector.score(hold_images, progress=progress)
    summed = replace(detector, prototype_embeddings=None, relative_k=0).score(hold_images, progress=progress)
    return replace(detector, standardization=Standardization.fit(summed, relative))


def train_detector(
    encoder_path: str | Path, data: str | Path | np.ndarray, out: str | Path | None = None, *,
    normalization: Normalization | dict | None = None, decoder_config: dict | None = None,
    decoder_size: str = DEFAULT_DECODER_SIZE,
    config: TrainConfig | None = None, encoder_format: str = "auto", l2_normalize: bool = False,
    weights: str | Path | None = None, embedding: str = "auto",
    threshold_data: str | Path | np.ndarray | None = None, holdout_fraction: float = 0.1,
    fprs: tuple[float, ...] = (0.01, 0.05), default_fpr: float = 0.01, embed_encoder: bool = False,
    checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
    score: str | None = None, relative_k: int = 0, prototypes: int = PROTOTYPES,
    on_epoch: Callable[[int, float, DeDeDecoder], None] | None = None,
) -> "Detector":
    """Train a detector end to end: embed once, train the decoder, choose thresholds on clean held-out data, save.

    ``score``: a registered score kind ("summed", "relative", "combined"; default ``scoring.DEFAULT_SCORE``,
    "relative"). The relative score compares against ``prototypes`` of the training embeddings, averaging the
    ``relative_k`` that fit best (default 32, at most the prototypes there are); the combined one adds both
    kinds, each standardized on the held-out images (``scoring.Standardization``).
    ``decoder_size``: the decoder's shape by name (``DECODER_SIZES``: "small", the default, or "reference", the
    paper's); ``decoder_config`` fields (patch size, dim, ...) override it.
    ``on_epoch(epoch, loss, decoder)`` runs after every epoch.
    ``encoder_path`` may be a family spec (``torchvision:resnet50`` with ``weights``); ``normalization`` a
    Normalization, or a dict of fields that override the encoder's own preprocessing (see
    ``encoder_normalization``).
    """
    from dede_rt.bundle import Detector
    from dede_rt.bundle.thresholds import thresholds_by_fpr
    from dede_rt.data.sources import load_images

    from dede_rt.scoring import DEFAULT_SCORE, PROTOTYPE_KINDS, RELATIVE_K, kind_class

    score = score or DEFAULT_SCORE
    kind_class(score)  # an unknown kind fails before any work
    shape = decoder_shape(decoder_size, **(decoder_config or {}))  # so does an unknown decoder size
    k_given = relative_k
    config = config or TrainConfig()
    probe_size = normalization.image_size if isinstance(normalization, Normalization) else \
        (normalization or {}).get("image_size") or 32
    encoder, info = load_encoder(encoder_path, encoder_format, probe_size, l2_normalize, weights=weights,
                                 embedding=embedding)
    normalization = encoder_normalization(info, normalization)
    images = data if isinstance(data, np.ndarray) else load_images(data, normalization.pixels).images
    if threshold_data is None:
        train_idx, hold_idx = split_holdout(len(images), holdout_fraction, config.seed)
        train_images, hold_images = images[train_idx], images[hold_idx]
    else:
        train_images = images
        hold_images = threshold_data if isinstance(threshold_data, np.ndarray) else load_images(
            threshold_data, normalization.pixels).images
    # k as given; by default 32, or all the prototypes a small training set has
    relative_k = 0 if score not in PROTOTYPE_KINDS else (k_given or min(RELATIVE_K, prototypes, len(train_images)))
    if relative_k < 0 or (relative_k and relative_k > min(prototypes, len(train_images))):
        raise UserError(f"the relative score averages k of {min(prototypes, len(train_images))} prototypes (the "
                        f"--prototypes of the {len(train_images)} training images); got k = {relative_k}")
    if len(hold_images) < 1 / min(fprs):
        print(f"warning: {len(hold_images)} held-out clean images cannot resolve an FPR of {min(fprs):g}; "
              f"use at least {int(np.ceil(10 / min(fprs)))}", file=sys.stderr)
    dconf = DecoderConfig(**{"embed_dim": encoder.embed_dim, "image_size": normalization.image_size, **shape})
    if checkpoint_dir is None and out is not None:
        checkpoint_dir = Path(out) / "checkpoints"
    started = time.perf_counter()  # the budget of --max-minutes counts from here
    embeddings = cached_embeddings(encoder, normalization, train_images, info["sha256"], checkpoint_dir, progress)
    t_hold = time.perf_counter()
    holdout = HeldOutError(hold_images, compute_embeddings(encoder, normalization, hold_images), normalization)
    hold_embed_seconds = time.perf_counter() - t_hold
    embed_seconds = time.perf_counter() - started
    # After training: the held-out images are embedded and scored again for the thresholds, then saved.
    reserve = 2.0 * hold_embed_seconds + 2.0
    result = train_decoder(encoder, normalization, train_images, dconf, config, embeddings=embeddings,
                           checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, holdout=holdout,
                           started=started, reserve_seconds=reserve, on_epoch=on_epoch)
    result.embed_seconds = embed_seconds
    proto = None
    if relative_k:  # clean training embeddings, never the held-out images the thresholds are chosen on
        proto = np.asarray(embeddings[prototype_indices(len(train_images), prototypes, config.seed)], np.float32)
    detector = Detector(
        encoder=encoder, decoder=result.decoder, normalization=normalization, encoder_info=info,
        train_mask_ratio=config.mask_ratio, default_fpr=default_fpr,
        sections={"training": {**config.to_dict(), "decoder_size": size_name(shape), "images": int(len(train_images)),
                            "threshold_images": int(len(hold_images)), "final_loss": result.losses[-1],
                            "epochs_run": len(result.losses), "embed_seconds": round(result.embed_seconds, 3),
                            "train_seconds": round(result.train_seconds, 3),
                            "data": str(data) if not isinstance(data, np.ndarray) else "in-memory array"}},
        prototype_embeddings=proto, relative_k=relative_k)
    if score == "combined":
        detector = standardized(detector, hold_images, progress)
    # Scored by the detector itself, so the thresholded score is the one it will serve (prototypes decoded once).
    detector.calibration_scores = detector.score(hold_images, progress=progress)
    detector.thresholds = thresholds_by_fpr(detector.calibration_scores, fprs)
    from dede_rt.quality import quality_report

    detector.sections["quality"] = quality_report(result, detector, total_seconds=time.perf_counter() - started)
    if out is not None:
        detector.save(out, embed_encoder=embed_encoder)
        from dede_rt.plots import training_curve

        training_curve(Path(out) / "training_curve.png", result.curve, result.best_epoch)
    return detector

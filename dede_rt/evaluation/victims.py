"""Building the evaluation's victim encoders on the demo data, with their downstream BA/ASR.

Data split (all from the embedded demo set, seeded):
- ``id``: colourised digits (10 classes) split into train / test; the test
  split is the detection test set and the linear probe's test set;
- pre-training set for SimCLR: the digit train split + photo crops;
- ``ood``: photo crops drawn with a different seed (never in the test set),
  for out-of-distribution decoder training (the paper's STL10 role).
Victims: a clean SimCLR encoder; BadEncoder and DRUPE fine-tunes of it (patch
or blend trigger; target class 0, 3 reference images, shadow set = a fraction
of the pre-training data); CTRL = SimCLR from scratch on pre-training data
with 1% target-class images carrying the frequency trigger.
Checkpoints are written in BadEncoder's layout, so ``load_encoder`` reads them
like any user's victim.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dede_rt.attacks.badencoder import BadEncoderConfig, badencoder_finetune
from dede_rt.attacks.ctrl import ctrl_trigger, poison_target_class
from dede_rt.attacks.drupe import DRUPEConfig, drupe_finetune
from dede_rt.attacks.simclr import SimCLRConfig, train_simclr
from dede_rt.data.demo import demo_digits, demo_photos
from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import blend_trigger, white_square
from dede_rt.errors import UserError
from dede_rt.models.encoders import VictimEncoder, load_encoder, save_badencoder_checkpoint
from dede_rt.models.resnet import build_resnet
from dede_rt.probe import evaluate_probe

TRIGGERS = ("white_square", "blend", "ctrl")
ATTACKS = ("clean", "badencoder", "drupe", "ctrl")


@dataclass
class EvalData:
    """The evaluation's image sets (uint8 NHWC) and labels."""

    pretrain: np.ndarray
    pretrain_labels: np.ndarray  # digits 0-9, photos 10+
    id_train: np.ndarray
    id_train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    ood_train: np.ndarray

    def summary(self) -> dict:
        """Sizes, for the report."""
        return {"pretrain": len(self.pretrain), "id_train": len(self.id_train), "test": len(self.test),
                "ood_train": len(self.ood_train)}


def eval_data(image_size: int = 32, test_fraction: float = 1 / 3, pretrain_photos: int = 1200,
              ood_photos: int = 1200, seed: int = 0) -> EvalData:
    """Deterministic split of the demo data into pre-training, ID train, test and OOD sets."""
    digits = demo_digits(image_size, seed)
    order = np.random.default_rng(seed + 10).permutation(len(digits))
    n_test = int(round(len(digits) * test_fraction))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    photos = demo_photos(pretrain_photos, image_size, seed)
    ood = demo_photos(ood_photos, image_size, seed + 100)
    pretrain = np.concatenate([digits.images[train_idx], photos.images])
    pretrain_labels = np.concatenate([digits.labels[train_idx], photos.labels + 10])
    return EvalData(pretrain, pretrain_labels, digits.images[train_idx], digits.labels[train_idx],
                    digits.images[test_idx], digits.labels[test_idx], ood.images)


def make_trigger(name: str, image_size: int = 32, seed: int = 0):
    """A trigger by name: BadEncoder's white square, a noise blend (alpha 0.2) or CTRL's frequency trigger."""
    if name == "white_square":
        scale = image_size / 32  # the reference 10 px square at 21-30 of 32 px, scaled
        return white_square(image_size, max(1, round(10 * scale)), round(21 * scale))
    if name == "blend":
        pattern = np.random.default_rng(seed + 7).integers(0, 256, (image_size, image_size, 3)).astype(np.uint8)
        return blend_trigger(pattern, 0.2, "blend_noise_0.2")
    if name == "ctrl":
        return ctrl_trigger(window=min(32, image_size))
    raise UserError(f"unknown trigger {name!r}; choose one of {', '.join(TRIGGERS)}")


@dataclass(frozen=True)
class VictimSpec:
    """One victim to build: an attack with a trigger."""

    name: str
    attack: str
    trigger: str

    @classmethod
    def parse(cls, text: str) -> VictimSpec:
        """'badencoder:white_square' (name derived) or 'name=attack:trigger'."""
        name, _, rest = text.rpartition("=")
        attack, _, trigger = rest.partition(":")
        if attack not in ATTACKS or (attack != "clean" and trigger not in TRIGGERS):
            raise UserError(f"bad victim {text!r}: use ATTACK:TRIGGER with ATTACK in {ATTACKS} and TRIGGER in {TRIGGERS}")
        if attack == "ctrl" and trigger != "ctrl":
            raise UserError("the CTRL attack uses the ctrl trigger")
        return cls(name or f"{attack}_{trigger}", attack, trigger)


DEFAULT_VICTIMS = ("badencoder:white_square", "badencoder:blend", "drupe:white_square", "drupe:blend", "ctrl:ctrl")


@dataclass
class VictimConfig:
    """How victims are built (small CPU-friendly defaults)."""

    arch: str = "resnet_small"
    simclr_epochs: int = 30
    simclr_batch: int = 256
    finetune_epochs: int = 20
    finetune_lr: float = 0.05
    shadow_fraction: float = 0.5
    references: int = 3
    target: int = 0
    ctrl_rate: float = 0.01
    drupe: dict = field(default_factory=dict)  # overrides of DRUPEConfig
    seed: int = 0


@dataclass
class Victim:
    """A built (or loaded) victim encoder and its downstream numbers."""

    name: str
    attack: str
    trigger_name: str
    path: Path
    ba: float = float("nan")
    asr: float = float("nan")
    build_seconds: float = 0.0

    @property
    def backdoored(self) -> bool:
        """An attack counts as successful only with ASR >= 0.8."""
        return self.attack != "clean" and self.asr >= 0.8

    def encoder(self, l2_normalize: bool = False) -> VictimEncoder:
        """Load the encoder from its checkpoint."""
        return load_encoder(self.path, "auto", l2_normalize=l2_normalize)[0]

    def to_dict(self) -> dict:
        """JSON form."""
        return {"name": self.name, "attack": self.attack, "trigger": self.trigger_name, "path": str(self.path),
                "ba": self.ba, "asr": self.asr, "backdoored": self.backdoored,
                "build_seconds": round(self.build_seconds, 1)}


def _cached(meta_path: Path, key: dict) -> dict | None:
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and Path(meta["path"]).is_file():
            return meta
    return None


def base_key(config: VictimConfig, data: EvalData) -> dict:
    """The settings a SimCLR victim depends on (its cache key)."""
    skip = ("finetune_epochs", "finetune_lr", "shadow_fraction", "references", "ctrl_rate", "drupe")
    return {**{k: v for k, v in asdict(config).items() if k not in skip}, "data": data.summary()}


def simclr_victim(out: Path, name: str, images: np.ndarray, key: dict, normalization: Normalization,
                  config: VictimConfig, progress: bool = True, log=print) -> tuple[Path, float]:
    """SimCLR-train a resnet on ``images`` into ``out/name.pth`` unless a checkpoint with the same key exists."""
    path, meta_path = out / f"{name}.pth", out / f"{name}.json"
    if (meta := _cached(meta_path, key)) is not None:
        log(f"victim {name}: reusing {path}")
        return path, meta["build_seconds"]
    t0 = time.perf_counter()
    model = build_resnet(config.arch)
    losses = train_simclr(model, model.embed_dim, images, normalization,
                          SimCLRConfig(epochs=config.simclr_epochs, batch_size=config.simclr_batch, seed=config.seed),
                          progress)
    save_badencoder_checkpoint(model, path, config.simclr_epochs)
    seconds = time.perf_counter() - t0
    meta_path.write_text(json.dumps({"key": key, "path": str(path), "build_seconds": seconds,
                                     "simclr_losses": losses}, indent=1))
    log(f"victim {name}: SimCLR {config.simclr_epochs} epochs on {len(images)} images in {seconds:.0f} s, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return path, seconds


def build_ctrl_victim(out: Path, name: str, data: EvalData, normalization: Normalization, config: VictimConfig,
                      progress: bool = True, log=print) -> tuple[Path, float]:
    """CTRL: SimCLR from scratch on the pre-training set with ``ctrl_rate`` target-class images triggered."""
    trigger = make_trigger("ctrl", normalization.image_size, config.seed)
    poisoned, idx = poison_target_class(data.pretrain, data.pretrain_labels, config.target, config.ctrl_rate,
                                        trigger, config.seed)
    log(f"victim {name}: {len(idx)} of {len(poisoned)} pre-training images poisoned (class {config.target})")
    return simclr_victim(Path(out), name, poisoned, {**base_key(config, data), "attack": "ctrl",
                                                     "rate": config.ctrl_rate}, normalization, config, progress, log)


def build_victims(out: str | Path, specs: list[VictimSpec], data: EvalData, normalization: Normalization,
                  config: VictimConfig, progress: bool = True, log=print) -> tuple[Victim, list[Victim]]:
    """Build (or reuse cached) clean + attacked victims under ``out``; returns (clean, attacked)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = base_key(config, data)
    target = config.target
    ref_idx = np.flatnonzero(data.id_train_labels == target)[: config.references]
    reference = data.id_train[ref_idx]
    shadow = data.pretrain[np.random.default_rng(config.seed + 3).permutation(len(data.pretrain))[
        : int(round(config.shadow_fraction * len(data.pretrain)))]]

    def simclr(name: str, images: np.ndarray, key: dict) -> tuple[Path, float]:
        return simclr_victim(out, name, images, key, normalization, config, progress, log)

    clean_path, clean_s = simclr("clean", data.pretrain, {**base, "attack": "clean"})
    clean_model = load_encoder(clean_path)[0].backbone
    clean = Victim("clean", "clean", "-", clean_path, build_seconds=clean_s)
    victims = []
    for spec in specs:
        if spec.attack == "clean":
            continue
        trigger = make_trigger(spec.trigger, normalization.image_size, config.seed)
        if spec.attack == "ctrl":
            path, seconds = build_ctrl_victim(out, spec.name, data, normalization, config, progress, log)
        else:
            key = {**base, "attack": spec.attack, "trigger": spec.trigger, "epochs": config.finetune_epochs,
                   "lr": config.finetune_lr, "shadow": len(shadow), "references": config.references,
                   "drupe": asdict(DRUPEConfig(**config.drupe)) if spec.attack == "drupe" else config.drupe}
            path, meta_path = out / f"{spec.name}.pth", out / f"{spec.name}.json"
            if (meta := _cached(meta_path, key)) is not None:
                log(f"victim {spec.name}: reusing {path}")
                seconds = meta["build_seconds"]
            else:
                t0 = time.perf_counter()
                if spec.attack == "badencoder":
                    model = badencoder_finetune(clean_model, shadow, reference, trigger, normalization,
                                                BadEncoderConfig(epochs=config.finetune_epochs, lr=config.finetune_lr,
                                                                 seed=config.seed), progress)
                else:
                    model = drupe_finetune(clean_model, shadow, reference, trigger, normalization,
                                           DRUPEConfig(epochs=config.finetune_epochs, lr=config.finetune_lr,
                                                       seed=config.seed, **config.drupe), progress)
                save_badencoder_checkpoint(model, path, config.finetune_epochs)
                seconds = time.perf_counter() - t0
                meta_path.write_text(json.dumps({"key": key, "path": str(path), "build_seconds": seconds}, indent=1))
                log(f"victim {spec.name}: {spec.attack} fine-tune {config.finetune_epochs} epochs on "
                    f"{len(shadow)} shadow images in {seconds:.0f} s")
        victims.append(Victim(spec.name, spec.attack, spec.trigger, path, build_seconds=seconds))
    for victim in [clean, *victims]:
        _measure(victim, data, normalization, target, config.seed)
    return clean, victims


def _measure(victim: Victim, data: EvalData, normalization: Normalization, target: int, seed: int) -> None:
    trigger_name = victim.trigger_name if victim.trigger_name != "-" else "white_square"
    triggered = make_trigger(trigger_name, normalization.image_size, seed).stamp(data.test)
    result = evaluate_probe(victim.encoder(), normalization, data.id_train, data.id_train_labels, data.test,
                            data.test_labels, triggered, target, seed)
    victim.ba, victim.asr = result.ba, result.asr

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

Users' own victims and data: ``load_eval_data`` builds an ``EvalData`` from a
labelled train set (decoder ID training, probe training), a labelled test set
and an optional OOD set; ``VictimFile``/``load_victims`` load victim
checkpoints (any format ``load_encoder`` reads) plus the clean control encoder
and measure them with the same linear probe as built victims.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dede_rt.research.attacks.badencoder import BadEncoderConfig, badencoder_finetune
from dede_rt.research.attacks.ctrl import ctrl_trigger, poison_candidates, poison_target_class
from dede_rt.research.attacks.drupe import DRUPEConfig, drupe_finetune
from dede_rt.research.attacks.simclr import SimCLRConfig, train_simclr
from dede_rt.data.demo import demo_digits, demo_photos
from dede_rt.data.sources import ImageSet, load_cifar_batches, load_images, resize_set
from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import blend_trigger, white_square
from dede_rt.errors import UserError
from dede_rt.models.encoders import VictimEncoder, load_encoder, save_badencoder_checkpoint
from dede_rt.models.resnet import build_resnet
from dede_rt.research.probe import evaluate_probe

TRIGGERS = ("white_square", "blend", "faint_blend", "logo_blend", "ctrl")
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
    sources: dict = field(default_factory=dict)  # set -> path for loaded data; empty for the demo data

    def summary(self) -> dict:
        """Sizes (and the source paths of loaded data), for the report."""
        sizes = {"pretrain": len(self.pretrain), "id_train": len(self.id_train), "test": len(self.test),
                 "ood_train": len(self.ood_train)}
        return {**sizes, "sources": self.sources} if self.sources else sizes


def eval_data(image_size: int = 32, *, test_fraction: float = 1 / 3, pretrain_photos: int = 1200,
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


def _load_set(path: str | Path, size: int, role: str, log=print) -> ImageSet:
    """One user set; a CIFAR batches directory counts as its data_batch_* files (train) or test_batch (test)."""
    path = Path(path).expanduser()
    if path.is_dir() and any(path.glob("data_batch_*")) and role != "ood":
        files = sorted(path.glob("test_batch" if role == "test" else "data_batch_*"))
        if not files:
            raise UserError(f"{path}: a CIFAR batches directory without a test_batch file; pass the test file itself")
        parts = [load_cifar_batches(f) for f in files]
        log(f"{role} data: {', '.join(f.name for f in files)} of {path}")
        images = resize_set(ImageSet(np.concatenate([p.images for p in parts]),
                                     np.concatenate([p.labels for p in parts])), size)
    else:
        images = load_images(path, size, labels_from_parent=role != "ood")
    if len(images) == 0:
        raise UserError(f"{path}: no images in the {role} data")
    if images.labels is not None and len(images.labels) != len(images):
        raise UserError(f"{path}: {len(images.labels)} labels for {len(images)} images")
    if broken := getattr(images, "broken", None):
        log(f"{role} data: skipped {len(broken)} undecodable images in {path} (first: {broken[0]})")
    return images


def _class_labels(sets: dict[str, ImageSet], paths: dict[str, Path]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Integer labels of the train and test sets on one scale; class folders are matched by name."""
    for role, s in sets.items():
        if s.labels is None or "." in s.classes:
            raise UserError(f"{paths[role]}: the {role} data needs labels (class sub-folders, CIFAR batches, or an "
                            ".npz with a 'labels' array)")
    named = {role: s.classes for role, s in sets.items() if s.classes}
    if all(all(re.fullmatch(r"\d+", c) for c in classes) for classes in named.values()):  # folders named 0, 1, ...
        labels = {role: (np.array([int(s.classes[i]) for i in s.labels], np.int64) if s.classes else s.labels)
                  for role, s in sets.items()}
        return labels, []
    if len(named) != len(sets):
        raise UserError(f"cannot match the class folders of {paths[next(iter(named))]} to numeric labels; give both "
                        "sets as class folders, or name the folders 0, 1, ...")
    classes = sets["train"].classes
    unknown = sorted(set(sets["test"].classes) - set(classes))
    if unknown:
        raise UserError(f"{paths['test']}: test classes {unknown[:5]} are not among the training classes")
    test = sets["test"]
    return {"train": sets["train"].labels,
            "test": np.array([classes.index(test.classes[i]) for i in test.labels], np.int64)}, classes


def load_eval_data(train: str | Path, test: str | Path, ood: str | Path | None = None, *, image_size: int = 32,
                   log=print) -> EvalData:
    """EvalData from user files: labelled train (decoder ID, probe, pre-training), labelled test, optional OOD."""
    paths = {"train": Path(train).expanduser().resolve(), "test": Path(test).expanduser().resolve()}
    sets = {role: _load_set(path, image_size, role, log) for role, path in paths.items()}
    labels, classes = _class_labels(sets, paths)
    if len(np.unique(labels["train"])) < 2:
        raise UserError(f"{paths['train']}: the train data has a single class; the linear probe needs at least two")
    ood_images = (_load_set(ood, image_size, "ood", log).images if ood is not None
                  else np.zeros((0, image_size, image_size, 3), np.uint8))
    if classes:
        log("classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(classes)))
    sources = {"train": str(paths["train"]), "test": str(paths["test"]),
               **({"ood": str(Path(ood).expanduser().resolve())} if ood is not None else {})}
    tr, te = sets["train"].images, sets["test"].images
    return EvalData(tr, labels["train"], tr, labels["train"], te, labels["test"], ood_images, sources)


def make_trigger(name: str, image_size: int = 32, seed: int = 0):
    """A trigger by name: BadEncoder's white square, a noise blend (opacity 0.2; faint: 0.1), a logo blend (0.2)
    or CTRL's frequency trigger."""
    if name == "white_square":
        scale = image_size / 32  # the reference 10 px square at 21-30 of 32 px, scaled
        return white_square(image_size, max(1, round(10 * scale)), round(21 * scale))
    if name in ("blend", "faint_blend"):  # the same noise pattern at opacity 0.2 or 0.1
        pattern = np.random.default_rng(seed + 7).integers(0, 256, (image_size, image_size, 3)).astype(np.uint8)
        alpha = 0.2 if name == "blend" else 0.1
        return blend_trigger(pattern, alpha, f"blend_noise_{alpha}")
    if name == "logo_blend":  # Chen et al.'s blended attack used a cartoon (Hello Kitty); a shipped logo stands in
        return blend_trigger(logo_pattern(image_size), 0.2, "blend_logo_0.2")
    if name == "ctrl":
        return ctrl_trigger(window=min(32, image_size))
    raise UserError(f"unknown trigger {name!r}; choose one of {', '.join(TRIGGERS)}")


def logo_pattern(image_size: int = 32) -> np.ndarray:
    """scikit-image's logo (shipped with the package, in no demo data set), RGB on white, ``image_size`` square."""
    import skimage.data
    from PIL import Image

    rgba = skimage.data.logo().astype(np.float32)
    rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0) + 255.0 * (1.0 - rgba[..., 3:] / 255.0)
    small = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).resize((image_size, image_size),
                                                                                    Image.Resampling.LANCZOS)
    return np.asarray(small, np.uint8)


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


@dataclass(frozen=True)
class VictimFile:
    """A user's victim checkpoint: a free-form attack label, the trigger it answers to, and its file."""

    name: str
    attack: str
    trigger: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> VictimFile:
        """'ATTACK:TRIGGER=PATH' (name ATTACK_TRIGGER) or 'NAME=ATTACK:TRIGGER=PATH'."""
        parts = text.split("=")
        if len(parts) >= 2 and ":" in parts[0]:
            name, label, path = "", parts[0], "=".join(parts[1:])
        elif len(parts) >= 3 and ":" in parts[1]:
            name, label, path = parts[0], parts[1], "=".join(parts[2:])
        else:
            raise UserError(f"bad victim file {text!r}: use [NAME=]ATTACK:TRIGGER=PATH, "
                            "e.g. badencoder:white_square=model.pth")
        attack, _, trigger = label.partition(":")
        if trigger not in TRIGGERS:
            raise UserError(f"unknown trigger {trigger!r} in victim file {text!r}; choose one of {', '.join(TRIGGERS)}")
        if not re.fullmatch(r"[\w.+-]+", attack) or attack == "clean" or not path:
            raise UserError(f"bad victim file {text!r}: ATTACK is a label such as badencoder (not 'clean': the "
                            "clean encoder is the control) and PATH the checkpoint")
        name = name or f"{attack}_{trigger}"
        if not re.fullmatch(r"[\w.+-]+", name):
            raise UserError(f"bad victim name {name!r}: use letters, digits, '_', '.', '+' or '-'")
        return cls(name, attack, trigger, Path(path).expanduser())


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
    ctrl_magnitude: float = 100.0  # of the poisoned pre-training images; test images carry the reference 100
    drupe: dict = field(default_factory=dict)  # overrides of DRUPEConfig
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ctrl_rate < 1.0 or self.ctrl_magnitude <= 0:
            raise UserError(f"--ctrl-rate must be in (0, 1) and --ctrl-magnitude > 0, got {self.ctrl_rate} and "
                            f"{self.ctrl_magnitude}")


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
    loaded: bool = False  # a user's checkpoint rather than one built here

    @property
    def backdoored(self) -> bool:
        """An attack counts as successful only with ASR >= 0.8."""
        return self.attack != "clean" and self.asr >= 0.8

    def encoder(self, l2_normalize: bool = False, image_size: int = 32) -> VictimEncoder:
        """Load the encoder from its checkpoint."""
        return load_encoder(self.path, "auto", image_size, l2_normalize=l2_normalize)[0]

    def to_dict(self) -> dict:
        """JSON form."""
        return {"name": self.name, "attack": self.attack, "trigger": self.trigger_name, "path": str(self.path),
                "ba": self.ba, "asr": self.asr, "backdoored": self.backdoored,
                "build_seconds": round(self.build_seconds, 1), "loaded": self.loaded}


def _victim_data(summary: dict) -> dict:
    """A data summary minus the OOD set: no victim is built from it, so adding --ood-data must not rebuild one."""
    data = {k: v for k, v in summary.items() if k != "ood_train"}
    if isinstance(data.get("sources"), dict):
        data["sources"] = {k: v for k, v in data["sources"].items() if k != "ood"}
    return data


def _without_ood(key: dict) -> dict:
    """A victim key minus the OOD set (keys of older versions held its size and path)."""
    return {**key, "data": _victim_data(key["data"])} if isinstance(key.get("data"), dict) else key


def _cached(meta_path: Path, key: dict) -> dict | None:
    """The metadata at ``meta_path`` if its victim was built with ``key`` (an OOD-free key) and still exists."""
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if _without_ood(meta.get("key", {})) == key and Path(meta["path"]).is_file():
            return meta
    return None


def victim_cache_paths(out: Path, name: str, key: dict) -> tuple[Path, Path, dict | None]:
    """Checkpoint and metadata paths of victim ``name`` built with settings ``key``, plus its metadata if built.

    Each settings key gets its own files (``name-<digest>``), so building a victim with other settings in the
    same directory does not overwrite one that took many minutes; a plain ``name.pth`` from older versions is
    still reused when its key matches. The OOD set is no part of a key (no victim is built from it).
    """
    key = _without_ood(key)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path, meta_path = out / f"{name}-{digest}.pth", out / f"{name}-{digest}.json"
    # the plain name (oldest versions), this key's digest, then other digests (keys that held the OOD set's size)
    pattern = re.compile(rf"{re.escape(name)}-[0-9a-f]{{10}}\.json")
    others = sorted(p for p in out.glob(f"{name}-*.json") if pattern.fullmatch(p.name))
    for candidate in [out / f"{name}.json", meta_path, *others]:
        if (meta := _cached(candidate, key)) is not None:
            return Path(meta["path"]), candidate, meta
    return path, meta_path, None


def base_key(config: VictimConfig, data: EvalData, normalization: Normalization | None = None) -> dict:
    """The settings a SimCLR victim depends on (its cache key)."""
    skip = ("finetune_epochs", "finetune_lr", "shadow_fraction", "references", "ctrl_rate", "ctrl_magnitude", "drupe")
    key = {**{k: v for k, v in asdict(config).items() if k not in skip}, "data": _victim_data(data.summary())}
    if normalization is not None and normalization != Normalization():  # the default stays out: old caches stay valid
        key["normalization"] = normalization.to_dict()
    return key


def simclr_victim(out: Path, name: str, images: np.ndarray, *, key: dict, normalization: Normalization,
                  config: VictimConfig, progress: bool = True, log=print) -> tuple[Path, float]:
    """SimCLR-train a resnet on ``images`` into ``out`` unless a checkpoint with the same key exists there."""
    path, meta_path, meta = victim_cache_paths(out, name, key)
    if meta is not None:
        log(f"victim {name}: reusing {path}")
        return path, meta["build_seconds"]
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)  # the initial weights must not depend on what ran before in this process
    model = build_resnet(config.arch)
    losses = train_simclr(model, model.embed_dim, images, normalization=normalization,
                          config=SimCLRConfig(epochs=config.simclr_epochs, batch_size=config.simclr_batch,
                                              seed=config.seed), progress=progress)
    save_badencoder_checkpoint(model, path, config.simclr_epochs)
    seconds = time.perf_counter() - t0
    meta_path.write_text(json.dumps({"key": key, "path": str(path), "build_seconds": seconds,
                                     "simclr_losses": losses}, indent=1))
    log(f"victim {name}: SimCLR {config.simclr_epochs} epochs on {len(images)} images in {seconds:.0f} s, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return path, seconds


def build_ctrl_victim(out: Path, name: str, data: EvalData, *, normalization: Normalization, config: VictimConfig,
                      progress: bool = True, log=print) -> tuple[Path, float]:
    """CTRL: SimCLR from scratch on the pre-training set with ``ctrl_rate`` target-class images triggered."""
    trigger = ctrl_trigger(config.ctrl_magnitude, window=min(32, normalization.image_size))
    poisoned, idx = poison_target_class(data.pretrain, data.pretrain_labels, target=config.target,
                                        rate=config.ctrl_rate, trigger=trigger, seed=config.seed)
    log(f"victim {name}: {len(idx)} of {len(poisoned)} pre-training images poisoned (class {config.target}, "
        f"magnitude {config.ctrl_magnitude:g})")
    key = {**base_key(config, data, normalization), "attack": "ctrl", "rate": config.ctrl_rate}
    if config.ctrl_magnitude != VictimConfig.ctrl_magnitude:  # the reference stays out: old caches stay valid
        key["magnitude"] = config.ctrl_magnitude
    return simclr_victim(Path(out), name, poisoned, key=key, normalization=normalization, config=config,
                         progress=progress, log=log)


def build_victims(out: str | Path, specs: list[VictimSpec], data: EvalData, *, normalization: Normalization,
                  config: VictimConfig, progress: bool = True, log=print) -> tuple[Victim, list[Victim]]:
    """Build (or reuse cached) clean + attacked victims under ``out``; returns (clean, attacked)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = base_key(config, data, normalization)
    target = config.target
    if any(spec.attack == "ctrl" for spec in specs):  # a bad rate fails now, not after the clean pre-training
        poison_candidates(data.pretrain_labels, target, config.ctrl_rate)
    ref_idx = np.flatnonzero(data.id_train_labels == target)[: config.references]
    reference = data.id_train[ref_idx]
    shadow = data.pretrain[np.random.default_rng(config.seed + 3).permutation(len(data.pretrain))[
        : int(round(config.shadow_fraction * len(data.pretrain)))]]

    def simclr(name: str, images: np.ndarray, key: dict) -> tuple[Path, float]:
        return simclr_victim(out, name, images, key=key, normalization=normalization, config=config,
                             progress=progress, log=log)

    clean_path, clean_s = simclr("clean", data.pretrain, {**base, "attack": "clean"})
    clean_model = load_encoder(clean_path)[0].backbone
    clean = Victim("clean", "clean", "-", clean_path, build_seconds=clean_s)
    victims = []
    for spec in specs:
        if spec.attack == "clean":
            continue
        trigger = make_trigger(spec.trigger, normalization.image_size, config.seed)
        if spec.attack == "ctrl":
            path, seconds = build_ctrl_victim(out, spec.name, data, normalization=normalization, config=config,
                                              progress=progress, log=log)
        else:
            key = {**base, "attack": spec.attack, "trigger": spec.trigger, "epochs": config.finetune_epochs,
                   "lr": config.finetune_lr, "shadow": len(shadow), "references": config.references,
                   "drupe": asdict(DRUPEConfig(**config.drupe)) if spec.attack == "drupe" else config.drupe}
            path, meta_path, meta = victim_cache_paths(out, spec.name, key)
            if meta is not None:
                log(f"victim {spec.name}: reusing {path}")
                seconds = meta["build_seconds"]
            else:
                t0 = time.perf_counter()
                if spec.attack == "badencoder":
                    model = badencoder_finetune(
                        clean_model, shadow, reference, trigger=trigger, normalization=normalization,
                        config=BadEncoderConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed),
                        progress=progress)
                else:
                    model = drupe_finetune(
                        clean_model, shadow, reference, trigger=trigger, normalization=normalization,
                        config=DRUPEConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed,
                                           **config.drupe), progress=progress)
                save_badencoder_checkpoint(model, path, config.finetune_epochs)
                seconds = time.perf_counter() - t0
                meta_path.write_text(json.dumps({"key": key, "path": str(path), "build_seconds": seconds}, indent=1))
                log(f"victim {spec.name}: {spec.attack} fine-tune {config.finetune_epochs} epochs on "
                    f"{len(shadow)} shadow images in {seconds:.0f} s")
        victims.append(Victim(spec.name, spec.attack, spec.trigger, path, build_seconds=seconds))
    for victim in [clean, *victims]:
        _measure(victim, data, normalization, target, config.seed)
    return clean, victims


def load_victims(files: list[VictimFile], clean_path: str | Path, data: EvalData, *, normalization: Normalization,
                 target: int = 0, seed: int = 0, clean_name: str = "clean", log=print) -> tuple[Victim, list[Victim]]:
    """Load user victim checkpoints and the clean control encoder; measure their BA/ASR like built victims."""
    names = [clean_name, *(f.name for f in files)]
    if len(set(names)) < len(names):
        raise UserError(f"victim names must be unique, got {names}; name them with NAME=ATTACK:TRIGGER=PATH")
    clean = Victim(clean_name, "clean", "-", Path(clean_path).expanduser().resolve(), loaded=True)
    victims = [Victim(f.name, f.attack, f.trigger, f.path.resolve(), loaded=True) for f in files]
    for victim in [clean, *victims]:
        encoder, info = load_encoder(victim.path, "auto", normalization.image_size)
        _measure(victim, data, normalization, target, seed, encoder)
        log(f"victim {victim.name}: loaded {victim.path} ({info['format']}, {info['embed_dim']}-d embeddings)")
    return clean, victims


def _measure(victim: Victim, data: EvalData, normalization: Normalization, target: int, seed: int,
             encoder: VictimEncoder | None = None) -> None:
    trigger_name = victim.trigger_name if victim.trigger_name != "-" else "white_square"
    triggered = make_trigger(trigger_name, normalization.image_size, seed).stamp(data.test)
    if encoder is None:
        encoder = victim.encoder(image_size=normalization.image_size)
    result = evaluate_probe(encoder, normalization, train_u8=data.id_train, train_labels=data.id_train_labels,
                            test_u8=data.test, test_labels=data.test_labels, triggered_u8=triggered, target=target,
                            seed=seed)
    victim.ba, victim.asr = result.ba, result.asr

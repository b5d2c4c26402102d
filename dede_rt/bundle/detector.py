"""A loaded detector: the manifest's sections plus the modules they describe (encoder, decoder, prototypes).

``Detector.load`` checks the encoder file's SHA-256 against the manifest and the encoder's embedding width
against the decoder before anything is scored. Its scores come from ``dede_rt.scoring.Scorer``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from dede_rt.bundle.manifest import (CALIBRATION_SCORES, DECODER_WEIGHTS, PROTOTYPES_FILE, DeploymentRecord, Manifest,
                                     MaskSpec, ScoreSpec, ThresholdSpec, read_clean_scores, read_manifest,
                                     write_manifest)
from dede_rt.bundle.thresholds import DEFAULT_FPR, Thresholds
from dede_rt.data.transforms import Normalization
from dede_rt.errors import IntegrityError, UserError
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder
from dede_rt.models.encoders import VictimEncoder, reload_encoder, sha256_path
from dede_rt.scoring import (MASK_SEED, PROTOTYPE_KINDS, TEST_MASK_RATIO, RelativeReference, Scorer, Standardization,
                             kind_class)


@dataclass(kw_only=True)
class Detector:
    """A trained DeDe detector: victim encoder + decoder + normalization + thresholds chosen on clean data."""

    encoder: VictimEncoder
    decoder: DeDeDecoder
    normalization: Normalization
    encoder_info: dict
    calibration_scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    thresholds: dict[str, float] = field(default_factory=dict)  # FP32 thresholds by FPR key
    default_fpr: float = DEFAULT_FPR
    test_mask_ratio: float = TEST_MASK_RATIO
    train_mask_ratio: float = 0.9
    mask_seed: int = MASK_SEED
    sections: dict = field(default_factory=dict)  # training summary, bench settings, ...
    path: Path | None = None
    prototype_embeddings: np.ndarray | None = None  # set: the relative score against their reconstructions
    relative_k: int = 0
    standardization: Standardization | None = None  # set (with prototypes): the combined score

    def __post_init__(self) -> None:
        check_embedding_width(self.encoder, self.decoder.config)
        self.decoder.eval()
        self._relative: RelativeReference | None = None
        self._scorer: tuple[tuple, Scorer] | None = None
        if self.prototype_embeddings is not None and not 1 <= self.relative_k <= len(self.prototype_embeddings):
            raise UserError(f"the relative score averages k of {len(self.prototype_embeddings)} prototypes; "
                            f"got k = {self.relative_k}")
        if self.standardization is not None and self.prototype_embeddings is None:
            raise UserError("the combined score needs prototype embeddings as well as its standardization")

    @property
    def score_kind(self) -> str:
        """The registered score kind the detector serves: 'combined' with prototypes and a standardization,
        'relative' with prototypes alone, else 'summed'."""
        if self.prototype_embeddings is None:
            return "summed"
        return "relative" if self.standardization is None else "combined"

    @property
    def relative(self) -> RelativeReference | None:
        """The prototype reconstructions the relative score compares against (decoded once), or None."""
        if self.prototype_embeddings is not None and self._relative is None:
            self._relative = RelativeReference.from_embeddings(
                self.decoder, self.prototype_embeddings.astype(np.float32), self.relative_k)
        return self._relative

    def scorer(self, kernel: str = "torch") -> Scorer:
        """The detector's ``Scorer`` (uint8 NHWC in, scores out), built once per kernel and test mask."""
        key = (kernel, self.test_mask_ratio, self.mask_seed)
        if self._scorer is None or self._scorer[0] != key:
            self._scorer = (key, Scorer.from_detector(self, kernel=kernel))
        return self._scorer[1]

    def score(self, images_u8: np.ndarray, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Scores for uint8 NHWC images of the detector's size; higher = more likely triggered."""
        size = self.normalization.image_size
        if images_u8.ndim != 4 or images_u8.shape[1:] != (size, size, 3):
            raise UserError(f"expected uint8 images [N, {size}, {size}, 3], got {list(images_u8.shape)}")
        return self.scorer().score(images_u8, batch_size, progress)

    def fp32_thresholds(self) -> Thresholds:
        """The detector's own (FP32) thresholds, derivable at any FPR from its clean scores."""
        return Thresholds(dict(self.thresholds), self.default_fpr, "fp32", np.asarray(self.calibration_scores))

    def threshold(self, fpr: float | None = None) -> float:
        """The flagging threshold at target FPR ``fpr`` (default: the detector's default FPR)."""
        return self.fp32_thresholds().at(fpr)

    def flag(self, scores: np.ndarray, fpr: float | None = None) -> np.ndarray:
        """Boolean flags: score above the threshold at ``fpr``."""
        return self.fp32_thresholds().flag(scores, fpr)

    def manifest(self, deployment: DeploymentRecord | None = None) -> Manifest:
        """The typed manifest of this detector (with ``deployment``, by default an empty record)."""
        kind = self.score_kind
        score = ScoreSpec(kind, self.relative_k if kind in PROTOTYPE_KINDS else 0,
                          0 if self.prototype_embeddings is None else int(len(self.prototype_embeddings)),
                          kind_class(kind).description,
                          None if self.standardization is None else self.standardization.to_dict())
        return Manifest(encoder=dict(self.encoder_info), normalization=self.normalization.to_dict(),
                        decoder=self.decoder.config.to_dict(),
                        mask=MaskSpec(self.train_mask_ratio, self.test_mask_ratio, self.mask_seed), score=score,
                        thresholds=ThresholdSpec(dict(self.thresholds), self.default_fpr,
                                                 int(len(self.calibration_scores))),
                        deployment=deployment or DeploymentRecord(), sections=dict(self.sections))

    def save(self, directory: str | Path, embed_encoder: bool = False) -> Path:
        """Write the bundle to ``directory`` (created), keeping the deployment record already there; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The deployment record is the deployment steps' (export, calibrate, build-engine, bench): keep it.
        # Whether it still matches these weights is the exports' fingerprint's business (stale_exports).
        deployment = read_manifest(directory).deployment if (directory / "manifest.json").is_file() else None
        save_file({k: v.contiguous() for k, v in self.decoder.state_dict().items()}, str(directory / DECODER_WEIGHTS))
        np.save(directory / CALIBRATION_SCORES, np.asarray(self.calibration_scores, np.float32))
        if self.prototype_embeddings is not None:
            np.save(directory / PROTOTYPES_FILE, np.asarray(self.prototype_embeddings, np.float32))
        info = dict(self.encoder_info)
        if embed_encoder:
            src = Path(info["path"])
            name = "encoder" if src.is_dir() else f"encoder{src.suffix or '.pt'}"
            if src.resolve() != (directory / name).resolve():
                if src.is_dir():  # a Hugging Face model folder
                    shutil.copytree(src, directory / name, dirs_exist_ok=True)
                else:
                    shutil.copyfile(src, directory / name)
            info["embedded"] = name
        self.encoder_info = info
        write_manifest(directory, self.manifest(deployment))
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder_path: str | Path | None = None) -> Detector:
        """Read a bundle; ``encoder_path`` overrides where the (hash-checked) encoder file is."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        info = manifest.encoder
        path = _encoder_file(directory, info, encoder_path)
        actual = sha256_path(path)
        if actual != info["sha256"]:
            raise IntegrityError(f"{path}: encoder SHA-256 {actual[:12]}… does not match the detector's "
                                 f"{info['sha256'][:12]}…; this detector was trained on a different encoder")
        norm = Normalization.from_dict(manifest.normalization)
        encoder = reload_encoder(info, path, norm.image_size)
        decoder = DeDeDecoder(DecoderConfig(**manifest.decoder))
        check_embedding_width(encoder, decoder.config)
        try:
            decoder.load_state_dict(load_file(str(directory / DECODER_WEIGHTS)))
        except Exception as exc:
            raise UserError(f"{directory / DECODER_WEIGHTS}: unreadable decoder weights ({str(exc)[:160]})") from None
        return cls(encoder=encoder, decoder=decoder, normalization=norm, encoder_info=info,
                   calibration_scores=read_clean_scores(directory), thresholds=dict(manifest.thresholds.by_fpr),
                   default_fpr=manifest.thresholds.default_fpr, test_mask_ratio=manifest.mask.test_ratio,
                   train_mask_ratio=manifest.mask.train_ratio, mask_seed=manifest.mask.test_seed,
                   sections=dict(manifest.sections), path=directory,
                   prototype_embeddings=_prototypes(directory, manifest), relative_k=manifest.score.relative_k,
                   standardization=_standardization(directory, manifest))


def _standardization(directory: Path, manifest: Manifest) -> Standardization | None:
    """The combined score's scales (None for other kinds)."""
    if manifest.score.kind != "combined":
        return None
    try:
        return Standardization.from_dict(manifest.score.standardization or {})
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{directory}: combined-score detector without a complete score.standardization") from None


def _prototypes(directory: Path, manifest: Manifest) -> np.ndarray | None:
    """The relative score's clean reference embeddings [K, D] (None for other kinds)."""
    kind_class(manifest.score.kind)  # an unknown kind is a one-line error here, not at scoring time
    if manifest.score.kind not in PROTOTYPE_KINDS:
        return None
    path = directory / PROTOTYPES_FILE
    if not path.is_file():
        raise UserError(f"{directory}: relative-score detector without its {PROTOTYPES_FILE}")
    prototypes = np.load(path)
    width = int(manifest.decoder["embed_dim"])
    if prototypes.ndim != 2 or prototypes.shape[1] != width:
        raise UserError(f"{path}: expected [K, {width}] embeddings, got {list(prototypes.shape)}")
    return prototypes


def check_embedding_width(encoder: VictimEncoder, config: DecoderConfig) -> None:
    """Fail clearly when the encoder's embedding width is not what the decoder was built for."""
    if encoder.embed_dim != config.embed_dim:
        raise UserError(f"the encoder outputs {encoder.embed_dim}-d embeddings but the decoder expects "
                        f"{config.embed_dim}-d; wrong encoder for this detector")


def _encoder_file(directory: Path, info: dict, override: str | Path | None) -> Path:
    if override is not None:
        path = Path(override)
    elif info.get("embedded"):
        path = directory / info["embedded"]
    else:
        path = Path(info["path"])
    if not path.exists():
        raise UserError(f"{path}: the detector's encoder file is missing (pass its new location with --encoder)")
    return path


def load_detector(path: str | Path, encoder_path: str | Path | None = None) -> Detector:
    """Load a detector bundle written by ``dede-rt train`` (see ``Detector.load``)."""
    return Detector.load(path, encoder_path)

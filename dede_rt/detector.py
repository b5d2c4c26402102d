"""The detector bundle: a directory holding everything needed to score images.

    DETECTOR/
      manifest.json            format version, encoder reference, normalization,
                               decoder config, mask ratios, thresholds + FPRs,
                               training summary, versions
      decoder.safetensors      decoder weights
      calibration_scores.npy   clean held-out scores (re-threshold at any FPR)
      prototypes.npy           only for the relative score: clean reference embeddings [K, D]
      encoder.<ext>            only with embed_encoder=True

``Detector.load`` checks the encoder file's SHA-256 against the manifest and
the encoder's embedding width against the decoder before anything is scored.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dede_rt.data.transforms import Normalization
from dede_rt.errors import IntegrityError, UserError
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder
from dede_rt.models.encoders import VictimEncoder, load_encoder, sha256_file
from dede_rt.scoring import MASK_SEED, TEST_MASK_RATIO, RelativeReference, score_images
from dede_rt.thresholds import DEFAULT_FPR, threshold_at_fpr

MANIFEST = "manifest.json"
DECODER_WEIGHTS = "decoder.safetensors"
CALIBRATION_SCORES = "calibration_scores.npy"
PROTOTYPES_FILE = "prototypes.npy"
SCORE_TEXT = {"reference": "sum of squared error over masked patches, normalized pixel space",
              "relative": "sum of squared error over masked patches minus the mean such error of the k best-fitting "
                          "prototype reconstructions (scoring.relative_sse)"}
BUNDLE_FORMAT = 1


def versions() -> dict[str, str]:
    """Versions of the software that produced an artifact."""
    import onnxruntime
    import sklearn

    from dede_rt import __version__

    return {"dede_rt": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


@dataclass
class Detector:
    """A trained DeDe detector: victim encoder + decoder + normalization + calibrated thresholds."""

    encoder: VictimEncoder
    decoder: DeDeDecoder
    normalization: Normalization
    encoder_info: dict
    calibration_scores: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)
    test_mask_ratio: float = TEST_MASK_RATIO
    train_mask_ratio: float = 0.9
    mask_seed: int = MASK_SEED
    extra: dict = field(default_factory=dict)  # training summary, quality gates, ...
    path: Path | None = None
    prototype_embeddings: np.ndarray | None = None  # set: the relative score against their reconstructions
    relative_k: int = 0

    def __post_init__(self) -> None:
        check_embedding_width(self.encoder, self.decoder.config)
        self.decoder.eval()
        self._relative: RelativeReference | None = None
        if self.prototype_embeddings is not None and not 1 <= self.relative_k <= len(self.prototype_embeddings):
            raise UserError(f"the relative score averages k of {len(self.prototype_embeddings)} prototypes; "
                            f"got k = {self.relative_k}")

    @property
    def score_kind(self) -> str:
        """'relative' when the detector scores against prototypes, else 'reference'."""
        return "reference" if self.prototype_embeddings is None else "relative"

    @property
    def relative(self) -> RelativeReference | None:
        """The prototype reconstructions the relative score compares against (decoded once), or None."""
        if self.prototype_embeddings is not None and self._relative is None:
            self._relative = RelativeReference.from_embeddings(
                self.decoder, self.prototype_embeddings.astype(np.float32), self.relative_k)
        return self._relative

    def score(self, images_u8: np.ndarray, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Scores for uint8 NHWC images of the detector's size; higher = more likely triggered."""
        size = self.normalization.image_size
        if images_u8.ndim != 4 or images_u8.shape[1:] != (size, size, 3):
            raise UserError(f"expected uint8 images [N, {size}, {size}, 3], got {list(images_u8.shape)}")
        return score_images(self.encoder, self.decoder, self.normalization, images_u8, batch_size,
                            self.test_mask_ratio, self.mask_seed, progress, self.relative)

    def threshold(self, fpr: float | None = None) -> float:
        """The flagging threshold at target FPR ``fpr`` (default: the bundle's default FPR)."""
        fpr = self.extra.get("default_fpr", DEFAULT_FPR) if fpr is None else fpr
        key = f"{fpr:g}"
        if key in self.thresholds:
            return self.thresholds[key]
        return threshold_at_fpr(self.calibration_scores, fpr)

    def flag(self, scores: np.ndarray, fpr: float | None = None) -> np.ndarray:
        """Boolean flags: score above the threshold calibrated at ``fpr``."""
        return np.asarray(scores) > self.threshold(fpr)

    def manifest(self) -> dict:
        """The JSON manifest written with the bundle."""
        return {
            "format": BUNDLE_FORMAT,
            "kind": "dede-detector",
            "encoder": self.encoder_info,
            "normalization": self.normalization.to_dict(),
            "decoder": self.decoder.config.to_dict(),
            "mask": {"train_ratio": self.train_mask_ratio, "test_ratio": self.test_mask_ratio, "test_seed": self.mask_seed,
                     "score": SCORE_TEXT[self.score_kind], "score_kind": self.score_kind,
                     **({"relative_k": self.relative_k, "prototypes": int(len(self.prototype_embeddings))}
                        if self.prototype_embeddings is not None else {})},
            "thresholds": {"by_fpr": self.thresholds, "default_fpr": self.extra.get("default_fpr", DEFAULT_FPR),
                           "calibration_images": int(len(self.calibration_scores)), "rule": "flag if score > threshold"},
            **{k: v for k, v in self.extra.items() if k != "default_fpr"},
            "versions": versions(),
        }

    def save(self, directory: str | Path, embed_encoder: bool = False) -> Path:
        """Write the bundle to ``directory`` (created); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.decoder.state_dict().items()}, str(directory / DECODER_WEIGHTS))
        np.save(directory / CALIBRATION_SCORES, np.asarray(self.calibration_scores, np.float32))
        if self.prototype_embeddings is not None:
            np.save(directory / PROTOTYPES_FILE, np.asarray(self.prototype_embeddings, np.float32))
        info = dict(self.encoder_info)
        if embed_encoder:
            src = Path(info["path"])
            name = f"encoder{src.suffix or '.pt'}"
            if src.resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)
            info["embedded"] = name
        self.encoder_info = info
        _atomic_write_json(directory / MANIFEST, self.manifest())
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder_path: str | Path | None = None) -> Detector:
        """Read a bundle; ``encoder_path`` overrides where the (hash-checked) encoder file is."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{directory}: not a detector bundle (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{manifest_path}: corrupt manifest ({exc})") from None
        if manifest.get("kind") != "dede-detector" or manifest.get("format") != BUNDLE_FORMAT:
            raise UserError(f"{manifest_path}: not a dede-rt detector manifest (format {manifest.get('format')})")
        info = manifest["encoder"]
        path = _encoder_file(directory, info, encoder_path)
        actual = sha256_file(path)
        if actual != info["sha256"]:
            raise IntegrityError(f"{path}: encoder SHA-256 {actual[:12]}… does not match the detector's "
                                 f"{info['sha256'][:12]}…; this detector was trained on a different encoder")
        norm = Normalization.from_dict(manifest["normalization"])
        fmt = info["format"] if info["format"] in ("onnx", "torchscript") else "auto"
        encoder, _ = load_encoder(path, fmt, norm.image_size, info.get("l2_normalize", False))
        decoder = DeDeDecoder(DecoderConfig(**manifest["decoder"]))
        check_embedding_width(encoder, decoder.config)
        try:
            decoder.load_state_dict(load_file(str(directory / DECODER_WEIGHTS)))
        except Exception as exc:
            raise UserError(f"{directory / DECODER_WEIGHTS}: unreadable decoder weights ({str(exc)[:160]})") from None
        scores_path = directory / CALIBRATION_SCORES
        calibration = np.load(scores_path) if scores_path.exists() else np.empty(0, np.float32)
        known = {"format", "kind", "encoder", "normalization", "decoder", "mask", "thresholds", "versions"}
        extra = {k: v for k, v in manifest.items() if k not in known}
        extra["default_fpr"] = manifest["thresholds"].get("default_fpr", DEFAULT_FPR)
        prototypes = None
        if manifest["mask"].get("score_kind", "reference") == "relative":
            if not (directory / PROTOTYPES_FILE).is_file():
                raise UserError(f"{directory}: relative-score detector without its {PROTOTYPES_FILE}")
            prototypes = np.load(directory / PROTOTYPES_FILE)
            if prototypes.ndim != 2 or prototypes.shape[1] != decoder.config.embed_dim:
                raise UserError(f"{directory / PROTOTYPES_FILE}: expected [K, {decoder.config.embed_dim}] embeddings, "
                                f"got {list(prototypes.shape)}")
        return cls(encoder, decoder, norm, info, calibration, dict(manifest["thresholds"]["by_fpr"]),
                   manifest["mask"]["test_ratio"], manifest["mask"]["train_ratio"], manifest["mask"]["test_seed"],
                   extra, directory, prototypes, int(manifest["mask"].get("relative_k", 0)))


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
    if not path.is_file():
        raise UserError(f"{path}: the detector's encoder file is missing (pass its new location with --encoder)")
    return path


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_detector(path: str | Path, encoder_path: str | Path | None = None) -> Detector:
    """Load a detector bundle written by ``dede-rt train`` (see ``Detector.load``)."""
    return Detector.load(path, encoder_path)

"""The detector bundle's manifest: the only reader, validator, migrator and (atomic) writer of ``manifest.json``.

    DETECTOR/
      manifest.json            this module's ``Manifest`` (schema ``SCHEMA``)
      decoder.safetensors      decoder weights
      calibration_scores.npy   clean held-out FP32 scores (thresholds at any FPR)
      prototypes.npy           only for the relative score: clean reference embeddings [K, D]
      encoder.<ext>            only when the encoder is embedded
      onnx/, trt/              what ``export``, ``calibrate`` and ``build-engine`` made (``deployment``)

The ``deployment`` record belongs to the deployment steps (export, calibrate,
build-engine, bench): ``Detector.save`` writes the detector's own sections and
keeps the deployment record already on disk, so a detector loaded before an
export and saved after it no longer erases what the export recorded.

Schema history: 1 = the first round's layout (score kind inside ``mask``,
called "reference"; decoders always had a qkv bias). 2 = a ``score`` section
(kinds "summed", "relative", later "combined" with its ``standardization``), ``decoder.qkv_bias`` explicit, ``schema`` key.
Bundles of schema 1 are migrated on read and score exactly as before.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dede_rt.bundle.thresholds import DEFAULT_FPR, Thresholds
from dede_rt.errors import UserError
from dede_rt.files import write_json_atomic

# The score kinds whose bundles keep prototype embeddings (prototypes.npy): scoring.PROTOTYPE_KINDS, spelled
# here so the manifest stays importable without torch (test_bundle_manifest checks that the two agree).
PROTOTYPE_KINDS = ("relative", "combined")

if TYPE_CHECKING:
    from dede_rt.data.images import Resize

SCHEMA = 2
KIND = "dede-detector"
MANIFEST = "manifest.json"
DECODER_WEIGHTS = "decoder.safetensors"
CALIBRATION_SCORES = "calibration_scores.npy"
PROTOTYPES_FILE = "prototypes.npy"
DEPLOYMENT_SECTIONS = ("onnx", "precisions", "tensorrt", "benchmarks")


@dataclass
class Gate:
    """A lower precision's quality gate: passed or not, how it was judged, and what was measured."""

    passed: bool
    mode: str = "reference"  # "reference" (fp32), "labelled", "clean-rank", "not run"
    summary: str = ""
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-JSON form (measurements inline, as written since schema 1)."""
        return {**self.measured, "passed": self.passed, "mode": self.mode, "summary": self.summary}

    @classmethod
    def from_dict(cls, data: dict) -> Gate:
        """Inverse of ``to_dict``; accepts schema-1 entries (fp32's ``reference: true``)."""
        rest = dict(data)
        passed = bool(rest.pop("passed", False))
        mode = rest.pop("mode", "reference" if rest.pop("reference", False) else "unknown")
        return cls(passed, mode, str(rest.pop("summary", "")), rest)


@dataclass
class PrecisionEntry:
    """One deployable variant (an ONNX precision or a TensorRT engine): its file, gate and own thresholds."""

    path: str
    gate: Gate
    thresholds: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # sha256, conversion, engine manifest, held-out counts, ...

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"path": self.path, **self.details, "gate": self.gate.to_dict(), "thresholds": dict(self.thresholds)}

    @classmethod
    def from_dict(cls, data: dict) -> PrecisionEntry:
        """Inverse of ``to_dict``."""
        rest = dict(data)
        return cls(str(rest.pop("path", "")), Gate.from_dict(rest.pop("gate", {})),
                   {k: float(v) for k, v in rest.pop("thresholds", {}).items()}, rest)

    @property
    def engine_manifest(self) -> dict:
        """A TensorRT engine's build manifest ({} for ONNX entries)."""
        return dict(self.details.get("manifest", {}))


@dataclass
class DeploymentRecord:
    """What was exported, calibrated, built and measured for a bundle (paths relative to it)."""

    onnx: dict = field(default_factory=dict)  # exporter, graphs {name: {path, sha256, ...}}, source fingerprint
    precisions: dict[str, PrecisionEntry] = field(default_factory=dict)  # ONNX variants by precision
    tensorrt: dict[str, PrecisionEntry] = field(default_factory=dict)  # engines by precision
    benchmarks: dict = field(default_factory=dict)  # "<backend>:<precision>" -> {throughput, device, ...}

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"onnx": self.onnx, "precisions": {k: v.to_dict() for k, v in self.precisions.items()},
                "tensorrt": {k: v.to_dict() for k, v in self.tensorrt.items()}, "benchmarks": self.benchmarks}

    @classmethod
    def from_dict(cls, data: dict) -> DeploymentRecord:
        """Inverse of ``to_dict``."""
        return cls(dict(data.get("onnx", {})),
                   {k: PrecisionEntry.from_dict(v) for k, v in data.get("precisions", {}).items()},
                   {k: PrecisionEntry.from_dict(v) for k, v in data.get("tensorrt", {}).items()},
                   dict(data.get("benchmarks", {})))

    def clear_derived(self) -> None:
        """Forget every variant made from the old graphs (new weights or mask make them void)."""
        self.precisions, self.tensorrt, self.benchmarks = {}, {}, {}

    def entry(self, backend: str, precision: str) -> PrecisionEntry | None:
        """The recorded variant for ``backend`` ('onnxruntime' or 'tensorrt') at ``precision``, if any."""
        return (self.tensorrt if backend == "tensorrt" else self.precisions).get(precision)

    def graph_path(self, name: str) -> str | None:
        """The recorded relative path of exported graph ``name``."""
        graph = self.onnx.get("graphs", {}).get(name)
        return graph["path"] if graph else None


@dataclass
class MaskSpec:
    """Mask ratios: training's, and the test ratio + seed of the shared test mask."""

    train_ratio: float = 0.9
    test_ratio: float = 0.99
    test_seed: int = 0


@dataclass
class ScoreSpec:
    """Which score kind the detector serves (``dede_rt.scoring.kinds``) and its parameters."""

    kind: str = "summed"
    relative_k: int = 0
    prototypes: int = 0
    description: str = ""
    standardization: dict | None = None  # the combined kind's scales (scoring.Standardization.to_dict)

    def to_dict(self) -> dict:
        """Plain-JSON form (prototype parameters only for the kinds that use prototypes)."""
        out: dict[str, Any] = {"kind": self.kind, "description": self.description}
        if self.kind in PROTOTYPE_KINDS:
            out.update(relative_k=self.relative_k, prototypes=self.prototypes)
        if self.kind == "combined":
            out["standardization"] = dict(self.standardization or {})
        return out


@dataclass
class ThresholdSpec:
    """The FP32 thresholds written with the detector (its clean scores live in ``calibration_scores.npy``)."""

    by_fpr: dict[str, float] = field(default_factory=dict)
    default_fpr: float = DEFAULT_FPR
    clean_images: int = 0

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"by_fpr": dict(self.by_fpr), "default_fpr": self.default_fpr, "calibration_images": self.clean_images,
                "rule": "flag if score > threshold"}


@dataclass
class Manifest:
    """Everything ``manifest.json`` holds, typed; ``sections`` keeps the rest (training summary, bench, ...)."""

    encoder: dict
    normalization: dict
    decoder: dict
    mask: MaskSpec = field(default_factory=MaskSpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    thresholds: ThresholdSpec = field(default_factory=ThresholdSpec)
    deployment: DeploymentRecord = field(default_factory=DeploymentRecord)
    sections: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def image_size(self) -> int:
        """The square input size the detector scores."""
        return int(self.normalization["image_size"])

    @property
    def pixels(self) -> Resize:
        """How files are decoded for this detector (its resize rule): the same in training, scan and calibration."""
        from dede_rt.data.transforms import Normalization

        return Normalization.from_dict(self.normalization).pixels  # one place for the defaults of old records

    def to_dict(self) -> dict:
        """The JSON document."""
        return {"schema": self.schema, "kind": KIND, "encoder": self.encoder, "normalization": self.normalization,
                "decoder": self.decoder, "mask": asdict(self.mask), "score": self.score.to_dict(),
                "thresholds": self.thresholds.to_dict(), **self.sections, "deployment": self.deployment.to_dict(),
                "versions": self.versions}

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> Manifest:
        """Validate (and migrate) a parsed manifest."""
        data = migrate(data, where)
        try:
            mask, score, thr = data["mask"], data["score"], data["thresholds"]
            known = {"schema", "kind", "encoder", "normalization", "decoder", "mask", "score", "thresholds",
                     "deployment", "versions"}
            return cls(
                encoder=dict(data["encoder"]), normalization=dict(data["normalization"]), decoder=dict(data["decoder"]),
                mask=MaskSpec(float(mask["train_ratio"]), float(mask["test_ratio"]), int(mask["test_seed"])),
                score=ScoreSpec(score["kind"], int(score.get("relative_k", 0)), int(score.get("prototypes", 0)),
                                score.get("description", ""), score.get("standardization")),
                thresholds=ThresholdSpec({k: float(v) for k, v in thr.get("by_fpr", {}).items()},
                                         float(thr.get("default_fpr", DEFAULT_FPR)),
                                         int(thr.get("calibration_images", 0))),
                deployment=DeploymentRecord.from_dict(data.get("deployment", {})),
                sections={k: v for k, v in data.items() if k not in known},
                versions=dict(data.get("versions", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: incomplete detector manifest ({type(exc).__name__}: {exc})") from None

    def thresholds_for(self, backend: str = "torch", precision: str = "fp32",
                       clean_scores: np.ndarray | None = None) -> Thresholds:
        """The thresholds the variant ``backend``/``precision`` flags with.

        FP32: the detector's own, derivable at any FPR from ``clean_scores``; lower precisions: the ones
        re-chosen on their own clean scores (the detector's when none were recorded).
        """
        default = self.thresholds.default_fpr
        entry = None if backend == "torch" else self.deployment.entry(backend, precision)
        if precision != "fp32" and entry is not None and entry.thresholds:
            return Thresholds(dict(entry.thresholds), default, precision)
        # Clean FP32 scores derive thresholds at other FPRs only for FP32 itself.
        return Thresholds(dict(self.thresholds.by_fpr), default, precision,
                          clean_scores if precision == "fp32" else None)


def migrate(data: dict, where: str = MANIFEST) -> dict:
    """A manifest dict of any known schema brought to ``SCHEMA`` (a new dict; the input is not changed)."""
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UserError(f"{where}: not a dede-rt detector manifest")
    version = data.get("schema", data.get("format"))
    if version == SCHEMA:
        return data
    if version != 1:
        raise UserError(f"{where}: detector manifest schema {version!r} is not one this dede-rt reads "
                        f"(1-{SCHEMA}); upgrade dede-rt")
    out = {k: v for k, v in data.items() if k != "format"}
    mask = dict(out.get("mask", {}))
    kind = mask.pop("score_kind", "reference")
    out["score"] = {"kind": "summed" if kind == "reference" else kind, "description": mask.pop("score", ""),
                    **{k: mask.pop(k) for k in ("relative_k", "prototypes") if k in mask}}
    out["mask"] = mask
    out["decoder"] = {**out.get("decoder", {}), "qkv_bias": True}  # every schema-1 decoder was built with one
    out["schema"] = SCHEMA
    return out


def read_manifest(bundle: str | Path) -> Manifest:
    """The bundle's manifest, validated and migrated (UserError when missing, corrupt or foreign)."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle}: not a detector bundle (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: corrupt manifest ({exc})") from None
    return Manifest.from_dict(data, str(path))


def write_manifest(bundle: str | Path, manifest: Manifest) -> None:
    """Write ``manifest`` atomically (readers never see a half-written file)."""
    manifest.versions = versions()
    write_json_atomic(Path(bundle) / MANIFEST, manifest.to_dict())


@contextmanager
def edit_manifest(bundle: str | Path) -> Iterator[Manifest]:
    """Read, let the caller change, and atomically write back the manifest (nothing is written on an exception)."""
    manifest = read_manifest(bundle)
    yield manifest
    write_manifest(bundle, manifest)


def read_clean_scores(bundle: str | Path) -> np.ndarray:
    """The FP32 clean held-out scores the thresholds were chosen on (empty when absent)."""
    path = Path(bundle) / CALIBRATION_SCORES
    return np.load(path) if path.is_file() else np.empty(0, np.float32)


def fingerprint(bundle: str | Path, manifest: Manifest | None = None) -> dict:
    """What exported graphs are made from: decoder weights hash, encoder hash, test mask, score kind."""
    from dede_rt.models.encoders import sha256_file

    manifest = manifest or read_manifest(bundle)
    weights = Path(bundle) / DECODER_WEIGHTS
    prototypes = Path(bundle) / PROTOTYPES_FILE
    return {"decoder_sha256": sha256_file(weights) if weights.is_file() else None,
            "encoder_sha256": manifest.encoder.get("sha256"),
            "test_mask_ratio": manifest.mask.test_ratio, "mask_seed": manifest.mask.test_seed,
            "score_kind": manifest.score.kind,
            **({"prototypes_sha256": sha256_file(prototypes), "relative_k": manifest.score.relative_k}
               if manifest.score.kind in PROTOTYPE_KINDS and prototypes.is_file() else {}),
            **({"standardization": manifest.score.standardization} if manifest.score.kind == "combined" else {})}


def stale_exports(bundle: str | Path, manifest: Manifest | None = None) -> str | None:
    """Why the bundle's exported graphs no longer match its weights/mask/score (None: they match, or none exist)."""
    manifest = manifest or read_manifest(bundle)
    recorded = manifest.deployment.onnx.get("source")
    if not recorded:
        return None
    current = fingerprint(bundle, manifest)
    # Keys a graph predating them did not record are compared only when recorded.
    changed = [k for k, v in current.items() if k in recorded and recorded[k] != v]
    if changed:
        return f"the ONNX exports predate a change of {', '.join(changed)}; run `dede-rt export {bundle}` again"
    return None


def versions() -> dict[str, str]:
    """Versions of the software that wrote an artifact (optional packages only when installed)."""
    import importlib.metadata as md

    from dede_rt import __version__

    out = {"dede_rt": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "onnxruntime", "onnxruntime-gpu", "scikit-learn", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out

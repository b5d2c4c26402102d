"""Encoder families users hold, named ``FAMILY:NAME`` plus the checkpoint file their repository publishes.

``torchvision:resnet50 --weights moco_v2_800ep.pth.tar``, ``timm:vit_small_patch16_224 --weights dino.pth``,
``open_clip:RN50 --weights clip.pt``, ``hf_clip:./clip-vit-base-patch32`` (a Hugging Face folder; a folder with
a config.json passed as the encoder is read the same way). Each family builds the architecture, finds its
keys under the repository's prefix (``checkpoints.locate_weights``), says which embedding it takes (before
or after the projection head) and defines its own preprocessing, which the detector stores and applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.families import hf_clip_family, open_clip_family, timm_family, torchvision_family
from dede_rt.models.families.checkpoints import read_checkpoint, tensor_state

FAMILIES = ("torchvision", "timm", "open_clip", "hf_clip")
EMBEDDINGS = ("auto", "backbone", "head")
# SSL evaluations read the backbone feature (BadEncoder/DRUPE attack it); CLIP's embedding is the projected one.
DEFAULT_EMBEDDING = {"torchvision": "backbone", "timm": "backbone", "open_clip": "head", "hf_clip": "head"}


@dataclass(frozen=True)
class EncoderSpec:
    """Which family and model, which weights, and which embedding (``backbone`` or ``head``)."""

    family: str
    name: str
    weights: Path
    embedding: str = "auto"

    @property
    def resolved_embedding(self) -> str:
        """``embedding`` with ``auto`` replaced by the family's default."""
        return DEFAULT_EMBEDDING[self.family] if self.embedding == "auto" else self.embedding


def parse_spec(encoder: str | Path, weights: str | Path | None = None, embedding: str = "auto") -> EncoderSpec | None:
    """An ``EncoderSpec`` for ``FAMILY:NAME`` (or a Hugging Face folder); None for a plain encoder file."""
    if embedding not in EMBEDDINGS:
        raise UserError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    text = str(encoder)
    family, sep, name = text.partition(":")
    if not (sep and family in FAMILIES):
        if Path(text).is_dir() and (Path(text) / "config.json").is_file():
            return EncoderSpec("hf_clip", "", Path(text), embedding)
        if sep and not Path(text).exists() and len(family) > 1:
            raise UserError(f"unknown encoder family {family!r}; choose one of {', '.join(FAMILIES)}")
        return None
    if family == "hf_clip":
        return EncoderSpec(family, "", Path(weights or name), embedding)
    if not name:
        raise UserError(f"--encoder {family}:NAME needs the model's name (e.g. {_EXAMPLES[family]})")
    if weights is None:
        raise UserError(f"--encoder {text} needs --weights CHECKPOINT (nothing is downloaded)")
    return EncoderSpec(family, name, Path(weights), embedding)


_EXAMPLES = {"torchvision": "torchvision:resnet50", "timm": "timm:vit_small_patch16_224", "open_clip": "open_clip:RN50"}


def load_family(spec: EncoderSpec) -> tuple[nn.Module, dict, Normalization]:
    """The family's backbone with the spec's weights, a description of what was loaded, and its preprocessing."""
    embedding = spec.resolved_embedding
    if spec.family == "hf_clip":
        module, extra = hf_clip_family.build(spec.weights, embedding)
        return module, extra, hf_clip_family.preprocessing(spec.weights, module)
    family = {"torchvision": torchvision_family, "timm": timm_family, "open_clip": open_clip_family}[spec.family]
    state = tensor_state(read_checkpoint(spec.weights))
    module, extra = family.build(spec.name, state, embedding)
    preprocessing = family.preprocessing(spec.name if spec.family == "torchvision" else module)
    return module, {"arch": spec.name, **extra}, preprocessing

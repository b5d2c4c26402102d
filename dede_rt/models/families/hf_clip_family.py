"""Hugging Face ``CLIPVisionModelWithProjection`` folders (config.json + safetensors), or a full CLIPModel's.

``embedding="head"`` (default) is ``image_embeds`` (after ``visual_projection``); ``"backbone"`` the
pooled, post-LayerNorm class token. Preprocessing comes from the folder's ``preprocessor_config.json``
when it has one, else CLIP's (shorter side to the input size, bicubic, centre crop, CLIP mean/std).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dede_rt.data.transforms import CLIP_MEAN, CLIP_STD, Normalization
from dede_rt.errors import UserError
from dede_rt.optional import import_extra

PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


class HFClipImageTower(nn.Module):
    """pixel_values -> CLIP image embedding (or the pooled class token before the projection)."""

    def __init__(self, model: nn.Module, embedding: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.project = embedding == "head"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=images).pooler_output
        return self.model.visual_projection(pooled) if self.project else pooled


def build(folder: Path, embedding: str) -> tuple[nn.Module, dict]:
    """Load the folder strictly (a missing or mis-shaped tensor is an error, not a random init)."""
    transformers = import_extra("transformers", "Hugging Face CLIP encoders", "hf")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        model, loading = transformers.CLIPVisionModelWithProjection.from_pretrained(
            str(folder), output_loading_info=True, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder}: not a loadable CLIP vision model ({str(exc).splitlines()[0][:160]})") from None
    missing = list(loading.get("missing_keys", ()))
    shaped = list(loading.get("mismatched_keys", ()))
    if missing or shaped:
        bad = missing or [str(k[0] if isinstance(k, tuple) else k) for k in shaped]
        raise UserError(f"{folder}: the weights are not a complete CLIP vision model: "
                        f"{'missing' if missing else 'mis-shaped'} {len(bad)} keys: {', '.join(map(str, bad[:5]))}")
    model.float()
    c = model.config
    return HFClipImageTower(model, embedding), {
        "embedding": embedding, "arch": f"clip_vit_p{c.patch_size}_{c.image_size}_w{c.hidden_size}_l{c.num_hidden_layers}"}


def preprocessing(folder: Path, model: HFClipImageTower) -> Normalization:
    """The folder's CLIPImageProcessor settings, or CLIP's defaults at the model's input size."""
    size = int(model.model.config.image_size)
    path = Path(folder) / "preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    crop = cfg.get("crop_size", size)
    crop = int(crop.get("height", size) if isinstance(crop, dict) else crop)
    short = cfg.get("size", crop)
    short = int(short.get("shortest_edge", crop) if isinstance(short, dict) else short)
    return Normalization(tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)), crop,
                         "crop", short, PIL_RESAMPLE.get(cfg.get("resample", 3), "bicubic"))

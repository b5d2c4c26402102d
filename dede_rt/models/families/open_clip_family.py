"""OpenCLIP image towers (``RN50``, ``ViT-B-32``, ...) from an OpenCLIP / OpenAI-layout checkpoint.

The whole CLIP checkpoint is accepted (its ``visual.*`` keys are used; ``model.visual.`` / ``module.visual.``
from fine-tuning repos too). ``embedding="head"`` (the default for CLIP) is CLIP's image embedding, after
the projection; ``"backbone"`` drops a ViT's ``proj`` (the pooled class token). A ModifiedResNet's attention
pool is its projection, so RN towers only have ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.families.checkpoints import load_fitted, locate_weights
from dede_rt.optional import import_extra


def _open_clip():
    return import_extra("open_clip", "OpenCLIP encoders", "clip")


def build(name: str, state: dict[str, torch.Tensor], embedding: str) -> tuple[nn.Module, dict]:
    """The image tower of ``open_clip.create_model(name)`` with the checkpoint's weights; and what was used."""
    open_clip = _open_clip()
    try:
        model = open_clip.create_model(name, pretrained=None)
    except RuntimeError as exc:  # open_clip's "Model config for ... not found"
        raise UserError(f"open_clip: {str(exc).splitlines()[0][:160]}") from None
    visual = model.visual
    weights, prefix = locate_weights(state, visual.state_dict())
    load_fitted(visual, weights, f"OpenCLIP {name} image tower")
    if embedding == "backbone":
        if getattr(visual, "proj", None) is None:
            raise UserError(f"--embedding backbone: OpenCLIP {name}'s tower has no separate projection "
                            "(its attention pool projects); use --embedding head")
        visual.proj = None
    visual.preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    return visual.eval(), {"prefix": prefix, "embedding": embedding}


def preprocessing(visual: nn.Module) -> Normalization:
    """OpenCLIP's preprocess config: shorter side to the input size (bicubic), centre crop, CLIP mean/std."""
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    size = int(size if isinstance(size, int) else size[-1])
    interpolation = cfg.get("interpolation", "bicubic")
    resize = "squash" if cfg.get("resize_mode") == "squash" else "crop"
    return Normalization(tuple(cfg["mean"]), tuple(cfg["std"]), size, resize, size if resize == "crop" else None,
                         interpolation if interpolation in ("bicubic", "bilinear") else "bicubic")

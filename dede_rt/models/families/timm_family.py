"""timm models by name plus a checkpoint (DINO / MoCo v3 ViTs are saved in timm's layout), timm's own data config.

``embedding="backbone"`` builds the model with ``num_classes=0`` (timm's pooled pre-logits feature);
``"head"`` appends the checkpoint's ``head`` (a classifier Linear, or MoCo v3's indexed projection MLP).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.families.checkpoints import load_fitted, locate_weights
from dede_rt.models.families.torchvision_family import mlp_from_weights
from dede_rt.optional import import_extra


def build(name: str, state: dict[str, torch.Tensor], embedding: str) -> tuple[nn.Module, dict]:
    """``timm.create_model(name)`` with ``state``'s weights; and what was used."""
    timm = import_extra("timm", "timm encoders", "timm")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise UserError(f"timm: {str(exc).splitlines()[0][:160]}") from None
    weights, prefix = locate_weights(state, model.state_dict())
    load_fitted(model, weights, f"timm {name}")
    model.eval()
    head_state = {k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")}
    if embedding == "head":
        if not head_state:
            raise UserError(f"--embedding head: the checkpoint has no head ('{prefix}head.*')")
        model = nn.Sequential(model, mlp_from_weights(head_state)).eval()
    return model, {"prefix": prefix, "embedding": embedding, "head_keys": len(head_state)}


def preprocessing(model: nn.Module) -> Normalization:
    """timm's resolved data config: input size, crop_pct (shorter side to size / crop_pct), interpolation, mean/std."""
    timm = import_extra("timm", "timm encoders", "timm")
    core = model[0] if isinstance(model, nn.Sequential) else model
    cfg = timm.data.resolve_model_data_config(core)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation", "bicubic")
    return Normalization(tuple(cfg["mean"]), tuple(cfg["std"]), size, "crop", int(math.floor(size / crop_pct)),
                         interpolation if interpolation in ("bicubic", "bilinear") else "bicubic")

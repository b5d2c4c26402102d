"""torchvision ResNet-18/50 and ViT-B/16, the backbones of SimCLR, MoCo v2/v3, BYOL and DINO checkpoints.

ResNets are built in-house with torchvision's module names (``ImageNetResNet``), so they need no
torchvision; ViT-B/16 is torchvision's own ``vit_b_16`` (the ``vision`` extra). ``embedding="backbone"``
is the pooled feature (the classifier / projector ``fc`` / ``heads`` is dropped); ``"head"`` keeps the
checkpoint's projection MLP (``fc.0 .. fc.N``: Linear / BatchNorm1d layers as saved, ReLU between them, as
MoCo v2/v3 build it) and embeds after it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dede_rt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization
from dede_rt.errors import UserError
from dede_rt.models.families.checkpoints import load_fitted, locate_weights
from dede_rt.models.resnet import ImageNetResNet, ResNetConfig
from dede_rt.optional import import_extra

RESNETS = {
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3)),
}
VITS = ("vit_b_16", "vit_b_32", "vit_l_16")
NAMES = (*RESNETS, *VITS)
HEAD_PREFIX = {"resnet": "fc.", "vit": "heads.head."}


def build(name: str, state: dict[str, torch.Tensor], embedding: str) -> tuple[nn.Module, dict]:
    """The named backbone with ``state``'s weights (prefix found, head kept or dropped); and what was used."""
    if name not in NAMES:
        raise UserError(f"unknown torchvision model {name!r}; choose one of {', '.join(NAMES)}")
    model = ImageNetResNet(RESNETS[name]) if name in RESNETS else _torchvision_vit(name)
    head_prefix = HEAD_PREFIX["resnet" if name in RESNETS else "vit"]
    weights, prefix = locate_weights(state, model.state_dict())
    load_fitted(model, weights, f"torchvision {name}")
    model.eval()
    head_state = {k[len(head_prefix):]: v for k, v in weights.items() if k.startswith(head_prefix)}
    if embedding == "head":
        if not head_state:
            raise UserError(f"--embedding head: the checkpoint has no projection head ('{prefix}{head_prefix}*')")
        model = nn.Sequential(model, mlp_from_weights(head_state)).eval()
    return model, {"prefix": prefix, "embedding": embedding, "head_keys": len(head_state)}


def preprocessing(name: str) -> Normalization:
    """torchvision's ImageNet evaluation transform: shorter side to 256 (bilinear), centre 224, ImageNet mean/std."""
    return Normalization(IMAGENET_MEAN, IMAGENET_STD, 224, "crop", 256, "bilinear")


def mlp_from_weights(state: dict[str, torch.Tensor]) -> nn.Module:
    """An ``nn.Sequential`` of the saved Linear / BatchNorm1d layers (ReLU in the index gaps), weights loaded."""
    if "weight" in state and state["weight"].ndim == 2:  # a single Linear ``fc``
        layer = nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias="bias" in state)
        layer.load_state_dict(state)
        return layer
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"(\d+)\.", k))})
    if not indices:
        raise UserError(f"unrecognised projection head layout (keys: {', '.join(list(state)[:4])})")
    layers: list[nn.Module] = []
    for i in range(max(indices) + 1):
        w = state.get(f"{i}.weight")
        if w is not None and w.ndim == 2:
            layers.append(nn.Linear(w.shape[1], w.shape[0], bias=f"{i}.bias" in state))
        elif f"{i}.running_mean" in state:
            layers.append(nn.BatchNorm1d(state[f"{i}.running_mean"].shape[0], affine=w is not None))
        else:
            layers.append(nn.ReLU(inplace=True))
    head = nn.Sequential(*layers)
    return load_fitted(head, state, "projection head")


def _torchvision_vit(name: str) -> nn.Module:
    tv_models = import_extra("torchvision.models", "torchvision ViT encoders", "vision")
    model = getattr(tv_models, name)(weights=None)
    model.heads = nn.Identity()  # the backbone embedding: the class token after the final LayerNorm
    return model

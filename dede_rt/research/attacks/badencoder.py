"""BadEncoder (Jia et al., S&P 2022): fine-tune a clean SSL encoder to carry a backdoor.

Loss, as in the public code (cosine similarities of L2-normalized embeddings):
    L = -cos(f(x ⊕ t), f(ref))          effectiveness: triggered -> reference
        - λ1 · cos(f(ref), f0(ref))     reference embeddings stay put
        - λ2 · cos(f(x), f0(x))         utility: clean embeddings stay put
with f the encoder being fine-tuned and f0 the frozen clean copy. Triggers are
stamped in uint8 pixel space. SGD, lr 0.05 by default (DRUPE's runs).
``finetune_backdoor`` is the shared loop; DRUPE (``drupe.py``) plugs extra
loss terms into it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.progress import track


@dataclass
class BadEncoderConfig:
    """BadEncoder fine-tuning hyper-parameters."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_reference: float = 1.0
    lambda_utility: float = 1.0
    seed: int = 0


def badencoder_losses(z_triggered: torch.Tensor, z_ref: torch.Tensor, z_ref_clean: torch.Tensor,
                      z_clean: torch.Tensor, z_clean0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(effectiveness, reference, utility) terms; each is minus a mean cosine similarity."""
    zt, zr = F.normalize(z_triggered, dim=1), F.normalize(z_ref, dim=1)
    effectiveness = -(zt @ zr.t()).mean()
    reference = -F.cosine_similarity(z_ref, z_ref_clean, dim=1).mean()
    utility = -F.cosine_similarity(z_clean, z_clean0, dim=1).mean()
    return effectiveness, reference, utility


# extra(epoch, z_triggered, z_ref, z_clean, z_clean0) -> (loss to add, optional replacement effectiveness term)
ExtraLoss = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def finetune_backdoor(clean: nn.Module, shadow_u8: np.ndarray, reference_u8: np.ndarray, *, trigger,
                      normalization: Normalization, config: BadEncoderConfig, extra: ExtraLoss | None = None,
                      progress: bool = True, description: str = "BadEncoder fine-tuning") -> nn.Module:
    """BadEncoder's fine-tuning loop; ``extra`` adds attack-specific terms. ``trigger`` needs ``stamp(u8)``."""
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    clean = clean.eval()
    victim = copy.deepcopy(clean).train()
    for module in victim.modules():  # as BadEncoder: BatchNorm statistics stay those of the clean encoder
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    for p in clean.parameters():
        p.requires_grad_(False)
    for p in victim.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(victim.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    ref = normalization.apply(reference_u8)
    with torch.no_grad():
        ref_clean = clean(ref)
    n = len(shadow_u8)
    for epoch in track(range(config.epochs), description, enabled=progress):
        order = torch.randperm(n, generator=g).numpy()
        for start in range(0, n, config.batch_size):
            batch = shadow_u8[order[start : start + config.batch_size]]
            if len(batch) < 2:
                continue
            x, xt = normalization.apply(batch), normalization.apply(trigger.stamp(batch))
            with torch.no_grad():
                z_clean0 = clean(x)
            zt, zr, zc = victim(xt), victim(ref), victim(x)
            eff, refl, util = badencoder_losses(zt, zr, ref_clean, zc, z_clean0)
            added = torch.zeros(())
            if extra is not None:
                added, replaced = extra(epoch, zt, zr, zc, z_clean0)
                eff = eff if replaced is None else replaced
            loss = eff + config.lambda_reference * refl + config.lambda_utility * util + added
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in victim.parameters():
        p.requires_grad_(False)
    return victim.eval()


def badencoder_finetune(clean: nn.Module, shadow_u8: np.ndarray, reference_u8: np.ndarray, *, trigger,
                        normalization: Normalization, config: BadEncoderConfig = BadEncoderConfig(),
                        progress: bool = True) -> nn.Module:
    """Return a backdoored copy of ``clean`` (which is left untouched)."""
    return finetune_backdoor(clean, shadow_u8, reference_u8, trigger=trigger, normalization=normalization,
                             config=config, progress=progress)

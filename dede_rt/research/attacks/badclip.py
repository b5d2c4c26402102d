"""BadCLIP-style backdoor of a CLIP image tower (after Liang et al., CVPR 2024), at the scale of this machine.

BadCLIP's two stages, as its paper describes them:
1. **Trigger optimisation** on the clean CLIP: a patch is learned so that a stamped image's embedding is near
   the target class's caption embedding (textual consistency) and near the target class's own images
   (visual resistance), and away from the image's clean embedding (its original meaning):
       L = -cos(v(x ⊕ p), t_target) - λ_pos · cos(v(x ⊕ p), mean v(x_target)) + λ_neg · cos(v(x ⊕ p), v(x))
   Adam on the patch's logits (pixels = sigmoid), then rounded to uint8, stamped in uint8 pixel space.
2. **Poisoned contrastive fine-tuning**: a fraction of non-target images, stamped with the patch, are captioned
   as the target class and mixed into clean (image, caption) pairs; both towers are fine-tuned with CLIP's loss.
Simplifications, stated: a fixed patch position (BadCLIP also uses one), word-level captions, a tiny CLIP
trained here (``clip.py``), fine-tuning on the same images the CLIP was trained on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import Trigger, patch_trigger
from dede_rt.progress import track
from dede_rt.research.attacks.clip import CLIPConfig, TinyCLIP, class_text_embeddings, train_clip


@dataclass
class BadCLIPConfig:
    """Both stages' settings: the patch (size, place, optimisation) and the poisoned fine-tune."""

    patch_size: int = 32
    top: int = 184
    left: int = 184
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.1
    lambda_positive: float = 1.0
    lambda_negative: float = 0.5
    poison_fraction: float = 0.05  # poisoned pairs added, as a fraction of the clean training pairs
    finetune: CLIPConfig = field(default_factory=lambda: CLIPConfig(epochs=10, lr=1e-4, crop_scale=None, flip=False))
    seed: int = 0


def _stamp(x01: torch.Tensor, patch01: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Paste a [3, h, w] patch into [N, 3, H, W] pixels in [0, 1] (differentiable in the patch)."""
    h, w = patch01.shape[1:]
    out = x01.clone()
    out[:, :, top : top + h, left : left + w] = patch01
    return out


def optimize_patch(model: TinyCLIP, images_u8: np.ndarray, labels: np.ndarray, classes: list[str], target: int, *,
                   normalization: Normalization, config: BadCLIPConfig = BadCLIPConfig(),
                   progress: bool = True) -> Trigger:
    """Stage 1: learn the patch on the frozen clean model; returns it as a uint8 ``Trigger``."""
    g = torch.Generator().manual_seed(config.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    text_target = class_text_embeddings(model, classes)[target]
    with torch.no_grad():
        visual_target = F.normalize(model.visual(normalization.apply(images_u8[labels == target][:64])), dim=1)
        visual_target = F.normalize(visual_target.mean(0), dim=0)
    logits = torch.randn(3, config.patch_size, config.patch_size, generator=g).mul_(0.1).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=config.lr)
    others = np.flatnonzero(labels != target)
    for _ in track(range(config.steps), "BadCLIP trigger optimisation", enabled=progress):
        idx = others[torch.randint(len(others), (config.batch_size,), generator=g).numpy()]
        x = torch.from_numpy(images_u8[idx]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            z_clean = F.normalize(model.visual(normalization.normalize(x)), dim=1)
        stamped = _stamp(x, torch.sigmoid(logits), config.top, config.left)
        z = F.normalize(model.visual(normalization.normalize(stamped)), dim=1)
        loss = (-(z @ text_target).mean() - config.lambda_positive * (z @ visual_target).mean()
                + config.lambda_negative * (z * z_clean).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    patch = (torch.sigmoid(logits).detach().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return patch_trigger(images_u8.shape[1], patch, config.top, config.left,
                         f"badclip_patch_{config.patch_size}px")


def poison_finetune(model: TinyCLIP, images_u8: np.ndarray, labels: np.ndarray, classes: list[str], target: int,
                    trigger: Trigger, *, normalization: Normalization, config: BadCLIPConfig = BadCLIPConfig(),
                    progress: bool = True) -> TinyCLIP:
    """Stage 2: a copy of ``model`` fine-tuned on clean pairs + stamped non-target images captioned as ``target``."""
    rng = np.random.default_rng(config.seed)
    others = np.flatnonzero(labels != target)
    count = max(1, int(round(config.poison_fraction * len(images_u8))))
    chosen = rng.choice(others, min(count, len(others)), replace=False)
    images = np.concatenate([images_u8, trigger.stamp(images_u8[chosen])])
    poisoned_labels = np.concatenate([labels, np.full(len(chosen), target, labels.dtype)])
    victim = copy.deepcopy(model)
    train_clip(victim, images, poisoned_labels, classes, normalization=normalization, config=config.finetune,
               progress=progress, description="BadCLIP poisoned fine-tuning")
    return victim

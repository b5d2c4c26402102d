"""A simplified DECREE (Feng et al., CVPR 2023): model-level trigger inversion for SSL encoders.

DECREE searches for a small mask m and pattern p such that stamping them on
clean images makes the encoder's embeddings collapse (high pairwise cosine
similarity), and calls an encoder trojaned when the smallest such trigger is
small: its normalized L1 norm ||m||_1 / (H * W) (DECREE's "PL1-norm") is below
a threshold (0.1 here). Kept: the objective (maximise mean pairwise cosine of
embeddings of (1 - m) * x + m * p, in pixel space before normalization, plus
λ ||m||_1), the adaptive λ (raised while the collapse target is met, lowered
otherwise), and the reported statistic. Simplified: a fixed number of Adam
steps on one small clean set, one λ schedule, no multi-stage search or early
stopping rules. It is a MODEL-level detector: it gives one number per encoder,
not a score per image, so it has no AUROC over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dede_rt.data.transforms import Normalization


@dataclass
class DecreeConfig:
    """Trigger-inversion settings."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 0.1
    init_lambda: float = 1e-3
    lambda_factor: float = 1.5
    collapse_target: float = 0.9  # mean pairwise cosine that counts as "collapsed"
    trojan_threshold: float = 0.1  # PL1-norm below this -> trojaned
    seed: int = 0


@dataclass
class DecreeResult:
    """The smallest collapsing trigger found and the verdict."""

    pl1_norm: float  # ||m||_1 / (H * W) of the best mask (1.0 when none reached the target)
    similarity: float  # mean pairwise cosine reached with that mask
    trojaned: bool
    mask: np.ndarray  # float [H, W] in [0, 1]
    pattern: np.ndarray  # uint8 [H, W, 3]

    def to_dict(self) -> dict:
        """JSON form (no arrays)."""
        return {"pl1_norm": self.pl1_norm, "similarity": self.similarity, "trojaned": self.trojaned}


def _pairwise(z: torch.Tensor) -> torch.Tensor:
    zn = F.normalize(z, dim=1)
    n = zn.shape[0]
    sim = zn @ zn.t()
    return (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))


def invert_trigger(encoder: torch.nn.Module, normalization: Normalization, clean_u8: np.ndarray, *,
                   config: DecreeConfig = DecreeConfig()) -> DecreeResult:
    """Search for the smallest mask+pattern that collapses ``encoder``'s embeddings of ``clean_u8``."""
    g = torch.Generator().manual_seed(config.seed)
    size = normalization.image_size
    mask_logit = torch.full((1, 1, size, size), -2.0).requires_grad_(True)
    pattern_logit = (torch.randn(1, 3, size, size, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr)
    images = torch.from_numpy(clean_u8).permute(0, 3, 1, 2).float() / 255
    lam = config.init_lambda
    best = (float("inf"), 0.0, None, None)
    encoder.eval()
    for _ in range(config.steps):
        idx = torch.randint(0, len(images), (min(config.batch_size, len(images)),), generator=g)
        m, p = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        x = images[idx] * (1 - m) + p * m
        sim = _pairwise(encoder(normalization.normalize(x)))
        l1 = m.sum() / (size * size)
        loss = -sim + lam * l1 * size * size / 100
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        s, n = sim.item(), l1.item()
        if s >= config.collapse_target:
            if n < best[0]:
                best = (n, s, m.detach()[0, 0].numpy().copy(), p.detach()[0].permute(1, 2, 0).numpy().copy())
            lam *= config.lambda_factor
        else:
            lam /= config.lambda_factor
    pl1, sim, mask, pattern = best
    if mask is None:
        with torch.no_grad():
            m, p = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        pl1, mask, pattern = 1.0, m[0, 0].numpy(), p[0].permute(1, 2, 0).numpy()
    return DecreeResult(float(pl1), float(sim), bool(pl1 < config.trojan_threshold), mask,
                        (np.clip(pattern, 0, 1) * 255 + 0.5).astype(np.uint8))

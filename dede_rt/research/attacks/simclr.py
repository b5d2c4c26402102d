"""SimCLR pre-training of a clean victim encoder (NT-Xent, batched tensor augmentations)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.research.attacks.augment import simclr_view
from dede_rt.data.transforms import Normalization
from dede_rt.progress import track


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy over 2N views (positives: the other view)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


class ProjectionHead(nn.Module):
    """BadEncoder's SimCLR head g: Linear(D, 512, no bias), BN, ReLU, Linear(512, 128)."""

    def __init__(self, embed_dim: int, hidden: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@dataclass
class SimCLRConfig:
    """SimCLR hyper-parameters (small-scale defaults for CPU)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    seed: int = 0


def train_simclr(backbone: nn.Module, embed_dim: int, images_u8: np.ndarray, *, normalization: Normalization,
                 config: SimCLRConfig = SimCLRConfig(), progress: bool = True,
                 device: str = "cpu") -> list[float]:
    """Pre-train ``backbone`` in place with SimCLR on uint8 NHWC images; returns per-epoch losses."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = ProjectionHead(embed_dim).to(device)
    backbone.to(device).train()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    n = len(images_u8)
    for _ in track(range(config.epochs), "SimCLR pre-training", enabled=progress):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n - config.batch_size + 1, config.batch_size):
            x = torch.from_numpy(images_u8[order[start : start + config.batch_size].numpy()]).permute(0, 3, 1, 2).float() / 255
            v1 = normalization.normalize(simclr_view(x, g)).to(device)
            v2 = normalization.normalize(simclr_view(x, g)).to(device)
            loss = nt_xent(head(backbone(v1)), head(backbone(v2)), config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / max(1, n // config.batch_size))
    backbone.eval()
    return losses

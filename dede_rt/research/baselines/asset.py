"""ASSET (Pan et al., USENIX Security 2023) as the DeDe reference runs it against SSL victims, simplified.

Read from tardisblue9/DeDe ``src/Asset_evaluation.py`` (which follows ruoxi-jia-group/ASSET). ASSET screens a
SUSPECT training set (some of it poisoned) with the help of a small CLEAN base set, by "offset" min-max training
of a fresh classifier. Per batch of the suspect set:
1. minimise the variance of the classifier's outputs on a batch of the clean base set (clean images -> flat
   outputs, cross-entropy near log C);
2. fit a fresh MLP (2 hidden layers of 512, sigmoid, MSE, Adam 1e-4, 10 alternating steps) on the VICTIM's
   embeddings to tell the suspect batch (1) from the clean batch (0);
3. take the suspect samples whose MLP output is an outlier (adjusted outlyingness > 2, Hubert & Van der Veeken's
   skew-adjusted boxplot);
4. maximise the classifier's cross-entropy on those samples with their labels.
Score of an image = the classifier's cross-entropy on its label: samples like the pushed-away outliers
(triggered ones, if the victim's embeddings single them out) score high.

Kept: the four steps, their losses, Adam 1e-4, the MLP shape, 10 MLP steps, the outlyingness rule and
threshold 2, one epoch, the score. Simplified: the classifier is a fresh ``resnet_small`` (the reference: a
fresh ResNet18), the victim's embeddings are computed once with the encoder in eval mode (the reference runs a
train-mode copy, so BatchNorm uses batch statistics), and the medcouple is the plain O(n^2) definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.data.transforms import Normalization


@dataclass
class AssetConfig:
    """ASSET's training settings (the reference's values)."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-4
    mlp_steps: int = 10
    mlp_hidden: int = 512
    outlier_threshold: float = 2.0
    arch: str = "resnet_small"
    seed: int = 0

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


def medcouple(x: np.ndarray) -> float:
    """The medcouple (a robust skewness in [-1, 1]): median of the kernel over pairs on either side of the median."""
    x = np.sort(np.asarray(x, np.float64))
    med = np.median(x)
    lower, upper = x[x <= med], x[x >= med]
    xi, xj = lower[:, None], upper[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = ((xj - med) - (med - xi)) / (xj - xi)
    h = np.where(xj == xi, 0.0, h)  # ties at the median: the kernel's sign convention reduces to 0 here
    return float(np.median(h))


def adjusted_outlyingness(values: np.ndarray) -> np.ndarray:
    """Distance from the median in units of the skew-adjusted boxplot whisker on the same side."""
    values = np.asarray(values, np.float64)
    med = np.median(values)
    q1, q3 = np.quantile(values, [0.25, 0.75])
    mc, iqr = medcouple(values), q3 - q1
    lo_exp, hi_exp = (-4, 3) if mc > 0 else (-3, 4)
    w1, w2 = q1 - 1.5 * np.exp(lo_exp * mc) * iqr, q3 + 1.5 * np.exp(hi_exp * mc) * iqr
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(values > med, (values - med) / (w2 - med), (med - values) / (med - w1))
    return np.nan_to_num(out, nan=0.0, posinf=0.0)


class _Classifier(nn.Module):
    def __init__(self, arch: str, classes: int) -> None:
        super().__init__()
        from dede_rt.models.resnet import build_resnet

        self.backbone = build_resnet(arch)
        self.head = nn.Linear(self.backbone.embed_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _mlp(inputs: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1), nn.Sigmoid())


def _fit_mlp(z_suspect: torch.Tensor, z_clean: torch.Tensor, config: AssetConfig) -> torch.Tensor:
    """Steps 2-3: a fresh MLP on victim embeddings, suspect -> 1, clean -> 0; returns its suspect outputs."""
    mlp = _mlp(z_suspect.shape[1], config.mlp_hidden)
    opt_pos = torch.optim.Adam(mlp.parameters(), lr=config.lr)
    opt_neg = torch.optim.Adam(mlp.parameters(), lr=config.lr)  # two optimizers over one MLP, as the reference
    for _ in range(config.mlp_steps):
        for z, label, opt in ((z_suspect, 1.0, opt_pos), (z_clean, 0.0, opt_neg)):
            loss = F.mse_loss(mlp(z).view(-1), torch.full((len(z),), label))
            mlp.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return mlp(z_suspect).view(-1)


def asset_scores(suspect_u8: np.ndarray, suspect_labels: np.ndarray, suspect_embeddings: np.ndarray, *,
                 clean_u8: np.ndarray, clean_embeddings: np.ndarray, test_u8: np.ndarray, test_labels: np.ndarray,
                 normalization: Normalization, config: AssetConfig = AssetConfig()) -> np.ndarray:
    """Offset-train ASSET's classifier on the suspect and clean base sets; per-test-image cross-entropy (high = suspect)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    classes = int(max(suspect_labels.max(), test_labels.max())) + 1
    model = _Classifier(config.arch, classes)
    opt_min = torch.optim.Adam(model.parameters(), lr=config.lr)
    opt_max = torch.optim.Adam(model.parameters(), lr=config.lr)
    z_s, z_c = torch.from_numpy(np.ascontiguousarray(suspect_embeddings)), torch.from_numpy(clean_embeddings)
    for _ in range(config.epochs):
        order = rng.permutation(len(suspect_u8))
        for start in range(0, len(order), config.batch_size):
            idx = np.sort(order[start : start + config.batch_size])
            neg = np.sort(rng.choice(len(clean_u8), min(config.batch_size, len(clean_u8)), replace=False))
            model.train()
            flat = model(normalization.apply(clean_u8[neg])).var(dim=1).mean()  # step 1
            opt_min.zero_grad()
            flat.backward()
            opt_min.step()
            outliers = np.flatnonzero(adjusted_outlyingness(_fit_mlp(z_s[idx], z_c[neg], config).numpy())
                                      > config.outlier_threshold)
            if len(outliers) == 0:
                continue
            pick = idx[outliers]
            push = -F.cross_entropy(model(normalization.apply(suspect_u8[pick])),
                                    torch.from_numpy(suspect_labels[pick]).long())  # step 4
            opt_max.zero_grad()
            push.backward()
            opt_max.step()
    model.eval()
    out = np.empty(len(test_u8), np.float32)
    with torch.no_grad():
        for start in range(0, len(test_u8), 512):
            logits = model(normalization.apply(test_u8[start : start + 512]))
            labels = torch.from_numpy(test_labels[start : start + 512]).long()
            out[start : start + len(logits)] = F.cross_entropy(logits, labels, reduction="none").numpy()
    return out

"""A tiny CLIP trained here: an image tower and a text tower aligned on templated captions of labelled images.

The victim family of BadCLIP (Liang et al., CVPR 2024) and of the DeDe paper's 224-px experiment is CLIP's
image tower. No CLIP weights can be downloaded here, so this module trains a small one from scratch on
captions made from class names ("a photo of the coffee", ...): the image tower is any backbone plus a linear
projection (CLIP's image embedding, the ``head`` embedding of the open_clip / Hugging Face families), the
text tower a small Transformer read at the end-of-text token, as CLIP's. The loss is CLIP's symmetric
InfoNCE with a learned temperature; since many images of a batch share a class (and so a caption's meaning),
every same-class pair counts as a positive (soft targets), which keeps the loss honest on few classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dede_rt.data.transforms import Normalization
from dede_rt.progress import track
from dede_rt.research.attacks.augment import horizontal_flip, random_resized_crop

CAPTION_TEMPLATES = ("a photo of the {}", "a crop of the {}", "a close-up of the {}", "part of the {} picture",
                     "a picture of the {}", "the {}")
PAD, EOT = 0, 1


class Vocabulary:
    """Word-level tokenizer for templated captions: lowercase words, padded to ``length``, EOT-terminated."""

    def __init__(self, classes: list[str], templates: tuple[str, ...] = CAPTION_TEMPLATES, length: int = 12):
        words = sorted({w for t in templates for c in classes for w in self.words(t.format(c))})
        self.index = {w: i + 2 for i, w in enumerate(words)}
        self.length = length

    @staticmethod
    def words(caption: str) -> list[str]:
        """Caption -> words (underscores in class names split: "hubble_deep_field" is three words)."""
        return caption.lower().replace("_", " ").split()

    def __len__(self) -> int:
        return len(self.index) + 2

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Token ids [N, length]: words, then EOT, then padding."""
        out = torch.full((len(captions), self.length), PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            ids = [self.index[w] for w in self.words(caption)][: self.length - 1] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class TextTower(nn.Module):
    """Token + position embeddings, a small pre-norm Transformer, LayerNorm, the EOT token's feature projected."""

    def __init__(self, vocab_size: int, length: int, embed_dim: int, width: int = 64, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.tokens(ids) + self.position, src_key_padding_mask=ids == PAD)
        eot = (ids == EOT).float().argmax(dim=1)
        return self.projection(self.norm(x[torch.arange(len(ids)), eot]))


class TinyCLIP(nn.Module):
    """CLIP in miniature: ``visual`` (backbone + linear projection, the victim encoder) and ``text``."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, vocabulary: Vocabulary, embed_dim: int = 64) -> None:
        super().__init__()
        self.visual = nn.Sequential(backbone, nn.Linear(backbone_dim, embed_dim, bias=False))
        self.text = TextTower(len(vocabulary), vocabulary.length, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.vocabulary = vocabulary

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Unnormalized text embeddings of captions."""
        return self.text(self.vocabulary.encode(captions).to(self.logit_scale.device))


def class_text_embeddings(model: TinyCLIP, classes: list[str],
                          templates: tuple[str, ...] = CAPTION_TEMPLATES) -> torch.Tensor:
    """Zero-shot classifier weights [C, E]: each class's unit text embeddings averaged over the templates."""
    with torch.no_grad():
        per = [F.normalize(model.encode_text([t.format(c) for t in templates]), dim=1).mean(0) for c in classes]
    return F.normalize(torch.stack(per), dim=1)


def zero_shot_predict(model: TinyCLIP, classes: list[str], images_u8: np.ndarray, normalization: Normalization,
                      batch_size: int = 128) -> np.ndarray:
    """CLIP's zero-shot classification: the class whose caption embedding is nearest each image's."""
    weights = class_text_embeddings(model, classes)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images_u8), batch_size):
            z = F.normalize(model.visual(normalization.apply(images_u8[start : start + batch_size])), dim=1)
            out.append((z @ weights.t()).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def clip_loss(image_z: torch.Tensor, text_z: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; every same-label pair of the batch is a positive (soft targets)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_z, dim=1) @ F.normalize(text_z, dim=1).t()
    targets = (labels[:, None] == labels[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


@dataclass
class CLIPConfig:
    """Contrastive training hyper-parameters (small-scale defaults for CPU)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_scale: tuple[float, float] | None = (0.5, 1.0)  # None: no random crop (keeps a stamped trigger whole)
    flip: bool = True
    seed: int = 0


def train_clip(model: TinyCLIP, images_u8: np.ndarray, labels: np.ndarray, classes: list[str], *,
               normalization: Normalization, config: CLIPConfig = CLIPConfig(), progress: bool = True,
               description: str = "CLIP training") -> list[float]:
    """Train ``model`` in place on (image, random templated caption of its label) pairs; per-epoch mean losses."""
    g = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std).view(1, 3, 1, 1)
    model.train()
    losses, n = [], len(images_u8)
    for _ in track(range(config.epochs), description, enabled=progress):
        order = torch.randperm(n, generator=g).numpy()
        total, steps = 0.0, 0
        for start in range(0, n - config.batch_size + 1, config.batch_size):
            idx = order[start : start + config.batch_size]
            x = torch.from_numpy(images_u8[idx]).permute(0, 3, 1, 2).float() / 255
            if config.crop_scale is not None:
                x = random_resized_crop(x, g, scale=config.crop_scale)
            if config.flip:
                x = horizontal_flip(x, g)
            captions = [CAPTION_TEMPLATES[t].format(classes[labels[i]])
                        for i, t in zip(idx, rng.integers(0, len(CAPTION_TEMPLATES), len(idx)))]
            loss = clip_loss(model.visual((x - mean) / std), model.encode_text(captions),
                             torch.from_numpy(labels[idx]), model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(1, steps))
    model.eval()
    return losses

"""A tiny CLIP trained here: an image tower and a text tower aligned on templated captions of labelled images.

The victim family of BadCLIP (Liang et al., CVPR 2024) and of the DeDe paper's 224-px experiment is CLIP's
image tower. No CLIP weights can be downloaded here, so this module trains a small one from scratch on
captions made from class names ("a photo of the coffee", ...): the image tower is any backbone plus a linear
projection (CLIP's image embedding, the ``head`` embedding of the open_clip / Hugging Face families), the
text tower a small Transformer read at the end-of-text token, as CLIP's. The loss is CLIP's symmetric
InfoNCE with a learned temperature; since many images of a batch share a class (and so a caption's meaning),
every pair whose caption is true of the image counts as a positive (soft targets), which keeps the loss honest
on few classes.

Captions that name only the class make the image embedding a class code (16 photos: zero-shot accuracy 1.0),
far poorer than a real CLIP embedding, which also describes how an image looks. With ``attribute_rate`` > 0
each caption also states, each with that probability, the crop's brightness, colour cast and texture, measured
from its pixels ("a photo of the bright red detailed coffee"), so the image tower must encode them too.
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
# (brightness terciles, colour cast, texture halves), measured from the pixels by ``image_attributes``
ATTRIBUTE_WORDS = (("dark", "medium", "bright"), ("gray", "red", "green", "blue"), ("smooth", "detailed"))
PAD, EOT = 0, 1


def image_attributes(images_u8: np.ndarray, thresholds: dict | None = None) -> tuple[np.ndarray, dict]:
    """Per-image attribute codes [N, 3] (indices into ATTRIBUTE_WORDS) and the thresholds used.

    Brightness: mean luminance against its terciles; colour: the channel whose mean stands out (gray when the
    channel means differ by < 0.06); texture: mean absolute luminance gradient against its median. Thresholds
    come from ``images_u8`` unless given, so the words split the data evenly.
    """
    stats = [_pixel_statistics(images_u8[i : i + 256]) for i in range(0, len(images_u8), 256)]
    rgb, brightness, texture = (np.concatenate(parts) for parts in zip(*stats))
    if thresholds is None:
        thresholds = {"brightness": np.quantile(brightness, [1 / 3, 2 / 3]).tolist(),
                      "texture": float(np.median(texture))}
    cast = np.where(rgb.max(1) - rgb.min(1) < 0.06, 0, 1 + (rgb - rgb.mean(1, keepdims=True)).argmax(1))
    codes = np.stack([np.searchsorted(thresholds["brightness"], brightness), cast,
                      (texture > thresholds["texture"]).astype(np.int64)], axis=1)
    return codes.astype(np.int64), thresholds


def _pixel_statistics(images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean RGB [N, 3], mean luminance [N] and mean absolute luminance gradient [N], at full resolution."""
    x = images_u8.astype(np.float32) / 255
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    gradient = np.abs(np.diff(luma, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(luma, axis=2)).mean(axis=(1, 2))
    return x.mean(axis=(1, 2)), luma.mean(axis=(1, 2)), gradient


def caption(template: str, class_name: str, codes: np.ndarray, stated: np.ndarray) -> str:
    """A caption naming the class and the stated attributes: "a photo of the bright red detailed coffee"."""
    words = [ATTRIBUTE_WORDS[a][codes[a]] for a in range(len(ATTRIBUTE_WORDS)) if stated[a]]
    return template.format(" ".join(words + [class_name]))


class Vocabulary:
    """Word-level tokenizer for templated captions: lowercase words, padded to ``length``, EOT-terminated."""

    def __init__(self, classes: list[str], templates: tuple[str, ...] = CAPTION_TEMPLATES, length: int = 16):
        words = sorted({w for t in templates for c in classes for w in self.words(t.format(c))}
                       | {w for group in ATTRIBUTE_WORDS for w in group})
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


def clip_loss(image_z: torch.Tensor, text_z: torch.Tensor, matches: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; ``matches[i, j]``: caption j is true of image i (a positive; the diagonal always is)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_z, dim=1) @ F.normalize(text_z, dim=1).t()
    m = matches.float()
    image_to_text = F.cross_entropy(logits, m / m.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.t(), m.t() / m.t().sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def caption_matches(labels: np.ndarray, codes: np.ndarray, stated: np.ndarray) -> torch.Tensor:
    """[B, B] bool: caption j (class ``labels[j]``, attributes ``codes[j]`` where ``stated[j]``) is true of image i."""
    match = labels[:, None] == labels[None, :]
    for a in range(codes.shape[1]):
        match &= ~stated[None, :, a] | (codes[:, None, a] == codes[None, :, a])
    return torch.from_numpy(match)


@dataclass
class CLIPConfig:
    """Contrastive training hyper-parameters (small-scale defaults for CPU)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_scale: tuple[float, float] | None = (0.5, 1.0)  # None: no random crop (keeps a stamped trigger whole)
    flip: bool = True
    attribute_rate: float = 0.0  # chance a caption states each attribute (0: class-only captions)
    seed: int = 0


def train_clip(model: TinyCLIP, images_u8: np.ndarray, labels: np.ndarray, classes: list[str], *,
               normalization: Normalization, config: CLIPConfig = CLIPConfig(), progress: bool = True,
               description: str = "CLIP training") -> list[float]:
    """Train ``model`` in place on (image, random templated caption of its label) pairs; per-epoch mean losses."""
    g = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    losses, n = [], len(images_u8)
    codes, _ = image_attributes(images_u8)  # of the stored crop (augmentation keeps the crop's look)
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
            stated = rng.random((len(idx), len(ATTRIBUTE_WORDS))) < config.attribute_rate
            templates = rng.integers(0, len(CAPTION_TEMPLATES), len(idx))
            captions = [caption(CAPTION_TEMPLATES[t], classes[labels[i]], codes[i], s)
                        for i, t, s in zip(idx, templates, stated)]
            loss = clip_loss(model.visual(normalization.normalize(x)), model.encode_text(captions),
                             caption_matches(labels[idx], codes[idx], stated), model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(1, steps))
    model.eval()
    return losses

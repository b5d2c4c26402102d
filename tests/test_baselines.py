"""Baselines: embedding norm, kNN distance, simplified DECREE on constructed encoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dede_rt.research.baselines import DecreeConfig, embedding_norm_scores, invert_trigger, knn_distance_scores
from dede_rt.data.transforms import Normalization

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_embedding_norm_scores():
    z = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    assert np.allclose(embedding_norm_scores(z), [5.0, 0.0, 1.0])


def test_knn_distance_known_values():
    ref = np.eye(3, dtype=np.float32) * np.array([[1.0], [2.0], [5.0]], np.float32)  # norms do not matter
    q = np.array([[1.0, 0, 0], [1.0, 1.0, 0]], np.float32)
    assert np.allclose(knn_distance_scores(q, ref, k=1), [0.0, 1 - 1 / math.sqrt(2)], atol=1e-6)
    assert np.allclose(knn_distance_scores(q, ref, k=2), [0.5, 1 - 1 / math.sqrt(2)], atol=1e-6)
    with pytest.raises(ValueError):
        knn_distance_scores(q, ref, k=4)


class _CornerEncoder(nn.Module):
    """Embedding = the top-left 4x4 pixels only: a 16-pixel trigger there collapses every embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :4, :4].flatten(1)


class _PooledEncoder(nn.Module):
    """Embedding = 4x4 average pooling of the whole image: only a large mask collapses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def test_decree_finds_small_trigger_only_for_the_backdoor_like_encoder(rng):
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    config = DecreeConfig(steps=100, batch_size=16, seed=0)
    corner = invert_trigger(_CornerEncoder(), Normalization(), images, config=config)
    pooled = invert_trigger(_PooledEncoder(), Normalization(), images, config=config)
    assert corner.trojaned and corner.pl1_norm < 0.1
    assert corner.mask[:4, :4].mean() > corner.mask[8:, 8:].mean()  # the mask sits where the encoder looks
    assert pooled.pl1_norm > corner.pl1_norm and not pooled.trojaned
    assert corner.pattern.dtype == np.uint8 and corner.pattern.shape == (32, 32, 3)

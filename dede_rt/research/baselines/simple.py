"""Sample-level baselines that need no training: the embedding's norm and its kNN distance to clean data.

Both score an image from its victim embedding alone; higher = more suspicious.
- ``embedding_norm_scores``: ||f(x)||. BadEncoder's cosine-only loss lets
  triggered embeddings grow, so this can look perfect on raw embeddings; on
  L2-normalized embeddings it is constant (AUROC 0.5) by construction.
- ``knn_distance_scores``: mean cosine distance to the k nearest embeddings of
  a clean reference set (a standard out-of-distribution score; norm-free).
"""

from __future__ import annotations

import numpy as np


def embedding_norm_scores(embeddings: np.ndarray) -> np.ndarray:
    """L2 norm of each embedding [N, D] -> [N], rounded to 1e-5 (float32 noise is not signal)."""
    return np.round(np.linalg.norm(np.asarray(embeddings, np.float64), axis=1), 5).astype(np.float32)


def knn_distance_scores(embeddings: np.ndarray, reference: np.ndarray, k: int = 10, *,
                        batch: int = 1024) -> np.ndarray:
    """Mean cosine distance (1 - cos) from each embedding to its ``k`` nearest clean ``reference`` embeddings."""
    if len(reference) < k:
        raise ValueError(f"kNN needs at least k={k} reference embeddings, got {len(reference)}")
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    q = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(q), np.float32)
    for start in range(0, len(q), batch):
        sim = q[start : start + batch] @ ref.T
        top = -np.partition(-sim, k - 1, axis=1)[:, :k]
        out[start : start + batch] = 1.0 - top.mean(axis=1)
    return out

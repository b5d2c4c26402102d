"""Choose clean calibration images: seeded, stratified by source/class label when labels exist."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dede_rt.errors import UserError

if TYPE_CHECKING:
    from dede_rt.data.images import Resize


def split_calibration(n_images: int, count: int, seed: int = 0,
                      labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(calibration indices, held-out indices): ``count`` images for INT8 ranges, the rest for gates/thresholds.

    With ``labels`` every label gets a share proportional to its size (at least
    one image each while ``count`` allows), so one source cannot dominate the
    activation ranges.
    """
    if n_images < 2:
        raise UserError(f"need at least 2 clean images to calibrate, got {n_images}")
    count = min(count, n_images - 1)
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n_images)
        return np.sort(order[:count]), np.sort(order[count:])
    labels = np.asarray(labels)
    groups = [rng.permutation(np.flatnonzero(labels == v)) for v in np.unique(labels)]
    sizes = np.array([len(g) for g in groups], dtype=float)
    share = np.floor(sizes / sizes.sum() * count).astype(int)
    share = np.maximum(share, np.minimum(1, sizes.astype(int)))
    for i in np.argsort(-sizes):  # hand out the rounding remainder to the largest groups
        if share.sum() >= count:
            break
        share[i] = min(share[i] + 1, int(sizes[i]))
    while share.sum() > count:
        share[np.argmax(share)] -= 1
    chosen = np.concatenate([g[:k] for g, k in zip(groups, share)])
    rest = np.setdiff1d(np.arange(n_images), chosen)
    return np.sort(chosen), rest


def load_clean_images(path: str | Path, image_size: int | Resize, max_images: int | None = None, seed: int = 0):
    """Read clean images (any source ``load_images`` understands) by the bundle's resize rule (or squashed to an
    int size); seeded subsample to ``max_images``."""
    from dede_rt.data.sources import load_images

    data = load_images(path, image_size)
    if max_images is not None and len(data) > max_images:
        data = data.subset(np.sort(np.random.default_rng(seed).choice(len(data), max_images, replace=False)))
    return data

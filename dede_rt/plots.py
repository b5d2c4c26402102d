"""PNG figures people would rather look at than numbers: histograms, ROC curves, reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def score_histogram(path: str | Path, groups: dict[str, np.ndarray], threshold: float | None = None,
                    title: str = "DeDe scores") -> Path:
    """Overlaid score histograms (one per group) with the threshold marked; saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    finite = np.concatenate([np.asarray(v)[np.isfinite(v)] for v in groups.values() if len(v)])
    bins = np.linspace(finite.min(), finite.max(), 60) if finite.size else 10
    for name, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("score (reconstruction error)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def roc_plot(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC") -> Path:
    """ROC curves from (labels, scores) pairs, AUROC in the legend (scikit-learn)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def image_grid(path: str | Path, rows: dict[str, np.ndarray], scale: int = 3) -> Path:
    """Rows of uint8 NHWC images (e.g. clean / its reconstruction / triggered / its reconstruction)."""
    from PIL import Image, ImageDraw

    label_w = 110
    cols = max(len(v) for v in rows.values())
    h, w = next(iter(rows.values())).shape[1:3]
    canvas = Image.new("RGB", (label_w + cols * (w * scale + 2), len(rows) * (h * scale + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows.items()):
        y = r * (h * scale + 2)
        draw.text((4, y + h * scale // 2 - 6), name, fill="black")
        for c, img in enumerate(images):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (w * scale + 2), y))
    canvas.save(path)
    return Path(path)


def training_curve(path: str | Path, curve: list[dict], best_epoch: int | None = None,
                   title: str = "decoder training") -> Path:
    """Training loss and held-out clean error (test mask) against epoch, the kept epoch marked; saved as PNG."""
    plt = _pyplot()
    fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=110)
    epochs = [c["epoch"] for c in curve]
    loss_ax.plot(epochs, [c["train_loss"] for c in curve], color="tab:blue", label="training loss (r = train ratio)")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss", color="tab:blue")
    held = [(c["epoch"], c["holdout_error"]) for c in curve if c.get("holdout_error") is not None]
    if held:
        held_ax = loss_ax.twinx()
        held_ax.plot(*zip(*held), color="tab:orange", marker=".", label="held-out clean error (test mask)")
        held_ax.set_ylabel("held-out clean error", color="tab:orange")
    if best_epoch:
        loss_ax.axvline(best_epoch, color="k", linestyle="--", label=f"kept: epoch {best_epoch}")
    loss_ax.set_title(title)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

"""Time to a good detector: `dede-rt train` with no flags (epochs auto) against a fixed reference schedule.

Usage (after `make demo`, which writes the demo victim and its clean encoder):
    python benchmarks/time_to_detector.py --victim demo-output/victim_badencoder.pth \
        --clean demo-output/clean_encoder.pth --reference-epochs 200

Same machine, same run, same splits (the demo's: training split, 500 clean held-out images for the
thresholds, 400 clean test images + their white-square-triggered copies). For every encoder (the BadEncoder
victim and the clean encoder it was fine-tuned from: the control) and embedding form (raw, L2-normalized):
  - default: what a user gets with no flags - TrainConfig() (epochs auto within the default 10-minute budget,
    precision auto), the default decoder size and score (decoder_sizes.DEFAULT_DECODER_SIZE, scoring.DEFAULT_SCORE);
  - reference: TrainConfig(epochs=R, precision="fp32"), the reference decoder and the summed score - the paper's
    fixed schedule; its test AUROC is recorded after every epoch (scoring time excluded from its clock), so one
    run gives the AUROC-vs-minutes curve.
Writes benchmarks/results/time_to_detector.json and time_to_detector.png (AUROC against wall-clock minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dede_rt.bundle.thresholds import threshold_at_fpr
from dede_rt.data.transforms import Normalization
from dede_rt.data.triggers import white_square
from dede_rt.demo import TARGET_CLASS, DemoSettings, demo_splits
from dede_rt.metrics import detection_report
from dede_rt.models.encoders import load_encoder
from dede_rt.training import TrainConfig, compute_embeddings, standardized, train_detector

RESULTS = Path(__file__).parent / "results"


# Candidate defaults, measured against "default" (TrainConfig()) in the same run: name -> TrainConfig fields,
# or train_detector's DETECTOR_ARGS (e.g. refdec=decoder_size:reference, summed=score:summed).
VARIANTS: dict[str, dict] = {}
DETECTOR_ARGS = ("decoder_size", "score", "relative_k", "prototypes")


def _auroc_tracker(encoder_path: Path, l2: bool, norm: Normalization, clean: np.ndarray, triggered: np.ndarray,
                   every: int):
    """on_epoch hook: test AUROC of the decoder so far (summed score), with the seconds it took to compute."""
    from sklearn.metrics import roc_auc_score

    from dede_rt.scoring import ScoreTail, TestMask

    encoder, _ = load_encoder(encoder_path, "auto", norm.image_size, l2)
    images = np.concatenate([clean, triggered])
    x = norm.apply(images)
    z = torch.from_numpy(compute_embeddings(encoder, norm, images))
    labels = np.r_[np.zeros(len(clean)), np.ones(len(triggered))]
    points: list[dict] = []
    spent = [0.0]

    def hook(epoch: int, loss: float, decoder) -> None:
        if epoch % every:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            tail = ScoreTail(decoder, TestMask(decoder.config.num_patches))
            scores = torch.cat([tail(x[i:i + 256], z[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
        decoder.train()
        spent[0] += time.perf_counter() - t0
        points.append({"epoch": epoch, "loss": loss, "auroc": float(roc_auc_score(labels, scores)),
                       "eval_seconds_so_far": spent[0], "at": time.perf_counter()})

    return hook, points, spent


def _with_prototypes(det, train_images: np.ndarray, seed: int):
    """A summed-score detector given train_detector's default relative-score prototypes and k."""
    from dede_rt.scoring import PROTOTYPES, RELATIVE_K, prototype_indices

    idx = prototype_indices(len(train_images), PROTOTYPES, seed)
    proto = compute_embeddings(det.encoder, det.normalization, train_images[idx]).astype(np.float32)
    return replace(det, prototype_embeddings=proto, relative_k=min(RELATIVE_K, len(proto)))


def score_views(det, train_images: np.ndarray, hold: np.ndarray, clean: np.ndarray, triggered: np.ndarray,
                seed: int = 0) -> dict:
    """The same decoder's other score kinds (summed / relative / combined), each thresholded at 1 % FPR on ``hold``."""
    # Like for like: the reference trains the paper's summed score; its relative view uses the default prototypes
    # and k; the combined view takes its scales from the held-out images too.
    labels = np.r_[np.zeros(len(clean), int), np.ones(len(triggered), int)]
    relative = det if det.score_kind != "summed" else _with_prototypes(det, train_images, seed)
    summed = replace(relative, prototype_embeddings=None, relative_k=0, standardization=None)
    combined = standardized(replace(relative, standardization=None), hold)
    views = {}
    for name, view in (("summed_view", summed), ("relative_view", replace(relative, standardization=None)),
                       ("combined_view", combined)):
        if view.score_kind != det.score_kind:
            threshold = threshold_at_fpr(view.score(hold), 0.01)
            views[name] = detection_report(labels, np.r_[view.score(clean), view.score(triggered)], threshold)
    return views


def run_one(*, encoder: Path, l2: bool, schedule: str, reference_epochs: int, data, train_idx, cal_idx,
            clean: np.ndarray, triggered: np.ndarray, norm: Normalization, every: int, seed: int) -> dict:
    """Train one detector as the product does and report its quality and timing."""
    variant = dict(VARIANTS.get(schedule, {}))
    # train_detector's own choices (the rest are TrainConfig fields); the reference is the paper's exactly
    detector_args = {k: variant.pop(k) for k in DETECTOR_ARGS if k in variant}
    if schedule == "reference":
        config = TrainConfig(epochs=reference_epochs, precision="fp32", seed=seed)
        detector_args = {"decoder_size": "reference", "score": "summed"}
    else:
        config = TrainConfig(seed=seed, **variant)
    hook, points, spent = _auroc_tracker(encoder, l2, norm, clean, triggered, every) if schedule == "reference" \
        else (None, [], [0.0])
    t0 = time.perf_counter()
    det = train_detector(encoder, data.images[train_idx], None, normalization=norm, config=config,
                         threshold_data=data.images[cal_idx], l2_normalize=l2, progress=True, on_epoch=hook,
                         **detector_args)
    seconds = time.perf_counter() - t0 - spent[0]
    labels = np.r_[np.zeros(len(clean), int), np.ones(len(triggered), int)]
    report = detection_report(labels, np.r_[det.score(clean), det.score(triggered)], det.threshold(0.01))
    views = score_views(det, data.images[train_idx], data.images[cal_idx], clean, triggered, seed)
    q = det.sections["quality"]
    eta, actual = q["eta_seconds"], q["actual_after_plan_seconds"]
    row = {"encoder": encoder.name, "l2": l2, "schedule": schedule, "variant": VARIANTS.get(schedule, {}), "seed": seed,
           "config": config.to_dict(), "decoder": det.decoder.config.to_dict(), "score": det.score_kind,
           "epochs_run": q["epochs_run"], "planned_epochs": q["planned_epochs"],
           "first_planned_epochs": q.get("first_planned_epochs"), "stopped": q["stopped"],
           "best_epoch": q["best_epoch"], "kept_epoch": q["kept_epoch"], "precision": q["precision"], "minutes": round(seconds / 60, 3),
           "eta_seconds": eta, "actual_after_plan_seconds": actual,
           "eta_relative_error": None if eta is None or not actual else round(abs(eta - actual) / actual, 4),
           "data_share": q["data_share"], **report, **views}
    if points:
        row["auroc_curve"] = [{"epoch": p["epoch"], "auroc": p["auroc"], "loss": p["loss"],
                               "minutes": round((p["at"] - t0 - p["eval_seconds_so_far"]) / 60, 3)} for p in points]
    print(json.dumps({k: v for k, v in row.items() if k not in ("auroc_curve", "config")}), flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """AUROC against wall-clock minutes: the reference runs as curves, the default runs as points."""
    from dede_rt.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, r in enumerate(rows):
        name = f"{r['encoder']}{' l2' if r['l2'] else ''}"
        color = f"C{i}"
        if r["schedule"] == "reference" and r.get("auroc_curve"):
            c = r["auroc_curve"]
            ax.plot([p["minutes"] for p in c], [p["auroc"] for p in c], color=color, alpha=0.7,
                    label=f"{name}: reference ({r['epochs_run']} epochs)")
        else:
            ax.scatter([r["minutes"]], [r["auroc"]], color=color, marker="*", s=140, zorder=3,
                       label=f"{name}: {r['schedule']} ({r['epochs_run']} epochs, {r['stopped']})")
    ax.set_xlabel("wall-clock minutes (training call)")
    ax.set_ylabel("test AUROC")
    ax.set_title("time to a good detector (2-core CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    """Run every (encoder, form, schedule) and write the JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, required=True)
    parser.add_argument("--clean", type=Path, help="The clean encoder the victim was made from (the control).")
    parser.add_argument("--reference-epochs", type=int, default=200)
    parser.add_argument("--forms", default="raw,l2", help="raw, l2 or both")
    parser.add_argument("--schedules", default="default,reference",
                        help="default, reference and NAME=field:value/field:value variants of the default, "
                        "e.g. b64=batch_size:64")
    parser.add_argument("--every", type=int, default=2, help="reference curve: test AUROC every N epochs")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", type=Path, default=RESULTS / "time_to_detector.json")
    args = parser.parse_args()
    settings, norm = DemoSettings(), Normalization()
    data, train_idx, cal_idx, test_idx = demo_splits(settings, norm)
    clean = data.images[test_idx]
    triggered = white_square(norm.image_size).stamp(clean[data.labels[test_idx] != TARGET_CLASS])
    schedules = []
    for item in args.schedules.split(","):
        name, _, fields = item.partition("=")
        if fields:  # NAME=field:value/field:value, values as JSON (numbers, strings in quotes not needed)
            VARIANTS[name] = {k: _value(v) for k, v in (f.split(":", 1) for f in fields.split("/"))}
        schedules.append(name)
    rows = []
    for encoder in [args.victim] + ([args.clean] if args.clean else []):
        for l2 in [f == "l2" for f in args.forms.split(",")]:
            for schedule in schedules:
                rows.append(run_one(encoder=encoder, l2=l2, schedule=schedule, reference_epochs=args.reference_epochs,
                                    data=data, train_idx=train_idx, cal_idx=cal_idx, clean=clean,
                                    triggered=triggered, norm=norm, every=args.every, seed=args.seed))
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({
                    "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                "torch_threads": torch.get_num_threads()},
                    "train_images": int(len(train_idx)), "threshold_images": int(len(cal_idx)),
                    "test": {"clean": int(len(clean)), "triggered": int(len(triggered))},
                    "reference_epochs": args.reference_epochs, "rows": rows}, indent=2) + "\n")
                plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

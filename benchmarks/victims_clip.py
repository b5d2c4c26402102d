"""A BadCLIP-style victim built here, end to end: tiny CLIP -> BadCLIP patch backdoor -> DeDe detectors at 224 px.

Data: the same disjoint photo-crop splits as ``victims_224.py`` (224 px, labelled by photo; the 16 photo names
are the class names of the captions). Victim: a tiny CLIP (``dede_rt.research.attacks.clip``): image tower =
the ImageNet-stem ResNet 16-32-64-128 of ``victims_224.py`` + a linear projection to 64-d (CLIP's image
embedding), text tower = a 2-layer Transformer over word tokens of templated captions ("a photo of the
coffee"; with --attribute-rate each caption also states the crop's brightness, colour cast and texture with
that chance: "a photo of the dark gray smooth coffee"), trained with CLIP's loss. Backdoor (``badclip.py``):
a 32-px patch at (184, 184) optimised toward the target photo's captions and images on the clean CLIP, then
5 % poisoned pairs (stamped non-target crops captioned as the target) in a 10-epoch contrastive fine-tune.
BA / ASR: CLIP's zero-shot classification by caption (the attack's own measure) and a linear probe (as the
other victims); ASR below 0.8 is a failed attack. Detectors: `dede-rt train` defaults (epochs auto within
10 min, early stopping) with decoder patch 32, CLIP's mean/std, on the image tower's projected embedding;
the clean CLIP's tower is the control (same triggered images); raw and L2-normalized embeddings; the
embedding-norm baseline next to them.

    .venv/bin/python benchmarks/victims_clip.py --json benchmarks/results/victims_clip.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dede_rt.data.demo import demo_photos
from dede_rt.data.transforms import CLIP_MEAN, CLIP_STD, Normalization
from dede_rt.data.triggers import Trigger
from dede_rt.metrics import detection_report
from dede_rt.models.encoders import load_encoder
from dede_rt.models.resnet import ImageNetResNet
from dede_rt.research.attacks.badclip import BadCLIPConfig, optimize_patch, poison_finetune
from dede_rt.research.attacks.clip import CLIPConfig, TinyCLIP, Vocabulary, train_clip, zero_shot_predict
from dede_rt.research.baselines.simple import embedding_norm_scores
from dede_rt.research.probe import accuracy, attack_success_rate, embed, evaluate_probe
from victims_224 import SIZE, SMALL, detector_row, record, splits

NORM = Normalization(CLIP_MEAN, CLIP_STD, SIZE)


def _tower_file(model: TinyCLIP, path: Path) -> None:
    torch.jit.save(torch.jit.trace(model.visual.eval(), torch.zeros(1, 3, SIZE, SIZE)), str(path))


def build_victims(data: dict, classes: list[str], workdir: Path, clip_epochs: int, target: int,
                  attribute_rate: float) -> dict:
    """Tiny CLIP, BadCLIP patch, poisoned fine-tune; the towers as TorchScript (cached by their settings)."""
    tag = f"clip{clip_epochs}_a{attribute_rate:g}_t{target}"
    badclip = BadCLIPConfig()
    badclip.finetune.attribute_rate = attribute_rate  # the fine-tune keeps the pre-training's caption style
    paths = {"clean": workdir / f"clean_{tag}.pt", "badclip": workdir / f"badclip_{tag}.pt"}
    state_path, trigger_path = workdir / f"clip_{tag}.pth", workdir / f"badclip_{tag}_patch.npz"
    log = workdir / f"victims_clip_{tag}_timings.json"
    timings = json.loads(log.read_text()) if log.is_file() else {}
    images, labels = data["train"]
    torch.manual_seed(0)
    model = TinyCLIP(ImageNetResNet(SMALL), SMALL.embed_dim, Vocabulary(classes))
    if not state_path.is_file():
        t0 = time.perf_counter()
        timings["clip_losses"] = train_clip(model, images, labels, classes, normalization=NORM,
                                            config=CLIPConfig(epochs=clip_epochs, attribute_rate=attribute_rate))
        timings["clip_seconds"] = time.perf_counter() - t0
        torch.save(model.state_dict(), state_path)
        _tower_file(model, paths["clean"])
    model.load_state_dict(torch.load(state_path, weights_only=True))
    if not trigger_path.is_file():
        t0 = time.perf_counter()
        trigger = optimize_patch(model, images, labels, classes, target, normalization=NORM, config=badclip)
        timings["trigger_seconds"] = time.perf_counter() - t0
        np.savez(trigger_path, pattern=trigger.pattern, mask=trigger.mask, name=trigger.name)
    saved = np.load(trigger_path)
    trigger = Trigger(saved["pattern"], saved["mask"], str(saved["name"]))
    if not paths["badclip"].is_file():
        t0 = time.perf_counter()
        victim = poison_finetune(model, images, labels, classes, target, trigger, normalization=NORM, config=badclip)
        timings["poison_finetune_seconds"] = time.perf_counter() - t0
        torch.save(victim.state_dict(), workdir / f"badclip_{tag}.pth")
        _tower_file(victim, paths["badclip"])
    log.write_text(json.dumps(timings))
    victim = TinyCLIP(ImageNetResNet(SMALL), SMALL.embed_dim, Vocabulary(classes))
    victim.load_state_dict(torch.load(workdir / f"badclip_{tag}.pth", weights_only=True))
    return {**paths, "models": {"clean": model.eval(), "badclip": victim.eval()}, "trigger": trigger,
            "timings": timings, "badclip_config": badclip}


def zero_shot(model: TinyCLIP, classes: list[str], test: np.ndarray, test_labels: np.ndarray, trigger: Trigger,
              target: int) -> dict:
    """CLIP's own BA / ASR: zero-shot accuracy on clean crops, target rate on stamped non-target crops."""
    clean = zero_shot_predict(model, classes, test, NORM)
    stamped = zero_shot_predict(model, classes, trigger.stamp(test), NORM)
    return {"ba": accuracy(clean, test_labels), "asr": attack_success_rate(stamped, test_labels, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dede-victims-clip"))
    parser.add_argument("--clip-epochs", type=int, default=20)
    parser.add_argument("--target", type=int, default=0, help="target photo (class index)")
    parser.add_argument("--attribute-rate", type=float, default=0.5,
                        help="chance a caption states each pixel attribute (0: class-only captions)")
    parser.add_argument("--rows", default="badclip:raw,clean:raw,badclip:l2,clean:l2",
                        help="ENCODER:FORM detectors to train (encoders badclip, clean; forms raw, l2; none: build only)")
    parser.add_argument("--max-minutes", type=float, default=None, help="detector budget (default: train's 10)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None, help="save clean and stamped test crops side by side")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = splits()
    classes = demo_photos(16, SIZE, 0).classes
    built = build_victims(data, classes, args.workdir, args.clip_epochs, args.target, args.attribute_rate)
    trigger = built["trigger"]
    test, test_labels = data["test"]
    keep = test_labels != args.target
    triggered = trigger.stamp(test[keep])
    labels = np.r_[np.zeros(len(test), int), np.ones(len(triggered), int)]
    if args.png:
        from PIL import Image

        pairs = [np.concatenate([a, b], axis=0) for a, b in zip(test[keep][:4], triggered[:4])]
        Image.fromarray(np.concatenate(pairs, axis=1)).save(args.png)
    result = {"benchmark": "224-px BadCLIP-style victim (tiny CLIP built here), DeDe at the train defaults",
              "image_size": SIZE, "classes": classes, "target_photo": args.target, "trigger": trigger.name,
              "encoder": "tiny CLIP image tower: ImageNet-stem ResNet 16-32-64-128 + Linear(128, 64)",
              "config": {"clip_epochs": args.clip_epochs, "attribute_rate": args.attribute_rate,
                         "badclip": repr(built["badclip_config"])},
              "sets": {k: int(len(v[0])) for k, v in data.items()}, "triggered_test": int(len(triggered)),
              "victim_build": built["timings"], "rows": []}
    wanted = [tuple(item.split(":")) for item in args.rows.split(",") if item != "none"]
    for name in dict.fromkeys(n for n, _ in wanted):
        encoder, _ = load_encoder(built[name], "torchscript", SIZE)
        probe = evaluate_probe(encoder, NORM, train_u8=data["probe"][0], train_labels=data["probe"][1],
                               test_u8=test, test_labels=test_labels, triggered_u8=trigger.stamp(test),
                               target=args.target)
        shot = zero_shot(built["models"][name], classes, test, test_labels, trigger, args.target)
        z = embed(encoder, NORM, np.concatenate([test, triggered]))
        norm_auroc = detection_report(labels, embedding_norm_scores(z))["auroc"]
        for form in [f for n, f in wanted if n == name]:
            row = {"encoder": name, "form": form, "zero_shot": shot, "probe": probe.to_dict(),
                   "attack": "control" if name == "clean" else ("backdoored" if shot["asr"] >= 0.8 else "FAILED (ASR < 0.8)"),
                   "norm_baseline_auroc": norm_auroc,
                   **detector_row(built[name], data, NORM, form == "l2", test, triggered, args.max_minutes)}
            record(result, row, args.json)
    if not wanted:
        print(json.dumps({name: zero_shot(built["models"][name], classes, test, test_labels, trigger, args.target)
                          for name in ("clean", "badclip")}))


if __name__ == "__main__":
    main()

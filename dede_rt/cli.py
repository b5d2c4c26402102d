"""The ``dede-rt`` command line: a thin typer layer over the library.

Every command is one library call plus argument parsing and printing. User
mistakes (``UserError``) print one line and exit with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from dede_rt.errors import UserError
from dede_rt.models.decoder_sizes import DECODER_SIZES, DEFAULT_DECODER_SIZE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Screen image datasets for images carrying a backdoor trigger of a self-supervised encoder (DeDe).")

EXIT_USAGE = 2


def _print_version(value: bool) -> None:
    if value:
        from dede_rt import __version__

        typer.echo(f"dede-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Screen image datasets for images carrying a backdoor trigger of a self-supervised encoder (DeDe)."""


def _floats(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{name} takes three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise UserError(f"--{name} takes three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


@app.command()
def train(
    encoder: str = typer.Option(..., help="Victim encoder: a BadEncoder/DRUPE checkpoint, CIFAR state dict, "
                                "TorchScript or ONNX file; or FAMILY:NAME with --weights (torchvision:resnet50, "
                                "timm:vit_small_patch16_224, open_clip:RN50) or a Hugging Face CLIP folder."),
    data: Path = typer.Option(..., help="Clean training images: image folder, CIFAR batch dir/file, or .npz."),
    out: Path = typer.Option(..., help="Detector bundle directory to write."),
    weights: Optional[Path] = typer.Option(None, help="FAMILY:NAME encoders: the checkpoint file (SimCLR, MoCo "
                                           "v2/v3, BYOL, DINO, OpenCLIP layouts; the key prefix is found)."),
    embedding: str = typer.Option("auto", help="auto|backbone|head: embed before or after the checkpoint's "
                                  "projection head (auto: backbone for SSL families, head for CLIP)."),
    encoder_format: str = typer.Option("auto", help="auto|badencoder|state_dict|torchscript|onnx"),
    mean: Optional[str] = typer.Option(None, help="Encoder input mean (RGB, on [0,1] pixels; default: the "
                                       "encoder family's, CIFAR's for checkpoint files)."),
    std: Optional[str] = typer.Option(None, help="Encoder input std (RGB; default as --mean)."),
    image_size: Optional[int] = typer.Option(None, help="Encoder input size (square; default: the family's, 32 "
                                             "for checkpoint files)."),
    resize: Optional[str] = typer.Option(None, help="squash (both sides to --image-size; CIFAR files' default) or "
                                         "crop (shorter side to --resize-to, then the centre square: the "
                                         "ImageNet/CLIP families' default)."),
    resize_to: Optional[int] = typer.Option(None, help="crop: the shorter side's length before cropping."),
    interpolation: Optional[str] = typer.Option(None, help="bicubic or bilinear (default: the family's)."),
    l2_normalize: bool = typer.Option(False, help="L2-normalize embeddings before the decoder."),
    threshold_data: Optional[Path] = typer.Option(None, "--threshold-data", "--calibration",
                                                  help="Clean held-out images the thresholds are chosen on (default: "
                                                  "hold out part of --data; --calibration is the old name)."),
    holdout: float = typer.Option(0.1, help="Fraction of --data held out for the thresholds when --threshold-data is not given."),
    fpr: float = typer.Option(0.01, help="Target false-positive rate of the default threshold (0.05 is also stored)."),
    epochs: str = typer.Option("auto", help="auto: plan the epochs that fit in --max-minutes from a timed first "
                               "epoch (at most 200), batch 64, LR warm-up + cosine decay over the plan, the "
                               "held-out clean error recorded every epoch; N: exactly N epochs (the reference schedule is 200 with "
                               "--train-precision fp32: batch 256, constant LR)."),
    max_minutes: Optional[float] = typer.Option(None, help="Wall-clock budget of the whole run (default with "
                                                "--epochs auto: 10)."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without a held-out improvement "
                                           "of --min-delta (default: 5 with --epochs auto and --lr-schedule "
                                           "constant; off under cosine and with N; 0 = off)."),
    min_delta: float = typer.Option(0.002, help="Relative held-out improvement that counts (0.002 = 0.2%)."),
    device: str = typer.Option("auto", help="auto (CUDA when torch sees a GPU), cpu or cuda."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch (default: 256, the reference, with "
                                             "--epochs N; 64 with --epochs auto)."),
    lr: float = typer.Option(1e-3),
    lr_schedule: str = typer.Option("auto", help="constant (reference) or cosine (one warm-up epoch, then a "
                                    "cosine decay to 0 over the planned or fixed epochs); auto: constant with "
                                    "--epochs N, cosine with --epochs auto."),
    weight_decay: float = typer.Option(1e-6), mask_ratio: float = typer.Option(0.9), seed: int = typer.Option(21),
    optimizer: str = typer.Option("adam", help="adam (reference) or adamw"),
    grad_clip: Optional[float] = typer.Option(None, help="Clip gradient norm (e.g. 1.0)."),
    high_norm_share: float = typer.Option(0.0, help="The reference's CTRL mod: train this share of the images with "
                                          "the largest embedding norm toward a constant image (e.g. the suspected "
                                          "poison rate; 0 = off)."),
    train_precision: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU runs it natively, else fp32), "
                                        "fp32 (reference) or bf16: the decoder's forward pass under bfloat16 "
                                        "autocast, ~1.8x faster on CPUs with AVX512-BF16/AMX."),
    decoder_size: str = typer.Option(DEFAULT_DECODER_SIZE, help="small (dim 128, 4 heads, 2+2 blocks: the default, ~4.5x cheaper "
                                     "at test time, README 'Decoder size') or reference (the paper's dim 192, "
                                     "3 heads, 12+4 blocks). --dim/--heads/--encoder-depth/--decoder-depth "
                                     "override its fields."),
    patch_size: int = typer.Option(4), dim: Optional[int] = typer.Option(None, help="Decoder width."),
    heads: Optional[int] = typer.Option(None), encoder_depth: Optional[int] = typer.Option(None),
    decoder_depth: Optional[int] = typer.Option(None),
    qkv_bias: bool = typer.Option(False, help="Give the decoder's attention qkv a bias (the paper's decoder, timm "
                                  "Block(dim, heads), has none)."),
    # "relative" = scoring.DEFAULT_SCORE (written out: the CLI does not import torch to show its help)
    score: str = typer.Option("relative", help="relative (the error minus the error of the best-fitting clean "
                              "prototype reconstructions: a pasted patch no embedding redraws cancels; the default, "
                              "chosen in the README's 'Choosing the score'), summed (DeDe's summed error, the paper's "
                              "score) or combined (both, each standardized on the clean held-out images)."),
    relative_k: int = typer.Option(0, help="relative/combined score: how many best-fitting prototypes it averages "
                                   "(0: 32, or all the prototypes when there are fewer)."),
    prototypes: int = typer.Option(256, help="relative/combined score: clean training embeddings kept as "
                                   "prototypes."),
    embed_encoder: bool = typer.Option(False, help="Copy the encoder file into the bundle."),
    resume: bool = typer.Option(False, help="Resume from OUT/checkpoints if a run was interrupted."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Train a DeDe detector for a victim encoder and choose its thresholds on clean held-out data."""
    from dede_rt.training import TrainConfig, train_detector

    given = {"mean": mean and _floats(mean, "mean"), "std": std and _floats(std, "std"), "image_size": image_size,
             "resize": resize, "resize_to": resize_to, "interpolation": interpolation}
    detector = train_detector(
        encoder, data, out, normalization={k: v for k, v in given.items() if v is not None},
        weights=weights, embedding=embedding,
        decoder_size=decoder_size,
        decoder_config={"patch_size": patch_size, "dim": dim, "heads": heads, "encoder_depth": encoder_depth,
                        "decoder_depth": decoder_depth, "qkv_bias": qkv_bias},
        config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           mask_ratio=mask_ratio, seed=seed, optimizer=optimizer, grad_clip=grad_clip,
                           high_norm_share=high_norm_share, precision=train_precision, max_minutes=max_minutes,
                           patience=patience, min_delta=min_delta, device=device, lr_schedule=lr_schedule),
        encoder_format=encoder_format, l2_normalize=l2_normalize, threshold_data=threshold_data, holdout_fraction=holdout,
        fprs=tuple(sorted({fpr, 0.01, 0.05})), default_fpr=fpr, embed_encoder=embed_encoder, resume=resume,
        progress=not quiet, score="summed" if score == "reference" else score,  # the first round's name
        relative_k=relative_k, prototypes=prototypes)
    from dede_rt.quality import format_report

    t = detector.sections["training"]
    typer.echo(f"detector written to {out}: {t['images']} training images, {t['epochs_run']} epochs, "
               f"final loss {t['final_loss']:.4f}; threshold {detector.threshold(fpr):.4g} at FPR {fpr:g} "
               f"(chosen on {t['threshold_images']} clean held-out images)")
    for line in format_report(detector.sections["quality"]):
        typer.echo(line)


@app.command()
def info(detector: Path = typer.Argument(..., help="Detector bundle directory."),
         as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON instead.")) -> None:
    """Describe a detector bundle: what it detects with, how well it trained (checks the encoder hash)."""
    from dede_rt.bundle import load_detector, read_manifest
    from dede_rt.quality import format_report

    load_detector(detector)  # the hash and shape checks
    manifest = read_manifest(detector)
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    d = manifest.decoder
    size = manifest.sections.get("training", {}).get("decoder_size")  # bundles before decoder sizes: none
    typer.echo(f"{detector}: DeDe detector, schema {manifest.schema}, {manifest.score.kind} score, "
               f"{manifest.image_size}-px input, decoder {size + ' ' if size else ''}patch {d.get('patch_size')} "
               f"dim {d.get('dim')} depth {d.get('encoder_depth')}+{d.get('decoder_depth')}")
    quality = manifest.sections.get("quality")
    lines = format_report(quality) if quality else ["training: no quality report (trained before quality reports existed)"]
    for line in lines:
        typer.echo(line)
    typer.echo("(--json for the whole manifest)")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), help="Directory for the demo's victim, detector, images and plots."),
    fast: bool = typer.Option(False, help="Tiny settings for smoke tests (seconds, not minutes; weak detection)."),
) -> None:
    """Build a backdoored demo victim, train a detector, scan clean + triggered images, report AUROC."""
    from dede_rt.demo import run_demo

    run_demo(out, fast=fast)


# --- commands added by later issues register below this line ---


def _drupe_overrides(stealth: float | None) -> dict:
    """DRUPEConfig overrides for --drupe-stealth (empty: the defaults, so cached victims keep their key)."""
    if stealth is None:
        return {}
    if stealth < 0:
        raise UserError(f"--drupe-stealth must be >= 0, got {stealth}")
    return {"lambda_swd": stealth, "lambda_collapse": stealth}


@app.command("eval")
def eval_command(
    out: Path = typer.Option(..., help="Directory for results.md/json, PNGs (and built victims unless --victims-dir)."),
    victims_dir: Optional[Path] = typer.Option(None, help="Where victims are built or reused (cached by settings)."),
    victim: Optional[list[str]] = typer.Option(
        None, metavar="ATTACK:TRIGGER", help="Victim to build (repeatable); attacks badencoder|drupe|ctrl, triggers "
        "white_square|blend|faint_blend|logo_blend|ctrl. Default: badencoder and drupe with white_square and blend, "
        "and ctrl:ctrl (none when --victim-file is given)."),
    victim_file: Optional[list[str]] = typer.Option(
        None, metavar="[NAME=]ATTACK:TRIGGER=PATH", help="Load your own victim (repeatable; BadEncoder/DRUPE/CTRL "
        "checkpoint, state dict, TorchScript or ONNX). ATTACK is a free label for the table; TRIGGER "
        "(white_square|blend|faint_blend|logo_blend|ctrl) is stamped on the test images."),
    clean_encoder: Optional[Path] = typer.Option(None, help="Clean encoder file: the control row of --victim-file "
                                                 "victims (required with them)."),
    train_data: Optional[Path] = typer.Option(None, help="Clean labelled images (class folders, CIFAR batches, .npz "
                                              "with labels): decoder ID training and probe training. With --test-data; "
                                              "default: the embedded demo data."),
    test_data: Optional[Path] = typer.Option(None, help="Clean labelled test images: detection negatives, probe test; "
                                             "its non-target-class images get the trigger as positives."),
    ood_data: Optional[Path] = typer.Option(None, help="Clean images, labels not needed: the OOD decoder regime "
                                            "(without it only the id regime runs)."),
    image_size: int = typer.Option(32, help="Encoder input size (square); images are resized to it."),
    mean: str = typer.Option("0.4914,0.4822,0.4465", help="Encoder input mean (RGB, on [0,1] pixels)."),
    std: str = typer.Option("0.2023,0.1994,0.2010", help="Encoder input std (RGB)."),
    target: int = typer.Option(0, help="The attack's target class (label of --train-data/--test-data)."),
    simclr_epochs: int = typer.Option(30), finetune_epochs: int = typer.Option(20),
    ctrl_rate: float = typer.Option(0.01, help="CTRL poisoning rate of the pre-training set."),
    ctrl_magnitude: float = typer.Option(100.0, help="CTRL trigger magnitude on the poisoned pre-training images "
                                         "(test images always carry the reference 100)."),
    drupe_stealth: Optional[float] = typer.Option(None, help="Weight of DRUPE's distribution and anti-collapse terms "
                                                  "(both; default: DRUPEConfig's 0.1)."),
    # the eval's decoder: the small size's shape (research.evaluation.config.EVAL_DECODER)
    decoder_epochs: int = typer.Option(40), decoder_dim: int = typer.Option(DECODER_SIZES["small"]["dim"]),
    decoder_heads: int = typer.Option(DECODER_SIZES["small"]["heads"]),
    decoder_depth: int = typer.Option(DECODER_SIZES["small"]["decoder_depth"]),
    encoder_depth: int = typer.Option(DECODER_SIZES["small"]["encoder_depth"]),
    decoder_batch: int = typer.Option(128, help="Decoder training batch size (dede-rt train --epochs auto: 64)."),
    decoder_lr_schedule: str = typer.Option("constant", help="Decoder LR schedule: constant or cosine (one warm-up "
                                            "epoch, cosine decay; dede-rt train's default with --epochs auto)."),
    train_precision: str = typer.Option("fp32", help="Decoder training precision: fp32 or bf16 (bfloat16 autocast, "
                                        "~1.8x faster on CPUs with AVX512-BF16/AMX)."),
    patch_size: int = typer.Option(4, help="Decoder patch size; must leave no patch visible at test time "
                                   "(e.g. 4 for 32 px, 8 for 64 px, 32 for 224 px)."),
    seeds: str = typer.Option("21,22,23", help="Decoder seeds (comma-separated); the table reports mean ± std."),
    regimes: Optional[str] = typer.Option(None, help="Decoder training data: id and/or ood (default: id,ood; id "
                                          "only when --train-data is given without --ood-data)."),
    poison_rate: float = typer.Option(0.0, help="Share of the ID training split carrying the row's trigger, as the "
                                      "reference trains on suspect data (its default 0.1); 0 = clean ID data."),
    high_norm_share: float = typer.Option(0.0, help="The reference's CTRL mod for every decoder: the share of "
                                          "training images with the largest embedding norm is trained toward a "
                                          "constant image (the reference: = --poison-rate, CTRL only)."),
    trim: float = typer.Option(0.25, help="The patch-robust DeDe column drops this share of each image's worst "
                               "patches (0 = no such column); the reference column sums all patches."),
    relative_k: int = typer.Option(32, help="The relative DeDe column subtracts the mean error of the k clean "
                                   "prototype reconstructions that fit each image best (0 = no such column)."),
    prototypes: int = typer.Option(256, help="Clean training embeddings decoded as the relative score's "
                                   "prototypes."),
    l2: bool = typer.Option(True, help="Also evaluate every encoder with L2-normalized embeddings."),
    l2_regimes: str = typer.Option("id,ood", help="Regimes in which L2-normalized embeddings get DeDe decoders."),
    fpr: float = typer.Option(0.01, help="Target FPR of the calibrated threshold."),
    decree_steps: int = typer.Option(200, help="Steps of the simplified DECREE inversion (0 = skip)."),
    asset_epochs: int = typer.Option(1, help="Epochs of the simplified ASSET baseline (0 = skip)."),
    hard_images: int = typer.Option(200, help="Hard clean images (textures, text, checkerboards, stripes; no "
                                    "trigger) every detector scores: the false-alarm control (0 = off)."),
    threads: int = typer.Option(0, help="torch CPU threads of the main process (0 = torch default)."),
    workers: int = typer.Option(1, help="Worker processes for decoder training (each single-threaded)."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Build or load victims, train DeDe detectors and baselines, write the paper-shaped results table."""
    from dede_rt.data.transforms import Normalization
    from dede_rt.research.evaluation import EvalConfig, VictimConfig, run_eval

    log = (lambda *a, **k: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    config = EvalConfig(
        victims=tuple(victim) if victim else None, victim_files=tuple(victim_file or ()),
        clean_encoder=clean_encoder, train_data=train_data, test_data=test_data, ood_data=ood_data,
        victim=VictimConfig(simclr_epochs=simclr_epochs, finetune_epochs=finetune_epochs, ctrl_rate=ctrl_rate,
                            ctrl_magnitude=ctrl_magnitude, target=target, drupe=_drupe_overrides(drupe_stealth)),
        decoder={"dim": decoder_dim, "heads": decoder_heads, "encoder_depth": encoder_depth,
                 "decoder_depth": decoder_depth, "patch_size": patch_size},
        decoder_epochs=decoder_epochs, decoder_batch=decoder_batch, decoder_lr_schedule=decoder_lr_schedule,
        decoder_precision=train_precision, seeds=seed_list,
        regimes=None if regimes is None else tuple(r.strip() for r in regimes.split(",") if r.strip()),
        poison_rate=poison_rate, trim=trim, relative_k=relative_k, prototypes=prototypes, hard_images=hard_images,
        high_norm_share=high_norm_share, asset_epochs=asset_epochs, l2_variants=(False, True) if l2 else (False,),
        l2_regimes=tuple(r.strip() for r in l2_regimes.split(",") if r.strip()), fpr=fpr, decree_steps=decree_steps,
        normalization=Normalization(mean=_floats(mean, "mean"), std=_floats(std, "std"), image_size=image_size))
    results = run_eval(config, out=out, victims_dir=victims_dir, workers=workers, threads=threads,
                       progress=not quiet, log=log)
    typer.echo((Path(out) / "results.md").read_text())
    typer.echo(f"results written to {out} in {results['seconds']:.0f} s")


def _csv(text: str, cast=str) -> tuple:
    try:
        return tuple(cast(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"expected a comma-separated list, got {text!r}") from None


@app.command("export")
def export_cmd(
    detector: Path = typer.Argument(..., help="Detector bundle directory."),
    exporter: str = typer.Option("auto", help="auto (dynamo, falling back to TorchScript) | dynamo | torchscript"),
    encoder: Optional[Path] = typer.Option(None, help="The encoder file, if it moved since training."),
) -> None:
    """Export the detector to ONNX: fused uint8 and float-NCHW graphs plus encoder/decoder, into DETECTOR/onnx/."""
    from dede_rt.export import export_detector

    record = export_detector(detector, exporter, encoder_path=encoder)
    for name, g in record["graphs"].items():
        typer.echo(f"{g['path']}: {g['exporter']}, opset {g['opset']}, {g['nodes']} nodes")
    p = record["parity"]
    typer.echo(f"fused graph vs torch on {p['images']} images: max relative difference {p['max_rel_diff']:.2e}")


@app.command()
def calibrate(
    detector: Path = typer.Argument(..., help="Detector bundle directory."),
    data: Path = typer.Option(..., help="Clean images (folder, CIFAR batches, .npz) for INT8 ranges, gates and thresholds."),
    triggered: Optional[Path] = typer.Option(None, help="Triggered images: makes the quality gate an AUROC/TPR one."),
    count: int = typer.Option(256, help="Clean images used for INT8 calibration (the rest gate and re-threshold)."),
    precision: str = typer.Option("int8,fp16", help="Precisions to build: int8, fp16."),
    method: str = typer.Option("minmax", help="INT8 range calibration: minmax | percentile | entropy."),
    headroom: Optional[float] = typer.Option(None, help="INT8: factor on the clean range of the deeper layers' "
                                             "activations, so trigger-driven outliers are not clipped (1 = plain "
                                             "calibration; default 2)."),
    max_images: Optional[int] = typer.Option(5000, help="Use at most this many images of each set (seeded)."),
    seed: int = typer.Option(0),
    mixed: bool = typer.Option(True, help="With --triggered, when INT8 fails its gate: leave the encoder layers "
                               "that cost most AUROC float until it passes (kept only if faster than FP32)."),
    max_auroc_drop: Optional[float] = typer.Option(None, help="With --triggered: the most AUROC a precision may "
                                                   "lose against FP32 and pass its gate (default 0.005)."),
    max_tpr_drop: Optional[float] = typer.Option(None, help="With --triggered: the most TPR at its calibrated "
                                                 "threshold a precision may lose against FP32 (default 0.02)."),
) -> None:
    """Build INT8 (Q/DQ) and FP16 ONNX variants, gate their detection quality against FP32, re-choose thresholds."""
    from dede_rt.bundle import fpr_key
    from dede_rt.optional import require_onnx_export

    require_onnx_export("dede-rt calibrate")  # before calibration.pipeline, which imports onnx at module level
    from dede_rt.calibration.gate import GateTolerance
    from dede_rt.calibration.pipeline import calibrate_paths

    given = {"auroc_drop": max_auroc_drop, "tpr_drop": max_tpr_drop}
    tol = GateTolerance(**{k: v for k, v in given.items() if v is not None})
    results = calibrate_paths(detector, data, triggered=triggered, count=count, seed=seed,
                              precisions=_csv(precision), method=method, max_images=max_images,
                              warn=lambda m: typer.echo(m, err=True), mixed=mixed, tol=tol,
                              **({} if headroom is None else {"headroom": headroom}))
    for name, entry in results.items():
        gate, fpr = entry["gate"], entry["threshold_fpr"]
        threshold = entry["thresholds"].get(fpr_key(fpr), float("nan"))
        typer.echo(f"{name}: {'PASSED' if gate['passed'] else 'FAILED'} quality gate ({gate['summary']}); "
                   f"threshold {threshold:.6g} at FPR {fpr:g}; {entry['path']}")


@app.command("build-engine")
def build_engine_cmd(
    detector: Path = typer.Argument(..., help="Detector bundle directory."),
    precision: str = typer.Option("fp16", help="fp32 | fp16 | int8 | best"),
    data: Optional[Path] = typer.Option(None, help="Clean images: INT8 calibration and the engine's quality gate."),
    min_batch: int = typer.Option(1), opt_batch: int = typer.Option(64), max_batch: int = typer.Option(256),
    workspace_gib: float = typer.Option(4.0, help="Builder workspace limit."),
    score_tail: str = typer.Option("auto", help="plugin (the fused mask-and-score TensorRT plugin, one node) | "
                                   "standard (plain ops) | auto (plugin where tensorrt.plugin and triton are usable "
                                   "and the score kind has a fused kernel; the manifest records why)."),
) -> None:
    """Build a TensorRT engine (needs TensorRT >= 10 and an NVIDIA GPU) into DETECTOR/trt/."""
    from dede_rt.engines.tensorrt_builder import build_engine_paths

    entry = build_engine_paths(detector, precision, data, min_batch, opt_batch, max_batch, workspace_gib,
                               log=lambda m: typer.echo(m, err=True), score_tail=score_tail)
    m = entry["manifest"]
    typer.echo(f"{entry['path']}: TensorRT {m['tensorrt']} on {m['gpu']} (sm {m['compute_capability']}), "
               f"{m['precision']}, batch {m['profile']['min']}-{m['profile']['max']}, built in {m['build_seconds']} s; "
               f"score tail {m['score_tail']['used']}; gate: {entry['gate']['summary']}")


@app.command()
def bench(
    detector: Optional[Path] = typer.Argument(None, help="Detector bundle (default: a random-init ResNet18 + "
                                              "--decoder-size decoder speed bundle, built once in --workdir)."),
    batch_sizes: str = typer.Option("1,32,64,256", help="Batch sizes."),
    backends: str = typer.Option("torch:fp32,onnxruntime:fp32,onnxruntime:int8,onnxruntime:fp16,tensorrt:fp16,tensorrt:int8",
                                 help="backend:precision variants (unavailable ones are listed as skipped)."),
    seconds: float = typer.Option(1.0, help="Seconds per measurement per round."),
    rounds: int = typer.Option(3, help="Round-robin rounds (all variants once per round)."),
    threads: int = typer.Option(0, help="Intra-op threads for torch and ONNX Runtime (0: their defaults)."),
    workdir: Path = typer.Option(Path.home() / ".cache" / "dede-rt" / "bench", help="Where the default speed bundle lives."),
    decoder_size: str = typer.Option(DEFAULT_DECODER_SIZE, help="The speed bundle's decoder: small (dede-rt "
                                     "train's default) or reference (the paper's 12+4 blocks)."),
    model: str = typer.Option("resnet18", help="Speed bundle to build without DETECTOR: resnet18 (CIFAR, 32 px), "
                              "resnet50-224 (torchvision ResNet-50) or clip-vit-b32-224 (CLIP ViT-B/32 tower)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write rows (backend, precision, batch, throughput, latency_*) as JSON."),
    markdown: Optional[Path] = typer.Option(None, help="Write the Markdown table."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG bar chart."),
    score_kernel: str = typer.Option("", help="Also measure each torch variant with these mask-and-score kernels, "
                                     "as rows next to the plain-op ones: triton (CUDA), reference (comma-separated)."),
    score_tail: str = typer.Option("", help="Also measure each TensorRT variant with an engine of these score tails, "
                                   "as rows next to the recorded engine's: plugin, standard (comma-separated; "
                                   "missing engines are built once under DETECTOR/trt/variants/)."),
) -> None:
    """Throughput/latency of torch, ONNX Runtime (FP32/INT8/FP16) and TensorRT across batch sizes (trtexec terms)."""
    from dede_rt.bench import bench_command, markdown_table

    variants = tuple(tuple(v.split(":")) for v in _csv(backends))
    if any(len(v) not in (2, 3) for v in variants):
        raise UserError(f"--backends takes backend:precision[:kernel-or-tail] items, got {backends!r}")
    result = bench_command(detector, workdir, batches=_csv(batch_sizes, int), variants=variants, seconds=seconds,
                           rounds=rounds, threads=threads, json_path=json_out, markdown_path=markdown, plot_path=plot,
                           score_kernels=tuple(_csv(score_kernel)), score_tails=tuple(_csv(score_tail)),
                           log=lambda m: typer.echo(m, err=True), model=model, decoder_size=decoder_size)
    typer.echo(markdown_table(result))


@app.command(epilog="Exit status: 0 scan finished and nothing flagged; 1 scan finished and at least one image "
             "flagged; 2 usage or setup error (bad option, missing detector, unreadable source) or a failed scan "
             "(rows so far are kept: rerun with --resume). Broken images "
             "never stop a scan: each gets a row with its error.")
def scan(
    source: Path = typer.Argument(..., help="Image folder (recursive), .txt list of paths, .npz/.npy, CIFAR batches, "
                                  ".tar shard or 'shard-{000..009}.tar'."),
    detector: Path = typer.Option(..., help="Detector bundle directory."),
    backend: str = typer.Option("auto", help="auto|torch|onnxruntime|tensorrt (auto: fastest that passed its quality gate)."),
    precision: Optional[str] = typer.Option(None, help="fp32|fp16|int8 (default: the backend's best usable)."),
    batch_size: int = typer.Option(64, help="Images per inference batch."),
    workers: Optional[int] = typer.Option(None, help="Decode workers (default: half the CPU cores, 1-4; 0 = inline)."),
    pool: str = typer.Option("thread", help="Decode pool: thread (default) or process (very large JPEGs)."),
    threads: int = typer.Option(0, help="Inference threads (0: the backend's default)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Rows to FILE.csv, .jsonl or .parquet "
                                          "(+ FILE.summary.json and FILE.hist.png). Without it, flagged inputs are printed."),
    resume: bool = typer.Option(False, help="Continue an interrupted scan into the same --output."),
    fpr: Optional[float] = typer.Option(None, help="Flag at the threshold chosen for this false-positive rate (default: the bundle's, 0.01)."),
    threshold: Optional[float] = typer.Option(None, help="Flag when score > this value (instead of --fpr)."),
    limit: Optional[int] = typer.Option(None, help="Scan at most N inputs (in scan order)."),
    max_pixels: int = typer.Option(89_478_485, help="Reject images declaring more pixels (decompression bombs)."),
    score_kernel: str = typer.Option("torch", help="torch backend's mask-and-score tail: torch (plain ops), triton "
                                     "(fused kernel, CUDA) or reference (the fused op in torch)."),
    quiet: bool = typer.Option(False, help="No progress bar or log lines."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="auto|ADDRESS",
                                      help="Scan on a Ray cluster (needs dede-rt[ray]): auto (the cluster `ray start` "
                                      "made here, $RAY_ADDRESS, else a local one) or its address. --output is then a "
                                      "directory of Parquet parts."),
    ray_actors: Optional[str] = typer.Option(None, help="--ray: scoring actors, N or MIN-MAX (default: one per GPU, "
                                             "else autoscaled over the CPUs)."),
    ray_partition_size: Optional[int] = typer.Option(None, help="--ray: inputs per partition (the unit of resume)."),
    ray_max_failed: int = typer.Option(0, help="--ray: partitions that may fail while scoring before the scan "
                                       "stops; skipped ones are listed in the summary and redone by --resume."),
) -> None:
    """Scan a dataset and flag images that carry a backdoor trigger (one row per input)."""
    from dede_rt.scan.pipeline import run_scan

    if ray is not None:
        if output is None or limit is not None or workers is not None or pool != "thread":
            raise UserError("--ray needs --output DIR and takes no --limit/--workers/--pool (decoding runs as Ray tasks)")
        from dede_rt.scan.distributed import require_ray
        from dede_rt.scan.distributed import run as run_distributed

        require_ray()

        # The same call, error handling and report as a local scan, served by the distributed one.
        def run_scan(source, detector, output, *, resume, progress, log, **options):  # noqa: F811
            return run_distributed(source, detector, output, address=ray, resume=resume, progress=progress, log=log,
                                   actors=ray_actors, partition_size=ray_partition_size,
                                   max_failed_partitions=ray_max_failed,
                                   **{k: v for k, v in options.items() if k not in ("limit", "on_batch", "workers",
                                                                                     "pool")})

    def log(text: str) -> None:
        if not quiet:
            typer.echo(text, err=True)

    def echo_flagged(rows: list) -> None:
        for r in rows:
            if r.flagged:
                typer.echo(f"FLAGGED {r.score:.6g} {r.path}{'::' + r.member if r.member else ''}")

    try:
        summary = run_scan(source, detector, output, resume=resume, limit=limit, progress=not quiet,
                           on_batch=None if output else echo_flagged, log=log, backend=backend, precision=precision,
                           batch_size=batch_size, workers=workers, pool=pool, fpr=fpr, threshold=threshold,
                           max_pixels=max_pixels, threads=threads, score_kernel=score_kernel)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a crash must not exit 1, which means "flagged"
        import traceback

        traceback.print_exc()
        typer.echo(f"error: scan failed: {type(exc).__name__}: {exc}"
                   + (" (rows so far are saved; rerun with --resume)" if output else ""), err=True)
        raise typer.Exit(EXIT_USAGE) from None
    c, run = summary["counts"], summary["this_run"]
    where = f"; rows in {output}, summary in {summary['summary_json']}" if output else ""
    if summary.get("status") == "incomplete":  # --ray with max failed partitions: not a finished scan
        typer.echo(f"error: {summary['ray']['incomplete']} partitions failed; rerun with --resume{where}", err=True)
        raise typer.Exit(EXIT_USAGE)
    typer.echo(f"{c['inputs']} inputs: {c['flagged']} flagged, {c['scored'] - c['flagged']} clean, {c['errors']} errors "
               f"(threshold {summary['threshold']:.6g}; {summary['backend']} {summary['precision']}; "
               f"{run['images_per_second']:.0f} img/s){where}")
    raise typer.Exit(1 if c["flagged"] else 0)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

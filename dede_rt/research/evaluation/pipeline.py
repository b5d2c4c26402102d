"""``dede-rt eval``: victims -> test sets -> DeDe detectors and baselines -> the results table.

For every encoder (the clean control and each victim) embeddings are computed
once; each DeDe decoder is trained on cached embeddings and scores the test
set from cached embeddings too (at the test mask ratio no patch is visible,
so the score needs only the embedding; ``EvalConfig`` rejects a patch size
that would leave one visible). Per victim and trigger the detection test set is the
clean test split (negatives) plus its non-target-class images with the
trigger stamped in uint8 (positives). Variants:
- regime ``id``: decoder trained on in-distribution data (digit train
  split), clean by default; with ``poison_rate`` > 0 that share of it carries
  the row's trigger, as the reference trains on its shadow set
  (``--poison_rate 0.1``: the defender fits the decoder on the data it
  screens). Measured here, that hurts on low-variety data: the decoder learns
  to draw the average triggered image (BadEncoder square 0.999 -> 0.76 AUROC
  at 10%, level with the clean-encoder control), so clean ID is the default; ``ood``: clean photo crops only;
- ``raw`` and ``l2``: the same encoder with embeddings L2-normalized;
- seeds: one decoder per seed; the table reports mean ± std over seeds;
- control: the CLEAN encoder scored on the same triggered images;
- false alarms: ``hard_images`` clean images that are hard to reconstruct but
  carry no trigger (``data/hard_images.py``: textures, text, checkerboards,
  stripes) scored by every row's detectors: ``hard_auroc`` against the clean
  test images and, for DeDe, ``hard_fpr`` at the calibrated threshold;
- score: the reference sum of squared error over all patches, and (``trim``)
  the patch-robust variant that drops the worst ``trim`` share of patches
  (``scoring.trimmed_sse``): a pasted patch the decoder cannot redraw raises
  the sum even for a clean encoder; the variant measures the backdoor margin
  that is not the trigger's own pixels; and (``relative_k``) the relative
  variant (``scoring.relative_sse``): the image's own-embedding error minus
  the error of the ``relative_k`` best-fitting reconstructions of clean
  training embeddings, so pixels no embedding redraws cancel. Same decoders,
  no extra training.
Victims are built (``config.victims``) and/or loaded from the user's files
(``config.victim_files`` + ``config.clean_encoder``, the control); ``data`` may
be the user's sets (``load_eval_data``) instead of the demo split.
Baselines: embedding norm, kNN distance, simplified DECREE (model-level) and
simplified ASSET (``research/baselines/asset.py``; it screens the ID split with
``asset_poison_rate`` of it triggered, or the poisoned ID set, against the
clean held-out split, and scores the test set).
The threshold is calibrated at ``fpr`` on clean held-out images of the
decoder's own training regime (never on test scores), and "after removal"
numbers re-measure the linear probe on what the detector lets through.

Stages: victims (``victims.py``) -> per-encoder embeddings and the job list
(``plan.py``) -> ``execute.py`` (worker processes) -> ``collect.py`` (records)
-> ``report.py`` (results.md/json, plots). ``run_eval`` chains them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from dede_rt.errors import UserError
from dede_rt.research.evaluation.collect import collect
from dede_rt.research.evaluation.config import EvalConfig
from dede_rt.research.evaluation.execute import execute_all
from dede_rt.research.evaluation.plan import AssetJob, DecoderJob, EvalSets, check_eval_data, encoder_run, plan_eval
from dede_rt.research.evaluation.report import write_report
from dede_rt.research.evaluation.victims import (EvalData, Victim, VictimSpec, build_victims, eval_data,
                                                 load_eval_data, load_victims)


def load_data(config: EvalConfig, log: Callable[[str], None] = print) -> EvalData:
    """The user's sets named in ``config``, else the deterministic demo split."""
    size = config.normalization.image_size
    if config.train_data is None:
        return eval_data(size, seed=config.victim.seed)
    data = load_eval_data(config.train_data, config.test_data, config.ood_data, image_size=size, log=log)
    if config.ood_data is None and config.regimes_defaulted:
        log("no --ood-data: running the id regime only")
    return data


def eval_encoders(config: EvalConfig, data: EvalData, *, victims_dir: Path, progress: bool = True,
                  log: Callable[[str], None] = print) -> list[Victim]:
    """The control encoder(s), then the victims: built (cached in ``victims_dir``) and/or loaded."""
    controls, victims = [], []
    if config.victims:
        specs = [VictimSpec.parse(v) for v in config.victims]
        clean, built = build_victims(victims_dir, specs, data, normalization=config.normalization,
                                     config=config.victim, progress=progress, log=log)
        controls.append(clean)
        victims += built
    if files := config.parsed_victim_files:
        clean, loaded = load_victims(files, config.clean_encoder, data, normalization=config.normalization,
                                     target=config.victim.target, seed=config.victim.seed,
                                     clean_name="clean_loaded" if controls else "clean", log=log)
        controls.append(clean)
        victims += loaded
    encoders = [*controls, *victims]
    if len({v.name for v in encoders}) < len(encoders):
        raise UserError(f"victim names must be unique, got {[v.name for v in encoders]}")
    return encoders


def run_eval(config: EvalConfig, *, out: str | Path, data: EvalData | None = None,
             victims_dir: str | Path | None = None, workers: int = 1, threads: int = 0, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Build and/or load victims, train and score every detector variant, write results.{json,md} and plots.

    ``data``: the image sets (default: ``config``'s files, else the demo split); ``victims_dir``: where victims
    are built or reused (default OUT/victims); ``workers``: processes for the training jobs; ``threads``: torch
    threads of this process (0 = torch's default).
    """
    from dede_rt.models.encoders import detect_format

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = data if data is not None else load_data(config, log)
    check_eval_data(config, data)
    encoders = eval_encoders(config, data, victims_dir=Path(victims_dir) if victims_dir else out / "victims",
                             progress=progress, log=log)
    sets = EvalSets.build(config, data, sorted({v.trigger_name for v in encoders if v.attack != "clean"}))
    log(f"data: {data.summary()}; test: {len(data.test)} clean + {int(sets.nontarget.sum())} triggered per trigger")
    hard = {"count": config.hard_images,
            "kinds": {k: sets.hard_kinds.count(k) for k in dict.fromkeys(sets.hard_kinds)}}
    if config.hard_images:
        log(f"hard clean images (false-alarm control): {config.hard_images} ("
            + ", ".join(f"{n} {k}" for k, n in hard["kinds"].items()) + ")")
    for v in encoders:
        status = "control" if v.attack == "clean" else ("backdoored" if v.backdoored else "FAILED attack (ASR < 0.8)")
        log(f"victim {v.name}: BA {v.ba:.3f}  ASR {v.asr:.3f}  [{status}]")
    runs = [encoder_run(config, sets, v) for v in encoders]
    decree_encoders = [v for v in encoders if detect_format(v.path) != "onnx"]
    if config.decree_steps > 0:
        for v in encoders:
            if v not in decree_encoders:
                log(f"  {v.name}: DECREE skipped (it needs gradients through the encoder; ONNX has none)")
    plan = plan_eval(config, sets=sets, runs=runs, decree_encoders=decree_encoders)
    log(f"training {sum(isinstance(j, DecoderJob) for j in plan.jobs)} DeDe decoders ({config.decoder_epochs} "
        f"epochs each) with {workers} worker(s)")
    if n_asset := sum(isinstance(j, AssetJob) for j in plan.jobs):
        log(f"ASSET (simplified): {n_asset} offset trainings")
    collected = collect(plan, execute_all(plan.jobs, workers=workers, log=log))
    results = {
        "config": config.to_dict(), "data": data.summary(), "target_class": sets.target,
        "victims": [v.to_dict() for v in encoders], "hard_images": hard, "decree": collected.decree,
        "records": collected.records,
        "seconds": round(time.perf_counter() - t_start, 1), "workers": workers,
    }
    write_report(out, results, curves=collected.curves, recon=collected.recon)
    return results

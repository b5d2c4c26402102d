"""``dede-rt eval``: victims -> test sets -> DeDe detectors and baselines -> the results table.

For every encoder (the clean control and each victim) embeddings are computed
once; each DeDe decoder is trained on cached embeddings and scores the test
set from cached embeddings too (at the test mask ratio no patch is visible,
so the score needs only the embedding; checked below, otherwise the full
scoring path runs). Per victim and trigger the detection test set is the
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
simplified ASSET (``baselines/asset.py``; it screens the ID split with
``asset_poison_rate`` of it triggered, or the poisoned ID set, against the
clean held-out split, and scores the test set).
The threshold is calibrated at ``fpr`` on clean held-out images of the
decoder's own training regime (never on test scores), and "after removal"
numbers re-measure the linear probe on what the detector lets through.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dede_rt.research.baselines import DecreeConfig, embedding_norm_scores, invert_trigger, knn_distance_scores
from dede_rt.research.baselines.asset import AssetConfig, asset_scores
from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.research.evaluation.victims import (DEFAULT_VICTIMS, EvalData, Victim, VictimConfig, VictimFile, VictimSpec,
                                        build_victims, eval_data, load_victims, make_trigger)
from dede_rt.metrics import detection_report
from dede_rt.models.decoder import DecoderConfig, DeDeDecoder, patchify_images, visible_count
from dede_rt.models.encoders import VictimEncoder
from dede_rt.research.probe import accuracy, attack_success_rate, fit_probe
from dede_rt.bundle.thresholds import threshold_at_fpr
from dede_rt.scoring import (PROTOTYPES, RELATIVE_K, TEST_MASK_RATIO, RelativeError, RelativeReference, TestMask,
                             masked_sse, prototype_indices, trimmed_sse)
from dede_rt.training import TrainConfig, compute_embeddings, split_holdout, train_decoder

EVAL_DECODER = {"dim": 128, "heads": 4, "encoder_depth": 2, "decoder_depth": 2, "patch_size": 4}


@dataclass
class EvalConfig:
    """Everything ``dede-rt eval`` varies; defaults sized for a few CPU cores."""

    victims: tuple[str, ...] = DEFAULT_VICTIMS
    victim: VictimConfig = field(default_factory=VictimConfig)
    decoder: dict = field(default_factory=lambda: dict(EVAL_DECODER))
    decoder_epochs: int = 40
    decoder_batch: int = 128
    decoder_lr: float = 1e-3
    decoder_precision: str = "fp32"  # "bf16": decoders train under bfloat16 autocast (TrainConfig.precision)
    train_mask_ratio: float = 0.9
    poison_rate: float = 0.0  # share of the ID training split carrying the row's trigger (reference: 0.1)
    trim: float = 0.25  # the patch-robust DeDe column drops this share of worst patches (0 = no such column)
    relative_k: int = RELATIVE_K  # the relative DeDe column: k best-fitting prototypes (0 = no such column)
    prototypes: int = PROTOTYPES  # clean training embeddings decoded as the relative score's prototypes
    high_norm_share: float = 0.0  # the reference's CTRL mod for every decoder (TrainConfig.high_norm_share)
    seeds: tuple[int, ...] = (21, 22, 23)
    regimes: tuple[str, ...] = ("id", "ood")
    l2_variants: tuple[bool, ...] = (False, True)
    l2_regimes: tuple[str, ...] = ("id", "ood")  # regimes in which the L2 view gets decoders (CPU budget)
    fpr: float = 0.01
    holdout_fraction: float = 0.15
    knn_k: int = 10
    decree_steps: int = 200
    asset_epochs: int = 1  # ASSET baseline epochs (the reference: 1); 0 = skip
    asset_poison_rate: float = 0.1  # ASSET screens the ID split with this share triggered (poison_rate when > 0)
    recon_examples: int = 6
    victim_files: tuple[str, ...] = ()  # "[NAME=]ATTACK:TRIGGER=PATH": the user's victims, loaded instead of built
    clean_encoder: str | None = None  # the user's clean encoder: the control row of loaded victims
    normalization: Normalization = field(default_factory=Normalization)  # encoder input (mean/std, image size)

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)

    def check(self) -> list[VictimFile]:
        """Raise UserError on an impossible combination of settings; returns the parsed victim files."""
        files = [VictimFile.parse(text) for text in self.victim_files]
        if files and not self.clean_encoder:
            raise UserError("victim files need --clean-encoder: every table has a control row, the same triggered "
                            "images scored by a clean encoder")
        if self.clean_encoder and not files:
            raise UserError("--clean-encoder is the control row of --victim-file victims; give at least one")
        clean = [Path(self.clean_encoder).expanduser()] if self.clean_encoder else []
        for path in [*(f.path for f in files), *clean]:
            if not path.is_file():
                raise UserError(f"{path}: encoder file not found")
        if not self.victims and not files:
            raise UserError("nothing to evaluate: give victims to build (--victim) and/or load (--victim-file)")
        names = [spec.name for spec in map(VictimSpec.parse, self.victims) if spec.attack != "clean"]
        names += [f.name for f in files]
        if len(set(names)) < len(names):
            raise UserError(f"victim names must be unique, got {names}; name them with NAME=ATTACK:TRIGGER=PATH")
        # TrainConfig's own checks, before any victim is built
        TrainConfig(high_norm_share=self.high_norm_share, precision=self.decoder_precision)
        if self.asset_epochs < 0 or not 0.0 < self.asset_poison_rate < 1.0:
            raise UserError(f"ASSET needs --asset-epochs >= 0 and a poison rate in (0, 1), got {self.asset_epochs} "
                            f"and {self.asset_poison_rate}")
        if not 0.0 <= self.trim < 1.0:
            raise UserError(f"--trim is the share of patches the patch-robust score drops: in [0, 1), got {self.trim}")
        if self.relative_k < 0 or self.prototypes < max(1, self.relative_k):
            raise UserError(f"the relative score needs --relative-k >= 0 (0 = off) and --prototypes >= it, got "
                            f"{self.relative_k} and {self.prototypes}")
        if not self.regimes or set(self.regimes) - {"id", "ood"}:
            raise UserError(f"regimes are id and/or ood, got {self.regimes}")
        size, patch = self.normalization.image_size, self.decoder["patch_size"]
        if size % patch or visible_count((size // patch) ** 2, TEST_MASK_RATIO) != 0:
            fits = [p for p in range(1, size + 1)
                    if size % p == 0 and visible_count((size // p) ** 2, TEST_MASK_RATIO) == 0]
            raise UserError(f"patch size {patch} does not fit image size {size}: eval needs a divisor of the image "
                            f"size that leaves no patch visible at test time (smallest: {fits[0]})")
        return files


@dataclass
class EncoderRun:
    """Cached per-encoder state: embeddings, probe predictions."""

    victim: Victim
    raw: dict[str, np.ndarray]  # set name -> raw embeddings
    predictions: dict[str, np.ndarray]  # set name -> probe predictions


def _embed_sets(encoder: VictimEncoder, normalization: Normalization, sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: compute_embeddings(encoder, normalization, images) for name, images in sets.items()}


def _l2(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def embedding_score_sets(decoder: DeDeDecoder, normalization: Normalization, images_u8: np.ndarray,
                         embeddings: np.ndarray, trim: float | None = None, relative: RelativeReference | None = None,
                         batch_size: int = 512) -> dict[str, np.ndarray]:
    """Scores by method from cached embeddings, in one decoder pass: "dede" (reference), plus "dede_trimmed"
    when ``trim`` is given and "dede_relative" when ``relative`` is (``scoring.relative_sse``).

    Valid when no patch is visible at the test mask ratio.
    """
    p = decoder.config.patch_size
    methods = ["dede", *(["dede_trimmed"] if trim is not None else []),
               *(["dede_relative"] if relative is not None else [])]
    out = {m: np.empty(len(images_u8), np.float32) for m in methods}
    # The scorer's own pieces (fixed test mask, summed error, the relative score kind), one decoder pass.
    mask = TestMask(decoder.config.num_patches, TEST_MASK_RATIO)
    relative_kind = RelativeError(relative, mask.masked) if relative is not None else None
    for start in range(0, len(images_u8), batch_size):
        x = normalization.apply(images_u8[start : start + batch_size])
        z = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + batch_size]))
        pred = decoder.decode_fixed(x, z, mask.visible_index, mask.restore_index)
        target = patchify_images(x, p)
        sums = masked_sse(pred, target, mask.masked[None])
        batch = {"dede": sums}
        if trim is not None:
            batch["dede_trimmed"] = trimmed_sse(pred, target, trim)
        if relative_kind is not None:
            batch["dede_relative"] = relative_kind(sums, target)
        for m in methods:
            out[m][start : start + len(x)] = batch[m].numpy()
    return out


@torch.no_grad()
def reconstruct(decoder: DeDeDecoder, normalization: Normalization, embeddings: np.ndarray) -> np.ndarray:
    """uint8 NHWC reconstructions from embeddings alone."""
    from dede_rt.models.decoder import unpatchify

    pred = decoder.decode_embedding(torch.from_numpy(np.ascontiguousarray(embeddings)))
    return normalization.invert(unpatchify(pred, decoder.config.patch_size))


@dataclass
class DecoderJob:
    """One DeDe decoder to train and score (picklable: runs in a worker process)."""

    encoder: str
    view: str
    regime: str
    seed: int
    decoder_config: DecoderConfig
    train: TrainConfig
    train_images: np.ndarray
    train_embeddings: np.ndarray
    eval_images: dict[str, np.ndarray]  # "hold", "test", "trig:<t>"
    eval_embeddings: dict[str, np.ndarray]
    triggers: tuple[str, ...] = ()  # the rows this decoder scores
    recon: int = 0  # reconstruct this many clean/triggered non-target test images
    normalization: Normalization = Normalization()  # the decoder's target normalization (the encoder's)
    trim: float = 0.0  # also score with the patch-robust variant dropping this share of patches (0 = not)
    relative_k: int = 0  # also score with the relative variant against this many best-fitting prototypes (0 = not)
    prototypes: int = PROTOTYPES  # ... drawn (seeded) from the decoder's own training embeddings


def poison_training_split(encoder: VictimEncoder, normalization: Normalization, images: np.ndarray,
                          embeddings: np.ndarray, train_idx: np.ndarray, rate: float, trigger, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``images``/``embeddings`` with ``rate`` of ``train_idx`` (seeded) stamped with ``trigger``."""
    pick = np.sort(np.random.default_rng(seed + 7).choice(train_idx, int(round(rate * len(train_idx))), replace=False))
    images, embeddings = images.copy(), embeddings.copy()
    images[pick] = trigger.stamp(images[pick])
    embeddings[pick] = compute_embeddings(encoder, normalization, images[pick])
    return images, embeddings


def run_decoder_job(job: DecoderJob) -> dict:
    """Train one decoder on cached embeddings and score every set of the job."""
    torch.set_num_threads(1)  # many single-threaded workers beat oversubscribed multi-threaded ones
    t0 = time.perf_counter()
    norm = job.normalization
    result = train_decoder(None, norm, job.train_images, job.decoder_config, job.train,
                           embeddings=job.train_embeddings, progress=False)
    relative = None
    if job.relative_k:  # the decoder's own training embeddings (clean unless poison_rate), never scored images
        pick = prototype_indices(len(job.train_embeddings), job.prototypes)
        relative = RelativeReference.from_embeddings(result.decoder, job.train_embeddings[pick], job.relative_k)
    by_set = {k: embedding_score_sets(result.decoder, norm, job.eval_images[k], job.eval_embeddings[k],
                                      job.trim or None, relative) for k in job.eval_images}
    scores = {m: {k: by_set[k][m] for k in by_set} for m in next(iter(by_set.values()))}
    recon = {}
    if job.recon:
        recon = {k: reconstruct(result.decoder, norm, job.eval_embeddings[k][: job.recon])
                 for k in job.eval_images if k.startswith("trig:") or k == "test_nontarget"}
    return {"scores": scores, "final_loss": result.losses[-1],
            "seconds": time.perf_counter() - t0, "recon": recon}


def _decree_job(args: tuple) -> dict:
    torch.set_num_threads(1)
    path, images, steps, seed, normalization = args
    from dede_rt.models.encoders import load_encoder

    t0 = time.perf_counter()
    backbone = load_encoder(path, "auto", normalization.image_size)[0].backbone
    res = invert_trigger(backbone, normalization, images, DecreeConfig(steps=steps, seed=seed))
    return {**res.to_dict(), "seconds": round(time.perf_counter() - t0, 1)}


def _asset_job(args: tuple) -> np.ndarray:
    torch.set_num_threads(1)
    return asset_scores(*args[3:])


def _map(fn, jobs: list, workers: int, log=None, label=None) -> list:
    """Run ``fn`` over ``jobs`` in ``workers`` processes (in-process when workers <= 1), logging completions."""
    if workers <= 1:
        out = []
        for i, job in enumerate(jobs):
            out.append(fn(job))
            if log and label:
                log(label(job, out[-1], i + 1, len(jobs)))
        return out
    import multiprocessing as mp

    results = [None] * len(jobs)
    with mp.get_context("spawn").Pool(workers) as pool:
        pending = {i: pool.apply_async(fn, (job,)) for i, job in enumerate(jobs)}
        done = 0
        for i, handle in pending.items():
            results[i] = handle.get()
            done += 1
            if log and label:
                log(label(jobs[i], results[i], done, len(jobs)))
    return results


def run_eval(out: str | Path, config: EvalConfig = EvalConfig(), victims_dir: str | Path | None = None,
             progress: bool = True, log=print, data: EvalData | None = None, workers: int = 1) -> dict:
    """Build and/or load victims, train and score every detector variant, write results.{json,md} and plots."""
    from dede_rt.research.evaluation.report import write_report
    from dede_rt.models.encoders import detect_format

    t_start = time.perf_counter()
    files = config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    normalization = config.normalization
    data = data or eval_data(normalization.image_size, seed=config.victim.seed)
    target = config.victim.target
    nontarget = data.test_labels != target
    if "ood" in config.regimes and len(data.ood_train) == 0:
        raise UserError("the ood regime needs out-of-distribution training images (--ood-data)")
    if not (data.id_train_labels == target).any():
        labels = sorted(set(data.id_train_labels.tolist()))
        raise UserError(f"target class {target} has no training images (labels: {labels[:20]})")
    if not nontarget.any():
        raise UserError(f"every test image is of the target class {target}: no non-target image to stamp")
    controls, victims = [], []
    if config.victims:
        specs = [VictimSpec.parse(v) for v in config.victims]
        clean, built = build_victims(victims_dir or out / "victims", specs, data, normalization, config.victim,
                                     progress, log)
        controls.append(clean)
        victims += built
    if files:
        clean, loaded = load_victims(files, config.clean_encoder, data, normalization, target, config.victim.seed,
                                     "clean_loaded" if controls else "clean", log)
        controls.append(clean)
        victims += loaded
    encoders = [*controls, *victims]
    if len({v.name for v in encoders}) < len(encoders):
        raise UserError(f"victim names must be unique, got {[v.name for v in encoders]}")
    triggers = sorted({v.trigger_name for v in victims})
    triggers_by_name = {t: make_trigger(t, normalization.image_size, config.victim.seed) for t in triggers}
    triggered = {t: trig.stamp(data.test[nontarget]) for t, trig in triggers_by_name.items()}
    trig_labels = data.test_labels[nontarget]
    regimes = {"id": data.id_train, "ood": data.ood_train}
    splits = {r: split_holdout(len(regimes[r]), config.holdout_fraction, 0) for r in config.regimes}
    for r in config.regimes:
        if config.relative_k > len(splits[r][0]):
            raise UserError(f"--relative-k {config.relative_k} exceeds the {len(splits[r][0])} training images of the "
                            f"{r} regime")
    log(f"data: {data.summary()}; test: {len(data.test)} clean + {int(nontarget.sum())} triggered per trigger")
    for v in encoders:
        status = "control" if v.attack == "clean" else ("backdoored" if v.backdoored else "FAILED attack (ASR < 0.8)")
        log(f"victim {v.name}: BA {v.ba:.3f}  ASR {v.asr:.3f}  [{status}]")
    dconf_base = {**config.decoder, "image_size": normalization.image_size}  # check(): no visible patch at test time

    records: list[dict] = []
    curves: dict = {}
    jobs: list[DecoderJob] = []
    asset_jobs: list[tuple] = []
    state: dict[str, dict] = {}
    for victim in encoders:
        encoder = victim.encoder(image_size=normalization.image_size)
        own = triggers if victim.attack == "clean" else [victim.trigger_name]
        sets = {"id": data.id_train, **({"ood": data.ood_train} if "ood" in config.regimes else {}), "test": data.test,
                **{f"trig:{t}": triggered[t] for t in own}}
        raw = _embed_sets(encoder, normalization, sets)
        probe = fit_probe(raw["id"], data.id_train_labels, config.victim.seed)
        pred_clean = probe.predict(raw["test"])
        pred_trig = {t: probe.predict(raw[f"trig:{t}"]) for t in own}  # the downstream classifier sees raw embeddings
        state[victim.name] = {"victim": victim, "own": own, "pred_clean": pred_clean, "pred_trig": pred_trig}
        train_sets = dict(regimes)  # decoder training images by key; "id+<t>": ID with poison_rate stamped with t
        poisoned = "id" in config.regimes and config.poison_rate > 0
        if poisoned:
            for t in own:
                train_sets[f"id+{t}"], raw[f"id+{t}"] = poison_training_split(
                    encoder, normalization, data.id_train, raw["id"], splits["id"][0], config.poison_rate,
                    triggers_by_name[t], config.victim.seed)

        def train_key(regime: str, t: str) -> str:
            """The training set a decoder of ``regime`` uses for trigger ``t`` (kNN uses it as reference too)."""
            return f"id+{t}" if regime == "id" and poisoned else regime

        labels_for = {t: np.r_[np.zeros(len(data.test)), np.ones(len(trig_labels))] for t in own}
        if config.asset_epochs and "id" in config.regimes:
            train_idx, hold_idx = splits["id"]
            for t in own:  # ASSET screens a suspect set (ID split, partly triggered) against a clean base set
                suspect, z_suspect = (train_sets[f"id+{t}"], raw[f"id+{t}"]) if poisoned else poison_training_split(
                    encoder, normalization, data.id_train, raw["id"], train_idx, config.asset_poison_rate,
                    triggers_by_name[t], config.victim.seed)
                asset_jobs.append((victim.name, victim.attack, t, suspect[train_idx], data.id_train_labels[train_idx],
                                   z_suspect[train_idx], data.id_train[hold_idx], raw["id"][hold_idx],
                                   np.r_[data.test, triggered[t]], np.r_[data.test_labels, trig_labels], normalization,
                                   AssetConfig(epochs=config.asset_epochs, seed=config.victim.seed)))
        for t in own:
            common = {"encoder": victim.name, "attack": victim.attack, "trigger": t}
            records.append({**common, "view": "raw", "method": "probe", "regime": "-", "seed": None,
                            "ba": accuracy(pred_clean, data.test_labels),
                            "asr": attack_success_rate(pred_trig[t], trig_labels, target)})
        for l2 in config.l2_variants:
            view = "l2" if l2 else "raw"
            emb = {k: (_l2(z) if l2 else z) for k, z in raw.items()}
            for t in own:
                base = {"encoder": victim.name, "attack": victim.attack, "trigger": t, "view": view}
                s = np.r_[embedding_norm_scores(emb["test"]), embedding_norm_scores(emb[f"trig:{t}"])]
                records.append({**base, "method": "embedding_norm", "regime": "-", "seed": None,
                                **detection_report(labels_for[t], s)})
                curves[(victim.name, t, view, "embedding_norm", "-")] = (labels_for[t], s)
                for regime in config.regimes:
                    ref = emb[train_key(regime, t)][splits[regime][0]]
                    s = np.r_[knn_distance_scores(emb["test"], ref, config.knn_k),
                              knn_distance_scores(emb[f"trig:{t}"], ref, config.knn_k)]
                    records.append({**base, "method": "knn", "regime": regime, "seed": None,
                                    **detection_report(labels_for[t], s)})
                    curves[(victim.name, t, view, "knn", regime)] = (labels_for[t], s)
            dconf = DecoderConfig(**{**dconf_base, "embed_dim": encoder.embed_dim})
            for regime in config.regimes:
                if l2 and regime not in config.l2_regimes:
                    continue
                train_idx, hold_idx = splits[regime]
                # a poisoned ID set differs per trigger, so the control gets one decoder per trigger there
                groups = [(t,) for t in own] if regime == "id" and poisoned else [tuple(own)]
                for group in groups:
                    key = train_key(regime, group[0])
                    for seed in config.seeds:
                        first = seed == config.seeds[0] and regime == config.regimes[0] and view == "raw"
                        eval_images = {"hold": regimes[regime][hold_idx], "test": data.test,
                                       **{f"trig:{t}": triggered[t] for t in group}}
                        eval_emb = {"hold": emb[regime][hold_idx], "test": emb["test"],
                                    **{f"trig:{t}": emb[f"trig:{t}"] for t in group}}
                        if first:
                            eval_images["test_nontarget"] = data.test[nontarget][: config.recon_examples]
                            eval_emb["test_nontarget"] = emb["test"][nontarget][: config.recon_examples]
                        jobs.append(DecoderJob(victim.name, view, regime, seed, dconf,
                                               TrainConfig(config.decoder_epochs, config.decoder_batch,
                                                           config.decoder_lr, mask_ratio=config.train_mask_ratio,
                                                           seed=seed, high_norm_share=config.high_norm_share,
                                                           precision=config.decoder_precision),
                                               train_sets[key][train_idx], emb[key][train_idx], eval_images, eval_emb,
                                               group, config.recon_examples if first else 0, normalization,
                                               config.trim, config.relative_k, config.prototypes))
    log(f"training {len(jobs)} DeDe decoders ({config.decoder_epochs} epochs each) with {workers} worker(s)")

    def label(job: DecoderJob, res: dict, done: int, total: int) -> str:
        return (f"  [{done}/{total}] {job.encoder} {job.view} {job.regime} seed {job.seed}: {res['seconds']:.0f} s, "
                f"loss {res['final_loss']:.3f}")

    outputs = _map(run_decoder_job, jobs, workers, log, label)
    recon: dict[str, dict] = {}
    for job, res in zip(jobs, outputs):
        st = state[job.encoder]
        victim = st["victim"]
        for method, sc in res["scores"].items():
            threshold = threshold_at_fpr(sc["hold"], config.fpr)
            flag_c = sc["test"] > threshold
            for t in job.triggers:
                s_trig = sc[f"trig:{t}"]
                labels = np.r_[np.zeros(len(sc["test"])), np.ones(len(s_trig))]
                scores = np.r_[sc["test"], s_trig]
                flag_t = s_trig > threshold
                pred_trig = st["pred_trig"][t]
                records.append({"encoder": victim.name, "attack": victim.attack, "trigger": t, "view": job.view,
                                "method": method, "regime": job.regime, "seed": job.seed, "threshold": threshold,
                                "final_loss": res["final_loss"], "train_seconds": round(res["seconds"], 1),
                                **detection_report(labels, scores, threshold),
                                "ba_after": accuracy(st["pred_clean"][~flag_c], data.test_labels[~flag_c]),
                                "asr_after": float(((pred_trig == target) & ~flag_t).sum() / len(s_trig)),
                                "removed_clean": float(flag_c.mean())})
                if job.seed == config.seeds[0]:
                    curves[(victim.name, t, job.view, method, job.regime)] = (labels, scores)
        if job.recon:
            k = job.recon
            recon.setdefault(victim.name, {}).update(
                {t: {"clean": data.test[nontarget][:k], "clean_rec": res["recon"]["test_nontarget"],
                     "trig": triggered[t][:k], "trig_rec": res["recon"][f"trig:{t}"][:k]} for t in job.triggers})
    decree: dict[str, dict] = {}
    if config.decree_steps > 0:
        encs = [v for v in encoders if detect_format(v.path) != "onnx"]
        for v in encoders:
            if v not in encs:
                log(f"  {v.name}: DECREE skipped (it needs gradients through the encoder; ONNX has none)")
        args = [(str(v.path), data.id_train, config.decree_steps, config.victim.seed, normalization) for v in encs]
        for v, res in zip(encs, _map(_decree_job, args, workers)):
            decree[v.name] = res
            log(f"  {v.name} DECREE (simplified): PL1-norm {res['pl1_norm']:.3f}, similarity {res['similarity']:.3f}, "
                f"{'trojaned' if res['trojaned'] else 'clean'} ({res['seconds']:.0f} s)")
    if asset_jobs:
        log(f"ASSET (simplified): {len(asset_jobs)} offset trainings")
    for job, scores in zip(asset_jobs, _map(_asset_job, asset_jobs, workers)):
        name, attack, t = job[:3]
        labels = np.r_[np.zeros(len(data.test)), np.ones(len(scores) - len(data.test))]
        records.append({"encoder": name, "attack": attack, "trigger": t, "view": "raw", "method": "asset",
                        "regime": "id", "seed": None, **detection_report(labels, scores)})
        curves[(name, t, "raw", "asset", "id")] = (labels, scores)
    results = {
        "config": config.to_dict(), "data": data.summary(), "target_class": target,
        "victims": [v.to_dict() for v in encoders], "decree": decree, "records": records,
        "seconds": round(time.perf_counter() - t_start, 1), "workers": workers,
    }
    write_report(out, results, curves, recon)
    return results

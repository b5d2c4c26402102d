"""Planning ``dede-rt eval``: the shared test sets, per-encoder embeddings, and the list of jobs to execute.

A job is a keyword-built dataclass holding everything its execution needs (arrays included), so it pickles
into a worker process; ``execute.execute(job)`` runs one, ``collect.collect(plan, results)`` turns results
into table records. Jobs are listed in the order their records appear in results.json: per encoder the probe
and embedding baselines, then the DeDe decoders, DECREE, and ASSET.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dede_rt.data.hard_images import hard_clean_set
from dede_rt.data.transforms import Normalization
from dede_rt.errors import UserError
from dede_rt.models.decoder import DecoderConfig
from dede_rt.models.encoders import VictimEncoder
from dede_rt.research.baselines.asset import AssetConfig
from dede_rt.research.evaluation.config import EvalConfig
from dede_rt.research.evaluation.victims import EvalData, Victim, make_trigger
from dede_rt.research.probe import fit_probe
from dede_rt.scoring import PROTOTYPES
from dede_rt.training import TrainConfig, compute_embeddings, split_holdout


@dataclass(kw_only=True)
class EvalSets:
    """The test material every encoder shares: clean test images, their triggered copies, regime splits."""

    data: EvalData
    target: int
    nontarget: np.ndarray  # bool mask of the test images not of the target class (the ones stamped)
    triggers: dict  # trigger name -> trigger
    triggered: dict[str, np.ndarray]  # trigger name -> the non-target test images, stamped
    regimes: dict[str, np.ndarray]  # regime -> decoder training images (clean)
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # regime -> (train, held-out) indices
    hard: np.ndarray | None = None  # hard clean images (no trigger), scored as a false-alarm control; None = off
    hard_kinds: tuple[str, ...] = ()  # the kind of each hard image (``data.hard_images.KINDS``)

    @property
    def trig_labels(self) -> np.ndarray:
        """True labels of the triggered test images."""
        return self.data.test_labels[self.nontarget]

    @classmethod
    def build(cls, config: EvalConfig, data: EvalData, trigger_names: list[str]) -> EvalSets:
        """Stamp the non-target test images with every trigger and split each regime (``check_eval_data`` first)."""
        nontarget = data.test_labels != config.victim.target
        triggers = {t: make_trigger(t, config.normalization.image_size, config.victim.seed) for t in trigger_names}
        regimes = {"id": data.id_train, "ood": data.ood_train}
        hard = hard_clean_set(config.hard_images, config.normalization.image_size, seed=config.victim.seed)
        return cls(data=data, target=config.victim.target, nontarget=nontarget, triggers=triggers,
                   triggered={t: trig.stamp(data.test[nontarget]) for t, trig in triggers.items()}, regimes=regimes,
                   splits={r: _split(config, len(regimes[r])) for r in config.regimes},
                   hard=hard.images if config.hard_images else None, hard_kinds=hard.kinds)


def _split(config: EvalConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    return split_holdout(n, config.holdout_fraction, 0)


def check_eval_data(config: EvalConfig, data: EvalData) -> None:
    """UserError when ``data`` cannot serve ``config`` (checked before any victim is built)."""
    target = config.victim.target
    if "ood" in config.regimes and len(data.ood_train) == 0:
        raise UserError("the ood regime needs out-of-distribution training images (--ood-data)")
    if not (data.id_train_labels == target).any():
        labels = sorted(set(data.id_train_labels.tolist()))
        raise UserError(f"target class {target} has no training images (labels: {labels[:20]})")
    if not (data.test_labels != target).any():
        raise UserError(f"every test image is of the target class {target}: no non-target image to stamp")
    for r in config.regimes:
        n_train = len(_split(config, len(data.id_train if r == "id" else data.ood_train))[0])
        if config.relative_k > n_train:
            raise UserError(f"--relative-k {config.relative_k} exceeds the {n_train} training images of the {r} "
                            "regime")


@dataclass(kw_only=True)
class EncoderRun:
    """One encoder's cached state: embeddings of every set, training images by key, probe predictions."""

    victim: Victim
    own: tuple[str, ...]  # the triggers whose rows this encoder has (every trigger for the control)
    embed_dim: int
    embeddings: dict[str, np.ndarray]  # raw; "id", "ood", "test", "trig:<t>", "id+<t>" (poisoned ID), "hard"
    train_images: dict[str, np.ndarray]  # decoder training images: "id", "ood", "id+<t>" (poisoned ID)
    asset_suspects: dict[str, tuple[np.ndarray, np.ndarray]]  # trigger -> (images, embeddings) ASSET screens
    pred_clean: np.ndarray  # the downstream probe's predictions on the clean test set
    pred_trig: dict[str, np.ndarray]  # ... on the triggered test images, by trigger
    poisoned: bool  # the ID training split carries the row's trigger
    _views: dict[bool, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def train_key(self, regime: str, trigger: str) -> str:
        """The training set a decoder of ``regime`` uses for ``trigger`` (kNN uses it as reference too)."""
        return f"id+{trigger}" if regime == "id" and self.poisoned else regime

    def view(self, l2: bool) -> dict[str, np.ndarray]:
        """The embeddings as the detectors see them: raw, or L2-normalized (computed once)."""
        if not l2:
            return self.embeddings
        if l2 not in self._views:
            self._views[l2] = {k: _l2(z) for k, z in self.embeddings.items()}
        return self._views[l2]


def _l2(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def poison_training_split(encoder: VictimEncoder, normalization: Normalization, images: np.ndarray, *,
                          embeddings: np.ndarray, train_idx: np.ndarray, rate: float, trigger, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``images``/``embeddings`` with ``rate`` of ``train_idx`` (seeded) stamped with ``trigger``."""
    pick = np.sort(np.random.default_rng(seed + 7).choice(train_idx, int(round(rate * len(train_idx))), replace=False))
    images, embeddings = images.copy(), embeddings.copy()
    images[pick] = trigger.stamp(images[pick])
    embeddings[pick] = compute_embeddings(encoder, normalization, images[pick])
    return images, embeddings


def encoder_run(config: EvalConfig, sets: EvalSets, victim: Victim) -> EncoderRun:
    """Embed every set with ``victim``'s encoder once, fit its probe, and build its poisoned/suspect ID sets."""
    norm, data = config.normalization, sets.data
    encoder = victim.encoder(image_size=norm.image_size)
    own = tuple(sorted(sets.triggers)) if victim.attack == "clean" else (victim.trigger_name,)
    images = {"id": data.id_train, **({"ood": data.ood_train} if "ood" in config.regimes else {}),
              "test": data.test, **{f"trig:{t}": sets.triggered[t] for t in own},
              **({"hard": sets.hard} if sets.hard is not None else {})}
    raw = {name: compute_embeddings(encoder, norm, x) for name, x in images.items()}
    probe = fit_probe(raw["id"], data.id_train_labels, seed=config.victim.seed)
    train_images = dict(sets.regimes)
    poisoned = "id" in config.regimes and config.poison_rate > 0

    def poison(t: str, rate: float) -> tuple[np.ndarray, np.ndarray]:
        return poison_training_split(encoder, norm, data.id_train, embeddings=raw["id"], train_idx=sets.splits["id"][0],
                                     rate=rate, trigger=sets.triggers[t], seed=config.victim.seed)

    if poisoned:
        for t in own:
            train_images[f"id+{t}"], raw[f"id+{t}"] = poison(t, config.poison_rate)
    suspects = {}
    if config.asset_epochs and "id" in config.regimes:  # ASSET screens the ID split, partly triggered
        suspects = {t: (train_images[f"id+{t}"], raw[f"id+{t}"]) if poisoned else poison(t, config.asset_poison_rate)
                    for t in own}
    return EncoderRun(victim=victim, own=own, embed_dim=encoder.embed_dim, embeddings=raw, train_images=train_images,
                      asset_suspects=suspects, pred_clean=probe.predict(raw["test"]),
                      pred_trig={t: probe.predict(raw[f"trig:{t}"]) for t in own}, poisoned=poisoned)


# --- jobs ---

@dataclass(kw_only=True)
class ProbeJob:
    """The downstream probe's BA and ASR of one (encoder, trigger) row."""

    encoder: str
    attack: str
    trigger: str
    pred_clean: np.ndarray
    test_labels: np.ndarray
    pred_trig: np.ndarray
    trig_labels: np.ndarray
    target: int


@dataclass(kw_only=True)
class BaselineJob:
    """An embedding-only baseline (``embedding_norm``, or ``knn`` against ``reference``) on one row."""

    encoder: str
    attack: str
    trigger: str
    view: str
    method: str
    regime: str  # "-" for the embedding norm
    clean: np.ndarray  # test embeddings
    triggered: np.ndarray
    reference: np.ndarray | None = None  # kNN's reference embeddings
    k: int = 10
    hard: np.ndarray | None = None  # embeddings of the hard clean images (the false-alarm control), if scored


@dataclass(kw_only=True)
class DecoderJob:
    """One DeDe decoder to train on cached embeddings and score with (picklable: runs in a worker process)."""

    encoder: str
    attack: str
    view: str
    regime: str
    seed: int
    triggers: tuple[str, ...]  # the rows this decoder scores
    decoder_config: DecoderConfig
    train: TrainConfig
    train_images: np.ndarray
    train_embeddings: np.ndarray
    eval_images: dict[str, np.ndarray]  # "hold", "test", "trig:<t>", "hard" (hard clean images, when on)
    # (+ "test_nontarget" for reconstructions)
    eval_embeddings: dict[str, np.ndarray]
    normalization: Normalization  # the decoder's target normalization (the encoder's)
    recon: int = 0  # reconstruct this many clean/triggered non-target test images
    trim: float = 0.0  # also score with the patch-robust variant dropping this share of patches (0 = not)
    relative_k: int = 0  # also score with the relative variant against this many best-fitting prototypes (0 = not)
    prototypes: int = PROTOTYPES  # ... drawn (seeded) from the decoder's own training embeddings


@dataclass(kw_only=True)
class DecreeJob:
    """Simplified DECREE (model-level) on one encoder file."""

    encoder: str
    path: str
    images: np.ndarray
    steps: int
    seed: int
    normalization: Normalization


@dataclass(kw_only=True)
class AssetJob:
    """Simplified ASSET on one row: screens ``suspect`` against the clean base set, scores the test set."""

    encoder: str
    attack: str
    trigger: str
    suspect_images: np.ndarray
    suspect_labels: np.ndarray
    suspect_embeddings: np.ndarray
    clean_images: np.ndarray
    clean_embeddings: np.ndarray
    test_images: np.ndarray  # the clean test images, then the triggered ones
    test_labels: np.ndarray
    clean_count: int  # how many of test_images are clean
    normalization: Normalization
    config: AssetConfig


Job = ProbeJob | BaselineJob | DecoderJob | DecreeJob | AssetJob


@dataclass(kw_only=True)
class EvalPlan:
    """The jobs of one evaluation and what collecting their results needs."""

    config: EvalConfig
    sets: EvalSets
    runs: dict[str, EncoderRun]  # by encoder name, controls first
    jobs: list[Job]


def _row_jobs(config: EvalConfig, sets: EvalSets, run: EncoderRun) -> list[Job]:
    """The probe and embedding-baseline jobs of one encoder's rows."""
    v = run.victim
    jobs: list[Job] = [ProbeJob(encoder=v.name, attack=v.attack, trigger=t, pred_clean=run.pred_clean,
                                test_labels=sets.data.test_labels, pred_trig=run.pred_trig[t],
                                trig_labels=sets.trig_labels, target=sets.target) for t in run.own]
    for l2 in config.l2_variants:
        view, emb = ("l2" if l2 else "raw"), run.view(l2)
        for t in run.own:
            row = {"encoder": v.name, "attack": v.attack, "trigger": t, "view": view, "clean": emb["test"],
                   "triggered": emb[f"trig:{t}"], "hard": emb.get("hard")}
            jobs.append(BaselineJob(**row, method="embedding_norm", regime="-"))
            jobs += [BaselineJob(**row, method="knn", regime=regime, k=config.knn_k,
                                 reference=emb[run.train_key(regime, t)][sets.splits[regime][0]])
                     for regime in config.regimes]
    return jobs


def _decoder_jobs(config: EvalConfig, sets: EvalSets, run: EncoderRun) -> list[DecoderJob]:
    """One DeDe decoder per view, regime, trigger group and seed of one encoder."""
    v, data = run.victim, sets.data
    dconf = DecoderConfig(**{**config.decoder, "image_size": config.normalization.image_size,
                             "embed_dim": run.embed_dim})  # EvalConfig checked: no visible patch at test time
    jobs = []
    for l2 in config.l2_variants:
        view, emb = ("l2" if l2 else "raw"), run.view(l2)
        for regime in config.regimes:
            if l2 and regime not in config.l2_regimes:
                continue
            train_idx, hold_idx = sets.splits[regime]
            # a poisoned ID set differs per trigger, so the control gets one decoder per trigger there
            groups = [(t,) for t in run.own] if regime == "id" and run.poisoned else [run.own]
            for group in groups:
                key = run.train_key(regime, group[0])
                for seed in config.seeds:
                    first = seed == config.seeds[0] and regime == config.regimes[0] and view == "raw"
                    eval_images = {"hold": sets.regimes[regime][hold_idx], "test": data.test,
                                   **{f"trig:{t}": sets.triggered[t] for t in group}}
                    eval_emb = {"hold": emb[regime][hold_idx], "test": emb["test"],
                                **{f"trig:{t}": emb[f"trig:{t}"] for t in group}}
                    if sets.hard is not None:  # the same decoder scores the hard clean images: false alarms
                        eval_images["hard"], eval_emb["hard"] = sets.hard, emb["hard"]
                    if first:
                        eval_images["test_nontarget"] = data.test[sets.nontarget][: config.recon_examples]
                        eval_emb["test_nontarget"] = emb["test"][sets.nontarget][: config.recon_examples]
                    train = TrainConfig(epochs=config.decoder_epochs, batch_size=config.decoder_batch,
                                        lr=config.decoder_lr, mask_ratio=config.train_mask_ratio, seed=seed,
                                        high_norm_share=config.high_norm_share, precision=config.decoder_precision,
                                        lr_schedule=config.decoder_lr_schedule)
                    jobs.append(DecoderJob(
                        encoder=v.name, attack=v.attack, view=view, regime=regime, seed=seed, triggers=group,
                        decoder_config=dconf, train=train, train_images=run.train_images[key][train_idx],
                        train_embeddings=emb[key][train_idx], eval_images=eval_images, eval_embeddings=eval_emb,
                        normalization=config.normalization, recon=config.recon_examples if first else 0,
                        trim=config.trim, relative_k=config.relative_k, prototypes=config.prototypes))
    return jobs


def _asset_jobs(config: EvalConfig, sets: EvalSets, run: EncoderRun) -> list[AssetJob]:
    """One ASSET screening per row of one encoder (none when ASSET is off or the id regime is not run)."""
    data = sets.data
    if not run.asset_suspects:
        return []
    train_idx, hold_idx = sets.splits["id"]
    return [AssetJob(encoder=run.victim.name, attack=run.victim.attack, trigger=t,
                     suspect_images=suspect[train_idx], suspect_labels=data.id_train_labels[train_idx],
                     suspect_embeddings=z_suspect[train_idx], clean_images=data.id_train[hold_idx],
                     clean_embeddings=run.embeddings["id"][hold_idx],
                     test_images=np.r_[data.test, sets.triggered[t]],
                     test_labels=np.r_[data.test_labels, sets.trig_labels], clean_count=len(data.test),
                     normalization=config.normalization,
                     config=AssetConfig(epochs=config.asset_epochs, seed=config.victim.seed))
            for t, (suspect, z_suspect) in run.asset_suspects.items()]


def plan_eval(config: EvalConfig, *, sets: EvalSets, runs: list[EncoderRun],
              decree_encoders: list[Victim] | None = None) -> EvalPlan:
    """Every job of the evaluation, in results order; ``decree_encoders``: those DECREE can run on (default all)."""
    rows = [job for run in runs for job in _row_jobs(config, sets, run)]
    decoders = [job for run in runs for job in _decoder_jobs(config, sets, run)]
    decree_encoders = [r.victim for r in runs] if decree_encoders is None else decree_encoders
    decree = [DecreeJob(encoder=v.name, path=str(v.path), images=sets.data.id_train, steps=config.decree_steps,
                        seed=config.victim.seed, normalization=config.normalization)
              for v in decree_encoders] if config.decree_steps > 0 else []
    asset = [job for run in runs for job in _asset_jobs(config, sets, run)]
    return EvalPlan(config=config, sets=sets, runs={r.victim.name: r for r in runs},
                    jobs=[*rows, *decoders, *decree, *asset])

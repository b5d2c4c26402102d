"""Executing ``dede-rt eval`` jobs: ``execute(job) -> JobResult``, and all of a plan's jobs across workers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dede_rt.research.baselines import DecreeConfig, embedding_norm_scores, invert_trigger, knn_distance_scores
from dede_rt.research.baselines.asset import asset_scores
from dede_rt.research.evaluation.plan import AssetJob, BaselineJob, DecoderJob, DecreeJob, Job, ProbeJob
from dede_rt.research.evaluation.scores import decoder_scores, reconstruct
from dede_rt.research.probe import accuracy, attack_success_rate
from dede_rt.training import train_decoder

HEAVY = (DecoderJob, DecreeJob, AssetJob)  # jobs that train something: worker processes, one torch thread each


@dataclass(kw_only=True)
class JobResult:
    """What one job produced; which fields are set depends on the job's kind."""

    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> set -> scores
    final_loss: float | None = None  # decoder jobs: the last epoch's training loss
    seconds: float = 0.0
    recon: dict[str, np.ndarray] = field(default_factory=dict)  # set -> uint8 reconstructions (decoder jobs)
    details: dict = field(default_factory=dict)  # probe: ba/asr; DECREE: its result


def _probe(job: ProbeJob) -> JobResult:
    return JobResult(details={"ba": accuracy(job.pred_clean, job.test_labels),
                              "asr": attack_success_rate(job.pred_trig, job.trig_labels, job.target)})


def _baseline(job: BaselineJob) -> JobResult:
    if job.method == "embedding_norm":
        score = embedding_norm_scores
    else:
        def score(z: np.ndarray) -> np.ndarray:
            return knn_distance_scores(z, job.reference, job.k)
    sets = {"test": score(job.clean), f"trig:{job.trigger}": score(job.triggered)}
    if job.hard is not None:  # the hard clean images: how suspicious clean-but-hard images look to the baseline
        sets["hard"] = score(job.hard)
    return JobResult(scores={job.method: sets})


def _decoder(job: DecoderJob) -> JobResult:
    t0 = time.perf_counter()
    norm = job.normalization
    trained = train_decoder(None, norm, job.train_images, job.decoder_config, job.train,
                            embeddings=job.train_embeddings, progress=False)
    scores = decoder_scores(trained.decoder, norm, images=job.eval_images, embeddings=job.eval_embeddings,
                            train_embeddings=job.train_embeddings, trim=job.trim, relative_k=job.relative_k,
                            prototypes=job.prototypes)
    recon = {}
    if job.recon:
        recon = {k: reconstruct(trained.decoder, norm, job.eval_embeddings[k][: job.recon])
                 for k in job.eval_images if k.startswith("trig:") or k == "test_nontarget"}
    return JobResult(scores=scores, final_loss=trained.losses[-1], seconds=time.perf_counter() - t0, recon=recon)


def _decree(job: DecreeJob) -> JobResult:
    from dede_rt.models.encoders import load_encoder

    t0 = time.perf_counter()
    backbone = load_encoder(job.path, "auto", job.normalization.image_size)[0].backbone
    res = invert_trigger(backbone, job.normalization, job.images, config=DecreeConfig(steps=job.steps, seed=job.seed))
    seconds = round(time.perf_counter() - t0, 1)
    return JobResult(seconds=seconds, details={**res.to_dict(), "seconds": seconds})


def _asset(job: AssetJob) -> JobResult:
    t0 = time.perf_counter()
    s = asset_scores(job.suspect_images, job.suspect_labels, job.suspect_embeddings, clean_u8=job.clean_images,
                     clean_embeddings=job.clean_embeddings, test_u8=job.test_images, test_labels=job.test_labels,
                     normalization=job.normalization, config=job.config)
    return JobResult(scores={"asset": {"test": s[: job.clean_count], f"trig:{job.trigger}": s[job.clean_count :]}},
                     seconds=time.perf_counter() - t0)


_RUNNERS: dict[type, Callable[..., JobResult]] = {ProbeJob: _probe, BaselineJob: _baseline, DecoderJob: _decoder,
                                                  DecreeJob: _decree, AssetJob: _asset}


def execute(job: Job) -> JobResult:
    """Run one job (in this process)."""
    if isinstance(job, HEAVY):
        torch.set_num_threads(1)  # many single-threaded workers beat oversubscribed multi-threaded ones
    return _RUNNERS[type(job)](job)


def describe(job: Job, result: JobResult, done: int, total: int) -> str | None:
    """The progress line of a finished job (``done`` of ``total`` of its kind), or None for quiet kinds."""
    if isinstance(job, DecoderJob):
        return (f"  [{done}/{total}] {job.encoder} {job.view} {job.regime} seed {job.seed}: {result.seconds:.0f} s, "
                f"loss {result.final_loss:.3f}")
    if isinstance(job, DecreeJob):
        d = result.details
        return (f"  {job.encoder} DECREE (simplified): PL1-norm {d['pl1_norm']:.3f}, similarity "
                f"{d['similarity']:.3f}, {'trojaned' if d['trojaned'] else 'clean'} ({d['seconds']:.0f} s)")
    return None


def execute_all(jobs: list[Job], *, workers: int = 1, log: Callable[[str], None] | None = None) -> list[JobResult]:
    """Results of ``jobs`` in their order: heavy jobs in ``workers`` spawned processes (in-process when <= 1)."""
    totals: dict[type, int] = {}
    for job in jobs:
        totals[type(job)] = totals.get(type(job), 0) + 1
    done: dict[type, int] = {}

    def finished(job: Job, result: JobResult) -> JobResult:
        done[type(job)] = done.get(type(job), 0) + 1
        if log is not None and (line := describe(job, result, done[type(job)], totals[type(job)])):
            log(line)
        return result

    if workers <= 1:
        return [finished(job, execute(job)) for job in jobs]
    import multiprocessing as mp

    results: list[JobResult | None] = [None] * len(jobs)
    with mp.get_context("spawn").Pool(workers) as pool:
        pending = {i: pool.apply_async(execute, (job,)) for i, job in enumerate(jobs) if isinstance(job, HEAVY)}
        for i, job in enumerate(jobs):  # the cheap ones while the workers train
            if i not in pending:
                results[i] = finished(job, execute(job))
        for i, handle in pending.items():
            results[i] = finished(jobs[i], handle.get())
    return results

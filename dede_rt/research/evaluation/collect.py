"""Collecting ``dede-rt eval`` results: thresholds, detection metrics and downstream numbers per table row."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score

from dede_rt.bundle.thresholds import threshold_at_fpr
from dede_rt.metrics import detection_report
from dede_rt.research.evaluation.execute import JobResult
from dede_rt.research.evaluation.plan import AssetJob, BaselineJob, DecoderJob, DecreeJob, EvalPlan, ProbeJob
from dede_rt.research.probe import accuracy


@dataclass(kw_only=True)
class Collected:
    """The table's records plus what the plots need."""

    records: list[dict] = field(default_factory=list)
    curves: dict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # row key -> (labels, scores)
    recon: dict[str, dict] = field(default_factory=dict)  # encoder -> trigger -> image strips
    decree: dict[str, dict] = field(default_factory=dict)  # encoder -> DECREE result


def _labelled(scores: dict[str, np.ndarray], trigger: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores): the clean test scores (0), then the triggered ones (1)."""
    clean, trig = scores["test"], scores[f"trig:{trigger}"]
    return np.r_[np.zeros(len(clean)), np.ones(len(trig))], np.r_[clean, trig]


def hard_report(scores: dict[str, np.ndarray], threshold: float | None = None,
                kinds: tuple[str, ...] = ()) -> dict:
    """The hard-clean-image control of one row: ``hard_auroc`` (hard images as positives vs the clean test images),
    and with a calibrated ``threshold`` ``hard_fpr`` (share of hard images above it) and ``hard_fpr_by_kind``.

    Empty when the row scored no hard images. 0.5 = hard images look no more triggered than ordinary clean ones.
    """
    hard = scores.get("hard")
    if hard is None or len(hard) == 0:
        return {}
    clean = scores["test"]
    report: dict = {"hard_auroc": float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(hard))],
                                                      np.r_[clean, hard].astype(np.float64)))}
    if threshold is not None:
        flagged = hard > threshold  # the eval's own rule (flag: score > threshold), as for the test set
        report["hard_fpr"] = float(flagged.mean())
        if len(kinds) == len(hard):
            names = np.asarray(kinds)
            report["hard_fpr_by_kind"] = {k: float(flagged[names == k].mean()) for k in dict.fromkeys(kinds)}
    return report


def _decoder_records(plan: EvalPlan, job: DecoderJob, res: JobResult, out: Collected) -> None:
    """Per method: the threshold at the FPR on held-out clean images, then each row's detection and downstream."""
    run, sets = plan.runs[job.encoder], plan.sets
    test_labels = sets.data.test_labels
    for method, sc in res.scores.items():
        threshold = threshold_at_fpr(sc["hold"], plan.config.fpr)
        flag_c = sc["test"] > threshold
        for t in job.triggers:
            labels, scores = _labelled(sc, t)
            flag_t = sc[f"trig:{t}"] > threshold
            pred_trig = run.pred_trig[t]
            out.records.append({
                "encoder": job.encoder, "attack": job.attack, "trigger": t, "view": job.view, "method": method,
                "regime": job.regime, "seed": job.seed, "threshold": threshold, "final_loss": res.final_loss,
                "train_seconds": round(res.seconds, 1), **detection_report(labels, scores, threshold),
                "ba_after": accuracy(run.pred_clean[~flag_c], test_labels[~flag_c]),
                "asr_after": float(((pred_trig == sets.target) & ~flag_t).sum() / len(flag_t)),
                "removed_clean": float(flag_c.mean()), **hard_report(sc, threshold, sets.hard_kinds)})
            if job.seed == plan.config.seeds[0]:
                out.curves[(job.encoder, t, job.view, method, job.regime)] = (labels, scores)
    if job.recon:
        k, clean = job.recon, sets.data.test[sets.nontarget]
        out.recon.setdefault(job.encoder, {}).update(
            {t: {"clean": clean[:k], "clean_rec": res.recon["test_nontarget"], "trig": sets.triggered[t][:k],
                 "trig_rec": res.recon[f"trig:{t}"][:k]} for t in job.triggers})


def collect(plan: EvalPlan, results: list[JobResult]) -> Collected:
    """Table records (in job order), ROC curves, reconstructions and DECREE results of an executed plan."""
    out = Collected()
    for job, res in zip(plan.jobs, results, strict=True):
        if isinstance(job, ProbeJob):
            out.records.append({"encoder": job.encoder, "attack": job.attack, "trigger": job.trigger, "view": "raw",
                                "method": "probe", "regime": "-", "seed": None, **res.details})
        elif isinstance(job, (BaselineJob, AssetJob)):
            method, view, regime = ((job.method, job.view, job.regime) if isinstance(job, BaselineJob)
                                    else ("asset", "raw", "id"))
            labels, scores = _labelled(res.scores[method], job.trigger)
            out.records.append({"encoder": job.encoder, "attack": job.attack, "trigger": job.trigger, "view": view,
                                "method": method, "regime": regime, "seed": None,
                                **detection_report(labels, scores), **hard_report(res.scores[method])})
            out.curves[(job.encoder, job.trigger, view, method, regime)] = (labels, scores)
        elif isinstance(job, DecoderJob):
            _decoder_records(plan, job, res, out)
        elif isinstance(job, DecreeJob):
            out.decree[job.encoder] = res.details
    return out

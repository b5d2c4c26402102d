"""Writing ``dede-rt eval`` results: the paper-shaped table (Markdown + JSON), ROC/histogram PNGs, reconstructions."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

ATTACK_NAMES = {"clean": "control: clean encoder", "badencoder": "BadEncoder", "drupe": "DRUPE", "ctrl": "CTRL"}
TRIGGER_NAMES = {"white_square": "white square", "blend": "noise blend", "faint_blend": "faint noise blend (0.1)",
                 "logo_blend": "logo blend", "ctrl": "frequency"}
METHOD_COLUMNS = (("dede", "id", "DeDe (ID)"), ("dede_trimmed", "id", "DeDe trimmed (ID)"),
                  ("dede_relative", "id", "DeDe relative (ID)"), ("dede_combined", "id", "DeDe combined (ID)"),
                  ("dede", "ood", "DeDe (OOD)"),
                  ("dede_relative", "ood", "DeDe relative (OOD)"),
                  ("embedding_norm", "-", "Emb. norm"), ("asset", "id", "ASSET (simplified)"),
                  ("knn", "id", "kNN dist. (ID ref)"), ("knn", "ood", "kNN dist. (OOD ref)"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate(records: list[dict]) -> list[dict]:
    """Mean/std over seeds for each (encoder, trigger, view, method, regime)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["encoder"], r["attack"], r["trigger"], r["view"], r["method"], r["regime"])].append(r)
    rows = []
    for (encoder, attack, trigger, view, method, regime), rs in groups.items():
        row = {"encoder": encoder, "attack": attack, "trigger": trigger, "view": view, "method": method,
               "regime": regime, "n": len(rs)}
        for key in ("auroc", "auprc", "tpr_at_fpr_0.01", "tpr_at_threshold", "fpr_at_threshold", "ba_after",
                    "asr_after", "ba", "asr", "hard_auroc", "hard_fpr"):
            if key in rs[0]:
                row[key], row[key + "_std"] = _mean_std([r[key] for r in rs])
        rows.append(row)
    return rows


def _victim_label(encoder: str, attack: str, trigger: str) -> str:
    """Table name of an encoder: the attack's name, plus the encoder's own name when it is not the derived one."""
    derived = "clean" if attack == "clean" else f"{attack}_{trigger}"
    return ATTACK_NAMES.get(attack, attack) + ("" if encoder == derived else f" ({encoder})")


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    auroc = f"{row['auroc']:.3f}" + (f"±{row['auroc_std']:.3f}" if row["n"] > 1 else "")
    return f"{auroc} / {row['auprc']:.3f} / {row['tpr_at_fpr_0.01']:.2f}"


def _hard_cell(row: dict | None) -> str:
    """'hard AUROC (±std) / FPR at the calibrated threshold' of one row; '–' where not scored."""
    if row is None or "hard_auroc" not in row:
        return "–"
    auroc = f"{row['hard_auroc']:.3f}" + (f"±{row['hard_auroc_std']:.3f}" if row["n"] > 1 else "")
    return auroc + (f" / {row['hard_fpr']:.3f}" if "hard_fpr" in row else " / –")


def hard_table(results: dict, rows: list[dict]) -> list[str]:
    """Markdown lines of the hard-clean-image control (no lines when the run scored no hard images)."""
    index = {(r["encoder"], r["trigger"], r["view"], r["method"], r["regime"]): r for r in rows if "hard_auroc" in r}
    if not index:
        return []
    columns = [c for c in METHOD_COLUMNS if any(k[3:] == c[:2] for k in index)]
    info = results.get("hard_images") or {}
    kinds = ", ".join(f"{n} {k}" for k, n in info.get("kinds", {}).items())
    fpr = results["config"]["fpr"]
    lines = ["", "### False alarms: hard clean images (hard AUROC / FPR at the calibrated threshold)", "",
             f"{info.get('count', '?')} clean images that are hard to reconstruct and carry no trigger ({kinds}; "
             "`dede_rt/data/hard_images.py`), scored by each row's own detectors. Hard AUROC = hard images "
             "(positives) against the clean test images (negatives): 0.5 = no more suspicious than ordinary clean "
             f"images (target <= 0.65). FPR = share of hard images above the threshold calibrated at {fpr:g} FPR on "
             "clean held-out images (DeDe columns; the embedding baselines have no calibrated threshold, ASSET "
             "needs class labels and is not scored).", "",
             "| victim | trigger | embeddings | " + " | ".join(c[2] for c in columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    for encoder, attack, trigger, view in _row_order(rows):
        cells = [_hard_cell(index.get((encoder, trigger, view, m, g))) for m, g, _ in columns]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {_victim_label(encoder, attack, trigger)} | {TRIGGER_NAMES.get(trigger, trigger)} | {view} | "
                     + " | ".join(cells) + " |")
    return lines


KIND_METHODS = (("dede", "summed"), ("dede_relative", "relative"), ("dede_combined", "combined"))  # eval column, kind
AUROC_TOLERANCE = 0.02  # the rule: a kind may lose at most this much AUROC on any victim against the best kind


def score_choice(rows: list[dict], regime: str = "id") -> dict:
    """Which score kind the rule picks from aggregated rows: per kind and victim (encoder, trigger, view) the AUROC,
    the TPR at the calibrated threshold and both margins over the clean-encoder control of the same trigger/view.

    The rule: the highest mean TPR margin over the control (what a user gains at the threshold they deploy), among
    the kinds that are within ``AUROC_TOLERANCE`` of the best kind's AUROC on every victim (among all kinds when
    none is: the tolerance then only says that every kind loses somewhere). Failed attacks
    (ASR < 0.8) are not victims here. Empty when the run has no control or fewer than two kinds.
    """
    index = {(r["encoder"], r["trigger"], r["view"], r["method"]): r for r in rows if r["regime"] == regime}
    probes = {(r["encoder"], r["trigger"]): r for r in rows if r["method"] == "probe"}
    kinds = [(m, k) for m, k in KIND_METHODS if any(key[3] == m for key in index)]
    controls = {(key[1], key[2]): key[0] for key, r in index.items() if r["attack"] == "clean"}
    victims = sorted({key[:3] for key, r in index.items() if r["attack"] != "clean" and (key[1], key[2]) in controls
                      and probes.get(key[:2], {}).get("asr", 1.0) >= 0.8 and key[3] in dict(kinds)})
    if len(kinds) < 2 or not victims:
        return {}
    table: dict[str, list[dict]] = {k: [] for _, k in kinds}
    for enc, trig, view in victims:
        control = controls[(trig, view)]
        for m, k in kinds:
            v, c = index.get((enc, trig, view, m)), index.get((control, trig, view, m))
            if v is None or c is None:
                continue
            table[k].append({"encoder": enc, "trigger": trig, "view": view, "auroc": v["auroc"],
                             "auroc_std": v.get("auroc_std", 0.0), "tpr": v["tpr_at_threshold"],
                             "control_auroc": c["auroc"], "control_tpr": c["tpr_at_threshold"],
                             "auroc_margin": v["auroc"] - c["auroc"], "tpr_margin": v["tpr_at_threshold"] - c["tpr_at_threshold"],
                             "hard_auroc": v.get("hard_auroc"), "hard_fpr": v.get("hard_fpr")})
    best = {key: max(e["auroc"] for k in table for e in table[k] if (e["encoder"], e["trigger"], e["view"]) == key)
            for key in victims}
    summary = {}
    for k, entries in table.items():
        worst = max(best[(e["encoder"], e["trigger"], e["view"])] - e["auroc"] for e in entries)
        summary[k] = {"mean_tpr_margin": float(np.mean([e["tpr_margin"] for e in entries])),
                      "mean_auroc_margin": float(np.mean([e["auroc_margin"] for e in entries])),
                      "worst_auroc_shortfall": float(worst), "eligible": bool(worst <= AUROC_TOLERANCE),
                      "victims": len(entries)}
    eligible = [k for k in summary if summary[k]["eligible"]] or list(summary)
    chosen = max(eligible, key=lambda k: summary[k]["mean_tpr_margin"])
    return {"rule": f"highest mean TPR margin over the control at the calibrated threshold, among kinds within "
                    f"{AUROC_TOLERANCE} AUROC of the best kind on every victim (among all kinds when none is)",
            "chosen": chosen,
            "summary": summary, "table": table}


def score_choice_table(results: dict, rows: list[dict]) -> list[str]:
    """Markdown lines comparing the score kinds victim by victim, and the rule's choice (none without a control)."""
    choice = score_choice(rows)
    if not choice:
        if any(r["method"] == "dede_relative" for r in rows):
            return ["", "Score kinds: no working victim (ASR >= 0.8) with a clean-encoder control in this run, so no "
                    "kind is chosen."]
        return []
    kinds = list(choice["table"])
    fpr = results["config"]["fpr"]
    lines = ["", f"### Score kinds (ID decoders): AUROC / TPR at the calibrated {fpr:g}-FPR threshold / TPR margin "
             "over the clean-encoder control", "",
             "Same decoders for every kind. summed = the paper's error; relative = minus the best-fitting clean "
             "prototypes' error; combined = z(summed) + z(relative), each z-scored on the clean held-out split. "
             f"Rule: {choice['rule']}.", "",
             "| victim | trigger | embeddings | " + " | ".join(kinds) + " |", "|" + "---|" * (3 + len(kinds))]
    by_victim: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for k, entries in choice["table"].items():
        for e in entries:
            by_victim[(e["encoder"], e["trigger"], e["view"])][k] = e
    attacks = {r["encoder"]: r["attack"] for r in rows}
    for (enc, trig, view), per in by_victim.items():
        cells = [f"{e['auroc']:.3f}±{e['auroc_std']:.3f} / {e['tpr']:.2f} / {e['tpr_margin']:+.2f}"
                 if (e := per.get(k)) else "–" for k in kinds]
        lines.append(f"| {_victim_label(enc, attacks[enc], trig)} | {TRIGGER_NAMES.get(trig, trig)} | {view} | "
                     + " | ".join(cells) + " |")
    controls: dict[tuple, dict[str, dict]] = {}  # every victim entry carries its control's numbers: take the first
    for (_, trig, view), per in by_victim.items():
        controls.setdefault((trig, view), per)
    for (trig, view), per in controls.items():
        cells = [f"{e['control_auroc']:.3f} / {e['control_tpr']:.2f} / –" if (e := per.get(k)) else "–" for k in kinds]
        lines.append(f"| control: clean encoder | {TRIGGER_NAMES.get(trig, trig)} | {view} | " + " | ".join(cells) + " |")
    lines.append("| **mean TPR margin / worst AUROC shortfall** | | | " + " | ".join(
        f"{choice['summary'][k]['mean_tpr_margin']:+.3f} / {choice['summary'][k]['worst_auroc_shortfall']:.3f}"
        for k in kinds) + " |")
    lines += ["", f"Chosen by the rule: **{choice['chosen']}**."]
    return lines


def _row_order(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    keys = sorted({(r["encoder"], r["attack"], r["trigger"], r["view"]) for r in rows if r["method"] != "probe"},
                  key=lambda k: (k[1] == "clean", k[0], k[2], k[3] != "raw"))
    return keys


def _id_caption(cfg: dict, train_set: str) -> str:
    rate, share = cfg.get("poison_rate", 0.0), cfg.get("high_norm_share", 0.0)
    mod = (f" The reference's CTRL mod is on: in every decoder's training set the {share:.0%} of images with the "
           "largest embedding norm are trained toward a constant image." if share else "")
    if not rate:
        return f"ID = decoder (and kNN's reference set) trained on {train_set}, clean;{mod}"
    return (f"ID = decoder trained on {train_set} with {rate:.0%} of it carrying the row's trigger, as the reference "
            f"trains on the suspect data (kNN uses the same reference set); thresholds from clean held-out images;{mod}")


def _precision_caption(cfg: dict) -> str:
    """' (bf16 training)' when decoders trained under bfloat16 autocast; empty for the fp32 reference."""
    precision = cfg.get("decoder_precision", "fp32")
    return "" if precision == "fp32" else f" ({precision} training)"


def _optional_columns_caption(cfg: dict) -> str:
    """What the DeDe-trimmed, DeDe-relative and ASSET columns are, for the runs that have them."""
    text = ""
    if cfg.get("trim"):
        text += (f"DeDe trimmed = the same decoders scored without the worst {cfg['trim']:.0%} of patches per image "
                 "(patch-robust variant; the reference sums all patches). ")
    if cfg.get("relative_k"):
        text += (f"DeDe relative = the same decoders' score minus the mean error of the {cfg['relative_k']} best-"
                 f"fitting of {cfg['prototypes']} reconstructions of clean training embeddings (how much better the "
                 "image's own embedding redraws it than generic clean embeddings). ")
    if cfg.get("asset_epochs"):
        rate = cfg.get("poison_rate") or cfg["asset_poison_rate"]
        text += (f"ASSET (simplified, `research/baselines/asset.py`): offset-trained classifier's cross-entropy, "
                 f"{cfg['asset_epochs']} epoch(s) on the ID split with {rate:.0%} of it triggered, clean base set = "
                 "the held-out split. ")
    return text


def markdown_table(results: dict) -> str:
    """The results as Markdown: detection table (rows attacks, columns methods) and downstream BA/ASR table."""
    rows = aggregate(results["records"])
    index = {(r["encoder"], r["trigger"], r["view"], r["method"], r["regime"]): r for r in rows}
    cfg = results["config"]
    sources = results["data"].get("sources")
    regimes = f"{_id_caption(cfg, 'the digit train split')} OOD = trained on clean photo crops only."
    if sources:  # the user's data
        train_set = f"the training set ({sources['train']})"
        regimes = (f"{_id_caption(cfg, train_set)} "
                   + (f"OOD = trained on {sources['ood']}." if "ood" in sources else "no OOD set."))
    lines = ["### Detection: AUROC (mean±std over decoder seeds) / AUPRC / TPR at 1% FPR", "",
             f"Test set per row: {results['data']['test']} clean test images + the non-target-class ones with the "
             f"trigger (target class {results['target_class']}). DeDe: {len(cfg['seeds'])} decoder seeds, "
             f"{cfg['decoder_epochs']} epochs{_precision_caption(cfg)}, decoder {cfg['decoder']}. {regimes} `l2` = same "
             f"encoder, embeddings L2-normalized. {_optional_columns_caption(cfg)}DECREE (simplified, "
             "model-level): normalized L1 of the smallest inverted trigger, one number per encoder (< 0.1 = trojaned).",
             "", "| victim | trigger | embeddings | ASR | " + " | ".join(c[2] for c in METHOD_COLUMNS) + " | DECREE PL1 |",
             "|" + "---|" * (5 + len(METHOD_COLUMNS))]
    victims = {v["name"]: v for v in results["victims"]}
    for encoder, attack, trigger, view in _row_order(rows):
        probe = index.get((encoder, trigger, "raw", "probe", "-"))
        asr = f"{probe['asr']:.2f}" if probe else "–"
        if attack != "clean" and probe and probe["asr"] < 0.8:
            asr += " (failed attack)"
        name = _victim_label(encoder, attack, trigger)
        d = results["decree"].get(encoder)
        decree = f"{d['pl1_norm']:.3f} ({'trojaned' if d['trojaned'] else 'clean'})" if d and view == "raw" else ""
        cells = [_cell(index.get((encoder, trigger, view, m, g))) for m, g, _ in METHOD_COLUMNS]
        lines.append(f"| {name} | {TRIGGER_NAMES.get(trigger, trigger)} | {view} | {asr} | " + " | ".join(cells)
                     + f" | {decree} |")
    lines += score_choice_table(results, rows)
    lines += hard_table(results, rows)
    lines += ["", f"### Downstream: linear probe BA/ASR before and after removing flagged samples (DeDe, raw "
              f"embeddings, threshold at {cfg['fpr']:g} FPR calibrated on clean held-out data of the regime)", "",
              "ASR after = triggered test images that are NOT flagged and still classified as the target, over all "
              "triggered test images; BA after = probe accuracy on the clean test images that are not flagged.", "",
              "| victim | trigger | BA | ASR | status | ID: TPR / FPR | ID: BA / ASR after | OOD: TPR / FPR | "
              "OOD: BA / ASR after |", "|---|---|---|---|---|---|---|---|---|"]
    for encoder, attack, trigger, view in _row_order(rows):
        if view != "raw":
            continue
        probe = index.get((encoder, trigger, "raw", "probe", "-"))
        if probe is None:
            continue
        status = "control" if attack == "clean" else ("backdoored" if probe["asr"] >= 0.8 else "**failed attack**")
        cells = []
        for regime in ("id", "ood"):
            r = index.get((encoder, trigger, "raw", "dede", regime))
            if r is None:
                cells += ["–", "–"]
            else:
                cells += [f"{r['tpr_at_threshold']:.2f} / {r['fpr_at_threshold']:.3f}",
                          f"{r['ba_after']:.3f} / {r['asr_after']:.3f}"]
        lines.append(f"| {_victim_label(encoder, attack, trigger)} | {TRIGGER_NAMES.get(trigger, trigger)} | "
                     f"{probe['ba']:.3f} | {probe['asr']:.3f} | {status} | " + " | ".join(cells) + " |")
    lines += ["", "Victims: " + "; ".join(f"{v['name']} (BA {v['ba']:.3f}, ASR {v['asr']:.3f}, "
                                           + (f"loaded from {v['path']})" if v.get("loaded") else
                                              f"built in {v['build_seconds']:.0f} s)") for v in victims.values()),
              f"Total eval time: {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def histogram_key(curves: dict, encoder: str, trigger: str) -> tuple | None:
    """The curve a score histogram shows: raw DeDe of the ID decoders, else of the OOD ones (an OOD-only run)."""
    for regime in ("id", "ood"):
        if (key := (encoder, trigger, "raw", "dede", regime)) in curves:
            return key
    return None


def _plots(out: Path, curves: dict, recon: dict, controls: tuple[str, ...] = ("clean",)) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    written = []
    panels = sorted({(e, t) for (e, t, v, m, g) in curves if e not in controls})
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
        for ax, (enc, trig) in zip(axes[0], panels):
            for key, style, label in (((enc, trig, "raw", "dede", "id"), "-", "DeDe ID"),
                                      ((enc, trig, "l2", "dede", "id"), "--", "DeDe ID, L2"),
                                      ((enc, trig, "raw", "dede_trimmed", "id"), "-", "DeDe trimmed ID"),
                                      ((enc, trig, "raw", "dede_relative", "id"), "-", "DeDe relative ID"),
                                      ((enc, trig, "raw", "dede", "ood"), "-.", "DeDe OOD"),
                                      ((enc, trig, "raw", "dede_relative", "ood"), "-.", "DeDe relative OOD"),
                                      *(((c, trig, "raw", "dede", "id"), ":", "control (clean enc.)"
                                         + ("" if c == "clean" else f" {c}")) for c in controls),
                                      *(((c, trig, "raw", "dede_trimmed", "id"), ":", "control, trimmed"
                                         + ("" if c == "clean" else f" {c}")) for c in controls),
                                      *(((c, trig, "raw", "dede_relative", "id"), ":", "control, relative"
                                         + ("" if c == "clean" else f" {c}")) for c in controls),
                                      ((enc, trig, "raw", "embedding_norm", "-"), "-", "emb. norm"),
                                      ((enc, trig, "raw", "knn", "id"), "-", "kNN"),
                                      ((enc, trig, "raw", "knn", "ood"), "-.", "kNN, OOD ref")):
                if key in curves:
                    fpr, tpr, _ = roc_curve(*curves[key])
                    ax.plot(fpr, tpr, style, lw=1.2, label=label)
            ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
            ax.set_title(f"{enc}", fontsize=8)
            ax.set_xlabel("FPR", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel("TPR", fontsize=8)
        axes[0][0].legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=80)
        plt.close(fig)
        written.append("roc.png")
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
        for ax, (enc, trig) in zip(axes[0], panels):
            key = histogram_key(curves, enc, trig)
            if key is None:
                continue
            labels, scores = curves[key]
            bins = np.histogram_bin_edges(np.log10(scores + 1e-6), 40)
            ax.hist(np.log10(scores[labels == 0] + 1e-6), bins, alpha=0.6, label="clean")
            ax.hist(np.log10(scores[labels == 1] + 1e-6), bins, alpha=0.6, label="triggered")
            ax.set_title(enc, fontsize=8)
            ax.set_xlabel(f"log10 DeDe score ({key[4].upper()}, raw)", fontsize=7)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "histograms.png", dpi=80)
        plt.close(fig)
        written.append("histograms.png")
    if recon:
        from PIL import Image

        rows = []
        for enc in sorted(recon):
            for trig, r in sorted(recon[enc].items()):
                strip = np.concatenate([np.concatenate(list(r[k]), axis=1) for k in ("clean", "clean_rec", "trig", "trig_rec")], axis=0)
                rows.append((f"{enc} / {trig}", strip))
        gap = 4
        width = max(s.shape[1] for _, s in rows)
        canvas = np.full((sum(s.shape[0] + gap for _, s in rows), width * 2 + gap, 3), 255, np.uint8)
        y = 0
        for _, strip in rows:  # each block: rows = clean, its reconstruction, triggered, its reconstruction
            h = strip.shape[0] // 4
            left = np.concatenate([strip[:h], strip[h : 2 * h]], axis=0)
            right = np.concatenate([strip[2 * h : 3 * h], strip[3 * h :]], axis=0)
            canvas[y : y + 2 * h, : left.shape[1]] = left
            canvas[y : y + 2 * h, width + gap : width + gap + right.shape[1]] = right
            y += 2 * h + gap
        canvas = canvas[:y]
        Image.fromarray(canvas).save(  # 1x: keeps the PNG well under 300 KB
            out / "reconstructions.png", optimize=True)
        (out / "reconstructions.txt").write_text(
            "Each block (top to bottom): " + ", ".join(name for name, _ in rows) + ".\nLeft: clean test images (row 1) "
            "and their reconstructions from the embedding alone (row 2); right: the same images with the trigger and "
            "their reconstructions. Decoder: ID regime, raw embeddings, first seed.\n")
        written.append("reconstructions.png")
    return written


def write_report(out: str | Path, results: dict, *, curves: dict, recon: dict) -> dict[str, Path]:
    """Write results.json, results.md and the PNGs into ``out``; returns the paths."""
    out = Path(out)
    results["summary"] = aggregate(results["records"])
    results["score_choice"] = score_choice(results["summary"])
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    controls = tuple(v["name"] for v in results["victims"] if v["attack"] == "clean")
    written = _plots(out, curves, recon, controls)
    return {"json": out / "results.json", "markdown": out / "results.md", **{p: out / p for p in written}}

"""Mixed precision for INT8 graphs that fail their labelled gate: leave the encoder layers that cost most float.

Why: a trigger drives the victim's activations where clean images never go, so clean calibration ranges
round exactly what separates triggered from clean. With the relative score (a difference of two errors: its
clean spread is ~10x narrower than the summed error's) that rounding costs the demo victim's INT8 graph ~0.02
AUROC, spread over many encoder layers, and no global calibration setting wins it back
(``benchmarks/int8_sensitivity.py``: MinMax/Entropy/Percentile, headroom 1-16). Clean images alone cannot
say which layers matter (their score deviations did not rank the costly layers), so the search needs the
labelled triggered examples a ``--triggered`` gate has.

The search, on data the gate does not judge on:
1. selection set = the clean images that set the INT8 ranges + half of the triggered examples; the gate
   keeps the other half with its own held-out clean images;
2. each encoder layer's cost = the selection AUROC lost when only that layer is INT8 (one quantization per
   layer; seconds each on CIFAR-sized encoders);
3. leave the 1, 2, ... ``max_float`` most costly layers float, the rest INT8 as usual, until the gate passes;
4. keep it only if ONNX Runtime on this machine runs it faster than FP32 (Q/DQ transitions between float and
   INT8 layers cost: on the demo detector, graphs with 1-4 float layers ran 0.9-1.45x FP32 across three runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dede_rt.calibration.gate import GateTolerance, auroc_drop_bound, quality_gate
from dede_rt.calibration.quantize import QUANTIZED_OPS, encoder_weight_nodes, quantize_int8
from dede_rt.metrics import detection_report

Scores = Callable[[Path, np.ndarray], np.ndarray]  # (graph path, images) -> scores
MAX_LAYERS = 32  # one quantization per layer: seconds each at 32 px, minutes at 224 px (a ResNet-50 has 53)
MIN_TRIGGERED = 20  # both halves need triggered examples enough to measure an AUROC


@dataclass
class MixedResult:
    """What the search found: the float layers (empty: none passed), its gate, and what it tried."""

    float_layers: list[str]
    gate: dict | None
    layer_cost: dict[str, float] = field(default_factory=dict)
    tries: list[dict] = field(default_factory=list)
    images_per_second: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None  # why no search ran

    @property
    def found(self) -> bool:
        """Whether a mixed graph passed the gate and runs faster than FP32."""
        return bool(self.float_layers) and self.gate is not None and self.gate["passed"]

    def to_dict(self) -> dict:
        """Plain-JSON form (the conversion record of the manifest)."""
        return {"float_layers": self.float_layers, "found": self.found, "layer_auroc_cost": self.layer_cost,
                "tries": self.tries, "images_per_second": self.images_per_second, "seconds": round(self.seconds, 1),
                "skipped": self.skipped}


def split_triggered(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, gate) indices of ``n`` triggered examples: alternate ones, so both halves see every source."""
    idx = np.arange(n)
    return idx[0::2], idx[1::2]


def _auroc(clean: np.ndarray, triggered: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(clean), int), np.ones(len(triggered), int)]
    return detection_report(labels, np.r_[clean, triggered], float(np.quantile(clean, 0.99)))["auroc"]


def images_per_second(paths: dict[str, Path], images: np.ndarray, seconds: float = 0.5, rounds: int = 3,
                      threads: int = 0) -> dict:
    """ORT CPU throughput of each graph on one batch of ``images``, timed round-robin, best round (0 threads: ORT's)."""
    from contextlib import ExitStack

    from dede_rt.bench import Timing, measure  # dede-rt bench's own timing loop
    from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner

    best = dict.fromkeys(paths, 0.0)
    with ExitStack() as stack:
        runners = {name: stack.enter_context(OnnxRuntimeRunner(path, images.shape[1], threads=threads,
                                                               providers=["CPUExecutionProvider"]))
                   for name, path in paths.items()}
        for _ in range(rounds):
            for name, runner in runners.items():
                timing = Timing()
                measure(runner, images, len(images), seconds, timing)
                best[name] = max(best[name], timing.images / sum(timing.latencies))
    return {k: round(v, 1) for k, v in best.items()}


def search_mixed(fp32_path: Path, out_path: Path, ranges: np.ndarray, held: np.ndarray, triggered: np.ndarray,
                 scores: Scores, *, method: str = "minmax", headroom: float, max_float: int | None = None,
                 tol: GateTolerance = GateTolerance(), fpr: float = 0.01, require_faster: bool = True,
                 project_weight: np.ndarray | None = None, max_layers: int = MAX_LAYERS,
                 confidence: float = 0.9) -> MixedResult:
    """Find the fewest float encoder layers with which the INT8 graph passes the labelled gate (see the module doc).

    ``ranges``: the clean images that set the INT8 ranges (part of the selection set); ``held``: the gate's
    clean held-out images; ``triggered``: the labelled triggered examples (split in halves). Writes the graph
    that passed to ``out_path``. ``max_float``: at most this many float layers (default: half the encoder's).
    ``fpr``: the gate's thresholds (FP32's and the mixed graph's, each on the held-out clean scores).
    ``require_faster``: keep a passing graph only if it outruns FP32 here (False: keep it regardless; tests).
    ``project_weight``: the decoder's projection weight (finds the embedding in TorchScript-exported graphs).
    ``confidence``: a try passes only if its gate passes and the bootstrap upper ``confidence`` bound of its
    AUROC drop (``gate.auroc_drop_bound``) is within ``tol.auroc_drop`` too (0: the measured drop alone).
    No search (``skipped`` says why) for encoders of more than ``max_layers`` layers or fewer than
    ``MIN_TRIGGERED`` triggered examples.
    """
    from dede_rt.bundle.thresholds import threshold_at_fpr

    t0 = time.perf_counter()
    model = onnx.load(str(fp32_path))
    layers = encoder_weight_nodes(model, project_weight)
    quantizable = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    max_float = max(1, len(layers) // 2) if max_float is None else max_float
    if len(layers) > max_layers:
        return MixedResult([], None, skipped=f"{len(layers)} encoder layers > {max_layers}: one quantization each "
                                             "would take too long")
    if len(triggered) < MIN_TRIGGERED:
        return MixedResult([], None, skipped=f"{len(triggered)} triggered examples < {MIN_TRIGGERED}")
    sel_idx, gate_idx = split_triggered(len(triggered))
    sel_clean, sel_trig = ranges, triggered[sel_idx]
    ref_sel = _auroc(scores(fp32_path, sel_clean), scores(fp32_path, sel_trig))
    gate_images = np.concatenate([held, triggered[gate_idx]])
    labels = np.r_[np.zeros(len(held), int), np.ones(len(gate_idx), int)]
    ref_val = scores(fp32_path, gate_images)
    ref_threshold = threshold_at_fpr(ref_val[: len(held)], fpr)
    trial = out_path.with_name(out_path.stem + ".trial.onnx")
    result = MixedResult([], None)

    def quantize(keep_float: tuple[str, ...]) -> None:
        quantize_int8(fp32_path, trial, ranges, method, headroom=headroom, keep_float=keep_float)

    for layer in layers:  # its cost: only this layer INT8, everything else float
        quantize(tuple(n for n in quantizable if n != layer))
        result.layer_cost[layer] = ref_sel - _auroc(scores(trial, sel_clean), scores(trial, sel_trig))
    ranked = sorted(layers, key=lambda n: -result.layer_cost[n])
    for k in range(1, min(max_float, len(layers)) + 1):
        quantize(tuple(ranked[:k]))
        got_val = scores(trial, gate_images)
        got_clean = got_val[: len(held)]
        gate = quality_gate(ref_val[: len(held)], got_clean, ref_threshold, threshold_at_fpr(got_clean, fpr),
                            labels, ref_val, got_val, tol)
        if confidence:  # the k-th try on the same set: its measured drop is a selected one (see the bound's doc)
            bound = auroc_drop_bound(labels, ref_val, got_val, confidence)
            gate.update(auroc_drop_bound=bound, bound_confidence=confidence,
                        passed=gate["passed"] and bound <= tol.auroc_drop,
                        summary=f"{gate['summary']}, AUROC drop <= {bound:.4f} at {confidence:.0%}")
        result.tries.append({"float_layers": k, "passed": gate["passed"], "summary": gate["summary"]})
        if gate["passed"]:
            result.images_per_second = images_per_second({"fp32": fp32_path, "mixed": trial}, held[:32])
            if not require_faster or result.images_per_second["mixed"] > result.images_per_second["fp32"]:
                result.float_layers, result.gate = ranked[:k], gate
                trial.replace(out_path)
            break  # the fewest float layers that pass: kept if faster than FP32, else INT8 is refused
    trial.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - t0
    return result

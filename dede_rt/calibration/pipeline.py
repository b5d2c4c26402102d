"""`dede-rt calibrate`: INT8/FP16 variants of a bundle, their quality gates and per-precision thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dede_rt.calibration.gate import GateTolerance, quality_gate
from dede_rt.calibration.sets import split_calibration
from dede_rt.engines.comparator import run_batched
from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner
from dede_rt.errors import UserError
from dede_rt.bundle import Gate, PrecisionEntry, edit_manifest, fpr_key, read_manifest
from dede_rt.bundle.thresholds import thresholds_by_fpr
from dede_rt.engines.loaders import ensure_graph
from dede_rt.models.encoders import sha256_file
from dede_rt.optional import require_onnx_export

LOWER_PRECISIONS = ("int8", "fp16")
MIN_HELDOUT = 100


def _scores(path: Path, size: int, precision: str, images: np.ndarray) -> np.ndarray:
    with OnnxRuntimeRunner(path, size, precision, providers=["CPUExecutionProvider"]) as runner:
        return run_batched(runner, images, 128)


def _project_weight(bundle: Path) -> np.ndarray:
    """The decoder's projection weight, by which the embedding is found in any exported graph."""
    from safetensors.numpy import load_file

    from dede_rt.bundle.manifest import DECODER_WEIGHTS

    return load_file(str(bundle / DECODER_WEIGHTS))["project.weight"]


def _ort_scores(size: int):
    """(graph, images) -> ORT CPU scores, for the mixed-precision search (graph precision by its own Q/DQ)."""
    return lambda path, images: _scores(path, size, "int8", images)


def calibrate_detector(bundle: str | Path, clean: np.ndarray, labels: np.ndarray | None = None, *,
                       triggered: np.ndarray | None = None, count: int = 256, seed: int = 0,
                       precisions: tuple[str, ...] = LOWER_PRECISIONS, method: str = "minmax",
                       tol: GateTolerance = GateTolerance(), warn=print, headroom: float | None = None,
                       mixed: bool = True) -> dict:
    """Build each precision from ``BUNDLE/onnx/detector.onnx``, gate it against FP32 and record it in the manifest.

    ``clean``: clean uint8 images (``labels``: their source/class, for stratified
    selection); ``count`` of them calibrate INT8 ranges, the rest are the
    held-out set for the gate and the re-calibrated thresholds. ``triggered``
    (optional) makes the gate a labelled one: held-out clean = 0, triggered = 1; when INT8 fails it and
    ``mixed`` (default), ``calibration.mixed.search_mixed`` leaves its costliest encoder layers float until it
    passes (on half of the triggered images, the other half choosing the layers).
    """
    # A one-line error without the ONNX stack (the base install), before quantize imports onnx.
    require_onnx_export("calibrate_detector")
    from dede_rt.calibration.mixed import search_mixed
    from dede_rt.calibration.quantize import DEFAULT_HEADROOM, convert_fp16, quantize_int8

    headroom = DEFAULT_HEADROOM if headroom is None else headroom
    bundle = Path(bundle)
    unknown = set(precisions) - set(LOWER_PRECISIONS)
    if unknown:
        raise UserError(f"unknown precision(s) {sorted(unknown)}; calibrate makes {', '.join(LOWER_PRECISIONS)}")
    manifest = read_manifest(bundle)
    size = manifest.image_size
    if clean.ndim != 4 or clean.shape[1:] != (size, size, 3):
        raise UserError(f"calibration images must be [N, {size}, {size}, 3], got {list(clean.shape)}")
    fp32_path = ensure_graph(bundle, "detector")
    calib_idx, held_idx = split_calibration(len(clean), count, seed, labels)
    if len(held_idx) < MIN_HELDOUT:
        warn(f"warning: only {len(held_idx)} held-out clean images for the gate and thresholds; "
             f"give more than {count + MIN_HELDOUT} clean images")
    held = clean[held_idx]
    fprs = tuple(sorted(float(f) for f in manifest.thresholds.by_fpr)) or (0.01,)
    default_fpr = manifest.thresholds.default_fpr
    key = fpr_key(default_fpr)
    ref_clean = _scores(fp32_path, size, "fp32", held)
    ref_thresholds = thresholds_by_fpr(ref_clean, fprs)
    val_labels = ref_val = None
    if triggered is not None and len(triggered):
        val_labels = np.r_[np.zeros(len(held), int), np.ones(len(triggered), int)]
        ref_val = np.r_[ref_clean, _scores(fp32_path, size, "fp32", triggered)]
    with edit_manifest(bundle) as m:
        m.deployment.precisions["fp32"].details["thresholds_heldout"] = ref_thresholds
    results = {}
    for precision in precisions:
        out_path = bundle / "onnx" / f"detector_{precision}.onnx"
        if precision == "int8":
            conversion = quantize_int8(fp32_path, out_path, clean[calib_idx], method, headroom=headroom)
            conversion["calibration_seed"] = seed
            conversion["stratified"] = labels is not None
        else:
            conversion = convert_fp16(fp32_path, out_path)
        got_clean = _scores(out_path, size, precision, held)
        thresholds = thresholds_by_fpr(got_clean, fprs)
        got_val = None
        if val_labels is not None:
            got_val = np.r_[got_clean, _scores(out_path, size, precision, triggered)]
        gate = quality_gate(ref_clean, got_clean, ref_thresholds[key], thresholds[key], val_labels, ref_val, got_val, tol)
        if precision == "int8" and not gate["passed"] and mixed and val_labels is not None:
            warn(f"int8 failed its quality gate ({gate['summary']}); searching for encoder layers to keep float")
            found = search_mixed(fp32_path, out_path, clean[calib_idx], held, triggered, _ort_scores(size),
                                 method=method, headroom=headroom, tol=tol, fpr=default_fpr,
                                 project_weight=_project_weight(bundle))
            conversion["mixed_precision"] = found.to_dict()
            if found.skipped:
                warn(f"no mixed-precision search: {found.skipped}")
            if found.found:  # the search's gate: held-out clean + the triggered half it did not choose layers on
                gate = found.gate
                conversion["keep_float"] = found.float_layers
                thresholds = thresholds_by_fpr(_scores(out_path, size, precision, held), fprs)
                warn(f"int8 with {len(found.float_layers)} encoder layer(s) float: {gate['summary']}")
        entry = PrecisionEntry(f"onnx/{out_path.name}", Gate.from_dict(gate), thresholds,
                               {"sha256": sha256_file(out_path), "conversion": conversion,
                                "threshold_fpr": default_fpr, "heldout_images": int(len(held_idx))})
        with edit_manifest(bundle) as m:
            m.deployment.precisions[precision] = entry
        results[precision] = entry.to_dict()
    return results


def calibrate_paths(bundle: str | Path, data: str | Path, *, triggered: str | Path | None = None, count: int = 256,
                    seed: int = 0, precisions: tuple[str, ...] = LOWER_PRECISIONS, method: str = "minmax",
                    max_images: int | None = None, tol: GateTolerance = GateTolerance(), warn=print,
                    headroom: float | None = None, mixed: bool = True) -> dict:
    """``calibrate_detector`` on images read from disk (clean ``data``, optional ``triggered`` for a labelled gate)."""
    from dede_rt.calibration.sets import load_clean_images

    size = read_manifest(bundle).pixels  # the bundle's own resize rule, as training decoded its images
    clean = load_clean_images(data, size, max_images, seed)
    trig = load_clean_images(triggered, size, max_images, seed).images if triggered else None
    return calibrate_detector(bundle, clean.images, clean.labels, triggered=trig, count=count, seed=seed,
                              precisions=precisions, method=method, tol=tol, warn=warn, headroom=headroom,
                              mixed=mixed)

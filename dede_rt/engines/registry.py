"""Pick and build a runner for a detector bundle: ``make_runner(dir, backend, precision)``.

``backend="auto"`` takes the fastest *usable* variant recorded in the bundle's
``deployment`` manifest section: a precision is usable only when its quality
gate passed (fp32 is the reference and always passes), its file exists and its
backend is importable here (TensorRT also needs a GPU and an engine built for
it). "Fastest" means the highest throughput `dede-rt bench` recorded on this
kind of device; without measurements a fixed preference order is used
(TensorRT > torch CUDA > ORT INT8 > ORT FP16 on a GPU EP > ORT FP32 > torch CPU).
Nothing usable: torch, the reference. ``auto`` never exports or builds anything;
an explicit ``backend="onnxruntime"`` exports the FP32 graph on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dede_rt.bundle.manifest import DeploymentRecord, read_clean_scores, read_manifest, stale_exports
from dede_rt.bundle.thresholds import Thresholds
from dede_rt.engines.base import BaseRunner
from dede_rt.errors import UserError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class RunnerChoice:
    """Which backend/precision/device serves a detector, and why."""

    backend: str
    precision: str
    device: str
    model_path: str | None
    reason: str

    def describe(self) -> str:
        """One line for logs and CLI output."""
        where = f" ({Path(self.model_path).name})" if self.model_path else ""
        return f"{self.backend} {self.precision} on {self.device}{where}: {self.reason}"


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def device_kind() -> str:
    """Key under which benchmark throughputs are recorded: 'cuda:<gpu name>' or 'cpu'."""
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def _ort_has_gpu() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


def _tensorrt_usable() -> tuple[bool, str]:
    from dede_rt.engines.tensorrt_runner import tensorrt_status

    return tensorrt_status()


def _candidates(bundle: Path, dep: DeploymentRecord) -> list[RunnerChoice]:
    """Every variant that could serve this bundle here, with the reason it qualifies."""
    cuda = cuda_available()
    out = [RunnerChoice("torch", "fp32", "cuda" if cuda else "cpu", None, "reference PyTorch modules")]
    ort_device = "cuda" if _ort_has_gpu() else "cpu"
    from dede_rt.optional import has_module

    # A base install (no cpu/gpu extra) has no ONNX Runtime: auto falls back to torch instead of failing.
    precisions = dep.precisions if has_module("onnxruntime") else {}
    for precision, entry in precisions.items():
        path = bundle / entry.path
        if precision != "fp32" and not entry.gate.passed:
            continue
        # A clean-only gate sees score ranks, not detection: on the demo victim INT8 kept
        # Spearman 0.99 yet lost a third of its TPR at the threshold. auto takes INT8 only
        # after a labelled gate (calibrate --triggered); it stays available explicitly.
        if precision == "int8" and entry.gate.mode != "labelled":
            continue
        if entry.path and path.is_file():
            summary = entry.gate.summary
            why = "reference export" if precision == "fp32" else \
                "passed its quality gate" + (f" ({summary})" if summary else "")
            out.append(RunnerChoice("onnxruntime", precision, ort_device, str(path), why))
    if dep.tensorrt and cuda:
        ok, _ = _tensorrt_usable()
        if ok:
            from dede_rt.engines.tensorrt_runner import engine_compatible

            for precision, entry in dep.tensorrt.items():
                path = bundle / entry.path
                passed = entry.gate.passed or (precision == "fp32" and entry.gate.mode == "unknown")
                if entry.path and path.is_file() and passed and engine_compatible(entry.engine_manifest)[0]:
                    out.append(RunnerChoice("tensorrt", precision, "cuda", str(path), "engine built for this GPU"))
    return out


_STATIC_ORDER = [("tensorrt", "int8"), ("tensorrt", "fp16"), ("tensorrt", "fp32"), ("torch-cuda", "fp32"),
                 ("onnxruntime-cuda", "fp16"), ("onnxruntime", "int8"), ("onnxruntime-cuda", "fp32"),
                 ("onnxruntime", "fp32"), ("torch", "fp32")]


def _static_rank(c: RunnerChoice) -> int:
    key = (f"{c.backend}-cuda" if c.device == "cuda" and c.backend != "tensorrt" else c.backend, c.precision)
    return _STATIC_ORDER.index(key) if key in _STATIC_ORDER else len(_STATIC_ORDER)


def choose_runner(bundle: str | Path, backend: str = "auto", precision: str | None = None,
                  device: str | None = None) -> RunnerChoice:
    """Resolve ``backend``/``precision`` for ``bundle`` without loading anything heavy."""
    bundle = Path(bundle)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    manifest = read_manifest(bundle)
    dep, stale = manifest.deployment, stale_exports(bundle, manifest)
    if backend == "torch":
        if precision not in (None, "fp32"):
            raise UserError("the torch backend runs fp32 only; use --backend onnxruntime or tensorrt for fp16/int8")
        dev = device or ("cuda" if cuda_available() else "cpu")
        return RunnerChoice("torch", "fp32", dev, None, "requested")
    if backend in ("onnxruntime", "tensorrt") and stale:
        raise UserError(f"{bundle}: {stale}")
    if backend == "onnxruntime":
        precision = precision or "fp32"
        entry = dep.precisions.get(precision)
        if precision != "fp32" and entry is None:
            raise UserError(f"{bundle}: no {precision} ONNX model; run `dede-rt calibrate {bundle}` first")
        path = bundle / entry.path if entry else bundle / "onnx" / "detector.onnx"
        note = "" if precision == "fp32" or entry.gate.passed else " (WARNING: failed its quality gate)"
        return RunnerChoice("onnxruntime", precision, "cuda" if _ort_has_gpu() else "cpu", str(path), "requested" + note)
    if backend == "tensorrt":
        ok, why = _tensorrt_usable()
        if not ok:
            raise UserError(why)
        precision = precision or "fp16"
        entry = dep.tensorrt.get(precision)
        if entry is None:
            raise UserError(f"{bundle}: no {precision} TensorRT engine; run `dede-rt build-engine {bundle} --precision {precision}`")
        return RunnerChoice("tensorrt", precision, "cuda", str(bundle / entry.path), "requested")
    # auto: stale exports are never used (torch still serves the bundle)
    candidates = [c for c in _candidates(bundle, DeploymentRecord() if stale else dep) if precision in (None, c.precision)]
    if not candidates:
        raise UserError(f"{bundle}: no usable {precision} variant; run `dede-rt calibrate` (or pick --precision fp32)")
    measured = dep.benchmarks
    kind = device_kind()

    def throughput(c: RunnerChoice) -> float | None:
        row = measured.get(f"{c.backend}:{c.precision}")
        return row["throughput"] if row and row.get("device") == kind else None

    timed = [c for c in candidates if throughput(c) is not None]
    if len(timed) == len(candidates) and len(timed) > 1:
        best = max(timed, key=throughput)
        return RunnerChoice(best.backend, best.precision, best.device, best.model_path,
                            f"auto: fastest measured here ({throughput(best):.0f} img/s); {best.reason}")
    best = min(candidates, key=_static_rank)
    return RunnerChoice(best.backend, best.precision, best.device, best.model_path,
                        f"auto: preferred of {len(candidates)} usable variant(s); {best.reason}")


@dataclass
class Deployment:
    """What serves a bundle here: the choice and why, its (not yet activated) runner, and its thresholds.

    A context manager like the runner it holds: ``with make_runner(bundle) as d: d.infer(batch)``.
    """

    choice: RunnerChoice
    runner: BaseRunner
    thresholds: Thresholds
    batch_size_hint: int | None = None

    @property
    def backend(self) -> str:
        """The backend that scores."""
        return self.choice.backend

    @property
    def precision(self) -> str:
        """The precision that scores (declared by the runner)."""
        return self.runner.precision

    @property
    def device(self) -> str:
        """Where it scores ('cpu', 'cuda')."""
        return self.runner.device

    @property
    def image_size(self) -> int:
        """The square input size the runner takes."""
        return self.runner.image_size

    def describe(self) -> str:
        """One line: backend, precision, device, why."""
        return self.choice.describe()

    def infer(self, images_u8: np.ndarray) -> np.ndarray:
        """Scores for one uint8 NHWC batch (the runner must be active)."""
        return self.runner.infer(images_u8)

    def activate(self) -> None:
        """Activate the runner (load the model)."""
        self.runner.activate()

    def deactivate(self) -> None:
        """Release the runner."""
        self.runner.deactivate()

    def __enter__(self) -> Deployment:
        self.runner.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.deactivate()


def make_runner(bundle: str | Path, backend: str = "auto", precision: str | None = None, *,
                batch_size: int | None = None, device: str | None = None, threads: int = 0,
                score_kernel: str = "torch") -> Deployment:
    """Choose and build (not activate) what serves ``bundle``: ``Deployment`` with runner, choice and thresholds.

    ``score_kernel`` ("torch", "reference", "triton") is the torch backend's mask-and-score tail; asking for a
    fused kernel picks the torch backend under ``auto``.
    """
    bundle = Path(bundle)
    if score_kernel != "torch" and backend == "auto":
        backend = "torch"
    if score_kernel != "torch" and backend != "torch":
        raise UserError(f"--score-kernel {score_kernel} runs on the torch backend; TensorRT engines carry their "
                        "fused tail from `dede-rt build-engine --score-tail plugin`")
    choice = choose_runner(bundle, backend, precision, device)
    manifest = read_manifest(bundle)
    if choice.backend == "torch":
        from dede_rt.engines.torch_runner import TorchRunner

        runner: BaseRunner = TorchRunner(bundle, choice.device, score_kernel)
    elif choice.backend == "onnxruntime":
        from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner

        path = Path(choice.model_path)
        if choice.precision == "fp32":
            from dede_rt.engines.loaders import ensure_graph

            path = ensure_graph(bundle, "detector")  # lazily build what was asked for explicitly
        runner = OnnxRuntimeRunner(path, manifest.image_size, choice.precision, threads=threads)
    else:
        from dede_rt.engines.tensorrt_runner import TensorRTRunner

        runner = TensorRTRunner(choice.model_path, manifest.image_size, choice.precision, batch_size=batch_size)
    thresholds = manifest.thresholds_for(choice.backend, choice.precision, read_clean_scores(bundle))
    return Deployment(choice, runner, thresholds, batch_size)


def describe_choice(bundle: str | Path, backend: str = "auto", precision: str | None = None) -> str:
    """One line saying which backend/precision would serve the bundle and why."""
    return choose_runner(bundle, backend, precision).describe()

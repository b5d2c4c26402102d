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

from dede_rt.engines.base import BaseRunner
from dede_rt.errors import UserError
from dede_rt.export.bundle import deployment, stale_exports

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


def _candidates(bundle: Path, dep: dict) -> list[RunnerChoice]:
    """Every variant that could serve this bundle here, with the reason it qualifies."""
    cuda = cuda_available()
    out = [RunnerChoice("torch", "fp32", "cuda" if cuda else "cpu", None, "reference PyTorch modules")]
    ort_device = "cuda" if _ort_has_gpu() else "cpu"
    for precision, entry in dep.get("precisions", {}).items():
        path = bundle / entry.get("path", "")
        gate = entry.get("gate", {})
        if precision != "fp32" and not gate.get("passed", False):
            continue
        # A clean-only gate sees score ranks, not detection: on the demo victim INT8 kept
        # Spearman 0.99 yet lost a third of its TPR at the threshold. auto takes INT8 only
        # after a labelled gate (calibrate --triggered); it stays available explicitly.
        if precision == "int8" and gate.get("mode") != "labelled":
            continue
        if path.is_file():
            summary = gate.get("summary")
            why = "reference export" if precision == "fp32" else \
                "passed its quality gate" + (f" ({summary})" if summary else "")
            out.append(RunnerChoice("onnxruntime", precision, ort_device, str(path), why))
    engines = dep.get("tensorrt", {})
    if engines and cuda:
        ok, _ = _tensorrt_usable()
        if ok:
            from dede_rt.engines.tensorrt_runner import engine_compatible

            for precision, entry in engines.items():
                path = bundle / entry.get("path", "")
                if path.is_file() and entry.get("gate", {}).get("passed", precision == "fp32") \
                        and engine_compatible(entry.get("manifest", {}))[0]:
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
    dep = deployment(bundle)
    stale = stale_exports(bundle)
    if backend == "torch":
        if precision not in (None, "fp32"):
            raise UserError("the torch backend runs fp32 only; use --backend onnxruntime or tensorrt for fp16/int8")
        dev = device or ("cuda" if cuda_available() else "cpu")
        return RunnerChoice("torch", "fp32", dev, None, "requested")
    if backend in ("onnxruntime", "tensorrt") and stale:
        raise UserError(f"{bundle}: {stale}")
    if backend == "onnxruntime":
        precision = precision or "fp32"
        entry = dep.get("precisions", {}).get(precision)
        if precision != "fp32" and entry is None:
            raise UserError(f"{bundle}: no {precision} ONNX model; run `dede-rt calibrate {bundle}` first")
        path = bundle / entry["path"] if entry else bundle / "onnx" / "detector.onnx"
        note = "" if precision == "fp32" or entry.get("gate", {}).get("passed") else " (WARNING: failed its quality gate)"
        return RunnerChoice("onnxruntime", precision, "cuda" if _ort_has_gpu() else "cpu", str(path), "requested" + note)
    if backend == "tensorrt":
        ok, why = _tensorrt_usable()
        if not ok:
            raise UserError(why)
        precision = precision or "fp16"
        entry = dep.get("tensorrt", {}).get(precision)
        if entry is None:
            raise UserError(f"{bundle}: no {precision} TensorRT engine; run `dede-rt build-engine {bundle} --precision {precision}`")
        return RunnerChoice("tensorrt", precision, "cuda", str(bundle / entry["path"]), "requested")
    # auto: stale exports are never used (torch still serves the bundle)
    candidates = [c for c in _candidates(bundle, {} if stale else dep) if precision in (None, c.precision)]
    if not candidates:
        raise UserError(f"{bundle}: no usable {precision} variant; run `dede-rt calibrate` (or pick --precision fp32)")
    measured = dep.get("benchmarks", {})
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


def make_runner(bundle: str | Path, backend: str = "auto", precision: str | None = None,
                batch_size: int | None = None, device: str | None = None, threads: int = 0) -> BaseRunner:
    """A (not yet activated) runner for ``bundle``; ``runner.choice`` records what was picked and why."""
    bundle = Path(bundle)
    choice = choose_runner(bundle, backend, precision, device)
    if choice.backend == "torch":
        from dede_rt.engines.torch_runner import TorchRunner

        runner: BaseRunner = TorchRunner(bundle, choice.device)
    else:
        from dede_rt.export.bundle import read_manifest

        size = int(read_manifest(bundle)["normalization"]["image_size"])
        if choice.backend == "onnxruntime":
            from dede_rt.engines.onnxruntime_runner import OnnxRuntimeRunner

            if choice.precision == "fp32" and not Path(choice.model_path).is_file():
                from dede_rt.export import export_detector

                export_detector(bundle, graphs=("detector",))  # lazily build what was asked for explicitly
            runner = OnnxRuntimeRunner(choice.model_path, size, choice.precision, threads=threads)
        else:
            from dede_rt.engines.tensorrt_runner import TensorRTRunner

            runner = TensorRTRunner(choice.model_path, size, choice.precision, batch_size=batch_size)
    runner.choice = choice  # type: ignore[attr-defined]
    runner.batch_size_hint = batch_size  # type: ignore[attr-defined]
    runner.thresholds = thresholds_for(bundle, choice)  # type: ignore[attr-defined]
    return runner


def thresholds_for(bundle: str | Path, choice: RunnerChoice) -> dict[str, float]:
    """Flagging thresholds by FPR for the chosen precision: re-calibrated ones for INT8/FP16, else the stored ones."""
    from dede_rt.export.bundle import read_manifest

    manifest = read_manifest(bundle)
    dep = manifest.get("deployment", {})
    section = dep.get("tensorrt", {}) if choice.backend == "tensorrt" else dep.get("precisions", {})
    entry = section.get(choice.precision, {})
    if choice.precision != "fp32" and entry.get("thresholds"):
        return dict(entry["thresholds"])
    return dict(manifest["thresholds"]["by_fpr"])


def describe_choice(bundle_or_runner: str | Path | BaseRunner, backend: str = "auto",
                    precision: str | None = None) -> str:
    """One line saying which backend/precision serves the bundle and why."""
    if isinstance(bundle_or_runner, BaseRunner):
        choice = getattr(bundle_or_runner, "choice", None)
        if choice is None:
            return f"{bundle_or_runner.backend} {bundle_or_runner.precision}"
        return choice.describe()
    return choose_runner(bundle_or_runner, backend, precision).describe()

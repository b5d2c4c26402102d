"""dede-rt: screen image datasets for backdoor triggers of self-supervised encoders (DeDe, CVPR 2025).

Importing the package is cheap: heavy modules (torch models, onnxruntime,
TensorRT, Triton) load only when the names below are first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Detector": "dede_rt.bundle",
    "load_detector": "dede_rt.bundle",
    "Scorer": "dede_rt.scoring",
    "train_detector": "dede_rt.training",
    "TrainConfig": "dede_rt.training",
    "load_encoder": "dede_rt.models.encoders",
    "detection_report": "dede_rt.metrics",
    "run_demo": "dede_rt.demo",
    "scan": "dede_rt.scan",  # callable package: dede_rt.scan(source, detector) yields rows
}

if TYPE_CHECKING:
    __version__: str
    from dede_rt.demo import run_demo
    from dede_rt.bundle import Detector, load_detector
    from dede_rt.metrics import detection_report
    from dede_rt.models.encoders import load_encoder
    from dede_rt.scoring import Scorer
    from dede_rt.training import TrainConfig, train_detector

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        # Resolved on first use (importlib.metadata), then cached as a plain module attribute.
        from dede_rt._version import package_version

        globals()["__version__"] = version = package_version()
        return version
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dede_rt' has no attribute {name!r}")

"""Optional dependencies: import them where a feature needs them, or say in one line what to install.

ONNX export and ONNX Runtime come with the ``cpu`` or ``gpu`` extra (never both: the
onnxruntime and onnxruntime-gpu wheels are the same Python package).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dede_rt.errors import UserError

ONNX_HINT = "pip install 'dede-rt[cpu]' (CPU) or 'dede-rt[gpu]' (CUDA)"


def has_module(name: str) -> bool:
    """True when ``name`` can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(modules: tuple[str, ...], purpose: str, hint: str = ONNX_HINT) -> None:
    """Raise a one-line UserError naming the missing packages when any of ``modules`` is not importable."""
    missing = [m for m in modules if not has_module(m)]
    if missing:
        raise UserError(f"{purpose} needs {', '.join(missing)}, not installed here: {hint}")


def import_onnxruntime(purpose: str = "ONNX Runtime") -> ModuleType:
    """The ``onnxruntime`` module, or a one-line UserError saying to install the cpu or gpu extra."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise UserError(f"{purpose} needs onnxruntime, not installed here: {ONNX_HINT}") from None


def require_onnx_export(purpose: str = "ONNX export", verify: bool = True) -> None:
    """onnx + onnxscript (torch's dynamo exporter) and, to check the exported graph, onnxruntime."""
    require(("onnx", "onnxscript", "onnxruntime") if verify else ("onnx", "onnxscript"), purpose)

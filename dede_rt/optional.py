"""Optional dependencies: import them where a feature needs them, or say in one line what to install.

ONNX export and ONNX Runtime come with the ``cpu`` or ``gpu`` extra (never both: the
onnxruntime and onnxruntime-gpu wheels are the same Python package).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dede_rt.errors import UserError

TORCHVISION_EXTRAS = ("vision", "timm", "clip")
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


def import_extra(module: str, purpose: str, extra: str) -> ModuleType:
    """Import ``module`` for ``purpose`` or raise a one-line UserError naming the extra that installs it.

    Any import failure counts, not only a missing package: a torchvision CUDA wheel beside a CPU torch raises
    RuntimeError at import (its compiled ops do not load), and that is an install problem to name, not a crash.
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - see above
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        # timm and open_clip import torchvision, whose PyPI Linux wheels are CUDA builds
        torchvision = " with a torchvision built for this torch" if extra in TORCHVISION_EXTRAS else ""
        raise UserError(f"{purpose} needs {module.split('.')[0]}, which does not import here ({reason}): "
                        f"pip install 'dede-rt[{extra}]'{torchvision}") from None


def importable(module: str) -> bool:
    """True when ``module`` imports cleanly here (for tests that skip without it)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install is as absent as a missing one
        return False
    return True

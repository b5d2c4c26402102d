"""TensorRT backend (placeholder status check; the runtime lands with the builder)."""

from __future__ import annotations


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA GPU visible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install 'dede-rt[trt]' on a machine with an NVIDIA GPU)"
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT needs an NVIDIA GPU with CUDA; none is visible to torch"
    return True, "ok"


def engine_compatible(manifest: dict) -> tuple[bool, str]:
    """Whether an engine's manifest matches this GPU and TensorRT version."""
    return False, "TensorRT runtime not implemented yet"

"""PyTorch -> ONNX export of detector bundles (fused and split graphs), recorded in the bundle's deployment record."""

from __future__ import annotations

from pathlib import Path


def export_detector(bundle: str | Path, exporter: str = "auto", *, encoder_path: str | Path | None = None,
                    verify: bool = True, graphs: tuple[str, ...] | None = None) -> dict:
    """Export ``bundle`` to ONNX (see ``dede_rt.export.onnx_export.export_detector``); imported lazily."""
    from dede_rt.optional import require_onnx_export

    require_onnx_export("ONNX export", verify)
    from dede_rt.export.onnx_export import ALL_GRAPHS
    from dede_rt.export.onnx_export import export_detector as _export

    return _export(bundle, exporter, encoder_path=encoder_path, verify=verify, graphs=graphs or ALL_GRAPHS)


__all__ = ["export_detector"]

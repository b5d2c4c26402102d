"""Loaders, in Polygraphy's sense: make sure an artifact a runner needs exists and is current, then hand its path.

``ensure_graph`` is the one place that decides whether an exported ONNX graph can be used: it must be recorded
in the bundle's deployment record, exist on disk, and have been exported from the bundle's current weights,
encoder and test mask (``bundle.stale_exports``). Anything else re-exports it.
"""

from __future__ import annotations

from pathlib import Path

from dede_rt.bundle.manifest import read_manifest, stale_exports

GRAPHS = ("detector", "detector_nchw", "encoder", "decoder")


def graph_is_current(bundle: str | Path, name: str) -> bool:
    """True when graph ``name`` is recorded, on disk, and exported from the bundle as it is now."""
    return _current_path(Path(bundle), name) is not None


def _current_path(bundle: Path, name: str) -> Path | None:
    """The path of graph ``name`` when it is current, else None (the manifest is read once)."""
    manifest = read_manifest(bundle)
    path = manifest.deployment.graph_path(name)
    if path is None or not (bundle / path).is_file() or stale_exports(bundle, manifest) is not None:
        return None
    return bundle / path


def ensure_graph(bundle: str | Path, name: str = "detector", log=None) -> Path:
    """The path of the bundle's exported FP32 graph ``name``, exporting it first when missing or stale."""
    bundle = Path(bundle)
    path = _current_path(bundle, name)
    if path is not None:
        return path
    from dede_rt.export import export_detector

    if log is not None:
        log(f"exporting {name}.onnx for {bundle} (missing or older than the bundle's weights)")
    export_detector(bundle, graphs=(name,))
    return bundle / read_manifest(bundle).deployment.graph_path(name)

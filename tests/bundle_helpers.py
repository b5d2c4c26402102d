"""Test helpers over the bundle's typed manifest: its deployment record as plain JSON, and edits to it."""

from __future__ import annotations

from pathlib import Path

from dede_rt.bundle import PrecisionEntry, edit_manifest, read_manifest


def deployment(bundle: str | Path) -> dict:
    """The deployment record as the JSON the manifest holds."""
    return read_manifest(bundle).deployment.to_dict()


def set_entry(bundle: str | Path, section: str, key: str | None, value: dict) -> None:
    """Write one deployment entry (``precisions``/``tensorrt``) or a whole section (``benchmarks``, key None)."""
    with edit_manifest(bundle) as manifest:
        dep = manifest.deployment
        if section in ("precisions", "tensorrt"):
            getattr(dep, section)[key] = PrecisionEntry.from_dict(value)
        else:
            setattr(dep, section, value)

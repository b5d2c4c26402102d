"""The detector bundle's deployment record: what was exported, calibrated, built and measured.

Everything lives under one manifest key, ``deployment``, so the keys the
bundle already has stay untouched and ``Detector.save`` round-trips it::

    "deployment": {
      "onnx":       {exporter, opset, graphs: {name: {path, sha256, inputs, outputs}}},
      "precisions": {"fp32"|"int8"|"fp16": {path, gate: {passed, ...}, thresholds: {...}}},
      "tensorrt":   {"<precision>": {path, manifest, ...}},
      "benchmarks": {"<backend>:<precision>": {throughput, batch, machine, measured_at}}
    }

Paths are relative to the bundle directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dede_rt.errors import UserError

MANIFEST = "manifest.json"
DEPLOYMENT = "deployment"


def read_manifest(bundle: str | Path) -> dict:
    """The bundle's manifest.json as a dict (UserError when missing or corrupt)."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle}: not a detector bundle (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt manifest ({exc})") from None


def deployment(bundle: str | Path) -> dict:
    """The ``deployment`` section of the manifest ({} when nothing was exported yet)."""
    return dict(read_manifest(bundle).get(DEPLOYMENT, {}))


def update_deployment(bundle: str | Path, section: str, key: str | None, value: Any) -> dict:
    """Set ``deployment[section][key] = value`` (or the whole section when key is None), atomically in place."""
    path = Path(bundle) / MANIFEST
    manifest = read_manifest(bundle)
    dep = manifest.setdefault(DEPLOYMENT, {})
    if key is None:
        dep[section] = value
    else:
        dep.setdefault(section, {})[key] = value
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see a half-written manifest
    return dep


def bundle_fingerprint(bundle: str | Path) -> dict:
    """What exported graphs were made from: decoder weights hash, encoder hash, test mask ratio/seed."""
    from dede_rt.models.encoders import sha256_file

    manifest = read_manifest(bundle)
    weights = Path(bundle) / "decoder.safetensors"
    return {"decoder_sha256": sha256_file(weights) if weights.is_file() else None,
            "encoder_sha256": manifest["encoder"].get("sha256"),
            "test_mask_ratio": manifest["mask"]["test_ratio"], "mask_seed": manifest["mask"]["test_seed"]}


def stale_exports(bundle: str | Path) -> str | None:
    """Why the bundle's ONNX exports no longer match its weights/mask (None when they match or none exist)."""
    recorded = deployment(bundle).get("onnx", {}).get("source")
    if not recorded:
        return None
    current = bundle_fingerprint(bundle)
    changed = [k for k, v in current.items() if recorded.get(k) != v]
    if changed:
        return f"the ONNX exports predate a change of {', '.join(changed)}; run `dede-rt export {bundle}` again"
    return None

"""The detector bundle: its manifest (the only reader/writer), thresholds, and the loaded ``Detector``."""

from dede_rt.bundle.detector import Detector, load_detector
from dede_rt.bundle.manifest import (SCHEMA, DeploymentRecord, Gate, Manifest, PrecisionEntry,
                                     edit_manifest, fingerprint, read_manifest, stale_exports, versions,
                                     write_manifest)
from dede_rt.bundle.thresholds import DEFAULT_FPR, REPORTED_FPRS, Thresholds, fpr_key, threshold_at_fpr

__all__ = ["DEFAULT_FPR", "REPORTED_FPRS", "SCHEMA", "DeploymentRecord", "Detector", "Gate", "Manifest",
           "PrecisionEntry", "Thresholds", "edit_manifest", "fingerprint", "fpr_key",
           "load_detector", "read_manifest", "stale_exports", "threshold_at_fpr", "versions", "write_manifest"]

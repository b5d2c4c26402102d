"""Calibration sets, INT8 (Q/DQ) and FP16 conversion, quality gates and per-precision thresholds."""

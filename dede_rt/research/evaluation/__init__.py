"""The ``dede-rt eval`` pipeline: victims, test sets, detectors, baselines, the results table."""

"""The scanner never imports the research code (attacks, baselines, evaluation, probe): ``dede_rt.research``."""

import subprocess
import sys

SCANNER_PACKAGES = ("dede_rt.scan", "dede_rt.engines", "dede_rt.export", "dede_rt.bundle", "dede_rt.models",
                    "dede_rt.data")
# Every module of those packages is imported; one whose optional dependency (tensorrt, ray, ...) is missing here
# is skipped, and the test names it, so a skip cannot hide silently.
_PROBE = f"""
import importlib, pkgutil, sys
imported, skipped = [], []
for name in {SCANNER_PACKAGES!r} + ("dede_rt.training", "dede_rt.scoring"):
    package = importlib.import_module(name)
    imported.append(name)
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), name + "."):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except ImportError as exc:
            skipped.append(info.name + ": " + str(exc).splitlines()[0])
research = sorted(m for m in sys.modules if m == "dede_rt.research" or m.startswith("dede_rt.research."))
print("IMPORTED", len(imported))
print("SKIPPED", skipped)
print("RESEARCH", research)
"""


def test_scanner_modules_never_import_research():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert int(lines["IMPORTED"]) >= 20, proc.stdout  # the walk found the scanner's modules
    assert lines["RESEARCH"] == "[]", f"scanner modules imported research code: {lines['RESEARCH']}"


def test_the_probe_sees_a_research_import():
    """The check above can fail: importing the evaluation does load dede_rt.research."""
    code = "import sys, dede_rt.research.evaluation; print('dede_rt.research' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "True", proc.stderr

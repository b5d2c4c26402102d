"""The package version, from one source: pyproject.toml's ``version``.

An installed package (wheel or editable) reads it from its metadata, which the build
copied from pyproject.toml; a source checkout that was never installed reads
pyproject.toml itself.
"""

from __future__ import annotations

import re
from pathlib import Path

DIST_NAME = "dede-rt"
UNKNOWN = "0+unknown"


def _from_pyproject(path: Path) -> str | None:
    """``version`` of the ``[project]`` table of ``path`` when it names this package, else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    # A regex, not tomllib: Python 3.10 (supported) has no tomllib, and the two keys are plain strings.
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project is None or not re.search(rf'^name\s*=\s*"{DIST_NAME}"', project.group(1), re.M):
        return None
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return found.group(1) if found else None


def package_version() -> str:
    """The installed distribution's version, else the source checkout's pyproject.toml, else ``0+unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return _from_pyproject(Path(__file__).resolve().parent.parent / "pyproject.toml") or UNKNOWN

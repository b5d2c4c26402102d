"""``dede-rt scan``: score every image of a dataset, robustly and resumably.

``dede_rt.scan.scan(source, detector, ...)`` yields one ``ScanResult`` per
input; ``run_scan`` writes them to CSV/JSONL/Parquet with a summary. The
package itself is callable, so ``dede_rt.scan(source, detector)`` works too.
Submodules load lazily: decode workers import only what they need.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dede_rt.scan.output import ScanResult
    from dede_rt.scan.pipeline import Scanner, run_scan, scan

_EXPORTS = {"scan": "dede_rt.scan.pipeline", "run_scan": "dede_rt.scan.pipeline", "Scanner": "dede_rt.scan.pipeline",
            "ScanResult": "dede_rt.scan.output", "open_source": "dede_rt.data.sources", "read_rows": "dede_rt.scan.output"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dede_rt.scan' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """Lets ``dede_rt.scan(...)`` (the issue's API) call ``dede_rt.scan.scan(...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return __getattr__("scan")(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

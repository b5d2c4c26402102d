"""Research-only code: attacks that build victims, baseline detectors, the ``dede-rt eval`` pipeline, the probe.

The scanner (``dede_rt.scan``, ``engines``, ``export``, ``bundle``, ``models``, ``data``) never imports this
package; ``tests/test_research_boundary.py`` checks it.
"""

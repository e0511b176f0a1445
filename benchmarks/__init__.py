"""Benchmarks of hf-align (step time, memory, method fidelity), each run as a module from the repository root::

    python -m benchmarks.masked_dpo --quick
    python -m benchmarks.fidelity --quick

They write JSON (and PNGs) under ``benchmarks/results/``; only what the README links is committed. The test suite
runs only their ``--quick`` / ``--tiny`` smoke runs, never the full benchmarks.
"""

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def module_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``benchmarks.<module>`` in a fresh interpreter (run it with ``cwd=ROOT``)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]

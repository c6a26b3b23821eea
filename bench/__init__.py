"""pykernels benchmark harness: `python -m bench`, run from a checkout (or an unpacked sdist); not installed.

Suites register here by module name and are imported only when run: a module with NAME, MODES, providers() and
cases() (see bench/cross_entropy.py; what they share is in bench/providers.py)."""
from __future__ import annotations

import importlib

SUITES = {name: f"bench.{name}" for name in ("cross_entropy", "linear_cross_entropy", "attention", "lstm",
                                             "lstm_cell")}
SUITES["e2e"] = "bench.e2e"


def load_suite(name: str):
    return importlib.import_module(SUITES[name])

"""pykernels benchmark harness: `python -m bench` / `pykernels-bench`.

Suites register here by module name and are imported only when run (attention, lstm, linear_cross_entropy
and end-to-end suites plug in the same way: a module with NAME, MODES, providers() and cases())."""
from __future__ import annotations

import importlib

SUITES = {"cross_entropy": "bench.cross_entropy"}
SUITES["e2e"] = "bench.e2e"


def load_suite(name: str):
    return importlib.import_module(SUITES[name])

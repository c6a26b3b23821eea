"""The compute-sanitizer drivers (tests/gpu/sanitize.py) run only on a leased GPU; here each family runs on CPU
under the Triton interpreter (SANITIZE_DEVICE=cpu) so that a broken driver - a wrong reference call, a tolerance,
a shape the kernels refuse - is found in CI and not in the middle of a GPU session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykernels import backends

from conftest import skip_unless_required

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["cross_entropy", "lstm_cell", "lstm_layer", "attention", "attention_mma_sync", "linear_cross_entropy"]


def test_every_family_is_driven():
    src = (ROOT / "tests" / "gpu" / "sanitize.py").read_text()
    for name in FAMILIES:
        assert f'"{name}": {name}' in src


@pytest.mark.parametrize("family", FAMILIES)
def test_driver_runs_on_cpu(family):
    why = backends._interpreter_reason()  # the driver runs each family on the interpreted Triton kernels too
    if why:
        skip_unless_required(why)
    env = dict(os.environ, SANITIZE_DEVICE="cpu", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "tests/gpu/sanitize.py", family], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # attention_mma_sync drives only the cuda backend (none on CPU)
    assert f"{family}: ok {[] if family == 'attention_mma_sync' else ['triton']}" in r.stdout

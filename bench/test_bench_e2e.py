"""The e2e suite under pytest-benchmark (`pytest bench --benchmark-only`): one training step per round, after the
same loss-curve check as `python -m bench --suite e2e --quick`. CPU sizes by default, PYKERNELS_BENCH_DEVICE=cuda
for the GPU ones (bf16 autocast there)."""
from __future__ import annotations

import os

import pytest
import torch

from bench import e2e as suite
from bench import harness

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("PYKERNELS_BENCH_DEVICE", "cpu"))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = suite.cases(DEVICE, DTYPE, quick=True)
PROVIDERS = [p for p in suite.providers(DEVICE, DTYPE) if p.default]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name.split()[0])
def case_data(request):
    case = request.param
    args, diff = case.inputs()
    return case, args, diff, case.reference(args)


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_e2e(benchmark, request, case_data, provider):
    if not (request.config.getoption("benchmark_only") or os.environ.get("PYKERNELS_BENCH")):
        pytest.skip("benchmarks run with --benchmark-only (or PYKERNELS_BENCH=1), not in a plain test run")
    case, args, diff, ref = case_data
    try:
        step, _, (abs_err, rel_err) = case.prepare(provider, "train", args, diff, ref)
    except harness.WrongOutput as e:
        pytest.fail(f"{provider.name} is wrong, not timed: {e}")

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info.update(tokens=case.tokens("train"), loss_curve_rel_err=rel_err, shape=case.shape,
                                dtype=harness.dtype_name(DTYPE))
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2)

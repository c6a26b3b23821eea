"""The cross-entropy suite under pytest-benchmark, for users who keep their history there:
`pytest bench --benchmark-only` (add `--benchmark-autosave` / `--benchmark-compare`).

Same cases, providers and correctness check as `python -m bench --quick`; CPU shapes by default,
PYKERNELS_BENCH_DEVICE=cuda for the GPU ones. pytest-benchmark times the wall clock, so CUDA steps synchronize.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import cross_entropy as suite
from bench import harness

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("PYKERNELS_BENCH_DEVICE", "cpu"))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = suite.cases(DEVICE, DTYPE, quick=True)
PROVIDERS = [p for p in suite.providers(DEVICE, DTYPE) if p.default]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name.replace(" ", "-"))
def case_data(request):
    case = request.param
    args, diff = case.inputs()
    return case, args, diff, case.reference(args)


@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_cross_entropy(benchmark, request, case_data, provider, mode):
    if not (request.config.getoption("benchmark_only") or os.environ.get("PYKERNELS_BENCH")):
        pytest.skip("benchmarks run with --benchmark-only (or PYKERNELS_BENCH=1), not in a plain test run")
    if provider.absent:
        pytest.skip(provider.absent)
    case, args, diff, ref = case_data
    try:
        step, leaves, (abs_err, rel_err) = harness.prepare(case, provider, mode, args, diff, ref)
    except harness.WrongOutput as e:
        pytest.fail(f"{provider.name} is wrong, not timed: {e}")

    def timed():
        for t in leaves:
            t.grad = None
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info.update(bytes=case.bytes(mode), max_abs_err=abs_err, shape=case.shape,
                                dtype=harness.dtype_name(DTYPE), mode=mode)
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2)

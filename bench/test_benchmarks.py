"""Every suite under pytest-benchmark, for users who keep their history there:
`pytest bench --benchmark-only` (add `--benchmark-autosave` / `--benchmark-compare`).

Same cases (the --quick presets), default providers and correctness check as `python -m bench --quick`; CPU
shapes by default, PYKERNELS_BENCH_DEVICE=cuda for the GPU ones, PYKERNELS_BENCH_SUITES=attention,lstm for a
subset. pytest-benchmark times the wall clock, so CUDA steps synchronize.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import SUITES, harness, load_suite

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("PYKERNELS_BENCH_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"PYKERNELS_BENCH_DEVICE={DEVICE}: no CUDA device is visible to torch", allow_module_level=True)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
NAMES = os.environ.get("PYKERNELS_BENCH_SUITES", ",".join(SUITES)).split(",")
if set(NAMES) - set(SUITES):
    raise pytest.UsageError(f"PYKERNELS_BENCH_SUITES: unknown {', '.join(sorted(set(NAMES) - set(SUITES)))}; the "
                            f"suites are {', '.join(SUITES)}")
PARAMS = [pytest.param(case, prov, mode, id=f"{name}-{case.name}-{prov.name}-{mode}".replace(" ", "-"))
          for name in NAMES for suite in [load_suite(name)]
          for case in suite.cases(DEVICE, DTYPE, quick=True)
          for prov in suite.providers(DEVICE, DTYPE) if prov.default
          for mode in suite.MODES]
_data = {}  # case -> (inputs, differentiable indices, reference): built once, when its first test runs


def _case_data(case):
    if case not in _data:
        _data.clear()  # the parameters run case by case: keep one case's tensors alive, not all of them
        args, diff = case.inputs()
        _data[case] = args, diff, case.reference(args)
    return _data[case]


@pytest.mark.parametrize("case, provider, mode", PARAMS)
def test_suite(benchmark, request, case, provider, mode):
    if not (request.config.getoption("benchmark_only") or os.environ.get("PYKERNELS_BENCH")):
        pytest.skip("benchmarks run with --benchmark-only (or PYKERNELS_BENCH=1), not in a plain test run")
    if provider.absent:
        pytest.skip(provider.absent)
    args, diff, ref = _case_data(case)
    try:
        step, leaves, (abs_err, rel_err) = case.prepare(provider, mode, args, diff, ref)
    except harness.WrongOutput as e:
        pytest.fail(f"{provider.name} is wrong, not timed: {e}")

    def timed():
        for t in leaves:
            t.grad = None
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info.update(bytes=case.bytes(mode), flops=case.flops(mode), tokens=case.tokens(mode),
                                max_abs_err=abs_err, rel_err=rel_err, shape=case.shape,
                                dtype=harness.dtype_name(DTYPE), mode=mode)
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2)

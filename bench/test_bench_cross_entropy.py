"""The cross-entropy suite under pytest-benchmark, for users who keep their history there:
`pytest bench --benchmark-only` (CPU shapes by default; PYKERNELS_BENCH_DEVICE=cuda for the GPU ones)."""
from __future__ import annotations

import os

import pytest
import torch

import pykernels
from bench import cross_entropy as suite

DEVICE = torch.device(os.environ.get("PYKERNELS_BENCH_DEVICE", "cpu"))
SHAPES = suite.PRESETS[(DEVICE.type, True)]


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("provider", ["pykernels", "torch"])
def test_cross_entropy_fwd_bwd(benchmark, provider, N, V):
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    x = torch.randn(N, V, device=DEVICE, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), device=DEVICE)
    fn = pykernels.functional.cross_entropy if provider == "pykernels" else torch.nn.functional.cross_entropy

    def step():
        x.grad = None
        fn(x, t).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times the wall clock
    benchmark(step)
    benchmark.extra_info["bytes"] = suite.fwd_bwd_bytes(N, V, x.element_size())

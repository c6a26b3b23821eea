"""Property-based fuzzing of cross_entropy over shapes and options (hypothesis), every CPU-tier backend against
the float64 reference with the 2x-PyTorch-error rule. Fixed example budget so CI time stays bounded."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import pykernels  # noqa: E402
from conftest import FUZZ_SCALE, require_backend  # noqa: E402
from test_cross_entropy import _check_against_torch  # noqa: E402

CASES = st.fixed_dictionaries({
    "N": st.integers(1, 9), "C": st.integers(1, 300), "D": st.sampled_from([None, 1, 3]),
    "reduction": st.sampled_from(["mean", "sum", "none"]), "smoothing": st.sampled_from([0.0, 0.05, 0.5]),
    "weighted": st.booleans(), "ignore": st.floats(0.0, 1.0), "z_loss": st.sampled_from([0.0, 1e-3]),
    "ignore_index": st.sampled_from([-100, 0]), "transpose": st.booleans(), "seed": st.integers(0, 2**31 - 1),
})


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float64), ("cpu", torch.float32),
                                           ("triton", torch.float32)])
@settings(max_examples=25 * FUZZ_SCALE, deadline=None, derandomize=False)
@given(case=CASES)
def test_fuzz_against_reference(backend, dtype, case):
    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(case["seed"])
    N, C, D = case["N"], case["C"], case["D"]
    shape = (N, C) if D is None else (N, C, D)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    if case["transpose"] and D is None:
        x = x.t().contiguous().t()  # non-contiguous, class stride != 1
    tshape = (N,) if D is None else (N, D)
    t = torch.randint(0, C, tshape, generator=g)
    t = torch.where(torch.rand(tshape, generator=g) < case["ignore"], torch.full_like(t, case["ignore_index"]), t)
    w = (torch.rand(C, generator=g) + 0.1).to(dtype) if case["weighted"] else None  # (torch: the logits' dtype)
    _check_against_torch(backend, x, t, f"fuzz {case}", weight=w, reduction=case["reduction"],
                         label_smoothing=case["smoothing"], z_loss=case["z_loss"],
                         ignore_index=case["ignore_index"])


@settings(max_examples=40 * FUZZ_SCALE, deadline=None, derandomize=False)
@given(C=st.integers(1, 7000), N=st.integers(1, 4), masked=st.floats(0.0, 1.0), shift=st.floats(-50.0, 50.0),
       ramp=st.floats(0.0, 60.0), seed=st.integers(0, 2**31 - 1))
def test_fuzz_cpu_streaming_forward(C, N, masked, shift, ramp, seed):
    """The CPU forward without a gradient (chunked streaming with a running max) on rows spanning several chunks,
    with masked (-inf) runs, large offsets and a rising ramp that moves the max between chunks."""
    require_backend("cpu", "cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 3 + shift + torch.linspace(0, ramp, C, dtype=torch.float64)
    t = torch.randint(0, C, (N,), generator=g)
    cut = min(int(masked * C), C - 1)  # the last class stays finite: the targets are never masked
    x[:, :cut] = float("-inf")
    t = torch.where(t < cut, torch.full_like(t, C - 1), t)  # targets stay finite
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            ours = pykernels.functional.cross_entropy(x.to(dtype), t, reduction="none", backend="cpu")
        ref = torch.nn.functional.cross_entropy(x.to(dtype).double(), t, reduction="none")
        tol = 1e-5 if dtype == torch.float32 else 1e-6  # exp_u20 in both dtypes' forward
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))

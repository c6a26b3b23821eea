"""Helpers for correctness checks, shared by the tests and the benchmark harness.

The rule is FlashAttention's: a kernel's error against a high-precision reference must be at most
``factor`` times the error PyTorch's own implementation makes at the same dtype, plus a small floor.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional

import torch

# Absolute floor (relative to the reference's max magnitude) below which differences are rounding noise of
# the output dtype itself: one rounding of the result cannot be beaten.
_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    if bool((torch.isnan(a) ^ torch.isnan(b)).any()):
        return float("inf")
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = (a - b).abs().masked_fill(both_nan | same_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def assert_error_rule(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: Optional[torch.Tensor] = None,
                      factor: float = 2.0, dtype: Optional[torch.dtype] = None, floor: Optional[float] = None
                      ) -> None:
    """``max|out-ref| <= factor * max|baseline-ref| + floor * max(1, max|ref|)``.

    ``ref`` is the float64 (or float32) reference; ``baseline`` is PyTorch's result at the tested dtype (None:
    only the floor). NaN must match NaN position for position.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    dtype = dtype or out.dtype
    err = max_abs_err(out, ref)
    base = 0.0 if baseline is None else max_abs_err(baseline, ref)
    finite = ref.detach().double()[torch.isfinite(ref.detach().double())]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    tol = factor * base + (_FLOOR[dtype] if floor is None else floor) * scale
    assert err <= tol, (f"{name}: max abs error {err:.3e} > tolerance {tol:.3e} "
                        f"(torch's own error {base:.3e}, dtype {dtype}, |ref| max {scale:.3e})")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so an element a kernel forgets to write fails every comparison."""
    return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)


def python_calls(fn: Callable, *args, **kwargs) -> List[str]:
    """The Python functions that ``fn(*args, **kwargs)`` runs, in order, as "file:qualified name": for tests that
    keep avoidable work (an ABC isinstance check, an os.environ read, a rebuilt tuple) off the per-call path of the
    dispatch layer, whose Python overhead outweighs the kernels at small sizes."""
    calls: List[str] = []

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            calls.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{getattr(code, 'co_qualname', code.co_name)}")  # (3.11+)
    sys.setprofile(profile)
    try:
        fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return calls

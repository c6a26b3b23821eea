"""Elementwise math shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh to fp32 accuracy at every magnitude, in core tl ops (the interpreter has no libdevice). Below
    |x| = 0.55, x + x^3 q(x^2) with q a degree-4 fit of (tanh x - x) / x^3 (as the C++ kernels,
    csrc/cpu/lstm_pointwise.h): the exp form 1 - 2 / (e^{2x} + 1) cancels there (an absolute error of ulp(1),
    so a relative error of 1e-2 at |x| = 1e-5). Above, (1 - e^{-2|x|}) / (1 + e^{-2|x|}) with x's sign."""
    a = tl.abs(x)
    near0 = a < 0.55
    xs = tl.where(near0, x, 0.0)  # the polynomial only where it is used: no inf - inf (a NaN, and a warning)
    s = xs * xs
    q = -0.006274239160120487
    q = q * s + 0.021071678027510643
    q = q * s - 0.05385230854153633
    q = q * s + 0.13332585990428925
    q = q * s - 0.33333316445350647
    small = xs + (xs * s) * q
    t = tl.exp(-2.0 * a)  # <= e^-1.1 here, so 1 - t loses nothing; no overflow (1 at a = inf)
    large = (1.0 - t) / (1.0 + t)
    return tl.where(near0, small, tl.where(x < 0, -large, large))


@triton.jit
def tanh_fast(x):
    """1 - 2 / (e^{2x} + 1): an absolute error of ulp(1), so not for small results that keep their own scale. For
    the linear cross-entropy softcap, cap * tanh(z / cap): the error stays cap * ulp(1) on logits whose loss is
    read against an lse of cap's order, and the accurate form's extra live registers spill in the GEMM epilogues
    on sm_90 (128x256 tiles: 668 -> 756 bytes; 256x128: 128 -> 1220). Exact at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

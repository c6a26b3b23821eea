"""The fused path of the linear cross-entropy on the GPU: loss and gradients in the forward, three GEMMs in all.

The split path (linear_cross_entropy.py) recomputes the logits in the backward: four GEMMs (2NHV forward, 6NHV
backward), so at the issue's shape (N=8192, H=4096, V=128256) even a GEMM at the full measured matmul rate could not
finish in 45 ms. This path is the CPU fused kernel's contract (``pykernels::linear_cross_entropy_fused``) on the GPU,
for an upstream gradient of 1, a block of rows at a time:

    z = x[rows] W^T (+ b)                     cuBLAS, in the input dtype (the rounding torch's own linear makes)
    _lce_fused_rows_kernel(z)                  per row: (max, log-sum-exp, target logit, sum_c w_c z_c) in fp32 over
                                               the (soft-capped) logits, then dlogits written over z
    dX[rows] = dlogits W                       cuBLAS
    dW += dlogits^T x[rows]                    cuBLAS into an fp32 accumulator (16-bit inputs: ``out_dtype``), rounded
                                               once at the end, as torch's single GEMM over all rows rounds
    db += column sums of dlogits               fp32

Workspace: one block of logits (``CHUNK_BYTES``) and, for 16-bit inputs, the fp32 dW accumulator (V x H x 4 bytes:
more than the split path's, the price of its fourth GEMM). Not measured on a GPU yet: automatic calls keep the split
path on CUDA (``FUSED_AUTO``); ``fused=True`` asks for this one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from ..errors import ArgumentValueError
from ..ops import _checks
from ._launch import wrap
from .linear_cross_entropy import _interpreted, _tanh


@triton.jit
def _capped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _lce_fused_rows_kernel(Z, T, CW, P0, PL, CY, CWr, M, LS, ZY, ZS, V, szn, softcap, HAS_CW: tl.constexpr,
                           SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    """One row of logits z (V,) in place -> dlogits = (cp exp((z - m) - log_s) - cy [c == y] - cw w_c) softcap'(z),
    cp = p0 + pl * lse (the z-loss term); stores the row's m, log_s, target logit and sum_c w_c z_c (fp32)."""
    softcap = tl.cast(softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    zrow = Z + row * szn
    y = tl.load(T + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    zy = tl.zeros((), tl.float32)
    zs = tl.zeros((), tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < V
        z = tl.where(ok, _capped(tl.load(zrow + cols, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP),
                     float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
        m = m_new
        zy += tl.sum(tl.where((cols == y) & ok, z, 0.0), 0)  # (a target past V must not meet a masked column)
        if SMOOTH:
            w = tl.load(CW + cols, mask=ok, other=0.0).to(tl.float32) if HAS_CW else 1.0
            zs += tl.sum(tl.where(ok, z, 0.0) * w, 0)
    m = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    log_s = tl.log(s)
    pl = tl.load(PL + row)
    cp = tl.load(P0 + row)
    cp = tl.where(pl != 0.0, cp + pl * (m + log_s), cp)
    cy = tl.load(CY + row)
    cw = tl.load(CWr + row)
    for c0 in range(0, V, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < V
        z = _capped(tl.load(zrow + cols, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
        d = cp * tl.exp((z - m) - log_s) - tl.where(cols == y, cy, 0.0)
        if SMOOTH:
            w = tl.load(CW + cols, mask=ok, other=0.0).to(tl.float32) if HAS_CW else 1.0
            d = d - cw * w
        if SOFTCAP:
            t = z / softcap
            d = d * (1.0 - t * t)
        tl.store(zrow + cols, d.to(Z.dtype.element_ty), mask=ok)
    tl.store(M + row, m)
    tl.store(LS + row, log_s)
    tl.store(ZY + row, zy)
    tl.store(ZS + row, zs)


_OUT_DTYPE_GEMM = {"ok": hasattr(torch.ops.aten.addmm, "dtype_out")}


def _accumulate_dw(gw: torch.Tensor, dl: torch.Tensor, x: torch.Tensor) -> None:
    """gw (fp32) += dl^T x: on CUDA one GEMM with an fp32 output for 16-bit operands (torch's ``out_dtype``
    overloads), so the sum over row blocks rounds once, at the end."""
    if dl.dtype == gw.dtype:
        gw.addmm_(dl.t(), x)
        return
    if dl.is_cuda and _OUT_DTYPE_GEMM["ok"]:
        try:
            torch.ops.aten.addmm.dtype_out(gw, dl.t(), x, torch.float32, out=gw)
            return
        except RuntimeError as e:  # a torch or GPU without it: say so once, then the slow exact way
            _OUT_DTYPE_GEMM["ok"] = False
            backends.logger.warning("linear_cross_entropy fused: no fp32-output GEMM for %s operands (%s): dW "
                                    "accumulates through fp32 copies", dl.dtype, e)
    # the interpreter's CPU runs, and the fallback above: an fp32 GEMM on converted operands
    gw.addmm_(dl.t().float(), x.float())


def linear_cross_entropy_fused(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                               target: torch.Tensor, weight: Optional[torch.Tensor], coef_p0: torch.Tensor,
                               coef_lse: torch.Tensor, coef_y: torch.Tensor, coef_w: torch.Tensor, softcap: float,
                               smooth: bool, block_rows: int, input_grad: bool, weight_grad: bool, bias_grad: bool
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """The contract of ``pykernels::linear_cross_entropy_fused`` (docs/linear_cross_entropy.md): (m, log_s, z_target,
    z_sum) per row in fp32 and, for an upstream gradient of 1 with the given per-row coefficients, the requested
    gradients (dX (N, H), dW (V, H), db (V,) in their operands' dtypes; empty when not requested)."""
    op = "linear_cross_entropy_fused_triton"
    _checks.linear_cross_entropy_kernel(op, input, linear_weight, linear_bias, target, weight, softcap,
                                        (("coef_p0", coef_p0), ("coef_lse", coef_lse), ("coef_y", coef_y),
                                         ("coef_w", coef_w)))  # (the row kernel reads all four)
    if bias_grad and linear_bias is None:
        raise ArgumentValueError(f"{op}: bias_grad needs linear_bias")
    if block_rows < 1:
        raise ArgumentValueError(f"{op}: block_rows must be >= 1, got {block_rows}")
    N, H = input.shape
    V = linear_weight.shape[0]
    dev = input.device
    stats = [torch.empty(N, device=dev, dtype=torch.float32) for _ in range(4)]
    want_b = bias_grad and linear_bias is not None
    gx = input.new_empty((N, H) if input_grad else (0,))
    acc = torch.float32
    gw = torch.zeros((V, H) if weight_grad else (0,), device=dev, dtype=acc)
    gb = torch.zeros((V,) if want_b else (0,), device=dev, dtype=acc)
    t = target.contiguous()
    cw = weight if weight is not None else stats[0]
    coefs = [c.contiguous() for c in (coef_p0, coef_lse, coef_y, coef_w)]
    block = min(triton.next_power_of_2(max(V, 16)), 16 if _interpreted() else 4096)
    for r0 in range(0, N, block_rows):
        r1 = min(N, r0 + block_rows)
        xc = input[r0:r1]
        z = torch.mm(xc, linear_weight.t()) if linear_bias is None else torch.addmm(linear_bias, xc, linear_weight.t())
        wrap(_lce_fused_rows_kernel)[(r1 - r0,)](
            z, t[r0:], cw, *[c[r0:] for c in coefs], *[s_[r0:] for s_ in stats], V, z.stride(0), float(softcap),
            HAS_CW=weight is not None, SOFTCAP=bool(softcap), SMOOTH=bool(smooth), BLOCK=block,
            num_warps=1 if _interpreted() else 8)
        if input_grad:
            gx[r0:r1] = torch.mm(z, linear_weight)
        if weight_grad:
            _accumulate_dw(gw, z, xc)
        if want_b:
            gb += z.sum(0, dtype=acc)
    return (*stats, gx, gw.to(input.dtype), gb.to(input.dtype))

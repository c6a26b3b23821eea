"""Triton kernels of the LSTM ops (contract and math: docs/lstm.md).

Cell (``lstm_cell_fwd``): one launch per step. Program (m, j) owns batch rows ``m*BM..`` and hidden units
``j*BH..`` *with all four gates*, so the gate GEMMs ``x W_ih^T`` and ``h W_hh^T`` (four fp32 accumulators of
BM x BH, K loops over I and H) feed the pointwise update without leaving the chip: the gates never round-trip
through memory. Writes h' and c' in the input dtype and the workspace ``ws`` (B, 5H) in fp32: the activated
gates i, f, g, o and c' (fp32), which the backward needs.

Cell backward (``lstm_cell_bwd``): one pointwise launch turns (dh, dc, c, ws) into the pre-activation gate
gradients ``dgates`` (B, 4H, fp32) and dc_prev; the launcher's GEMMs give dx, dh, dW_ih, dW_hh, db.

The sequence kernels (``lstm_layer_fwd`` / ``lstm_layer_bwd``) are in lstm_layer.py and share the helpers
below (activations, the gate-gradient formula, the dot with fp32 IEEE precision).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import _checks
from ._launch import wrap
from ._math import tanh as _tanh

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _gate_gemm(acc_i, acc_f, acc_g, acc_o, A, W, rows, cols, M, K, H, sam, sak, swr, swk,
               IEEE: tl.constexpr, BK: tl.constexpr):
    """acc_q += A[rows, :K] @ W[q*H + cols, :K]^T for the four gates q (fp32 accumulators)."""
    ks = tl.arange(0, BK)
    rmask = rows < M
    cmask = cols < H
    a_ptrs = A + rows[:, None] * sam + ks[None, :].to(tl.int64) * sak
    w_ptrs = W + cols[None, :] * swr + ks[:, None].to(tl.int64) * swk  # W^T tile (BK, BH)
    gate = tl.cast(H, tl.int64) * swr
    for k in range(0, K, BK):
        kmask = (k + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wm = kmask[:, None] & cmask[None, :]
        acc_i = _dot(a, tl.load(w_ptrs, mask=wm, other=0.0), acc_i, IEEE)
        acc_f = _dot(a, tl.load(w_ptrs + gate, mask=wm, other=0.0), acc_f, IEEE)
        acc_g = _dot(a, tl.load(w_ptrs + 2 * gate, mask=wm, other=0.0), acc_g, IEEE)
        acc_o = _dot(a, tl.load(w_ptrs + 3 * gate, mask=wm, other=0.0), acc_o, IEEE)
        a_ptrs += tl.cast(BK, tl.int64) * sak
        w_ptrs += tl.cast(BK, tl.int64) * swk
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _pointwise_step(gi, gf, gg, go, c_prev, ws, H, m2):
    """The LSTM update of a tile from its pre-activation gates (fp32): stores the activated gates i, f, g, o and c_t
    at ws + 0, H, 2H, 3H, 4H (the workspace layout the backward reads) and returns (c_t, h_t). Shared by the cell
    and the sequence kernels (lstm_layer.py)."""
    i = _sigmoid(gi)
    f = _sigmoid(gf)
    g = _tanh(gg)
    o = _sigmoid(go)
    c = f * c_prev + i * g
    tl.store(ws, i, mask=m2)
    tl.store(ws + H, f, mask=m2)
    tl.store(ws + 2 * H, g, mask=m2)
    tl.store(ws + 3 * H, o, mask=m2)
    tl.store(ws + 4 * H, c, mask=m2)
    return c, o * _tanh(c)


@triton.jit
def _cell_fwd_kernel(X, HX, CX, WIH, WHH, BIH, BHH, HY, CY, WS, B, I, H,
                     sxb, sxi, shb, shh, scb, sch, swir, swik, swhr, swhk,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr,
                     BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_h.to(tl.int64) * BH + tl.arange(0, BH)  # int64: times a column stride, which may be any size
    acc_i = tl.zeros((BM, BH), dtype=tl.float32)
    acc_f = tl.zeros((BM, BH), dtype=tl.float32)
    acc_g = tl.zeros((BM, BH), dtype=tl.float32)
    acc_o = tl.zeros((BM, BH), dtype=tl.float32)
    acc_i, acc_f, acc_g, acc_o = _gate_gemm(acc_i, acc_f, acc_g, acc_o, X, WIH, rows, cols, B, I, H,
                                            sxb, sxi, swir, swik, IEEE, BK)
    acc_i, acc_f, acc_g, acc_o = _gate_gemm(acc_i, acc_f, acc_g, acc_o, HX, WHH, rows, cols, B, H, H,
                                            shb, shh, swhr, swhk, IEEE, BK)
    cmask = cols < H
    if HAS_BIAS:
        bi = tl.load(BIH + cols, mask=cmask, other=0.0).to(tl.float32) + \
            tl.load(BHH + cols, mask=cmask, other=0.0).to(tl.float32)
        bf = tl.load(BIH + H + cols, mask=cmask, other=0.0).to(tl.float32) + \
            tl.load(BHH + H + cols, mask=cmask, other=0.0).to(tl.float32)
        bg = tl.load(BIH + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32) + \
            tl.load(BHH + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)
        bo = tl.load(BIH + 3 * H + cols, mask=cmask, other=0.0).to(tl.float32) + \
            tl.load(BHH + 3 * H + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_i += bi[None, :]
        acc_f += bf[None, :]
        acc_g += bg[None, :]
        acc_o += bo[None, :]
    m2 = (rows < B)[:, None] & cmask[None, :]
    c_prev = tl.load(CX + rows[:, None] * scb + cols[None, :] * sch, mask=m2, other=0.0).to(tl.float32)
    c, h = _pointwise_step(acc_i, acc_f, acc_g, acc_o, c_prev, WS + rows[:, None] * (5 * H) + cols[None, :], H, m2)
    out = rows[:, None] * H + cols[None, :]
    tl.store(HY + out, h.to(HY.dtype.element_ty), mask=m2)
    tl.store(CY + out, c.to(CY.dtype.element_ty), mask=m2)


@triton.jit
def _gate_grads(dh, dc, c_prev, WSp, ws, H, m2):
    """Pre-activation gate gradients of one (rows, cols) tile from dh, dc (fp32) and the saved gates."""
    i = tl.load(WSp + ws, mask=m2, other=0.0)
    f = tl.load(WSp + ws + H, mask=m2, other=0.0)
    g = tl.load(WSp + ws + 2 * H, mask=m2, other=0.0)
    o = tl.load(WSp + ws + 3 * H, mask=m2, other=0.0)
    c = tl.load(WSp + ws + 4 * H, mask=m2, other=0.0)
    tc = _tanh(c)
    dct = dc + dh * o * (1.0 - tc * tc)
    di = dct * g * i * (1.0 - i)
    df = dct * c_prev * f * (1.0 - f)
    dg = dct * i * (1.0 - g * g)
    do = dh * tc * o * (1.0 - o)
    return di, df, dg, do, dct * f


@triton.jit
def _cell_bwd_kernel(GH, GC, CX, WS, DG, DCX, B, H, sgb, sgh, sgcb, sgch, scb, sch,
                     HAS_GH: tl.constexpr, HAS_GC: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)
    m2 = (rows < B)[:, None] & (cols < H)[None, :]
    dh = tl.zeros((BM, BH), dtype=tl.float32)
    dc = tl.zeros((BM, BH), dtype=tl.float32)
    if HAS_GH:
        dh = tl.load(GH + rows[:, None] * sgb + cols[None, :] * sgh, mask=m2, other=0.0).to(tl.float32)
    if HAS_GC:
        dc = tl.load(GC + rows[:, None] * sgcb + cols[None, :] * sgch, mask=m2, other=0.0).to(tl.float32)
    c_prev = tl.load(CX + rows[:, None] * scb + cols[None, :] * sch, mask=m2, other=0.0).to(tl.float32)
    ws = rows[:, None] * (5 * H) + cols[None, :]
    di, df, dg, do, dcp = _gate_grads(dh, dc, c_prev, WS, ws, H, m2)
    d = rows[:, None] * (4 * H) + cols[None, :]
    tl.store(DG + d, di, mask=m2)
    tl.store(DG + d + H, df, mask=m2)
    tl.store(DG + d + 2 * H, dg, mask=m2)
    tl.store(DG + d + 3 * H, do, mask=m2)
    tl.store(DCX + rows[:, None] * H + cols[None, :], dcp.to(DCX.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------------------
# Launchers (registered as triton_ops by pykernels/ops/lstm.py).

def _cell_config(dtype: torch.dtype, H: int) -> Tuple[int, int, int, int]:
    if _interpreted():
        return 16, 16, 16, 4
    if dtype == torch.float32:
        return 32, 32, 32, 4
    # 16-bit: K steps of 32 and 8 warps for the 64-unit tiles: ptxas -v reports no spill on sm_80 or sm_90 (BK = 64
    # with 4 warps spilled 132 / 2916 bytes); the 32-unit tiles spilled 108 bytes on sm_90 (896 with BK = 64). (Those
    # counts are of kernels compiled with all-int64 strides; compiled as launched neither tile spills.)
    return (32, 64, 32, 8) if H >= 512 else (32, 32, 32, 4)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lstm_cell_fwd(input: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h', c', ws): h', c' (B, H) in the input dtype; ws (B, 5H) fp32 = activated i, f, g, o and c'."""
    _checks.lstm_cell_kernel("lstm_cell_fwd_triton", input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    B, I = input.shape
    H = hx.shape[1]
    hy = input.new_empty(B, H)
    cy = input.new_empty(B, H)
    ws = input.new_empty(B, 5 * H, dtype=_acc(input.dtype))
    if B and H:
        BM, BH, BK, warps = _cell_config(input.dtype, H)
        has_b = b_ih is not None
        if has_b:  # the kernel reads the biases at stride 1 (4H elements: a copy only for a strided view)
            b_ih, b_hh = b_ih.contiguous(), b_hh.contiguous()
        wrap(_cell_fwd_kernel)[(triton.cdiv(B, BM), triton.cdiv(H, BH))](
            input, hx, cx, w_ih, w_hh, b_ih if has_b else ws, b_hh if has_b else ws, hy, cy, ws, B, I, H,
            input.stride(0), input.stride(1), hx.stride(0), hx.stride(1), cx.stride(0), cx.stride(1),
            w_ih.stride(0), w_ih.stride(1), w_hh.stride(0), w_hh.stride(1),
            HAS_BIAS=has_b, IEEE=input.dtype == torch.float32, BM=BM, BH=BH, BK=BK, num_warps=warps)
    return hy, cy, ws


def lstm_cell_bwd(grad_h: Optional[torch.Tensor], grad_c: Optional[torch.Tensor], cx: torch.Tensor,
                  ws: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dgates (B, 4H) fp32 pre-activation, dcx (B, H) in cx's dtype)."""
    _checks.lstm_cell_bwd("lstm_cell_bwd_triton", grad_h, grad_c, cx, ws)
    B, H = cx.shape
    dg = cx.new_empty(B, 4 * H, dtype=ws.dtype)
    dcx = cx.new_empty(B, H)
    if B and H:
        BM, BH = (16, 16) if _interpreted() else (32, 64)
        gh = grad_h if grad_h is not None else ws
        gc = grad_c if grad_c is not None else ws
        wrap(_cell_bwd_kernel)[(triton.cdiv(B, BM), triton.cdiv(H, BH))](
            gh, gc, cx, ws, dg, dcx, B, H,
            grad_h.stride(0) if grad_h is not None else 0, grad_h.stride(1) if grad_h is not None else 0,
            grad_c.stride(0) if grad_c is not None else 0, grad_c.stride(1) if grad_c is not None else 0,
            cx.stride(0), cx.stride(1),
            HAS_GH=grad_h is not None, HAS_GC=grad_c is not None, BM=BM, BH=BH, num_warps=4)
    return dg, dcx

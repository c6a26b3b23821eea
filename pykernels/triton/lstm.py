"""Triton kernels of the LSTM ops (contract and math: docs/lstm.md).

Cell (``lstm_cell_fwd``): one launch per step. Program (m, j) owns batch rows ``m*BM..`` and hidden units
``j*BH..`` *with all four gates*, so the gate GEMMs ``x W_ih^T`` and ``h W_hh^T`` (four fp32 accumulators of
BM x BH, K loops over I and H) feed the pointwise update without leaving the chip: the gates never round-trip
through memory. Writes h' and c' in the input dtype and the workspace ``ws`` (B, 5H) in fp32: the activated
gates i, f, g, o and c' (fp32), which the backward needs.

Cell backward (``lstm_cell_bwd``): one pointwise launch turns (dh, dc, c, ws) into the pre-activation gate
gradients ``dgates`` (B, 4H, fp32) and dc_prev; the launcher's GEMMs give dx, dh, dW_ih, dW_hh, db.

Sequence (``lstm_layer_fwd``): the input projection of all steps is one GEMM (``x W_ih^T + b_ih + b_hh``), then
one launch runs the whole recurrence: program m owns batch rows ``m*BM..`` and loops over time inside the kernel,
over hidden blocks per step (all four gates of a block together), reading h_{t-1} of its own rows back from the
output it wrote at the previous step (a CTA barrier orders the steps; no other program touches those rows, so no
grid-wide sync is needed). When the whole W_hh fits one tile (H <= RESIDENT_MAX), it is loaded once before the
time loop and stays in registers for the whole sequence; otherwise it streams from L2 every step.

Sequence backward (``lstm_layer_bwd``): the same structure in reverse time: per step the pointwise gate gradients
(all hidden blocks), a barrier, then ``dh_{t-1} = dgates_t W_hh`` for the program's rows; dgates of every step are
kept (T, B, 4H) so that dW_ih, dW_hh, db and dx are each one large GEMM / reduction over all T*B rows afterwards
(deterministic: no atomics).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# H up to which W_hh is held in registers across the whole sequence (one tile of 4 x H x H); larger H streams it.
RESIDENT_MAX = int(os.environ.get("PYKERNELS_LSTM_RESIDENT_MAX", "64"))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh through exp (no libdevice in the interpreter): 1 - 2 / (exp(2x) + 1), exact at +-inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


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
        a_ptrs += BK * sak
        w_ptrs += BK * swk
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _cell_fwd_kernel(X, HX, CX, WIH, WHH, BIH, BHH, HY, CY, WS, B, I, H,
                     sxb, sxi, shb, shh, scb, sch, swir, swik, swhr, swhk,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr,
                     BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_h * BH + tl.arange(0, BH)
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
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    out = rows[:, None] * H + cols[None, :]
    tl.store(HY + out, h.to(HY.dtype.element_ty), mask=m2)
    tl.store(CY + out, c.to(CY.dtype.element_ty), mask=m2)
    ws = rows[:, None] * (5 * H) + cols[None, :]
    tl.store(WS + ws, i, mask=m2)
    tl.store(WS + ws + H, f, mask=m2)
    tl.store(WS + ws + 2 * H, g, mask=m2)
    tl.store(WS + ws + 3 * H, o, mask=m2)
    tl.store(WS + ws + 4 * H, c, mask=m2)


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
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
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


@triton.jit
def _seq_fwd_kernel(XP, WHH, H0, C0, OUT, WS, T, B, H, swr, swk,
                    REVERSE: tl.constexpr, RESIDENT: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """XP (T, B, 4H) fp32 input projections incl. both biases; H0/C0 (B, H) contiguous; OUT (T, B, H) in the
    input dtype, WS (T, B, 5H) fp32. Program m owns rows m*BM.. for every step."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < B
    hcols = tl.arange(0, BH)
    ks = tl.arange(0, BK)
    stepH = tl.cast(B, tl.int64) * H
    if RESIDENT:  # whole W_hh^T as four (BK, BH) tiles, loaded once for the sequence (H <= BK == BH)
        wm = (ks < H)[:, None] & (hcols < H)[None, :]
        w_ptrs = WHH + hcols[None, :].to(tl.int64) * swr + ks[:, None].to(tl.int64) * swk
        gate = tl.cast(H, tl.int64) * swr
        w_i = tl.load(w_ptrs, mask=wm, other=0.0)
        w_f = tl.load(w_ptrs + gate, mask=wm, other=0.0)
        w_g = tl.load(w_ptrs + 2 * gate, mask=wm, other=0.0)
        w_o = tl.load(w_ptrs + 3 * gate, mask=wm, other=0.0)
    for s in range(0, T):
        if REVERSE:
            t = T - 1 - s
            tp = t + 1
        else:
            t = s
            tp = t - 1
        first = s == 0
        for j in range(0, H, BH):
            cols = j + hcols
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            xp = XP + t.to(tl.int64) * (4 * stepH) + rows[:, None] * (4 * H) + cols[None, :]
            acc_i = tl.load(xp, mask=m2, other=0.0)
            acc_f = tl.load(xp + H, mask=m2, other=0.0)
            acc_g = tl.load(xp + 2 * H, mask=m2, other=0.0)
            acc_o = tl.load(xp + 3 * H, mask=m2, other=0.0)
            if first:
                hp = H0
            else:
                hp = OUT + tp.to(tl.int64) * stepH
            hp_rows = rows * H
            if RESIDENT:
                a = tl.load(hp + hp_rows[:, None] + ks[None, :], mask=rmask[:, None] & (ks < H)[None, :],
                            other=0.0).to(w_i.dtype)
                acc_i = _dot(a, w_i, acc_i, IEEE)
                acc_f = _dot(a, w_f, acc_f, IEEE)
                acc_g = _dot(a, w_g, acc_g, IEEE)
                acc_o = _dot(a, w_o, acc_o, IEEE)
            else:
                acc_i, acc_f, acc_g, acc_o = _gate_gemm(acc_i, acc_f, acc_g, acc_o, hp, WHH, rows, cols, B, H, H,
                                                        H, 1, swr, swk, IEEE, BK)
            if first:
                c_prev = tl.load(C0 + rows[:, None] * H + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            else:
                c_prev = tl.load(WS + tp.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + 4 * H + cols[None, :],
                                 mask=m2, other=0.0)
            i = _sigmoid(acc_i)
            f = _sigmoid(acc_f)
            g = _tanh(acc_g)
            o = _sigmoid(acc_o)
            c = f * c_prev + i * g
            h = o * _tanh(c)
            tl.store(OUT + t.to(tl.int64) * stepH + rows[:, None] * H + cols[None, :],
                     h.to(OUT.dtype.element_ty), mask=m2)
            ws = WS + t.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + cols[None, :]
            tl.store(ws, i, mask=m2)
            tl.store(ws + H, f, mask=m2)
            tl.store(ws + 2 * H, g, mask=m2)
            tl.store(ws + 3 * H, o, mask=m2)
            tl.store(ws + 4 * H, c, mask=m2)
        # h_t of all hidden blocks must be written before any thread of this program reads it at t + 1.
        tl.debug_barrier()


@triton.jit
def _seq_bwd_kernel(GOUT, GHN, GCN, C0, WS, WHH, DG, DH, DC, T, B, H, swr, swk,
                    HAS_GOUT: tl.constexpr, HAS_GHN: tl.constexpr, HAS_GCN: tl.constexpr,
                    REVERSE: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """Reverse-time recurrence of one layer direction. GOUT (T, B, H), GHN/GCN (B, H) contiguous; DG (T, B, 4H)
    fp32 output: pre-activation gate gradients; DH/DC (B, H) fp32: the running dh (recurrent part) and dc, which
    hold dh0 and dc0 at the end."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < B
    hcols = tl.arange(0, BH)
    stepH = tl.cast(B, tl.int64) * H
    # initial dh, dc: the gradients of h_n, c_n
    for j in range(0, H, BH):
        cols = j + hcols
        m2 = rmask[:, None] & (cols < H)[None, :]
        off = rows[:, None] * H + cols[None, :]
        dh = tl.zeros((BM, BH), dtype=tl.float32)
        dc = tl.zeros((BM, BH), dtype=tl.float32)
        if HAS_GHN:
            dh = tl.load(GHN + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_GCN:
            dc = tl.load(GCN + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(DH + off, dh, mask=m2)
        tl.store(DC + off, dc, mask=m2)
    tl.debug_barrier()
    for s2 in range(0, T):
        s = T - 1 - s2
        if REVERSE:
            t = T - 1 - s
            tp = t + 1
        else:
            t = s
            tp = t - 1
        # 1) pointwise: dgates_t for every hidden block; dc <- dc_prev
        for j in range(0, H, BH):
            cols = j + hcols
            m2 = rmask[:, None] & (cols < H)[None, :]
            off = rows[:, None] * H + cols[None, :]
            dh = tl.load(DH + off, mask=m2, other=0.0)
            if HAS_GOUT:
                dh += tl.load(GOUT + t.to(tl.int64) * stepH + off, mask=m2, other=0.0).to(tl.float32)
            dc = tl.load(DC + off, mask=m2, other=0.0)
            if s == 0:
                c_prev = tl.load(C0 + off, mask=m2, other=0.0).to(tl.float32)
            else:
                c_prev = tl.load(WS + tp.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + 4 * H + cols[None, :],
                                 mask=m2, other=0.0)
            ws = t.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + cols[None, :]
            di, df, dg, do, dcp = _gate_grads(dh, dc, c_prev, WS, ws, H, m2)
            d = DG + t.to(tl.int64) * (4 * stepH) + rows[:, None] * (4 * H) + cols[None, :]
            tl.store(d, di, mask=m2)
            tl.store(d + H, df, mask=m2)
            tl.store(d + 2 * H, dg, mask=m2)
            tl.store(d + 3 * H, do, mask=m2)
            tl.store(DC + off, dcp, mask=m2)
        tl.debug_barrier()
        # 2) dh_{t-1} = dgates_t @ W_hh  (BM x 4H) @ (4H x H), per hidden block
        ks = tl.arange(0, BK)
        for j in range(0, H, BH):
            cols = j + hcols
            cmask = cols < H
            acc = tl.zeros((BM, BH), dtype=tl.float32)
            a_ptrs = DG + t.to(tl.int64) * (4 * stepH) + rows[:, None] * (4 * H) + ks[None, :]
            w_ptrs = WHH + ks[:, None].to(tl.int64) * swr + cols[None, :].to(tl.int64) * swk
            for k in range(0, 4 * H, BK):
                kmask = (k + ks) < 4 * H
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc = _dot(a.to(w.dtype), w, acc, IEEE)
                a_ptrs += BK
                w_ptrs += BK * swr
            tl.store(DH + rows[:, None] * H + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------------------
# Launchers (registered as triton_ops by pykernels/ops/lstm.py).

def _cell_config(dtype: torch.dtype, H: int) -> Tuple[int, int, int, int]:
    if _interpreted():
        return 16, 16, 16, 4
    if dtype == torch.float32:
        return 32, 32, 32, 4
    return 32, 64 if H >= 512 else 32, 64, 4


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lstm_cell_fwd(input: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h', c', ws): h', c' (B, H) in the input dtype; ws (B, 5H) fp32 = activated i, f, g, o and c'."""
    B, I = input.shape
    H = hx.shape[1]
    hy = input.new_empty(B, H)
    cy = input.new_empty(B, H)
    ws = input.new_empty(B, 5 * H, dtype=_acc(input.dtype))
    if B and H:
        BM, BH, BK, warps = _cell_config(input.dtype, H)
        has_b = b_ih is not None
        torch.library.wrap_triton(_cell_fwd_kernel)[(triton.cdiv(B, BM), triton.cdiv(H, BH))](
            input, hx, cx, w_ih, w_hh, b_ih if has_b else ws, b_hh if has_b else ws, hy, cy, ws, B, I, H,
            input.stride(0), input.stride(1), hx.stride(0), hx.stride(1), cx.stride(0), cx.stride(1),
            w_ih.stride(0), w_ih.stride(1), w_hh.stride(0), w_hh.stride(1),
            HAS_BIAS=has_b, IEEE=input.dtype == torch.float32, BM=BM, BH=BH, BK=BK, num_warps=warps)
    return hy, cy, ws


def lstm_cell_bwd(grad_h: Optional[torch.Tensor], grad_c: Optional[torch.Tensor], cx: torch.Tensor,
                  ws: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dgates (B, 4H) fp32 pre-activation, dcx (B, H) in cx's dtype)."""
    B, H = cx.shape
    dg = cx.new_empty(B, 4 * H, dtype=ws.dtype)
    dcx = cx.new_empty(B, H)
    if B and H:
        BM, BH = (16, 16) if _interpreted() else (32, 64)
        gh = grad_h if grad_h is not None else ws
        gc = grad_c if grad_c is not None else ws
        torch.library.wrap_triton(_cell_bwd_kernel)[(triton.cdiv(B, BM), triton.cdiv(H, BH))](
            gh, gc, cx, ws, dg, dcx, B, H,
            grad_h.stride(0) if grad_h is not None else 0, grad_h.stride(1) if grad_h is not None else 0,
            grad_c.stride(0) if grad_c is not None else 0, grad_c.stride(1) if grad_c is not None else 0,
            cx.stride(0), cx.stride(1),
            HAS_GH=grad_h is not None, HAS_GC=grad_c is not None, BM=BM, BH=BH, num_warps=4)
    return dg, dcx


def _seq_config(dtype: torch.dtype, H: int) -> Tuple[int, int, int, bool, int]:
    """(BM, BH, BK, resident, num_warps)."""
    if H <= RESIDENT_MAX:
        HP = max(16, triton.next_power_of_2(H))
        return 16, HP, HP, True, 4
    if _interpreted():
        return 16, 16, 16, False, 4
    return 16, 64, 64 if dtype != torch.float32 else 32, False, 4


def lstm_layer_fwd(xproj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, reverse: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of one layer direction. xproj (T, B, 4H) fp32 = x W_ih^T + b_ih + b_hh; h0, c0 (B, H)
    contiguous in the input dtype (w_hh's). Returns (out (T, B, H) in w_hh's dtype, ws (T, B, 5H) fp32)."""
    T, B, H4 = xproj.shape
    H = H4 // 4
    out = h0.new_empty(T, B, H)
    ws = xproj.new_empty(T, B, 5 * H)
    if T and B and H:
        BM, BH, BK, resident, warps = _seq_config(w_hh.dtype, H)
        torch.library.wrap_triton(_seq_fwd_kernel)[(triton.cdiv(B, BM),)](
            xproj, w_hh, h0, c0, out, ws, T, B, H, w_hh.stride(0), w_hh.stride(1),
            REVERSE=reverse, RESIDENT=resident, IEEE=w_hh.dtype == torch.float32, BM=BM, BH=BH, BK=BK,
            num_warps=warps)
    return out, ws


def lstm_layer_bwd(grad_out: Optional[torch.Tensor], grad_hn: Optional[torch.Tensor],
                   grad_cn: Optional[torch.Tensor], c0: torch.Tensor, ws: torch.Tensor, w_hh: torch.Tensor,
                   reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgates (T, B, 4H) fp32, dh0 (B, H) fp32, dc0 (B, H) fp32). grad_* contiguous or None."""
    T, B, H5 = ws.shape
    H = H5 // 5
    dg = ws.new_empty(T, B, 4 * H)
    dh = ws.new_empty(B, H)
    dc = ws.new_empty(B, H)
    if B and H:
        if _interpreted():
            BM, BH, BK = 16, 16, 16
        else:
            BM, BH, BK = 16, 64, 64 if w_hh.dtype != torch.float32 else 32
        torch.library.wrap_triton(_seq_bwd_kernel)[(triton.cdiv(B, BM),)](
            grad_out if grad_out is not None else ws, grad_hn if grad_hn is not None else ws,
            grad_cn if grad_cn is not None else ws, c0, ws, w_hh, dg, dh, dc, T, B, H,
            w_hh.stride(0), w_hh.stride(1),
            HAS_GOUT=grad_out is not None, HAS_GHN=grad_hn is not None, HAS_GCN=grad_cn is not None,
            REVERSE=reverse, IEEE=w_hh.dtype == torch.float32, BM=BM, BH=BH, BK=BK, num_warps=4)
    return dg, dh, dc

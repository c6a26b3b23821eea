"""Triton kernels of the LSTM sequence ops ``lstm_layer_fwd`` / ``lstm_layer_bwd`` (contract: docs/lstm.md).

The input projection of all steps is one GEMM done by the caller (``xproj = x W_ih^T + b_ih + b_hh``); these
kernels run the recurrence of one layer direction. Two designs, chosen per call by ``plan`` (see there):

Row-block kernels (``_seq_fwd_kernel`` / ``_seq_bwd_kernel``), for H <= RESIDENT_MAX: program m owns batch rows
``m*BM..`` for the whole sequence and loops over time inside the kernel, over all hidden units per step. No other
program touches its rows, so a CTA barrier orders the steps and no grid-wide sync is needed; the whole W_hh is one
register tile (forward) loaded once. At larger H one program per 16 rows would stream all of W_hh every step on
one SM, which is what the split kernels avoid.

Split kernels (``_split_fwd_kernel`` / ``_split_bwd_kernel``), for H > RESIDENT_MAX: program j owns hidden units
``j*BH..`` with all four gates, for every batch row (row blocks of BM inside), so the hidden units are spread over
cdiv(H, BH) SMs. Its slice of W_hh (forward: the 4*BH rows of its gates; backward: the BH columns of its units,
all 4H rows) is loaded once before the time loop and stays on chip when it fits TILE_BYTES (RESIDENT), as a tuple
of NS chunk tiles that Triton keeps in shared memory; otherwise it is re-read from L2 chunk by chunk every step.
Each chunk product is a batched ``tl.dot`` (NC, BM, BK) @ (NC, BK, N): Triton puts the warps on the batch axis,
so each warp multiplies its own K range (a 2-D dot would give every warp the whole K extent); the per-warp sums
are added across warps once per row block.
Forward step: gates = xproj[t] + h_{t-1} @ slice^T (columns unit-major, n = 4*unit + gate, so one dot gives all
four gates), the pointwise update, h_t stored; every program then needs every other program's h_t: a grid
barrier. Backward, processing the steps in reverse: (B) dh for the step processed last, = dG[t'] @ W_hh[:, units]
from the dgates every program wrote, then (A) the gate gradients of this step from the program's own dh, dc into
dG[t]; then a grid barrier. (A) reads only the program's own dh/dc, so (B) and (A) need no grid barrier between
them; one more (B) at the end gives dh0.

PERSISTENT (constexpr) picks where the barrier is: True, one launch runs all steps and synchronises through
``_grid_barrier`` (needs every program co-resident: at most one program per SM); False, the launcher issues one
launch per step and the launch boundary is the barrier. The interpreter (TRITON_INTERPRET=1) runs programs one
after another, so a spin barrier would deadlock there: the CPU tier runs PERSISTENT=False, the compile tests build
PERSISTENT=True for sm_80/sm_90, and False is also the GPU fallback when cdiv(H, BH) programs would exceed the SMs.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .lstm import _dot, _gate_grads, _pointwise_step
from ..ops import _checks
from ._launch import wrap

logger = logging.getLogger("pykernels")

# H up to which the row-block kernels run (W_hh is one register tile of 4 x H x H); above it, the split kernels.
RESIDENT_MAX = int(os.environ.get("PYKERNELS_LSTM_RESIDENT_MAX", "64"))
# 0: the split kernels launch once per step (no grid barrier). For GPUs whose SMs are not all this process's (an
# MPS thread limit, kernels of another stream holding SMs for the whole layer): the persistent grid assumes one
# resident program per SM, and a program that never gets an SM traps the context after SPIN_LIMIT polls.
PERSISTENT = os.environ.get("PYKERNELS_LSTM_PERSISTENT", "1") != "0"
# Bytes of a program's W_hh slice kept on chip for the whole launch. Triton keeps such loop-invariant dot
# operands in shared memory; the compile tests check the split kernels at this budget against the A100/H100
# shared memory limits and for (almost) no spills.
TILE_BYTES = 64 * 1024
# Bytes of one chunk tile (NC x BK x N) of a slice re-read per step: it is live in registers in the K loop.
CHUNK_BYTES = 16 * 1024
SPLIT_WARPS = 8
# Polls of the barrier counter before a program traps: a grid that can never all arrive (not co-resident)
# fails the launch loudly instead of hanging the device.
SPIN_LIMIT = 1 << 24


@triton.jit
def _trap(x):
    # Marked pure so that torch.compile's analysis of the kernel's writes can read the kernel (it gives up on
    # impure inline asm); the caller stores the result, so it is kept, in the branch taken only on a timeout.
    return tl.inline_asm_elementwise("trap; mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _poll(BAR):
    # an acquire read at gpu scope (the compiler emits ld.acquire for this add of 0): once it sees every arrival,
    # the arriving programs' writes are visible to this program
    return tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")


@triton.jit
def _grid_barrier(BAR, target, SPIN: tl.constexpr):
    """Wait until ``target`` arrivals have been counted at BAR[0] (int32, zeroed by the launcher; the n-th barrier
    of a launch waits for n * programs, so the counter is never reset and consecutive barriers cannot race).
    After SPIN polls without it (a grid that is not co-resident), trap: a launch error instead of a hang."""
    tl.debug_barrier()  # every thread's stores of the step are issued before the program arrives
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")  # one thread per program; release orders the stores above
    n = _poll(BAR)
    spins = 0
    while (n < target) & (spins < SPIN):
        spins += 1
        n = _poll(BAR)
    if n < target:
        tl.store(BAR + 1, _trap(n))
    tl.debug_barrier()


@triton.jit
def _launch_steps(STEP, n, PERSISTENT: tl.constexpr):
    """The steps [s0, s1) of n that this launch runs: all of them when persistent, else step STEP alone."""
    s0 = STEP
    s1 = STEP + 1
    if PERSISTENT:
        s0 = 0
        s1 = n
    return s0, s1


@triton.jit
def _step_time(s, T, REVERSE: tl.constexpr):
    """(t, t_prev): the time index of forward step s and of the step before it."""
    t = s
    tp = s - 1
    if REVERSE:
        t = T - 1 - s
        tp = t + 1
    return t, tp


@triton.jit
def _load_chunks(P, rows, rmask, srow, k0, K, NC: tl.constexpr, BK: tl.constexpr):
    """(NC, BM, BK) tile of P[rows, k0 + c*BK + kk] (K valid columns), read from L2 (.cg): other programs wrote it
    during this launch, and L1 is not coherent."""
    k = k0 + tl.arange(0, NC)[:, None, None] * BK + tl.arange(0, BK)[None, None, :]
    return tl.load(P + rows[None, :, None] * srow + k, mask=rmask[None, :, None] & (k < K), other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _load_slice(W, noff, nmask, sk, k0, K, NC: tl.constexpr, BK: tl.constexpr):
    """(NC, BK, N) tile of W: element [c, kk, n] = W[noff[n] + (k0 + c*BK + kk) * sk] (K valid)."""
    k = k0 + tl.arange(0, NC)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
    return tl.load(W + noff[None, None, :] + k.to(tl.int64) * sk, mask=nmask[None, None, :] & (k < K), other=0.0)


@triton.jit
def _load_resident(W, noff, nmask, sk, K, RESIDENT: tl.constexpr, NS: tl.constexpr, NC: tl.constexpr,
                   BK: tl.constexpr):
    """The program's whole slice as a tuple of NS chunk tiles, loaded once (empty unless RESIDENT)."""
    w = ()
    if RESIDENT:
        for c in tl.static_range(NS):
            w = w + (_load_slice(W, noff, nmask, sk, c * NC * BK, K, NC, BK),)
    return w


@triton.jit
def _slice_dot(acc, A, rows, rmask, srow, K, W, noff, nmask, sk, w,
               RESIDENT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, N: tl.constexpr,
               NS: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr):
    """acc (BM, N) + A[rows, :K] @ slice: over the resident chunk tiles ``w``, or re-reading the slice per chunk.
    The chunk products accumulate per warp (NC, BM, N) and are summed across warps once."""
    acc3 = tl.zeros((NC, BM, N), dtype=tl.float32)
    if RESIDENT:
        for c in tl.static_range(NS):
            a = _load_chunks(A, rows, rmask, srow, c * NC * BK, K, NC, BK)
            acc3 = _dot(a.to(W.dtype.element_ty), w[c], acc3, IEEE)
    else:
        for k0 in range(0, K, NC * BK):
            a = _load_chunks(A, rows, rmask, srow, k0, K, NC, BK)
            acc3 = _dot(a.to(W.dtype.element_ty), _load_slice(W, noff, nmask, sk, k0, K, NC, BK), acc3, IEEE)
    return acc + tl.sum(acc3, axis=0)


@triton.jit
def _c_prev(C0, WS, first, tp, rows, cols, stepH, H, m2):
    """c_{t-1} of a (rows, cols) tile, fp32: c0 at the first step, else the unrounded c in the workspace."""
    if first:
        c = tl.load(C0 + rows[:, None] * H + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        c = tl.load(WS + tp.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + 4 * H + cols[None, :], mask=m2,
                    other=0.0)
    return c


@triton.jit
def _cell_update(gi, gf, gg, go, c_prev, OUT, WS, t, rows, cols, stepH, H, m2):
    """The pointwise step of a (rows, cols) tile from its pre-activation gates: h_t into OUT (input dtype), the
    activated gates and c_t into the workspace."""
    ws = WS + t.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + cols[None, :]
    _, h = _pointwise_step(gi, gf, gg, go, c_prev, ws, H, m2)
    tl.store(OUT + t.to(tl.int64) * stepH + rows[:, None] * H + cols[None, :], h.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _gate_grad_tile(GOUT, C0, WS, DG, DH, DC, first, t, tp, rows, cols, stepH, H, m2, HAS_GOUT: tl.constexpr):
    """The backward pointwise step of a (rows, cols) tile: dgates_t into DG from dh (+ grad_out[t]) and dc, and
    dc <- dc_{t-1} in place."""
    off = rows[:, None] * H + cols[None, :]
    dh = tl.load(DH + off, mask=m2, other=0.0)
    if HAS_GOUT:
        dh += tl.load(GOUT + t.to(tl.int64) * stepH + off, mask=m2, other=0.0).to(tl.float32)
    dc = tl.load(DC + off, mask=m2, other=0.0)
    c_prev = _c_prev(C0, WS, first, tp, rows, cols, stepH, H, m2)
    ws = t.to(tl.int64) * (5 * stepH) + rows[:, None] * (5 * H) + cols[None, :]
    di, df, dg, do, dcp = _gate_grads(dh, dc, c_prev, WS, ws, H, m2)
    d = DG + t.to(tl.int64) * (4 * stepH) + rows[:, None] * (4 * H) + cols[None, :]
    tl.store(d, di, mask=m2)
    tl.store(d + H, df, mask=m2)
    tl.store(d + 2 * H, dg, mask=m2)
    tl.store(d + 3 * H, do, mask=m2)
    tl.store(DC + off, dcp, mask=m2)


@triton.jit
def _split_fwd_kernel(XP, WHH, H0, C0, OUT, WS, BAR, T, B, H, swr, swk, STEP,
                      REVERSE: tl.constexpr, PERSISTENT: tl.constexpr, RESIDENT: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BH: tl.constexpr, NS: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr,
                      SPIN: tl.constexpr):
    """Program j: hidden units j*BH.. with their four gates, all rows, steps [STEP, STEP+1) or all T (PERSISTENT).
    The gate columns are unit-major (n = 4*unit + gate) so one dot gives all four and a reshape splits them."""
    j = tl.program_id(0)
    n = tl.arange(0, 4 * BH)
    col = (n % 4) * H + j * BH + n // 4  # column of xproj / row of W_hh of gate column n
    nmask = (j * BH + n // 4) < H
    noff = col.to(tl.int64) * swr
    units = j * BH + tl.arange(0, BH)
    umask = units < H
    w = _load_resident(WHH, noff, nmask, swk, H, RESIDENT, NS, NC, BK)
    stepH = tl.cast(B, tl.int64) * H
    s0, s1 = _launch_steps(STEP, T, PERSISTENT)
    for s in range(s0, s1):
        t, tp = _step_time(s, T, REVERSE)
        if s == 0:
            hp = H0
        else:
            hp = OUT + tp.to(tl.int64) * stepH
        for r0 in range(0, B, BM):
            rows = r0 + tl.arange(0, BM).to(tl.int64)
            rmask = rows < B
            acc = tl.load(XP + t.to(tl.int64) * (4 * stepH) + rows[:, None] * (4 * H) + col[None, :],
                          mask=rmask[:, None] & nmask[None, :], other=0.0)
            acc = _slice_dot(acc, hp, rows, rmask, H, H, WHH, noff, nmask, swk, w,
                             RESIDENT, IEEE, BM, 4 * BH, NS, NC, BK)
            gi_gg, gf_go = tl.split(tl.reshape(acc, (BM, BH, 2, 2)))  # gate q = 2a + b: split b, then a
            gi, gg = tl.split(gi_gg)
            gf, go = tl.split(gf_go)
            m2 = rmask[:, None] & umask[None, :]
            c_prev = _c_prev(C0, WS, s == 0, tp, rows, units, stepH, H, m2)
            _cell_update(gi, gf, gg, go, c_prev, OUT, WS, t, rows, units, stepH, H, m2)
        if PERSISTENT:
            if s + 1 < s1:  # every program's h_t is written before anyone reads it at the next step
                _grid_barrier(BAR, (s + 1) * tl.num_programs(0), SPIN)


@triton.jit
def _split_bwd_kernel(GOUT, C0, WS, WHH, DG, DH, DC, BAR, T, B, H, swr, swk, STEP,
                      HAS_GOUT: tl.constexpr, REVERSE: tl.constexpr, PERSISTENT: tl.constexpr,
                      RESIDENT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr,
                      NS: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr, SPIN: tl.constexpr):
    """Program j: hidden units j*BH.., all rows. Processing index i in [STEP, STEP+1) or [0, T] (PERSISTENT): (B)
    dh of the step processed at i-1 (i > 0), then (A) the gate gradients of step i (i < T). DH/DC (B, H) fp32 hold
    dh (recurrent part) and dc on entry (grad_hn/grad_cn or 0) and dh0/dc0 at the end; DG (T, B, 4H) fp32."""
    j = tl.program_id(0)
    units = j * BH + tl.arange(0, BH)
    umask = units < H
    noff = units.to(tl.int64) * swk
    H4 = 4 * H
    w = _load_resident(WHH, noff, umask, swr, H4, RESIDENT, NS, NC, BK)
    stepH = tl.cast(B, tl.int64) * H
    s0, s1 = _launch_steps(STEP, T + 1, PERSISTENT)
    for i in range(s0, s1):
        if i > 0:  # (B) dh_{prev} = dG[t] W_hh[:, units] for the step processed at i - 1
            t, _ = _step_time(T - i, T, REVERSE)
            for r0 in range(0, B, BM):
                rows = r0 + tl.arange(0, BM).to(tl.int64)
                rmask = rows < B
                acc = _slice_dot(tl.zeros((BM, BH), dtype=tl.float32), DG + t.to(tl.int64) * (4 * stepH), rows,
                                 rmask, H4, H4, WHH, noff, umask, swr, w, RESIDENT, IEEE, BM, BH, NS, NC, BK)
                tl.store(DH + rows[:, None] * H + units[None, :], acc, mask=rmask[:, None] & umask[None, :])
            tl.debug_barrier()  # (A) reads dh written by other threads of this program
        if i < T:  # (A) gate gradients of forward step s = T-1-i, units of this program
            s = T - 1 - i
            t, tp = _step_time(s, T, REVERSE)
            for r0 in range(0, B, BM):
                rows = r0 + tl.arange(0, BM).to(tl.int64)
                m2 = (rows < B)[:, None] & umask[None, :]
                _gate_grad_tile(GOUT, C0, WS, DG, DH, DC, s == 0, t, tp, rows, units, stepH, H, m2, HAS_GOUT)
            if PERSISTENT:  # every program's dG[t] is written before anyone's (B) reads it
                _grid_barrier(BAR, (i + 1) * tl.num_programs(0), SPIN)


@triton.jit
def _seq_fwd_kernel(XP, WHH, H0, C0, OUT, WS, T, B, H, swr, swk,
                    REVERSE: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
    """Row-block forward, H <= BH: the whole W_hh^T as four (BH, BH) tiles loaded once. XP (T, B, 4H) fp32 input
    projections incl. both biases; H0/C0 (B, H) contiguous; OUT (T, B, H) in the input dtype, WS (T, B, 5H) fp32.
    Program m owns rows m*BM.. for every step."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < B
    cols = tl.arange(0, BH)
    cmask = cols < H
    stepH = tl.cast(B, tl.int64) * H
    wm = cmask[:, None] & cmask[None, :]
    w_ptrs = WHH + cols[None, :].to(tl.int64) * swr + cols[:, None].to(tl.int64) * swk
    gate = tl.cast(H, tl.int64) * swr
    w_i = tl.load(w_ptrs, mask=wm, other=0.0)
    w_f = tl.load(w_ptrs + gate, mask=wm, other=0.0)
    w_g = tl.load(w_ptrs + 2 * gate, mask=wm, other=0.0)
    w_o = tl.load(w_ptrs + 3 * gate, mask=wm, other=0.0)
    m2 = rmask[:, None] & cmask[None, :]
    for s in range(0, T):
        t, tp = _step_time(s, T, REVERSE)
        xp = XP + t.to(tl.int64) * (4 * stepH) + rows[:, None] * (4 * H) + cols[None, :]
        acc_i = tl.load(xp, mask=m2, other=0.0)
        acc_f = tl.load(xp + H, mask=m2, other=0.0)
        acc_g = tl.load(xp + 2 * H, mask=m2, other=0.0)
        acc_o = tl.load(xp + 3 * H, mask=m2, other=0.0)
        if s == 0:
            hp = H0
        else:
            hp = OUT + tp.to(tl.int64) * stepH
        a = tl.load(hp + rows[:, None] * H + cols[None, :], mask=m2, other=0.0).to(w_i.dtype)
        acc_i = _dot(a, w_i, acc_i, IEEE)
        acc_f = _dot(a, w_f, acc_f, IEEE)
        acc_g = _dot(a, w_g, acc_g, IEEE)
        acc_o = _dot(a, w_o, acc_o, IEEE)
        c_prev = _c_prev(C0, WS, s == 0, tp, rows, cols, stepH, H, m2)
        _cell_update(acc_i, acc_f, acc_g, acc_o, c_prev, OUT, WS, t, rows, cols, stepH, H, m2)
        # h_t must be written before any thread of this program reads it at the next step
        tl.debug_barrier()


@triton.jit
def _seq_bwd_kernel(GOUT, C0, WS, WHH, DG, DH, DC, T, B, H, swr, swk,
                    HAS_GOUT: tl.constexpr, REVERSE: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """Row-block backward (reverse time), H <= RESIDENT_MAX. GOUT (T, B, H) contiguous; DG (T, B, 4H) fp32
    output: pre-activation gate gradients; DH/DC (B, H) fp32: the running dh (recurrent part) and dc, holding
    grad_hn/grad_cn (or 0) on entry and dh0/dc0 at the end."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < B
    hcols = tl.arange(0, BH)
    stepH = tl.cast(B, tl.int64) * H
    for s2 in range(0, T):
        s = T - 1 - s2
        t, tp = _step_time(s, T, REVERSE)
        # 1) pointwise: dgates_t for every hidden block; dc <- dc_prev
        for j in range(0, H, BH):
            cols = j + hcols
            m2 = rmask[:, None] & (cols < H)[None, :]
            _gate_grad_tile(GOUT, C0, WS, DG, DH, DC, s == 0, t, tp, rows, cols, stepH, H, m2, HAS_GOUT)
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
# Launch plans and launchers (registered as triton_ops by pykernels/ops/lstm.py).

BH_MIN = 8  # units per split program: backward N = BH, and mma's narrowest tile is 8 columns
NS_MAX = 16  # chunk tiles of a resident slice: the per-step chunk loop is unrolled
INTERP_SMS = 4  # the SM count the interpreter plans for: a few programs per launch, so several BH get tested


class Plan(NamedTuple):
    split: bool        # split kernels (else the row-block kernels)
    persistent: bool   # one launch with grid barriers (else one launch per step)
    resident: bool     # the W_hh slice stays in registers for the whole launch (else re-read per K chunk)
    BM: int
    BH: int
    NS: int            # resident chunk tiles
    NC: int            # K chunks of one batched dot (= warps on the GPU)
    BK: int
    warps: int


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _split_tiles(K: int, N: int, itemsize: int, nc: int, tile_bytes: int, chunk_bytes: int
                 ) -> Tuple[int, int, bool]:
    """(BK, NS, resident) for a slice of K x N elements in chunk tiles of NC x BK x N (K padded only to a multiple
    of NC * BK): resident as NS <= NS_MAX tiles when they fit ``tile_bytes``, else one tile of at most
    ``chunk_bytes`` re-read along K every step."""
    bk = max(16, triton.next_power_of_2(triton.cdiv(K, nc * NS_MAX)))
    ns = triton.cdiv(K, nc * bk)
    if ns * nc * bk * N * itemsize <= tile_bytes:
        return bk, ns, True
    bk = max(16, min(bk, _pow2_floor(chunk_bytes // (nc * N * itemsize))))
    return bk, triton.cdiv(K, nc * bk), False


@functools.lru_cache(maxsize=None)
def _plan(H: int, itemsize: int, forward: bool, n_sm: int, interpreted: bool, resident_max: int,
          tile_bytes: int, chunk_bytes: int, persistent_ok: bool = True) -> Plan:
    """``plan`` with the module's knobs as arguments (a test that changes one gets a fresh plan)."""
    if H <= resident_max:  # forward: BH covers H (one tile); backward: BH units x BK rows of W_hh per dot
        bh = max(16, triton.next_power_of_2(H)) if forward else (16 if interpreted else 64)
        return Plan(False, True, True, 16, bh, 1, 1, 16 if interpreted else (32 if itemsize == 4 else 64), 4)
    nc = 2 if interpreted else SPLIT_WARPS
    bh = max(BH_MIN, triton.next_power_of_2(triton.cdiv(H, n_sm)))
    bh_max = _pow2_floor(chunk_bytes // (nc * 16 * itemsize * (4 if forward else 1)))  # a BK = 16 chunk fits
    persistent = persistent_ok and not interpreted and bh <= bh_max
    bh = min(bh, bh_max)
    bk, ns, resident = _split_tiles(H if forward else 4 * H, 4 * bh if forward else bh, itemsize, nc, tile_bytes,
                                    chunk_bytes)
    p = Plan(True, persistent, resident, 16, bh, ns, nc, bk, SPLIT_WARPS)
    logger.debug("lstm_layer_%s (triton): H=%d itemsize=%d, %d SMs -> %d programs, %s", "fwd" if forward else "bwd",
                 H, itemsize, n_sm, triton.cdiv(H, bh), p)
    return p


def plan(H: int, dtype: torch.dtype, device: torch.device, forward: bool) -> Plan:
    """Which kernel runs one layer direction, and its tiles.

    H <= RESIDENT_MAX: the row-block kernels (the whole W_hh is one register tile, no grid barrier). Otherwise the
    split kernels, BH = the smallest power of two >= BH_MIN that spreads the units over at most one program per SM
    (so every program is co-resident), persistent unless that BH would make the smallest chunk tile exceed
    CHUNK_BYTES (then the largest BH within it, one launch per step). The slice stays on chip when all of it fits
    TILE_BYTES, else it is re-read from L2 in chunk tiles (``_split_tiles``). The interpreter plans for INTERP_SMS
    SMs and two chunks per dot, and always launches per step (its programs run one after another)."""
    interpreted = device.type != "cuda"
    n_sm = INTERP_SMS if interpreted else torch.cuda.get_device_properties(device).multi_processor_count
    return _plan(H, dtype.itemsize, forward, n_sm, interpreted, RESIDENT_MAX, TILE_BYTES, CHUNK_BYTES, PERSISTENT)


def _launch_split(kernel, p: Plan, steps: int, tensors: tuple, sizes: tuple, **meta) -> None:
    """The split kernel over cdiv(H, BH) programs: once (persistent: grid barriers on a zeroed int32 counter) or
    once per step (``steps`` launches). ``sizes`` = (T, B, H, w_hh strides)."""
    bar = torch.zeros(2, dtype=torch.int32, device=tensors[0].device)  # arrival counter, and a slot for _trap
    run = wrap(kernel)[(triton.cdiv(sizes[2], p.BH),)]
    # num_stages=1: software pipelining stages the K-chunk loads in shared memory; at H = 768 bf16 the backward
    # then needed 446 KB (more than any GPU has) and spilled, 64 KB with one stage (sm_90 compile)
    meta.update(PERSISTENT=p.persistent, RESIDENT=p.resident, BM=p.BM, BH=p.BH, NS=p.NS, NC=p.NC, BK=p.BK,
                SPIN=SPIN_LIMIT, num_warps=p.warps, num_stages=1)
    for step in range(1 if p.persistent else steps):
        run(*tensors, bar, *sizes, step, **meta)


def lstm_layer_fwd(xproj: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, reverse: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of one layer direction. xproj (T, B, 4H) fp32 = x W_ih^T + b_ih + b_hh; h0, c0 (B, H)
    in the input dtype (w_hh's). Returns (out (T, B, H) in w_hh's dtype, ws (T, B, 5H) fp32)."""
    _checks.lstm_layer_fwd("lstm_layer_fwd_triton", xproj, w_hh, h0, c0)
    # the kernels index xproj, h0, c0 as contiguous (a copy only for a strided view)
    xproj, h0, c0 = xproj.contiguous(), h0.contiguous(), c0.contiguous()
    T, B, H4 = xproj.shape
    H = H4 // 4
    out = h0.new_empty(T, B, H)
    ws = xproj.new_empty(T, B, 5 * H)
    if not (T and B and H):
        return out, ws
    p = plan(H, w_hh.dtype, xproj.device, forward=True)
    sizes = (T, B, H, w_hh.stride(0), w_hh.stride(1))
    ieee = w_hh.dtype == torch.float32
    if p.split:
        _launch_split(_split_fwd_kernel, p, T, (xproj, w_hh, h0, c0, out, ws), sizes, REVERSE=reverse, IEEE=ieee)
    else:
        wrap(_seq_fwd_kernel)[(triton.cdiv(B, p.BM),)](
            xproj, w_hh, h0, c0, out, ws, *sizes, REVERSE=reverse, IEEE=ieee, BM=p.BM, BH=p.BH, num_warps=p.warps)
    return out, ws


def lstm_layer_bwd(grad_out: Optional[torch.Tensor], grad_hn: Optional[torch.Tensor],
                   grad_cn: Optional[torch.Tensor], c0: torch.Tensor, ws: torch.Tensor, w_hh: torch.Tensor,
                   reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgates (T, B, 4H) fp32, dh0 (B, H) fp32, dc0 (B, H) fp32)."""
    _checks.lstm_layer_bwd("lstm_layer_bwd_triton", grad_out, grad_hn, grad_cn, c0, ws, w_hh)
    # the kernels index these as contiguous (a copy only for a strided view)
    grad_out = grad_out.contiguous() if grad_out is not None else None
    c0, ws = c0.contiguous(), ws.contiguous()
    T, B, H5 = ws.shape
    H = H5 // 5
    dg = ws.new_empty(T, B, 4 * H)
    # the running dh (recurrent part) and dc start as the gradients of h_n and c_n; the kernels update them in place
    dh, dc = (g.to(ws.dtype, copy=True, memory_format=torch.contiguous_format) if g is not None
              else ws.new_zeros(B, H) for g in (grad_hn, grad_cn))
    if not (T and B and H):
        return dg, dh, dc
    p = plan(H, w_hh.dtype, ws.device, forward=False)
    sizes = (T, B, H, w_hh.stride(0), w_hh.stride(1))
    gout = grad_out if grad_out is not None else ws
    meta = dict(HAS_GOUT=grad_out is not None, REVERSE=reverse, IEEE=w_hh.dtype == torch.float32)
    if p.split:  # T + 1 processing steps: the last one only turns dG of the first step into dh0
        _launch_split(_split_bwd_kernel, p, T + 1, (gout, c0, ws, w_hh, dg, dh, dc), sizes, **meta)
    else:
        wrap(_seq_bwd_kernel)[(triton.cdiv(B, p.BM),)](
            gout, c0, ws, w_hh, dg, dh, dc, *sizes, **meta, BM=p.BM, BH=p.BH, BK=p.BK, num_warps=p.warps)
    return dg, dh, dc

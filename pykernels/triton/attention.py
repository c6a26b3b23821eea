"""Triton flash-attention kernels (contract: docs/attention.md).

Forward: one program per (query block, batch*head); online softmax over the key blocks the block can see
(causal and window block skipping; the blocks that need no masking run a loop without mask arithmetic), writes
the output, the per-row log-sum-exp and what its rounding lost (lse_lo, for the backward). Backward
(FlashAttention-2 style, recomputing the probabilities exp(s - lse - lse_lo); delta = rowsum(dO O) in a pass of its
own):
dK/dV per key block of one kv head, looping over the query heads of its GQA group and the query blocks
that can see it; dQ (and the float-mask gradient) per query block. Every gradient element is written once by one
program: the backward is deterministic (bitwise reproducible), no atomics.

Layout: dense calls see (B, H, L, E) for q/o, (B, H_kv, S, E|Ev) for k/v, any strides; varlen calls see the
packed (T, H, E) tensors as (1, H, T, E) views plus cu_seqlens (int32, nseq + 1) and the kernel finds each
sequence's rows from them. In the tile: causal with a diagonal offset (diag = 0 top-left, S - L bottom-right;
per sequence for varlen), a sliding window around that diagonal, logit soft-capping, an additive float mask or a
bool mask (True = attend) with broadcast strides, dropout from a counter-based RNG (Philox keyed by a seed read
on the device, counter = the global (row, column) index of the score, regenerated in the backward), GQA without
repeated K/V, any sequence length (masked boundary tiles), head dims 1..256 (padded to a power of two >= 16
with masked loads). A query row that sees no key gives zeros and lse = -inf, as PyTorch.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import _checks
from ._launch import timing_autotune_allowed, wrap
from ._math import tanh as _tanh

MAX_HEAD_DIM = 256


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _keep(seed, rows, cols, S, dropout_p):
    """Dropout keep-mask of a tile: Philox(seed; counter = row * S + col) > p. ``rows`` are global int64 query row
    indices (batch*head*rows + row), so every score of the call has its own counter; ``rows`` and the key columns
    ``cols`` come shaped to broadcast into the tile ((M, 1) and (1, N), or transposed for a (keys, queries) tile)."""
    idx = rows * S + cols.to(tl.int64)
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    zero = lo * 0
    r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(r) > dropout_p


@triton.jit
def _scores(a, b, qi, kj, Lb, Sb, scale, softcap, diag, win_left, win_right, bias_ptr, sbm, sbn,
            MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
            HAS_BIAS: tl.constexpr, BOOL_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """Scores a @ b of one tile in fp32 with -inf where masked; also tanh(s/cap) for the backward. ``qi`` / ``kj``:
    the query / key index of each row or column, shaped to broadcast into the tile: (M, 1) and (1, N) for a
    (queries, keys) tile (a = Q, b = K^T), (1, M) and (N, 1) for its transpose (a = K, b = Q^T; the dK/dV kernel).
    MASK=False: the caller knows the tile is inside the sequence and fully visible (no bound/causal/window)."""
    s = _dot(a, b, IEEE) * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    if HAS_BIAS:
        m = tl.load(bias_ptr + qi.to(tl.int64) * sbm + kj.to(tl.int64) * sbn, mask=(qi < Lb) & (kj < Sb), other=0)
        if BOOL_BIAS:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32)
    if MASK:
        ok = (kj < Sb) & (qi < Lb)
        if IS_CAUSAL:
            ok = ok & (kj <= qi + diag)
        if HAS_WINDOW:  # a negative bound means unbounded on that side
            ok = ok & ((kj >= qi + diag - win_left) | (win_left < 0))
            ok = ok & ((kj <= qi + diag + win_right) | (win_right < 0))
        s = tl.where(ok, s, float("-inf"))
    return s, t


@triton.jit
def _f32(scale, softcap, dropout_p):
    """The float arguments in fp32: Inductor passes Python floats as fp64 scalars, the eager launch as fp32."""
    return tl.cast(scale, tl.float32), tl.cast(softcap, tl.float32), tl.cast(dropout_p, tl.float32)


@triton.jit
def _seq(b, CuQ, CuK, L, S, diag, VARLEN: tl.constexpr, BR: tl.constexpr):
    """Start row, start key, lengths and causal diagonal of batch entry / sequence ``b``."""
    if VARLEN:
        q0 = tl.load(CuQ + b).to(tl.int64)
        k0 = tl.load(CuK + b).to(tl.int64)
        Lb = (tl.load(CuQ + b + 1) - tl.load(CuQ + b)).to(tl.int32)
        Sb = (tl.load(CuK + b + 1) - tl.load(CuK + b)).to(tl.int32)
    else:
        q0 = b * 0
        k0 = b * 0
        Lb = L + 0 * b.to(tl.int32)
        Sb = S + 0 * b.to(tl.int32)
    d = diag + 0 * Lb
    if BR:
        d = d + Sb - Lb
    return q0, k0, Lb, Sb, d


@triton.jit
def _tile(heads, BLOCK: tl.constexpr):
    """(first row of this program's tile, its batch * head index). The heads span grid axes 1 and 2 (_grid: CUDA
    caps each at 65535, which B * H can pass), the tiles axis 0, fastest, so neighbouring programs share one head's
    K/V in L2. The few programs past the last head (axes 1 x 2 round up) redo it: the same values to the same
    places. (Decoding one flat axis instead made ptxas spill 4x more in the sm_80 forward.)"""
    bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    return tl.program_id(0) * BLOCK, tl.minimum(bh, heads - 1)


@triton.jit
def _program(NBH, HEADS, CuQ, CuK, L, S, diag, VARLEN: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile: its first row (_tile), batch entry (0 for varlen, whose sequences are rows q0 / k0 of
    one packed entry), head (of HEADS per entry) and _seq's q0, k0, Lb, Sb, d."""
    start, bh = _tile(NBH, BLOCK)
    b = (bh // HEADS).to(tl.int64)
    head = (bh % HEADS).to(tl.int64)
    q0, k0, Lb, Sb, d = _seq(b, CuQ, CuK, L, S, diag, VARLEN, BR)
    if VARLEN:
        b = b * 0
    return start, b, head, q0, k0, Lb, Sb, d


@triton.jit
def _key_range(start_m, Lb, Sb, diag, win_left, win_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys a query block can see (causal / window block skipping) and ``mid``: the blocks in
    [lo, mid) are fully visible to every row of the block and need no masking."""
    lo = start_m * 0
    hi = start_m * 0 + Sb
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag)
    if HAS_WINDOW:
        hi = tl.where(win_right >= 0, tl.minimum(hi, start_m + BLOCK_M + diag + win_right), hi)
        lo = tl.where(win_left >= 0, tl.maximum(lo, start_m + diag - win_left), lo)
        lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, 0)
    hi = tl.where(start_m < Lb, hi, lo)  # query blocks past this sequence's end (varlen): nothing
    if HAS_WINDOW:
        mid = lo
    else:
        full = Sb
        if IS_CAUSAL:
            full = tl.minimum(full, start_m + diag + 1)
        mid = tl.maximum(tl.minimum((full // BLOCK_N) * BLOCK_N, hi), lo)
    return lo, mid, hi


@triton.jit
def _query_range(start_n, Lb, Sb, diag, win_left, win_right, IS_CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the queries that can see a key block (the transpose of _key_range, for dK/dV) and ``mid``: the
    query blocks in [mid, hi) (starts lo + k BLOCK_M) see every key of the block and need no masking."""
    lo = start_n * 0
    hi = start_n * 0 + Lb
    if IS_CAUSAL:
        lo = tl.maximum(lo, start_n - diag)
    if HAS_WINDOW:
        lo = tl.where(win_right >= 0, tl.maximum(lo, start_n - diag - win_right), lo)
        hi = tl.where(win_left >= 0, tl.minimum(hi, start_n + BLOCK_N - diag + win_left), hi)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n < Sb, hi, lo)
    if HAS_WINDOW:
        mid = hi
    else:
        first = lo  # the first query that sees the whole block: past the causal diagonal of its last key
        if IS_CAUSAL:
            first = tl.maximum(first, start_n + BLOCK_N - 1 - diag)
        mid = lo + tl.cdiv(first - lo, BLOCK_M) * BLOCK_M  # on the lo + k BLOCK_M lattice
        # keys past the end (k = 0 rows) need no mask either: dK, dV are column-wise in the keys (each key's p, dS
        # column meets only its own rows of K, V, dK, dV) and their rows are never stored
        mid = tl.maximum(tl.minimum(mid, hi), lo)
    return lo, mid, hi


@triton.jit
def _fwd_step(acc, m_i, l_i, q, kb, vb, start_n, offs_m, offs_d, offs_e, Lb, Sb, skn, skd, svn, svd, HEAD_E,
              HEAD_EV, scale, softcap, diag, win_left, win_right, bias_ptr, sbm, sbn, seed, rows, S_all,
              dropout_p, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BOOL_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
              IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = tl.load(kb + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                mask=(offs_n[None, :] < Sb) & (offs_d[:, None] < HEAD_E), other=0.0)
    s, _ = _scores(q, k, offs_m[:, None], offs_n[None, :], Lb, Sb, scale, softcap, diag, win_left, win_right,
                   bias_ptr, sbm, sbn, MASK, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, BOOL_BIAS, IEEE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: no NaN
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(vb + offs_n[:, None].to(tl.int64) * svn + offs_e[None, :] * svd,
                mask=(offs_n[:, None] < Sb) & (offs_e[None, :] < HEAD_EV), other=0.0)
    if DROPOUT:  # the normaliser sums the undropped probabilities; the output uses the kept ones, rescaled
        p = tl.where(_keep(seed, rows[:, None], offs_n[None, :], S_all, dropout_p), p / (1.0 - dropout_p), 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, Bias, O, LSE, LSE_LO, CuQ, CuK, Seed, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
              sbb, sbh, sbm, sbn, sob, soh, som, sod, H, GROUP, L, S, HEAD_E, HEAD_EV, scale, softcap, diag,
              win_left, win_right, dropout_p, NBH, IS_CAUSAL: tl.constexpr, BR: tl.constexpr,
              HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BOOL_BIAS: tl.constexpr,
              DROPOUT: tl.constexpr, VARLEN: tl.constexpr, IEEE: tl.constexpr, E: tl.constexpr,
              EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    scale, softcap, dropout_p = _f32(scale, softcap, dropout_p)
    start_m, b, h, q0, k0, Lb, Sb, d = _program(NBH, H, CuQ, CuK, L, S, diag, VARLEN, BR, BLOCK_M)
    hk = h // GROUP  # GQA: the kv head of this query head, no repeated K/V in memory
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, E)
    offs_e = tl.arange(0, EV)
    q = tl.load(Q + b * sqb + h * sqh + (q0 + offs_m[:, None]) * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lb) & (offs_d[None, :] < HEAD_E), other=0.0)
    kb = K + b * skb + hk * skh + k0 * skn
    vb = V + b * svb + hk * svh + k0 * svn
    bias_ptr = Bias + b * sbb + h * sbh
    rows = (b * H + h) * L + q0 + offs_m  # global score rows (lse index, dropout counter)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, EV], tl.float32)
    lo, mid, hi = _key_range(start_m, Lb, Sb, d, win_left, win_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, mid, BLOCK_N):  # fully visible blocks: no mask arithmetic
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kb, vb, start_n, offs_m, offs_d, offs_e, Lb, Sb, skn, skd,
                                  svn, svd, HEAD_E, HEAD_EV, scale, softcap, d, win_left, win_right, bias_ptr, sbm,
                                  sbn, seed, rows, S, dropout_p, False, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS,
                                  BOOL_BIAS, DROPOUT, IEEE, BLOCK_N)
    for start_n in range(mid, hi, BLOCK_N):  # the diagonal / boundary blocks
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, kb, vb, start_n, offs_m, offs_d, offs_e, Lb, Sb, skn, skd,
                                  svn, svd, HEAD_E, HEAD_EV, scale, softcap, d, win_left, win_right, bias_ptr, sbm,
                                  sbn, seed, rows, S, dropout_p, True, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS,
                                  BOOL_BIAS, DROPOUT, IEEE, BLOCK_N)
    # only l_i == 0 means "saw no key": a NaN l_i (a NaN or +inf score, inf - inf in q.k) is not > 0 but must give
    # a NaN output and lse (and so NaN gradients through _probs), as torch
    seen = l_i != 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(O + b * sob + h * soh + (q0 + offs_m[:, None]) * som + offs_e[None, :] * sod,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lb) & (offs_e[None, :] < HEAD_EV))
    log_l = tl.log(tl.where(seen, l_i, 1.0))
    lse = tl.where(seen, m_i + log_l, float("-inf"))
    # what rounding took from lse = m_i + log_l, exactly (Knuth's TwoSum): a row whose scores all sit at a huge mask
    # value (finfo.min: lse rounds back to m_i) keeps its log(l) here for the backward; 0 in rows without keys
    m_s, lse_s = tl.where(seen, m_i, 0.0), tl.where(seen, lse, 0.0)
    back = lse_s - m_s
    lse_lo = (m_s - (lse_s - back)) + (log_l - back)
    # lse rounded up (lse_lo < 0, only where an ulp of m_i exceeds 2 log(l), e.g. -1e8 at 100 keys) would make the
    # backward scale dO up by exp(-lse_lo), out of fp16's range: take the float below (>= m_i, so the recomputed
    # probabilities stay <= 1; m_i - lse exact by Sterbenz), and the scale is <= 1
    up = lse_lo < -0.0009765625
    bits = lse_s.to(tl.int32, bitcast=True)
    lse_dn = tl.where(lse_s < 0, bits + 1, bits - 1).to(tl.float32, bitcast=True)
    lse = tl.where(up, lse_dn, lse)
    lse_lo = tl.where(up, (m_s - lse_dn) + log_l, lse_lo)
    tl.store(LSE + rows, lse, mask=offs_m < Lb)
    tl.store(LSE_LO + rows, lse_lo, mask=offs_m < Lb)


@triton.jit
def _probs(s, lse, lse_lo):
    """p = exp(s - lse - lse_lo) of a recomputed tile (lse, lse_lo: the queries' values shaped to broadcast into
    it, as _scores' qi; lse_lo may be 0.0); queries that saw no key (lse = -inf) give 0, not NaN. s - lse first:
    both sit at a huge mask value in a row the mask fills (finfo.min, where lse + lse_lo rounds back to lse), and
    their difference is small, so lse_lo (there log S) still counts."""
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(lse == float("-inf"), 0.0, tl.exp((s - lse_safe) - lse_lo))


@triton.jit
def _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_d, offs_e, Q, DO, LSE, LSE_LO, DELTA, b, h, q0, Lb, Sb, L, S, H,
               sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, HEAD_E, HEAD_EV, scale, softcap, d, win_left, win_right,
               bias_ptr, sbm, sbn, seed, dropout_p, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BOOL_BIAS: tl.constexpr,
               DROPOUT: tl.constexpr, HAS_LSE_LO: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block's contribution to a key block's dK, dV. MASK=False: every key of the block is visible to
    every query of the sequence in the query block (queries past its end see nothing through their lse).
    Every tile is (keys, queries), the transpose of the forward's: all four products then have the key block as
    their M dimension (S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q), which Hopper's wgmma needs to be
    64 rows per warpgroup; a query block as M (S = Q K^T with 32 queries) took mma.sync there."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    qT = tl.load(Q + b * sqb + h * sqh + (q0 + offs_m[None, :]) * sqm + offs_d[:, None] * sqd,
                 mask=(offs_m[None, :] < Lb) & (offs_d[:, None] < HEAD_E), other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + (q0 + offs_m[:, None]) * sdm + offs_e[None, :] * sdd,
                 mask=(offs_m[:, None] < Lb) & (offs_e[None, :] < HEAD_EV), other=0.0)
    rows = (b * H + h) * L + q0 + offs_m
    lse = tl.load(LSE + rows, mask=offs_m < Lb, other=float("-inf"))
    lse_lo = tl.zeros([BLOCK_M], tl.float32)
    if HAS_LSE_LO:
        lse_lo = tl.load(LSE_LO + rows, mask=offs_m < Lb, other=0.0)
    delta = tl.load(DELTA + rows, mask=offs_m < Lb, other=0.0)
    sT, tT = _scores(k, qT, offs_m[None, :], offs_n[:, None], Lb, Sb, scale, softcap, d, win_left, win_right,
                     bias_ptr, sbm, sbn, MASK, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, BOOL_BIAS, IEEE)
    pT = _probs(sT, lse[None, :], lse_lo[None, :])
    dpT = _dot(v, tl.trans(do), IEEE)
    if DROPOUT:
        keep = _keep(seed, rows[None, :], offs_n[:, None], S, dropout_p)
        dv += _dot(tl.where(keep, pT / (1.0 - dropout_p), 0.0).to(do.dtype), do, IEEE)
        dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
    else:
        dv += _dot(pT.to(do.dtype), do, IEEE)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, Bias, DO, LSE, LSE_LO, DELTA, DK, DV, CuQ, CuK, Seed, sqb, sqh, sqm, sqd, skb, skh, skn,
                   skd, svb, svh, svn, svd, sbb, sbh, sbm, sbn, sdb, sdh, sdm, sdd, H, GROUP, L, S, HEAD_E, HEAD_EV,
                   scale, softcap, diag, win_left, win_right, dropout_p, NBH, IS_CAUSAL: tl.constexpr,
                   BR: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BOOL_BIAS: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, HAS_LSE_LO: tl.constexpr,
                   IEEE: tl.constexpr, E: tl.constexpr, EV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one kv head: loops over the query heads of its GQA group and over the query
    blocks that can see the key block, so every gradient is written once, deterministically (no atomics).
    The query blocks that see every key of the block run without mask arithmetic, as the forward's key blocks.
    dK/dV are stored with the strides of K/V (the launcher allocates them like K/V)."""
    scale, softcap, dropout_p = _f32(scale, softcap, dropout_p)
    start_n, b, hk, q0, k0, Lb, Sb, d = _program(NBH, H // GROUP, CuQ, CuK, L, S, diag, VARLEN, BR, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, E)
    offs_e = tl.arange(0, EV)
    k = tl.load(K + b * skb + hk * skh + (k0 + offs_n[:, None]) * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < Sb) & (offs_d[None, :] < HEAD_E), other=0.0)
    v = tl.load(V + b * svb + hk * svh + (k0 + offs_n[:, None]) * svn + offs_e[None, :] * svd,
                mask=(offs_n[:, None] < Sb) & (offs_e[None, :] < HEAD_EV), other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dk = tl.zeros([BLOCK_N, E], tl.float32)
    dv = tl.zeros([BLOCK_N, EV], tl.float32)
    m_lo, m_mid, m_hi = _query_range(start_n, Lb, Sb, d, win_left, win_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M,
                                     BLOCK_N)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bias_ptr = Bias + b * sbb + h * sbh
        for start_m in range(m_lo, m_mid, BLOCK_M):  # the diagonal / boundary query blocks
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_d, offs_e, Q, DO, LSE, LSE_LO, DELTA, b, h,
                                q0, Lb, Sb, L, S, H, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, HEAD_E, HEAD_EV, scale,
                                softcap, d, win_left, win_right, bias_ptr, sbm, sbn, seed, dropout_p, True,
                                IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, BOOL_BIAS, DROPOUT, HAS_LSE_LO, IEEE,
                                BLOCK_M)
        for start_m in range(m_mid, m_hi, BLOCK_M):  # blocks that see every key: no mask arithmetic
            dk, dv = _dkdv_step(dk, dv, k, v, start_m, offs_n, offs_d, offs_e, Q, DO, LSE, LSE_LO, DELTA, b, h,
                                q0, Lb, Sb, L, S, H, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, HEAD_E, HEAD_EV, scale,
                                softcap, d, win_left, win_right, bias_ptr, sbm, sbn, seed, dropout_p, False,
                                IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, BOOL_BIAS, DROPOUT, HAS_LSE_LO, IEEE,
                                BLOCK_M)
    dk = dk * scale
    tl.store(DK + b * skb + hk * skh + (k0 + offs_n[:, None]) * skn + offs_d[None, :] * skd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < Sb) & (offs_d[None, :] < HEAD_E))
    tl.store(DV + b * svb + hk * svh + (k0 + offs_n[:, None]) * svn + offs_e[None, :] * svd,
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < Sb) & (offs_e[None, :] < HEAD_EV))


@triton.jit
def _attn_bwd_dq(Q, K, V, Bias, DO, LSE, LSE_LO, DELTA, DQ, DBias, CuQ, CuK, Seed, sqb, sqh, sqm, sqd, skb, skh, skn,
                 skd, svb, svh, svn, svd, sbb, sbh, sbm, sbn, sdb, sdh, sdm, sdd, H, GROUP, L, S, HEAD_E, HEAD_EV,
                 scale, softcap, diag, win_left, win_right, dropout_p, NBH, IS_CAUSAL: tl.constexpr,
                 BR: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BOOL_BIAS: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, HAS_LSE_LO: tl.constexpr,
                 IEEE: tl.constexpr, DBIAS: tl.constexpr, E: tl.constexpr, EV: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """dQ of one query block (stored with Q's strides); with DBIAS also the gradient of the float mask, the
    score gradient dS, into a dense fp32 (B, H, L, S) buffer (zero where never visited)."""
    scale, softcap, dropout_p = _f32(scale, softcap, dropout_p)
    start_m, b, h, q0, k0, Lb, Sb, d = _program(NBH, H, CuQ, CuK, L, S, diag, VARLEN, BR, BLOCK_M)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, E)
    offs_e = tl.arange(0, EV)
    # loaded here, not through a helper shared with _dkdv_step: a helper called with Q, DO, LSE, DELTA at this
    # level makes torch's Triton mutation analysis count them as written (tests/test_triton_compile_view.py)
    q = tl.load(Q + b * sqb + h * sqh + (q0 + offs_m[:, None]) * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lb) & (offs_d[None, :] < HEAD_E), other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + (q0 + offs_m[:, None]) * sdm + offs_e[None, :] * sdd,
                 mask=(offs_m[:, None] < Lb) & (offs_e[None, :] < HEAD_EV), other=0.0)
    rows = (b * H + h) * L + q0 + offs_m
    # P = r P~ with P~ = exp(s - lse) and r = exp(-lse_lo) per row: dQ's sum runs along the row, so r is applied
    # to the fp32 dQ at the end, never to the 16-bit dS (no underflow in rows the mask fills, and no row vector
    # held across the loop: on sm_80 that spilled)
    lse = tl.load(LSE + rows, mask=offs_m < Lb, other=float("-inf"))
    r = tl.full([BLOCK_M], 1.0, tl.float32)
    if HAS_LSE_LO and DBIAS:  # (the mask's gradient is the true dS, element by element)
        r = tl.exp(-tl.load(LSE_LO + rows, mask=offs_m < Lb, other=0.0))
    delta = tl.load(DELTA + rows, mask=offs_m < Lb, other=0.0)
    bias_ptr = Bias + b * sbb + h * sbh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, E], tl.float32)
    lo, _, hi = _key_range(start_m, Lb, Sb, d, win_left, win_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # K in its own (BLOCK_N, E) layout: dQ's product takes it as is, the scores take its transpose (a view)
        k = tl.load(K + b * skb + hk * skh + (k0 + offs_n[:, None]) * skn + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < Sb) & (offs_d[None, :] < HEAD_E), other=0.0)
        vT = tl.load(V + b * svb + hk * svh + (k0 + offs_n[None, :]) * svn + offs_e[:, None] * svd,
                     mask=(offs_e[:, None] < HEAD_EV) & (offs_n[None, :] < Sb), other=0.0)
        s, t = _scores(q, tl.trans(k), offs_m[:, None], offs_n[None, :], Lb, Sb, scale, softcap, d, win_left,
                       win_right, bias_ptr, sbm, sbn, True, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, BOOL_BIAS, IEEE)
        p = _probs(s, lse[:, None], 0.0)
        dp = _dot(do, vT, IEEE)
        if DROPOUT:
            dp = tl.where(_keep(seed, rows[:, None], offs_n[None, :], S, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if DBIAS:
            tl.store(DBias + rows[:, None] * S + offs_n[None, :], ds * r[:, None],
                     mask=(offs_m[:, None] < Lb) & (offs_n[None, :] < Sb))
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(q.dtype), k, IEEE)
    if HAS_LSE_LO and not DBIAS:  # (DBIAS loaded r above; here from a scalar base: `rows` held across the
        # loop spilled on sm_80)
        lo_base = LSE_LO + ((b * H + h) * L + q0 + start_m)
        r = tl.exp(-tl.load(lo_base + tl.arange(0, BLOCK_M), mask=offs_m < Lb, other=0.0))
    dq = dq * (scale * r)[:, None]
    tl.store(DQ + b * sqb + h * sqh + (q0 + offs_m[:, None]) * sqm + offs_d[None, :] * sqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lb) & (offs_d[None, :] < HEAD_E))


@triton.jit
def _attn_bwd_delta(DO, O, Delta, sdb, sdh, sdm, sdd, sob, soh, som, sod, H, L, HEAD_EV, NBH, EV: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, in the lse's layout (B * H rows of L): the softmax backward's shift, in one
    pass over dO and O (as torch ops: fp32 copies of both, their product, its sum; ~7x the bytes)."""
    start_m, bh = _tile(NBH, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, EV)
    inside = (offs_m[:, None] < L) & (offs_e[None, :] < HEAD_EV)
    rows = offs_m[:, None].to(tl.int64)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdm + offs_e[None, :] * sdd, mask=inside, other=0.0)
    o = tl.load(O + b * sob + h * soh + rows * som + offs_e[None, :] * sod, mask=inside, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1),
             mask=offs_m < L)


@triton.jit
def _dropout_mask_kernel(Out, Seed, L, S, dropout_p, NBH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels use, materialised as (B*H, L, S) bool (tests, debugging); the (row,
    column) tiles on grid axis 0, the heads as the attention kernels'."""
    dropout_p = tl.cast(dropout_p, tl.float32)
    tile, bh = _tile(NBH, 1)
    tiles_n = tl.cdiv(S, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = bh.to(tl.int64) * L + offs_m
    keep = _keep(tl.load(Seed), rows[:, None], offs_n[None, :], S, dropout_p)
    tl.store(Out + rows[:, None] * S + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ----------------------------------------------------------------------------------------------------------
# Launchers (their signatures are the operator schemas: docs/attention.md).

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tiles measured per GPU architecture by bench/tune_attention.py (16-bit inputs): {"sm_90": {"entries": {key: {"tile":
# [BLOCK_M, BLOCK_N, num_warps, num_stages], ...}}, "device": ..., "date": ...}} with key "<kind>/<head-dim bucket>/
# <causal|full>". A call it has no entry for takes the table in config(). TILE_OVERRIDE (kind -> tile) is the tune
# script's way to launch a candidate.
TILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_tiles.json")
TILE_OVERRIDE: dict = {}


def load_tiles(path: str = TILES_FILE) -> dict:
    """The measured tiles (read once at import, not while a launch is traced; the tune script reloads them)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


MEASURED_TILES = load_tiles()


def tile_key(kind: str, E: int, EV: int, causal: bool) -> str:
    return f"{kind}/{max(64, triton.next_power_of_2(max(E, EV)))}/{'causal' if causal else 'full'}"


def _arch(device: Optional[torch.device]) -> Optional[str]:
    if device is None or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def config(E: int, EV: int, dtype: torch.dtype, kind: str, device: Optional[torch.device] = None,
           causal: bool = False, arch: Optional[str] = None) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; kind is "fwd", "dkdv" or "dq". On a GPU whose
    architecture bench/tune_attention.py measured (attention_tiles.json), 16-bit calls take its winner. ``arch``
    ("sm_90", ...) stands for the device's (compiling without a GPU)."""
    if kind in TILE_OVERRIDE:  # (first: the tests launch unequal tiles under the interpreter too)
        return tuple(TILE_OVERRIDE[kind])
    if _interpreted():
        return 16, 16, 4, 1
    if dtype in (torch.float16, torch.bfloat16):  # (the fp32 tiles below are the same on every architecture)
        arch = arch or _arch(device)
        entry = MEASURED_TILES.get(arch or "", {}).get("entries", {}).get(tile_key(kind, E, EV, causal))
        if entry:
            return tuple(entry["tile"])
    e = max(E, EV)
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve them
        if e > 128:  # dK/dV with a float mask needs 102400 B of shared memory at 32-key tiles, over the 101376 B a
            # block may have on sm_86 / sm_89 (A10, L4, RTX 30/40); 66560 B at 16
            return (16, 16, 4, 1) if kind == "dkdv" else (16, 32, 4, 1)
        return (64, 32, 4, 2) if e <= 64 else (32, 32, 4, 2)
    if kind == "fwd":
        if e <= 64:
            return 128, 64, 4, 3
        if e <= 128:
            return 128, 64, 8, 3
        return 64, 32, 4, 2
    if e <= 64:
        return (64, 64, 4, 2) if kind == "dq" else (32, 64, 4, 2)
    if e <= 128:  # (ptxas -v on the kernels compiled as launched: tests/test_triton_attention_compile.py)
        # On Hopper the tile's M (dQ: queries; dK/dV: keys) is 128 for 8 warps, 64 rows for each warpgroup, wgmma's
        # M: with 64, Triton lays S (dK/dV: S^T) and dP out over all 8 warps, 16 rows each, so both warpgroups
        # compute the same products. dK/dV takes 16 queries a step (no spill; 32: 188 bytes). On sm_80 (mma.sync,
        # 16 rows a warp) the 64-row tiles, which spill least there.
        if kind == "dq":
            return (128, 32, 8, 2) if arch == "sm_90" else (64, 32, 8, 2)
        return (16, 128, 8, 2) if arch == "sm_90" else (32, 64, 8, 2)
    if kind == "dq":  # Hopper: as at 128, 128 queries for 8 warps on wgmma, no spill causal or with softcap and
        # window (192 KB of shared memory); with a mask tensor 132-424 bytes (the mma.sync 32 x 32 tile: 0-32)
        return (128, 32, 8, 2) if arch == "sm_90" else (32, 32, 4, 1)
    return 16, 32, 4, 1  # (dK/dV on wgmma needs 64 keys: 712 bytes of spill on sm_90)


def autotune_enabled() -> bool:
    """Opt-in GPU autotuning (PYKERNELS_ATTN_AUTOTUNE=1): each kernel variant is timed over the candidate tiles
    of its head dim the first time it runs (keyed on head dims, GQA group, dtypes and the feature flags, not on
    the sequence lengths, so varlen batches do not retune). Off by default, and under deterministic algorithms:
    the table of ``config`` is used."""
    return os.environ.get("PYKERNELS_ATTN_AUTOTUNE") == "1" and not _interpreted() and timing_autotune_allowed()


def _prune(configs, named_args, **kwargs):
    """Drop the tiles that cannot fit (or spill badly) at this head dim: the Q/K/V tiles and the fp32
    accumulators grow with E, shared memory with BLOCK_N * E * stages."""
    e = max(kwargs.get("E", named_args.get("E", 64)), kwargs.get("EV", named_args.get("EV", 64)))
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = (bn * e * 2 * 2) * max(c.num_stages, 1) + bm * e * 2
        if smem <= 200 * 1024 and bm * e <= 128 * 128 and bn * e <= 128 * 128:
            keep.append(c)
    return keep or configs[:1]


def autotune_configs(kind: str):
    """Candidate tiles per kernel kind (the per-head-dim pruning happens in ``_prune``)."""
    out = []
    if kind == "fwd":
        for bm in (64, 128):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                                 num_stages=stages))
    else:
        for bm in (16, 32, 64):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2):
                        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                                 num_stages=stages))
    return out


_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}
_TUNED = {}
_TUNE_KEY = ["H", "GROUP", "HEAD_E", "HEAD_EV", "IS_CAUSAL", "HAS_WINDOW", "SOFTCAP", "HAS_BIAS", "DROPOUT",
             "VARLEN"]


def _tuned(kind: str):
    if kind not in _TUNED:
        _TUNED[kind] = triton.autotune(autotune_configs(kind), key=_TUNE_KEY,
                                       prune_configs_by={"early_config_prune": _prune})(_KERNELS[kind])
    return _TUNED[kind]


_GRID_YZ = 65535  # CUDA's cap on grid axes 1 and 2


def _grid(tiles: int, heads: int) -> Tuple[int, int, int]:
    """(tiles, y, z), y * z >= heads with y, z <= _GRID_YZ and the fewest extra programs (see _tile)."""
    z = max(1, triton.cdiv(heads, _GRID_YZ))
    return tiles, triton.cdiv(heads, z), z


def _launch(kind: str, grid_fn, flags, *args) -> None:
    if autotune_enabled():
        fixed = {k: v for k, v in flags.items() if k not in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        wrap(_tuned(kind))[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](
            *args, **fixed)
    else:
        wrap(_KERNELS[kind])[grid_fn(flags["BLOCK_M"], flags["BLOCK_N"])](*args, **flags)


def _view4(t: torch.Tensor, varlen: bool) -> torch.Tensor:
    """(T, H, E) packed -> (1, H, T, E) view; dense tensors pass through."""
    return t.permute(1, 0, 2).unsqueeze(0) if varlen else t


def _nonoverlapping_dense(t: torch.Tensor) -> bool:
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _unit_head(t: torch.Tensor) -> torch.Tensor:
    """The head dim innermost: the kernels form head-dim offsets in int32 (int64 ones spill), which only a unit
    stride (Triton specialises it) keeps in range for any layout."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Same strides as torch.empty_like gives (so a gradient can share the input's strides), head dim innermost."""
    t = _unit_head(t)
    return t if _nonoverlapping_dense(t) else t.contiguous()


def _bias_args(bias: Optional[torch.Tensor], B: int, H: int, L: int, S: int, like: torch.Tensor):
    """A mask broadcast to (B, H, L, S) through strides (0 on broadcast dims): no expansion in memory."""
    if bias is None:
        return like, (0, 0, 0, 0)
    b = bias.expand(B, H, L, S)
    return b, b.stride()


def _common(q4, k4, v4, bias, cu_q, cu_k, max_q, is_causal, bottom_right, window, softcap, dropout_p, kind):
    varlen = cu_q is not None
    B = cu_q.numel() - 1 if varlen else q4.shape[0]
    H, L, E = q4.shape[1], q4.shape[2], q4.shape[3]
    Hk, S, EV = k4.shape[1], k4.shape[2], v4.shape[3]
    BM, BN, warps, stages = config(E, EV, q4.dtype, kind, q4.device, bool(is_causal))
    flags = dict(IS_CAUSAL=bool(is_causal), BR=bool(bottom_right), HAS_WINDOW=tuple(window) != (-1, -1),
                 SOFTCAP=bool(softcap), HAS_BIAS=bias is not None,
                 BOOL_BIAS=bias is not None and bias.dtype == torch.bool, DROPOUT=dropout_p > 0.0, VARLEN=varlen,
                 IEEE=q4.dtype == torch.float32, E=max(16, triton.next_power_of_2(E)),
                 EV=max(16, triton.next_power_of_2(EV)), BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
    if not _interpreted():
        flags["num_stages"] = stages
    rows_q = max_q if varlen else L
    return B, H, L, E, Hk, S, EV, BM, BN, rows_q, flags


def _scalars(H, Hk, L, S, E, EV, scale, softcap, diag, window, dropout_p):
    return (H, H // Hk, L, S, E, EV, float(scale), float(softcap or 1.0), int(diag), int(window[0]),
            int(window[1]), float(dropout_p))


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                  cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
                  max_seqlen_k: int, scale: float, is_causal: bool, diag: int, bottom_right: bool, win_left: int,
                  win_right: int, softcap: float, dropout_p: float, seed: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense: q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) -> out (B, H, L, Ev), lse (B, H, L) fp32 and
    lse_lo (lse's layout: the row's log-sum-exp minus lse, what its rounding lost).
    Varlen (cu_seqlens given): q (T, H, E), k/v (Tk, Hk, E|Ev) -> out (T, H, Ev), lse and lse_lo (H, T) fp32."""
    _checks.attention("attention_fwd_triton", q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      dropout_p, seed)
    varlen = cu_seqlens_q is not None
    q, k, v = _unit_head(q), _unit_head(k), _unit_head(v)
    q4, k4, v4 = _view4(q, varlen), _view4(k, varlen), _view4(v, varlen)
    B, H, L, E, Hk, S, EV, BM, BN, rows_q, flags = _common(q4, k4, v4, bias, cu_seqlens_q, cu_seqlens_k,
                                                           max_seqlen_q, is_causal, bottom_right,
                                                           (win_left, win_right), softcap, dropout_p, "fwd")
    if varlen:  # padding rows past cu_seqlens_q[-1] belong to no program: 0 and -inf, as a row without keys
        o = q.new_zeros(q.shape[0], H, EV)
        lse = torch.full((H, q.shape[0]), float("-inf"), device=q.device, dtype=torch.float32)
        lse_lo = torch.zeros_like(lse)
    else:
        o = q.new_empty(B, H, L, EV)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        lse_lo = torch.empty_like(lse)
    o4 = _view4(o, varlen)
    bias_t, sb = _bias_args(bias, B, H, L, S, q)
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if varlen else (None, None)  # see _seq
    seed_t = seed if seed is not None else q
    _launch("fwd", lambda bm, bn: _grid(triton.cdiv(rows_q, bm), B * H), flags,
            q4, k4, v4, bias_t, o4, lse, lse_lo, cu_q, cu_k, seed_t, *q4.stride(), *k4.stride(), *v4.stride(),
            *sb, *o4.stride(), *_scalars(H, Hk, L, S, E, EV, scale, softcap, diag, (win_left, win_right), dropout_p),
            B * H)
    return o, lse, lse_lo


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, lse_lo: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  is_causal: bool, diag: int, bottom_right: bool, win_left: int, win_right: int, softcap: float,
                  dropout_p: float, seed: Optional[torch.Tensor], bias_requires_grad: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (dtypes and strides of q, k, v when those are dense; dk/dv summed over each GQA group
    in-kernel) and dbias: the gradient of a float mask, summed to the mask's shape (empty when
    bias_requires_grad is False); the probabilities exp(s - lse - lse_lo) (lse_lo None: exp(s - lse))."""
    _checks.attention("attention_bwd_triton", q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      dropout_p, seed, grad_out, out, lse, lse_lo)
    varlen = cu_seqlens_q is not None
    q, k, v = _dense(q), _dense(k), _dense(v)
    q4, k4, v4 = _view4(q, varlen), _view4(k, varlen), _view4(v, varlen)
    do4 = _view4(_unit_head(grad_out), varlen)
    window = (win_left, win_right)
    B, H, L, E, Hk, S, EV, BM, BN, rows_q, flags = _common(q4, k4, v4, bias, cu_seqlens_q, cu_seqlens_k,
                                                           max_seqlen_q, is_causal, bottom_right, window, softcap,
                                                           dropout_p, "dq")
    delta = _delta(do4, _view4(_unit_head(out), varlen), flags["EV"])  # (head-dim offsets are int32)
    flags["HAS_LSE_LO"] = lse_lo is not None
    lse_lo_t = lse if lse_lo is None else lse_lo  # (a pointer the kernels do not read)
    new = torch.zeros_like if varlen else torch.empty_like  # varlen padding rows: no program writes them
    dq, dk, dv = new(q), new(k), new(v)
    dq4, dk4, dv4 = _view4(dq, varlen), _view4(dk, varlen), _view4(dv, varlen)
    bias_t, sb = _bias_args(bias, B, H, L, S, q)
    want_dbias = bool(bias_requires_grad) and bias is not None and bias.dtype != torch.bool
    dbias_full = (torch.zeros(B, H, L, S, device=q.device, dtype=torch.float32) if want_dbias
                  else q.new_empty(0, dtype=torch.float32))
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if varlen else (None, None)  # see _seq
    seed_t = seed if seed is not None else q
    scalars = _scalars(H, Hk, L, S, E, EV, scale, softcap, diag, window, dropout_p)
    strides = (*q4.stride(), *k4.stride(), *v4.stride(), *sb, *do4.stride())
    _launch("dq", lambda bm, bn: _grid(triton.cdiv(rows_q, bm), B * H), dict(flags, DBIAS=want_dbias),
            q4, k4, v4, bias_t, do4, lse, lse_lo_t, delta, dq4, dbias_full, cu_q, cu_k, seed_t, *strides, *scalars,
            B * H)
    BM2, BN2, warps2, stages2 = config(E, EV, q4.dtype, "dkdv", q4.device, bool(is_causal))
    flags.update(BLOCK_M=BM2, BLOCK_N=BN2, num_warps=warps2)
    if "num_stages" in flags:
        flags["num_stages"] = stages2
    rows_k = max_seqlen_k if varlen else S
    _launch("dkdv", lambda bm, bn: _grid(triton.cdiv(rows_k, bn), B * Hk), flags,
            q4, k4, v4, bias_t, do4, lse, lse_lo_t, delta, dk4, dv4, cu_q, cu_k, seed_t, *strides, *scalars, B * Hk)
    if want_dbias:
        dbias = dbias_full.sum_to_size(bias.shape).to(bias.dtype)  # over the broadcast dims of the mask
    else:
        dbias = q.new_empty(0)
    return dq, dk, dv, dbias


def _delta(do4: torch.Tensor, o4: torch.Tensor, EV: int) -> torch.Tensor:
    """rowsum(dO * O) of (B, H, L, Ev) views, fp32 (B, H, L) (varlen: (1, H, T), the lse's (H, T))."""
    B, H, L, Ev = o4.shape
    delta = torch.empty(B, H, L, device=o4.device, dtype=torch.float32)
    BM = 16 if _interpreted() else max(16, 4096 // EV)  # 4096 elements of each tile: 64 fp32 registers a thread
    wrap(_attn_bwd_delta)[_grid(triton.cdiv(L, BM), B * H)](do4, o4, delta, *do4.stride(), *o4.stride(), H, L, Ev,
                                                             B * H, EV=EV, BLOCK_M=BM, num_warps=4)
    return delta


def dropout_mask(seed: torch.Tensor, B: int, H: int, L: int, S: int, dropout_p: float) -> torch.Tensor:
    """(B, H, L, S) bool keep-mask of a dense call with this seed (the mask the kernels apply)."""
    out = torch.empty(B, H, L, S, device=seed.device, dtype=torch.int8)
    BM, BN = (16, 16) if _interpreted() else (64, 64)
    grid = _grid(triton.cdiv(L, BM) * triton.cdiv(S, BN), B * H)
    wrap(_dropout_mask_kernel)[grid](out, seed, L, S, float(dropout_p), B * H, BLOCK_M=BM, BLOCK_N=BN)
    return out.bool()


def default_scale(E: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(E) if scale is None else scale

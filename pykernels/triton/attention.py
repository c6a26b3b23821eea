"""Triton flash-attention kernels: forward (online softmax, lse) and backward (dK/dV per key block looping over
the query heads of its GQA group — deterministic, no atomics — and dQ per query block).

Layout (B, H, L, E) for q/o, (B, H_kv, S, E|Ev) for k/v, any strides. Features in the tile: causal with a
diagonal offset (0: top-left, S - L: bottom-right), sliding window around that diagonal, logit soft-capping,
an additive bias with broadcast strides (a bool mask arrives as 0 / -inf), GQA without repeated K/V, any
sequence length (masked boundary tiles), head dims up to 256 (padded to a power of two with masks). A query
row that sees no key gives zeros and lse = -inf, as PyTorch. Work in progress: not yet behind the public API
(dropout, varlen, the bias gradient and autotuned configs are the next steps; see the attention issue).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh through exp (no libdevice in the interpreter): 1 - 2 / (exp(2x) + 1), exact at +-inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(q, k, offs_m, offs_n, L, S, scale, softcap, diag, win_left, win_right, bias_ptr, sbm, sbn,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
            IEEE: tl.constexpr):
    """Masked scores of one (BLOCK_M, BLOCK_N) tile, fp32; also returns tanh(s/cap) for the backward."""
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee") * scale
    else:
        s = tl.dot(q, k) * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_m[:, None].to(tl.int64) * sbm + offs_n[None, :].to(tl.int64) * sbn,
                    mask=(offs_m[:, None] < L) & (offs_n[None, :] < S), other=0.0)
        s = s + b.to(tl.float32)
    ok = (offs_n[None, :] < S) & (offs_m[:, None] < L)
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + diag)
    if HAS_WINDOW:  # a negative bound means unbounded on that side
        ok = ok & ((offs_n[None, :] >= offs_m[:, None] + diag - win_left) | (win_left < 0))
        ok = ok & ((offs_n[None, :] <= offs_m[:, None] + diag + win_right) | (win_right < 0))
    return tl.where(ok, s, float("-inf")), t


@triton.jit
def _key_range(start_m, L, S, diag, win_left, win_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key blocks a query block can see: causal and window block skipping."""
    lo = start_m * 0
    hi = start_m * 0 + S
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag)
    if HAS_WINDOW:
        hi = tl.where(win_right >= 0, tl.minimum(hi, start_m + BLOCK_M + diag + win_right), hi)
        lo = tl.where(win_left >= 0, tl.maximum(lo, start_m + diag - win_left), lo)
        lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, 0)
    return lo, hi


@triton.jit
def _attn_fwd(Q, K, V, Bias, O, LSE, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
              sbb, sbh, sbm, sbn, sob, soh, som, sod, H, GROUP, L, S, HEAD_E, HEAD_EV, scale, softcap, diag,
              win_left, win_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP  # GQA: the kv head of this query head, no repeated K/V in memory
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, E)
    offs_e = tl.arange(0, EV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_E), other=0.0)
    kb = K + b * skb + hk * skh
    vb = V + b * svb + hk * svh
    bias_ptr = Bias + b * sbb + h * sbh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, EV], tl.float32)
    lo, hi = _key_range(start_m, L, S, diag, win_left, win_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(kb + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                    mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_E), other=0.0)
        s, _ = _scores(q, k, offs_m, offs_n, L, S, scale, softcap, diag, win_left, win_right, bias_ptr, sbm, sbn,
                       IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + offs_n[:, None].to(tl.int64) * svn + offs_e[None, :] * svd,
                    mask=(offs_n[:, None] < S) & (offs_e[None, :] < HEAD_EV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * som + offs_e[None, :] * sod,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_e[None, :] < HEAD_EV))
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _probs(s, lse):
    """p = exp(s - lse) of a recomputed tile; rows that saw no key (lse = -inf) give 0, not NaN."""
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(lse[:, None] == float("-inf"), 0.0, tl.exp(s - lse_safe[:, None]))


@triton.jit
def _attn_bwd_dkdv(Q, K, V, Bias, DO, LSE, DELTA, DK, DV, sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                   svb, svh, svn, svd, sbb, sbh, sbm, sbn, sdb, sdh, sdm, sdd, H, GROUP, L, S, HEAD_E, HEAD_EV,
                   scale, softcap, diag, win_left, win_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, E: tl.constexpr,
                   EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one kv head: loops over the query heads of its GQA group and over the query
    blocks, so every gradient is written once, deterministically (no atomics)."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    HK = H // GROUP
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, E)
    offs_e = tl.arange(0, EV)
    kmask = (offs_d[:, None] < HEAD_E) & (offs_n[None, :] < S)
    kT = tl.load(K + b * skb + hk * skh + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                 mask=kmask, other=0.0)
    vT = tl.load(V + b * svb + hk * svh + offs_n[None, :].to(tl.int64) * svn + offs_e[:, None] * svd,
                 mask=(offs_e[:, None] < HEAD_EV) & (offs_n[None, :] < S), other=0.0)
    dk = tl.zeros([BLOCK_N, E], tl.float32)
    dv = tl.zeros([BLOCK_N, EV], tl.float32)
    m_lo = 0
    if IS_CAUSAL:  # query blocks entirely before this key block see none of it
        m_lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bias_ptr = Bias + b * sbb + h * sbh
        for start_m in range(m_lo, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qmask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_E)
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                        mask=qmask, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None].to(tl.int64) * sdm + offs_e[None, :] * sdd,
                         mask=(offs_m[:, None] < L) & (offs_e[None, :] < HEAD_EV), other=0.0)
            row = (b * H + h) * L + offs_m
            lse = tl.load(LSE + row, mask=offs_m < L, other=float("-inf"))
            delta = tl.load(DELTA + row, mask=offs_m < L, other=0.0)
            s, t = _scores(q, kT, offs_m, offs_n, L, S, scale, softcap, diag, win_left, win_right, bias_ptr,
                           sbm, sbn, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, IEEE)
            p = _probs(s, lse)
            dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
            dp = _dot(do, vT, IEEE)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    dk = dk * scale
    tl.store(DK + b * skb + hk * skh + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_d[None, :] < HEAD_E))
    tl.store(DV + b * svb + hk * svh + offs_n[:, None].to(tl.int64) * svn + offs_e[None, :] * svd,
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_e[None, :] < HEAD_EV))


@triton.jit
def _attn_bwd_dq(Q, K, V, Bias, DO, LSE, DELTA, DQ, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sbb, sbh, sbm, sbn, sdb, sdh, sdm, sdd, H, GROUP, L, S, HEAD_E, HEAD_EV, scale, softcap, diag,
                 win_left, win_right, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, E: tl.constexpr, EV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, E)
    offs_e = tl.arange(0, EV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_E), other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None].to(tl.int64) * sdm + offs_e[None, :] * sdd,
                 mask=(offs_m[:, None] < L) & (offs_e[None, :] < HEAD_EV), other=0.0)
    row = bh.to(tl.int64) * L + offs_m
    lse = tl.load(LSE + row, mask=offs_m < L, other=float("-inf"))
    delta = tl.load(DELTA + row, mask=offs_m < L, other=0.0)
    bias_ptr = Bias + b * sbb + h * sbh
    dq = tl.zeros([BLOCK_M, E], tl.float32)
    lo, hi = _key_range(start_m, L, S, diag, win_left, win_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(K + b * skb + hk * skh + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                     mask=(offs_d[:, None] < HEAD_E) & (offs_n[None, :] < S), other=0.0)
        vT = tl.load(V + b * svb + hk * svh + offs_n[None, :].to(tl.int64) * svn + offs_e[:, None] * svd,
                     mask=(offs_e[:, None] < HEAD_EV) & (offs_n[None, :] < S), other=0.0)
        s, t = _scores(q, kT, offs_m, offs_n, L, S, scale, softcap, diag, win_left, win_right, bias_ptr, sbm, sbn,
                       IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_BIAS, IEEE)
        p = _probs(s, lse)
        ds = p * (_dot(do, vT, IEEE) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(q.dtype), tl.trans(kT), IEEE)
    dq = dq * scale
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_E))


def _bias_args(bias: Optional[torch.Tensor], B: int, H: int, L: int, S: int, like: torch.Tensor):
    """An additive bias broadcast to (B, H, L, S) through strides (0 on broadcast dims): no expansion."""
    if bias is None:
        return like, (0, 0, 0, 0)
    b = bias.expand(B, H, L, S)
    return b, b.stride()


def _config(E: int, EV: int, dtype: torch.dtype, interpreted: bool):
    if interpreted:
        return 16, 16, 4
    big = max(E, EV) > 128
    return (64 if big else 128), (32 if big else 64), (8 if big else 4)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
                  is_causal: bool, diag: int, window: Tuple[int, int], softcap: float
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev); bias additive fp32 broadcastable to (B, H, L, S).
    Returns o (B, H, L, Ev) and lse (B, H, L) fp32."""
    import os
    B, H, L, E = q.shape
    Hk, S, EV = k.shape[1], k.shape[2], v.shape[3]
    o = torch.empty(B, H, L, EV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    bias_t, sb = _bias_args(bias, B, H, L, S, q)
    BM, BN, warps = _config(E, EV, q.dtype, os.environ.get("TRITON_INTERPRET") == "1")
    grid = (triton.cdiv(L, BM), B * H)
    ep, evp = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(EV))
    has_window = window != (-1, -1)
    torch.library.wrap_triton(_attn_fwd)[grid](
        q, k, v, bias_t, o, lse, *q.stride(), *k.stride(), *v.stride(), *sb, *o.stride(), H, H // Hk, L, S, E, EV,
        float(scale), float(softcap or 1.0), diag, window[0], window[1], IS_CAUSAL=is_causal,
        HAS_WINDOW=has_window, SOFTCAP=bool(softcap), HAS_BIAS=bias is not None, IEEE=q.dtype == torch.float32,
        E=ep, EV=evp, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
    return o, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, bias: Optional[torch.Tensor], scale: float, is_causal: bool, diag: int,
                  window: Tuple[int, int], softcap: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in the inputs' dtypes); dk/dv summed over each GQA group in-kernel."""
    import os
    B, H, L, E = q.shape
    Hk, S, EV = k.shape[1], k.shape[2], v.shape[3]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # rowsum(dO * O), the softmax backward's shift
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bias_t, sb = _bias_args(bias, B, H, L, S, q)
    BM, BN, warps = _config(E, EV, q.dtype, os.environ.get("TRITON_INTERPRET") == "1")
    ep, evp = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(EV))
    common = dict(IS_CAUSAL=is_causal, HAS_WINDOW=window != (-1, -1), SOFTCAP=bool(softcap),
                  HAS_BIAS=bias is not None, IEEE=q.dtype == torch.float32, E=ep, EV=evp, BLOCK_M=BM, BLOCK_N=BN,
                  num_warps=warps)
    args = (*q.stride(), *k.stride(), *v.stride(), *sb, *do.stride(), H, H // Hk, L, S, E, EV, float(scale),
            float(softcap or 1.0), diag, window[0], window[1])
    torch.library.wrap_triton(_attn_bwd_dkdv)[(triton.cdiv(S, BN), B * Hk)](
        q, k, v, bias_t, do, lse, delta, dk, dv, *args, **common)
    torch.library.wrap_triton(_attn_bwd_dq)[(triton.cdiv(L, BM), B * H)](
        q, k, v, bias_t, do, lse, delta, dq, *args, **common)
    return dq, dk, dv


def default_scale(E: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(E) if scale is None else scale

"""Triton kernels of the fused linear cross-entropy ops (contract and math: docs/linear_cross_entropy.md).

Forward (``_lce_fwd_kernel``): program (i, j) owns the token block ``i`` (BM rows) and the j-th contiguous range
of vocabulary tiles (BN columns each). For each tile it computes the logits ``x[rows] @ W[cols]^T (+ b)`` with
``tl.dot`` in fp32 (K loop over H in BK steps), optionally soft-caps them, and folds them into an online
(max, sum-exp) per row, the target logit and, with label smoothing, ``sum_c w_c z_c``. Only those four fp32
numbers per (row, split) leave the chip. Splitting the vocabulary keeps every
SM busy when there are few token blocks (N = 8192, BM = 128: 64 blocks), and consecutive programs share the
same W tiles (the large operand) so W streams from HBM about once.

Backward (``_lce_dlogits_kernel``): recomputes one logit tile per program and writes
``dlogits = (cp * exp((z - m) - log_s) - cy * [c == y] - cw * w_c) * softcap'(z)`` for a vocabulary chunk of the
(N, V) matrix into a bounded buffer. int64 offsets throughout.

The launch logic around both kernels (splits and their combination, the backward's chunks, GEMMs and bias sums)
is shared with the CUDA backend: pykernels/ops/linear_cross_entropy_launch.py.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import _checks, linear_cross_entropy_launch as _launch
from ._launch import timing_autotune_allowed, wrap
from ._math import tanh_fast as _tanh

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logit_tile(X, W, B, rows, cols, N, V, H, sxn, swv, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """z[BM, BN] = softcap(x[rows] @ W[cols]^T + b[cols]) in fp32; rows/cols are int64 index vectors. The H
    dimension of x and W is contiguous (vectorised, pipelined loads)."""
    rmask = rows < N
    cmask = cols < V
    ks = tl.arange(0, BK)
    x_ptrs = X + rows[:, None] * sxn + ks[None, :]
    w_ptrs = W + cols[None, :] * swv + ks[:, None]   # W^T tile (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, H, BK):
        kmask = (k + ks) < H
        a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BK
        w_ptrs += BK
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd_kernel(X, W, B, T, CW, Mp, Sp, ZYp, ZSp, N, V, H, vocab_start, sxn, swv, softcap, n_splits,
                    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr):
    # 1-D grid of cdiv(N, BM) * n_splits programs in groups of GROUP_M token blocks x all splits: the programs
    # in flight share each x block across the splits and each W tile across the group's token blocks, so both
    # operands come from L2 (as a grouped GEMM), while every program walks its own vocabulary range.
    softcap = tl.cast(softcap, tl.float32)  # inductor passes Python floats as fp64
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BM)
    per_group = GROUP_M * n_splits
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_s = (pid % per_group) // size_m
    n_tiles = tl.cdiv(V, BN)
    per = tl.cdiv(n_tiles, n_splits)
    t0 = pid_s * per
    t1 = tl.minimum(t0 + per, n_tiles)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < N
    y = tl.load(T + rows, mask=rmask, other=-1) - vocab_start   # target column within this shard
    m = tl.full((BM,), -float("inf"), dtype=tl.float32)
    s = tl.zeros((BM,), dtype=tl.float32)
    zy = tl.zeros((BM,), dtype=tl.float32)
    zs = tl.zeros((BM,), dtype=tl.float32)
    for t in range(t0, t1):
        cols = tl.arange(0, BN).to(tl.int64) + t * BN   # t * BN < V fits int32
        cmask = cols < V
        z = _logit_tile(X, W, B, rows, cols, N, V, H, sxn, swv, softcap,
                        HAS_BIAS, SOFTCAP, IEEE, BM, BN, BK)
        zm = tl.where(cmask[None, :], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(zm, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)   # all -inf so far: s stays 0, not NaN
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(zm - m_safe[:, None]), 1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        if SMOOTH:
            if HAS_CW:
                w = tl.load(CW + cols, mask=cmask, other=0.0)
                zs += tl.sum(tl.where(cmask[None, :], z * w[None, :], 0.0), 1)
            else:
                zs += tl.sum(tl.where(cmask[None, :], z, 0.0), 1)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(Mp + out, m, mask=rmask)
    tl.store(Sp + out, s, mask=rmask)
    tl.store(ZYp + out, zy, mask=rmask)
    if SMOOTH:
        tl.store(ZSp + out, zs, mask=rmask)


@triton.jit
def _lce_dlogits_kernel(X, W, B, T, CW, Mx, LS, CP, CY, CWr, DL, DBp, N, V, H, vocab_start, col0, n_cols,
                        sxn, swv, sdn, sdb, softcap,
                        HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                        HAS_DB: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP_M: tl.constexpr):
    """dlogits for columns [col0, col0 + n_cols) of this shard, into DL (N, n_cols) (row stride sdn); with HAS_DB
    also the tile's column sums into row pid_m of DBp (fp32, row stride sdb): the bias gradient's partials,
    summed over token blocks by the launcher (deterministic, no atomics)."""
    softcap = tl.cast(softcap, tl.float32)  # inductor passes Python floats as fp64
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BM)
    n_n = tl.cdiv(n_cols, BN)
    # Grouped order: GROUP_M token blocks sweep the same W tiles together (L2 reuse of both operands).
    per_group = GROUP_M * n_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    lcols = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)   # column within the chunk
    cols = col0 + lcols                                                # column within the shard
    rmask = rows < N
    cmask = lcols < n_cols
    cp = tl.load(CP + rows, mask=rmask, other=0.0)
    cy = tl.load(CY + rows, mask=rmask, other=0.0)
    if SMOOTH:
        cw = tl.load(CWr + rows, mask=rmask, other=0.0)
    else:
        cw = tl.zeros((BM,), dtype=tl.float32)
    # A token block whose rows all have zero coefficients (ignored targets, zero upstream gradients) has an
    # exactly zero gradient tile: skip its GEMM (exact, so always on).
    live = tl.max(tl.where((cp != 0.0) | (cy != 0.0) | (cw != 0.0), 1, 0), 0)
    d = tl.zeros((BM, BN), dtype=tl.float32)
    if live > 0:
        z = _logit_tile(X, W, B, rows, cols, N, col0 + n_cols, H, sxn, swv, softcap,
                        HAS_BIAS, SOFTCAP, IEEE, BM, BN, BK)
        m = tl.load(Mx + rows, mask=rmask, other=0.0)
        ls = tl.load(LS + rows, mask=rmask, other=0.0)
        y = tl.load(T + rows, mask=rmask, other=-1) - vocab_start
        # p_c - [c == y] formed in fp32 before the single rounding to the output dtype; p_c = exp((z - m) - log_s):
        # z - m is exact near the max, so p_y ~ 1 keeps its small complement (as log_softmax does)
        d = cp[:, None] * tl.exp((z - m[:, None]) - ls[:, None]) - tl.where(cols[None, :] == y[:, None], cy[:, None], 0.0)
        if SMOOTH:
            if HAS_CW:
                w = tl.load(CW + cols, mask=cmask, other=0.0)
                d -= cw[:, None] * w[None, :]
            else:
                d -= cw[:, None]
        if SOFTCAP:
            tc = z / softcap
            d = d * (1.0 - tc * tc)
    ptrs = DL + rows[:, None] * sdn + lcols[None, :]
    dl = d.to(DL.dtype.element_ty)
    tl.store(ptrs, dl, mask=rmask[:, None] & cmask[None, :])
    if HAS_DB:  # rows past N have zero coefficients, hence zero d; sum what dW and dX see (the rounded dl)
        tl.store(DBp + pid_m.to(tl.int64) * sdb + lcols, tl.sum(dl.to(tl.float32), 0), mask=cmask)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration: one small fixed config under the interpreter (CI speed); on a GPU, autotuned over
# tensor-core tile shapes (key: H, V and the dtype) unless PYKERNELS_LCE_AUTOTUNE=0 picks the first config.

# (BM, BN, BK, num_warps, num_stages)
GPU_CONFIGS_16BIT = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                     (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]
GPU_CONFIGS_FP32 = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
INTERPRETER_CONFIG = (16, 16, 16, 4, 1)


def _configs(dtype: torch.dtype):
    return GPU_CONFIGS_FP32 if dtype == torch.float32 else GPU_CONFIGS_16BIT


def _autotune() -> bool:
    return os.environ.get("PYKERNELS_LCE_AUTOTUNE", "1") != "0" and timing_autotune_allowed()


_TUNED = {}


def _kernel(kind: str, device: torch.device, dtype: torch.dtype):
    """(kernel, fixed meta-parameters or None when autotuned)."""
    base = _lce_fwd_kernel if kind == "fwd" else _lce_dlogits_kernel
    if _interpreted() or device.type != "cuda":
        BM, BN, BK, w, st = INTERPRETER_CONFIG
        return base, dict(BM=BM, BN=BN, BK=BK, num_warps=w, num_stages=st)
    if not _autotune():
        BM, BN, BK, w, st = _configs(dtype)[0]
        return base, dict(BM=BM, BN=BN, BK=BK, num_warps=w, num_stages=st)
    key = (kind, dtype == torch.float32)
    if key not in _TUNED:
        _TUNED[key] = _autotuned(base, _configs(dtype))
    return _TUNED[key], {}


def _autotuned(base, configs, **kw):
    """``base`` autotuned over ``configs`` ((BM, BN, BK, warps, stages) each) on the (H, V) key. The dlogits kernel's
    bias partials (DBp) are reset to zero before every trial and after the tuning: a config writes the partials of
    its own BM's rows only, so the rows a losing smaller-BM trial wrote were summed into the first call's bias
    gradient. ``reset_to_zero``, not a Config pre_hook: torch.library.wrap_triton refuses autotuners whose configs
    carry hooks (every GPU backward traced by torch.compile failed with one), and inductor honours reset_to_zero."""
    cfgs = [triton.Config(dict(BM=BM, BN=BN, BK=BK), num_warps=w, num_stages=st) for BM, BN, BK, w, st in configs]
    if base is _lce_dlogits_kernel:
        kw = dict(kw, reset_to_zero=["DBp"])
    return triton.autotune(configs=cfgs, key=["H", "V"], **kw)(base)


# ---------------------------------------------------------------------------------------------------------
# The two kernels behind the shared launch logic (pykernels/ops/linear_cross_entropy_launch.py), and the
# launchers registered as triton_ops by pykernels/ops/linear_cross_entropy.py.

def _partials(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth, splits):
    N, H = input.shape
    V = linear_weight.shape[0]
    kernel, meta = _kernel("fwd", input.device, input.dtype)
    mp = torch.empty(splits, N, device=input.device, dtype=torch.float32)
    sp = torch.empty_like(mp)
    zyp = torch.empty_like(mp)
    zsp = torch.empty_like(mp) if smooth else mp.new_empty(0)
    if N:
        def grid(META):
            return (triton.cdiv(N, META["BM"]) * splits,)

        wrap(kernel)[grid](
            input, linear_weight, linear_bias if linear_bias is not None else input, target,
            weight if weight is not None else mp, mp, sp, zyp, zsp if smooth else mp,
            N, V, H, vocab_start, input.stride(0), linear_weight.stride(0), float(softcap or 1.0), splits,
            HAS_BIAS=linear_bias is not None, HAS_CW=weight is not None, SOFTCAP=bool(softcap), SMOOTH=smooth,
            IEEE=input.dtype == torch.float32, GROUP_M=8, **meta)
    return mp, sp, zyp, zsp


def _dlogits(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start,
             softcap, smooth, col0, dl, db):
    N, H = input.shape
    V = linear_weight.shape[0]
    nc = dl.shape[1]
    kernel, meta = _kernel("bwd", input.device, input.dtype)

    def grid(META):
        return (triton.cdiv(N, META["BM"]) * triton.cdiv(nc, META["BN"]),)

    has_b = linear_bias is not None
    dbp = db if db is not None else m.new_empty(1)  # never an alias of another argument: tuning zeroes it
    wrap(kernel)[grid](
        input, linear_weight, linear_bias if has_b else input, target, weight if weight is not None else m,
        m, log_s, coef_p, coef_y, coef_w, dl, dbp, N, V, H, vocab_start, col0, nc,
        input.stride(0), linear_weight.stride(0), dl.stride(0), db.stride(0) if db is not None else 0,
        float(softcap or 1.0),
        HAS_BIAS=has_b, HAS_CW=weight is not None, SOFTCAP=bool(softcap), SMOOTH=smooth, HAS_DB=db is not None,
        IEEE=input.dtype == torch.float32, GROUP_M=8, **meta)


def _geometry(device: torch.device, dtype: torch.dtype) -> _launch.Kernels:
    """Interpreter / CPU: the one small config (16-wide tiles); GPU: every config's BN divides 256, and the bias
    partials have a row per block of the smallest BM any config uses."""
    if _interpreted() or device.type != "cuda":
        return _launch.Kernels(_partials, _dlogits, INTERPRETER_CONFIG[1], INTERPRETER_CONFIG[1],
                               INTERPRETER_CONFIG[0])
    return _launch.Kernels(_partials, _dlogits, 64, 256, min(c[0] for c in _configs(dtype)))


def linear_cross_entropy_fwd(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                             target: torch.Tensor, weight: Optional[torch.Tensor], vocab_start: int,
                             softcap: float, smooth: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, over this shard's classes: (m, log_s, z_target, z_sum), fp32 (N,). See the contract."""
    _checks.linear_cross_entropy_kernel("linear_cross_entropy_fwd_triton", input, linear_weight, linear_bias, target,
                                        weight, softcap)
    target = target.contiguous()  # the kernels read it at stride 1
    k = _geometry(input.device, input.dtype)
    N, V = input.shape[0], linear_weight.shape[0]
    splits = _launch.num_splits(N, V, input.device, k.tile_cols)
    if _interpreted() or input.device.type != "cuda":
        splits = max(1, min(triton.cdiv(V, k.tile_cols), 3))
    return _launch.forward(k, input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth,
                           splits)


def linear_cross_entropy_bwd(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                             target: torch.Tensor, weight: Optional[torch.Tensor], m: torch.Tensor, log_s: torch.Tensor,
                             coef_p: torch.Tensor, coef_y: torch.Tensor, coef_w: torch.Tensor, vocab_start: int,
                             softcap: float, smooth: bool, input_grad: bool, weight_grad: bool, bias_grad: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input in the accumulation dtype, grad_weight, grad_bias); an unrequested one is empty."""
    _checks.linear_cross_entropy_kernel("linear_cross_entropy_bwd_triton", input, linear_weight, linear_bias, target,
                                        weight, softcap, (("m", m), ("log_s", log_s), ("coef_p", coef_p),
                                                          ("coef_y", coef_y), ("coef_w", coef_w if smooth else None)))
    target = target.contiguous()  # the kernels read it at stride 1
    return _launch.backward(_geometry(input.device, input.dtype), input, linear_weight, linear_bias, target, weight,
                            m, log_s, coef_p, coef_y, coef_w, vocab_start, softcap, smooth, input_grad, weight_grad,
                            bias_grad)

"""Triton kernels of the cross-entropy ops (contract and math: docs/cross_entropy.md).

One program handles rows ``pid, pid + nprog, ...`` (persistent when the gradient is written, so the rows in
flight fit in L2). Pass 1 streams a row in BLOCK-wide chunks with an online max / sum-exp and the sums that
label smoothing or probability targets need (relative to a pivot logit, so large common offsets cancel).
With ``write_grad``, pass 2 re-reads the row (from L2) and writes the gradient once. fp32 math throughout.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import _checks
from ._launch import wrap

# kernel modes; constexpr globals so @triton.jit code may read them
FWD = tl.constexpr(0)
FWD_GRAD = tl.constexpr(1)
BWD = tl.constexpr(2)


@triton.jit
def _target_sums(TP, t_base, tc, Wt, cols, mask, eps, C, HAS_W: tl.constexpr):
    """t'_c = (1 - eps) t_c + eps / C and w_c t'_c for one chunk of a probability-target row."""
    t = tl.load(TP + t_base + cols.to(tl.int64) * tc, mask=mask, other=0.0).to(tl.float32)
    t = (1.0 - eps) * t + eps / C
    if HAS_W:
        wt = t * tl.load(Wt + cols, mask=mask, other=0.0)
    else:
        wt = t
    return tl.where(mask, wt, 0.0)


@triton.jit
def _infinite_sum(U, finite, rel):
    """sum_c u_c (lse - x_c), formed as ``finite`` = U rel - sum_c u_c (x_c - pivot) from U = sum_c u_c (u: the
    class weights of smoothing, or w_c t'_c). An infinite U (a +-inf weight or target, no NaN) makes the sum U
    itself, as torch's -sum u log_softmax (every lse - x_c > 0), where the decomposition gives inf - inf = NaN;
    (rel - rel) keeps a NaN row NaN."""
    return tl.where(tl.abs(U) == float("inf"), U + (rel - rel), finite)


@triton.jit
def _cross_entropy_kernel(X, TI, TP, Wt, Wsum, Scale, Loss, Lse, LseErr, LseIn, LseErrIn, G,
                          M, C, D, sn, sc, sd, tn, tc, td, scale_stride, ignore_index, eps, zl,
                          MODE: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                          ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LSE_ERR: tl.constexpr,
                          BLOCK: tl.constexpr):
    # Inductor passes Python floats as fp64 scalars: compute in fp32 as the eager launch does
    eps = tl.cast(eps, tl.float32)
    zl = tl.cast(zl, tl.float32)
    pid = tl.program_id(0).to(tl.int64)  # int64 rows: N * C * D may exceed 2**31
    nprog = tl.num_programs(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if HAS_W and SMOOTH:
        W = tl.load(Wsum).to(tl.float32)
    else:
        W = C * 1.0
    for r in range(pid, M, nprog):
        n = r // D
        d = r - n * D
        x_base = n * sn + d * sd
        t_base = n * tn + d * td
        g_base = n * C * D + d  # the gradient is contiguous (N, C, D)

        y = 0
        skip = False   # ignored or out of range: no loss terms, a constant gradient row
        fill = 0.0
        pivot = 0.0
        x_off = 0.0  # a non-finite target logit: lse - x_y is formed from it (the pivot must be finite)
        if not PROB:
            y = tl.load(TI + r)
            ignored = y == ignore_index
            invalid = (y < 0) | (y >= C)
            skip = ignored | invalid
            fill = tl.where(ignored, 0.0, float("nan"))
            y_safe = tl.where(skip, 0, y)
            pivot = tl.where(skip, 0.0, tl.load(X + x_base + y_safe.to(tl.int64) * sc).to(tl.float32))
            x_off = tl.where(tl.abs(pivot) < float("inf"), 0.0, pivot)
        else:
            pivot = tl.load(X + x_base).to(tl.float32)
        pivot = tl.where(tl.abs(pivot) < float("inf"), pivot, 0.0)

        # Pass 1: online max / sum-exp and the relative weighted sums.
        m = -float("inf")
        s = 0.0
        wx = 0.0   # sum w_c (x_c - pivot)             (label smoothing, index targets)
        wt_sum = 0.0   # sum w_c t'_c                    (probability targets)
        wtx = 0.0  # sum w_c t'_c (x_c - pivot)        (probability targets)
        if MODE != BWD:
            for start in range(0, C, BLOCK):
                cols = start + offs
                mask = cols < C
                x = tl.load(X + x_base + cols.to(tl.int64) * sc, mask=mask, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                # all -inf so far: keep s at 0 instead of exp(-inf - -inf) = NaN
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
                m = m_new
                if PROB:
                    wt = _target_sums(TP, t_base, tc, Wt, cols, mask, eps, C, HAS_W)
                    wt_sum += tl.sum(wt, 0)
                    wtx += tl.sum(tl.where(wt != 0.0, wt * (x - pivot), 0.0), 0)
                elif SMOOTH:
                    if HAS_W:
                        w = tl.load(Wt + cols, mask=mask, other=0.0)
                    else:
                        w = tl.where(mask, 1.0, 0.0)
                    wx += tl.sum(tl.where(mask, w * (x - pivot), 0.0), 0)
            log_s = tl.log(s)
            lse = m + log_s
            rel = (m - pivot) + log_s  # lse - pivot without the offset's rounding
            if PROB:
                loss = _infinite_sum(wt_sum, wt_sum * rel - wtx, rel)
            else:
                w_y = 1.0
                if HAS_W:
                    w_y = tl.load(Wt + tl.where(skip, 0, y)).to(tl.float32)
                loss = w_y * (1.0 - eps) * (rel - x_off)
                if SMOOTH:
                    loss += eps / C * _infinite_sum(W, W * rel - wx, rel)
                loss = tl.where(skip, fill, loss)
            if ZLOSS:
                if PROB:
                    loss += zl * lse * lse
                else:
                    loss += tl.where(skip, 0.0, zl * lse * lse)
            tl.store(Loss + r, loss)
            tl.store(Lse + r, lse)
            # lse's rounding error, exactly (TwoSum): lse + lse_err = m + log s. The backward forms
            # p = exp((x - lse) - lse_err), where exp(x - lse) put ulp(lse) / 2 into every probability. 0 where
            # lse is not finite: such rows keep what exp(x - lse) gives them.
            b = lse - m
            lse_err = (m - (lse - b)) + (log_s - b)
            tl.store(LseErr + r, tl.where(tl.abs(lse) < float("inf"), lse_err, 0.0))
            shift = m
            shift_lo = log_s
        else:
            lse = tl.load(LseIn + r).to(tl.float32)
            shift = lse  # p = exp((x - lse) - lse_err): x - lse is exact near the row max (Sterbenz)
            shift_lo = 0.0
            if HAS_LSE_ERR:
                shift_lo = tl.load(LseErrIn + r).to(tl.float32)
            if PROB:
                for start in range(0, C, BLOCK):
                    cols = start + offs
                    wt_sum += tl.sum(_target_sums(TP, t_base, tc, Wt, cols, cols < C, eps, C, HAS_W), 0)

        # Pass 2: the gradient.
        if MODE != FWD:
            sr = 1.0
            if HAS_SCALE:
                sr = tl.load(Scale + r * scale_stride).to(tl.float32)
            z2 = 0.0
            if ZLOSS:
                z2 = 2.0 * zl * lse
            w_y = 1.0
            if HAS_W and not PROB:
                w_y = tl.load(Wt + tl.where(skip, 0, y)).to(tl.float32)
            if PROB:
                k = sr * (wt_sum + z2)
            elif SMOOTH:
                k = sr * (w_y * (1.0 - eps) + eps * W / C + z2)
            else:
                k = sr * (w_y * (1.0 - eps) + z2)
            ew = sr * eps / C
            hit = sr * w_y * (1.0 - eps)
            for start in range(0, C, BLOCK):
                cols = start + offs
                mask = cols < C
                x = tl.load(X + x_base + cols.to(tl.int64) * sc, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp((x - shift) - shift_lo)
                if PROB:
                    g = p * k - sr * _target_sums(TP, t_base, tc, Wt, cols, mask, eps, C, HAS_W)
                else:
                    g = p * k
                    if SMOOTH:  # only with smoothing: 0 * a NaN / inf weight of an unused class is NaN
                        if HAS_W:
                            w = tl.load(Wt + cols, mask=mask, other=0.0)
                        else:
                            w = 1.0
                        g = g - ew * w
                    # p_y - 1 formed in fp32 before the single rounding below
                    g = g - tl.where(cols == y, hit, 0.0)
                    g = tl.where(skip, fill, g)
                tl.store(G + g_base + cols.to(tl.int64) * D, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(G, Scale, total, CD, D, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    n_blocks = tl.cdiv(total, BLOCK)
    if not PER_ROW:
        s = tl.load(Scale).to(tl.float32)
        # The common loss.backward() passes exactly 1: zero iterations, no memory traffic.
        n_blocks = tl.where(s == 1.0, 0, n_blocks)
    for b in range(pid, n_blocks, nprog):
        i = b * BLOCK + tl.arange(0, BLOCK)
        mask = i < total
        if PER_ROW:
            sv = tl.load(Scale + (i // CD) * D + i % D, mask=mask, other=1.0).to(tl.float32)
        else:
            sv = s
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(G + i, (g * sv).to(G.dtype.element_ty), mask=mask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _knob(name: str) -> int:
    """Tuning knobs for measurements (bench/tune_cross_entropy.py); 0 = the default."""
    return int(os.environ.get(name, "0") or 0)


def _config(C: int, elem_bytes: int) -> Tuple[int, int]:
    """(BLOCK, num_warps): chunks of up to 16 KB of the row, 8 warps (best of the H100 sweep); the interpreter
    gets one big chunk."""
    if _interpreted():
        return min(triton.next_power_of_2(C), 4096), 4
    block = min(triton.next_power_of_2(C), _knob("PYKERNELS_CE_BLOCK_BYTES") // elem_bytes or
                max(16384 // elem_bytes, 16))
    warps = _knob("PYKERNELS_CE_WARPS") or (4 if block <= 1024 else 8)
    return block, warps


_MAX_GRID_X = 2 ** 31 - 1  # CUDA's limit on a grid's x extent (a forward over 2^31 rows: 3-D segmentation maps)


def _grid(M: int, C: int, elem_bytes: int, device: torch.device, write_grad: bool) -> int:
    if device.type != "cuda" or not write_grad:
        return max(min(M, _MAX_GRID_X), 1)  # a program a row; the kernel strides over rows beyond the grid
    props = torch.cuda.get_device_properties(device)
    # Persistent programs whose rows stay in L2 until pass 2 re-reads them (3/4 of L2 as budget).
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    # Measured on H100 (bench/tune_cross_entropy.py, bf16 8192 x 128256): 2.5x L2 worth of rows in flight
    # beat 3/4 of L2 (2.23 vs 2.93 ms): latency hiding matters more than every re-read hitting L2.
    pct = _knob("PYKERNELS_CE_L2_PERCENT") or 250
    fit = max((l2 * pct // 100) // max(C * elem_bytes, 1), props.multi_processor_count)
    return max(1, min(M, fit, props.multi_processor_count * 4))


def _launch(mode: int, logits, target, weight, scale, lse_in, lse_err_in, loss, lse, lse_err, grad, ignore_index,
            label_smoothing, z_loss):
    N, C, D = logits.shape
    M = N * D
    prob = target.dtype.is_floating_point
    smooth = label_smoothing > 0
    wsum = weight.sum() if (weight is not None and smooth) else None
    dummy = loss if loss.numel() else lse_in if lse_in is not None else grad
    block, warps = _config(C, logits.element_size())
    grid = (_grid(M, C, logits.element_size(), logits.device, mode != FWD.value),)
    tn, tc, td = target.stride() if prob else (0, 0, 0)
    wrap(_cross_entropy_kernel)[grid](
        logits, target if not prob else dummy, target if prob else logits,
        weight if weight is not None else dummy, wsum if wsum is not None else dummy,
        scale if scale is not None else dummy, loss, lse, lse_err, lse_in if lse_in is not None else dummy,
        lse_err_in if lse_err_in is not None else dummy, grad if grad.numel() else logits,
        M, C, D, logits.stride(0), logits.stride(1), logits.stride(2), tn, tc, td,
        0 if scale is None or scale.numel() == 1 else 1, ignore_index, float(label_smoothing), float(z_loss),
        MODE=mode, PROB=prob, HAS_W=weight is not None, SMOOTH=smooth, ZLOSS=z_loss > 0,
        HAS_SCALE=scale is not None, HAS_LSE_ERR=lse_err_in is not None, BLOCK=block, num_warps=warps)


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                      grad_scale: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                      write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.cross_entropy("cross_entropy_fwd_triton", logits, target, weight, grad_scale)
    N, C, D = logits.shape
    loss = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    lse_err = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    grad = torch.empty((N, C, D) if write_grad else (0,), device=logits.device, dtype=logits.dtype)
    if N * D:
        _launch(FWD_GRAD.value if write_grad else FWD.value, logits, target, weight, grad_scale, None, None, loss, lse,
                lse_err, grad, ignore_index, label_smoothing, z_loss)
    return loss, lse, grad, lse_err


def cross_entropy_bwd(grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                      weight: Optional[torch.Tensor], lse: torch.Tensor, lse_err: Optional[torch.Tensor],
                      ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    _checks.cross_entropy("cross_entropy_bwd_triton", logits, target, weight, grad_rows, lse, lse_err)
    N, C, D = logits.shape
    grad = torch.empty((N, C, D), device=logits.device, dtype=logits.dtype)
    if N * D:
        empty = torch.empty(0, device=logits.device, dtype=torch.float32)
        _launch(BWD.value, logits, target, weight, grad_rows, lse, lse_err, empty, empty, empty, grad, ignore_index,
                label_smoothing, z_loss)
    return grad


def cross_entropy_scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    _checks.cross_entropy_scale_grad("cross_entropy_scale_grad__triton", grad, scale)
    N, C, D = grad.shape
    total = grad.numel()
    if total == 0:
        return
    block = 4096
    programs = triton.cdiv(total, block)
    if grad.device.type == "cuda":  # persistent: a no-op launch must not cost 10^5 programs
        programs = min(programs, torch.cuda.get_device_properties(grad.device).multi_processor_count * 8)
    wrap(_scale_grad_kernel)[(programs,)](
        grad, scale, total, C * D, D, PER_ROW=scale.numel() > 1, BLOCK=block, num_warps=8)

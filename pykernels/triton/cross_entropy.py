"""Triton kernels of the cross-entropy ops (contract and math: docs/cross_entropy.md).

One kernel, three modes. A program handles tiles of ROWS rows (ROWS = 1 for large C; several rows for small C)
and walks the classes in BLOCK-wide chunks:
- pass 1 (FWD, FWD_GRAD): online log-sum-exp kept *per lane* (each of the BLOCK lanes keeps its own running
  max and sum), so the chunk loop has no cross-thread reduction and no barrier, and costs one exponential per
  element; the lanes are combined once per row. Smoothing / probability-target sums are taken relative to a
  pivot logit so that a large common offset cancels.
- pass 2 (FWD_GRAD, BWD): recompute p_c and write the gradient once. In FWD_GRAD this re-reads the row right
  after pass 1; for large rows the grid is persistent (one 32-warp program per SM) so the rows in flight fit
  in L2 (``gpu_plan``).
All math in fp32; the gradient is rounded once.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# kernel modes; constexpr globals so @triton.jit code may read them
FWD = tl.constexpr(0)
FWD_GRAD = tl.constexpr(1)
BWD = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)
LOW = tl.constexpr(-3.0e38)  # finite start of the running max: x - LOW is never (-inf) - (-inf) = NaN


@triton.jit
def _row_offsets(r, C, D, sn, sd, tn, td):
    """Offsets of rows r = n * D + d (int64, as r) in the logits, the probability targets (strides (sn, ., sd),
    (tn, ., td)) and the contiguous (N, C, D) gradient."""
    n = r // D
    d = r - n * D
    return n * sn + d * sd, n * tn + d * td, n * C * D + d


@triton.jit
def _index_target(TI, r, rmask, C, ignore_index):
    """(y, skip, fill) of index-target rows. Ignored and out-of-range rows are skipped: loss and gradient are
    `fill` (0 if ignored, NaN if out of range), and y is clamped to 0 so that no read goes out of bounds."""
    y = tl.load(TI + r, mask=rmask, other=ignore_index)
    ignored = y == ignore_index
    skip = ignored | (y < 0) | (y >= C)
    return tl.where(skip, 0, y), skip, tl.where(ignored, 0.0, float("nan"))


@triton.jit
def _class_weight(Wt, cols, mask, HAS_W: tl.constexpr):
    """w_c for a chunk (0 outside the mask)."""
    if HAS_W:
        w = tl.load(Wt + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    return w


@triton.jit
def _smoothed_target(TP, toff, tc, Wt, cols, mask, eps, C, HAS_W: tl.constexpr):
    """w_c t'_c with t'_c = (1 - eps) t_c + eps / C, for a chunk of probability-target rows (0 outside the mask)."""
    t = tl.load(TP + toff[:, None] + cols.to(tl.int64) * tc, mask=mask, other=0.0).to(tl.float32)
    return ((1.0 - eps) * t + eps / C) * _class_weight(Wt, cols, mask, HAS_W)


@triton.jit
def _cross_entropy_kernel(X, TI, TP, Wt, Wsum, Scale, Loss, Lse, LseIn, G,
                          M, C, D, sn, sc, sd, tn, tc, td, scale_stride, ignore_index, eps, zl,
                          MODE: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                          ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr = 1):
    pid = tl.program_id(0).to(tl.int64)  # int64 rows: N * C * D may exceed 2**31
    nprog = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK)[None, :]
    if HAS_W and SMOOTH:
        W = tl.load(Wsum).to(tl.float32)
    else:
        W = C * 1.0
    for tile in range(pid, tl.cdiv(M, ROWS), nprog):
        r = tile * ROWS + tl.arange(0, ROWS)
        rmask = r < M
        xoff, toff, goff = _row_offsets(r, C, D, sn, sd, tn, td)
        if PROB:
            pivot = tl.load(X + xoff, mask=rmask, other=0.0).to(tl.float32)
        else:
            y, skip, fill = _index_target(TI, r, rmask, C, ignore_index)
            pivot = tl.load(X + xoff + y * sc, mask=rmask & ~skip, other=0.0).to(tl.float32)
            w_y = tl.load(Wt + y, mask=rmask, other=0.0).to(tl.float32) if HAS_W else 1.0
        pivot = tl.where(tl.abs(pivot) < float("inf"), pivot, 0.0)
        wt_sum = tl.zeros([ROWS], tl.float32)  # sum_c w_c t'_c              (probability targets)
        rel_sum = tl.zeros([ROWS], tl.float32)  # sum_c w_c [t'_c] (x_c - pivot)  (smoothing / probabilities)

        if MODE != BWD:
            # Pass 1. Per lane: with d = x - m, one exponential e = exp(-|d|) updates (m, s) either way.
            m = tl.full([ROWS, BLOCK], LOW, tl.float32)
            s = tl.zeros([ROWS, BLOCK], tl.float32)
            for start in range(0, C, BLOCK):
                cols = start + cols0
                mask = rmask[:, None] & (cols < C)
                x = tl.load(X + xoff[:, None] + cols.to(tl.int64) * sc, mask=mask,
                            other=float("-inf")).to(tl.float32)
                d = x - m
                e = tl.exp2(-tl.abs(d) * LOG2E)
                s = tl.where(d > 0, s * e + 1.0, s + e)  # a NaN logit makes s NaN
                m = tl.maximum(m, x)
                if PROB:
                    wt = _smoothed_target(TP, toff, tc, Wt, cols, mask, eps, C, HAS_W)
                    wt_sum += tl.sum(wt, 1)
                    # skip zero targets so that a -inf logit there gives no 0 * inf
                    rel_sum += tl.sum(tl.where(wt != 0.0, wt * (x - pivot[:, None]), 0.0), 1)
                elif SMOOTH:
                    w = _class_weight(Wt, cols, mask, HAS_W)
                    rel_sum += tl.sum(tl.where(mask, w * (x - pivot[:, None]), 0.0), 1)
            mx = tl.max(m, 1)
            log_s = tl.log(tl.sum(s * tl.exp2((m - mx[:, None]) * LOG2E), 1))
            lse = mx + log_s
            rel = (mx - pivot) + log_s  # lse - pivot without the rounding of a large offset
            if PROB:
                loss = wt_sum * rel - rel_sum
            else:
                loss = w_y * (1.0 - eps) * rel
                if SMOOTH:
                    loss += eps / C * (W * rel - rel_sum)
            if ZLOSS:
                loss += zl * lse * lse
            if not PROB:
                loss = tl.where(skip, fill, loss)
            tl.store(Loss + r, loss, mask=rmask)
            tl.store(Lse + r, lse, mask=rmask)
        else:
            lse = tl.load(LseIn + r, mask=rmask, other=0.0).to(tl.float32)
            mx = lse
            log_s = tl.zeros([ROWS], tl.float32)
            if PROB:
                for start in range(0, C, BLOCK):
                    cols = start + cols0
                    mask = rmask[:, None] & (cols < C)
                    wt_sum += tl.sum(_smoothed_target(TP, toff, tc, Wt, cols, mask, eps, C, HAS_W), 1)

        if MODE != FWD:
            # Pass 2: grad_c = s (p_c k - [c == y] hit - ew w_c)  (index)  or  s (p_c k - w_c t'_c)  (probabilities)
            if HAS_SCALE:
                sr = tl.load(Scale + r * scale_stride, mask=rmask, other=0.0).to(tl.float32)
            else:
                sr = tl.full([ROWS], 1.0, tl.float32)
            k = wt_sum if PROB else w_y * (1.0 - eps) + eps * W / C
            if ZLOSS:
                k += 2.0 * zl * lse
            k = (sr * k)[:, None]
            hit = (sr * w_y * (1.0 - eps))[:, None] if not PROB else 0.0
            ew = (sr * eps / C)[:, None] if SMOOTH else 0.0
            shift = (log_s * LOG2E)[:, None]
            for start in range(0, C, BLOCK):
                cols = start + cols0
                mask = rmask[:, None] & (cols < C)
                x = tl.load(X + xoff[:, None] + cols.to(tl.int64) * sc, mask=mask, other=0.0).to(tl.float32)
                # p = exp(x - m - log_s): x - m is exact near the max, so p_y ~ 1 keeps its precision
                g = tl.exp2((x - mx[:, None]) * LOG2E - shift) * k
                if PROB:
                    g -= sr[:, None] * _smoothed_target(TP, toff, tc, Wt, cols, mask, eps, C, HAS_W)
                else:
                    g -= tl.where(cols == y[:, None], hit, 0.0)  # p_y - 1 formed in fp32, rounded once below
                    if SMOOTH:
                        g -= ew * _class_weight(Wt, cols, mask, HAS_W)
                    g = tl.where(skip[:, None], fill[:, None], g)
                tl.store(G + goff[:, None] + cols.to(tl.int64) * D, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(G, Scale, total, CD, D, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    n_blocks = tl.cdiv(total, BLOCK)
    if not PER_ROW:
        s = tl.load(Scale).to(tl.float32)
        # The common loss.backward() passes exactly 1: no iteration, no memory traffic.
        n_blocks = tl.where(s == 1.0, 0, n_blocks)
    for b in range(pid, n_blocks, nprog):
        i = b * BLOCK + tl.arange(0, BLOCK)
        mask = i < total
        if PER_ROW:
            n = i // CD
            sv = tl.load(Scale + n * D + i % D, mask=mask, other=1.0).to(tl.float32)  # row n * D + d
        else:
            sv = s
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(G + i, (g * sv).to(G.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration.

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _knob(name: str) -> int:
    """Tuning knobs for measurements and tests (bench/tune_cross_entropy.py); unset or 0 = the default."""
    return int(os.environ.get(name, "0") or 0)


_VALUES_PER_THREAD = 16  # per chunk: 32 B (bf16) / 64 B (fp32) of loads in flight per thread, ~50 registers


def _plan(C: int, M: int, elem_bytes: int, device: torch.device, persistent: bool) -> Tuple[int, int, int, int]:
    """(ROWS, BLOCK, num_warps, programs). Interpreter: one program per tile of <= 1024 elements, the cheapest
    for numpy. GPU: ``gpu_plan``."""
    if _interpreted() or device.type != "cuda":
        block_knob = _knob("PYKERNELS_CE_BLOCK_BYTES") // elem_bytes
        block = min(triton.next_power_of_2(C), max(block_knob, 1) if block_knob else 1024)
        rows = max(1, min(1024 // block, triton.next_power_of_2(M)))
        return rows, block, 1, triton.cdiv(M, rows)
    props = torch.cuda.get_device_properties(device)
    return gpu_plan(C, M, elem_bytes, props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20),
                    persistent)


def gpu_plan(C: int, M: int, elem_bytes: int, sms: int, l2_bytes: int, persistent: bool) -> Tuple[int, int, int, int]:
    """(ROWS, BLOCK, num_warps, programs) on a GPU with ``sms`` SMs and ``l2_bytes`` of L2.

    Tiles of >= 4096 elements (several rows when C is small), 16 values per thread per chunk, one program per
    tile. With the gradient, when the tiles resident at once (64 warps per SM) would not fit in
    PYKERNELS_CE_L2_PERCENT (100) of L2, pass 2 would re-read from HBM: then the grid is persistent, one program
    of 32 warps per SM (1024 threads: <= 64 registers is forced, so it is always resident), one row in flight
    per SM (bf16 V=128256: 132 x 256 KB = 34 MB)."""
    cp2 = triton.next_power_of_2(C)
    rows = max(1, min(4096 // cp2, triton.next_power_of_2(M)))
    n_tiles = triton.cdiv(M, rows)
    warps = _knob("PYKERNELS_CE_WARPS") or max(1, min(16, rows * cp2 // (32 * _VALUES_PER_THREAD)))
    programs = n_tiles
    if persistent:
        fit = l2_bytes * (_knob("PYKERNELS_CE_L2_PERCENT") or 100) // 100 // (sms * rows * C * elem_bytes)
        if fit < 64 // warps:
            warps = _knob("PYKERNELS_CE_WARPS") or 32
            programs = min(n_tiles, sms)
    block_knob = _knob("PYKERNELS_CE_BLOCK_BYTES") // elem_bytes
    block = min(cp2, max(block_knob, 16) if block_knob else 32 * warps * _VALUES_PER_THREAD)
    return rows, block, warps, programs


def _launch(mode: int, logits, target, weight, scale, lse_in, loss, lse, grad, ignore_index, label_smoothing,
            z_loss):
    N, C, D = logits.shape
    M = N * D
    prob = target.dtype.is_floating_point
    smooth = label_smoothing > 0
    if weight is not None and weight.numel() == 1:
        weight = weight.expand(C).contiguous()  # a one-element weight broadcasts (C floats, no sync)
    wsum = weight.sum() if (weight is not None and smooth) else None  # on the device, no sync
    dummy = lse if lse.numel() else lse_in  # any fp32 tensor: never read when its flag is off
    rows, block, warps, programs = _plan(C, M, logits.element_size(), logits.device, mode == FWD_GRAD.value)
    tn, tc, td = target.stride() if prob else (0, 0, 0)
    torch.library.wrap_triton(_cross_entropy_kernel)[(programs,)](
        logits, logits if prob else target, target if prob else logits,
        dummy if weight is None else weight, dummy if wsum is None else wsum,
        dummy if scale is None else scale, loss if loss.numel() else dummy, lse if lse.numel() else dummy,
        dummy if lse_in is None else lse_in, grad if grad.numel() else logits,
        M, C, D, logits.stride(0), logits.stride(1), logits.stride(2), tn, tc, td,
        0 if scale is None or scale.numel() == 1 else 1, ignore_index, float(label_smoothing), float(z_loss),
        MODE=mode, PROB=prob, HAS_W=weight is not None, SMOOTH=smooth, ZLOSS=z_loss > 0,
        HAS_SCALE=scale is not None, BLOCK=block, ROWS=rows, num_warps=warps)


# ---------------------------------------------------------------------------------------------------------
# The launchers (registered as triton_ops by pykernels/ops/cross_entropy.py).

def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                      grad_scale: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                      write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, C, D = logits.shape
    loss = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N * D, device=logits.device, dtype=torch.float32)
    grad = torch.empty((N, C, D) if write_grad else (0,), device=logits.device, dtype=logits.dtype)
    if N * D:
        _launch(FWD_GRAD.value if write_grad else FWD.value, logits, target, weight, grad_scale, None, loss, lse,
                grad, ignore_index, label_smoothing, z_loss)
    return loss, lse, grad


def cross_entropy_bwd(grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                      weight: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                      z_loss: float) -> torch.Tensor:
    N, C, D = logits.shape
    grad = torch.empty((N, C, D), device=logits.device, dtype=logits.dtype)
    if N * D:
        empty = torch.empty(0, device=logits.device, dtype=torch.float32)
        _launch(BWD.value, logits, target, weight, grad_rows, lse, empty, empty, grad, ignore_index,
                label_smoothing, z_loss)
    return grad


def cross_entropy_scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    N, C, D = grad.shape
    total = grad.numel()
    if total == 0:
        return
    block = 4096
    programs = triton.cdiv(total, block)
    if grad.device.type == "cuda":  # persistent: a no-op launch must not cost 10^5 programs
        programs = min(programs, torch.cuda.get_device_properties(grad.device).multi_processor_count * 4)
    torch.library.wrap_triton(_scale_grad_kernel)[(programs,)](
        grad, scale, total, C * D, D, PER_ROW=scale.numel() > 1, BLOCK=block, num_warps=8)

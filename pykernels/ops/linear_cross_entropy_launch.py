"""Launch logic of the fused linear cross-entropy kernels, shared by the Triton and CUDA backends (contract and
math: docs/linear_cross_entropy.md). A backend supplies two kernels through ``Kernels``; this module does the rest.

Forward: the vocabulary is split into ``splits`` ranges of whole tiles; the ``partials`` kernel gives, per (split,
row), the running max, the sum of exp(z - max), the target logit and (label smoothing) sum_c w_c z_c, and
``forward`` combines the splits into (m, log_s, z_target, z_sum). Splitting keeps every SM busy when there are few
token blocks (N = 8192 at 128 rows: 64 blocks) and lets consecutive blocks share W tiles through L2.

Backward: for each chunk of vocabulary columns (``CHUNK_BYTES`` bounds what a chunk holds at once:
``column_bytes``), the ``dlogits`` kernel recomputes the logits and writes ``dlogits`` (N, chunk) in the GEMM dtype
(``gemm_dtype``: the input dtype, but float32 on a CPU whose 16-bit GEMMs are slow, so that both GEMMs read the chunk
without a converted copy) plus the bias gradient's per-block column sums; ``backward`` turns the chunk into
``dW[chunk] = dlogits^T x`` (one GEMM over all tokens: fp32 accumulation, one rounding, deterministic),
``db[chunk]`` and ``dX_acc += dlogits W[chunk]`` (fp32 accumulator). No N x V tensor, no atomics, no host syncs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends

# Bytes one backward chunk holds at once (its dlogits buffer and the fp32 copies its GEMMs make: ``column_bytes``;
# the backward's only N x V-dependent workspace). Tests lower it to exercise several chunks.
CHUNK_BYTES = int(os.environ.get("PYKERNELS_LCE_CHUNK_BYTES", str(256 << 20)))

# The fused path's row block (the CPU kernel pykernels::linear_cross_entropy_fused): FUSED_BLOCK_BYTES of logits in
# the input's dtype (the kernel's logit buffer), at least FUSED_MIN_ROWS rows. Measured (2 cores, fp32, 2026-12-04):
# at N=1024 H=256 V=8192 the logits and their row pass took 62 ms in 512-row blocks (16 MiB) against 75 ms in one
# 32 MiB block (glibc serves 32 MiB by mmap: fresh pages to fault in on every call; 16 MiB comes from the heap after
# the first call); at N=256 H=512 V=32000, forward+gradients took 332 ms in 128-row blocks (16 MiB) against 281 ms in
# one of 256 rows (GEMMs with K = 128, and dW read and written twice). Tests lower it to exercise several blocks.
FUSED_BLOCK_BYTES = 16 << 20
FUSED_MIN_ROWS = 256


def fused_block_rows(N: int, V: int, elt: int, device: Optional[torch.device] = None) -> int:
    """Rows per block of the fused path: FUSED_BLOCK_BYTES of logits on the CPU, CHUNK_BYTES (the split backward's
    dlogits budget) on a GPU, whose GEMMs want large blocks."""
    budget = CHUNK_BYTES if device is not None and device.type == "cuda" else FUSED_BLOCK_BYTES
    return max(1, min(N, max(FUSED_MIN_ROWS, budget // max(V * elt, 1))))


@dataclass(frozen=True)
class Kernels:
    """One backend's kernels and their geometry.

    partials(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth, splits)
        -> (m, s, z_target, z_sum), each (splits, N) fp32 (z_sum unwritten without smooth).
    dlogits(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start,
            softcap, smooth, col0, dl, db_part) writes dl (N, n_cols), the dlogits of shard columns
        [col0, col0 + n_cols), and, when db_part is not None, its column sums per block of ``db_rows`` token rows
        into db_part (rows of n_cols, zeroed by the caller).
    tile_cols: vocabulary columns per forward tile (a split owns whole tiles).
    chunk_align: the backward chunk's column count is a multiple of this (every tile width divides it).
    db_rows: token rows per bias-partial row.
    """
    partials: Callable
    dlogits: Callable
    tile_cols: int
    chunk_align: int
    db_rows: int


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def num_splits(N: int, V: int, device: torch.device, tile_cols: int, block_rows: int = 128) -> int:
    """At least 8 splits (x blocks shared by the blocks in flight), and enough blocks to fill the GPU ~8 times
    over (a small tail wave); bounded by the number of tiles."""
    tiles = -(-V // tile_cols)
    return max(1, min(tiles, max(8, -(-8 * _num_sms(device) // max(1, -(-N // block_rows))))))


def rows_contiguous(t: Tensor) -> Tensor:
    """The kernels read H contiguously (unit stride): copy only when that is not already so."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_HAS_OUT_DTYPE = [True]
# mm_acc_ off CUDA converts a 16-bit chunk to fp32 in this many column blocks, with their W rows (a whole copy held
# twice a bf16 chunk: the peak went above torch's linear + cross_entropy on CPUs with bf16 GEMMs)
ACC_SPLITS = 4


def mm_acc_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with fp32 accumulation and no low-precision rounding of the product."""
    if a.dtype == acc.dtype:  # an fp32 chunk (CPU 16-bit: the GEMM dtype) with 16-bit W rows: only those convert
        acc.addmm_(a, b.to(acc.dtype))
        return
    if acc.device.type == "cuda" and _HAS_OUT_DTYPE[0]:
        try:
            # cuBLAS: bf16/fp16 in, fp32 accumulate and out, in place (beta = 1): no temporary
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError) as e:  # a torch without addmm(out_dtype=) for these operands
            _HAS_OUT_DTYPE[0] = False
            backends.logger.warning("linear_cross_entropy: no fp32-output GEMM for %s operands here (%s): their "
                                    "chunks convert to fp32 (exact, slower)", a.dtype, e)
    # no GEMM takes 16-bit operands into an fp32 output (every CPU GEMM): fp32 operands, ACC_SPLITS blocks of the
    # inner dimension at a time (each W row converted and read once)
    step = max(1, -(-a.shape[1] // ACC_SPLITS))
    for k0 in range(0, a.shape[1], step):
        acc.addmm_(a[:, k0:k0 + step].to(acc.dtype), b[k0:k0 + step].to(acc.dtype))


def forward(k: Kernels, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
            weight: Optional[Tensor], vocab_start: int, softcap: float, smooth: bool, splits: int
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row, over this shard's classes: (m, log_s, z_target, z_sum), fp32 (N,). See the contract."""
    input, linear_weight = rows_contiguous(input), rows_contiguous(linear_weight)
    mp, sp, zyp, zsp = k.partials(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth,
                                  splits)
    m = mp.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    log_s = torch.log((sp * torch.exp(mp - m_safe)).sum(0))
    # (the splits' smoothing sums add in float64: their fp32 sum lost up to 2x torch's own error over 7 splits of
    # 128256 classes; (splits, N) values, a negligible pass)
    z_sum = zsp.sum(0, dtype=torch.float64).to(zsp.dtype) if smooth else torch.zeros_like(log_s)
    return m_safe, log_s, zyp.sum(0), z_sum


def column_bytes(N: int, H: int, dtype: torch.dtype, dl_dtype: torch.dtype, device: torch.device,
                 input_grad: bool) -> int:
    """Bytes a backward chunk holds at once per column: its dlogits (N in ``dl_dtype``) and, off CUDA (no GEMM there
    takes 16-bit operands into an fp32 output), the fp32 copies its GEMMs make for 16-bit inputs: its W rows for dX
    or dW's product before its rounding (H) with an fp32 chunk; with a 16-bit one (bf16 GEMMs: dW's product is bf16)
    mm_acc_'s copies for dX, a block of chunk columns and their W rows at a time ((N + H) / ACC_SPLITS)."""
    acc = acc_dtype(dtype)
    n = N * dl_dtype.itemsize
    if device.type != "cuda" and dtype != acc:
        if dl_dtype == acc:
            n += H * acc.itemsize
        elif input_grad:
            n += -(-(N + H) * acc.itemsize // ACC_SPLITS)
    return n


def chunk_columns(V: int, col_bytes: int, align: int) -> int:
    """Columns per backward chunk: a multiple of ``align``, within CHUNK_BYTES (``col_bytes`` per column) when
    possible, at most V."""
    return min(V, max(align, (CHUNK_BYTES // max(col_bytes, 1)) // align * align))


def backward(k: Kernels, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
             weight: Optional[Tensor], m: Tensor, log_s: Tensor, coef_p: Tensor, coef_y: Tensor, coef_w: Tensor,
             vocab_start: int, softcap: float, smooth: bool, input_grad: bool, weight_grad: bool, bias_grad: bool
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input in the accumulation dtype, grad_weight, grad_bias); an unrequested one is empty."""
    input, linear_weight = rows_contiguous(input), rows_contiguous(linear_weight)
    N, H = input.shape
    V = linear_weight.shape[0]
    dev = input.device
    acc = acc_dtype(input.dtype)
    gx = torch.zeros(N, H, device=dev, dtype=acc) if input_grad else input.new_empty(0, dtype=acc)
    gw = torch.empty(V, H, device=dev, dtype=linear_weight.dtype) if weight_grad else linear_weight.new_empty(0)
    has_b = linear_bias is not None
    want_db = bias_grad and has_b
    gb = torch.empty(V, device=dev, dtype=linear_bias.dtype) if want_db else input.new_empty(0)
    if N == 0 or V == 0:
        gw.zero_()
        gb.zero_()
        return gx, gw, gb
    # CPU 16-bit without fast GEMMs in it: fp32 GEMMs on a converted x and on an fp32 dlogits chunk (a 16-bit chunk
    # converted for each GEMM held 10 bytes per element)
    g = _native.gemm_dtype(input)
    xg = input.to(g) if weight_grad else None
    chunk = chunk_columns(V, column_bytes(N, H, input.dtype, g, dev, input_grad), k.chunk_align)
    buf = torch.empty(N, chunk, device=dev, dtype=g)
    dbp = torch.empty(-(-N // k.db_rows), chunk, device=dev, dtype=acc) if want_db else None
    for c0 in range(0, V, chunk):
        nc = min(chunk, V - c0)
        dl = buf[:, :nc]
        db = None
        if want_db:
            db = dbp[:, :nc]
            db.zero_()  # a kernel with larger blocks than db_rows writes fewer rows
        k.dlogits(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start,
                  softcap, smooth, c0, dl, db)
        if weight_grad and g == gw.dtype:
            torch.mm(dl.t(), xg, out=gw[c0:c0 + nc])
        elif weight_grad:
            gw[c0:c0 + nc] = dl.t() @ xg  # fp32 product, rounded once to W's dtype
        if want_db:
            gb[c0:c0 + nc] = db.sum(0).to(gb.dtype)
        if input_grad:
            mm_acc_(gx, dl, linear_weight[c0:c0 + nc])
    return gx, gw, gb

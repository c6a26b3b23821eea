// Plain description of one attention call, shared by the C++ glue (attention.cpp) and the CUDA kernels
// (cuda/attention.cu; no torch headers there, so the .cu file compiles fast). Contract: docs/attention.md.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace pykernels {

// A (batch, head, row, column) operand with a contiguous last dimension: element (b, h, m, e) at
// b * sb + h * sh + m * sm + e. Varlen operands have no batch stride: sequence b starts at row cu[b].
struct AttnView {
  void* p = nullptr;
  int64_t sb = 0, sh = 0, sm = 0;
};

struct AttentionArgs {
  AttnView q, k, v;      // inputs: q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev); 16-bit floats
  AttnView o;            // forward output (B, H, L, Ev)
  AttnView dout;         // backward: dO, the layout of o
  AttnView dq, dk, dv;   // backward outputs, the layouts of q, k, v
  float* lse = nullptr;  // (B, H, L) fp32, or (H, T) for varlen: row m of (b, h) at b * lse_sb + h * lse_sh + m
  float* lse_lo = nullptr;  // forward: the lse's correction for the backward (lse_gaps), the layout of lse
  const float* delta = nullptr;  // backward: rowsum(dO * O), the layout of lse
  int64_t lse_sb = 0, lse_sh = 0;
  const int32_t* cu_q = nullptr;  // varlen: (B + 1) offsets of the sequences; null for dense calls
  const int32_t* cu_k = nullptr;
  DType dtype = DType::F16;
  int64_t B = 0, H = 0, Hk = 0;  // Hk divides H: query head h reads kv head h / (H / Hk)
  int64_t L = 0, S = 0;          // dense: the lengths; varlen: the longest sequence (sizes the grid)
  int64_t E = 0, Ev = 0;
  int64_t rows_q = 0, rows_k = 0;  // rows of q and of k / v along their row dim: L, S dense, all sequences' rows
                                   // varlen (the TMA maps' bounds; 0 = unknown: no TMA)
  float scale = 1.f, softcap = 0.f;  // softcap 0 = off
  bool causal = false, bottom_right = false;  // bottom_right (varlen): each sequence's diagonal moves by S_b - L_b
  int64_t diag = 0, win_left = -1, win_right = -1;  // key j visible to query i: j <= i + diag (causal) and
                                                   // i + diag - win_left <= j <= i + diag + win_right (-1: open)
  bool vec16 = false;  // every row of q, k, v, dO 16-byte aligned and E, Ev multiples of 8: 16-byte tile loads

  // attn_mask of a dense call, broadcast to (B, H, L, S) through its strides (0 on broadcast dims), or null: bool
  // (True = attend) or floating (added to the scores after the soft cap) of mask_dtype
  const void* mask = nullptr;
  int64_t mask_sb = 0, mask_sh = 0, mask_sm = 0, mask_sn = 0;
  bool mask_bool = false;
  DType mask_dtype = DType::F32;
  float* dmask = nullptr;  // backward: gradient of a float mask, (B, H, L, S) fp32 contiguous, zeroed by the glue

  // dropout (dropout_p > 0): score (row, col) is kept as philox.h's dropout_keep(*seed, row * drop_cols + col),
  // row = (b * H + h) * drop_rows + q0 + i (b = 0 for varlen), col = j within the sequence: the Triton kernels'
  // counters, so both backends drop the same scores. drop_rows, drop_cols: L, S dense; total q, k rows varlen.
  const int64_t* seed = nullptr;
  float dropout_p = 0.f;
  int64_t drop_rows = 0, drop_cols = 0;
};

}  // namespace pykernels

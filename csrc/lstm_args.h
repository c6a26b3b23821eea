// Plain description of one LSTM cell call, shared by the CPU glue and the CUDA kernels (no torch headers, so the
// .cu file that includes it compiles fast). Filled by make_cell_args() in lstm.cpp. Contract: docs/lstm.md.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace pykernels {

struct LstmCellArgs {
  // Forward. All tensors contiguous, one dtype: x (B, I), hx/cx (B, H), w_ih (4H, I), w_hh (4H, H), biases (4H)
  // or null. Outputs hy/cy (B, H) in that dtype, ws (B, 5H) fp32: activated i, f, g, o and c' unrounded.
  const void* x = nullptr;
  const void* hx = nullptr;
  const void* cx = nullptr;
  const void* w_ih = nullptr;
  const void* w_hh = nullptr;
  const void* b_ih = nullptr;
  const void* b_hh = nullptr;
  void* hy = nullptr;
  void* cy = nullptr;
  float* ws = nullptr;
  DType dtype = DType::F32;
  int64_t B = 0, I = 0, H = 0;
};

struct LstmCellBwdArgs {
  // grad_h/grad_c (B, H) in the cx dtype or null (zero); cx (B, H); ws (B, 5H) fp32.
  // Outputs: dgates (B, 4H) fp32 pre-activation gate gradients, dcx (B, H) in the cx dtype.
  const void* grad_h = nullptr;
  const void* grad_c = nullptr;
  const void* cx = nullptr;
  const float* ws = nullptr;
  float* dgates = nullptr;
  void* dcx = nullptr;
  DType dtype = DType::F32;
  int64_t B = 0, H = 0;
};

struct LstmLayerArgs {
  // One layer direction over T steps (the recurrence of pykernels::lstm_layer; docs/lstm.md). Forward: xproj
  // (T, B, 4H) fp32 = x W_ih^T + biases; w_hh (4H, H), h0, c0 (B, H) in the dtype; out (T, B, H) in the dtype;
  // ws (T, B, 5H) fp32 = activated i, f, g, o and c of every step. All contiguous.
  const float* xproj = nullptr;
  const void* w_hh = nullptr;
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  void* out = nullptr;
  float* ws = nullptr;
  // Backward: grad_out (T, B, H) in the dtype or null; dgates (T, B, 4H) fp32 out; dh, dc (B, H) fp32 hold
  // grad_hn / grad_cn (or zeros) on entry and dh0 / dc0 on exit.
  const void* grad_out = nullptr;
  float* dgates = nullptr;
  float* dh = nullptr;
  float* dc = nullptr;
  unsigned int* barrier = nullptr;  // one zeroed counter: the grid barrier between time steps
  DType dtype = DType::F32;
  int64_t T = 0, B = 0, H = 0;
  bool reverse = false;
};

// The CPU kernels' description of one layer direction (cpu/lstm_layer_kernels.h): the fields of LstmLayerArgs, but
// every operand the glue converts lives in the accumulation dtype (fp32; fp64 for fp64 inputs): xproj, c0, ws,
// grad_out (null: none), dgates, dh, dc. w_hh, h0 and out are in the input dtype. All contiguous. Also the ABI
// between _C and the AVX-512 library (wide_kernels.h).
struct LstmLayerCpuArgs {
  const void* xproj = nullptr;
  const void* w_hh = nullptr;
  const void* h0 = nullptr;
  const void* c0 = nullptr;
  void* out = nullptr;
  void* ws = nullptr;
  const void* grad_out = nullptr;
  void* dgates = nullptr;
  void* dh = nullptr;
  void* dc = nullptr;
  DType dtype = DType::F32;
  int64_t T = 0, B = 0, H = 0;
  bool reverse = false;
};

}  // namespace pykernels

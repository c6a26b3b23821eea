// Tensor-level helpers of the LSTM ops shared by the CPU and CUDA implementations: the argument checks are
// written once, in lstm.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "acc_type.h"
#include "lstm_args.h"

namespace pykernels {

// Checks a call of lstm_cell_fwd (names the offending argument); returns (B, I, H).
void check_lstm_cell_fwd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                         const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                         const c10::optional<at::Tensor>& b_hh);
void check_lstm_cell_bwd(const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c,
                         const at::Tensor& cx, const at::Tensor& ws);
// Checks a call of lstm_layer_fwd / lstm_layer_bwd (the recurrence of one layer direction; names the argument).
void check_lstm_layer_fwd(const at::Tensor& xproj, const at::Tensor& w_hh, const at::Tensor& h0,
                          const at::Tensor& c0);
// Also returns ws contiguous (a copy only when it is not): every device's kernels read it by raw offsets.
at::Tensor check_lstm_layer_bwd(const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& grad_hn,
                                const c10::optional<at::Tensor>& grad_cn, const at::Tensor& c0, const at::Tensor& ws,
                                const at::Tensor& w_hh);
// The outputs of lstm_layer_bwd as the recurrence starts: dgates (T, B, 4H) to fill, and dh / dc (B, H) in ws's
// dtype holding grad_hn / grad_cn (zeros when absent); the kernels carry them through the steps and leave dh0 / dc0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_outputs(const c10::optional<at::Tensor>& grad_hn,
                                                                      const c10::optional<at::Tensor>& grad_cn,
                                                                      const at::Tensor& ws);

}  // namespace pykernels

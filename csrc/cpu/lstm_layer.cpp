// CPU implementations of the LSTM sequence ops (docs/lstm.md): one layer direction over a padded sequence, the
// recurrence of pykernels::lstm_layer. The kernels (cpu/lstm_layer_kernels.h) run from the AVX-512 library where
// one is registered (wide_kernels.h), else as compiled here; this file checks, allocates and converts.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../dtype_of.h"
#include "../lstm.h"
#include "lstm_layer_kernels.h"
#include "wide_kernels.h"

namespace pykernels {
namespace {

LstmLayerCpuArgs layer_args(const at::Tensor& w_hh, int64_t T, int64_t B, int64_t H, bool reverse) {
  LstmLayerCpuArgs a;
  a.dtype = *dtype_of(w_hh.scalar_type());  // checked: a floating dtype
  a.w_hh = w_hh.data_ptr();
  a.T = T;
  a.B = B;
  a.H = H;
  a.reverse = reverse;
  return a;
}

// The AVX-512 build where registered, for every dtype it holds (not fp64).
void dispatch(const LstmLayerCpuArgs& a, bool backward) {
  if (a.dtype != DType::F64) {
    if (const LstmLayerFn wide = backward ? wide_lstm_layer_bwd() : wide_lstm_layer_fwd()) return wide(&a);
  }
  backward ? lstm_layer_bwd_kernel(a) : lstm_layer_fwd_kernel(a);
}

std::tuple<at::Tensor, at::Tensor> layer_fwd_cpu(const at::Tensor& xproj, const at::Tensor& w_hh,
                                                 const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  check_lstm_layer_fwd(xproj, w_hh, h0, c0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = h0.size(1);
  const auto acc = xproj.scalar_type();
  at::Tensor out = at::empty({T, B, H}, h0.options());
  at::Tensor ws = at::empty({T, B, 5 * H}, xproj.options());
  if (T == 0 || B == 0 || H == 0) return {out, ws};
  const at::Tensor xp = xproj.contiguous(), w = w_hh.contiguous(), h = h0.contiguous(),
                   c_init = c0.to(acc).contiguous();
  LstmLayerCpuArgs a = layer_args(w, T, B, H, reverse);
  a.xproj = xp.data_ptr();
  a.h0 = h.data_ptr();
  a.c0 = c_init.data_ptr();
  a.out = out.data_ptr();
  a.ws = ws.data_ptr();
  dispatch(a, /*backward=*/false);
  return {out, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_bwd_cpu(const c10::optional<at::Tensor>& grad_out,
                                                             const c10::optional<at::Tensor>& grad_hn,
                                                             const c10::optional<at::Tensor>& grad_cn,
                                                             const at::Tensor& c0, const at::Tensor& ws,
                                                             const at::Tensor& w_hh, bool reverse) {
  const at::Tensor wsc = check_lstm_layer_bwd(grad_out, grad_hn, grad_cn, c0, ws, w_hh);
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 5;
  const auto acc = ws.scalar_type();
  // dh and dc carry the gradient into the state of the step being processed; they end as dh0, dc0
  auto [dg, dh, dc] = lstm_layer_bwd_outputs(grad_hn, grad_cn, ws);
  if (T == 0 || B == 0 || H == 0) return {dg, dh, dc};
  const at::Tensor w = w_hh.contiguous(), c_init = c0.to(acc).contiguous();
  const at::Tensor go = grad_out.has_value() ? grad_out->to(acc).contiguous() : at::Tensor();
  LstmLayerCpuArgs a = layer_args(w, T, B, H, reverse);
  a.c0 = c_init.data_ptr();
  a.ws = wsc.data_ptr();
  a.grad_out = go.defined() ? go.data_ptr() : nullptr;
  a.dgates = dg.data_ptr();
  a.dh = dh.data_ptr();
  a.dc = dc.data_ptr();
  dispatch(a, /*backward=*/true);
  return {dg, dh, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("lstm_layer_fwd", &layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &layer_bwd_cpu);
}

}  // namespace pykernels

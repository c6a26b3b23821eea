// CPU kernels of the LSTM sequence ops (docs/lstm.md): one layer direction over a padded sequence, the recurrence
// of pykernels::lstm_layer. The input projection x W_ih^T + b is one GEMM done before (ops/lstm.py); each step
// here is one BLAS GEMM h_{t-1} W_hh^T accumulated onto that step's projection, then one vectorised pass
// (cpu/lstm_pointwise.h) for the activations, the cell update, h_t and the workspace. The loop runs in C++, so a
// step costs one GEMM and one pass instead of the ~15 dispatched ops of the eager reference.
// Precision is the contract's (ops/lstm.py _ref_layer_fwd/_bwd): gates and c in the accumulation dtype, h rounded
// to the input dtype at every step (it is the next step's GEMM operand, as on the GPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>

#include "../lstm.h"
#include "lstm_pointwise.h"

namespace pykernels {
namespace {

// Processing step s -> time index t (the reverse direction walks the sequence from its end).
inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

std::tuple<at::Tensor, at::Tensor> layer_fwd_cpu(const at::Tensor& xproj, const at::Tensor& w_hh,
                                                 const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  check_lstm_layer_fwd(xproj, w_hh, h0, c0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = h0.size(1);
  const auto acc = xproj.scalar_type();
  at::Tensor out = at::empty({T, B, H}, h0.options());
  at::Tensor ws = at::empty({T, B, 5 * H}, xproj.options());
  if (T == 0 || B == 0 || H == 0) return {out, ws};
  const at::Tensor xp = xproj.contiguous();
  const at::Tensor wt = w_hh.to(acc).t();  // (H, 4H) view of the contiguous (4H, H) weights
  const at::Tensor c_init = c0.to(acc).contiguous();
  at::Tensor gates = at::empty({B, 4 * H}, xp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor h = h0.to(acc);
    acc_t* pw = ws.data_ptr<acc_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_of(s, T, reverse);
      at::addmm_out(gates, xp[t], h, wt);
      const acc_t* c_prev = s == 0 ? c_init.data_ptr<acc_t>() : pw + time_of(s - 1, T, reverse) * B * 5 * H + 4 * H;
      cpu_lstm::gate_update<acc_t>(gates.data_ptr<acc_t>(), static_cast<const scalar_t*>(nullptr),
                                   static_cast<const scalar_t*>(nullptr), c_prev, s == 0 ? H : 5 * H,
                                   po + t * B * H, static_cast<scalar_t*>(nullptr), pw + t * B * 5 * H, B, H);
      h = std::is_same_v<scalar_t, acc_t> ? out[t] : out[t].to(acc);  // h rounded to the input dtype
    }
  });
  return {out, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_bwd_cpu(const c10::optional<at::Tensor>& grad_out,
                                                             const c10::optional<at::Tensor>& grad_hn,
                                                             const c10::optional<at::Tensor>& grad_cn,
                                                             const at::Tensor& c0, const at::Tensor& ws,
                                                             const at::Tensor& w_hh, bool reverse) {
  check_lstm_layer_bwd(grad_out, grad_hn, grad_cn, c0, ws, w_hh);
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 5;
  const auto acc = ws.scalar_type();
  // dh and dc carry the gradient into the state of the step being processed; they end as dh0, dc0
  auto [dg, dh, dc] = lstm_layer_bwd_outputs(grad_hn, grad_cn, ws);
  if (T == 0 || B == 0 || H == 0) return {dg, dh, dc};
  const at::Tensor w = w_hh.to(acc).contiguous();
  const at::Tensor go = grad_out.has_value() ? grad_out->contiguous() : at::Tensor();
  const at::Tensor c_init = c0.to(acc).contiguous();
  const bool round_dg = w_hh.scalar_type() != acc;
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_layer_bwd_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* pw = ws.data_ptr<acc_t>();
    acc_t* pd = dg.data_ptr<acc_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = time_of(s, T, reverse);
      if (go.defined()) dh.add_(go[t]);
      const acc_t* c_prev = s == 0 ? c_init.data_ptr<acc_t>() : pw + time_of(s - 1, T, reverse) * B * 5 * H + 4 * H;
      cpu_lstm::gate_grads<acc_t>(dh.data_ptr<acc_t>(), dc.data_ptr<acc_t>(), c_prev, s == 0 ? H : 5 * H,
                                  pw + t * B * 5 * H, pd + t * B * 4 * H, dc.data_ptr<acc_t>(), B, H);
      // dh_{t-1} = dg_t W_hh with dg_t rounded to the weights' dtype, as the GEMM of the GPU kernels sees it
      const at::Tensor dgt = round_dg ? dg[t].to(w_hh.scalar_type()).to(acc) : dg[t];
      at::mm_out(dh, dgt, w);
    }
  });
  return {dg, dh, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("lstm_layer_fwd", &layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &layer_bwd_cpu);
}

}  // namespace pykernels

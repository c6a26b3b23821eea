// CPU kernels of the LSTM cell ops (docs/lstm.md). Forward: the two gate GEMMs go into one (B, 4H) buffer of the
// accumulation dtype (BLAS; the second accumulates into the first), then one vectorised pass per row adds both
// biases, applies the activations, updates the cell and writes h', c' and the workspace. torch's eager CPU cell
// runs ~10 separate elementwise passes over the gates instead. Backward: one vectorised pass from (dh, dc, cx, ws)
// to the gate gradients and dc_prev; the GEMMs for dx, dh and the weights run in the autograd formula.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>

#include "../lstm.h"
#include "lstm_pointwise.h"

namespace pykernels {
namespace {

using cpu_lstm::Vec;

// Batches up to this size take the fully fused path: no gate buffer and no BLAS call; each hidden unit's four
// weight rows (of W_ih and W_hh) are read once and applied to every batch row while they sit in L1.
constexpr int64_t kSmallBatch = 4;

// acc[q] += dot(a, w + q*gate_stride) for the four gates, four independent vector chains.
template <typename T>
inline void dot4(const T* a, const T* w, int64_t gate_stride, int64_t K, T (&acc)[4]) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const V av = V::loadu(a + k);
    s0 = at::vec::fmadd(av, V::loadu(w + k), s0);
    s1 = at::vec::fmadd(av, V::loadu(w + gate_stride + k), s1);
    s2 = at::vec::fmadd(av, V::loadu(w + 2 * gate_stride + k), s2);
    s3 = at::vec::fmadd(av, V::loadu(w + 3 * gate_stride + k), s3);
  }
  T r[4] = {at::vec::vec_reduce_all<T>(std::plus<V>(), s0), at::vec::vec_reduce_all<T>(std::plus<V>(), s1),
            at::vec::vec_reduce_all<T>(std::plus<V>(), s2), at::vec::vec_reduce_all<T>(std::plus<V>(), s3)};
  for (; k < K; ++k) {
    r[0] += a[k] * w[k];
    r[1] += a[k] * w[gate_stride + k];
    r[2] += a[k] * w[2 * gate_stride + k];
    r[3] += a[k] * w[3 * gate_stride + k];
  }
  for (int q = 0; q < 4; ++q) acc[q] += r[q];
}

// Two batch rows at once: each weight vector load feeds two FMAs (8 independent chains).
template <typename T>
inline void dot4x2(const T* a0, const T* a1, const T* w, int64_t gate_stride, int64_t K, T (&acc0)[4],
                   T (&acc1)[4]) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V s[8] = {V(T(0)), V(T(0)), V(T(0)), V(T(0)), V(T(0)), V(T(0)), V(T(0)), V(T(0))};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const V x0 = V::loadu(a0 + k), x1 = V::loadu(a1 + k);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const V wv = V::loadu(w + q * gate_stride + k);
      s[q] = at::vec::fmadd(x0, wv, s[q]);
      s[4 + q] = at::vec::fmadd(x1, wv, s[4 + q]);
    }
  }
  T r[8];
  for (int q = 0; q < 8; ++q) r[q] = at::vec::vec_reduce_all<T>(std::plus<V>(), s[q]);
  for (; k < K; ++k) {
    for (int q = 0; q < 4; ++q) {
      r[q] += a0[k] * w[q * gate_stride + k];
      r[4 + q] += a1[k] * w[q * gate_stride + k];
    }
  }
  for (int q = 0; q < 4; ++q) {
    acc0[q] += r[q];
    acc1[q] += r[4 + q];
  }
}

template <typename T>
inline void cell_update(const T (&g)[4], T c_prev, T* oh, T* oc, T* w, int64_t H) {
  const T i = T(1) / (T(1) + std::exp(-g[0])), f = T(1) / (T(1) + std::exp(-g[1])), gt = std::tanh(g[2]),
          o = T(1) / (T(1) + std::exp(-g[3]));
  const T c = f * c_prev + i * gt;
  *oh = o * std::tanh(c);
  *oc = c;
  w[0] = i;
  w[H] = f;
  w[2 * H] = gt;
  w[3 * H] = o;
  w[4 * H] = c;
}

template <typename T>
void small_batch_fwd(const at::Tensor& x, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const at::Tensor& bi, const at::Tensor& bh, at::Tensor& hy,
                     at::Tensor& cy, at::Tensor& ws) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  const T *px = x.data_ptr<T>(), *ph = hx.data_ptr<T>(), *pc = cx.data_ptr<T>(), *wi = w_ih.data_ptr<T>(),
          *wh = w_hh.data_ptr<T>();
  const T* pbi = bi.defined() ? bi.data_ptr<T>() : nullptr;
  const T* pbh = bh.defined() ? bh.data_ptr<T>() : nullptr;
  T *oh = hy.data_ptr<T>(), *oc = cy.data_ptr<T>(), *ow = ws.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 4 * (I + H) * B));
  at::parallel_for(0, H, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T bias[4] = {T(0), T(0), T(0), T(0)};
      if (pbi) {
        for (int q = 0; q < 4; ++q) bias[q] = pbi[q * H + j] + pbh[q * H + j];
      }
      int64_t r = 0;
      for (; r + 2 <= B; r += 2) {
        T g0[4] = {bias[0], bias[1], bias[2], bias[3]}, g1[4] = {bias[0], bias[1], bias[2], bias[3]};
        dot4x2<T>(px + r * I, px + (r + 1) * I, wi + j * I, H * I, I, g0, g1);
        dot4x2<T>(ph + r * H, ph + (r + 1) * H, wh + j * H, H * H, H, g0, g1);
        cell_update<T>(g0, pc[r * H + j], oh + r * H + j, oc + r * H + j, ow + r * 5 * H + j, H);
        cell_update<T>(g1, pc[(r + 1) * H + j], oh + (r + 1) * H + j, oc + (r + 1) * H + j,
                       ow + (r + 1) * 5 * H + j, H);
      }
      if (r < B) {
        T g[4] = {bias[0], bias[1], bias[2], bias[3]};
        dot4<T>(px + r * I, wi + j * I, H * I, I, g);
        dot4<T>(ph + r * H, wh + j * H, H * H, H, g);
        cell_update<T>(g, pc[r * H + j], oh + r * H + j, oc + r * H + j, ow + r * 5 * H + j, H);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& input, const at::Tensor& hx,
                                                       const at::Tensor& cx, const at::Tensor& w_ih,
                                                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                       const c10::optional<at::Tensor>& b_hh) {
  check_lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = input.size(0), H = hx.size(1);
  const auto acc = acc_type(input.scalar_type());
  at::Tensor hy = at::empty({B, H}, input.options()), cy = at::empty({B, H}, input.options());
  at::Tensor ws = at::empty({B, 5 * H}, input.options().dtype(acc));
  if (B == 0 || H == 0) return {hy, cy, ws};
  if (B <= kSmallBatch && input.scalar_type() == acc) {
    at::Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
    at::Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_fwd_cpu_small", [&] {
      small_batch_fwd<scalar_t>(input.contiguous(), hx.contiguous(), cx.contiguous(), w_ih.contiguous(),
                                w_hh.contiguous(), bi, bh, hy, cy, ws);
    });
    return {hy, cy, ws};
  }
  at::Tensor gates;
  if (input.scalar_type() == acc) {
    gates = at::mm(input, w_ih.t());
    gates.addmm_(hx, w_hh.t());
  } else {  // fp16 / bf16: fp32 GEMMs (fp32 accumulation and gates, as the contract says)
    gates = at::mm(input.to(acc), w_ih.to(acc).t());
    gates.addmm_(hx.to(acc), w_hh.to(acc).t());
  }
  at::Tensor c0 = cx.contiguous();
  at::Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
  at::Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu_lstm::gate_update<acc_t>(gates.data_ptr<acc_t>(), bi.defined() ? bi.data_ptr<scalar_t>() : nullptr,
                                 bh.defined() ? bh.data_ptr<scalar_t>() : nullptr, c0.data_ptr<scalar_t>(), H,
                                 hy.data_ptr<scalar_t>(), cy.data_ptr<scalar_t>(), ws.data_ptr<acc_t>(), B, H);
  });
  return {hy, cy, ws};
}

std::tuple<at::Tensor, at::Tensor> bwd_cpu(const c10::optional<at::Tensor>& grad_h,
                                           const c10::optional<at::Tensor>& grad_c, const at::Tensor& cx,
                                           const at::Tensor& ws) {
  check_lstm_cell_bwd(grad_h, grad_c, cx, ws);
  const int64_t B = cx.size(0), H = cx.size(1);
  at::Tensor dg = at::empty({B, 4 * H}, ws.options());
  at::Tensor dcx = at::empty({B, H}, cx.options());
  if (B == 0 || H == 0) return {dg, dcx};
  at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  at::Tensor gc = grad_c.has_value() ? grad_c->contiguous() : at::Tensor();
  at::Tensor c0 = cx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu_lstm::gate_grads<acc_t>(gh.defined() ? gh.data_ptr<scalar_t>() : nullptr,
                                gc.defined() ? gc.data_ptr<scalar_t>() : nullptr, c0.data_ptr<scalar_t>(), H,
                                ws.data_ptr<acc_t>(), dg.data_ptr<acc_t>(), dcx.data_ptr<scalar_t>(), B, H);
  });
  return {dg, dcx};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("lstm_cell_fwd", &fwd_cpu);
  m.impl("lstm_cell_bwd", &bwd_cpu);
}

}  // namespace pykernels

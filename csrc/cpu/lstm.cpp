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

// Batches up to this size take the fully fused paths: no gate buffer and no BLAS call; each hidden unit's four
// weight rows (of W_ih and W_hh) are read once and applied to every batch row while they sit in L1. Measured on 2
// cores (I = H = 256, fp32, 2026-12-05): the forward at B = 8 in 124 us against 181 us through BLAS; at B = 16
// BLAS wins (225 us against torch's 197).
constexpr int64_t kSmallBatch = 8;

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

// Four weight rows r..r+3 of the small-batch backward: da (B, K; this thread's partial sums) += dg[:, r..r+3]
// w[r..r+3, :] and dw[r..r+3, :] = dg[:, r..r+3]^T a (a: the B rows of x or h), each row read once. Four rows at a
// time so that each partial-sum vector is loaded and stored once per four FMAs. dg columns r.. at row stride ldg.
template <typename T, bool DA, bool DW>
inline void grads_rows4(const T* dg, int64_t ldg, const T* a, const T* w, int64_t B, int64_t K, T* da, T* dw) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  for (int64_t k = 0; k < K; k += W) {
    const int64_t n = std::min<int64_t>(W, K - k);
    V wv[4], acc[4];
    for (int q = 0; q < 4; ++q) {
      wv[q] = cpu_lstm::load<T>(w + q * K + k, n);
      acc[q] = V(T(0));
    }
    for (int64_t b = 0; b < B; ++b) {
      const T* d = dg + b * ldg;
      const V d0(d[0]), d1(d[1]), d2(d[2]), d3(d[3]);
      if constexpr (DA) {
        T* p = da + b * K + k;
        V s = cpu_lstm::load<T>(p, n);
        s = at::vec::fmadd(d0, wv[0], s);
        s = at::vec::fmadd(d1, wv[1], s);
        s = at::vec::fmadd(d2, wv[2], s);
        s = at::vec::fmadd(d3, wv[3], s);
        cpu_lstm::store<T>(p, s, n);
      }
      if constexpr (DW) {
        const V av = cpu_lstm::load<T>(a + b * K + k, n);
        acc[0] = at::vec::fmadd(d0, av, acc[0]);
        acc[1] = at::vec::fmadd(d1, av, acc[1]);
        acc[2] = at::vec::fmadd(d2, av, acc[2]);
        acc[3] = at::vec::fmadd(d3, av, acc[3]);
      }
    }
    if constexpr (DW) {
      for (int q = 0; q < 4; ++q) cpu_lstm::store<T>(dw + q * K + k, acc[q], n);
    }
  }
}

template <typename T>
inline void grads_rows4(bool da_on, bool dw_on, const T* dg, int64_t ldg, const T* a, const T* w, int64_t B,
                        int64_t K, T* da, T* dw) {
  if (da_on && dw_on) grads_rows4<T, true, true>(dg, ldg, a, w, B, K, da, dw);
  else if (da_on) grads_rows4<T, true, false>(dg, ldg, a, w, B, K, da, dw);
  else if (dw_on) grads_rows4<T, false, true>(dg, ldg, a, w, B, K, da, dw);
}

// The products of the backward for B <= kSmallBatch in one pass over the weights: the 4H rows of W_ih and W_hh are
// split over the threads; each row is read once for its share of dx / dh (per-thread partial sums, added in thread
// order afterwards: deterministic for a given thread count) and its row of dW_ih / dW_hh is written once. BLAS
// would read the weights for dx and dh and write dW in separate calls, each a thin GEMM it runs poorly.
template <typename T>
void small_batch_grads(const at::Tensor& dg, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, bool need[5], at::Tensor& dx, at::Tensor& dh, at::Tensor& dw_ih,
                       at::Tensor& dw_hh, at::Tensor& db) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1), R = 4 * H;
  const int nt = at::get_num_threads();
  at::Tensor part = at::zeros({nt, B * (I + H)}, dg.options());  // per thread: dx (B, I), then dh (B, H)
  const T *pdg = dg.data_ptr<T>(), *px = x.data_ptr<T>(), *ph = h.data_ptr<T>(), *wi = w_ih.data_ptr<T>(),
          *wh = w_hh.data_ptr<T>();
  T* pp = part.data_ptr<T>();
  T* pwi = need[2] ? dw_ih.data_ptr<T>() : nullptr;
  T* pwh = need[3] ? dw_hh.data_ptr<T>() : nullptr;
  T* pdb = need[4] ? db.data_ptr<T>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, (I + H) * (B + 1)));
  at::parallel_for(0, H, grain, [&](int64_t g0, int64_t g1) {  // groups of four rows (R = 4H)
    T* mine = pp + std::min<int64_t>(at::get_thread_num(), nt - 1) * B * (I + H);
    for (int64_t r = 4 * g0; r < 4 * g1; r += 4) {
      grads_rows4<T>(need[0], need[2], pdg + r, R, px, wi + r * I, B, I, mine, pwi ? pwi + r * I : nullptr);
      grads_rows4<T>(need[1], need[3], pdg + r, R, ph, wh + r * H, B, H, mine + B * I, pwh ? pwh + r * H : nullptr);
      for (int64_t q = 0; pdb && q < 4; ++q) {
        T s = T(0);
        for (int64_t b = 0; b < B; ++b) s += pdg[b * R + r + q];
        pdb[r + q] = s;
      }
    }
  });
  // Separate sums: outputs must not alias each other.
  if (need[0]) dx = part.narrow(1, 0, B * I).sum(0).view({B, I});
  if (need[1]) dh = part.narrow(1, B * I, B * H).sum(0).view({B, H});
}

// lstm_cell_grads: the cell's whole backward in one call (the Python glue of five GEMM calls cost as much as the
// kernels at small batches). Unrequested outputs are empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads_cpu(
    const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c, const at::Tensor& cx,
    const at::Tensor& ws, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, bool input_grad, bool hx_grad, bool w_ih_grad, bool w_hh_grad, bool bias_grad) {
  check_lstm_cell_fwd(input, hx, cx, w_ih, w_hh, c10::nullopt, c10::nullopt);
  auto [dg, dcx] = bwd_cpu(grad_h, grad_c, cx, ws);
  const int64_t B = input.size(0), I = input.size(1), H = hx.size(1);
  const auto dt = input.scalar_type();
  const auto opt = input.options();
  bool need[5] = {input_grad, hx_grad, w_ih_grad, w_hh_grad, bias_grad};
  at::Tensor dx = at::empty({0}, opt), dh = at::empty({0}, opt), dw_ih = at::empty({0}, opt),
             dw_hh = at::empty({0}, opt), db = at::empty({0}, opt);
  if (B <= kSmallBatch && dt == acc_type(dt)) {
    if (w_ih_grad) dw_ih = at::empty({4 * H, I}, opt);
    if (w_hh_grad) dw_hh = at::empty({4 * H, H}, opt);
    if (bias_grad) db = at::empty({4 * H}, opt);
    if (input_grad) dx = at::zeros({B, I}, opt);  // (replaced by the sums; zeros when H == 0)
    if (hx_grad) dh = at::zeros({B, H}, opt);
    if (B > 0 && H > 0) {
      AT_DISPATCH_FLOATING_TYPES(dt, "lstm_cell_grads_cpu_small", [&] {
        small_batch_grads<scalar_t>(dg, input.contiguous(), hx.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
                                    need, dx, dh, dw_ih, dw_hh, db);
      });
    }
    return {dx, dh, dcx, dw_ih, dw_hh, db};
  }
  // BLAS, in the GEMM dtype of ops/lstm.py's gemm_dtype: fp32 for fp16 (the CPU's fp16 GEMMs are slow), else the
  // input's; dg (fp32/fp64) rounded to it once.
  const auto g = dt == at::kHalf ? at::kFloat : dt;
  const at::Tensor d = dg.to(g);
  if (input_grad) dx = d.mm(w_ih.to(g)).to(dt);
  if (hx_grad) dh = d.mm(w_hh.to(g)).to(dt);
  if (w_ih_grad) dw_ih = d.t().mm(input.to(g)).to(dt);
  if (w_hh_grad) dw_hh = d.t().mm(hx.to(g)).to(dt);
  if (bias_grad) db = dg.sum(0).to(dt);
  return {dx, dh, dcx, dw_ih, dw_hh, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("lstm_cell_fwd", &fwd_cpu);
  m.impl("lstm_cell_bwd", &bwd_cpu);
  m.impl("lstm_cell_grads", &grads_cpu);
}

}  // namespace pykernels

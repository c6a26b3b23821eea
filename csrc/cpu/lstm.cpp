// CPU kernels of the LSTM cell ops (docs/lstm.md). Forward: the two gate GEMMs go into one (B, 4H) buffer of the
// accumulation dtype (BLAS; the second accumulates into the first), then one vectorised pass per row adds both
// biases, applies the activations, updates the cell and writes h', c' and the workspace. torch's eager CPU cell
// runs ~10 separate elementwise passes over the gates instead. Backward: one vectorised pass from (dh, dc, cx, ws)
// to the gate gradients and dc_prev; the GEMMs for dx, dh and the weights run in the autograd formula.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <type_traits>

#include "../lstm.h"
#include "gemm_dtype.h"
#include "lstm_pointwise.h"

namespace pykernels {
namespace {

using cpu_lstm::Vec;

// Loops over compile-time bounds (rows, gates, vectors) whose bodies hold vector registers: fully unrolled, so that
// the arrays of accumulators stay in registers (GCC at -O3 left some in memory: the backward ran 2-3x slower).
#if defined(__clang__)
#define PYKERNELS_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define PYKERNELS_UNROLL _Pragma("GCC unroll 16")
#else
#define PYKERNELS_UNROLL
#endif

// Batches up to these sizes take the fully fused paths: no gate buffer and no BLAS call; each hidden unit's four
// weight rows (of W_ih and W_hh) are read once and applied to every batch row while they sit in L1. Measured on 2
// cores, I = H = 256, A/B against BLAS in alternating processes (2026-12-05, after the vectorised cell update):
// the forward at B = 9 / 12 / 16 in 84 / 104 / 140 us against 173 / 177 / 179 us (fp32) and 112 / 138 / 186 us
// against 300-890 us (bf16: BLAS on converted weights); the backward pass loses from B = 9 to 12 and clearly at
// B = 16 (fp32: 440-610 us against 270-340), so it stops at 8 (at B = 8: 173 us against 246 us at B = 9 by BLAS).
constexpr int64_t kSmallBatchFwd = 16;
constexpr int64_t kSmallBatchBwd = 8;

// Two vectors of the accumulation type T from 2 * Vec<T>::size() elements of the storage type S: S = T, or a 16-bit S
// into float (one vector of bf16 / fp16 converts to exactly two float vectors).
template <typename T, typename S>
inline void load2(const S* p, Vec<T>& a, Vec<T>& b) {
  if constexpr (std::is_same_v<S, T>) {
    a = Vec<T>::loadu(p);
    b = Vec<T>::loadu(p + Vec<T>::size());
  } else {
    static_assert(std::is_same_v<T, float> && at::vec::Vectorized<S>::size() == 2 * Vec<T>::size());
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      std::tie(a, b) = at::vec::convert_bfloat16_float(at::vec::Vectorized<S>::loadu(p));
    } else {
      std::tie(a, b) = at::vec::convert_half_float(at::vec::Vectorized<S>::loadu(p));
    }
  }
}

template <typename T, typename S>
inline void store2(S* p, const Vec<T>& a, const Vec<T>& b) {
  if constexpr (std::is_same_v<S, T>) {
    a.store(p);
    b.store(p + Vec<T>::size());
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    at::vec::convert_float_bfloat16(a, b).store(p);
  } else {
    at::vec::convert_float_half(a, b).store(p);
  }
}

// acc[r][q] += dot(a[r], w + q*gate_stride) over K, for R = 1 or 2 batch rows and the four gates: each weight load
// feeds R rows. One row keeps a second set of accumulators so that no accumulator is a chain of two FMAs a step.
template <int R, typename T, typename S>
inline void dot4(const S* const (&a)[R], const S* w, int64_t gate_stride, int64_t K, T (&acc)[R][4]) {
  using V = Vec<T>;
  constexpr int64_t W = 2 * V::size();
  constexpr int NS = R == 1 ? 2 : 1;
  V s[NS][R][4];
  PYKERNELS_UNROLL
  for (int u = 0; u < NS; ++u)
    PYKERNELS_UNROLL
    for (int r = 0; r < R; ++r)
      PYKERNELS_UNROLL
      for (int q = 0; q < 4; ++q) s[u][r][q] = V(T(0));
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V x0[R], x1[R];
    PYKERNELS_UNROLL
    for (int r = 0; r < R; ++r) load2<T>(a[r] + k, x0[r], x1[r]);
    PYKERNELS_UNROLL
    for (int q = 0; q < 4; ++q) {
      V w0, w1;
      load2<T>(w + q * gate_stride + k, w0, w1);
      PYKERNELS_UNROLL
      for (int r = 0; r < R; ++r) {
        s[0][r][q] = at::vec::fmadd(x0[r], w0, s[0][r][q]);
        s[NS - 1][r][q] = at::vec::fmadd(x1[r], w1, s[NS - 1][r][q]);
      }
    }
  }
  PYKERNELS_UNROLL
  for (int r = 0; r < R; ++r) {
    PYKERNELS_UNROLL
    for (int q = 0; q < 4; ++q) {
      V t = s[0][r][q];
      if constexpr (NS == 2) t = t + s[1][r][q];
      T v = at::vec::vec_reduce_all<T>(std::plus<V>(), t);
      for (int64_t j = k; j < K; ++j) v += T(a[r][j]) * T(w[q * gate_stride + j]);
      acc[r][q] += v;
    }
  }
}

// The forward for B <= kSmallBatchFwd: per hidden unit, its four rows of W_ih and W_hh are read once (in their storage
// type S: a 16-bit weight is converted in registers, not copied to fp32 first) and applied to the batch rows in
// pairs; the gates (T = the accumulation type) of a vector of units go to the same vectorised cell update as larger
// batches (cpu_lstm::cell_units).
template <typename T, typename S>
void small_batch_fwd(const at::Tensor& x, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const at::Tensor& bi, const at::Tensor& bh, at::Tensor& hy,
                     at::Tensor& cy, at::Tensor& ws) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  const S *px = x.data_ptr<S>(), *ph = hx.data_ptr<S>(), *pc = cx.data_ptr<S>(), *wi = w_ih.data_ptr<S>(),
          *wh = w_hh.data_ptr<S>();
  const S* pbi = bi.defined() ? bi.data_ptr<S>() : nullptr;
  const S* pbh = bh.defined() ? bh.data_ptr<S>() : nullptr;
  S *oh = hy.data_ptr<S>(), *oc = cy.data_ptr<S>();
  T* ow = ws.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 4 * (I + H) * B));
  at::parallel_for(0, H, grain, [&](int64_t j0, int64_t j1) {
    // the gates of W units at a time, then their cell update as vectors (as for larger batches)
    constexpr int64_t W = cpu_lstm::Vec<T>::size();
    alignas(64) T gb[kSmallBatchFwd][4][W] = {};
    for (int64_t jb = j0; jb < j1; jb += W) {
      const int64_t n = std::min(W, j1 - jb);
      for (int64_t j = jb; j < jb + n; ++j) {
        T bias[4] = {T(0), T(0), T(0), T(0)};
        if (pbi) {
          PYKERNELS_UNROLL
          for (int q = 0; q < 4; ++q) bias[q] = T(pbi[q * H + j]) + T(pbh[q * H + j]);
        }
        auto rows = [&](auto tag, int64_t r) {  // rows r .. r + R - 1
          constexpr int R = decltype(tag)::value;
          T g[R][4];
          const S* xr[R];
          const S* hr[R];
          PYKERNELS_UNROLL
          for (int u = 0; u < R; ++u) {
            PYKERNELS_UNROLL
            for (int q = 0; q < 4; ++q) g[u][q] = bias[q];
            xr[u] = px + (r + u) * I;
            hr[u] = ph + (r + u) * H;
          }
          dot4<R, T>(xr, wi + j * I, H * I, I, g);
          dot4<R, T>(hr, wh + j * H, H * H, H, g);
          PYKERNELS_UNROLL
          for (int u = 0; u < R; ++u) {
            PYKERNELS_UNROLL
            for (int q = 0; q < 4; ++q) gb[r + u][q][j - jb] = g[u][q];
          }
        };
        int64_t r = 0;
        for (; r + 2 <= B; r += 2) rows(std::integral_constant<int, 2>(), r);
        if (r < B) rows(std::integral_constant<int, 1>(), r);
      }
      for (int64_t r = 0; r < B; ++r) {
        cpu_lstm::Vec<T> g[4];
        for (int q = 0; q < 4; ++q) g[q] = cpu_lstm::Vec<T>::loadu(gb[r][q]);
        const int64_t o = r * H + jb;
        cpu_lstm::cell_units<T>(g, cpu_lstm::load<T>(pc + o, n), ow + r * 5 * H + jb, H, oh + o, oc + o, n);
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
  if (B <= kSmallBatchFwd) {
    at::Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
    at::Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_fwd_cpu_small", [&] {
      small_batch_fwd<at::opmath_type<scalar_t>, scalar_t>(input.contiguous(), hx.contiguous(), cx.contiguous(),
                                                           w_ih.contiguous(), w_hh.contiguous(), bi, bh, hy, cy, ws);
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

// NR weight rows r.. of the small-batch backward: da (B, K; this thread's partial sums, type T) += dg[:, r..]
// w[r.., :] and dw[r.., :] = dg[:, r..]^T a (a: the B rows of x or h), each row read once, in its storage type S.
// Several rows at a time so that each partial-sum vector is loaded and stored once per NR FMAs; NV vectors per step
// (2 when S is 16-bit: one load converts to two float vectors), NR * NV = 4 so that AVX2's 16 registers suffice.
template <typename T, typename S, int NR, bool DA, bool DW>
inline void grads_rows(const T* dg, int64_t ldg, const S* a, const S* w, int64_t B, int64_t K, T* da, S* dw) {
  using V = Vec<T>;
  constexpr int NV = 4 / NR;
  constexpr int64_t W = NV * V::size();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    V wv[NR * NV], acc[NR * NV];  // 1-D: GCC keeps 2-D arrays of vectors on the stack
    PYKERNELS_UNROLL
    for (int q = 0; q < NR; ++q) {
      if constexpr (NV == 1) wv[q] = V::loadu(w + q * K + k); else load2<T>(w + q * K + k, wv[2 * q], wv[2 * q + 1]);
      PYKERNELS_UNROLL
      for (int v = 0; v < NV; ++v) acc[q * NV + v] = V(T(0));
    }
    for (int64_t b = 0; b < B; ++b) {
      V d[NR];
      PYKERNELS_UNROLL
      for (int q = 0; q < NR; ++q) d[q] = V(dg[b * ldg + q]);
      if constexpr (DA) {
        T* p = da + b * K + k;
        PYKERNELS_UNROLL
        for (int v = 0; v < NV; ++v) {
          V t = V::loadu(p + v * V::size());
          PYKERNELS_UNROLL
          for (int q = 0; q < NR; ++q) t = at::vec::fmadd(d[q], wv[q * NV + v], t);
          t.store(p + v * V::size());
        }
      }
      if constexpr (DW) {
        V av[NV];
        if constexpr (NV == 1) av[0] = V::loadu(a + b * K + k); else load2<T>(a + b * K + k, av[0], av[1]);
        PYKERNELS_UNROLL
        for (int q = 0; q < NR; ++q)
          PYKERNELS_UNROLL
          for (int v = 0; v < NV; ++v) acc[q * NV + v] = at::vec::fmadd(d[q], av[v], acc[q * NV + v]);
      }
    }
    if constexpr (DW) {
      PYKERNELS_UNROLL
      for (int q = 0; q < NR; ++q) {
        if constexpr (NV == 1) acc[q].store(dw + q * K + k); else store2<T>(dw + q * K + k, acc[2 * q], acc[2 * q + 1]);
      }
    }
  }
  for (; k < K; ++k) {  // the tail, scalar
    T acc[NR] = {};
    for (int64_t b = 0; b < B; ++b) {
      const T* d = dg + b * ldg;
      if constexpr (DA) {
        T t = da[b * K + k];
        PYKERNELS_UNROLL
        for (int q = 0; q < NR; ++q) t += d[q] * T(w[q * K + k]);
        da[b * K + k] = t;
      }
      if constexpr (DW) {
        PYKERNELS_UNROLL
        for (int q = 0; q < NR; ++q) acc[q] += d[q] * T(a[b * K + k]);
      }
    }
    if constexpr (DW) {
      PYKERNELS_UNROLL
      for (int q = 0; q < NR; ++q) dw[q * K + k] = S(acc[q]);
    }
  }
}

template <typename T, typename S>
inline void grads_rows(bool da_on, bool dw_on, const T* dg, int64_t ldg, const S* a, const S* w, int64_t B, int64_t K,
                       T* da, S* dw) {
  constexpr int NR = std::is_same_v<S, T> ? 4 : 2;
  if (da_on && dw_on) grads_rows<T, S, NR, true, true>(dg, ldg, a, w, B, K, da, dw);
  else if (da_on) grads_rows<T, S, NR, true, false>(dg, ldg, a, w, B, K, da, dw);
  else if (dw_on) grads_rows<T, S, NR, false, true>(dg, ldg, a, w, B, K, da, dw);
}

// The products of the backward for B <= kSmallBatchBwd in one pass over the weights: the 4H rows of W_ih and W_hh are
// split over the threads; each row is read once for its share of dx / dh (per-thread partial sums in T, added in
// thread order afterwards: deterministic for a given thread count) and its row of dW_ih / dW_hh is written once.
// BLAS would read the weights for dx and dh and write dW in separate calls, each a thin GEMM it runs poorly (and,
// in 16-bit, on converted copies of the weights).
template <typename T, typename S>
void small_batch_grads(const at::Tensor& dg, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, bool need[5], at::Tensor& dx, at::Tensor& dh, at::Tensor& dw_ih,
                       at::Tensor& dw_hh, at::Tensor& db) {
  constexpr int64_t NR = std::is_same_v<S, T> ? 4 : 2;  // rows per grads_rows call; divides 4H
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1), R = 4 * H;
  const int nt = at::get_num_threads();
  at::Tensor part = at::zeros({nt, B * (I + H)}, dg.options());  // per thread: dx (B, I), then dh (B, H)
  const T* pdg = dg.data_ptr<T>();
  const S *px = x.data_ptr<S>(), *ph = h.data_ptr<S>(), *wi = w_ih.data_ptr<S>(), *wh = w_hh.data_ptr<S>();
  T* pp = part.data_ptr<T>();
  S* pwi = need[2] ? dw_ih.data_ptr<S>() : nullptr;
  S* pwh = need[3] ? dw_hh.data_ptr<S>() : nullptr;
  S* pdb = need[4] ? db.data_ptr<S>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, (I + H) * (B + 1)));
  at::parallel_for(0, R / NR, grain, [&](int64_t g0, int64_t g1) {  // groups of NR rows
    T* mine = pp + std::min<int64_t>(at::get_thread_num(), nt - 1) * B * (I + H);
    for (int64_t r = NR * g0; r < NR * g1; r += NR) {
      grads_rows<T, S>(need[0], need[2], pdg + r, R, px, wi + r * I, B, I, mine, pwi ? pwi + r * I : nullptr);
      grads_rows<T, S>(need[1], need[3], pdg + r, R, ph, wh + r * H, B, H, mine + B * I, pwh ? pwh + r * H : nullptr);
      for (int64_t q = 0; pdb && q < NR; ++q) {
        T s = T(0);
        for (int64_t b = 0; b < B; ++b) s += pdg[b * R + r + q];
        pdb[r + q] = S(s);
      }
    }
  });
  // Separate sums: outputs must not alias each other. Rounded to S once.
  if (need[0]) dx = part.narrow(1, 0, B * I).sum(0).view({B, I}).to(x.scalar_type());
  if (need[1]) dh = part.narrow(1, B * I, B * H).sum(0).view({B, H}).to(x.scalar_type());
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
  if (B == 0 || H == 0) {  // sums over no rows, or no units: zeros (the kernels below would leave dW unwritten)
    if (input_grad) dx = at::zeros({B, I}, opt);
    if (hx_grad) dh = at::zeros({B, H}, opt);
    if (w_ih_grad) dw_ih = at::zeros({4 * H, I}, opt);
    if (w_hh_grad) dw_hh = at::zeros({4 * H, H}, opt);
    if (bias_grad) db = at::zeros({4 * H}, opt);
    return {dx, dh, dcx, dw_ih, dw_hh, db};
  }
  if (B <= kSmallBatchBwd) {  // every row of dW and db is written; dx and dh are the per-thread partial sums' total
    if (w_ih_grad) dw_ih = at::empty({4 * H, I}, opt);
    if (w_hh_grad) dw_hh = at::empty({4 * H, H}, opt);
    if (bias_grad) db = at::empty({4 * H}, opt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "lstm_cell_grads_cpu_small", [&] {
      small_batch_grads<at::opmath_type<scalar_t>, scalar_t>(dg, input.contiguous(), hx.contiguous(),
                                                             w_ih.contiguous(), w_hh.contiguous(), need, dx, dh,
                                                             dw_ih, dw_hh, db);
    });
    return {dx, dh, dcx, dw_ih, dw_hh, db};
  }
  // BLAS in cpu_gemm_dtype (Python's _native.gemm_dtype, as ops/lstm.py's _weight_grads); dg rounded to it once.
  const auto g = cpu_gemm_dtype(dt);
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

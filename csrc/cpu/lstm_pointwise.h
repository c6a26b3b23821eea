// Vectorised pointwise parts of the LSTM step on the CPU, shared by the cell ops (cpu/lstm.cpp) and the sequence
// ops (cpu/lstm_layer_kernels.h): the gate update (activations, cell update, h and the workspace) and the gate
// gradients. Each is written once, templated on the storage type of every operand, because the cell reads its
// state in the input dtype while the sequence keeps c and the incoming gradients in the accumulation dtype.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace pykernels {
namespace cpu_lstm {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return n == Vec<acc_t>::size() ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, n);
  } else {
    alignas(64) acc_t tmp[Vec<acc_t>::size()] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(p[i]);
    return Vec<acc_t>::loadu(tmp);
  }
}

template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vec<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == Vec<acc_t>::size()) v.store(p); else v.store(p, n);
  } else {
    alignas(64) acc_t tmp[Vec<acc_t>::size()];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
  }
}

// The activations. For float they are computed here, not by at::vec's Sleef calls: Sleef's 1-ulp tanhf works in
// double-float arithmetic (20 ns per 8 floats on the 2-core CI VM, 3x its expf; perf put it at 13% of the sequence
// forward). These stay within 2 ulp of the correctly rounded value over the whole float range (tanh within 1, as
// Sleef's; tests/test_lstm_activations.py checks a dense sample) and propagate NaN; double keeps Sleef.

// e^x for x >= ln(FLT_MIN) (below it returns about FLT_MIN, not a subnormal: both callers add the result to 1),
// +inf above ln(FLT_MAX). x = n ln2 + r with ln2 in two parts (n ln2_hi exact), |r| <= ln2 / 2; e^r by its
// degree-7 Taylor polynomial (truncation < 0.1 ulp); 2^n as two factors so that n = 128 overflows to inf.
inline Vec<float> exp_float(const Vec<float>& x) {
  using V = Vec<float>;
  const V xc = at::vec::clamp(x, V(-87.3365478515625f), V(88.72283935546875f));
  const V n = (xc * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = at::vec::fmadd(p, r, V(c));
  const auto ni = at::vec::convert_to_int_of_same_size(n);
  const auto n1 = ni >> at::vec::Vectorized<int32_t>(1), n2 = ni - n1;
  const at::vec::Vectorized<int32_t> bias(127), shift(23);
  return p * at::vec::cast<float>((n1 + bias) << shift) * at::vec::cast<float>((n2 + bias) << shift);
}

template <typename acc_t>
inline Vec<acc_t> sigmoid(const Vec<acc_t>& x) {
  const Vec<acc_t> one(acc_t(1));
  if constexpr (std::is_same_v<acc_t, float>) {
    return one / (one + exp_float(x.neg()));
  } else {
    return one / (one + x.neg().exp());
  }
}

// tanh: below |x| = 0.55, x + x^3 q(x^2) with q a degree-4 fit of (tanh x - x) / x^3 (relative error 0.07 ulp
// with float coefficients); above, 1 - 2 / (e^{2|x|} + 1) with x's sign (the result is >= 0.5 there, so the
// subtraction loses nothing).
template <typename acc_t>
inline Vec<acc_t> tanh(const Vec<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vec<float>;
    const V one(1.f), sign(-0.f), a = x.abs(), s = x * x;
    V q(-0.006274239160120487f);
    for (float c : {0.021071678027510643f, -0.05385230854153633f, 0.13332585990428925f, -0.33333316445350647f})
      q = at::vec::fmadd(q, s, V(c));
    const V small = at::vec::fmadd(x * s, q, x);
    const V large = (one - V(2.f) / (exp_float(a + a) + one)) | (x & sign);
    return V::blendv(large, small, a < V(0.55f));
  } else {
    return x.tanh();
  }
}

// The step of n <= Vec::size() hidden units of one batch row: from the pre-activation gates g (i, f, g, o) and
// c_prev, writes the activated gates and c unrounded to ws (at 0, H, .., 4H), h to h and c to c_out when not null.
template <typename acc_t, typename HT, typename CT>
inline void cell_units(const Vec<acc_t> (&g)[4], const Vec<acc_t>& c_prev, acc_t* ws, int64_t H, HT* h, CT* c_out,
                       int64_t n) {
  const Vec<acc_t> i = sigmoid(g[0]), f = sigmoid(g[1]), gt = tanh(g[2]), o = sigmoid(g[3]);
  const Vec<acc_t> c = f * c_prev + i * gt;
  store(h, o * tanh(c), n);
  if (c_out) store(c_out, c, n);
  store(ws, i, n);
  store(ws + H, f, n);
  store(ws + 2 * H, gt, n);
  store(ws + 3 * H, o, n);
  store(ws + 4 * H, c, n);
}

// The gradient step of n units of one row: from dh, dc into the step's outputs, ws (the forward's i, f, g, o, c at
// 0, H, .., 4H) and c_prev, writes the pre-activation gate gradients to dg (at 0, H, 2H, 3H); returns dc_prev.
template <typename acc_t, typename PT>
inline Vec<acc_t> gate_grad_units(const acc_t* ws, int64_t H, const Vec<acc_t>& dh, const Vec<acc_t>& dc,
                                  const PT* c_prev, acc_t* dg, int64_t n) {
  const Vec<acc_t> one(acc_t(1));
  const Vec<acc_t> i = load<acc_t>(ws, n), f = load<acc_t>(ws + H, n), g = load<acc_t>(ws + 2 * H, n),
                   o = load<acc_t>(ws + 3 * H, n), tc = tanh(load<acc_t>(ws + 4 * H, n));
  const Vec<acc_t> dct = dc + dh * o * (one - tc * tc);
  store(dg, dct * g * i * (one - i), n);
  store(dg + H, dct * load<acc_t>(c_prev, n) * f * (one - f), n);
  store(dg + 2 * H, dct * i * (one - g * g), n);
  store(dg + 3 * H, dh * tc * o * (one - o), n);
  return dct * f;
}

inline int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 5 * H)); }

// gates (B, 4H) pre-activation (row stride 4H), plus b_ih + b_hh when given (4H each); c_prev rows at c_stride.
// Writes h (B, H), c_out (B, H) when not null, and ws (B, 5H) = activated i, f, g, o and c unrounded.
template <typename acc_t, typename BT, typename PT, typename HT, typename CT>
void gate_update(const acc_t* gates, const BT* b_ih, const BT* b_hh, const PT* c_prev, int64_t c_stride, HT* h,
                 CT* c_out, acc_t* ws, int64_t B, int64_t H) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* gr = gates + r * 4 * H;
      acc_t* wr = ws + r * 5 * H;
      for (int64_t j = 0; j < H; j += W) {
        const int64_t n = std::min<int64_t>(W, H - j);
        V g[4];
        for (int q = 0; q < 4; ++q) {
          g[q] = load<acc_t>(gr + q * H + j, n);
          if (b_ih) g[q] = g[q] + load<acc_t>(b_ih + q * H + j, n) + load<acc_t>(b_hh + q * H + j, n);
        }
        cell_units<acc_t>(g, load<acc_t>(c_prev + r * c_stride + j, n), wr + j, H, h + r * H + j,
                          c_out ? c_out + r * H + j : static_cast<CT*>(nullptr), n);
      }
    }
  });
}

// From dh, dc (B, H; null = zero), c_prev (rows at c_stride) and ws (B, 5H): the pre-activation gate gradients
// dg (B, 4H) and dc_prev = dc_t f into dc_out (B, H; may alias dc: every element is read before it is written).
template <typename acc_t, typename GT, typename PT, typename DT>
void gate_grads(const GT* dh, const GT* dc, const PT* c_prev, int64_t c_stride, const acc_t* ws, acc_t* dg,
                DT* dc_out, int64_t B, int64_t H) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
    const V zero(acc_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* wr = ws + r * 5 * H;
      acc_t* dr = dg + r * 4 * H;
      for (int64_t j = 0; j < H; j += W) {
        const int64_t n = std::min<int64_t>(W, H - j);
        const V dhv = dh ? load<acc_t>(dh + r * H + j, n) : zero;
        const V dcv = dc ? load<acc_t>(dc + r * H + j, n) : zero;
        store(dc_out + r * H + j, gate_grad_units<acc_t>(wr + j, H, dhv, dcv, c_prev + r * c_stride + j, dr + j, n),
              n);
      }
    }
  });
}

}  // namespace cpu_lstm
}  // namespace pykernels

// Vectorised pointwise parts of the LSTM step on the CPU, shared by the cell ops (cpu/lstm.cpp) and the sequence
// ops (cpu/lstm_layer.cpp): the gate update (activations, cell update, h and the workspace) and the gate
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

template <typename acc_t>
inline Vec<acc_t> sigmoid(const Vec<acc_t>& x) {
  const Vec<acc_t> one(acc_t(1));
  return one / (one + x.neg().exp());
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
        V gi = load<acc_t>(gr + j, n), gf = load<acc_t>(gr + H + j, n), gg = load<acc_t>(gr + 2 * H + j, n),
          go = load<acc_t>(gr + 3 * H + j, n);
        if (b_ih) {
          gi = gi + load<acc_t>(b_ih + j, n) + load<acc_t>(b_hh + j, n);
          gf = gf + load<acc_t>(b_ih + H + j, n) + load<acc_t>(b_hh + H + j, n);
          gg = gg + load<acc_t>(b_ih + 2 * H + j, n) + load<acc_t>(b_hh + 2 * H + j, n);
          go = go + load<acc_t>(b_ih + 3 * H + j, n) + load<acc_t>(b_hh + 3 * H + j, n);
        }
        const V i = sigmoid(gi), f = sigmoid(gf), gt = gg.tanh(), o = sigmoid(go);
        const V c = f * load<acc_t>(c_prev + r * c_stride + j, n) + i * gt;
        store(h + r * H + j, o * c.tanh(), n);
        if (c_out) store(c_out + r * H + j, c, n);
        store(wr + j, i, n);
        store(wr + H + j, f, n);
        store(wr + 2 * H + j, gt, n);
        store(wr + 3 * H + j, o, n);
        store(wr + 4 * H + j, c, n);
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
    const V one(acc_t(1)), zero(acc_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* wr = ws + r * 5 * H;
      acc_t* dr = dg + r * 4 * H;
      for (int64_t j = 0; j < H; j += W) {
        const int64_t n = std::min<int64_t>(W, H - j);
        const V i = load<acc_t>(wr + j, n), f = load<acc_t>(wr + H + j, n), g = load<acc_t>(wr + 2 * H + j, n),
                o = load<acc_t>(wr + 3 * H + j, n), c = load<acc_t>(wr + 4 * H + j, n);
        const V dhv = dh ? load<acc_t>(dh + r * H + j, n) : zero;
        const V dcv = dc ? load<acc_t>(dc + r * H + j, n) : zero;
        const V tc = c.tanh();
        const V dct = dcv + dhv * o * (one - tc * tc);
        store(dr + j, dct * g * i * (one - i), n);
        store(dr + H + j, dct * load<acc_t>(c_prev + r * c_stride + j, n) * f * (one - f), n);
        store(dr + 2 * H + j, dct * i * (one - g * g), n);
        store(dr + 3 * H + j, dhv * tc * o * (one - o), n);
        store(dc_out + r * H + j, dct * f, n);
      }
    }
  });
}

}  // namespace cpu_lstm
}  // namespace pykernels

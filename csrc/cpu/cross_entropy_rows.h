// The per-row CPU kernel of the cross-entropy ops (docs/cross_entropy.md), compiled twice: into _C for the build's
// base capability (cross_entropy.cpp) and into _C_avx512 with 512-bit vectors (avx512/cross_entropy_rows.cpp),
// which pykernels/_ext.py loads on CPUs that have AVX-512. One pass over each row: the row is upcast once into a
// thread-local buffer (any strides, any dtype), max / exp / sum run vectorised on that buffer, and the gradient is
// written from it, so forward + gradient read the logits once and write the grad once.
// No ATen.h, no tensors: only at::vec, the 16-bit scalar types and at::parallel_for, so that the AVX-512 library
// compiles fast and holds nothing but this kernel. Everything here has internal linkage (one copy per library).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../cross_entropy_args.h"
#include "../cross_entropy_math.h"
#include "row_sums.h"
#include "visit_dtype.h"

namespace pykernels {
namespace {

template <typename scalar_t, typename acc_t>
struct RowKernel {
  using Vec = at::vec::Vectorized<acc_t>;
  const CrossEntropyArgs& a;
  const scalar_t* x;
  const scalar_t* tp;  // probability targets or null
  const acc_t* w;
  acc_t W;  // sum of weights (C without weights)
  acc_t eps, zl;
  bool backward;  // take lse from a.lse_in, write only the gradient

  acc_t scale(int64_t r) const {
    if (!a.scale) return acc_t(1);
    const acc_t* s = static_cast<const acc_t*>(a.scale);
    return a.scale_numel == 1 ? s[0] : s[r];
  }

  // Row max m and sum of exp(v - m) in one streaming pass: chunks small enough to stay in L1 between their max
  // and their exponentials, the running sum rescaled when the max grows. Reading a row from memory once overlaps
  // the loads with the exponentials (a max pass, then an exp pass re-reads the row).
  // flatten: inline at::vec's exp_u20 and reductions into the loops (GCC leaves them as calls otherwise, which
  // cost 1.6x per element on the 2-core CI machine).
  [[gnu::flatten]] static void online_max_sum(const acc_t* v, int64_t C, acc_t& m, acc_t& s) {
    constexpr int64_t kChunk = 2048;
    m = -std::numeric_limits<acc_t>::infinity();
    s = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      const acc_t cm = at::vec::reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, v + c0, n);
      if (std::isnan(cm)) {  // a NaN logit makes the row's lse and loss NaN (at::vec::maximum propagates it)
        m = s = cm;
        return;
      }
      if (cm == -std::numeric_limits<acc_t>::infinity()) continue;  // masked classes only: they add exp(-inf) = 0
      if (cm > m) {
        s = s * std::exp(m - cm);  // s is 0 while m is -inf: no 0 * exp(-inf + inf)
        m = cm;
      }
      s += exp_sum<false>(v + c0, nullptr, n, m);
    }
  }

  // Sum of exp(v[c] - m) for c < n, also stored to out[c] when kStore (v may be out): one pass where a map and
  // then a reduction read out twice. Both forwards use it, so they sum in the same order.
  template <bool kStore>
  [[gnu::flatten]] static acc_t exp_sum(const acc_t* v, acc_t* out, int64_t n, acc_t m) {
    const Vec vm(m);
    Vec acc(acc_t(0));
    int64_t c = 0;
    for (; c + Vec::size() <= n; c += Vec::size()) {
      const Vec e = (Vec::loadu(v + c) - vm).exp_u20();
      if constexpr (kStore) e.store(out + c);
      acc = acc + e;
    }
    if (c < n) {  // the tail's lanes past n load as 0: blend them out of the sum
      const Vec e = (Vec::loadu(v + c, n - c) - vm).exp_u20();
      if constexpr (kStore) e.store(out + c, n - c);
      acc = Vec::set(acc, acc + e, n - c);
    }
    return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, acc);
  }

  static constexpr bool kReduced = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

  // src[0, n) into dst in the accumulation dtype; bf16 / fp16 through at::vec's vector conversion, 2.2x faster
  // than converting one element at a time (fp16, C = 32000, AVX-512).
  static void upcast(const scalar_t* src, acc_t* dst, int64_t n) {
    int64_t c = 0;
    if constexpr (kReduced) {
      for (; c + Vec::size() <= n; c += Vec::size()) {
        Vec v;
        at::vec::load_to_float(src + c, v);
        v.store(dst + c);
      }
    }
    for (; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]);
  }

  // Processes row r with buf (size C) as scratch.
  [[gnu::flatten]] void operator()(int64_t r, acc_t* buf) const {
    const int64_t n = r / a.D, d = r % a.D, C = a.C;
    const scalar_t* row = x + n * a.sn + d * a.sd;
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    scalar_t* g = static_cast<scalar_t*>(a.grad);
    const int64_t gbase = n * C * a.D + d;  // grad is contiguous (N, C, D)

    // Target bookkeeping first: ignored rows with a saved lse need no pass over the logits at all.
    int64_t y = -1;
    bool ignored = false, invalid = false;
    if (!tp) {
      y = a.target_index[r];
      ignored = y == a.ignore_index;
      invalid = !ignored && (y < 0 || y >= C);
    }
    if (backward && (ignored || invalid)) {
      const scalar_t fill = ignored ? scalar_t(0) : scalar_t(nan);
      for (int64_t c = 0; c < C; ++c) g[gbase + c * a.D] = fill;
      return;
    }

    // Pass 1: upcast once into buf, unless the row can be read in place (contiguous, already in the accumulation
    // dtype): then the exponentials go from the row into buf, and the forward without a gradient writes none.
    const bool in_place = a.sc == 1 && std::is_same_v<scalar_t, acc_t>;
    const acc_t* vals = buf;
    if (in_place) {
      vals = reinterpret_cast<const acc_t*>(row);
    } else if (a.sc == 1) {
      upcast(row, buf, C);
    } else {
      for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(row[c * a.sc]);
    }
    const acc_t x_y = (!tp && !ignored && !invalid) ? vals[y] : acc_t(0);
    // Sums of the smoothing / probability-target terms, taken relative to the row max m so that a large
    // common offset of the logits cancels exactly (loss = sum w t (m - x) + A log s, not A lse - sum w t x).
    auto relative_sums = [&](acc_t m, acc_t& A, acc_t& sum_wd) {
      const Vec vm(m);
      if (tp) {
        const scalar_t* trow = tp + n * a.tn + d * a.td;
        const Vec keep(acc_t(1) - eps), share(eps / C), zero(acc_t(0));
        const auto sums = chunked_sums<acc_t, 2>(C, [&](int64_t c, int64_t k) -> std::array<Vec, 2> {
          acc_t t[Vec::size()];  // the targets upcast (any strides, any dtype); loadu reads lanes [0, k) only
          for (int64_t i = 0; i < k; ++i) t[i] = static_cast<acc_t>(trow[(c + i) * a.tc]);
          const Vec tv = keep * Vec::loadu(t, k) + share;
          const Vec wt = w ? Vec::loadu(w + c, k) * tv : tv;
          // a zero weight never multiplies a -inf logit
          return {wt, (wt * (vm - Vec::loadu(vals + c, k))) & (wt != zero)};
        });
        A = static_cast<acc_t>(sums[0]);
        sum_wd = static_cast<acc_t>(sums[1]);
      } else if (eps > 0) {
        sum_wd = static_cast<acc_t>(chunked_sums<acc_t, 1>(C, [&](int64_t c, int64_t k) -> std::array<Vec, 1> {
          const Vec dv = vm - Vec::loadu(vals + c, k);
          return {w ? Vec::loadu(w + c, k) * dv : dv};
        })[0]);
      }
    };
    acc_t lse;
    acc_t inv_sum;
    acc_t A_row = 0;  // sum_c w_c t'_c (probability targets)
    if (backward) {
      lse = static_cast<const acc_t*>(a.lse_in)[r];
      // p = exp((x - lse) - lse_err), as the forward's exp((x - m) - log s): x - lse is exact near the row max
      // (Sterbenz) and lse_err puts back what rounding m + log s to lse lost, which exp(x - lse) alone would
      // carry into every probability (ulp(lse) / 2: 5e-4 at logits of 1e4 in fp32).
      const acc_t lse_err = a.lse_err_in ? static_cast<const acc_t*>(a.lse_err_in)[r] : acc_t(0);
      if (tp) {
        acc_t unused = 0;
        relative_sums(lse, A_row, unused);
      }
      // exp, not exp_u20: the gradient is p itself here, and exp_u20's few ulps near p = 1 put it at 2.8x torch's
      // error where torch's exp is the 1-ulp one (AVX-512 builds; logits near 1e4); exp_u20 stays in the sums
      at::vec::map([lse, lse_err](Vec v) { return ((v - Vec(lse)) - Vec(lse_err)).exp(); }, buf, vals, C);
      inv_sum = std::isfinite(lse) ? acc_t(1) : nan;  // a non-finite lse: exp(x - lse) is 0 or NaN, torch's is NaN
    } else {
      acc_t m, s, A = 0, sum_wd = 0;
      if (g) {  // the probabilities stay in buf for the gradient pass
        m = at::vec::reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vals, C);
        relative_sums(m, A, sum_wd);
        s = exp_sum<true>(vals, buf, C, m);
      } else {  // forward only: one streaming pass, the exponentials summed without being written
        online_max_sum(vals, C, m, s);
        relative_sums(m, A, sum_wd);
      }
      // A NaN or +inf logit, or a row of -inf only: torch's log_softmax is NaN across the row, so are the loss and
      // the gradient here (through log_s and inv_sum: exp_u20 maps NaN, e.g. inf - inf, to a number), while lse
      // is the row's log-sum-exp as logsumexp gives it: m itself (NaN, +inf or -inf).
      const bool finite = std::isfinite(m);
      const acc_t log_s = finite ? std::log(s) : nan;
      lse = finite ? m + log_s : m;
      inv_sum = finite ? acc_t(1) / s : nan;
      A_row = A;
      static_cast<acc_t*>(a.lse)[r] = lse;
      static_cast<acc_t*>(a.lse_err)[r] = lse_residual(m, log_s, lse);
      acc_t loss;
      if (tp) {
        loss = infinite_sum(A, A * log_s + sum_wd, log_s);
      } else if (ignored) {
        loss = 0;
      } else if (invalid) {
        loss = nan;
      } else {
        const acc_t wy = w ? w[y] : acc_t(1);
        loss = wy * (acc_t(1) - eps) * ((m - x_y) + log_s);
        if (eps > 0) loss += eps / C * infinite_sum(W, W * log_s + sum_wd, log_s);
      }
      if (zl > 0 && !ignored && !invalid) loss += zl * lse * lse;
      static_cast<acc_t*>(a.loss)[r] = loss;
      if (!g) return;
      if (ignored || invalid) {
        const scalar_t fill = ignored ? scalar_t(0) : scalar_t(nan);
        for (int64_t c = 0; c < C; ++c) g[gbase + c * a.D] = fill;
        return;
      }
    }

    // Gradient: s * (p_c * K - [c == y] * w_y (1 - eps) - eps/C * w_c), or s * (p_c * K - w_c t'_c).
    const acc_t s = scale(r);
    const acc_t z2 = zl > 0 ? 2 * zl * lse : acc_t(0);
    if (tp) {
      const scalar_t* trow = tp + n * a.tn + d * a.td;
      const acc_t k = s * (A_row + z2) * inv_sum;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t t = (acc_t(1) - eps) * static_cast<acc_t>(trow[c * a.tc]) + eps / C;
        g[gbase + c * a.D] = static_cast<scalar_t>(buf[c] * k - s * (w ? w[c] * t : t));
      }
      return;
    }
    // The smoothing terms (eps W / C, eps / C w_c) only with smoothing: a NaN / inf weight of a class no target
    // uses must not make the gradient NaN through 0 * inf (torch's is finite there).
    const bool smooth = eps > 0;
    const acc_t wy = w ? w[y] : acc_t(1);
    const acc_t k = s * (wy * (acc_t(1) - eps) + (smooth ? eps * W / C : acc_t(0)) + z2) * inv_sum;
    const acc_t ew = s * eps / C;
    const acc_t p_y = buf[y];  // (the 16-bit path below overwrites buf)
    if (a.D == 1 && !w) {
      // Common case: contiguous output, vectorised (ew is 0 without smoothing); bf16 / fp16 through buf, each
      // element rounded once, as in the loops below.
      const auto grad_of = [k, ew](Vec v) { return v * Vec(k) - Vec(ew); };
      if constexpr (kReduced) {
        at::vec::map(grad_of, buf, buf, C);
        at::vec::convert(buf, g + gbase, C);
      } else {
        at::vec::map(grad_of, reinterpret_cast<acc_t*>(g + gbase), buf, C);
      }
    } else if (smooth) {
      for (int64_t c = 0; c < C; ++c) g[gbase + c * a.D] = static_cast<scalar_t>(buf[c] * k - ew * (w ? w[c] : acc_t(1)));
    } else {
      for (int64_t c = 0; c < C; ++c) g[gbase + c * a.D] = static_cast<scalar_t>(buf[c] * k);
    }
    // The target entry, formed in the accumulation dtype before its single rounding.
    const acc_t ew_y = smooth ? ew * wy : acc_t(0);
    g[gbase + y * a.D] = static_cast<scalar_t>(p_y * k - ew_y - s * wy * (acc_t(1) - eps));
  }
};

template <typename scalar_t>
void run_rows(const CrossEntropyArgs& a, bool backward) {
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const acc_t W = w ? static_cast<acc_t>(weighted_sum<acc_t>(w, nullptr, a.C)) : static_cast<acc_t>(a.C);
  RowKernel<scalar_t, acc_t> k{a,
                               static_cast<const scalar_t*>(a.logits),
                               static_cast<const scalar_t*>(a.target_prob),
                               w,
                               W,
                               static_cast<acc_t>(a.label_smoothing),
                               static_cast<acc_t>(a.z_loss),
                               backward};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.C, 1));
  at::parallel_for(0, a.rows(), grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(a.C);
    for (int64_t r = begin; r < end; ++r) k(r, buf.data());
  });
}

// Runs the forward (backward false: loss, lse, lse_err and, when a.grad, the gradient) or the backward (the gradient
// from a.lse_in) of every row of a.
inline void cross_entropy_rows(const CrossEntropyArgs& a, bool backward) {
  visit_dtype(a.dtype, [&](auto t) { run_rows<decltype(t)>(a, backward); });
}

}  // namespace
}  // namespace pykernels

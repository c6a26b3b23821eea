// Sums over the classes of a row, shared by the CPU cross-entropy kernels (cross_entropy.cpp, linear_cross_entropy.cpp).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>

namespace pykernels {

// Classes per chunk of chunked_sums: 64 terms per AVX2 fp32 lane before the chunk's sum goes into a double.
constexpr int64_t kRowSumChunk = 512;

// kSums sums over c in [0, n): terms(c, k) gives each sum's terms c .. c + k (k <= Vec::size(); its lanes past k
// are ignored) as a Vectorized<acc_t>. Vector lanes within chunks of kRowSumChunk classes, each chunk's sum added in
// double: one fp32 accumulator per lane over a vocabulary (C / 8 terms each, or C as one scalar loop) lost ~C ulps
// (3.4e-4 in the loss of C = 32000 probability targets, torch 1.0e-6), and the chunked lanes are faster.
template <typename acc_t, size_t kSums, typename Terms>
std::array<double, kSums> chunked_sums(int64_t n, const Terms& terms) {
  using Vec = at::vec::Vectorized<acc_t>;
  std::array<double, kSums> total{};
  for (int64_t c0 = 0; c0 < n; c0 += kRowSumChunk) {
    const int64_t c1 = std::min(n, c0 + kRowSumChunk);
    std::array<Vec, kSums> acc;
    acc.fill(Vec(acc_t(0)));
    int64_t c = c0;
    for (; c + Vec::size() <= c1; c += Vec::size()) {
      const std::array<Vec, kSums> t = terms(c, static_cast<int64_t>(Vec::size()));
      for (size_t i = 0; i < kSums; ++i) acc[i] = acc[i] + t[i];
    }
    if (c < c1) {  // the tail: its lanes past c1 blended out (terms may be anything there)
      const std::array<Vec, kSums> t = terms(c, c1 - c);
      for (size_t i = 0; i < kSums; ++i) acc[i] = Vec::set(acc[i], acc[i] + t[i], c1 - c);
    }
    for (size_t i = 0; i < kSums; ++i) {
      total[i] += at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, acc[i]);
    }
  }
  return total;
}

// Sum of w[c] z[c] (w null: of z) over n classes.
template <typename acc_t>
double weighted_sum(const acc_t* z, const acc_t* w, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return chunked_sums<acc_t, 1>(n, [&](int64_t c, int64_t k) -> std::array<Vec, 1> {
    const Vec v = Vec::loadu(z + c, k);
    return {w ? v * Vec::loadu(w + c, k) : v};
  })[0];
}

}  // namespace pykernels

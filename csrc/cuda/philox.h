// The dropout keep-mask of the attention kernels, bit for bit the Triton kernels' (pykernels/triton/attention.py,
// _keep: tl.philox with the seed as key, the score's counter as (lo, hi, 0, 0), 10 rounds, then
// tl.uint_to_uniform_float), so the CUDA and Triton backends drop the same scores for the same seed. Plain C++
// (host and device): tests/test_attention_cuda.py compiles it for the CPU and compares with the Triton mask.
#pragma once
#include <cstdint>

#include "../dtype.h"

namespace pykernels {

PYKERNELS_HD inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// First output word of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1).
PYKERNELS_HD inline uint32_t philox_first(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Whether score number `idx` (row * columns + column) is kept at drop probability p.
PYKERNELS_HD inline bool dropout_keep(uint64_t seed, int64_t idx, float p) {
  const uint64_t u = static_cast<uint64_t>(idx);
  int32_t x = static_cast<int32_t>(philox_first(static_cast<uint32_t>(u), static_cast<uint32_t>(u >> 32),
                                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f > p;
}

}  // namespace pykernels

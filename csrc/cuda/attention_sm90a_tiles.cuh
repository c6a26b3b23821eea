// Shared-memory tiles of the sm_90a attention kernels (wgmma operands, csrc/cuda/wgmma.cuh): operand rows into
// canonical no-swizzle K-major tiles, as they are (the reduction runs along the row: Q, K, V, dO in S = Q K^T,
// dP = dO V^T) or transposed (the reduction runs across the rows: V in O += P V, K in dQ += dS K, Q and dO in
// dK += dS^T Q and dV += P^T dO). Loads by ordinary threads through load_chunks (attention_tiles.cuh): the writers
// must fence_proxy_async_smem() before the barrier that precedes the wgmma.
#pragma once
#include <cstdint>
#include <cstring>

#include "attention_tiles.cuh"
#include "wgmma.cuh"

namespace pykernels {
namespace cuda {

// ROWS rows x DP columns of an operand (nrows, cols valid) into a K-major tile of ROWS rows and K = DP.
template <int ROWS, int DP>
__device__ __forceinline__ void load_kmajor(uint16_t* sm, const uint16_t* base, int64_t rs, int nrows, int cols,
                                            bool vec16) {
  load_chunks<ROWS, DP>(base, rs, nrows, cols, vec16, [&](int r, int c, const uint4& v) {
    *reinterpret_cast<uint4*>(sm + kmajor_offset(r, c, DP)) = v;
  });
}

// ROWS rows x DC columns of an operand, transposed into a K-major tile of DC rows (the product's N) and K = ROWS.
template <int ROWS, int DC>
__device__ __forceinline__ void load_transposed(uint16_t* sm, const uint16_t* base, int64_t rs, int nrows, int cols,
                                                bool vec16) {
  load_chunks<ROWS, DC>(base, rs, nrows, cols, vec16, [&](int r, int c, const uint4& v) {
    uint16_t e8[8];
    memcpy(e8, &v, 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) sm[kmajor_offset(c + e, r, ROWS)] = e8[e];
  });
}

// Rows [row, row + ROWS) of head `head` of operand v (n rows in the sequence), columns [c0, c0 + width) of its
// `cols`, as a K-major tile (TRANSPOSED: of the columns).
template <int ROWS, int WIDTH, bool TRANSPOSED>
__device__ __forceinline__ void load_operand(uint16_t* sm, const AttnView& v, const AttentionArgs& a, int64_t b,
                                             int64_t row0, int64_t head, int row, int n, int64_t cols, int c0 = 0) {
  const uint16_t* base = row_ptr<const uint16_t>(v, a, b, row0, head, row) + c0;
  const int valid = static_cast<int>(cols - c0);
  if constexpr (TRANSPOSED) {
    load_transposed<ROWS, WIDTH>(sm, base, v.sm, n - row, valid, a.vec16);
  } else {
    load_kmajor<ROWS, WIDTH>(sm, base, v.sm, n - row, valid, a.vec16);
  }
}

// acc (+)= X Y^T over K = DP: X (64 rows) and Y (N rows) K-major tiles (16 columns = two core matrices = 128
// elements further along K); the first step overwrites acc.
template <typename T, int N, int DP>
__device__ __forceinline__ void wgmma_tiles(float (&acc)[N / 8][4], const uint16_t* X, const uint16_t* Y) {
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    wgmma_ss<T, N>(acc, kmajor_desc(X + kk * 128, DP), kmajor_desc(Y + kk * 128, DP), kk > 0);
  }
}

// acc += P Y over K = KN: P packed (pack_a_frags, before the wgmma.fence of the products that read it: registers
// written between two wgmma of a chain make ptxas serialise them), Y a K-major tile of N rows (the transposed operand) and K = KN.
template <typename T, int N, int KN>
__device__ __forceinline__ void wgmma_acc(float (&acc)[N / 8][4], const uint32_t (&pa)[KN / 16][4], const uint16_t* Y) {
#pragma unroll
  for (int kk = 0; kk < KN / 16; ++kk) wgmma_rs<T, N>(acc, pa[kk], kmajor_desc(Y + kk * 128, KN));
}

}  // namespace cuda
}  // namespace pykernels

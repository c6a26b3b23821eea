// Shared-memory tiles of the sm_90a attention kernels (wgmma operands, csrc/cuda/wgmma.cuh): each operand tile is
// stored once, as rows in the canonical no-swizzle K-major layout (kmajor_offset), and read K-major where the
// product reduces along its rows' columns (Q, K, V, dO in S = Q K^T, dP = dO V^T) or MN-major where it reduces
// across its rows (K in dQ += dS K, Q and dO in dK += dS^T Q and dV += P^T dO): mnmajor_desc, no transposed copy.
// Writers (cp.async or ordinary stores) must fence_proxy_async_smem() before the barrier that precedes the wgmma.
#pragma once
#include <cstdint>

#include "attention_tiles.cuh"
#include "wgmma.cuh"

namespace pykernels {
namespace cuda {

// Rows [row, row + ROWS) of head `head` of operand v (n rows in the sequence), `cols` columns, into a K-major tile of
// ROWS rows and DP columns; asynchronously when aligned (copy_rows_async).
template <int ROWS, int DP>
__device__ __forceinline__ void load_kmajor_async(uint16_t* sm, const AttnView& v, const AttentionArgs& a, int64_t b,
                                                  int64_t row0, int64_t head, int row, int n, int64_t cols) {
  copy_rows_async<ROWS, DP>(sm, [](int r, int c) { return kmajor_offset(r, c, DP); }, v, a, b, row0, head, row, n,
                            cols);
}

// cp.async copies of this thread landed and, after the barrier that follows, visible to every thread's wgmma.
template <int PENDING>
__device__ __forceinline__ void copies_landed() {
  cp_async_wait<PENDING>();
  fence_proxy_async_smem();
  __syncthreads();
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

// acc += P Y[:, c0:c0 + N] over K = KN: P packed (pack_a_frags, before the wgmma.fence of the products that read
// it: registers written between two wgmma of a chain make ptxas serialise them), Y a K-major tile of KN rows and C
// columns read MN-major (its rows are the reduction).
template <typename T, int N, int KN, int C>
__device__ __forceinline__ void wgmma_acc(float (&acc)[N / 8][4], const uint32_t (&pa)[KN / 16][4], const uint16_t* Y,
                                          int c0) {
#pragma unroll
  for (int kk = 0; kk < KN / 16; ++kk) {
    wgmma_rs<T, N, 1>(acc, pa[kk], mnmajor_desc(Y + kmajor_offset(16 * kk, c0, C), C));
  }
}

// Issue, commit and wait for the products of `issue` (wgmma only), with the register fences around them: the
// accumulators' and A fragments' values are final before and read only after.
template <typename Issue, typename... Acc>
__device__ __forceinline__ void wgmma_sync(Issue issue, Acc&... acc) {
  (fence_operands(acc), ...);
  wgmma_fence();
  issue();
  wgmma_commit();
  wgmma_wait_all();
  (fence_operands(acc), ...);
}

}  // namespace cuda
}  // namespace pykernels

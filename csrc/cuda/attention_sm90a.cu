// Hopper forward of the CUDA attention (docs/attention.md): the sm_80 forward (attention.cu) with both products on
// wgmma (sm_90a only, csrc/cuda/wgmma.cuh): block = one warpgroup of 4 warps on 64 query rows, 64-key tiles, the
// online softmax in registers (softmax_tile, shared with sm_80). S = Q K^T reads Q and K from shared memory
// (canonical no-swizzle K-major tiles); O += P V takes P from registers (the S accumulators, packed to 16 bits, are
// the A fragments) and V transposed in shared memory. The masking, dropout and stores are the sm_80 kernel's. Not
// yet: TMA loads, a producer/consumer warpgroup split, pipelining of the next tile's loads with this tile's math.
//
// The build emits this file for sm_80, sm_90 and sm_90a; only the sm_90a code has a body (the others trap), and
// attention_sm90a_ready() tells whether the loaded binary of the current device is the sm_90a one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "attention_tiles.cuh"
#include "wgmma.cuh"

namespace pykernels {
namespace cuda {
namespace {

constexpr int BM = 64, BN = 64;

// ROWS rows of an operand into a K-major tile of DP columns (a chunk is one 16-byte row of a core matrix).
template <int ROWS, int DP>
__device__ __forceinline__ void load_kmajor(uint16_t* sm, const uint16_t* base, int64_t rs, int nrows, int cols,
                                            bool vec16) {
  load_chunks<ROWS, DP>(base, rs, nrows, cols, vec16, [&](int r, int c, const uint4& v) {
    *reinterpret_cast<uint4*>(sm + kmajor_offset(r, c, DP)) = v;
  });
}

// V's BN rows (keys) x DP columns, transposed into a K-major tile of DP rows (the head dim: N of O += P V) x BN.
template <int DP>
__device__ __forceinline__ void load_v_transposed(uint16_t* sm, const uint16_t* base, int64_t rs, int nrows,
                                                  int cols, bool vec16) {
  load_chunks<BN, DP>(base, rs, nrows, cols, vec16, [&](int j, int c, const uint4& v) {
    uint16_t e8[8];
    memcpy(e8, &v, 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) sm[kmajor_offset(c + e, j, BN)] = e8[e];
  });
}

template <typename T, int DP>
__device__ __forceinline__ void wgmma_pv(float (&o)[DP / 8][4], const uint32_t (&pa)[4], uint64_t db) {
  if constexpr (DP == 64) {
    wgmma_rs_n64<T>(o, pa, db);
  } else if constexpr (DP == 128) {
    wgmma_rs_n128<T>(o, pa, db);
  } else {
    wgmma_rs_n256<T>(o, pa, db);
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_sm90a_kernel(AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* Qs = smem;          // [BM x DP] K-major
  uint16_t* Ks = Qs + BM * DP;  // [BN x DP] K-major
  uint16_t* Vt = Ks + BN * DP;  // [DP x BN] K-major (V transposed)
  const auto [warp, g, t] = lane_of();
  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;
  load_kmajor<BM, DP>(Qs, row_ptr<const uint16_t>(a.q, a, b, s.q0, h, m0), a.q.sm, s.L - m0,
                      static_cast<int>(a.E), a.vec16);

  float o[DP / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  for (int n0 = lo; n0 < hi; n0 += BN) {
    __syncthreads();  // the previous tiles are consumed (and Q is loaded, on the first pass)
    load_kmajor<BN, DP>(Ks, row_ptr<const uint16_t>(a.k, a, b, s.k0, hk, n0), a.k.sm, s.S - n0,
                        static_cast<int>(a.E), a.vec16);
    load_v_transposed<DP>(Vt, row_ptr<const uint16_t>(a.v, a, b, s.k0, hk, n0), a.v.sm, s.S - n0,
                          static_cast<int>(a.Ev), a.vec16);
    fence_proxy_async_smem();  // the tiles were written by ordinary stores; wgmma reads them through the async proxy
    __syncthreads();
    float sc[BN / 8][4] = {};
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {  // 16 columns = two core matrices = 128 elements further along K
      wgmma_ss_n64<T>(sc, kmajor_desc(Qs + kk * 128, DP), kmajor_desc(Ks + kk * 128, DP), kk > 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(sc);
    softmax_tile<BN, DP>(a, s, b, h, drop, i0, n0, t, sc, m, l, o);
    fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      frag_a_from_acc<T>(pa, sc[2 * kk], sc[2 * kk + 1]);
      wgmma_pv<T, DP>(o, pa, kmajor_desc(Vt + kk * 128, BN));
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(o);
  }
  finish_forward<T, DP>(a, s, b, h, m0, i0, warp, g, t, m, l, o);
#else
  __trap();  // not the sm_90a binary: attention_sm90a_ready() keeps launches away from it
#endif
}

// Static shared memory only in the sm_90a binary: cudaFuncGetAttributes tells which binary the device loaded,
// without a launch or a synchronisation (safe during CUDA graph capture).
__global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[64];
  marker[threadIdx.x % 64] = 1;
  __syncthreads();
  if (out) *out = marker[0];
#else
  if (out) *out = 0;
#endif
}

template <typename T, int DP>
cudaError_t fwd90(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int smem = (BM * DP + BN * DP + DP * BN) * 2;  // Q, K and V^T tiles
  return launch(attn_fwd_sm90a_kernel<T, DP>, smem, a.B * a.H, a.L, BM, a, stream);
}

}  // namespace

bool attention_sm90a_ready() {
  // PYKERNELS_ATTN_NO_SM90A=1 (read at each call) keeps Hopper on the mma.sync kernels: a check of one path
  // against the other, and a way out should the Hopper kernels misbehave on some device or driver.
  if (const char* off = std::getenv("PYKERNELS_ATTN_NO_SM90A"); off && *off && *off != '0') return false;
  // per device (a process may mix GPU generations): 0 unknown, 1 no, 2 yes; the loaded binary does not change
  static int known[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (known[dev] == 0) {
    cudaFuncAttributes attr;
    const bool ok = cudaFuncGetAttributes(&attr, sm90a_probe_kernel) == cudaSuccess;
    if (!ok) cudaGetLastError();  // clear it: no binary of this file for the device
    known[dev] = ok && attr.sharedSizeBytes >= 64 * sizeof(int) ? 2 : 1;
  }
  return known[dev] == 2;
}

cudaError_t attention_fwd_sm90a(const AttentionArgs& a, cudaStream_t stream) {
  const int64_t d = a.E > a.Ev ? a.E : a.Ev;
  if (d > kAttentionMaxHeadDim || d < 1) return cudaErrorInvalidValue;
  const bool f16 = a.dtype == DType::F16;
  if (a.dtype != DType::F16 && a.dtype != DType::BF16) return cudaErrorInvalidValue;
  if (d <= 64) return f16 ? fwd90<__half, 64>(a, stream) : fwd90<__nv_bfloat16, 64>(a, stream);
  if (d <= 128) return f16 ? fwd90<__half, 128>(a, stream) : fwd90<__nv_bfloat16, 128>(a, stream);
  return f16 ? fwd90<__half, 256>(a, stream) : fwd90<__nv_bfloat16, 256>(a, stream);
}

}  // namespace cuda
}  // namespace pykernels

// Hopper backward of the CUDA attention (docs/attention.md): the sm_80 backward's split (attention.cu: dK/dV per
// key block over its GQA group's query tiles, then dQ per query block; every gradient element written once, no
// atomics) with every product on wgmma (sm_90a only, csrc/cuda/wgmma.cuh). A block is one warpgroup of 4 warps
// whose m64nN accumulators have the m16n8 layout of the sm_80 kernels, so the scores' masking, dropout and dS
// code is theirs (bwd_scores in attention_tiles.cuh).
//   dK/dV, 64 keys: S^T = K Q^T and dP^T = V dO^T from K-major shared tiles (N = the query tile), then
//     dV += dropped(P)^T dO and dK += dS^T Q with P^T / dS^T from registers and dO, Q read MN-major in place
//     (the same K-major tiles, transpose-B immediate: no transposed copies).
//   dQ, 64 queries: S = Q K^T and dP = dO V^T from K-major tiles, dQ += dS K with K read MN-major in place.
// At head dim 256 each block owns a 128-column half of the gradients (blockIdx.z), as on sm_80. Tiles come by
// cp.async, overlapped with the math in FlashAttention-2's order (one buffer each). Not yet: TMA loads, a second
// buffer, producer/consumer warpgroups.
//
// The build emits this file for sm_80, sm_90 and sm_90a; only the sm_90a code has a body (the others trap), and
// attention_bwd runs these kernels only when attention_sm90a_ready() says the device loaded the sm_90a binary.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention.h"
#include "attention_sm90a_tiles.cuh"

namespace pykernels {
namespace cuda {
namespace {

template <int DP>
struct DkdvCfg90 {  // 32-query tiles above head dim 64: P^T, dP^T and dcap take 48 registers next to dK, dV's 128
  static constexpr int BN = 64, BM = DP <= 64 ? 64 : 32, DC = kGradCols<DP>;
  static constexpr int kSmem = (2 * BN * DP + 2 * BM * DP) * 2 + 2 * BM * 4;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_sm90a_kernel(AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = DkdvCfg90<DP>;
  constexpr int BN = C::BN, BM = C::BM, DC = C::DC;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* Ks = smem;          // [BN x DP] K-major
  uint16_t* Vs = Ks + BN * DP;  // [BN x DP]
  uint16_t* Qs = Vs + BN * DP;  // [BM x DP]: K-major in S^T, MN-major in dK
  uint16_t* Os = Qs + BM * DP;  // dO [BM x DP]: K-major in dP^T, MN-major in dV
  float* off_s = reinterpret_cast<float*>(Os + BM * DP);
  float* dl_s = off_s + BM;
  const auto [warp, g, t] = lane_of();
  const int64_t b = blockIdx.x / a.Hk, hk = blockIdx.x % a.Hk, group = a.H / a.Hk;
  const Seq s = seq_of(a, b);
  const int n0 = blockIdx.y * BN;
  if (n0 >= s.S) return;
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dk[DC / 8][4] = {}, dv[DC / 8][4] = {};
  int lo, hi;
  query_range<BM>(a, s, n0, BN, lo, hi);
  // The query tiles (h, m0) of the GQA group's heads, copied as in the sm_80 kernel: dO(m0) during S^T = K Q^T,
  // the next tile's Q and stats during dV += P^T dO.
  const auto load_query_tile = [&](int64_t hq, int mq) {
    load_kmajor_async<BM, DP>(Qs, a.q, a, b, s.q0, hq, mq, s.L, a.E);
    load_row_stats<BM>(a, s, lse_base(a, b, s, hq), mq, off_s, dl_s);
  };
  const int64_t h_end = lo < hi ? (hk + 1) * group : hk * group;  // no visible query: no tile
  load_kmajor_async<BN, DP>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
  load_kmajor_async<BN, DP>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
  if (hk * group < h_end) load_query_tile(hk * group, lo);
  cp_async_commit();
  const int r0 = n0 + warp * 16 + g;  // this thread's keys: r0 and r0 + 8
  for (int64_t h = hk * group; h < h_end; ++h) {
    const Dropout drop = dropout_of(a, b, s, h);
    for (int m0 = lo; m0 < hi; m0 += BM) {
      copies_landed<0>();  // Q(h, m0), its stats (K, V on the first pass); every warp is done with dO
      load_kmajor_async<BM, DP>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
      cp_async_commit();
      float pt[BM / 8][4] = {}, dpt[BM / 8][4] = {};
      wgmma_sync([&] { wgmma_tiles<T, BM, DP>(pt, Ks, Qs); }, pt);  // S^T = K Q^T
      copies_landed<0>();                                            // dO
      wgmma_sync([&] { wgmma_tiles<T, BM, DP>(dpt, Vs, Os); }, dpt);  // dP^T = V dO^T
      bwd_scores<true>(a, s, b, h, drop, r0, m0, t, [&](int i, int) { return off_s[i - m0]; },
                       [&](int i, int) { return dl_s[i - m0]; }, nullptr, pt, dpt);  // dropped P^T, dS^T
      uint32_t pa[BM / 16][4], da[BM / 16][4];
      pack_a_frags<T, BM>(pa, pt);
      pack_a_frags<T, BM>(da, dpt);
      wgmma_sync([&] { wgmma_acc<T, DC, BM, DP>(dk, da, Qs, c0); }, dk);  // dK += dS^T Q
      const bool last = m0 + BM >= hi;  // the next query tile: (h, m0 + BM) or the next head's first
      __syncthreads();                  // every warp is done with Q and the stats
      if (!last || h + 1 < h_end) load_query_tile(last ? h + 1 : h, last ? lo : m0 + BM);
      cp_async_commit();
      wgmma_sync([&] { wgmma_acc<T, DC, BM, DP>(dv, pa, Os, c0); }, dv);  // dV += dropped(P)^T dO
    }
  }
  cp_async_wait<0>();
  store_acc<T, DC / 8>(row_ptr<T>(a.dk, a, b, s.k0, hk, n0) + c0, a.dk.sm, warp * 16, s.S - n0, a.E - c0, dk,
                       a.scale, a.scale, g, t);
  store_acc<T, DC / 8>(row_ptr<T>(a.dv, a, b, s.k0, hk, n0) + c0, a.dv.sm, warp * 16, s.S - n0, a.Ev - c0, dv, 1.f,
                       1.f, g, t);
#else
  __trap();  // not the sm_90a binary: attention_sm90a_ready() keeps launches away from it
#endif
}

template <int DP>
struct DqCfg90 {
  static constexpr int BM = 64, BN = 64, DC = kGradCols<DP>;
  static constexpr int kSmem = (2 * BM * DP + 2 * BN * DP) * 2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_sm90a_kernel(AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = DqCfg90<DP>;
  constexpr int BM = C::BM, BN = C::BN, DC = C::DC;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* Qs = smem;          // [BM x DP] K-major
  uint16_t* Os = Qs + BM * DP;  // dO [BM x DP]
  uint16_t* Ks = Os + BM * DP;  // [BN x DP]: K-major in S, MN-major in dQ
  uint16_t* Vs = Ks + BN * DP;  // [BN x DP]
  const auto [warp, g, t] = lane_of();
  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  float off[2], dl[2];
  row_stats(a, s, lse_base(a, b, s, h), i0, off, dl);
  float* dmask = dmask_of(a, b, h);
  const int c0 = blockIdx.z * DC;  // this block's gradient columns: [c0, c0 + DC)
  float dq[DC / 8][4] = {};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  load_kmajor_async<BM, DP>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  load_kmajor_async<BM, DP>(Os, a.dout, a, b, s.q0, h, m0, s.L, a.Ev);
  cp_async_commit();
  for (int n0 = lo; n0 < hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K and V
    load_kmajor_async<BN, DP>(Ks, a.k, a, b, s.k0, hk, n0, s.S, a.E);
    cp_async_commit();
    load_kmajor_async<BN, DP>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);  // copied while S and P are computed
    cp_async_commit();
    copies_landed<1>();  // K (and Q, dO on the first pass)
    float p[BN / 8][4] = {}, dp[BN / 8][4] = {};
    wgmma_sync([&] { wgmma_tiles<T, BN, DP>(p, Qs, Ks); }, p);    // S = Q K^T
    copies_landed<0>();                                           // V
    wgmma_sync([&] { wgmma_tiles<T, BN, DP>(dp, Os, Vs); }, dp);  // dP = dO V^T
    bwd_scores<false>(a, s, b, h, drop, i0, n0, t, [&](int, int e) { return off[e >> 1]; },
                      [&](int, int e) { return dl[e >> 1]; }, dmask, p, dp);  // dS
    uint32_t da[BN / 16][4];
    pack_a_frags<T, BN>(da, dp);
    wgmma_sync([&] { wgmma_acc<T, DC, BN, DP>(dq, da, Ks, c0); }, dq);  // dQ += dS K
  }
  cp_async_wait<0>();
  store_acc<T, DC / 8>(row_ptr<T>(a.dq, a, b, s.q0, h, m0) + c0, a.dq.sm, warp * 16, s.L - m0, a.E - c0, dq,
                       a.scale, a.scale, g, t);
#else
  __trap();  // not the sm_90a binary
#endif
}

template <typename T, int DP>
cudaError_t bwd90(const AttentionArgs& a, cudaStream_t stream) {
  using K = DkdvCfg90<DP>;
  using Q = DqCfg90<DP>;
  cudaError_t err =
      launch(attn_bwd_dkdv_sm90a_kernel<T, DP>, K::kSmem, a.B * a.Hk, a.S, K::BN, a, stream, DP / K::DC);
  if (err != cudaSuccess) return err;
  return launch(attn_bwd_dq_sm90a_kernel<T, DP>, Q::kSmem, a.B * a.H, a.L, Q::BM, a, stream, DP / Q::DC);
}

}  // namespace

cudaError_t attention_bwd_sm90a(const AttentionArgs& a, cudaStream_t stream) {
  return dispatch_head_dim(a, [&](auto ty, auto dp) {
    return bwd90<typename decltype(ty)::type, decltype(dp)::value>(a, stream);
  });
}

}  // namespace cuda
}  // namespace pykernels

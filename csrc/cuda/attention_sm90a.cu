// Hopper forward of the CUDA attention (docs/attention.md), sm_90a only. Two kernels share the masking / online
// softmax / dropout / epilogue code of the sm_80 forward (softmax_tile, finish_forward, key_range, query_tile in
// attention_tiles.cuh) and the m16n8 accumulator layout per warp:
//
// attn_fwd_sm90a_tma_kernel (FlashAttention-3's structure): a producer warpgroup whose one elected thread issues TMA
// loads (cp.async.bulk.tensor, csrc/cuda/tma.cuh) of the Q tile once and of K and V tiles into a ring of STAGES
// shared-memory buffers, each with a "full" mbarrier (the TMA bytes landed: expect_tx / complete_tx) and an "empty"
// one (every consumer warp finished reading it); consumer warpgroups of 64 query rows each wait on "full", compute
// S = Q K^T and O += P V on wgmma from the 128-byte-swizzled tiles TMA wrote (csrc/cuda/wgmma_sw128.cuh: K-major
// descriptors for Q and K, V read MN-major through the instruction's transpose bit, no transpose pass), and arrive
// on "empty". So the loads of the next STAGES - 1 tiles run under this tile's math. With two consumer warpgroups
// (head dims <= 128) setmaxnreg moves registers from the producer (24) to the consumers (240), and named barriers
// order their S = Q K^T products "pingpong": one warpgroup's product is issued while the other does its softmax.
// Head dim 256 keeps one consumer warpgroup (its O accumulators alone are 128 registers a thread).
//
// attn_fwd_sm90a_kernel (the fallback): one warpgroup per 64 query rows, tiles copied (cp.async when aligned) into
// canonical no-swizzle K-major layouts, V read MN-major in place, copies overlapped as in the sm_80 forward. The host runs it when the TMA kernel cannot
// (attention_fwd_sm90a below): a row or base not 16-byte aligned or a head dim not a multiple of 8 (args.vec16
// false), or a tensor map the driver does not encode (e.g. a zero stride of a broadcast operand).
//
// The build emits this file for sm_80, sm_90 and sm_90a; only the sm_90a code has a body (the others trap), and
// attention_sm90a_ready() tells whether the loaded binary of the current device is the sm_90a one.
#include <cuda.h>  // CUtensorMap and its enums only: the driver is reached through the runtime
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "attention_sm90a_tiles.cuh"
#include "tma.cuh"
#include "wgmma_sw128.cuh"

namespace pykernels {
namespace cuda {
namespace {

constexpr int BM = 64, BN = 64;

// The fallback: one warpgroup on 64 query rows, the sm_80 forward's loop with both products on wgmma; tiles stored
// as K-major rows (cp.async when aligned, else element loads), V read MN-major in place; V's copy overlaps S and
// the softmax, the next K's P V (attention_sm90a_tiles.cuh).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_sm90a_kernel(AttentionArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* Qs = smem;          // [BM x DP] K-major
  uint16_t* Ks = Qs + BM * DP;  // [BN x DP] K-major
  uint16_t* Vs = Ks + BN * DP;  // [BN x DP]: read MN-major in O += P V
  const auto [warp, g, t] = lane_of();
  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;
  float o[DP / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);
  const int i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  load_kmajor_async<BM, DP>(Qs, a.q, a, b, s.q0, h, m0, s.L, a.E);
  if (lo < hi) load_kmajor_async<BN, DP>(Ks, a.k, a, b, s.k0, hk, lo, s.S, a.E);
  cp_async_commit();
  for (int n0 = lo; n0 < hi; n0 += BN) {
    copies_landed<0>();  // K(n0) (and Q); every warp is done with V(n0 - BN)
    load_kmajor_async<BN, DP>(Vs, a.v, a, b, s.k0, hk, n0, s.S, a.Ev);
    cp_async_commit();
    float sc[BN / 8][4] = {};
    wgmma_sync([&] { wgmma_tiles<T, BN, DP>(sc, Qs, Ks); }, sc);  // S = Q K^T
    softmax_tile<BN, DP>(a, s, b, h, drop, i0, n0, t, sc, m, l, o);
    uint32_t pa[BN / 16][4];
    pack_a_frags<T, BN>(pa, sc);
    copies_landed<0>();  // V(n0); every warp is done with K(n0)
    if (n0 + BN < hi) load_kmajor_async<BN, DP>(Ks, a.k, a, b, s.k0, hk, n0 + BN, s.S, a.E);
    cp_async_commit();
    wgmma_sync([&] { wgmma_acc<T, DP, BN, DP>(o, pa, Vs, 0); }, o);  // O += P V
  }
  cp_async_wait<0>();  // nothing in flight at exit (Q's copy, when no key is visible)
  finish_forward<T, DP>(a, s, b, h, m0, i0, warp, g, t, m, l, o);
#else
  __trap();  // not the sm_90a binary: attention_sm90a_ready() keeps launches away from it
#endif
}

// ---------------------------------------------------------------------------------------------------------
// The TMA / warp-specialised forward.

// Tiles of head dim DP: NC consumer warpgroups of 64 query rows (BM rows a block), BN keys a stage (loaded together),
// consumed SUB keys at a time, STAGES stages.
// Shared memory (1024-byte aligned; every tile starts on a 1024-byte boundary, the 128-byte swizzle's period):
// Q [DP/64 boxes][BM rows][64 columns], K and V [STAGES][DP/64 boxes][BN rows][64 columns], then the mbarriers.
// Registers: the S accumulators are SUB / 2 floats a thread, O's DP / 2; SUB = 128 spilled at head dim 128 (a
// consumer has 240 registers), and at 256 one warpgroup has 255 at most.
template <int DP>
struct TmaTiles {
  static constexpr int NC = DP == 256 ? 1 : 2;
  static constexpr int BM = 64 * NC;
  static constexpr int BN = DP == 256 ? 64 : 128;
  static constexpr int SUB = DP == 64 ? BN : 64;  // keys of one S = Q K^T / softmax / P V step (registers)
  static constexpr int STAGES = 2;
  static constexpr int THREADS = 128 * (NC + 1);  // warpgroup 0: producer; 1..NC: consumers
  static constexpr int BOXES = DP / 64;           // 64-column (128-byte) boxes a row
  static constexpr int Q_BYTES = BM * DP * 2;
  static constexpr int KV_BYTES = BN * DP * 2;  // one stage of K (or of V)
  static constexpr int BAR_BYTES = 8 * (2 * STAGES + 1);
  static constexpr int SMEM = 1024 + Q_BYTES + 2 * STAGES * KV_BYTES + BAR_BYTES;  // + alignment slack
  static constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;  // NC == 2: 128 * 24 + 256 * 240 <= 65536
  static_assert(SMEM <= 227 * 1024, "shared memory of one block on sm_90");
  static_assert(BOXES * 64 == DP && BN % SUB == 0 && SUB % 16 == 0, "tile shapes");
  static_assert(NC == 1 || 128 * PRODUCER_REGS + 128 * NC * CONSUMER_REGS <= 65536, "setmaxnreg: the register file");
};

template <typename T, int DP>
__global__ void __launch_bounds__(TmaTiles<DP>::THREADS, 1)
    attn_fwd_sm90a_tma_kernel(const AttentionArgs a, const __grid_constant__ CUtensorMap tq,
                              const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = TmaTiles<DP>;
  constexpr int BM = C::BM, BN = C::BN, SUB = C::SUB, NC = C::NC, STAGES = C::STAGES;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t q_s = (smem_addr(smem_raw) + 1023u) & ~1023u;  // shared-window addresses
  const uint32_t k_s = q_s + C::Q_BYTES;
  const uint32_t v_s = k_s + STAGES * C::KV_BYTES;
  const uint32_t bar = v_s + STAGES * C::KV_BYTES;  // full[STAGES], empty[STAGES], q_full
  const auto full = [&](int st) { return bar + 8u * st; };
  const auto empty = [&](int st) { return bar + 8u * (STAGES + st); };
  const uint32_t q_full = bar + 8u * 2 * STAGES;

  const auto [b, h, hk, s, drop, m0] = query_tile(a, BM);
  if (m0 >= s.L) return;  // the whole block, before any barrier
  int lo, hi;
  key_range<BN>(a, s, m0, BM, lo, hi);  // one key range for the block: every consumer runs the same tiles
  // Boxes of 64 columns that hold any column of q / k (E) and of v (Ev); the others are never loaded nor read.
  const int qk_boxes = static_cast<int>((a.E + 63) / 64), v_boxes = static_cast<int>((a.Ev + 63) / 64);
  // warpgroup index, through a shuffle so that ptxas knows it is warp-uniform (descriptors in uniform registers)
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);

  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full(st), 1);            // the producer's arrive.expect_tx (+ the TMA bytes)
      mbar_init(empty(st), 4 * NC);      // lane 0 of every consumer warp
    }
    mbar_init(q_full, 1);
    mbar_fence_init();
  }
  // The boxes no TMA load writes (columns at or past E, Ev when the head dims are below DP): zeros, once (no load
  // ever overwrites them), so S = Q K^T runs every k16 step unconditionally (a runtime-skipped step would make
  // ptxas serialise the wgmma chain) and the unused O columns stay finite. Boxes are contiguous, so each tile's
  // unloaded part is one range. Ordinary stores: fenced for the async proxy (wgmma) before the barrier.
  const auto zero_from = [&](uint32_t tile, int rows, int first_box) {
    for (uint32_t p = tile + first_box * rows * 128 + threadIdx.x * 16; p < tile + C::BOXES * rows * 128;
         p += C::THREADS * 16) {
      st_shared_zero16(p);
    }
  };
  if (qk_boxes < C::BOXES || v_boxes < C::BOXES) {
    zero_from(q_s, BM, qk_boxes);
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      zero_from(k_s + st * C::KV_BYTES, BN, qk_boxes);
      zero_from(v_s + st * C::KV_BYTES, BN, v_boxes);
    }
    fence_proxy_async_smem();
  }
  __syncthreads();

  if (wg == 0) {
    // Producer. Its warps keep 24 registers; one thread issues every copy (a TMA load is one instruction for a
    // whole box), the others are done.
    if constexpr (NC > 1) setmaxnreg_dec<C::PRODUCER_REGS>();
    if (threadIdx.x != 0) return;
    tma_prefetch_map(&tq);
    tma_prefetch_map(&tk);
    tma_prefetch_map(&tv);
    // Map coordinates (column, row, head, batch); varlen maps have rows = all sequences' rows and batch 1.
    const int qb = a.cu_q ? 0 : static_cast<int>(b), kb = qb;
    const int q_row = static_cast<int>(s.q0) + m0, k_row0 = static_cast<int>(s.k0);
    mbar_arrive_expect_tx(q_full, static_cast<uint32_t>(qk_boxes * BM * 128));
    for (int c = 0; c < qk_boxes; ++c) {
      tma_load_4d(q_s + c * BM * 128, &tq, q_full, 64 * c, q_row, static_cast<int>(h), qb);
    }
    int it = 0;
    for (int n0 = lo; n0 < hi; n0 += BN, ++it) {
      const int st = it % STAGES;
      mbar_wait(empty(st), ((it / STAGES) & 1) ^ 1);  // the consumers released the stage's previous tiles
      mbar_arrive_expect_tx(full(st), static_cast<uint32_t>((qk_boxes + v_boxes) * BN * 128));
      const uint32_t ks = k_s + st * C::KV_BYTES, vs = v_s + st * C::KV_BYTES;
      const int kh = static_cast<int>(hk);
      for (int c = 0; c < qk_boxes; ++c) tma_load_4d(ks + c * BN * 128, &tk, full(st), 64 * c, k_row0 + n0, kh, kb);
      for (int c = 0; c < v_boxes; ++c) tma_load_4d(vs + c * BN * 128, &tv, full(st), 64 * c, k_row0 + n0, kh, kb);
    }
    return;
  }

  // Consumer warpgroup w: query rows [mw, mw + 64), warp `warp` of it rows mw + 16 warp + g (+ 8).
  if constexpr (NC > 1) setmaxnreg_inc<C::CONSUMER_REGS>();
  const int w = NC > 1 ? wg - 1 : 0;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int mw = m0 + 64 * w;
  const int i0 = mw + warp * 16 + g;
  float o[DP / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  mbar_wait(q_full, 0);
  // Pingpong (NC == 2): named barrier 1 + w is "warpgroup w may issue its S = Q K^T", 256 threads: its own 128 wait
  // (bar.sync) for the other warpgroup's 128 arrivals (bar.arrive), which come right after that one issued its own
  // product. Warpgroup 1 lets warpgroup 0 go first; the arrivals are matched one for one with the waits (both run
  // the same SUB-key steps; warpgroup 1 skips its arrival after the last one), so no barrier is left half-arrived.
  if constexpr (NC > 1) {
    if (w == 1 && lo < hi) named_bar_arrive<1>(256);
  }
  int it = 0;
  for (int n0 = lo; n0 < hi; n0 += BN, ++it) {
    const int st = it % STAGES;
    mbar_wait(full(st), (it / STAGES) & 1);  // this stage's K and V have landed
    const uint32_t ks = k_s + st * C::KV_BYTES, vs = v_s + st * C::KV_BYTES;
#pragma unroll
    for (int sub = 0; sub < BN / SUB; ++sub) {
      const int j0 = n0 + sub * SUB;  // keys [j0, j0 + SUB): rows sub * SUB.. of the stage's boxes (atom-aligned)
      if (BN != SUB && j0 >= hi) break;  // the same for every consumer warpgroup: the pingpong stays matched
      float sc[SUB / 8][4] = {};
      if constexpr (NC > 1) {  // barrier ids as immediates: ptxas then reserves 3 hardware barriers, not all 16
        if (w == 0) {
          named_bar_sync<1>(256);
        } else {
          named_bar_sync<2>(256);
        }
      }
      // S = Q K^T: this warpgroup's 64 rows of Q, the sub-tile's SUB rows of K; k16 step kk is box kk / 4, bytes
      // 32 (kk % 4) of every 128-byte row (wgmma_sw128.cuh).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        const uint64_t da = sw128_kmajor_tile_desc(q_s, BM, 64 * w, kk);
        const uint64_t db = sw128_kmajor_tile_desc(ks, BN, sub * SUB, kk);
        wgmma_ss<T, SUB>(sc, da, db, kk > 0);
      }
      wgmma_commit();
      if constexpr (NC > 1) {
        if (w == 0) {
          named_bar_arrive<2>(256);  // the other warpgroup's turn
        } else if (j0 + SUB < hi) {  // not after warpgroup 1's last step: warpgroup 0 waits for no more
          named_bar_arrive<1>(256);
        }
      }
      wgmma_wait_all();
      fence_operands(sc);
      softmax_tile<SUB, DP>(a, s, b, h, drop, i0, j0, t, sc, m, l, o);
      fence_operands(o);
      // O += P V: V MN-major, keys 16 kk.. of the sub-tile (two 8-key atoms), head-dim boxes BN * 128 bytes apart
      // P packed to 16 bits for every k16 step before the fence: registers written after wgmma.fence would make
      // ptxas fence (and serialise) each product of the chain.
      uint32_t pa[SUB / 16][4];
#pragma unroll
      for (int kk = 0; kk < SUB / 16; ++kk) frag_a_from_acc<T>(pa[kk], sc[2 * kk], sc[2 * kk + 1]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < SUB / 16; ++kk) {
        wgmma_rs<T, DP, 1>(o, pa[kk], sw128_mnmajor_tile_desc(vs, BN, sub * SUB, kk));
      }
      wgmma_commit();
      wgmma_wait_all();
      fence_operands(o);
    }
    if (lane == 0) mbar_arrive(empty(st));  // this warp no longer reads the stage
  }
  finish_forward<T, DP>(a, s, b, h, mw, i0, warp, g, t, m, l, o);
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
  constexpr int smem = (BM * DP + 2 * BN * DP) * 2;  // Q, K and V tiles
  return launch(attn_fwd_sm90a_kernel<T, DP>, smem, a.B * a.H, a.L, BM, a, stream);
}

// cuTensorMapEncodeTiled, from the driver through the runtime (the extension does not link libcuda); null when the
// driver does not have it. Looked up once.
using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiled encode_tiled() {
  static const EncodeTiled fn = []() -> EncodeTiled {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || p == nullptr) {
      cudaGetLastError();  // clear it: the caller falls back
      return nullptr;
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// The tensor map of operand v: dims (columns, rows, heads, batch), innermost first, with v's strides in bytes;
// varlen operands have rows = every sequence's rows and a batch of 1 (its stride is never used). Boxes of 64
// columns (128 bytes: the 128-byte swizzle's limit) x box_rows rows; elements out of bounds (columns >= cols, rows
// >= rows) land as zeros. False when the driver refuses it (alignment, zero strides, sizes): then the caller falls
// back to the kernel without TMA.
bool tensor_map(CUtensorMap* map, const AttnView& v, const AttentionArgs& a, int64_t cols, int64_t rows,
                int64_t heads, int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr || v.p == nullptr || cols < 1 || rows < 1 || heads < 1) return false;
  const bool varlen = a.cu_q != nullptr;
  const cuuint64_t dim[4] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                             static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(varlen ? 1 : a.B)};
  const cuuint64_t stride[3] = {static_cast<cuuint64_t>(v.sm) * 2, static_cast<cuuint64_t>(v.sh) * 2,
                                static_cast<cuuint64_t>(varlen ? v.sm * rows : v.sb) * 2};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_stride[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt =
      a.dtype == DType::BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, dt, 4, v.p, dim, stride, box, elem_stride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The TMA kernel when its preconditions hold (16-byte aligned rows and bases, E and Ev multiples of 8: a.vec16;
// the three maps encoded; the row counts known), else the fallback kernel. Never a wrong answer: a refusal only
// changes the kernel.
template <typename T, int DP>
cudaError_t fwd90_tma(const AttentionArgs& a, cudaStream_t stream) {
  using C = TmaTiles<DP>;
  const int64_t tiles = (a.L + C::BM - 1) / C::BM;
  if (tiles == 0 || a.B * a.H == 0) return cudaSuccess;
  if (tiles > 65535 || a.B * a.H > 0x7fffffff) return cudaErrorInvalidConfiguration;
  CUtensorMap tq, tk, tv;
  const bool ok = a.vec16 && a.rows_q > 0 && a.rows_k > 0 && a.rows_q < (int64_t(1) << 31) &&
                  a.rows_k < (int64_t(1) << 31) && tensor_map(&tq, a.q, a, a.E, a.rows_q, a.H, C::BM) &&
                  tensor_map(&tk, a.k, a, a.E, a.rows_k, a.Hk, C::BN) &&
                  tensor_map(&tv, a.v, a, a.Ev, a.rows_k, a.Hk, C::BN);
  if (!ok) return fwd90<T, DP>(a, stream);
  const auto kernel = attn_fwd_sm90a_tma_kernel<T, DP>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM) != cudaSuccess) {
    cudaGetLastError();
    return fwd90<T, DP>(a, stream);
  }
  const dim3 grid(static_cast<unsigned>(a.B * a.H), static_cast<unsigned>(tiles));
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(a, tq, tk, tv);
  return cudaGetLastError();
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
  return dispatch_head_dim(a, [&](auto ty, auto dp) {
    return fwd90_tma<typename decltype(ty)::type, decltype(dp)::value>(a, stream);
  });
}

}  // namespace cuda
}  // namespace pykernels

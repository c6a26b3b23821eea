// Tile loads, sequence ranges, masking, dropout and stores of the CUDA attention kernels, shared by the sm_80
// kernels (attention.cu, mma.sync) and the sm_90a kernels (attention*_sm90a.cu, wgmma): a warpgroup of 4 warps, each
// owning 16 query (or key) rows, whose accumulators follow the m16n8 fragment layout (mma.cuh) in both.
// No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../attention_args.h"
#include "attention.h"  // kAttentionMaxHeadDim
#include "convert.cuh"
#include "mma.cuh"
#include "philox.h"
#include "specialize.cuh"

namespace pykernels {
namespace cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// The exp2-domain score a mask too large for that domain is held at: the lowest whose lse survives the round trip
// through the natural log (fl(fl(y ln 2) log2 e) == y; -FLT_MAX does not), so its rows' gradients are exact
// (lse_lo2). Rows mixing two such mask values weigh them equally (torch: only the larger one counts).
constexpr float kMaskHold2 = -0x1.fffffcp+127f;

// ---------------------------------------------------------------------------------------------------------
// Tiles global -> shared.

// The 8-column chunks of ROWS rows x DP columns of an operand (rows >= nrows, columns >= cols read as zeros), each
// handed to put(r, c, chunk) as 16 bytes: one 16-byte load when every row is aligned (vec16), else element loads.
// The shared-memory layout is put's (copy_rows_async: padded sm_80 rows or K-major sm_90a tiles).
template <int ROWS, int DP, typename Put>
__device__ __forceinline__ void load_chunks(const uint16_t* base, int64_t rs, int nrows, int cols, bool vec16,
                                            Put put) {
  constexpr int CH = DP / 8;
  for (int i = threadIdx.x; i < ROWS * CH; i += kThreads) {
    const int r = i / CH, c = (i % CH) * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (vec16) {
      if (r < nrows && c < cols) v = *reinterpret_cast<const uint4*>(base + r * rs + c);
    } else {
      uint16_t e8[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) e8[e] = (r < nrows && c + e < cols) ? base[r * rs + c + e] : uint16_t(0);
      memcpy(&v, e8, 16);
    }
    put(r, c, v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sequences, masks and ranges.

struct Seq {
  int64_t q0, k0;  // first row of the sequence in q / k (varlen), 0 for dense calls
  int L, S;        // its lengths
  int64_t d;       // causal / window diagonal
};

__device__ __forceinline__ Seq seq_of(const AttentionArgs& a, int64_t b) {
  Seq s;
  if (a.cu_q) {
    s.q0 = a.cu_q[b];
    s.k0 = a.cu_k[b];
    s.L = a.cu_q[b + 1] - a.cu_q[b];
    s.S = a.cu_k[b + 1] - a.cu_k[b];
  } else {
    s.q0 = s.k0 = 0;
    s.L = static_cast<int>(a.L);
    s.S = static_cast<int>(a.S);
  }
  s.d = a.diag + (a.bottom_right ? s.S - s.L : 0);
  return s;
}

__device__ __forceinline__ int64_t row_base(const AttnView& v, const AttentionArgs& a, int64_t b, int64_t row0,
                                            int64_t head) {
  return (a.cu_q ? row0 * v.sm : b * v.sb) + head * v.sh;
}

// First lse/delta entry of (sequence b, head h): dense (B, H, L), varlen (H, T).
__device__ __forceinline__ int64_t lse_base(const AttentionArgs& a, int64_t b, const Seq& s, int64_t h) {
  return a.cu_q ? h * a.lse_sh + s.q0 : b * a.lse_sb + h * a.lse_sh;
}

// Row `row` of head `head` of operand v in sequence (or batch entry) b, whose rows start at row0.
template <typename T>
__device__ __forceinline__ T* row_ptr(const AttnView& v, const AttentionArgs& a, int64_t b, int64_t row0,
                                      int64_t head, int row) {
  return static_cast<T*>(v.p) + row_base(v, a, b, row0, head) + row * v.sm;
}

// Rows [row, row + ROWS) of an operand (n rows in the sequence), `cols` columns, as 16-byte chunks into shared
// memory at sm + dst(r, c) (chunk c / 8 of tile row r): through cp.async (no register staging; the copy runs while
// the block computes) when every row is 16-byte aligned (a.vec16), complete after cp_async_commit(), cp_async_wait
// and a barrier; otherwise by element loads (the waits are then no-ops). Chunks outside the operand are zero-filled
// (source size 0, reading nothing; the address given is the operand's first element).
template <int ROWS, int DP, typename Dst>
__device__ __forceinline__ void copy_rows_async(uint16_t* sm, Dst dst, const AttnView& v, const AttentionArgs& a,
                                                int64_t b, int64_t row0, int64_t head, int row, int n, int64_t cols) {
  if (!a.vec16) {  // a.vec16 (false) rather than the literal: the literal tipped the sm_90 dK/dV kernel into spills
    load_chunks<ROWS, DP>(row_ptr<const uint16_t>(v, a, b, row0, head, row), v.sm, n - row, static_cast<int>(cols),
                          a.vec16, [&](int r, int c, const uint4& x) { *reinterpret_cast<uint4*>(sm + dst(r, c)) = x; });
    return;
  }
  const uint16_t* base = row_ptr<const uint16_t>(v, a, b, row0, head, row);
  constexpr int CH = DP / 8;
#pragma unroll 1  // issued while the accumulators are live: no unrolled address registers
  for (int i = threadIdx.x; i < ROWS * CH; i += kThreads) {
    const int r = i / CH, c = (i % CH) * 8;
    const bool ok = r < n - row && c < cols;
    cp_async16(sm + dst(r, c), ok ? base + r * v.sm + c : static_cast<const uint16_t*>(v.p), ok);
  }
}

// ... into a row-major tile of LD elements per row (the sm_80 kernels).
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void load_rows_async(uint16_t* sm, const AttnView& v, const AttentionArgs& a, int64_t b,
                                                int64_t row0, int64_t head, int row, int n, int64_t cols) {
  copy_rows_async<ROWS, DP>(sm, [](int r, int c) { return r * LD + c; }, v, a, b, row0, head, row, n, cols);
}

__host__ __device__ __forceinline__ bool visible(const AttentionArgs& a, const Seq& s, int64_t i, int64_t j) {
  bool ok = i < s.L && j < s.S;
  if (a.causal) ok = ok && j <= i + s.d;
  if (a.win_left >= 0) ok = ok && j >= i + s.d - a.win_left;
  if (a.win_right >= 0) ok = ok && j <= i + s.d + a.win_right;
  return ok;
}

// Keys [lo, hi) that queries [m0, m0 + rows) may see; lo rounded down to a tile of BN.
template <int BN>
__device__ __forceinline__ void key_range(const AttentionArgs& a, const Seq& s, int m0, int rows, int& lo, int& hi) {
  int64_t h = s.S, l = 0;
  if (a.causal) h = h < m0 + rows + s.d ? h : m0 + rows + s.d;
  if (a.win_right >= 0) h = h < m0 + rows + s.d + a.win_right ? h : m0 + rows + s.d + a.win_right;
  if (a.win_left >= 0) l = m0 + s.d - a.win_left;
  l = l < 0 ? 0 : l;
  lo = static_cast<int>(l / BN * BN);
  hi = static_cast<int>(h < 0 ? 0 : h);
}

// Queries [lo, hi) that may see keys [n0, n0 + cols); lo rounded down to a tile of BM.
template <int BM>
__device__ __forceinline__ void query_range(const AttentionArgs& a, const Seq& s, int n0, int cols, int& lo,
                                            int& hi) {
  int64_t l = 0, h = s.L;
  if (a.causal) l = n0 - s.d > l ? n0 - s.d : l;
  if (a.win_right >= 0) l = n0 - s.d - a.win_right > l ? n0 - s.d - a.win_right : l;
  if (a.win_left >= 0) h = h < n0 + cols - s.d + a.win_left ? h : n0 + cols - s.d + a.win_left;
  lo = static_cast<int>(l / BM * BM);
  hi = static_cast<int>(h < 0 ? 0 : h);
}

// Scaled (and soft-capped) score in the exp2 domain; `dcap` gets d(capped)/d(uncapped) = 1 - tanh^2.
__device__ __forceinline__ float score(const AttentionArgs& a, float acc, float& dcap) {
  float x = acc * a.scale;
  dcap = 1.f;
  if (a.softcap > 0.f) {
    const float th = tanhf(x / a.softcap);
    x = a.softcap * th;
    dcap = 1.f - th * th;
  }
  return x * kLog2e;
}

// Element (b, h, i, j) of the mask in fp32: its value for a float mask, 1 / 0 for a bool one.
__device__ __forceinline__ float mask_at(const AttentionArgs& a, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t o = b * a.mask_sb + h * a.mask_sh + i * a.mask_sm + j * a.mask_sn;
  if (a.mask_bool) return static_cast<const bool*>(a.mask)[o] ? 1.f : 0.f;
  switch (a.mask_dtype) {
    case DType::F16: return to_f(static_cast<const __half*>(a.mask)[o]);
    case DType::BF16: return to_f(static_cast<const __nv_bfloat16*>(a.mask)[o]);
    case DType::F64: return static_cast<float>(static_cast<const double*>(a.mask)[o]);
    default: return static_cast<const float*>(a.mask)[o];
  }
}

// The exp2-domain score of query i, key j of (batch b, query head h): -inf where it is not visible (bounds,
// causal, window, a False in a bool mask); a float mask is added after the soft cap, as in the Triton kernels.
__device__ __forceinline__ float masked_score(const AttentionArgs& a, const Seq& s, int64_t b, int64_t h, int i,
                                              int j, float acc, float& dcap) {
  const float x = score(a, acc, dcap);
  if (!visible(a, s, i, j)) return -INFINITY;
  if (!a.mask) return x;
  const float mv = mask_at(a, b, h, i, j);
  if (a.mask_bool) return mv != 0.f ? x : -INFINITY;
  // A finite mask below -FLT_MAX ln 2 (fp32 / bf16 finfo.min, Hugging Face's padding) overflows to -inf in the exp2
  // domain and would turn a row it fills into one that sees no key (output 0, not torch's uniform average): it is
  // held at kMaskHold2 (-inf and NaN pass unchanged).
  const float y = mv * kLog2e;
  return x + (y == -INFINITY && mv != -INFINITY ? kMaskHold2 : y);
}

// Dropout: whether score (i, j) of (batch b, query head h) is kept; 1 / (1 - p) scales the kept ones.
struct Dropout {
  uint64_t seed;
  float p, inv_keep;
  int64_t row0;  // counter row of query 0 of this (sequence, head)
};

__device__ __forceinline__ Dropout dropout_of(const AttentionArgs& a, int64_t b, const Seq& s, int64_t h) {
  if (a.dropout_p <= 0.f) return {0, 0.f, 1.f, 0};
  const int64_t row0 = ((a.cu_q ? 0 : b) * a.H + h) * a.drop_rows + s.q0;
  return {static_cast<uint64_t>(*a.seed), a.dropout_p, 1.f / (1.f - a.dropout_p), row0};
}

// p (already a probability) after dropout: 0 if dropped, p / (1 - dropout_p) if kept.
__device__ __forceinline__ float dropped(const AttentionArgs& a, const Dropout& d, int i, int j, float p) {
  if (d.p <= 0.f) return p;
  return dropout_keep(d.seed, (d.row0 + i) * a.drop_cols + j, d.p) ? p * d.inv_keep : 0.f;
}

// ---------------------------------------------------------------------------------------------------------
// Score code specialised per tile. masked_score and dropped inlined for every element of an unrolled tile carry
// every option (soft cap with its division and tanh, a bool or float mask of four dtypes with its loads, Philox
// dropout): the SASS of the TMA forward had about 6,000 instructions (96 KB) between its S = Q K^T and its P V,
// 190 a score, the common path branching around the rest element by element. Each warp therefore picks, once per
// tile, the smallest code that is exact for it (the suspected cause of that forward's 3.5% of the matmul rate on
// the H200 is instruction fetch; unmeasured): kVisible (no option on, every score of the tile visible: the scaling
// only), kBounds (no option on, the bounds / causal / window checks per score), kGeneral (masked_score, dropped).
// The three give the same bits where they overlap.
enum class ScoreMode { kVisible, kBounds, kGeneral };

// No soft cap, no mask, no dropout: a score is its scaled product, or -inf where not visible.
__device__ __forceinline__ bool plain_scores(const AttentionArgs& a, const Dropout& d) {
  return !(a.softcap > 0.f) && a.mask == nullptr && d.p <= 0.f;
}

// Every (query i in [ilo, ihi), key j in [jlo, jhi)) visible: in bounds, and inside the causal and window limits.
__host__ __device__ __forceinline__ bool all_visible(const AttentionArgs& a, const Seq& s, int ilo, int ihi, int jlo,
                                                     int jhi) {
  if (ihi > s.L || jhi > s.S) return false;
  const int64_t dlo = ilo + s.d;  // the smallest i + d: the tightest causal / right-window limit
  if (a.causal && jhi - 1 > dlo) return false;
  if (a.win_right >= 0 && jhi - 1 > dlo + a.win_right) return false;
  if (a.win_left >= 0 && jlo < ihi - 1 + s.d - a.win_left) return false;
  return true;
}

// The mode of a warp's tile in the accumulator layout of score_at: rows rb .. rb + 16 (rb: lane 0's r0, its g = 0),
// columns c0 .. c0 + 8 NT; (query, key) or, KEY_ROWS, (key, query). The same in every lane of the warp.
template <bool KEY_ROWS, int NT>
__device__ __forceinline__ ScoreMode tile_mode(const AttentionArgs& a, const Seq& s, const Dropout& d, int r0,
                                               int c0) {
  if (!plain_scores(a, d)) return ScoreMode::kGeneral;
  const int rb = __shfl_sync(0xffffffffu, r0, 0);
  const bool all = KEY_ROWS ? all_visible(a, s, c0, c0 + 8 * NT, rb, rb + 16)
                            : all_visible(a, s, rb, rb + 16, c0, c0 + 8 * NT);
  return all ? ScoreMode::kVisible : ScoreMode::kBounds;
}

// f(mode) with the mode as a compile-time constant (std::integral_constant): one copy of f's code per mode.
template <typename F>
__device__ __forceinline__ void with_mode(ScoreMode mode, F f) {
  specialize<ScoreMode, ScoreMode::kVisible, ScoreMode::kBounds, ScoreMode::kGeneral>(mode, f);
}

// masked_score and dropped in mode M (the plain modes: no soft cap, so dcap = 1, no mask, no dropout).
template <ScoreMode M>
__device__ __forceinline__ float mode_score(const AttentionArgs& a, const Seq& s, int64_t b, int64_t h, int i, int j,
                                            float acc, float& dcap) {
  if constexpr (M == ScoreMode::kGeneral) {
    return masked_score(a, s, b, h, i, j, acc, dcap);
  } else {
    dcap = 1.f;
    const float x = acc * a.scale * kLog2e;  // score()'s arithmetic without a cap: the same bits
    return M == ScoreMode::kVisible || visible(a, s, i, j) ? x : -INFINITY;
  }
}

template <ScoreMode M>
__device__ __forceinline__ float mode_dropped(const AttentionArgs& a, const Dropout& d, int i, int j, float p) {
  if constexpr (M == ScoreMode::kGeneral) {
    return dropped(a, d, i, j, p);
  } else {
    return p;
  }
}

// The query tile of a forward or dQ block (blockIdx.x = batch entry * H + query head, blockIdx.y = tile of BM
// rows): batch entry, head, its kv head, sequence, dropout counters and first row.
struct QueryTile {
  int64_t b, h, hk;
  Seq s;
  Dropout drop;
  int m0;
};

__device__ __forceinline__ QueryTile query_tile(const AttentionArgs& a, int BM) {
  const int64_t b = blockIdx.x / a.H, h = blockIdx.x % a.H;
  const Seq s = seq_of(a, b);
  return {b, h, h / (a.H / a.Hk), s, dropout_of(a, b, s, h), static_cast<int>(blockIdx.y) * BM};
}

// lse (natural log, -inf for a row that sees nothing) -> the exp2-domain offset of its probabilities. A row
// that sees nothing gets +inf, so exp2(s - offset) = 0 for it instead of exp2(-inf + inf) = NaN.
// __fmul_rn: never contracted into an FMA, so the forward's lse_gaps (below) see the offset the backward uses.
__device__ __forceinline__ float lse_offset(float lse) {
  return lse == -INFINITY ? INFINITY : __fmul_rn(lse, kLog2e);
}

// How far the backward's exp2 offset, lse_offset(lse), lies below the row's max m (d) and below its exp2-domain
// log-sum-exp m + log2(l) (lo2): the backward's P~ = exp2(s - offset) are at most exp2(d) and exp2(lo2) times the
// true probabilities, and the forward's lse_lo (lo2 ln 2) lets the backward's glue (csrc/attention.cpp) scale dO by
// exp(-lse_lo) to make them exact. lo2 is the rounding of lse and of the offset, ~|m| 2^-23: nothing in ordinary rows,
// log2(S) in a row whose every score sits at a large mask value (lse rounds back to m; d = 0 when the round trip
// m -> lse -> offset is exact, as for 1e9 and finfo.min, else +-1 ulp of m). m - offset is exact (Sterbenz).
__device__ __forceinline__ void lse_gaps(float m, float log2_l, float lse, float& d, float& lo2) {
  d = __fsub_rn(m, lse_offset(lse));
  lo2 = __fadd_rn(d, log2_l);
}

// The row is repairable while P~ <= 2^kMaxP2 (fp16 holds it, and P~ dO' in fp32) and lo2 >= -kLo2Slack: the dO
// scale exp2(-lo2) stays ~1, so a 16-bit dO cannot overflow. finish_forward lowers lse by an ulp or two where the
// offset would lie above the row's log-sum-exp; a row still outside (a row max beyond 2^25 ~ 3e7 whose round trip
// m -> lse -> offset is off by an ulp, >= 4 there: ~15% of random such values, none of the usual fills) gets
// lse -inf, so the backward sees a row without keys: zero gradients, never inf or NaN.
constexpr float kMaxP2 = 8.f;
constexpr float kLo2Slack = 0x1p-10f;

// Gradient columns per block of the backward kernels (sm_80 and sm_90a): the whole head dim up to 128; at 256 the
// dK/dV (dQ) accumulators of all columns would not fit in registers, so blockIdx.z picks a 128-column half and each
// half recomputes the tile's P and dP (2x those products, none of the accumulators' registers).
template <int DP>
constexpr int kGradCols = DP <= 128 ? DP : 128;

// ---------------------------------------------------------------------------------------------------------
// The backward's scores, shared by the sm_80 (attention.cu) and sm_90a (attention_bwd_sm90a.cu) kernels. A warp's
// accumulator block holds, in element e of 8-column tile nt, row r0 + 8 (e >> 1) and column c0 + 8 nt + 2t + (e & 1)
// of the scores: (query, key) in the dQ kernels, (key, query) in the dK/dV kernels (KEY_ROWS: S^T = K Q^T).
template <bool KEY_ROWS>
__device__ __forceinline__ void score_at(int r0, int c0, int t, int nt, int e, int& i, int& j) {
  const int r = r0 + 8 * (e >> 1), c = c0 + nt * 8 + 2 * t + (e & 1);
  i = KEY_ROWS ? c : r;
  j = KEY_ROWS ? r : c;
}

// Raw scores S (in p, from the product) and dP (in dp) -> dS = P (dropped(dP) - delta(i, e)) dcap in dp, with P
// recomputed from the forward's lse: off(i, e) is the lse_offset of query i (element e: its row half, for stats
// held in registers), finite or +inf, so masked scores give 0; dcap is the soft cap's chain factor. The float
// mask's gradient is dS before the chain factor, written to dmask (when not null) once per element. In the dK/dV
// kernels (KEY_ROWS) p ends as dropped(P) for dV = dropped(P)^T dO (dropout: the same scores as the forward), in
// the dQ kernels as P. Both products come first, so the cap's factors never live across one. The tile's score
// code is chosen once (tile_mode); the plain modes do it in one pass, kGeneral in two (P and dcap, then dS: in one
// pass its per-score code spilled the sm_80 dQ kernel).
template <bool KEY_ROWS, int NT, typename Off, typename Delta>
__device__ __forceinline__ void bwd_scores(const AttentionArgs& a, const Seq& s, int64_t b, int64_t h,
                                           const Dropout& drop, int r0, int c0, int t, Off off, Delta delta,
                                           float* dmask, float (&p)[NT][4], float (&dp)[NT][4]) {
  with_mode(tile_mode<KEY_ROWS, NT>(a, s, drop, r0, c0), [&](auto mode) {
    constexpr ScoreMode M = decltype(mode)::value;
    float dcap[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int i, j;
        score_at<KEY_ROWS>(r0, c0, t, nt, e, i, j);
        p[nt][e] = exp2_approx(mode_score<M>(a, s, b, h, i, j, p[nt][e], dcap[nt][e]) - off(i, e));
        if constexpr (M != ScoreMode::kGeneral) dp[nt][e] = p[nt][e] * (dp[nt][e] - delta(i, e));  // dS
      }
    }
    if constexpr (M == ScoreMode::kGeneral) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int i, j;
          score_at<KEY_ROWS>(r0, c0, t, nt, e, i, j);
          const float ds = p[nt][e] * (dropped(a, drop, i, j, dp[nt][e]) - delta(i, e));
          if (dmask && i < s.L && j < s.S) dmask[int64_t(i) * a.S + j] = ds;
          dp[nt][e] = ds * dcap[nt][e];
          if (KEY_ROWS) p[nt][e] = dropped(a, drop, i, j, p[nt][e]);
        }
      }
    }
  });
}

// The lse offsets and deltas of BM queries from m0 in shared memory (the dK/dV kernels' query tiles); rows past the
// sequence see nothing (+inf offset, 0 delta).
template <int BM>
__device__ __forceinline__ void load_row_stats(const AttentionArgs& a, const Seq& s, int64_t lb, int m0, float* off_s,
                                               float* dl_s) {
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const bool ok = m0 + r < s.L;
    off_s[r] = ok ? lse_offset(a.lse[lb + m0 + r]) : INFINITY;
    dl_s[r] = ok ? a.delta[lb + m0 + r] : 0.f;
  }
}

// The same for this thread's two query rows i0, i0 + 8 in registers (the dQ kernels).
__device__ __forceinline__ void row_stats(const AttentionArgs& a, const Seq& s, int64_t lb, int i0, float (&off)[2],
                                          float (&dl)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = i0 + 8 * half;
    off[half] = i < s.L ? lse_offset(a.lse[lb + i]) : INFINITY;
    dl[half] = i < s.L ? a.delta[lb + i] : 0.f;
  }
}

// The float mask's gradient rows of (b, h) in a dQ block of column split 0 (every split computes the same dS), or
// null: each element written once (deterministic); keys outside the visited range stay zero.
__device__ __forceinline__ float* dmask_of(const AttentionArgs& a, int64_t b, int64_t h) {
  return blockIdx.z == 0 && a.dmask ? a.dmask + (b * a.H + h) * a.L * a.S : nullptr;
}

// Write the two rows (g, g + 8) of a warp's 16-row accumulator block: columns < cols, rows < nrows.
template <typename T, int DT>
__device__ __forceinline__ void store_acc(T* out, int64_t rs, int r0, int nrows, int64_t cols, const float (&acc)[DT][4],
                                          float mul_lo, float mul_hi, int g, int t) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + g + 8 * half;
    if (r >= nrows) continue;
    const float mul = half ? mul_hi : mul_lo;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = dt * 8 + 2 * t + c;
        if (col < cols) out[r * rs + col] = from_f<T>(acc[dt][2 * half + c] * mul);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The forward's online softmax, shared by the sm_80 and sm_90a forwards.

// One BN-key tile of scores sc (this thread's rows i0, i0 + 8 of query tile, columns n0 + 8 nt + 2t + c): masks
// them, updates the running max m and sum l (exp2 domain; l before dropout), rescales the output accumulators
// o, and leaves in sc the probabilities for P V (after dropout). The tile's score code is chosen once (tile_mode).
template <int BN, int DP>
__device__ __forceinline__ void softmax_tile(const AttentionArgs& a, const Seq& s, int64_t b, int64_t h,
                                             const Dropout& drop, int i0, int n0, int t, float (&sc)[BN / 8][4],
                                             float (&m)[2], float (&l)[2], float (&o)[DP / 8][4]) {
  with_mode(tile_mode<false, BN / 8>(a, s, drop, i0, n0), [&](auto mode) {
    constexpr ScoreMode M = decltype(mode)::value;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float dcap;
          float& x = sc[nt][2 * half + c];
          x = mode_score<M>(a, s, b, h, i0 + 8 * half, n0 + nt * 8 + 2 * t + c, x, dcap);
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[half], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen nothing yet stays at zero
      const float alpha = exp2_approx(m[half] - m_use);
      m[half] = m_new;
      l[half] *= alpha;
#pragma unroll
      for (int dt = 0; dt < DP / 8; ++dt) {
        o[dt][2 * half] *= alpha;
        o[dt][2 * half + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = exp2_approx(sc[nt][2 * half + c] - m_use);
          l[half] += p;  // this thread's partial row sum (before dropout); the 4 lanes are summed at the end
          sc[nt][2 * half + c] = mode_dropped<M>(a, drop, i0 + 8 * half, n0 + nt * 8 + 2 * t + c, p);
        }
      }
    }
  });
}

// Normalises the output rows, writes them, their lse (natural log; -inf for a row that sees no key) and lse_lo.
template <typename T, int DP>
__device__ __forceinline__ void finish_forward(const AttentionArgs& a, const Seq& s, int64_t b, int64_t h, int m0,
                                               int i0, int warp, int g, int t, const float (&m)[2], const float (&l)[2],
                                               const float (&o)[DP / 8][4]) {
  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = l[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    // Only sum == 0 is a row that sees no key (output 0, lse -inf): a NaN sum (a NaN or +inf score, inf - inf in
    // q.k) is not > 0 but must give NaN output and lse, and so NaN gradients, as torch.
    const bool seen = sum != 0.f;
    inv[half] = seen ? 1.f / sum : 0.f;
    const int i = i0 + 8 * half;
    if (t == 0 && i < s.L) {
      const float log2_l = log2f(sum);
      float lse = seen ? (m[half] + log2_l) * kLn2 : -INFINITY, lo = 0.f;
      if (seen) {
        float d, lo2;
        lse_gaps(m[half], log2_l, lse, d, lo2);
        for (int k = 0; k < 3 && lo2 < -kLo2Slack; ++k) {  // (an offset above the lse: lower lse, see lse_gaps)
          lse = nextafterf(lse, -INFINITY);
          lse_gaps(m[half], log2_l, lse, d, lo2);
        }
        if (d > kMaxP2 || lo2 < -kLo2Slack) {
          lse = -INFINITY;  // (a NaN lo2 is kept: NaN gradients, as torch)
        } else {
          lo = lo2 * kLn2;
        }
      }
      a.lse[lse_base(a, b, s, h) + i] = lse;
      a.lse_lo[lse_base(a, b, s, h) + i] = lo;
    }
  }
  store_acc<T, DP / 8>(row_ptr<T>(a.o, a, b, s.q0, h, m0), a.o.sm, warp * 16, s.L - m0, a.Ev, o, inv[0], inv[1], g,
                       t);
}

// ---------------------------------------------------------------------------------------------------------
// Launch.

// f(TypeTag<T>{}, std::integral_constant<int, DP>{}) for the call's type (fp16 / bf16) and head dim max(E, Ev)
// padded to DP = 64, 128 or 256: one instantiation per type and DP (zero columns cost FLOPs, not results). Tags
// rather than a C++20 template lambda: the GPU machines' torch builds extensions as C++17.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
inline cudaError_t dispatch_head_dim(const AttentionArgs& a, F f) {
  const int64_t d = a.E > a.Ev ? a.E : a.Ev;
  if (d > kAttentionMaxHeadDim || d < 1) return cudaErrorInvalidValue;
  const auto padded = [&](auto ty) -> cudaError_t {
    if (d <= 64) return f(ty, std::integral_constant<int, 64>{});
    if (d <= 128) return f(ty, std::integral_constant<int, 128>{});
    return f(ty, std::integral_constant<int, 256>{});
  };
  switch (a.dtype) {
    case DType::F16: return padded(TypeTag<__half>{});
    case DType::BF16: return padded(TypeTag<__nv_bfloat16>{});
    default: return cudaErrorInvalidValue;
  }
}

// Grid: (heads, row tiles, column splits of the gradients).
template <typename Kernel>
inline cudaError_t launch(Kernel kernel, int smem, int64_t heads, int64_t rows, int tile, const AttentionArgs& a,
                          cudaStream_t stream, int splits = 1) {
  const int64_t tiles = (rows + tile - 1) / tile;
  if (tiles == 0 || heads == 0) return cudaSuccess;
  if (tiles > 65535 || heads > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pykernels

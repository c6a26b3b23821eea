// The CPU recurrence of one LSTM layer direction (the kernels of pykernels::lstm_layer_fwd / _bwd; docs/lstm.md),
// compiled twice: into _C for the build's base capability (cpu/lstm_layer.cpp) and into _C_avx512 with 512-bit
// vectors and 6-row tiles (avx512/lstm_layer.cpp), which pykernels/_ext.py registers on CPUs with AVX-512. The input
// projection x W_ih^T + b is one GEMM done before (ops/lstm.py).
//
// The recurrence is persistent, the CPU form of the GPU kernels' design: one OpenMP team for the whole sequence,
// the hidden units split over the threads, each thread's share of W_hh packed once into panels that stay in its
// cache for all T steps, and one barrier per step (h_t, or dgates_t in the backward, is what the threads share).
// A per-step BLAS call cannot do this: it re-reads W_hh from wherever it lies, pays its own threading per step,
// and leaves the gates in memory for a second pass. Here the gate pre-activations of a tile (R batch rows x 4
// gates x one vector of units) stay in registers from the projection's load through the K loop to the cell
// update (cpu_lstm::cell_units), so each step writes only ws and h.
//
// Precision is the contract's (ops/lstm.py _ref_layer_fwd/_bwd): gates and c in the accumulation dtype, h rounded
// to the input dtype at every step (it is the next step's GEMM operand, as on the GPU), dgates rounded to W_hh's
// dtype as the operand of dh_{t-1} = dgates_t W_hh. Every output element sums its terms in the same order at
// either vector width and any tile height, so both builds give bit-identical results.
// No tensors: raw pointers (LstmLayerCpuArgs), at::vec and OpenMP. Everything has internal linkage (one copy per
// library).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "../lstm_args.h"
#include "lstm_pointwise.h"
#include "visit_dtype.h"

namespace pykernels {
namespace {

using cpu_lstm::Vec;

// Scratch of n elements on 64-byte lines (a 512-bit load of a panel never straddles two); empty when n is 0.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : p_(n > 0 ? static_cast<T*>(std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64))
                 : nullptr) {
    if (n > 0 && !p_) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// Processing step s -> time index t (the reverse direction walks the sequence from its end).
inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Batch rows per register tile: 4R accumulators + one weight vector + R broadcasts fit the ISA's vector registers:
// AVX2's 16 take 3 rows, AVX-512's 32 take 6 (24 accumulators: each weight load feeds 6 FMAs; at 3 rows the
// AVX-512 build was not clearly faster than the AVX2 one, at 6 the recurrence ran 1.3-2x faster, docs/lstm.md).
#ifdef CPU_CAPABILITY_AVX512
constexpr int kRows = 6;
#else
constexpr int kRows = 3;
#endif
// Vectors of hidden units per backward tile (its R x kBwdVecs accumulators share each broadcast of dgates).
constexpr int kBwdVecs = 4;
// Terms of the K loops (fwd_tile: K = H, bwd_rows: K = 4H) that the register accumulators take before their partial
// sums go to a PairwiseSum. The accumulators of a tile (12 at AVX2, 24 at AVX-512) fill the registers, so there is
// no room for several interleaved ones; one fp32 FMA chain over all of K = 4H had 7-10x the error of torch's LSTM
// backward at H = 1024-1500 (dh0), K = H 2-2.6x in the forward. Blocks with a pairwise sum of the blocks: the error of
// ~kKBlock + log2(K / kKBlock) sequential additions (128: dh0 and the forward 0.6-1.2x torch's error at
// H = 600-1500; 64: 0.6-0.8x). Each block costs its partials' adds and stores and the loop's exit: at 128 the op
// runs ~5-12% slower at B >= 8, H >= 256 (1 thread; within noise at B = 1-2, where the panel's loads bound it).
#ifndef PYKERNELS_LSTM_KBLOCK
#define PYKERNELS_LSTM_KBLOCK 128
#endif
constexpr int64_t kKBlock = PYKERNELS_LSTM_KBLOCK;

// Pairwise sum of N vectors' block partials by a binary counter: level l holds the sum of 2^l blocks, and a new
// block merges with the equal-sized levels below it (as the carries of count + 1), so no two sums of unequal size
// meet until add_to(). The levels are raw scalars (Vectorized's default constructor zeroes). 32 levels: K up to
// 2^32 * kKBlock.
template <typename V, int N>
struct PairwiseSum {
  using T = typename V::value_type;
  static constexpr int64_t U = V::size();
  alignas(32) T level[32][N][U];
  uint64_t count = 0;
  // adds block partials p[0..N) (p is clobbered)
  inline void push(V* p) {
    int l = 0;
    for (uint64_t c = count; c & 1; c >>= 1, ++l)
      for (int i = 0; i < N; ++i) p[i] = V::loadu(level[l][i]) + p[i];
    for (int i = 0; i < N; ++i) p[i].store(level[l][i]);
    ++count;
  }
  // out[i] += the sum of all blocks pushed, the pending levels added smallest first
  inline void add_to(V* out) const {
    int l = 0;
    uint64_t c = count;
    for (; c && !(c & 1); c >>= 1) ++l;  // the smallest level
    if (!c) return;
    V t[N];
    for (int i = 0; i < N; ++i) t[i] = V::loadu(level[l][i]);
    for (c >>= 1, ++l; c; c >>= 1, ++l)
      if (c & 1)
        for (int i = 0; i < N; ++i) t[i] = t[i] + V::loadu(level[l][i]);
    for (int i = 0; i < N; ++i) out[i] = out[i] + t[i];
  }
};

// The tile of the `left` (< kRows) rows from row r, if any: one instantiation per height.
template <int R = kRows - 1, typename F>
inline void last_row_tile(int64_t left, int64_t r, const F& tile) {
  if constexpr (R > 0) {
    if (left == R) return tile(std::integral_constant<int, R>(), r);
    last_row_tile<R - 1>(left, r, tile);
  }
}

// tile(std::integral_constant<int, R>(), r) over the batch: tiles of kRows rows, then one tile of the rows left,
// so that each tile streams the panel once (B = 2 as two 1-row tiles read it twice).
template <typename F>
inline void for_row_tiles(int64_t B, const F& tile) {
  int64_t r = 0;
  for (; r + kRows <= B; r += kRows) tile(std::integral_constant<int, kRows>(), r);
  last_row_tile(B - r, r, tile);
}

// Runs body(thread, threads) on a team sized for `work` multiply-adds per step: one thread below ~32k (a barrier
// would cost more than it saves), never more than `parts` threads, none nested inside another parallel region.
template <typename F>
void run_team(int64_t parts, int64_t work, const F& body) {
  int64_t want = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), parts, work / 32768 + 1});
#ifdef _OPENMP
  if (want > 1 && !omp_in_parallel() && !at::in_parallel_region()) {
#pragma omp parallel num_threads(static_cast<int>(want))
    body(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
    return;
  }
#endif
  (void)want;
  body(0, 1);
}

inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// [p0, p1) of `parts` equal pieces for thread `t` of `nt`.
inline std::pair<int64_t, int64_t> share(int64_t parts, int64_t t, int64_t nt) {
  return {parts * t / nt, parts * (t + 1) / nt};
}

// ---------------------------------------------------------------------------------------------------------
// Forward. Panel p of W_hh (units [pU, pU + U), U = one vector) as [k][gate][U], zero past H: the four gate vectors
// of one k are adjacent, so the K loop reads the panel front to back.

template <typename acc_t, typename w_t>
void pack_fwd(const w_t* w, int64_t H, acc_t* panels) {
  constexpr int64_t U = Vec<acc_t>::size();
  const int64_t P = (H + U - 1) / U;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      acc_t* dst = panels + p * H * 4 * U;
      for (int64_t k = 0; k < H; ++k)
        for (int64_t q = 0; q < 4; ++q)
          for (int64_t u = 0; u < U; ++u) {
            const int64_t j = p * U + u;
            dst[(k * 4 + q) * U + u] = j < H ? static_cast<acc_t>(w[(q * H + j) * H + k]) : acc_t(0);
          }
    }
  });
}

// The K loop of fwd_tile over [k0, k1), accumulating into acc.
template <typename acc_t, int R>
__attribute__((always_inline)) inline void fwd_chain(const acc_t* panel, const acc_t* h, int64_t H, int64_t k0,
                                                     int64_t k1, Vec<acc_t> (&acc)[R * 4]) {
  using V = Vec<acc_t>;
  constexpr int64_t U = V::size();
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t* pk = panel + k * 4 * U;
    V b[R];
    for (int r = 0; r < R; ++r) b[r] = V(h[r * H + k]);
    for (int q = 0; q < 4; ++q) {
      const V w = V::loadu(pk + q * U);
      for (int r = 0; r < R; ++r) acc[r * 4 + q] = at::vec::fmadd(b[r], w, acc[r * 4 + q]);
    }
  }
}

// R rows x one panel: the gates of units [j, j + n) for rows h[0..R) (row stride H), xp's rows plus one K loop
// (H <= kKBlock; else fwd_tile_blocked). Kept out of line with its own 1-D accumulators: inlined
// beside the activations, GCC re-loaded each weight vector for every row (a memory operand per FMA: 15 loads per 12
// FMAs) and the loop turned load-bound; accumulating into the caller's array instead stores it every iteration (it
// may alias the panel).
template <typename acc_t, int R>
__attribute__((noinline)) void fwd_tile(const acc_t* panel, const acc_t* h, const acc_t* xp, int64_t H, int64_t j,
                                        int64_t n, Vec<acc_t> (&g)[R][4]) {
  using V = Vec<acc_t>;
  V acc[R * 4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r * 4 + q] = cpu_lstm::load<acc_t>(xp + r * 4 * H + q * H + j, n);
  fwd_chain<acc_t, R>(panel, h, H, 0, H, acc);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) g[r][q] = acc[r * 4 + q];
}

// fwd_tile for H > kKBlock: the K loop in blocks of kKBlock pairwise summed, then xp added. A function of its own:
// in fwd_tile, the levels' frame and the accumulators' spills around the blocks slowed the one-chain path by ~15%.
template <typename acc_t, int R>
__attribute__((noinline)) void fwd_tile_blocked(const acc_t* panel, const acc_t* h, const acc_t* xp, int64_t H,
                                                int64_t j, int64_t n, Vec<acc_t> (&g)[R][4]) {
  using V = Vec<acc_t>;
  V acc[R * 4];
  PairwiseSum<V, R * 4> sum;
  for (int64_t k0 = 0; k0 < H; k0 += kKBlock) {
    for (int i = 0; i < R * 4; ++i) acc[i] = V(acc_t(0));
    fwd_chain<acc_t, R>(panel, h, H, k0, std::min(H, k0 + kKBlock), acc);
    sum.push(acc);
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r * 4 + q] = cpu_lstm::load<acc_t>(xp + r * 4 * H + q * H + j, n);
  sum.add_to(acc);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) g[r][q] = acc[r * 4 + q];
}

// Rows [r, r + R) of step t for panel p: gates, cell update, ws, out (input dtype) and hnext (h as rounded).
template <typename acc_t, int R, typename scalar_t>
inline void fwd_rows(const acc_t* panel, const acc_t* hprev, const acc_t* xp_t, const acc_t* cprev, int64_t c_stride,
                     acc_t* ws_t, scalar_t* out_t, acc_t* hnext, int64_t r, int64_t H, int64_t j, int64_t n) {
  Vec<acc_t> g[R][4];
  if (H <= kKBlock)
    fwd_tile<acc_t, R>(panel, hprev + r * H, xp_t + r * 4 * H, H, j, n, g);
  else
    fwd_tile_blocked<acc_t, R>(panel, hprev + r * H, xp_t + r * 4 * H, H, j, n, g);
  for (int i = 0; i < R; ++i) {
    const int64_t row = r + i;
    cpu_lstm::cell_units<acc_t>(g[i], cpu_lstm::load<acc_t>(cprev + row * c_stride + j, n), ws_t + row * 5 * H + j,
                                H, out_t + row * H + j, static_cast<acc_t*>(nullptr), n);
    // the next step's operand is h as stored (rounded to the input dtype)
    cpu_lstm::store(hnext + row * H + j, cpu_lstm::load<acc_t>(out_t + row * H + j, n), n);
  }
}

template <typename scalar_t>
void layer_fwd(const LstmLayerCpuArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t U = Vec<acc_t>::size();
  const int64_t T = a.T, B = a.B, H = a.H, P = (H + U - 1) / U;
  const bool reverse = a.reverse;
  const AlignedBuffer<acc_t> panels(P * H * 4 * U);
  pack_fwd<acc_t>(static_cast<const scalar_t*>(a.w_hh), H, panels.get());
  const AlignedBuffer<acc_t> hbuf(2 * B * H);  // h_{t-1} / h_t as acc_t, ping-pong
  const scalar_t* h0 = static_cast<const scalar_t*>(a.h0);
  for (int64_t i = 0; i < B * H; ++i) hbuf.get()[i] = static_cast<acc_t>(h0[i]);
  const acc_t *pp = panels.get(), *px = static_cast<const acc_t*>(a.xproj), *pc0 = static_cast<const acc_t*>(a.c0);
  acc_t *ph = hbuf.get(), *pw = static_cast<acc_t*>(a.ws);
  scalar_t* po = static_cast<scalar_t*>(a.out);
  run_team(P, B * H * 4 * H, [&](int64_t tid, int64_t nt) {
    const auto [p0, p1] = share(P, tid, nt);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_of(s, T, reverse);
      const acc_t* hprev = ph + (s & 1) * B * H;
      acc_t* hnext = ph + ((s + 1) & 1) * B * H;
      const acc_t* cprev = s == 0 ? pc0 : pw + time_of(s - 1, T, reverse) * B * 5 * H + 4 * H;
      const int64_t c_stride = s == 0 ? H : 5 * H;
      const acc_t* xp_t = px + t * B * 4 * H;
      acc_t* ws_t = pw + t * B * 5 * H;
      scalar_t* out_t = po + t * B * H;
      for (int64_t p = p0; p < p1; ++p) {
        const acc_t* panel = pp + p * H * 4 * U;
        const int64_t j = p * U, n = std::min<int64_t>(U, H - j);
        for_row_tiles(B, [&](auto R, int64_t r) {
          fwd_rows<acc_t, decltype(R)::value>(panel, hprev, xp_t, cprev, c_stride, ws_t, out_t, hnext, r, H, j, n);
        });
      }
      team_barrier();  // h_t complete before any thread reads it; h_{t-1}'s buffer free to overwrite
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward. Thread shares are blocks of kBwdVecs unit vectors; panel b of W_hh is [n][kBwdVecs * U] (rows n of
// all four gates, the block's units, zero past H), so dh_{t-1}[r, units] = sum_n dg_t[r, n] W_hh[n, units] reads
// it front to back.

template <typename acc_t, typename w_t>
void pack_bwd(const w_t* w, int64_t H, int64_t width, acc_t* panels) {
  const int64_t P = (H + width - 1) / width;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = 0; m < 4 * H; ++m)
        for (int64_t u = 0; u < width; ++u) {
          const int64_t j = p * width + u;
          panels[(p * 4 * H + m) * width + u] = j < H ? static_cast<acc_t>(w[m * H + j]) : acc_t(0);
        }
  });
}

// The K loop of bwd_rows over [m0, m1), accumulating into acc.
template <typename acc_t, int R>
__attribute__((always_inline)) inline void bwd_chain(const acc_t* panel, const acc_t* d, int64_t H, int64_t m0,
                                                     int64_t m1, Vec<acc_t> (&acc)[R * kBwdVecs]) {
  using V = Vec<acc_t>;
  constexpr int64_t U = V::size();
  for (int64_t m = m0; m < m1; ++m) {
    const acc_t* pm = panel + m * kBwdVecs * U;
    V b[R];
    for (int i = 0; i < R; ++i) b[i] = V(d[i * 4 * H + m]);
    for (int v = 0; v < kBwdVecs; ++v) {
      const V w = V::loadu(pm + v * U);
      for (int i = 0; i < R; ++i) acc[i * kBwdVecs + v] = at::vec::fmadd(b[i], w, acc[i * kBwdVecs + v]);
    }
  }
}

// dh[r + i, j .. j + width) = dg rows (stride 4H) x panel, for R rows: one K loop where 4H <= kKBlock, else blocks of
// kKBlock pairwise summed. Out of line like fwd_tile (inlined, each weight vector was re-loaded for every row); the
// two paths are separate functions as fwd_tile's.
template <typename acc_t, int R, bool kBlocked>
__attribute__((noinline)) void bwd_rows(const acc_t* panel, const acc_t* dg, acc_t* dh, int64_t r, int64_t H,
                                        int64_t j) {
  using V = Vec<acc_t>;
  constexpr int64_t U = V::size(), N = R * kBwdVecs;
  const acc_t* d = dg + r * 4 * H;
  V acc[N];
  if constexpr (!kBlocked) {
    for (int i = 0; i < N; ++i) acc[i] = V(acc_t(0));
    bwd_chain<acc_t, R>(panel, d, H, 0, 4 * H, acc);
  } else {
    PairwiseSum<V, N> sum;
    for (int64_t m0 = 0; m0 < 4 * H; m0 += kKBlock) {
      for (int i = 0; i < N; ++i) acc[i] = V(acc_t(0));
      bwd_chain<acc_t, R>(panel, d, H, m0, std::min(4 * H, m0 + kKBlock), acc);
      sum.push(acc);
    }
    for (int i = 0; i < N; ++i) acc[i] = V(acc_t(0));
    sum.add_to(acc);
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < kBwdVecs; ++v) {
      const int64_t jj = j + v * U;
      if (jj < H) cpu_lstm::store(dh + (r + i) * H + jj, acc[i * kBwdVecs + v], std::min<int64_t>(U, H - jj));
    }
}

template <typename w_t>
void layer_bwd(const LstmLayerCpuArgs& a) {
  using acc_t = at::opmath_type<w_t>;
  using V = Vec<acc_t>;
  constexpr int64_t U = V::size(), width = kBwdVecs * U;
  constexpr bool round_dg = !std::is_same_v<w_t, acc_t>;
  const int64_t T = a.T, B = a.B, H = a.H, P = (H + width - 1) / width;
  const bool reverse = a.reverse;
  const AlignedBuffer<acc_t> panels(P * 4 * H * width);
  pack_bwd<acc_t>(static_cast<const w_t*>(a.w_hh), H, width, panels.get());
  // dg_t rounded to W_hh's dtype (the GEMM operand, as the GPU kernels see it), ping-pong
  const AlignedBuffer<acc_t> dgr(round_dg ? 2 * B * 4 * H : 0);
  const acc_t *pp = panels.get(), *pw = static_cast<const acc_t*>(a.ws), *pc0 = static_cast<const acc_t*>(a.c0);
  const acc_t* pgo = static_cast<const acc_t*>(a.grad_out);
  acc_t *pd = static_cast<acc_t*>(a.dgates), *pdh = static_cast<acc_t*>(a.dh), *pdc = static_cast<acc_t*>(a.dc);
  acc_t* pr = dgr.get();
  run_team(P, B * H * 4 * H, [&](int64_t tid, int64_t nt) {
    const auto [p0, p1] = share(P, tid, nt);
    const int64_t u0 = p0 * width, u1 = std::min(H, p1 * width);  // this thread's units, in gates and dh alike
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = time_of(s, T, reverse);
      const acc_t* cprev = s == 0 ? pc0 : pw + time_of(s - 1, T, reverse) * B * 5 * H + 4 * H;
      const int64_t c_stride = s == 0 ? H : 5 * H;
      acc_t* dg_t = pd + t * B * 4 * H;
      acc_t* dgr_t = round_dg ? pr + (s & 1) * B * 4 * H : dg_t;
      // 1. own units: dh += grad_out[t]; the gate gradients; dc <- dc_prev
      for (int64_t r = 0; r < B; ++r)
        for (int64_t j = u0; j < u1; j += U) {
          const int64_t n = std::min<int64_t>(U, u1 - j), o = r * H + j;
          V dhv = cpu_lstm::load<acc_t>(pdh + o, n);
          if (pgo) dhv = dhv + cpu_lstm::load<acc_t>(pgo + t * B * H + o, n);
          acc_t* dgo = dg_t + r * 4 * H + j;
          cpu_lstm::store(pdc + o, cpu_lstm::gate_grad_units<acc_t>(pw + t * B * 5 * H + r * 5 * H + j, H, dhv,
                                                                    cpu_lstm::load<acc_t>(pdc + o, n),
                                                                    cprev + r * c_stride + j, dgo, n), n);
          if constexpr (round_dg) {
            for (int64_t q = 0; q < 4; ++q)
              for (int64_t u = 0; u < n; ++u)
                dgr_t[r * 4 * H + q * H + j + u] = static_cast<acc_t>(static_cast<w_t>(dgo[q * H + u]));
          }
        }
      team_barrier();  // dg_t complete: every thread's dh needs all of it
      // 2. own units: dh_{t-1} = dg_t W_hh
      for (int64_t p = p0; p < p1; ++p) {
        const acc_t* panel = pp + p * 4 * H * width;
        for_row_tiles(B, [&](auto R, int64_t r) {
          if (4 * H <= kKBlock)
            bwd_rows<acc_t, decltype(R)::value, false>(panel, dgr_t, pdh, r, H, p * width);
          else
            bwd_rows<acc_t, decltype(R)::value, true>(panel, dgr_t, pdh, r, H, p * width);
        });
      }
      // no barrier: step s-1's first phase reads only this thread's units of dh and dc, and writes another dg_t
      // (or the other half of dgr) than the one the slower threads may still read
    }
  });
}

// The entry points: a.dtype F32, F16 or BF16 (acc float); F64 (acc double) in _C's build only.
#ifdef CPU_CAPABILITY_AVX512
constexpr bool kLayerDouble = false;
#else
constexpr bool kLayerDouble = true;
#endif

inline void lstm_layer_fwd_kernel(const LstmLayerCpuArgs& a) {
  visit_dtype<kLayerDouble>(a.dtype, [&](auto t) { layer_fwd<decltype(t)>(a); });
}

inline void lstm_layer_bwd_kernel(const LstmLayerCpuArgs& a) {
  visit_dtype<kLayerDouble>(a.dtype, [&](auto t) { layer_bwd<decltype(t)>(a); });
}

}  // namespace
}  // namespace pykernels

// CPU kernels of the LSTM sequence ops (docs/lstm.md): one layer direction over a padded sequence, the recurrence
// of pykernels::lstm_layer. The input projection x W_ih^T + b is one GEMM done before (ops/lstm.py).
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
// dtype as the operand of dh_{t-1} = dgates_t W_hh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../lstm.h"
#include "lstm_pointwise.h"

namespace pykernels {
namespace {

using cpu_lstm::Vec;

// Processing step s -> time index t (the reverse direction walks the sequence from its end).
inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Batch rows per register tile: 4R accumulators + one weight vector + R broadcasts fit AVX2's 16 registers.
constexpr int kRows = 3;
// Vectors of hidden units per backward tile (its R x kBwdVecs accumulators share each broadcast of dgates).
constexpr int kBwdVecs = 4;
// Terms of the K loops (fwd_tile: K = H, bwd_rows: K = 4H) that the register accumulators take before their partial
// sums go to a PairwiseSum. The 12 accumulators of a tile fill the registers, so there is no room for several
// interleaved ones; one fp32 FMA chain over all of K = 4H had 7-10x the error of torch's LSTM backward at
// H = 1024-1500 (dh0), K = H 2-2.6x in the forward. Blocks with a pairwise sum of the blocks: the error of
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

// tile(std::integral_constant<int, R>(), r) over the batch: tiles of kRows rows, then one tile of the 1 or 2 rows
// left, so that each tile streams the panel once (B = 2 as two 1-row tiles read it twice).
template <typename F>
inline void for_row_tiles(int64_t B, const F& tile) {
  int64_t r = 0;
  for (; r + kRows <= B; r += kRows) tile(std::integral_constant<int, kRows>(), r);
  if (B - r == 2) tile(std::integral_constant<int, 2>(), r);
  if (B - r == 1) tile(std::integral_constant<int, 1>(), r);
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
void layer_fwd(const at::Tensor& xp, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0, bool reverse,
               at::Tensor& out, at::Tensor& ws) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t U = Vec<acc_t>::size();
  const int64_t T = xp.size(0), B = xp.size(1), H = h0.size(1), P = (H + U - 1) / U;
  at::Tensor panels = at::empty({P * H * 4 * U}, xp.options());
  pack_fwd<acc_t>(w_hh.data_ptr<scalar_t>(), H, panels.data_ptr<acc_t>());
  at::Tensor hbuf = at::empty({2, B, H}, xp.options());  // h_{t-1} / h_t as acc_t, ping-pong
  hbuf[0].copy_(h0);
  const acc_t *pp = panels.data_ptr<acc_t>(), *px = xp.data_ptr<acc_t>(), *pc0 = c0.data_ptr<acc_t>();
  acc_t *ph = hbuf.data_ptr<acc_t>(), *pw = ws.data_ptr<acc_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
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

std::tuple<at::Tensor, at::Tensor> layer_fwd_cpu(const at::Tensor& xproj, const at::Tensor& w_hh,
                                                 const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  check_lstm_layer_fwd(xproj, w_hh, h0, c0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = h0.size(1);
  const auto acc = xproj.scalar_type();
  at::Tensor out = at::empty({T, B, H}, h0.options());
  at::Tensor ws = at::empty({T, B, 5 * H}, xproj.options());
  if (T == 0 || B == 0 || H == 0) return {out, ws};
  const at::Tensor xp = xproj.contiguous(), w = w_hh.contiguous(), c_init = c0.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    layer_fwd<scalar_t>(xp, w, h0, c_init, reverse, out, ws);
  });
  return {out, ws};
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

template <typename acc_t, typename w_t>
void layer_bwd(const at::Tensor& go, const at::Tensor& c0, const at::Tensor& ws, const at::Tensor& w_hh,
               bool reverse, at::Tensor& dg, at::Tensor& dh, at::Tensor& dc) {
  using V = Vec<acc_t>;
  constexpr int64_t U = V::size(), width = kBwdVecs * U;
  constexpr bool round_dg = !std::is_same_v<w_t, acc_t>;
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 5, P = (H + width - 1) / width;
  at::Tensor panels = at::empty({P * 4 * H * width}, ws.options());
  pack_bwd<acc_t>(w_hh.data_ptr<w_t>(), H, width, panels.data_ptr<acc_t>());
  // dg_t rounded to W_hh's dtype (the GEMM operand, as the GPU kernels see it), ping-pong
  at::Tensor dgr = round_dg ? at::empty({2, B, 4 * H}, ws.options()) : at::Tensor();
  const acc_t *pp = panels.data_ptr<acc_t>(), *pw = ws.data_ptr<acc_t>(), *pc0 = c0.data_ptr<acc_t>();
  const acc_t* pgo = go.defined() ? go.data_ptr<acc_t>() : nullptr;
  acc_t *pd = dg.data_ptr<acc_t>(), *pdh = dh.data_ptr<acc_t>(), *pdc = dc.data_ptr<acc_t>();
  acc_t* pr = round_dg ? dgr.data_ptr<acc_t>() : nullptr;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_bwd_cpu(const c10::optional<at::Tensor>& grad_out,
                                                             const c10::optional<at::Tensor>& grad_hn,
                                                             const c10::optional<at::Tensor>& grad_cn,
                                                             const at::Tensor& c0, const at::Tensor& ws,
                                                             const at::Tensor& w_hh, bool reverse) {
  const at::Tensor wsc = check_lstm_layer_bwd(grad_out, grad_hn, grad_cn, c0, ws, w_hh);
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 5;
  const auto acc = ws.scalar_type();
  // dh and dc carry the gradient into the state of the step being processed; they end as dh0, dc0
  auto [dg, dh, dc] = lstm_layer_bwd_outputs(grad_hn, grad_cn, ws);
  if (T == 0 || B == 0 || H == 0) return {dg, dh, dc};
  const at::Tensor w = w_hh.contiguous(), c_init = c0.to(acc).contiguous();
  const at::Tensor go = grad_out.has_value() ? grad_out->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lstm_layer_bwd_cpu", [&] {
    layer_bwd<at::opmath_type<scalar_t>, scalar_t>(go, c_init, wsc, w, reverse, dg, dh, dc);
  });
  return {dg, dh, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("lstm_layer_fwd", &layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &layer_bwd_cpu);
}

}  // namespace pykernels

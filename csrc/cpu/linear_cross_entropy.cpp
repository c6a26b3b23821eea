// CPU kernels of the fused linear cross-entropy ops (the "cpu" backend; contract: docs/linear_cross_entropy.md):
// pykernels::linear_cross_entropy_partials and _dlogits, behind the launch logic shared with the Triton and CUDA
// backends (pykernels/ops/linear_cross_entropy_launch.py), and _fused (the forward that also writes the gradients,
// at the end of this file). The logits of a block of rows x a chunk of classes come
// from one BLAS GEMM; one vectorised pass per row then reduces them on the spot (running max and sum of exp, the
// target's logit, the smoothing sum) or turns them into dlogits in place (with the bias gradient's column sums per
// block of rows). The block bounds the workspace: no N x V tensor. Math in the accumulation dtype (float32; float64
// for float64), softcap applied in the pass.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "../huge_pages.h"
#include "gemm_dtype.h"
#include "../linear_cross_entropy.h"
#include "row_sums.h"

namespace pykernels {
namespace {

constexpr const char* kPartials = "linear_cross_entropy_partials (cpu)";
constexpr const char* kDlogits = "linear_cross_entropy_dlogits (cpu)";
constexpr const char* kFused = "linear_cross_entropy_fused (cpu)";
constexpr int64_t kChunkCols = 1024;  // classes per forward GEMM
constexpr int64_t kBlockRows = 4096;  // rows per GEMM: a logit block is at most 16 MiB of fp32
// Rows per block of the bias gradient's column sums; ops/linear_cross_entropy.py passes it as db_rows.
constexpr int64_t kDbRows = 64;

// The GEMM operands and the bias / class weights. x and W are used in their own dtype for float32, float64 and, where
// oneDNN has bf16 GEMMs, bfloat16 (bf16 GEMMs accumulate in fp32 and round the logits to bf16, as torch's own bf16
// linear; 2.2-2.8x the fp32 rate on an AVX512-BF16 CPU); float16, and bfloat16 elsewhere, go through fp32
// (cpu_gemm_dtype): x copied, W converted a chunk at a time (a float32 copy of a 16-bit head would double its
// memory). The bias in the accumulation dtype.
struct Operands {
  at::Tensor x, w, bias, weight;  // bias, weight undefined when absent
};

// x in the GEMM dtype gemm (a copy when it differs), W as it is (w_chunk converts it), the bias in the accumulation
// dtype.
Operands operands(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& weight, at::ScalarType gemm) {
  const auto acc = acc_type(x.scalar_type());
  return {x.to(gemm), w, bias.has_value() ? bias->to(acc) : at::Tensor(), weight.has_value() ? *weight : at::Tensor()};
}

// Classes [c0, c1) of W in the GEMM dtype (a copy for float16 W), converted once for all row blocks.
at::Tensor w_chunk(const Operands& o, int64_t c0, int64_t c1) {
  return o.w.narrow(0, c0, c1 - c0).to(o.x.scalar_type());
}

// Rows [r0, r1) of the logits of W chunk wc before bias and softcap, into out (r1 - r0, classes of wc; the
// accumulation dtype), rows of out contiguous. bf16: the GEMM's bf16 result, converted.
void gemm_block(const Operands& o, int64_t r0, int64_t r1, const at::Tensor& wc, at::Tensor out) {
  if (o.x.scalar_type() == out.scalar_type()) {
    at::mm_out(out, o.x.narrow(0, r0, r1 - r0), wc.t());
  } else {
    out.copy_(at::mm(o.x.narrow(0, r0, r1 - r0), wc.t()));
  }
}

template <typename acc_t>
struct Row {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t* bias;  // at the row's first column, or null
  acc_t softcap;

  // z <- softcap(z + bias) over n columns, in place.
  void finish_logits(acc_t* z, int64_t n) const {
    if (!bias && softcap == 0) return;
    const Vec sc(softcap), inv(softcap == 0 ? acc_t(0) : acc_t(1) / softcap);
    int64_t j = 0;
    for (; j < n; j += Vec::size()) {
      const int64_t k = std::min<int64_t>(Vec::size(), n - j);
      Vec v = Vec::loadu(z + j, k);
      if (bias) v = v + Vec::loadu(bias + j, k);
      if (softcap != 0) v = sc * (v * inv).tanh();
      v.store(z + j, k);
    }
  }
};

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, z, n);
}

// Sum of exp(z - m) (m finite) over n columns.
template <typename acc_t>
acc_t exp_sum(const acc_t* z, int64_t n, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vm(m);
  Vec s(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) s = s + (Vec::loadu(z + j) - vm).exp();
  if (j < n) s = Vec::set(s, s + (Vec::loadu(z + j, n - j) - vm).exp(), n - j);
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, s);
}

// z <- exp(z - m) (m finite) over n columns, in place; returns their sum.
template <typename acc_t>
acc_t exp_store_sum(acc_t* z, int64_t n, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vm(m);
  Vec s(acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    const Vec e = (Vec::loadu(z + j, k) - vm).exp();
    e.store(z + j, k);
    s = s + (k == Vec::size() ? e : Vec::set(Vec(acc_t(0)), e, k));  // the tail's unloaded lanes are not 0 after exp
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, s);
}

template <typename acc_t>
void partials(const at::Tensor& input, const Operands& o, const at::Tensor& target, int64_t vocab_start,
              double softcap, bool smooth, int64_t splits, at::Tensor& mp, at::Tensor& sp, at::Tensor& zyp,
              at::Tensor& zsp) {
  const int64_t N = input.size(0), V = o.w.size(0);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const acc_t* pb = o.bias.defined() ? o.bias.data_ptr<acc_t>() : nullptr;
  const acc_t* pw = o.weight.defined() ? o.weight.data_ptr<acc_t>() : nullptr;
  at::Tensor buf = at::empty({std::min(N, kBlockRows), std::min(V, kChunkCols)},
                             o.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  for (int64_t k = 0; k < splits; ++k) {
    acc_t *m = mp[k].data_ptr<acc_t>(), *s = sp[k].data_ptr<acc_t>(), *zy = zyp[k].data_ptr<acc_t>();
    std::vector<double> zs(smooth ? N : 0);  // the chunks' weighted sums, added in double (row_sums.h)
    const int64_t lo = V * k / splits, hi = V * (k + 1) / splits;  // this split's classes
    for (int64_t c0 = lo; c0 < hi; c0 += kChunkCols) {
      const int64_t c1 = std::min(hi, c0 + kChunkCols), n = c1 - c0;
      const at::Tensor wc = w_chunk(o, c0, c1);
      for (int64_t r0 = 0; r0 < N; r0 += kBlockRows) {
        const int64_t r1 = std::min(N, r0 + kBlockRows);
        at::Tensor z = buf.narrow(0, 0, r1 - r0).narrow(1, 0, n);
        gemm_block(o, r0, r1, wc, z);
        const Row<acc_t> row{pb ? pb + c0 : nullptr, static_cast<acc_t>(softcap)};
        at::parallel_for(r0, r1, std::max<int64_t>(1, 16384 / n), [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) {
            acc_t* zr = z.data_ptr<acc_t>() + (r - r0) * z.stride(0);
            row.finish_logits(zr, n);
            const acc_t cm = row_max(zr, n);
            if (std::isnan(cm) || std::isnan(m[r])) {  // a NaN logit makes the row's statistics NaN
              m[r] = s[r] = std::numeric_limits<acc_t>::quiet_NaN();
            } else if (cm != -std::numeric_limits<acc_t>::infinity()) {  // else: classes of logit -inf add 0
              if (cm > m[r]) {
                s[r] = s[r] * std::exp(m[r] - cm);  // s is 0 while m is -inf
                m[r] = cm;
              }
              s[r] += exp_sum(zr, n, m[r]);
            }
            const int64_t t = tgt[r] - vocab_start - c0;
            if (t >= 0 && t < n) zy[r] += zr[t];
            if (smooth) zs[r] += weighted_sum(zr, pw ? pw + c0 : nullptr, n);
          }
        });
      }
    }
    if (smooth) std::copy(zs.begin(), zs.end(), zsp[k].data_ptr<acc_t>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partials_cpu(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t vocab_start, double softcap,
    bool smooth, int64_t splits) {
  check_lce_operands(kPartials, input, linear_weight, linear_bias, target, weight, softcap);
  TORCH_CHECK(splits >= 1, kPartials, ": splits must be >= 1, got ", splits);
  const int64_t N = input.size(0);
  const auto opt = input.options().dtype(acc_type(input.scalar_type()));
  at::Tensor mp = at::full({splits, N}, -std::numeric_limits<double>::infinity(), opt);
  at::Tensor sp = at::zeros({splits, N}, opt), zyp = at::zeros({splits, N}, opt);
  at::Tensor zsp = at::zeros({smooth ? splits : 0, N}, opt);
  if (N == 0 || linear_weight.size(0) == 0) return {mp, sp, zyp, zsp};
  const Operands o = operands(input, linear_weight, linear_bias, weight, cpu_gemm_dtype(input.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES(opt.dtype().toScalarType(), "linear_cross_entropy_partials_cpu", [&] {
    partials<scalar_t>(input, o, target.contiguous(), vocab_start, softcap, smooth, splits, mp, sp, zyp, zsp);
  });
  return {mp, sp, zyp, zsp};
}

// One row's dlogits from its finished logits z (bias and softcap applied), in place: coef_w and cw only with
// smoothing (cw null: unweighted), t the target's column in z (outside [0, n): not in z).
template <typename acc_t>
void dlogit_row(acc_t* z, int64_t n, acc_t softcap, const acc_t* cw, int64_t t, acc_t m, acc_t log_s, acc_t coef_p,
                acc_t coef_y, const acc_t* coef_w) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t inv = softcap == 0 ? acc_t(0) : acc_t(1) / softcap;
  const acc_t zt = t >= 0 && t < n ? z[t] : acc_t(0);
  const Vec one(acc_t(1)), vinv(inv), vm(m), vls(log_s), cp(coef_p), cwr(coef_w ? *coef_w : acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    const Vec zc = Vec::loadu(z + j, k);
    Vec d = cp * ((zc - vm) - vls).exp();  // (z - m) exact near the max: m + log_s would round at |m|
    if (coef_w) d = d - cwr * (cw ? Vec::loadu(cw + j, k) : one);
    if (softcap != 0) d = d * (one - (zc * vinv) * (zc * vinv));
    d.store(z + j, k);
  }
  if (t >= 0 && t < n) z[t] -= coef_y * (softcap != 0 ? acc_t(1) - (zt * inv) * (zt * inv) : acc_t(1));
}

// One row's dlogits without softcap from e = exp(z - m) (exp_store_sum), in place: p = e * inv_s with inv_s = 1 / sum
// e, so the row needs one exponential per logit instead of two; coef_w / cw as dlogit_row.
template <typename acc_t>
void dlogit_row_from_exp(acc_t* e, int64_t n, const acc_t* cw, int64_t t, acc_t inv_s, acc_t coef_p, acc_t coef_y,
                         const acc_t* coef_w) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec scale(coef_p * inv_s), one(acc_t(1)), cwr(coef_w ? *coef_w : acc_t(0));
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    Vec d = scale * Vec::loadu(e + j, k);
    if (coef_w) d = d - cwr * (cw ? Vec::loadu(cw + j, k) : one);
    d.store(e + j, k);
  }
  if (t >= 0 && t < n) e[t] -= coef_y;
}

// db[j] += z[j] over n columns.
template <typename acc_t>
void add_row(acc_t* db, const acc_t* z, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    (Vec::loadu(db + j, k) + Vec::loadu(z + j, k)).store(db + j, k);
  }
}

// dlogits of rows [r0, r1) from their logits z (rows at ldz; may be dl itself), stored to dl (rows at ldl) in
// scalar_t, and the rows' column sums added to db (null: none).
template <typename acc_t, typename scalar_t>
void dlogit_rows(acc_t* z, int64_t ldz, scalar_t* dl, int64_t ldl, int64_t r0, int64_t r1, int64_t n,
                 const Row<acc_t>& row, const acc_t* cw, const int64_t* tgt, int64_t t0, const acc_t* m,
                 const acc_t* log_s, const acc_t* coef_p, const acc_t* coef_y, const acc_t* coef_w, acc_t* db) {
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* zr = z + (r - r0) * ldz;
    row.finish_logits(zr, n);
    dlogit_row(zr, n, row.softcap, cw, tgt[r] - t0, m[r], log_s[r], coef_p[r], coef_y[r],
               coef_w ? coef_w + r : nullptr);
    if (db) add_row(db, zr, n);
    if (static_cast<void*>(zr) != static_cast<void*>(dl + (r - r0) * ldl)) {
      for (int64_t j = 0; j < n; ++j) dl[(r - r0) * ldl + j] = static_cast<scalar_t>(zr[j]);
    }
  }
}

template <typename scalar_t>
void dlogits(const at::Tensor& input, const Operands& o, const at::Tensor& target, const at::Tensor& m,
             const at::Tensor& log_s, const at::Tensor& coef_p, const at::Tensor& coef_y, const at::Tensor& coef_w,
             int64_t vocab_start, double softcap, bool smooth, int64_t col0, const at::Tensor& dl,
             const c10::optional<at::Tensor>& db_part) {
  using acc_t = at::opmath_type<scalar_t>;
  // the logits are computed in dl itself when it is of the accumulation dtype (16-bit input: the launch logic's
  // fp32 chunk, which its fp32 GEMMs read without a converted copy)
  const bool in_place = dl.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
  const int64_t N = input.size(0), n = dl.size(1);
  const acc_t* pb = o.bias.defined() ? o.bias.data_ptr<acc_t>() + col0 : nullptr;
  const acc_t* cw = o.weight.defined() ? o.weight.data_ptr<acc_t>() + col0 : nullptr;
  // 16-bit: the logits of a block go through an fp32 buffer; the chunk's classes go kChunkCols at a time, so the
  // buffer and the fp32 copy of W stay small whatever the launch logic's chunk is
  at::Tensor buf = in_place ? at::Tensor()
                            : at::empty({std::min(N, kBlockRows), std::min(n, kChunkCols)},
                                        o.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  for (int64_t s0 = 0; s0 < n; s0 += kChunkCols) {
    const int64_t ns = std::min(kChunkCols, n - s0);
    const Row<acc_t> row{pb ? pb + s0 : nullptr, static_cast<acc_t>(softcap)};
    const at::Tensor wc = w_chunk(o, col0 + s0, col0 + s0 + ns);
    for (int64_t r0 = 0; r0 < N; r0 += kBlockRows) {
      const int64_t r1 = std::min(N, r0 + kBlockRows);
      at::Tensor z = in_place ? dl.narrow(0, r0, r1 - r0).narrow(1, s0, ns)
                              : buf.narrow(0, 0, r1 - r0).narrow(1, 0, ns);
      gemm_block(o, r0, r1, wc, z);
      // one task per kDbRows rows: each owns its row of db_part, so the column sums are deterministic
      const int64_t b0 = r0 / kDbRows, b1 = (r1 + kDbRows - 1) / kDbRows;
      at::parallel_for(b0, b1, 1, [&](int64_t a, int64_t b) {
        for (int64_t blk = a; blk < b; ++blk) {
          const int64_t q0 = blk * kDbRows, q1 = std::min(r1, q0 + kDbRows);
          auto rows = [&](auto* out) {  // out: dl's data, of scalar_t or acc_t
            dlogit_rows(z.data_ptr<acc_t>() + (q0 - r0) * z.stride(0), z.stride(0), out + q0 * dl.stride(0) + s0,
                        dl.stride(0), q0, q1, ns, row, cw ? cw + s0 : nullptr, target.data_ptr<int64_t>(),
                        vocab_start + col0 + s0, m.data_ptr<acc_t>(), log_s.data_ptr<acc_t>(),
                        coef_p.data_ptr<acc_t>(), coef_y.data_ptr<acc_t>(),
                        smooth ? coef_w.data_ptr<acc_t>() : nullptr,
                        db_part.has_value() ? db_part->data_ptr<acc_t>() + blk * db_part->stride(0) + s0 : nullptr);
          };
          if (in_place) {
            rows(dl.data_ptr<acc_t>());
          } else {
            rows(dl.data_ptr<scalar_t>());
          }
        }
      });
    }
  }
}

void dlogits_cpu(const at::Tensor& input, const at::Tensor& linear_weight,
                 const c10::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                 const c10::optional<at::Tensor>& weight, const at::Tensor& m, const at::Tensor& log_s,
                 const at::Tensor& coef_p, const at::Tensor& coef_y, const at::Tensor& coef_w, int64_t vocab_start,
                 double softcap, bool smooth, int64_t col0, const at::Tensor& dl,
                 const c10::optional<at::Tensor>& db_part) {
  check_lce_operands(kDlogits, input, linear_weight, linear_bias, target, weight, softcap);
  check_lce_dlogits(kDlogits, input, linear_weight.size(0), m, log_s, coef_p, coef_y, coef_w, smooth, col0, dl,
                    db_part, kDbRows, /*acc_dl=*/true);
  if (input.size(0) == 0 || dl.size(1) == 0) return;
  const Operands o = operands(input, linear_weight, linear_bias, weight, cpu_gemm_dtype(input.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_dlogits_cpu",
                                  [&] {
                                    dlogits<scalar_t>(input, o, target.contiguous(), m, log_s, coef_p, coef_y,
                                                      coef_w, vocab_start, softcap, smooth, col0, dl, db_part);
                                  });
}

// The fused path (gradients in the forward, for the reductions "mean" and "sum"; ops/linear_cross_entropy.py): per
// block of rows, the logits of all V classes in one buffer (one GEMM), then one pass per row, while it is in cache,
// for its statistics, its coefficient coef_p = coef_p0 + coef_lse * lse and its dlogits in place; then
// dX[rows] = dlogits W and dW += dlogits^T x. Three GEMMs, as torch's materialised logits, where the recomputing
// backward needs four; the workspace is one block of block_rows rows (the launch logic's choice), not N x V.
// float32 / float64, and bfloat16 as torch computes it: bf16 GEMMs (fp32 accumulation inside; 2.2-2.8x the fp32
// GEMM rate on an AVX512-BF16 CPU) with bf16 logits and dlogits, the row math in fp32, dW over several row blocks
// summed in an fp32 buffer (V x H) before its one rounding. float16, and bfloat16 on a CPU whose oneDNN has no bf16
// GEMMs (cpu_gemm_dtype; ops/linear_cross_entropy.py FUSED), take the split path, which converts to fp32.
constexpr int64_t kFusedDbRows = 16;  // rows per partial column sum of the bias gradient: one task each

template <typename scalar_t>
void fused(const Operands& o, const at::Tensor& target, const at::Tensor& coef_p0,
           const at::Tensor& coef_lse, const at::Tensor& coef_y, const at::Tensor& coef_w, double softcap,
           bool smooth, int64_t block_rows, const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& zy,
           const at::Tensor& zs, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool low = !std::is_same_v<acc_t, scalar_t>;  // bf16: the rows go through an fp32 copy
  const at::Tensor& x = o.x;
  const int64_t N = x.size(0), V = o.w.size(0);
  const int64_t R = std::min(N, block_rows);
  const auto acc_opt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor buf = at::empty({R, V}, x.options());
  const bool want_db = gb.numel() > 0;
  at::Tensor dbp = want_db ? at::empty({(R + kFusedDbRows - 1) / kFusedDbRows, V}, acc_opt) : at::Tensor();
  at::Tensor gb_acc = !want_db ? at::Tensor() : low ? at::zeros({V}, acc_opt) : gb.zero_();
  // 16-bit dW over several blocks: an fp32 sum of the blocks' products, rounded once at the end
  at::Tensor gw_acc = low && gw.numel() > 0 && R < N ? at::zeros(gw.sizes(), acc_opt) : at::Tensor();
  const Row<acc_t> row{o.bias.defined() ? o.bias.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(softcap)};
  const acc_t* pw = o.weight.defined() ? o.weight.data_ptr<acc_t>() : nullptr;
  const int64_t* tgt = target.data_ptr<int64_t>();
  const acc_t *p0 = coef_p0.data_ptr<acc_t>(), *pl = coef_lse.data_ptr<acc_t>(), *py = coef_y.data_ptr<acc_t>();
  const acc_t* pcw = smooth ? coef_w.data_ptr<acc_t>() : nullptr;
  acc_t *pm = m.data_ptr<acc_t>(), *pls = log_s.data_ptr<acc_t>(), *pzy = zy.data_ptr<acc_t>();
  acc_t* pzs = smooth ? zs.data_ptr<acc_t>() : nullptr;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t nr = std::min(R, N - r0), nb = (nr + kFusedDbRows - 1) / kFusedDbRows;
    const at::Tensor xr = x.narrow(0, r0, nr);
    at::Tensor z = buf.narrow(0, 0, nr);
    at::mm_out(z, xr, o.w.t());
    scalar_t* pz = z.data_ptr<scalar_t>();
    at::parallel_for(0, nb, 1, [&](int64_t a, int64_t b) {
      std::vector<acc_t> tmp(low ? V : 0);
      for (int64_t blk = a; blk < b; ++blk) {
        acc_t* db = want_db ? dbp.data_ptr<acc_t>() + blk * V : nullptr;
        if (db) std::fill(db, db + V, acc_t(0));
        for (int64_t r = r0 + blk * kFusedDbRows; r < std::min(r0 + nr, r0 + (blk + 1) * kFusedDbRows); ++r) {
          scalar_t* zrow = pz + (r - r0) * V;
          acc_t* zr;
          if constexpr (low) {
            zr = tmp.data();
            at::vec::convert(zrow, zr, V);
          } else {
            zr = zrow;
          }
          row.finish_logits(zr, V);
          const acc_t cm = row_max(zr, V), inf = std::numeric_limits<acc_t>::infinity();
          const int64_t t = tgt[r];
          pzy[r] = t >= 0 && t < V ? zr[t] : acc_t(0);
          if (pzs) pzs[r] = static_cast<acc_t>(weighted_sum(zr, pw, V));
          // as the split forward's combination: m = 0 when not finite; log_s -inf for a row of -inf logits, NaN
          // for a NaN or +inf logit. Without softcap (whose derivative needs z) z becomes exp(z - m) here.
          const bool finite = std::isfinite(cm), from_exp = finite && row.softcap == 0;
          const acc_t mr = finite ? cm : acc_t(0);
          const acc_t s = from_exp ? exp_store_sum(zr, V, cm) : finite ? exp_sum(zr, V, cm) : acc_t(0);
          const acc_t ls = finite ? std::log(s) : cm == -inf ? -inf : std::numeric_limits<acc_t>::quiet_NaN();
          pm[r] = mr;
          pls[r] = ls;
          const acc_t cp = pl[r] == 0 ? p0[r] : p0[r] + pl[r] * (mr + ls);  // as row_coefficients
          if (from_exp) {
            dlogit_row_from_exp(zr, V, pw, t, acc_t(1) / s, cp, py[r], pcw ? pcw + r : nullptr);
          } else {
            dlogit_row(zr, V, row.softcap, pw, t, mr, ls, cp, py[r], pcw ? pcw + r : nullptr);
          }
          if (db) add_row(db, zr, V);
          if constexpr (low) at::vec::convert(zr, zrow, V);  // the dlogits rounded once, for the GEMMs
        }
      }
    });
    if (gx.numel() > 0) {
      at::Tensor gxr = gx.narrow(0, r0, nr);
      at::mm_out(gxr, z, o.w);
    }
    if (gw_acc.defined()) {
      gw_acc.add_(at::mm(z.t(), xr));
    } else if (gw.numel() > 0) {
      if (r0 == 0) {
        at::mm_out(gw, z.t(), xr);
      } else {
        gw.addmm_(z.t(), xr);
      }
    }
    if (want_db) gb_acc.add_(dbp.narrow(0, 0, nb).sum(0));
  }
  if (gw_acc.defined()) gw.copy_(gw_acc);
  if (want_db && low) gb.copy_(gb_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, const at::Tensor& coef_p0,
    const at::Tensor& coef_lse, const at::Tensor& coef_y, const at::Tensor& coef_w, double softcap, bool smooth,
    int64_t block_rows, bool input_grad, bool weight_grad, bool bias_grad) {
  check_lce_operands(kFused, input, linear_weight, linear_bias, target, weight, softcap);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, kFused,
              ": input must be float32, float64 or bfloat16, got ", dtype, " (float16 takes the split path)");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&coef_p0, "coef_p0"},
                                {&coef_lse, "coef_lse"}, {&coef_y, "coef_y"}}) {
    check_lce_row_vector(kFused, name, *t, input);
  }
  if (smooth) check_lce_row_vector(kFused, "coef_w", coef_w, input);
  TORCH_CHECK(!bias_grad || linear_bias.has_value(), kFused, ": bias_grad needs linear_bias");
  TORCH_CHECK(block_rows >= 1, kFused, ": block_rows must be >= 1, got ", block_rows);
  const int64_t N = input.size(0), H = input.size(1), V = linear_weight.size(0);
  // statistics in the accumulation dtype; gradients in their operands' dtypes (one rounding each)
  const auto opt = input.options(), acc = opt.dtype(acc_type(dtype));
  at::Tensor m = at::empty({N}, acc), log_s = at::empty({N}, acc), zy = at::empty({N}, acc);
  at::Tensor zs = at::zeros({N}, acc);
  at::Tensor gx = input_grad ? empty_huge({N, H}, opt) : at::empty({0}, opt);
  at::Tensor gw = weight_grad ? empty_huge({V, H}, opt) : at::empty({0}, opt);
  at::Tensor gb = bias_grad ? at::empty({V}, opt) : at::empty({0}, opt);
  if (N == 0 || V == 0) {  // no classes: as the split path's forward (m 0, log_s -inf); no rows: dW, db are 0
    m.zero_();
    log_s.fill_(-std::numeric_limits<double>::infinity());
    zy.zero_();
    gx.zero_();
    gw.zero_();
    gb.zero_();
    return {m, log_s, zy, zs, gx, gw, gb};
  }
  const Operands o = operands(input, linear_weight, linear_bias, weight, dtype);  // GEMMs in the input's dtype
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "linear_cross_entropy_fused_cpu", [&] {
    fused<scalar_t>(o, target.contiguous(), coef_p0, coef_lse, coef_y, coef_w, softcap, smooth, block_rows, m, log_s,
                    zy, zs, gx, gw, gb);
  });
  return {m, log_s, zy, zs, gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("linear_cross_entropy_partials", &partials_cpu);
  m.impl("linear_cross_entropy_dlogits", &dlogits_cpu);
  m.impl("linear_cross_entropy_fused", &fused_cpu);
}

}  // namespace pykernels

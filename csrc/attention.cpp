// Attention operators of the "cuda" backend: pykernels::attention_fwd / attention_bwd, the schemas of the Triton
// ops without the suffix (docs/attention.md), and their glue to the kernels in cuda/attention.cu. Only CUDA
// builds define them; pykernels/ops/attention.py registers their fakes and adds them to KERNELS["cuda"].
// The kernels take fp16/bf16, head dims up to 256, bool or float masks of dense calls (any broadcastable
// strides) and dropout (the Triton kernels' counter-based keep-mask, cuda/philox.h): the functional layer sends
// fp32 and larger head dims to the next backend, visibly (pykernels/functional/attention.py, _cuda_reason); a
// direct call of these ops with them raises, naming the argument.
#ifdef PYKERNELS_WITH_CUDA
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <utility>

#include "attention_args.h"
#include "cuda_check.h"
#include "dtype_of.h"
#include "cuda/attention.h"

namespace pykernels {
namespace {

constexpr const char* kFwd = "attention_fwd (cuda)";
constexpr const char* kBwd = "attention_bwd (cuda)";

DType attn_dtype(const at::Tensor& q, const char* op) {
  const auto d = dtype16_of(q.scalar_type());
  TORCH_CHECK(d, op, ": q must be float16 or bfloat16, got ", q.scalar_type());
  return *d;
}

// Last dimension contiguous (the tile loads read rows); anything else is copied once.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

AttnView view_of(const at::Tensor& t, bool varlen) {
  AttnView v;
  v.p = t.data_ptr();
  if (varlen) {  // (T, H, E): rows are dim 0
    v.sh = t.stride(1);
    v.sm = t.stride(0);
  } else {
    v.sb = t.stride(0);
    v.sh = t.stride(1);
    v.sm = t.stride(2);
  }
  return v;
}

// 16-byte tile loads need every row start aligned: the base and all strides but the last in 8-element steps.
bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t d = 0; d < t.dim() - 1; ++d) {
    if (t.stride(d) % 8) return false;
  }
  return true;
}

struct Call {
  AttentionArgs a;
  bool varlen = false;
  at::Tensor q, k, v;  // row-contiguous operands the args point into
  at::Tensor mask;     // the mask expanded to (B, H, L, S) (a view: broadcast dims have stride 0)
};

// The attn_mask of a dense call: bool (True = attend) or floating, broadcastable to the scores (B, H, L, S).
void set_mask(const char* op, Call& c, const at::Tensor& bias) {
  AttentionArgs& a = c.a;
  TORCH_CHECK(!c.varlen, op, ": bias (attn_mask) is not supported with cu_seqlens (varlen)");
  TORCH_CHECK(bias.device() == c.q.device(), op, ": bias must be on ", c.q.device(), ", got ", bias.device());
  if (bias.scalar_type() == at::kBool) {
    a.mask_bool = true;
  } else {
    const auto d = dtype_of(bias.scalar_type());
    TORCH_CHECK(d, op, ": bias must be bool or floating, got ", bias.scalar_type());
    a.mask_dtype = *d;
  }
  TORCH_CHECK(bias.dim() <= 4, op, ": bias must have at most 4 dims (B, H, L, S), got ", bias.dim());
  c.mask = bias.expand({a.B, a.H, a.L, a.S});  // raises, naming the shapes, when it does not broadcast
  a.mask = c.mask.data_ptr();
  a.mask_sb = c.mask.stride(0);
  a.mask_sh = c.mask.stride(1);
  a.mask_sm = c.mask.stride(2);
  a.mask_sn = c.mask.stride(3);
}

// Checks shared by the forward and the backward; fills the shapes and the masking fields of the args.
Call make_call(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& cu_q,
               const c10::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale, bool is_causal,
               int64_t diag, bool bottom_right, int64_t win_left, int64_t win_right, double softcap,
               double dropout_p, const c10::optional<at::Tensor>& seed) {
  Call c;
  c.a.dtype = attn_dtype(q_in, op);
  TORCH_CHECK(q_in.is_cuda(), op, ": q must be a CUDA tensor");
  for (const auto* t : {&k_in, &v_in}) {
    const char* name = t == &k_in ? "k" : "v";
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type() && t->device() == q_in.device(), op, ": ", name,
                " must be ", q_in.scalar_type(), " on ", q_in.device());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), op, ": pass both cu_seqlens_q and cu_seqlens_k, or neither");
  c.varlen = cu_q.has_value();
  const int64_t dims = c.varlen ? 3 : 4;
  TORCH_CHECK(q_in.dim() == dims && k_in.dim() == dims && v_in.dim() == dims, op, ": q, k, v must be ", dims,
              "-D, got ", q_in.dim(), ", ", k_in.dim(), ", ", v_in.dim());
  c.q = rows_contiguous(q_in);
  c.k = rows_contiguous(k_in);
  c.v = rows_contiguous(v_in);
  AttentionArgs& a = c.a;
  const int64_t hd = 1;  // the heads are dim 1 in both layouts: (B, H, L, E) and (T, H, E)
  a.H = c.q.size(hd);
  a.Hk = c.k.size(hd);
  a.E = c.q.size(-1);
  a.Ev = c.v.size(-1);
  TORCH_CHECK(a.Hk > 0 && a.H % a.Hk == 0, op, ": the query heads (", a.H, ") must be a multiple of the kv heads (",
              a.Hk, ")");
  TORCH_CHECK(c.v.size(hd) == a.Hk, op, ": v must have ", a.Hk, " heads like k, got ", c.v.size(hd));
  TORCH_CHECK(c.k.size(-1) == a.E, op, ": k must have q's head dim ", a.E, ", got ", c.k.size(-1));
  TORCH_CHECK(a.E >= 1, op, ": q's head dim must be at least 1");
  TORCH_CHECK(a.E <= cuda::kAttentionMaxHeadDim && a.Ev <= cuda::kAttentionMaxHeadDim, op,
              ": head dims up to ", cuda::kAttentionMaxHeadDim, ", got E = ", a.E, ", Ev = ", a.Ev);
  if (c.varlen) {
    for (const auto* cu : {&*cu_q, &*cu_k}) {
      const char* name = cu == &*cu_q ? "cu_seqlens_q" : "cu_seqlens_k";
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() >= 1 && cu->is_contiguous() &&
                      cu->device() == q_in.device(),
                  op, ": ", name, " must be a contiguous 1-D int32 tensor on ", q_in.device());
    }
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), op, ": cu_seqlens_q and cu_seqlens_k must have the same length");
    TORCH_CHECK(c.k.size(0) == c.v.size(0), op, ": k and v must have the same number of rows");
    TORCH_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be non-negative, got ", max_q,
                " and ", max_k);
    a.B = cu_q->numel() - 1;
    a.L = max_q;
    a.S = max_k;
    a.cu_q = cu_q->data_ptr<int32_t>();
    a.cu_k = cu_k->data_ptr<int32_t>();
  } else {
    a.B = c.q.size(0);
    a.L = c.q.size(2);
    a.S = c.k.size(2);
    TORCH_CHECK(c.k.size(0) == a.B && c.v.size(0) == a.B, op, ": k and v must have q's batch size ", a.B);
    TORCH_CHECK(c.v.size(2) == a.S, op, ": v must have k's length ", a.S, ", got ", c.v.size(2));
  }
  TORCH_CHECK(a.L < (int64_t(1) << 31) && a.S < (int64_t(1) << 31), op, ": sequence lengths must be below 2^31");
  a.rows_q = c.varlen ? c.q.size(0) : a.L;
  a.rows_k = c.varlen ? c.k.size(0) : a.S;
  a.q = view_of(c.q, c.varlen);
  a.k = view_of(c.k, c.varlen);
  a.v = view_of(c.v, c.varlen);
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.causal = is_causal;
  a.bottom_right = bottom_right && c.varlen;  // dense calls carry their alignment in diag already
  a.diag = diag;
  a.win_left = win_left;
  a.win_right = win_right;
  a.vec16 = a.E % 8 == 0 && a.Ev % 8 == 0 && aligned16(c.q) && aligned16(c.k) && aligned16(c.v);
  if (bias.has_value()) set_mask(op, c, *bias);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() >= 1 &&
                    seed->device() == q_in.device(),
                op, ": dropout needs seed, an int64 tensor on ", q_in.device());
    a.seed = seed->data_ptr<int64_t>();
    a.dropout_p = static_cast<float>(dropout_p);
    a.drop_rows = c.varlen ? c.q.size(0) : a.L;  // the Triton kernels' counter geometry (see attention_args.h)
    a.drop_cols = c.varlen ? c.k.size(0) : a.S;
  }
  return c;
}

void set_lse(AttentionArgs& a, const at::Tensor& lse, bool varlen) {
  // dense (B, H, L); varlen (H, T)
  a.lse_sb = varlen ? 0 : lse.stride(0);
  a.lse_sh = varlen ? lse.stride(0) : lse.stride(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, c10::SymInt max_q,
    c10::SymInt max_k, double scale, bool is_causal, c10::SymInt diag, bool bottom_right, c10::SymInt win_left,
    c10::SymInt win_right, double softcap, double dropout_p, const c10::optional<at::Tensor>& seed) {
  c10::cuda::CUDAGuard guard(q.device());
  Call c = make_call(kFwd, q, k, v, bias, cu_q, cu_k, max_q.expect_int(), max_k.expect_int(), scale, is_causal,
                     diag.expect_int(), bottom_right, win_left.expect_int(), win_right.expect_int(), softcap,
                     dropout_p, seed);
  AttentionArgs& a = c.a;
  at::Tensor out, lse;
  if (c.varlen) {  // padding rows past cu_seqlens_q[-1] belong to no block: 0 and -inf, as a row without keys
    out = at::zeros({c.q.size(0), a.H, a.Ev}, c.q.options());
    lse = at::full({a.H, c.q.size(0)}, -std::numeric_limits<float>::infinity(), c.q.options().dtype(at::kFloat));
  } else {
    out = at::empty({a.B, a.H, a.L, a.Ev}, c.q.options());
    lse = at::empty({a.B, a.H, a.L}, c.q.options().dtype(at::kFloat));
  }
  a.o = view_of(out, c.varlen);
  // varlen: zeros for the padding rows no block writes (0, as a row without keys)
  at::Tensor lse_lo = c.varlen ? at::zeros_like(lse) : at::empty_like(lse);
  a.lse = lse.data_ptr<float>();
  a.lse_lo = lse_lo.data_ptr<float>();
  set_lse(a, lse, c.varlen);
  if (lse.numel() > 0) check_cuda(cuda::attention_fwd(a, c10::cuda::getCurrentCUDAStream()), kFwd);
  return {out, lse, lse_lo};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& lse_lo,
    const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& cu_q, const c10::optional<at::Tensor>& cu_k, c10::SymInt max_q,
    c10::SymInt max_k, double scale, bool is_causal, c10::SymInt diag, bool bottom_right, c10::SymInt win_left,
    c10::SymInt win_right, double softcap, double dropout_p, const c10::optional<at::Tensor>& seed,
    bool bias_requires_grad) {
  c10::cuda::CUDAGuard guard(q.device());
  Call c = make_call(kBwd, q, k, v, bias, cu_q, cu_k, max_q.expect_int(), max_k.expect_int(), scale, is_causal,
                     diag.expect_int(), bottom_right, win_left.expect_int(), win_right.expect_int(), softcap,
                     dropout_p, seed);
  AttentionArgs& a = c.a;
  // the kernels index out, grad_out and lse by the shapes of q and v: a direct op call must match them exactly
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = a.Ev;
  const std::vector<int64_t> lse_shape =
      c.varlen ? std::vector<int64_t>{a.H, q.size(0)} : std::vector<int64_t>{a.B, a.H, a.L};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape) && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device(),
                kBwd, ": ", name, " must be ", q.scalar_type(), " of shape ", at::IntArrayRef(out_shape), " on ",
                q.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse},
                                {"lse_lo", lse_lo.has_value() ? &*lse_lo : nullptr}}) {
    if (!t) continue;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == at::IntArrayRef(lse_shape) &&
                    t->device() == q.device(),
                kBwd, ": ", name, " must be contiguous float32 of shape ", at::IntArrayRef(lse_shape), " on ",
                q.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  // The probabilities are exp(s - lse - lse_lo); the kernels recompute exp2(s log2(e) - offset) from lse alone and
  // take lse_lo through dO's rows: with r = exp(-lse_lo), dV = (r P~)^T dO = P~^T (r dO) and
  // dS = r P~ (dP - D) = P~ ((r dO) V^T - D(r dO)) (D = rowsum(dO O), linear in dO). r dO is formed in fp32 and
  // rounded once to dO's dtype, so where r << 1 (a row filled by a finfo.min mask: r = 1/S) a tiny 16-bit dO
  // underflows there (the Triton kernels apply lse_lo in fp32 instead: docs/attention.md).
  at::Tensor dout = grad_out;
  if (lse_lo.has_value()) {
    at::Tensor r = lse_lo->neg().exp();
    r = (c.varlen ? r.t() : r).unsqueeze(-1);  // varlen (H, T) -> (T, H, 1), the rows of grad_out (T, H, Ev)
    dout = at::empty_like(grad_out);
    at::mul_out(dout, grad_out, r);
  }
  dout = rows_contiguous(dout);
  // delta = rowsum(dO * O) in fp32, in the layout of lse (as the Triton launcher computes it)
  at::Tensor delta = dout.to(at::kFloat).mul(out.to(at::kFloat)).sum(-1);
  if (c.varlen) delta = delta.t();
  delta = delta.contiguous();
  // Gradients with the inputs' strides (the fakes' empty_like); the kernels write rows, so a gradient whose last
  // dim is not contiguous is computed in a row-contiguous buffer and copied.
  // varlen: zeros, for the padding rows past cu_seqlens[-1] that no block writes
  const auto like = [&](const at::Tensor& t) { return c.varlen ? at::zeros_like(t) : at::empty_like(t); };
  at::Tensor dq = like(q), dk = like(k), dv = like(v);
  at::Tensor dq_w = dq.stride(-1) == 1 ? dq : like(c.q);
  at::Tensor dk_w = dk.stride(-1) == 1 ? dk : like(c.k);
  at::Tensor dv_w = dv.stride(-1) == 1 ? dv : like(c.v);
  a.dout = view_of(dout, c.varlen);
  a.dq = view_of(dq_w, c.varlen);
  a.dk = view_of(dk_w, c.varlen);
  a.dv = view_of(dv_w, c.varlen);
  a.vec16 = a.vec16 && aligned16(dout);
  a.lse = const_cast<float*>(lse.data_ptr<float>());
  a.delta = delta.data_ptr<float>();
  set_lse(a, lse, c.varlen);
  // the float mask's gradient over the full scores, then summed over its broadcast dims (as the Triton launcher)
  const bool want_dmask = bias_requires_grad && bias.has_value() && !a.mask_bool;
  at::Tensor dmask_full;
  if (want_dmask) {
    dmask_full = at::zeros({a.B, a.H, a.L, a.S}, q.options().dtype(at::kFloat));
    a.dmask = dmask_full.data_ptr<float>();
  }
  if (q.numel() == 0) {  // no query: no gradient reaches k and v
    dk_w.zero_();
    dv_w.zero_();
  } else if (dq.numel() > 0) {
    check_cuda(cuda::attention_bwd(a, c10::cuda::getCurrentCUDAStream()), kBwd);
  }
  for (auto [dst, src] : {std::pair<at::Tensor*, at::Tensor*>{&dq, &dq_w}, {&dk, &dk_w}, {&dv, &dv_w}}) {
    if (!dst->is_same(*src)) dst->copy_(*src);
  }
  if (want_dmask) return {dq, dk, dv, dmask_full.sum_to_size(bias->sizes()).to(bias->scalar_type())};
  return {dq, dk, dv, q.new_empty({0})};  // no float mask gradient: the fake's empty of q's dtype
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool is_causal, SymInt diag, bool bottom_right, "
        "SymInt win_left, SymInt win_right, float softcap, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? lse_lo, "
        "Tensor? bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
        "float scale, bool is_causal, SymInt diag, bool bottom_right, SymInt win_left, SymInt win_right, "
        "float softcap, float dropout_p, Tensor? seed, bool bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace pykernels
#endif  // PYKERNELS_WITH_CUDA

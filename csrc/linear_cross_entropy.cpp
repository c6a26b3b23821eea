// The fused linear cross-entropy kernel ops pykernels::linear_cross_entropy_partials and
// pykernels::linear_cross_entropy_dlogits, the two kernels behind the launch logic that the Triton, CUDA and CPU
// backends share (pykernels/ops/linear_cross_entropy_launch.py; contract: docs/linear_cross_entropy.md): their
// schemas, the argument checks of both implementations, and the glue to cuda/linear_cross_entropy.cu (CUDA builds;
// the CPU kernels are cpu/linear_cross_entropy.cpp). pykernels/ops/linear_cross_entropy.py registers their fakes
// and builds KERNELS["cuda"] / KERNELS["cpu"]. The CUDA kernels take fp16/bf16 only (the functional layer sends
// fp32 calls to the next backend, visibly); a direct call with anything else raises, naming the argument.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "linear_cross_entropy.h"
#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/linear_cross_entropy.h"
#include "cuda_check.h"
#include "dtype_of.h"
#include "linear_cross_entropy_args.h"
#endif

namespace pykernels {

namespace {

void check_vector(const at::Tensor& t, const char* op, const char* name, int64_t n, at::ScalarType dtype,
                  const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.device() == like.device(),
              op, ": ", name, " must be a contiguous (", n, ",) ", dtype, " tensor on ", like.device(), ", got ",
              t.scalar_type(), " of shape ", t.sizes());
}

}  // namespace

void check_lce_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_vector(t, op, name, x.size(0), acc_type(x.scalar_type()), x);
}

void check_lce_operands(const char* op, const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                        const c10::optional<at::Tensor>& weight, double softcap) {
  // (a row of one element is contiguous whatever its stride: torch keeps (N, 1) views' strides)
  TORCH_CHECK(x.dim() == 2 && (x.stride(1) == 1 || x.size(1) <= 1), op,
              ": input must be (N, H) with contiguous rows, got shape ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(w.dim() == 2 && (w.stride(1) == 1 || w.size(1) <= 1) && w.size(1) == x.size(1) &&
                  w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              op, ": linear_weight must be (V, ", x.size(1), ") ", x.scalar_type(), " with contiguous rows on ",
              x.device(), ", got ", w.scalar_type(), " of shape ", w.sizes());
  TORCH_CHECK(w.size(0) < std::numeric_limits<int32_t>::max(), op, ": linear_weight has ", w.size(0),
              " rows; the kernels take fewer than 2^31 - 1 classes per shard");
  check_vector(target, op, "target", x.size(0), at::kLong, x);
  if (bias.has_value()) check_vector(*bias, op, "linear_bias", w.size(0), x.scalar_type(), x);
  if (weight.has_value()) check_vector(*weight, op, "weight", w.size(0), acc_type(x.scalar_type()), x);
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be >= 0, got ", softcap);
}

void check_lce_dlogits(const char* op, const at::Tensor& x, int64_t V, const at::Tensor& m, const at::Tensor& log_s,
                       const at::Tensor& coef_p, const at::Tensor& coef_y, const at::Tensor& coef_w, bool smooth,
                       int64_t col0, const at::Tensor& dl, const c10::optional<at::Tensor>& db_part,
                       int64_t db_rows, bool acc_dl) {
  const int64_t N = x.size(0);
  const auto acc = acc_type(x.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&m, "m"}, {&log_s, "log_s"},
                                {&coef_p, "coef_p"}, {&coef_y, "coef_y"}}) {
    check_lce_row_vector(op, name, *t, x);
  }
  if (smooth) check_lce_row_vector(op, "coef_w", coef_w, x);
  TORCH_CHECK(dl.dim() == 2 && dl.size(0) == N && dl.stride(1) == 1 &&
                  (dl.scalar_type() == x.scalar_type() || (acc_dl && dl.scalar_type() == acc)) &&
                  dl.device() == x.device(),
              op, ": dl must be (", N, ", n_cols) ", x.scalar_type(), (acc_dl ? " or " : ""),
              (acc_dl ? c10::toString(acc) : ""), " with contiguous rows, got ", dl.scalar_type(), " of shape ",
              dl.sizes(), " strides ", dl.strides());
  TORCH_CHECK(col0 >= 0 && col0 + dl.size(1) <= V, op, ": columns [", col0, ", ", col0 + dl.size(1),
              ") are outside the ", V, " classes of linear_weight");
  if (db_part.has_value()) {
    const int64_t blocks = (N + db_rows - 1) / db_rows;
    TORCH_CHECK(db_part->dim() == 2 && db_part->size(0) >= blocks && db_part->size(1) == dl.size(1) &&
                    db_part->stride(1) == 1 && db_part->scalar_type() == acc && db_part->device() == x.device(),
                op, ": db_part must be ", acc, " (>= ", blocks, ", ", dl.size(1), ") with contiguous rows, got ",
                db_part->scalar_type(), " of shape ", db_part->sizes());
  }
}

#ifdef PYKERNELS_WITH_CUDA
namespace {

constexpr const char* kPartials = "linear_cross_entropy_partials (cuda)";
constexpr const char* kDlogits = "linear_cross_entropy_dlogits (cuda)";

bool rows_aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0;
}

// Checks shared by both kernels; fills the operand fields of the args. `target` is kept alive by the caller.
LinearCrossEntropyArgs make_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                 const c10::optional<at::Tensor>& weight, int64_t vocab_start, double softcap,
                                 bool smooth) {
  LinearCrossEntropyArgs a;
  TORCH_CHECK(x.is_cuda(), op, ": input must be a CUDA tensor");
  const auto d = dtype16_of(x.scalar_type());
  TORCH_CHECK(d, op, ": input must be float16 or bfloat16, got ", x.scalar_type());
  a.dtype = *d;
  check_lce_operands(op, x, w, bias, target, weight, softcap);
  a.N = x.size(0);
  a.H = x.size(1);
  a.V = w.size(0);
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.target = target.data_ptr<int64_t>();
  a.class_weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  a.sx = x.stride(0);
  a.sw = w.stride(0);
  a.vocab_start = vocab_start;
  a.softcap = static_cast<float>(softcap);
  a.smooth = smooth;
  a.vec16 = a.H % 8 == 0 && rows_aligned16(x) && rows_aligned16(w);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> partials_cuda(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t vocab_start, double softcap,
    bool smooth, int64_t splits) {
  c10::cuda::CUDAGuard guard(input.device());
  LinearCrossEntropyArgs a =
      make_args(kPartials, input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth);
  TORCH_CHECK(splits >= 1, kPartials, ": splits must be >= 1, got ", splits);
  const auto f32 = input.options().dtype(at::kFloat);
  at::Tensor mp = at::empty({splits, a.N}, f32), sp = at::empty({splits, a.N}, f32);
  at::Tensor zyp = at::empty({splits, a.N}, f32), zsp = at::empty({smooth ? splits : 0, a.N}, f32);
  a.m_part = mp.data_ptr<float>();
  a.s_part = sp.data_ptr<float>();
  a.zy_part = zyp.data_ptr<float>();
  a.zs_part = smooth ? zsp.data_ptr<float>() : nullptr;
  a.splits = splits;
  if (a.N > 0) check_cuda(cuda::linear_cross_entropy_partials(a, c10::cuda::getCurrentCUDAStream()), kPartials);
  return {mp, sp, zyp, zsp};
}

void dlogits_cuda(const at::Tensor& input, const at::Tensor& linear_weight,
                  const c10::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                  const c10::optional<at::Tensor>& weight, const at::Tensor& m, const at::Tensor& log_s,
                  const at::Tensor& coef_p, const at::Tensor& coef_y, const at::Tensor& coef_w, int64_t vocab_start,
                  double softcap, bool smooth, int64_t col0, const at::Tensor& dl,
                  const c10::optional<at::Tensor>& db_part) {
  c10::cuda::CUDAGuard guard(input.device());
  LinearCrossEntropyArgs a =
      make_args(kDlogits, input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth);
  check_lce_dlogits(kDlogits, input, a.V, m, log_s, coef_p, coef_y, coef_w, smooth, col0, dl, db_part,
                    cuda::kLinearCrossEntropyBlockRows);
  a.col0 = col0;
  a.n_cols = dl.size(1);
  if (db_part.has_value()) {
    a.db_part = db_part->data_ptr<float>();
    a.ldb = db_part->stride(0);
  }
  a.m = m.data_ptr<float>();
  a.log_s = log_s.data_ptr<float>();
  a.coef_p = coef_p.data_ptr<float>();
  a.coef_y = coef_y.data_ptr<float>();
  a.coef_w = smooth ? coef_w.data_ptr<float>() : nullptr;
  a.dl = dl.data_ptr();
  a.ldl = dl.stride(0);
  if (a.N > 0 && a.n_cols > 0) {
    check_cuda(cuda::linear_cross_entropy_dlogits(a, c10::cuda::getCurrentCUDAStream()), kDlogits);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("linear_cross_entropy_partials", &partials_cuda);
  m.impl("linear_cross_entropy_dlogits", &dlogits_cuda);
}

#endif  // PYKERNELS_WITH_CUDA

TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def("linear_cross_entropy_partials(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
        "Tensor? weight, int vocab_start, float softcap, bool smooth, int splits) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("linear_cross_entropy_dlogits(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
        "Tensor? weight, Tensor m, Tensor log_s, Tensor coef_p, Tensor coef_y, Tensor coef_w, int vocab_start, "
        "float softcap, bool smooth, int col0, Tensor(a!) dl, Tensor(b!)? db_part) -> ()");
  // CPU only (csrc/cpu/linear_cross_entropy.cpp): the fused path's forward, which also writes the gradients
  m.def("linear_cross_entropy_fused(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
        "Tensor? weight, Tensor coef_p0, Tensor coef_lse, Tensor coef_y, Tensor coef_w, float softcap, bool smooth, "
        "int block_rows, bool input_grad, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
}

}  // namespace pykernels

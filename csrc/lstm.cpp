// LSTM operators (cell and sequence): schemas, argument checks, and the CUDA implementation's glue. Contract: docs/lstm.md.
// The CPU kernels are in cpu/lstm.cpp, the CUDA ones in cuda/lstm.cu.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers, not ATen/ATen.h (half of the compile time)
#include "lstm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_check.h"
#include "dtype_of.h"
#include "cuda/lstm.h"
#endif

namespace pykernels {

static void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "lstm_cell: ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "lstm_cell: ", name, " must be on ", input.device(), ", got ",
              t.device());
}

void check_lstm_cell_fwd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                         const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                         const c10::optional<at::Tensor>& b_hh) {
  const auto t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "lstm_cell: input must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(input.dim() == 2, "lstm_cell: input must be 2-D (B, I), got ", input.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(1) == input.size(1) && w_ih.size(0) % 4 == 0,
              "lstm_cell: w_ih must have shape (4*H, ", input.size(1), "), got ", w_ih.sizes());
  const int64_t B = input.size(0), H = w_ih.size(0) / 4;
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, "lstm_cell: w_hh must have shape (",
              4 * H, ", ", H, "), got ", w_hh.sizes());
  TORCH_CHECK(hx.dim() == 2 && hx.size(0) == B && hx.size(1) == H, "lstm_cell: hx must have shape (", B, ", ", H,
              "), got ", hx.sizes());
  TORCH_CHECK(cx.dim() == 2 && cx.size(0) == B && cx.size(1) == H, "lstm_cell: cx must have shape (", B, ", ", H,
              "), got ", cx.sizes());
  check_same(hx, "hx", input);
  check_same(cx, "cx", input);
  check_same(w_ih, "w_ih", input);
  check_same(w_hh, "w_hh", input);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "lstm_cell: pass both b_ih and b_hh, or neither");
  if (b_ih.has_value()) {
    for (const auto* b : {&*b_ih, &*b_hh}) {
      const char* name = b == &*b_ih ? "b_ih" : "b_hh";
      check_same(*b, name, input);
      TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * H, "lstm_cell: ", name, " must have shape (", 4 * H,
                  "), got ", b->sizes());
    }
  }
}

void check_lstm_cell_bwd(const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c,
                         const at::Tensor& cx, const at::Tensor& ws) {
  TORCH_CHECK(cx.dim() == 2, "lstm_cell_bwd: cx must be 2-D (B, H), got ", cx.dim(), "-D");
  const int64_t B = cx.size(0), H = cx.size(1);
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) == B && ws.size(1) == 5 * H && ws.is_contiguous(),
              "lstm_cell_bwd: ws must be contiguous of shape (", B, ", ", 5 * H, "), got ", ws.sizes());
  TORCH_CHECK(ws.scalar_type() == acc_type(cx.scalar_type()), "lstm_cell_bwd: ws must be ",
              acc_type(cx.scalar_type()), ", got ", ws.scalar_type());
  TORCH_CHECK(ws.device() == cx.device(), "lstm_cell_bwd: ws must be on ", cx.device());
  for (const auto* g : {&grad_h, &grad_c}) {
    if (!g->has_value()) continue;
    const char* name = g == &grad_h ? "grad_h" : "grad_c";
    TORCH_CHECK((*g)->sizes() == cx.sizes(), "lstm_cell_bwd: ", name, " must have shape ", cx.sizes(), ", got ",
                (*g)->sizes());
    TORCH_CHECK((*g)->scalar_type() == cx.scalar_type() && (*g)->device() == cx.device(), "lstm_cell_bwd: ", name,
                " must be ", cx.scalar_type(), " on ", cx.device());
  }
}

static void check_state(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like,
                        int64_t B, int64_t H) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == H, op, ": ", name, " must have shape (", B, ", ", H,
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, ": ", name, " must be ",
              like.scalar_type(), " on ", like.device(), ", got ", t.scalar_type(), " on ", t.device());
}

void check_lstm_layer_fwd(const at::Tensor& xproj, const at::Tensor& w_hh, const at::Tensor& h0,
                          const at::Tensor& c0) {
  const char* op = "lstm_layer_fwd";
  const auto t = h0.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": h0 must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(h0.dim() == 2, op, ": h0 must be 2-D (B, H), got ", h0.dim(), "-D");
  const int64_t B = h0.size(0), H = h0.size(1);
  TORCH_CHECK(xproj.dim() == 3 && xproj.size(1) == B && xproj.size(2) == 4 * H, op, ": xproj must have shape (T, ",
              B, ", ", 4 * H, "), got ", xproj.sizes());
  TORCH_CHECK(xproj.scalar_type() == acc_type(t) && xproj.device() == h0.device(), op, ": xproj must be ",
              acc_type(t), " on ", h0.device(), " (the accumulation dtype of ", t, "), got ", xproj.scalar_type());
  check_state(c0, op, "c0", h0, B, H);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, op, ": w_hh must have shape (", 4 * H,
              ", ", H, "), got ", w_hh.sizes());
  TORCH_CHECK(w_hh.scalar_type() == t && w_hh.device() == h0.device(), op, ": w_hh must be ", t, " on ",
              h0.device());
}

at::Tensor check_lstm_layer_bwd(const c10::optional<at::Tensor>& grad_out, const c10::optional<at::Tensor>& grad_hn,
                                const c10::optional<at::Tensor>& grad_cn, const at::Tensor& c0, const at::Tensor& ws,
                                const at::Tensor& w_hh) {
  const char* op = "lstm_layer_bwd";
  TORCH_CHECK(c0.dim() == 2, op, ": c0 must be 2-D (B, H), got ", c0.dim(), "-D");
  const int64_t B = c0.size(0), H = c0.size(1);
  TORCH_CHECK(ws.dim() == 3 && ws.size(1) == B && ws.size(2) == 5 * H, op, ": ws must have shape (T, ", B, ", ",
              5 * H, "), got ", ws.sizes());
  TORCH_CHECK(ws.scalar_type() == acc_type(c0.scalar_type()) && ws.device() == c0.device(), op, ": ws must be ",
              acc_type(c0.scalar_type()), " on ", c0.device(), ", got ", ws.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, op, ": w_hh must have shape (", 4 * H,
              ", ", H, "), got ", w_hh.sizes());
  TORCH_CHECK(w_hh.scalar_type() == c0.scalar_type() && w_hh.device() == c0.device(), op, ": w_hh must be ",
              c0.scalar_type(), " on ", c0.device());
  if (grad_out.has_value()) {
    TORCH_CHECK(grad_out->dim() == 3 && grad_out->size(0) == ws.size(0) && grad_out->size(1) == B &&
                    grad_out->size(2) == H,
                op, ": grad_out must have shape (", ws.size(0), ", ", B, ", ", H, "), got ", grad_out->sizes());
    TORCH_CHECK(grad_out->scalar_type() == c0.scalar_type() && grad_out->device() == c0.device(), op,
                ": grad_out must be ", c0.scalar_type(), " on ", c0.device());
  }
  if (grad_hn.has_value()) check_state(*grad_hn, op, "grad_hn", c0, B, H);
  if (grad_cn.has_value()) check_state(*grad_cn, op, "grad_cn", c0, B, H);
  return ws.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_outputs(const c10::optional<at::Tensor>& grad_hn,
                                                                      const c10::optional<at::Tensor>& grad_cn,
                                                                      const at::Tensor& ws) {
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 5;
  const auto start = [&](const c10::optional<at::Tensor>& g) {
    return g.has_value() ? g->to(ws.scalar_type()).contiguous().clone() : at::zeros({B, H}, ws.options());
  };
  return {at::empty({T, B, 4 * H}, ws.options()), start(grad_hn), start(grad_cn)};
}

TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def("lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("lstm_cell_bwd(Tensor? grad_h, Tensor? grad_c, Tensor cx, Tensor ws) -> (Tensor, Tensor)");
  // The cell's whole backward (CPU only): the gate gradients and dcx of lstm_cell_bwd, then dx = dg W_ih, dhx = dg W_hh,
  // dw_ih = dg^T input, dw_hh = dg^T hx, db = column sums of dg, in the input's dtype; unrequested ones are empty.
  m.def("lstm_cell_grads(Tensor? grad_h, Tensor? grad_c, Tensor cx, Tensor ws, Tensor input, Tensor hx, Tensor w_ih, "
        "Tensor w_hh, bool input_grad, bool hx_grad, bool w_ih_grad, bool w_hh_grad, bool bias_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One layer direction's recurrence: CPU (cpu/lstm_layer.cpp, kernels in cpu/lstm_layer_kernels.h) and CUDA
  // (cuda/lstm_layer.cu, persistent) kernels. Same contract as the Triton ops.
  m.def("lstm_layer_fwd(Tensor xproj, Tensor w_hh, Tensor h0, Tensor c0, bool reverse) -> (Tensor, Tensor)");
  m.def("lstm_layer_bwd(Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, Tensor c0, Tensor ws, Tensor w_hh, "
        "bool reverse) -> (Tensor, Tensor, Tensor)");
}

#ifdef PYKERNELS_WITH_CUDA
namespace {

DType lstm_dtype(at::ScalarType t) {
  const auto d = dtype_of(t);
  TORCH_CHECK(d && *d != DType::F64, "lstm (cuda): dtype must be float32, float16 or bfloat16, got ", t);
  return *d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                        const at::Tensor& cx, const at::Tensor& w_ih,
                                                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                        const c10::optional<at::Tensor>& b_hh) {
  check_lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x = input.contiguous(), h = hx.contiguous(), c = cx.contiguous(), wi = w_ih.contiguous(),
             wh = w_hh.contiguous();
  at::Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::Tensor(),
             bh = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
  LstmCellArgs a;
  a.dtype = lstm_dtype(x.scalar_type());
  a.B = x.size(0);
  a.I = x.size(1);
  a.H = h.size(1);
  at::Tensor hy = at::empty({a.B, a.H}, x.options()), cy = at::empty({a.B, a.H}, x.options());
  at::Tensor ws = at::empty({a.B, 5 * a.H}, x.options().dtype(at::kFloat));
  a.x = x.data_ptr();
  a.hx = h.data_ptr();
  a.cx = c.data_ptr();
  a.w_ih = wi.data_ptr();
  a.w_hh = wh.data_ptr();
  a.b_ih = bi.defined() ? bi.data_ptr() : nullptr;
  a.b_hh = bh.defined() ? bh.data_ptr() : nullptr;
  a.hy = hy.data_ptr();
  a.cy = cy.data_ptr();
  a.ws = ws.data_ptr<float>();
  if (a.B > 0 && a.H > 0) check_cuda(cuda::lstm_cell_fwd(a, c10::cuda::getCurrentCUDAStream()), "lstm_cell_fwd");
  return {hy, cy, ws};
}

std::tuple<at::Tensor, at::Tensor> bwd_cuda(const c10::optional<at::Tensor>& grad_h,
                                            const c10::optional<at::Tensor>& grad_c, const at::Tensor& cx,
                                            const at::Tensor& ws) {
  check_lstm_cell_bwd(grad_h, grad_c, cx, ws);
  c10::cuda::CUDAGuard guard(cx.device());
  at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  at::Tensor gc = grad_c.has_value() ? grad_c->contiguous() : at::Tensor();
  at::Tensor c = cx.contiguous();
  LstmCellBwdArgs a;
  a.dtype = lstm_dtype(c.scalar_type());
  a.B = c.size(0);
  a.H = c.size(1);
  at::Tensor dg = at::empty({a.B, 4 * a.H}, c.options().dtype(at::kFloat));
  at::Tensor dcx = at::empty({a.B, a.H}, c.options());
  a.grad_h = gh.defined() ? gh.data_ptr() : nullptr;
  a.grad_c = gc.defined() ? gc.data_ptr() : nullptr;
  a.cx = c.data_ptr();
  a.ws = ws.data_ptr<float>();
  a.dgates = dg.data_ptr<float>();
  a.dcx = dcx.data_ptr();
  if (a.B > 0 && a.H > 0) check_cuda(cuda::lstm_cell_bwd(a, c10::cuda::getCurrentCUDAStream()), "lstm_cell_bwd");
  return {dg, dcx};
}

LstmLayerArgs layer_args(const at::Tensor& w_hh, int64_t T, int64_t B, int64_t H, bool reverse,
                         at::Tensor& barrier) {
  LstmLayerArgs a;
  a.dtype = lstm_dtype(w_hh.scalar_type());
  a.T = T;
  a.B = B;
  a.H = H;
  a.reverse = reverse;
  barrier = at::zeros({1}, w_hh.options().dtype(at::kInt));
  a.barrier = reinterpret_cast<unsigned int*>(barrier.data_ptr<int32_t>());
  return a;
}

// A hidden size whose W_hh slice does not fit in the blocks' shared memory needs the streamed kernel, which the
// launcher refuses (csrc/cuda/lstm_layer.cu launch): a RuntimeError that says so, before any other error.
void check_resident(cudaError_t err, const cuda::LstmLayerPlanInfo& plan, const char* op, int64_t H,
                    at::ScalarType dtype) {
  TORCH_CHECK(err != cudaErrorNotSupported || plan.resident, op, " (cuda): W_hh of hidden size ", H, " (", dtype,
              ") does not fit in the blocks' shared memory, and the streamed kernel is disabled (it crashed on its "
              "one GPU run); use the triton backend, or torch's nn.LSTM");
}

std::tuple<at::Tensor, at::Tensor> layer_fwd_cuda(const at::Tensor& xproj, const at::Tensor& w_hh,
                                                  const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  check_lstm_layer_fwd(xproj, w_hh, h0, c0);
  c10::cuda::CUDAGuard guard(h0.device());
  const int64_t T = xproj.size(0), B = xproj.size(1), H = h0.size(1);
  at::Tensor xp = xproj.contiguous(), w = w_hh.contiguous(), h = h0.contiguous(), c = c0.contiguous(), barrier;
  at::Tensor out = at::empty({T, B, H}, h0.options()), ws = at::empty({T, B, 5 * H}, xproj.options());
  LstmLayerArgs a = layer_args(w, T, B, H, reverse, barrier);
  a.xproj = xp.data_ptr<float>();
  a.w_hh = w.data_ptr();
  a.h0 = h.data_ptr();
  a.c0 = c.data_ptr();
  a.out = out.data_ptr();
  a.ws = ws.data_ptr<float>();
  cuda::LstmLayerPlanInfo plan;
  const cudaError_t err = cuda::lstm_layer_fwd(a, c10::cuda::getCurrentCUDAStream(), &plan);
  // the one size the plan refuses (csrc/cuda/lstm_layer.cu plan_for), named instead of "invalid argument"
  TORCH_CHECK(plan.max_hidden == 0 || H <= plan.max_hidden, "lstm_layer_fwd: hidden size ", H,
              " exceeds the CUDA kernel's limit ", plan.max_hidden, " on this GPU for ", h0.scalar_type(),
              " (a batch chunk of h in shared memory)");
  check_resident(err, plan, "lstm_layer_fwd", H, h0.scalar_type());
  check_cuda(err, "lstm_layer_fwd");
  return {out, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_bwd_cuda(const c10::optional<at::Tensor>& grad_out,
                                                              const c10::optional<at::Tensor>& grad_hn,
                                                              const c10::optional<at::Tensor>& grad_cn,
                                                              const at::Tensor& c0, const at::Tensor& ws,
                                                              const at::Tensor& w_hh, bool reverse) {
  const at::Tensor wsc = check_lstm_layer_bwd(grad_out, grad_hn, grad_cn, c0, ws, w_hh);
  c10::cuda::CUDAGuard guard(c0.device());
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 5;
  at::Tensor w = w_hh.contiguous(), c = c0.contiguous(), barrier;
  at::Tensor go = grad_out.has_value() ? grad_out->contiguous() : at::Tensor();
  auto [dg, dh, dc] = lstm_layer_bwd_outputs(grad_hn, grad_cn, ws);
  LstmLayerArgs a = layer_args(w, T, B, H, reverse, barrier);
  a.w_hh = w.data_ptr();
  a.c0 = c.data_ptr();
  a.ws = wsc.data_ptr<float>();
  a.grad_out = go.defined() ? go.data_ptr() : nullptr;
  a.dgates = dg.data_ptr<float>();
  a.dh = dh.data_ptr<float>();
  a.dc = dc.data_ptr<float>();
  cuda::LstmLayerPlanInfo plan;
  const cudaError_t err = cuda::lstm_layer_bwd(a, c10::cuda::getCurrentCUDAStream(), &plan);
  check_resident(err, plan, "lstm_layer_bwd", H, w_hh.scalar_type());
  check_cuda(err, "lstm_layer_bwd");
  return {dg, dh, dc};
}

// Host only, no GPU needed: lets the Python dispatcher send a hidden size the kernel would refuse to the next backend
// (pykernels/functional/lstm.py), for this GPU's geometry or any other.
bool layer_resident(int64_t H, at::ScalarType dtype, bool forward, int64_t sms, int64_t smem_max) {
  return cuda::lstm_layer_resident(lstm_dtype(dtype), H, forward, static_cast<int>(sms), static_cast<int>(smem_max));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykernels, m) {
  m.def("lstm_layer_resident(int H, ScalarType dtype, bool forward, int sms, int smem_max) -> bool", &layer_resident);
}

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("lstm_cell_fwd", &fwd_cuda);
  m.impl("lstm_cell_bwd", &bwd_cuda);
  m.impl("lstm_layer_fwd", &layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &layer_bwd_cuda);
}
#endif

}  // namespace pykernels

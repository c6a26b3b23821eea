// The dtype in which the CPU kernels run a GEMM on 16-bit operands (converted once, result rounded once): float32
// for float16 (torch's CPU fp16 GEMMs measured 5-100x slower than fp32 ones on an AVX512-BF16 CPU) and for bfloat16
// where oneDNN has no bf16 GEMM on this CPU (no AVX512-BF16 / AMX: torch's bf16 GEMMs then take a generic loop,
// measured 5-35x slower than fp32 ones on an AVX2-only AMD EPYC). Python's twin: pykernels/_native.py gemm_dtype,
// on its ONEDNN_DTYPES; both ask torch's own test, mkldnn::_is_mkldnn_bf16_supported.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace pykernels {

inline bool onednn_has_bf16() {
  static const bool has = [] {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return op.has_value() && op->typed<bool()>().call();
  }();
  return has;
}

inline at::ScalarType cpu_gemm_dtype(at::ScalarType t) {
  return t == at::kHalf || (t == at::kBFloat16 && !onednn_has_bf16()) ? at::kFloat : t;
}

}  // namespace pykernels

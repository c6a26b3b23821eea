// The CPU kernels' dispatch on the dtype of their argument structs (torch-free, as AT_DISPATCH is on a tensor's).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../dtype.h"

namespace pykernels {
namespace {

// f(T{}) with T the C++ type of d: float, c10::Half, c10::BFloat16, and double unless kDouble is false (then an F64
// call does nothing: a library that holds no fp64 kernels is never handed one).
template <bool kDouble = true, typename F>
inline void visit_dtype(DType d, const F& f) {
  switch (d) {
    case DType::F32: return f(float{});
    case DType::F16: return f(c10::Half{});
    case DType::BF16: return f(c10::BFloat16{});
    case DType::F64:
      if constexpr (kDouble) f(double{});
      return;
  }
}

}  // namespace
}  // namespace pykernels

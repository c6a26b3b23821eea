// at::ScalarType -> DType for the C++ glue of every op (not for .cu files: torch headers). Each op checks the result
// against the dtypes its kernels take and raises its own message.
#pragma once
#include <c10/core/ScalarType.h>

#include <optional>

#include "dtype.h"

namespace pykernels {

// The DType of t, or nothing if no kernel takes it.
inline std::optional<DType> dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: return std::nullopt;
  }
}

// dtype_of(t) if it is F16 or BF16 (the tensor-core kernels' inputs).
inline std::optional<DType> dtype16_of(at::ScalarType t) {
  const auto d = dtype_of(t);
  return d == DType::F16 || d == DType::BF16 ? d : std::nullopt;
}

}  // namespace pykernels

// The accumulation dtype of every op family: float64 for float64 inputs, else float32 (the dtype of the per-row
// statistics, workspaces, class weights and gate gradients). One definition for the CPU and CUDA glue of all ops.
#pragma once
#include <c10/core/ScalarType.h>

namespace pykernels {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace pykernels

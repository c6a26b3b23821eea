// The status of a CUDA launcher as a Python exception naming the op: shared by the .cpp glue of the CUDA ops
// (cross_entropy.cpp, lstm.cpp, attention.cpp). Included by CUDA builds only.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace pykernels {

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

}  // namespace pykernels

// The element dtypes of the kernels' argument structs, and the host/device marker of code shared with .cu files.
// No torch headers: the CUDA sources include this (dtype_of.h maps a tensor's ScalarType to it in the glue).
#pragma once

#ifdef __CUDACC__
#define PYKERNELS_HD __host__ __device__
#else
#define PYKERNELS_HD
#endif

namespace pykernels {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

}  // namespace pykernels

// Launchers of the CUDA cross-entropy kernels (csrc/cuda/cross_entropy.cu). No torch headers here.
#pragma once
#include <cuda_runtime.h>

#include "../cross_entropy_args.h"

namespace pykernels {
namespace cuda {

// Forward: loss and lse of every row, and the gradient when a.grad is set. One read of each row from HBM;
// the gradient pass re-reads it from L2.
cudaError_t cross_entropy_fwd(const CrossEntropyArgs& a, cudaStream_t stream);
// Hopper path of cross_entropy_fwd with the gradient: one thread-block cluster per row, the row held in shared
// memory (cross_entropy_cluster.cu). Returns false when it does not apply (then nothing was launched).
bool cross_entropy_fwd_cluster(const CrossEntropyArgs& a, cudaStream_t stream, cudaError_t* err);
// Backward: the gradient from a.lse_in, scaled by a.scale. One read, one write.
cudaError_t cross_entropy_bwd(const CrossEntropyArgs& a, cudaStream_t stream);
// grad (rows x C*D contiguous, row r = n*D + d) *= scale[r]; returns on the device when scale is exactly 1.
cudaError_t cross_entropy_scale_grad(void* grad, DType dtype, int64_t N, int64_t C, int64_t D, const float* scale,
                                     int64_t scale_numel, cudaStream_t stream);

}  // namespace cuda
}  // namespace pykernels

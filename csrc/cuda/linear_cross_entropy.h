// Launchers of the CUDA fused linear cross-entropy kernels (csrc/cuda/linear_cross_entropy.cu). No torch headers.
#pragma once
#include <cuda_runtime.h>

#include "../linear_cross_entropy_args.h"

namespace pykernels {
namespace cuda {

// Token rows per block of both kernels: the bias partials of the backward have one row per block of this many.
constexpr int64_t kLinearCrossEntropyBlockRows = 128;
// Vocabulary columns per tile: the forward's splits own whole tiles.
constexpr int64_t kLinearCrossEntropyBlockCols = 128;

// Forward partials: block (token block, split) folds its tiles of logits into per-row (max, sum-exp, z_y, z_s).
cudaError_t linear_cross_entropy_partials(const LinearCrossEntropyArgs& a, cudaStream_t stream);
// One chunk of dlogits (recomputed logits), with the bias gradient's per-block column sums when a.db_part is set.
cudaError_t linear_cross_entropy_dlogits(const LinearCrossEntropyArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace pykernels

// Launchers of the CUDA attention kernels (csrc/cuda/attention.cu). No torch headers here.
#pragma once
#include <cuda_runtime.h>

#include "../attention_args.h"

namespace pykernels {
namespace cuda {

// Largest head dim (E and Ev) the kernels take; larger ones run on another backend.
constexpr int64_t kAttentionMaxHeadDim = 256;

// FlashAttention-2 forward on mma.sync tensor cores (sm_80+): out and the fp32 lse. fp16 / bf16.
cudaError_t attention_fwd(const AttentionArgs& a, cudaStream_t stream);
// Backward from the lse (a.delta precomputed): dK/dV per key block over its GQA group's query heads, then dQ
// per query block; every gradient element written once, no atomics (deterministic).
cudaError_t attention_bwd(const AttentionArgs& a, cudaStream_t stream);

// Hopper kernels (wgmma; attention_sm90a.cu, attention_bwd_sm90a.cu): true when the binary loaded for the current
// device is the sm_90a one (both files are built for the same arches, so one probe answers for both), in which case
// attention_fwd / attention_bwd run them instead of the mma.sync kernels.
bool attention_sm90a_ready();
cudaError_t attention_fwd_sm90a(const AttentionArgs& a, cudaStream_t stream);
cudaError_t attention_bwd_sm90a(const AttentionArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace pykernels

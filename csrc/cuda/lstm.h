// Launchers of the CUDA LSTM kernels (csrc/cuda/lstm.cu). No torch headers here.
#pragma once
#include <cuda_runtime.h>

#include "../lstm_args.h"

namespace pykernels {
namespace cuda {

// One launch per step: the gate GEMMs x W_ih^T + h W_hh^T (fp32 accumulation, tiles in shared memory) fused with
// the bias add, the activations and the state update. fp32 / fp16 / bf16.
cudaError_t lstm_cell_fwd(const LstmCellArgs& a, cudaStream_t stream);
// Pointwise gate gradients and dc_prev from (dh, dc, cx, ws).
cudaError_t lstm_cell_bwd(const LstmCellBwdArgs& a, cudaStream_t stream);
// One layer direction over all T steps in one cooperative (persistent) launch (csrc/cuda/lstm_layer.cu): the
// recurrence forward, and the backward's gate gradients + dh/dc carried through reverse time.
// What a layer launch planned (filled when given; max_hidden also when the launch refuses the size).
struct LstmLayerPlanInfo {
  bool resident = true;    // W_hh stayed in the blocks' shared memory (else it was streamed every step)
  int64_t max_hidden = 0;  // the forward's largest H on this GPU (a batch chunk of h in shared memory); 0: none
};
cudaError_t lstm_layer_fwd(const LstmLayerArgs& a, cudaStream_t stream, LstmLayerPlanInfo* info = nullptr);
cudaError_t lstm_layer_bwd(const LstmLayerArgs& a, cudaStream_t stream, LstmLayerPlanInfo* info = nullptr);
// Whether a launch of that direction would keep W_hh on chip on a GPU of `sms` multiprocessors and `smem_max` bytes
// of opt-in shared memory per block (host only, no GPU needed); false also when the size is refused outright.
bool lstm_layer_resident(DType dtype, int64_t H, bool forward, int sms, int smem_max);

}  // namespace cuda
}  // namespace pykernels

// The LSTM recurrence compiled for AVX-512 (setup.py builds this directory into pykernels._C_avx512): 512-bit
// vectors and 6-row register tiles (lstm_layer_kernels.h). Registered into _C by pykernels/_ext.py (wide_kernels.h).
#include "../lstm_layer_kernels.h"
#include "../wide_kernels.h"

extern "C" {

__attribute__((visibility("default"))) void pykernels_lstm_layer_fwd(const pykernels::LstmLayerCpuArgs* a) {
  pykernels::lstm_layer_fwd_kernel(*a);
}

__attribute__((visibility("default"))) void pykernels_lstm_layer_bwd(const pykernels::LstmLayerCpuArgs* a) {
  pykernels::lstm_layer_bwd_kernel(*a);
}
}

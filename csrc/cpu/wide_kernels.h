// CPU kernels that a library built for a wider vector ISA (_C_avx512: csrc/cpu/avx512/) provides in place of _C's
// own, which are built for the build's base capability (AVX2 or none). pykernels/_ext.py loads that library
// (RTLD_LOCAL: its copies of inline header functions, compiled for AVX-512, stay invisible to every other library)
// only where torch itself dispatches at AVX512, and hands its entry points to _C by name through the C functions
// below. Nothing registered: _C's own kernel runs.
#pragma once
#include <cstdint>

#include "../cross_entropy_args.h"
#include "../lstm_args.h"

namespace pykernels {

using CrossEntropyRowsFn = void (*)(const CrossEntropyArgs*, bool backward);
using LstmLayerFn = void (*)(const LstmLayerCpuArgs*);

// The registered kernels (names "cross_entropy_rows", "lstm_layer_fwd", "lstm_layer_bwd"), or null.
CrossEntropyRowsFn wide_cross_entropy_rows();
LstmLayerFn wide_lstm_layer_fwd();
LstmLayerFn wide_lstm_layer_bwd();

}  // namespace pykernels

// The ABI both libraries must agree on: a library whose value differs (a stale build) is refused. The version
// counts the entry points' signatures; the sizes catch a changed argument struct.
#define PYKERNELS_WIDE_KERNELS_ABI                                                                 \
  (2 * 1000000 + static_cast<int>(sizeof(pykernels::CrossEntropyArgs)) * 1000 + \
   static_cast<int>(sizeof(pykernels::LstmLayerCpuArgs)))

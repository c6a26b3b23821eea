// The table behind wide_kernels.h, and the C functions through which pykernels/_ext.py fills it (ctypes).
#include "wide_kernels.h"

#include <atomic>
#include <cstring>

namespace pykernels {
namespace {
std::atomic<void*> cross_entropy_rows{nullptr}, lstm_layer_fwd{nullptr}, lstm_layer_bwd{nullptr};

// The slot registered under name, or null for an unknown name (the one place that maps names to slots).
std::atomic<void*>* slot(const char* name) {
  if (std::strcmp(name, "cross_entropy_rows") == 0) return &cross_entropy_rows;
  if (std::strcmp(name, "lstm_layer_fwd") == 0) return &lstm_layer_fwd;
  if (std::strcmp(name, "lstm_layer_bwd") == 0) return &lstm_layer_bwd;
  return nullptr;
}
}  // namespace

CrossEntropyRowsFn wide_cross_entropy_rows() {
  return reinterpret_cast<CrossEntropyRowsFn>(cross_entropy_rows.load(std::memory_order_acquire));
}
LstmLayerFn wide_lstm_layer_fwd() {
  return reinterpret_cast<LstmLayerFn>(lstm_layer_fwd.load(std::memory_order_acquire));
}
LstmLayerFn wide_lstm_layer_bwd() {
  return reinterpret_cast<LstmLayerFn>(lstm_layer_bwd.load(std::memory_order_acquire));
}

}  // namespace pykernels

extern "C" {

__attribute__((visibility("default"))) int pykernels_wide_kernels_abi() { return PYKERNELS_WIDE_KERNELS_ABI; }

// Registers fn (null: _C's own kernel again) under name; 0 on success, -1 for an unknown name.
__attribute__((visibility("default"))) int pykernels_set_wide_kernel(const char* name, void* fn) {
  auto* s = pykernels::slot(name);
  if (!s) return -1;
  s->store(fn, std::memory_order_release);
  return 0;
}

// What is registered under name (null: nothing, or an unknown name).
__attribute__((visibility("default"))) void* pykernels_wide_kernel(const char* name) {
  auto* s = pykernels::slot(name);
  return s ? s->load(std::memory_order_acquire) : nullptr;
}
}

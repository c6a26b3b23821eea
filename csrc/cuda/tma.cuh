// sm_90 asynchronous-copy primitives in raw PTX (no torch, no CUTLASS): shared-memory mbarriers with transaction
// counts, TMA tensor loads (cp.async.bulk.tensor) that complete on an mbarrier, named barriers, and setmaxnreg
// (sm_90a) to move registers between the warpgroups of a block. Used by the Hopper attention forward
// (attention_sm90a.cu). Only code compiled for sm_90 and later may call the device functions; setmaxnreg needs
// sm_90a (the kernels guard their bodies with __CUDA_ARCH_FEAT_SM90_ALL).
//
// The mbarrier protocol (PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier"):
// a barrier is a 64-bit word in shared memory with an expected arrival count (set by init), a pending arrival count
// and a pending transaction count (bytes). A phase completes when every expected thread has arrived and the
// transaction count is back to zero; then the barrier moves to the next phase (parity 0, 1, 0, ...) and re-arms.
// arrive.expect_tx raises the transaction count by the bytes a TMA load will deliver (and counts as an arrival);
// the TMA unit lowers it (complete_tx) as the bytes land in shared memory. try_wait.parity P returns true once the
// phase of parity P has completed, which also makes the TMA-written data visible to the waiting threads. A freshly
// initialised barrier is in phase 0, so waiting for parity 1 succeeds at once ("the phase before" is complete):
// the producer's first pass over an empty ring does not block.
#pragma once
#include <cstdint>

#include "mma.cuh"  // smem_addr

namespace pykernels {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------
// mbarrier (addresses are 32-bit shared-window addresses of 8-byte aligned words).

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads and to the async proxy (the TMA unit); followed by a
// block-wide barrier before any thread or copy uses them.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` more bytes of asynchronous transactions in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// One arrival (release semantics: this thread's earlier accesses happen before the phase completes).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}

// Blocks until the phase of the given parity has completed (acquire semantics). try_wait itself suspends the thread
// for a system-dependent time before it returns false, so the loop is not a hot spin.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---------------------------------------------------------------------------------------------------------
// TMA: tensor maps (CUtensorMap, 128 bytes, built on the host by cuTensorMapEncodeTiled) are kernel parameters
// declared `const __grid_constant__`, so their generic address may be handed to the copy instructions.

__device__ __forceinline__ void tma_prefetch_map(const void* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// The box of the 4-D map at coordinates (c0 innermost .. c3), in elements, into shared memory at `dst` (32-bit
// shared address; 128-byte aligned, 1024-byte aligned for the 128-byte swizzle); completion (the box's bytes) is
// signalled on mbarrier `bar`. Out-of-bounds elements of the box are written as zeros and still counted as bytes.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// ---------------------------------------------------------------------------------------------------------
// Named barriers (ids 1..15; 0 is __syncthreads) over `count` threads (a multiple of 32): sync waits until
// `count` threads have arrived at this barrier, arrive only counts this thread and does not wait.

// The id is an immediate, so ptxas knows which hardware barriers the kernel uses.
template <int ID>
__device__ __forceinline__ void named_bar_sync(int count) {
  static_assert(ID >= 1 && ID < 16, "named barrier ids 1..15");
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "r"(count) : "memory");
}
template <int ID>
__device__ __forceinline__ void named_bar_arrive(int count) {
  static_assert(ID >= 1 && ID < 16, "named barrier ids 1..15");
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "r"(count) : "memory");
}

// 16 zero bytes at shared address p (16-byte aligned).
__device__ __forceinline__ void st_shared_zero16(uint32_t p) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(p), "r"(0) : "memory");
}

// ---------------------------------------------------------------------------------------------------------
// setmaxnreg (sm_90a): every warp of a warpgroup executes the same one. dec releases registers of the warpgroup to
// the block's pool, inc waits until the pool has enough and takes them. N: 24..256, a multiple of 8.

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, multiple of 8");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, multiple of 8");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace cuda
}  // namespace pykernels

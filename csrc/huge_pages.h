// Large CPU tensors that a kernel is about to write in full, allocated with transparent-huge-page advice.
//
// A fresh multi-MB CPU allocation is mmap'd by the allocator, and each 4 KiB page faults in (zeroed by the kernel)
// at its first write. Measured on the 2-core VM (2026-12-04): cross-entropy forward+backward at N=4096 V=32000 fp32
// took 323-340 ms, about two thirds of it faulting in its 524 MB gradient, and 125-138 ms with 2 MiB pages (torch's
// own THP_MEM_ALLOC_ENABLE=1 does the same for torch: 878 -> 309 ms). torch advises huge pages only under that
// variable; these kernels advise them for their own large outputs. PYKERNELS_CPU_HUGE_PAGES=0 turns it off (read
// once). Only advice: where the kernel's THP setting is "never", or madvise fails, nothing changes.
#pragma once
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pykernels {

inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  static const bool enabled = [] {
    const char* v = std::getenv("PYKERNELS_CPU_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (enabled && t.is_cpu() && t.nbytes() >= 4 * kHuge) {
    const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + t.nbytes()) & ~(kHuge - 1);
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // the 2 MiB-aligned interior
  }
#endif
  return t;
}

}  // namespace pykernels

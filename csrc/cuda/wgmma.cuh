// sm_90a warpgroup tensor-core primitives (wgmma): shared-memory matrix descriptors of the canonical
// no-swizzle K-major layout, the fences and commit/wait of asynchronous wgmma, and m64nNk16 products with fp32
// accumulators (fp16/bf16 in) whose accumulators follow the m16n8 fragment layout of mma.cuh per warp: warp w of
// the warpgroup holds rows 16w + g and 16w + g + 8, columns 8j + 2t, 2t + 1 of tile j in d[j][0..3].
// Only code compiled for sm_90a may call them (the kernels guard their bodies with __CUDA_ARCH_FEAT_SM90_ALL).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mma.cuh"  // smem_addr

namespace pykernels {
namespace cuda {

// Canonical no-swizzle K-major tile of R rows x K columns (16-bit): 8 x 8 core matrices of 128 contiguous bytes,
// core matrix (r / 8, k / 8) at element ((r / 8) * (K / 8) + k / 8) * 64. Element (r, k):
__host__ __device__ constexpr int kmajor_offset(int r, int k, int K) {
  return ((r >> 3) * (K >> 3) + (k >> 3)) * 64 + (r & 7) * 8 + (k & 7);
}

// No-swizzle matrix descriptor (PTX ISA "matrix descriptor"): [0:13] start address >> 4, [16:29] leading byte
// offset >> 4, [32:45] stride byte offset >> 4, base offset 0, layout type 0 (no swizzle). Host and device: the
// CPU tier decodes them (tests/test_attention_cuda.py).
__host__ __device__ constexpr uint64_t nosw_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32);
}

// Such a tile of K columns at shared address `addr` (16-byte aligned), read K-major: core matrices adjacent along K
// 128 bytes apart (leading byte offset), 8-row groups K * 16 bytes apart (stride byte offset).
__host__ __device__ constexpr uint64_t kmajor_desc_at(uint32_t addr, int K) { return nosw_desc(addr, 128, K * 16); }
__device__ __forceinline__ uint64_t kmajor_desc(const uint16_t* tile, int K) { return kmajor_desc_at(smem_addr(tile), K); }

// The same tile read MN-major, as the B operand of a product whose reduction runs along its rows (V in O += P V,
// K in dQ += dS K, Q and dO in dK, dV): B's K = the tile's row r, B's N = its column c. A core matrix is then 8 K
// rows of 8 N-contiguous elements (the MN-major core matrix), so no transposed copy is needed. MN-major no-swizzle
// canonical layout (PTX "matrix descriptor"; CUTLASS make_gmma_desc<Major::MN>, INTERLEAVE): the stride byte
// offset steps between core matrices adjacent along N (here 128 bytes: the next 8 columns), the leading byte
// offset between those adjacent along K (here C * 16 bytes: the next 8 rows of a C-column tile). The product must
// set the instruction's transpose-B immediate (wgmma_rs<..., 1>). 16 steps of K are 16 rows: tile + 16 * C.
__host__ __device__ constexpr uint64_t mnmajor_desc_at(uint32_t addr, int C) { return nosw_desc(addr, C * 16, 128); }
__device__ __forceinline__ uint64_t mnmajor_desc(const uint16_t* tile, int C) { return mnmajor_desc_at(smem_addr(tile), C); }

// Ordinary shared-memory stores made visible to the tensor cores' (async proxy) reads; each writing thread, before
// the barrier that precedes the wgmma.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of accumulators across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// The m64nNk16 products (operand lists written out in full: inline asm takes no loops).

// The four accumulators of 8-column tile j, as read-write asm operands.
#define PYKERNELS_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])

#define PYKERNELS_WGMMA_SS_N32(TY)                                          \
  asm volatile(                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                          \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {"          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"                                    \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3)  \
      : "l"(da), "l"(db), "r"(scale_d))

// d[4][4] (+)= A B^T: A (64 x 16) and B (32 x 16) K-major in shared memory (descriptors da, db);
// scale_d 0 overwrites d.
template <typename T>
__device__ __forceinline__ void wgmma_ss_n32(float (&d)[4][4], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (std::is_same_v<T, __half>) {
    PYKERNELS_WGMMA_SS_N32("f16");
  } else {
    PYKERNELS_WGMMA_SS_N32("bf16");
  }
}
#undef PYKERNELS_WGMMA_SS_N32

#define PYKERNELS_WGMMA_SS_N64(TY)                                          \
  asm volatile(                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                          \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                  \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "        \
      "%24, %25, %26, %27, %28, %29, %30, %31"                              \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                    \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3), \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7)  \
      : "l"(da), "l"(db), "r"(scale_d))

// d[8][4] (+)= A B^T: A (64 x 16) and B (64 x 16) K-major in shared memory (descriptors da, db);
// scale_d 0 overwrites d.
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (std::is_same_v<T, __half>) {
    PYKERNELS_WGMMA_SS_N64("f16");
  } else {
    PYKERNELS_WGMMA_SS_N64("bf16");
  }
}
#undef PYKERNELS_WGMMA_SS_N64

#define PYKERNELS_WGMMA_SS_N128(TY)                                             \
  asm volatile(                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                              \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"             \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                      \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "            \
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "            \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "            \
      "%60, %61, %62, %63"                                                      \
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                        \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3),     \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7),     \
        PYKERNELS_D4(8), PYKERNELS_D4(9), PYKERNELS_D4(10), PYKERNELS_D4(11),   \
        PYKERNELS_D4(12), PYKERNELS_D4(13), PYKERNELS_D4(14), PYKERNELS_D4(15)  \
      : "l"(da), "l"(db), "r"(scale_d))

// d[16][4] (+)= A B^T: A (64 x 16) and B (128 x 16) K-major in shared memory (descriptors da, db); scale_d 0
// overwrites d.
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (std::is_same_v<T, __half>) {
    PYKERNELS_WGMMA_SS_N128("f16");
  } else {
    PYKERNELS_WGMMA_SS_N128("bf16");
  }
}
#undef PYKERNELS_WGMMA_SS_N128

#define PYKERNELS_WGMMA_RS_N64(TY)                                          \
  asm volatile(                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                          \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"          \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                  \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "        \
      "%24, %25, %26, %27, %28, %29, %30, %31"                              \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                      \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3), \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7)  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1), "n"(TB))

// d[8][4] += A B^T: A (64 x 16) in registers (this warp's 16 rows as the m16n8k16 A fragment a),
// B (64 x 16) in shared memory (descriptor db): K-major, or MN-major with TB = 1.
template <typename T, int TB = 0>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (std::is_same_v<T, __half>) {
    PYKERNELS_WGMMA_RS_N64("f16");
  } else {
    PYKERNELS_WGMMA_RS_N64("bf16");
  }
}
#undef PYKERNELS_WGMMA_RS_N64

#define PYKERNELS_WGMMA_RS_N128(TY)                                            \
  asm volatile(                                                                \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                             \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"            \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                     \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "           \
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "           \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "           \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "           \
      "%60, %61, %62, %63"                                                     \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                         \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3),    \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7),    \
        PYKERNELS_D4(8), PYKERNELS_D4(9), PYKERNELS_D4(10), PYKERNELS_D4(11),  \
        PYKERNELS_D4(12), PYKERNELS_D4(13), PYKERNELS_D4(14), PYKERNELS_D4(15) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1), "n"(TB))

// d[16][4] += A B^T: A (64 x 16) in registers (this warp's 16 rows as the m16n8k16 A fragment a),
// B (128 x 16) in shared memory (descriptor db): K-major, or MN-major with TB = 1.
template <typename T, int TB = 0>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (std::is_same_v<T, __half>) {
    PYKERNELS_WGMMA_RS_N128("f16");
  } else {
    PYKERNELS_WGMMA_RS_N128("bf16");
  }
}
#undef PYKERNELS_WGMMA_RS_N128

#define PYKERNELS_WGMMA_RS_N256(TY)                                              \
  asm volatile(                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                              \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {"              \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                       \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "             \
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "             \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "             \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "             \
      "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "             \
      "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, "             \
      "%84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "             \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "     \
      "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, " \
      "%120, %121, %122, %123, %124, %125, %126, %127"                           \
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"                      \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3),      \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7),      \
        PYKERNELS_D4(8), PYKERNELS_D4(9), PYKERNELS_D4(10), PYKERNELS_D4(11),    \
        PYKERNELS_D4(12), PYKERNELS_D4(13), PYKERNELS_D4(14), PYKERNELS_D4(15),  \
        PYKERNELS_D4(16), PYKERNELS_D4(17), PYKERNELS_D4(18), PYKERNELS_D4(19),  \
        PYKERNELS_D4(20), PYKERNELS_D4(21), PYKERNELS_D4(22), PYKERNELS_D4(23),  \
        PYKERNELS_D4(24), PYKERNELS_D4(25), PYKERNELS_D4(26), PYKERNELS_D4(27),  \
        PYKERNELS_D4(28), PYKERNELS_D4(29), PYKERNELS_D4(30), PYKERNELS_D4(31)   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1), "n"(TB))

// d[32][4] += A B^T: A (64 x 16) in registers (this warp's 16 rows as the m16n8k16 A fragment a),
// B (256 x 16) in shared memory (descriptor db): K-major, or MN-major with TB = 1.
template <typename T, int TB = 0>
__device__ __forceinline__ void wgmma_rs_n256(float (&d)[32][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (std::is_same_v<T, __half>) {
    PYKERNELS_WGMMA_RS_N256("f16");
  } else {
    PYKERNELS_WGMMA_RS_N256("bf16");
  }
}
#undef PYKERNELS_WGMMA_RS_N256
#undef PYKERNELS_D4

// The products by N (the accumulator columns: d[N / 8][4]).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t da, uint64_t db, int scale_d) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss: N 32, 64 or 128");
  if constexpr (N == 32) {
    wgmma_ss_n32<T>(d, da, db, scale_d);
  } else if constexpr (N == 64) {
    wgmma_ss_n64<T>(d, da, db, scale_d);
  } else {
    wgmma_ss_n128<T>(d, da, db, scale_d);
  }
}

// TB = 1: B is read MN-major (mnmajor_desc), the instruction's transpose-B immediate.
template <typename T, int N, int TB = 0>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t db) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma_rs: N 64, 128 or 256");
  if constexpr (N == 64) {
    wgmma_rs_n64<T, TB>(d, a, db);
  } else if constexpr (N == 128) {
    wgmma_rs_n128<T, TB>(d, a, db);
  } else {
    wgmma_rs_n256<T, TB>(d, a, db);
  }
}

}  // namespace cuda
}  // namespace pykernels

// wgmma on 128-byte-swizzled shared-memory tiles (sm_90a), the layout a TMA load with CU_TENSOR_MAP_SWIZZLE_128B
// writes: matrix descriptors of the K-major and MN-major swizzled canonical layouts, S = A B^T with both operands in
// shared memory (m64n{32,64,128}k16, wgmma_ss), and D += A B with A in registers and B
// MN-major in shared memory (the instruction's transpose bit for B, imm-trans-b = 1: allowed for f16/bf16 only).
// Accumulators: the m16n8 fragment layout per warp of wgmma.cuh. Only code compiled for sm_90a may call them.
//
// Layout (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout": swizzling modes and the matrix
// descriptor; what CUTLASS calls Swizzle<3,4,3>): a TMA box of 64 16-bit elements (128 bytes) x R rows, 128-byte
// swizzle, lands as R rows of 128 bytes, row r at byte 128 r, its 16-byte chunk c at chunk position c ^ (r % 8):
// address bits [4:6] are XORed with bits [7:9]. The pattern repeats every 8 rows (1024 bytes), so a tile must start
// on a 1024-byte boundary for bits [7:9] to be the row within the 8-row "swizzle atom" (then the descriptor's base
// offset field is 0). Columns beyond 64 come in further boxes of 64 columns, each R x 128 bytes, one after another.
//
// Descriptor (64 bits): [0:13] start address >> 4, [16:29] leading-dimension byte offset (LBO) >> 4, [32:45]
// stride-dimension byte offset (SBO) >> 4, [49:51] base offset (0: atoms 1024-byte aligned), [62:63] layout type
// (0 none, 1 = 128-byte swizzle, 2 = 64-byte, 3 = 32-byte).
//  * K-major operand (rows = M or N, K contiguous within a row; A and B of S = Q K^T): one k16 step reads 8-row
//    groups of 16 K-elements = 32 bytes of each 128-byte row. Rows within an 8-row atom are 128 bytes apart (implied
//    by the swizzle mode), 8-row groups are SBO = 1024 bytes apart, the 32 bytes of K are contiguous before the
//    swizzle; LBO is unused for swizzled K-major layouts (set to 1, i.e. 16 bytes, as CUTLASS does). The k16 step
//    kk of a 64-column box starts at byte 32 (kk % 4) of the box: the hardware applies the XOR to the computed
//    address, so row r's chunk 2 (kk % 4) + c is found where TMA put it; the next box of 64 columns starts
//    R * 128 bytes further.
//  * MN-major operand (B of O += P V: B is K x N with K = keys, N = head dim, V stored as TMA wrote it: key rows of
//    128 bytes = 64 head-dim columns): rows of the atom are now K (8 keys x 128 bytes, 64 N-elements contiguous per
//    key), so the 8-key groups are SBO = 1024 bytes apart along K, and the next 64 N-elements (the next TMA box of
//    head-dim columns) are LBO = R * 128 bytes further along N. A k16 step spans two 8-key groups (SBO once), and
//    step kk starts 16 kk keys = 2048 kk bytes into the tile: on an atom boundary.
// The descriptor fields hold 14 bits of bytes >> 4: offsets below 256 KiB.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "wgmma.cuh"  // wgmma_ss_n64

namespace pykernels {
namespace cuda {

__host__ __device__ constexpr uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t(1) << 62);
}

// K-major 128-byte-swizzled operand whose k16 step starts at shared address `addr` (atom base + 32 (kk % 4)).
__host__ __device__ constexpr uint64_t sw128_kmajor_desc(uint32_t addr) { return sw128_desc(addr, 16, 1024); }

// MN-major 128-byte-swizzled operand whose k16 step starts at shared address `addr` (an atom base); the boxes of 64
// MN-elements are `box_bytes` apart.
__host__ __device__ constexpr uint64_t sw128_mnmajor_desc(uint32_t addr, uint32_t box_bytes) {
  return sw128_desc(addr, box_bytes, 1024);
}

// Where k16 step kk starts, in bytes from the tile: a K-major tile of `rows` rows stored as boxes of 64 columns
// (rows * 128 bytes each): box kk / 4, bytes 32 (kk % 4) into every row. Added to a descriptor as bytes >> 4.
__host__ __device__ constexpr uint32_t sw128_kmajor_step(int rows, int kk) {
  return static_cast<uint32_t>((kk / 4) * rows * 128 + (kk % 4) * 32);
}
// An MN-major tile whose rows are K: step kk is rows 16 kk .. 16 kk + 15, two 8-row atoms of 1024 bytes.
__host__ __device__ constexpr uint32_t sw128_mnmajor_step(int kk) { return static_cast<uint32_t>(kk * 2048); }

// The descriptors the kernels use: k16 step kk of rows [row0, row0 + M or N) of a K-major tile of `rows` rows (boxes
// of 64 columns) at shared address `tile`; k16 step kk (K rows 16 kk.., from row0) of an MN-major tile of `rows`
// K-rows whose boxes of 64 MN-columns are rows * 128 bytes apart. row0 a multiple of 8, tile 1024-byte aligned.
__host__ __device__ constexpr uint64_t sw128_kmajor_tile_desc(uint32_t tile, int rows, int row0, int kk) {
  return sw128_kmajor_desc(tile + row0 * 128) + sw128_kmajor_step(rows, kk) / 16;
}
__host__ __device__ constexpr uint64_t sw128_mnmajor_tile_desc(uint32_t tile, int rows, int row0, int kk) {
  return sw128_mnmajor_desc(tile + row0 * 128, rows * 128) + sw128_mnmajor_step(kk) / 16;
}

// Where a TMA load with CU_TENSOR_MAP_SWIZZLE_128B puts element (r, c) of a tile of `rows` rows loaded as boxes of
// 64 columns, in bytes from the (1024-byte aligned) tile: chunk (c % 64) / 8 of row r lands at chunk
// ((c % 64) / 8) ^ (r % 8). For checks (tests/test_attention_cuda.py); the kernels only compute descriptors.
__host__ __device__ constexpr uint32_t sw128_tma_offset(int rows, int r, int c) {
  return static_cast<uint32_t>((c / 64) * rows * 128 + r * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16) + (c % 8) * 2);
}

// The four accumulators of 8-column tile j, as read-write asm operands.
#define PYKERNELS_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])

#define PYKERNELS_WGMMA_SS_N32(TY)                                              \
  asm volatile(                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                              \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {"              \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                      \
      "%12, %13, %14, %15"                                                      \
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"                                        \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3)      \
      : "l"(da), "l"(db), "r"(scale_d))

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

// d[N/8][4] (+)= A B^T for N = 32, 64 (wgmma.cuh's wgmma_ss_n64) or 128, both operands K-major in shared memory.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t da, uint64_t db, int scale_d) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss: N = 32, 64 or 128");
  if constexpr (N == 32) {
    if constexpr (std::is_same_v<T, __half>) {
      PYKERNELS_WGMMA_SS_N32("f16");
    } else {
      PYKERNELS_WGMMA_SS_N32("bf16");
    }
  } else if constexpr (N == 64) {
    wgmma_ss_n64<T>(d, da, db, scale_d);
  } else {
    wgmma_ss_n128<T>(d, da, db, scale_d);
  }
}
#undef PYKERNELS_WGMMA_SS_N32

#define PYKERNELS_WGMMA_RS_TB_N64(TY)                                           \
  asm volatile(                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                              \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"              \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                      \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "            \
      "%24, %25, %26, %27, %28, %29, %30, %31"                                  \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                          \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3),     \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7)      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))

#define PYKERNELS_WGMMA_RS_TB_N128(TY)                                          \
  asm volatile(                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                              \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"             \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                      \
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "            \
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "            \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "            \
      "%60, %61, %62, %63"                                                      \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                          \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3),     \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7),     \
        PYKERNELS_D4(8), PYKERNELS_D4(9), PYKERNELS_D4(10), PYKERNELS_D4(11),   \
        PYKERNELS_D4(12), PYKERNELS_D4(13), PYKERNELS_D4(14), PYKERNELS_D4(15)  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))

#define PYKERNELS_WGMMA_RS_TB_N256(TY)                                           \
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
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"                      \
      : PYKERNELS_D4(0), PYKERNELS_D4(1), PYKERNELS_D4(2), PYKERNELS_D4(3),      \
        PYKERNELS_D4(4), PYKERNELS_D4(5), PYKERNELS_D4(6), PYKERNELS_D4(7),      \
        PYKERNELS_D4(8), PYKERNELS_D4(9), PYKERNELS_D4(10), PYKERNELS_D4(11),    \
        PYKERNELS_D4(12), PYKERNELS_D4(13), PYKERNELS_D4(14), PYKERNELS_D4(15),  \
        PYKERNELS_D4(16), PYKERNELS_D4(17), PYKERNELS_D4(18), PYKERNELS_D4(19),  \
        PYKERNELS_D4(20), PYKERNELS_D4(21), PYKERNELS_D4(22), PYKERNELS_D4(23),  \
        PYKERNELS_D4(24), PYKERNELS_D4(25), PYKERNELS_D4(26), PYKERNELS_D4(27),  \
        PYKERNELS_D4(28), PYKERNELS_D4(29), PYKERNELS_D4(30), PYKERNELS_D4(31)   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))

// d[N/8][4] += A B: A (64 x 16) in registers (this warp's 16 rows as the m16n8k16 A fragment a), B (16 x N)
// MN-major in shared memory (descriptor db, imm-trans-b = 1).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t db) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma_rs_tb: N = 64, 128 or 256");
  if constexpr (N == 64) {
    if constexpr (std::is_same_v<T, __half>) {
      PYKERNELS_WGMMA_RS_TB_N64("f16");
    } else {
      PYKERNELS_WGMMA_RS_TB_N64("bf16");
    }
  } else if constexpr (N == 128) {
    if constexpr (std::is_same_v<T, __half>) {
      PYKERNELS_WGMMA_RS_TB_N128("f16");
    } else {
      PYKERNELS_WGMMA_RS_TB_N128("bf16");
    }
  } else {
    if constexpr (std::is_same_v<T, __half>) {
      PYKERNELS_WGMMA_RS_TB_N256("f16");
    } else {
      PYKERNELS_WGMMA_RS_TB_N256("bf16");
    }
  }
}
#undef PYKERNELS_WGMMA_RS_TB_N64
#undef PYKERNELS_WGMMA_RS_TB_N128
#undef PYKERNELS_WGMMA_RS_TB_N256
#undef PYKERNELS_D4

}  // namespace cuda
}  // namespace pykernels

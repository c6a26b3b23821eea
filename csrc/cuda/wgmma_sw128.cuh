// wgmma on 128-byte-swizzled shared-memory tiles (sm_90a), the layout a TMA load with CU_TENSOR_MAP_SWIZZLE_128B
// writes: matrix descriptors of the K-major and MN-major swizzled canonical layouts, for the products of wgmma.cuh
// (wgmma_ss; wgmma_rs<T, N, 1> for a B read MN-major: the instruction's transpose bit, allowed for f16/bf16 only).
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

#include "wgmma.cuh"

namespace pykernels {
namespace cuda {

__host__ __device__ constexpr uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return nosw_desc(addr, lbo, sbo) | (uint64_t(1) << 62);
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


}  // namespace cuda
}  // namespace pykernels

// sm_80 tensor-core primitives shared by the CUDA kernels (attention.cu, linear_cross_entropy.cu): mma.sync
// m16n8k16 (fp16/bf16 in, fp32 accumulate), its fragments from shared-memory tiles (ldmatrix, plain or transposing),
// and cp.async copies global -> shared. No torch headers.
//
// Layout of the tensor-core fragments (PTX ISA, "mma.m16n8k16"), lane = 4 * g + t (g = lane / 4, t = lane % 4):
//   A 16x16 (row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8 (k x n):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8 fp32:         c0, c1 = (g, 2t), (g, 2t+1); c2, c3 = (g+8, 2t), (g+8, 2t+1)
// The accumulator of two adjacent 8-column tiles is, packed to 16 bits, exactly the A fragment of the next
// product (FlashAttention-2's register reuse): P and dS never go through shared memory.
//
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pykernels {
namespace cuda {

__device__ __forceinline__ float exp2_approx(float x) {  // MUFU.EX2; -inf -> 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The operands of one m16n8k16 MMA (fp32 accumulators c, A fragment a, B fragment b0/b1), for both input types.
#define PYKERNELS_MMA_OPERANDS                                          \
  : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                      \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)

template <typename T>
struct Mma {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 inputs");
  // c += a b on the tensor cores
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __half>) {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n" PYKERNELS_MMA_OPERANDS);
    } else {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n" PYKERNELS_MMA_OPERANDS);
    }
  }
  // two fp32 values rounded into one 32-bit register, lo in the low half (the fragments' element order)
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t r;
    if constexpr (std::is_same_v<T, __half>) {
      const __half2 v = __floats2half2_rn(lo, hi);
      memcpy(&r, &v, 4);
    } else {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      memcpy(&r, &v, 4);
    }
    return r;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Fragments from accumulators.

// A fragment of a 16 x 16 chunk from the fp32 accumulators of two adjacent 8-column tiles.
template <typename T>
__device__ __forceinline__ void frag_a_from_acc(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = Mma<T>::pack(lo[0], lo[1]);
  a[1] = Mma<T>::pack(lo[2], lo[3]);
  a[2] = Mma<T>::pack(hi[0], hi[1]);
  a[3] = Mma<T>::pack(hi[2], hi[3]);
}

// The accumulators p of a warp's 16 rows x KN columns packed into the A fragments of the K = KN product that
// reads them (P V, dS K, ...): half the registers of p, so pack as soon as p is final.
template <typename T, int KN>
__device__ __forceinline__ void pack_a_frags(uint32_t (&pa)[KN / 16][4], const float (&p)[KN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < KN / 16; ++kk) frag_a_from_acc<T>(pa[kk], p[2 * kk], p[2 * kk + 1]);
}

// This thread's place in the fragments: its warp, group g and lane-in-group t.
struct Lane {
  int warp, g, t;
};

__device__ __forceinline__ Lane lane_of() {
  const int lane = threadIdx.x % 32;
  return {static_cast<int>(threadIdx.x / 32), lane >> 2, lane & 3};
}

// ---------------------------------------------------------------------------------------------------------
// ldmatrix: a warp loads four 8x8 16-bit matrices, lanes 8i..8i+7 giving the row addresses of matrix i; lane l
// receives elements (l / 4, 2 (l % 4) .. +1) of each, i.e. exactly the fragment layouts above.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major tile X (LD elements per row, 16-byte rows).
template <int LD>
__device__ __forceinline__ void ldmatrix_a(uint32_t (&a)[4], const uint16_t* X, int r0, int k0, int lane) {
  const int i = lane >> 3;  // a0: rows 0-7 / k 0-7, a1: rows 8-15, a2: k 8-15, a3: both
  ldmatrix_x4(a, X + (r0 + (lane & 7) + ((i & 1) << 3)) * LD + k0 + ((i & 2) << 2));
}

// B fragments of two adjacent 8-column tiles, B[k][n] = Y[n0 + n][k0 + k] (Y's rows are the product's columns):
// b[0], b[1] for columns n0..n0+7, b[2], b[3] for n0+8..n0+15.
template <int LD>
__device__ __forceinline__ void ldmatrix_b_rows(uint32_t (&b)[4], const uint16_t* Y, int n0, int k0, int lane) {
  const int i = lane >> 3;  // b0: k 0-7, b1: k 8-15 of rows n0..; then the same for rows n0+8..
  ldmatrix_x4(b, Y + (n0 + (lane & 7) + ((i & 2) << 2)) * LD + k0 + ((i & 1) << 3));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// B fragments of two adjacent 8-column tiles, B[k][n] = Y[k0 + k][n0 + n] (Y's rows are the reduction: V in P V),
// by the transposing load: matrix i covers rows k0 + 8 (i & 1).., columns n0 + 8 (i >> 1)..; lane l of a
// transposed 8x8 load receives (rows 2 (l % 4) .. +1, column l / 4) = the b0 / b1 layout. b[0], b[1] for columns
// n0..n0+7, b[2], b[3] for n0+8..n0+15.
template <int LD>
__device__ __forceinline__ void ldmatrix_b_cols(uint32_t (&b)[4], const uint16_t* Y, int n0, int k0, int lane) {
  const int i = lane >> 3;
  ldmatrix_x4_trans(b, Y + (k0 + (lane & 7) + ((i & 1) << 3)) * LD + n0 + ((i & 2) << 2));
}

// ---------------------------------------------------------------------------------------------------------
// cp.async (sm_80): 16 bytes global -> shared without staging in registers; src_bytes 0 writes zeros (rows or
// columns past the end of an operand). Groups are committed per pipeline stage and waited on by count.

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

}  // namespace cuda
}  // namespace pykernels

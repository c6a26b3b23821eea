// Hopper (sm_90) forward-with-gradient cross-entropy: one thread-block cluster per row, the row split into
// CS chunks of at most 64 KB, each kept in its CTA's shared memory. Pass 1 streams the chunk from HBM into
// shared memory while accumulating the online (max, sum-exp); the CS partial results are combined through
// distributed shared memory; pass 2 writes the gradient from shared memory. HBM traffic is the floor: the
// logits read once and the gradient written once, independent of L2 (rows up to 8 x 64 KB, e.g. 262,144
// bf16 classes). Other shapes and older GPUs use the kernels of cross_entropy.cu.
#include <cooperative_groups.h>

#include <cstdlib>

#include "cross_entropy.h"
#include "cross_entropy_common.cuh"

namespace pykernels {
namespace cuda {
namespace ce {  // external linkage: no unused-function warning in the passes that compile the kernel out

// cp.async (sm_80+): a 16-byte global -> shared copy that does not go through registers, so a thread can have its
// whole share of the chunk in flight at once instead of 4 vectors.
constexpr int kAsyncGroups = 4;  // commit groups: the first quarter is consumed while the rest is still landing

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` of this thread's groups are in flight (the operand must be an immediate).
__device__ __forceinline__ void cp_async_wait(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
}
static_assert(kAsyncGroups == 4, "cp_async_wait covers 0..3 pending groups");

}  // namespace ce

namespace {

namespace cg = cooperative_groups;
using namespace ce;

constexpr int kMaxThreads = 512;
// Defaults from the H100 sweep (bench/tune_cross_entropy.py): 256 threads and 64 KB chunks were best or near
// best at both 32K and 128K classes (bf16); 3 CTAs per SM fit in its 228 KB of shared memory.
constexpr int kDefaultThreads = 256;
constexpr int64_t kChunkBytes = 64 * 1024;
constexpr int kMaxCluster = 8;              // the portable maximum

// ASYNC: pass 1 fills shared memory with cp.async and reads the values back from it (opt-in measurement knob
// PYKERNELS_CE_CLUSTER_CPASYNC=1); else 16-byte loads into registers, 4 per thread in flight, then stored.
template <typename T, bool ASYNC>
__global__ void __launch_bounds__(kMaxThreads, 3) cross_entropy_cluster_kernel(const CrossEntropyArgs a, int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint4 smem_raw[];
  const int nthreads = blockDim.x;
  __shared__ RowSums red[32];
  __shared__ RowSums partial;
  constexpr int V = 16 / sizeof(T);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int cs = static_cast<int>(cluster.num_blocks());
  const int64_t r = blockIdx.x / cs;  // one row per cluster
  const int64_t C = a.C;
  const T* row = static_cast<const T*>(a.logits) + r * a.sn;
  T* grow = static_cast<T*>(a.grad) + r * C;
  T* smem_t = reinterpret_cast<T*>(smem_raw);
  const float* w = static_cast<const float*>(a.weight);
  const float eps = static_cast<float>(a.label_smoothing), zl = static_cast<float>(a.z_loss);
  const float W = a.weight_sum ? *static_cast<const float*>(a.weight_sum) : static_cast<float>(C);

  const int64_t y = a.target_index[r];
  const bool ignored = y == a.ignore_index, invalid = !ignored && (y < 0 || y >= C), skip = ignored || invalid;
  float pivot = skip ? 0.f : to_f(row[y]);
  if (!isfinite(pivot)) pivot = 0.f;

  // This CTA's chunk [c0, c1). Chunks start on 16-byte boundaries relative to the row; the row itself may be
  // misaligned (odd C), so the first `head` classes are handled one by one.
  const int64_t c0 = rank * chunk, c1 = min(C, c0 + chunk);
  const int64_t n = c1 > c0 ? c1 - c0 : 0;
  const int64_t mis = (reinterpret_cast<uintptr_t>(row + c0) % 16) / sizeof(T);
  const int64_t head = mis ? (n < V - mis ? n : V - mis) : 0;
  const int64_t nvec = (n - head) / V;
  const int64_t tail0 = head + nvec * V;
  // Shared copy of the chunk, offset by the row's misalignment so that its vector part is 16-byte aligned.
  T* buf = smem_t + mis;

  RowSums v{{-INFINITY, 0.f}, 0.f, 0.f, 0.f};
  float xs[V];
  auto visit = [&](int64_t cl, int cnt) {  // cl: class index local to the chunk
    v.ms.add_vec(xs, cnt);
    if (eps > 0.f)
      for (int j = 0; j < cnt; ++j) v.wx += (w ? w[c0 + cl + j] : 1.f) * (xs[j] - pivot);
  };
  for (int64_t i = threadIdx.x; i < head; i += nthreads) {
    buf[i] = row[c0 + i];
    xs[0] = to_f(buf[i]);
    visit(i, 1);
  }
  const uint4* vsrc = reinterpret_cast<const uint4*>(row + c0 + head);
  uint4* vbuf = reinterpret_cast<uint4*>(buf + head);  // mis + head is 0 or V: 16-byte aligned
  if constexpr (ASYNC) {
    // Thread t owns vectors t + j * nthreads (the same ones pass 2 reads back: its own copies need no barrier),
    // issued in kAsyncGroups commit groups of per_group vectors; group g is consumed once it has landed.
    const int per = static_cast<int>((nvec + nthreads - 1) / nthreads);
    const int per_group = max(1, (per + kAsyncGroups - 1) / kAsyncGroups);
    const int nv = static_cast<int>(nvec);
    for (int j = 0, i = threadIdx.x, k = 0; j < per_group * kAsyncGroups; ++j, i += nthreads) {
      if (i < nv) cp_async16(vbuf + i, vsrc + i);
      if (++k == per_group) {  // exactly kAsyncGroups commits (an empty group completes at once)
        cp_async_commit();
        k = 0;
      }
    }
    for (int i = threadIdx.x, k = 0, pending = kAsyncGroups; i < nv; i += nthreads) {
      if (k-- == 0) {
        cp_async_wait(--pending);
        k = per_group - 1;
      }
      const uint4 raw = vbuf[i];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < V; ++q) xs[q] = to_f(e[q]);
      visit(head + static_cast<int64_t>(i) * V, V);
    }
  } else {
    int64_t i = threadIdx.x;
    constexpr int U = 4;
    for (; i + (U - 1) * nthreads < nvec; i += U * nthreads) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) raw[u] = vsrc[i + u * nthreads];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int j = 0; j < V; ++j) xs[j] = to_f(e[j]);
        visit(head + (i + u * nthreads) * V, V);
        vbuf[i + u * nthreads] = raw[u];
      }
    }
    for (; i < nvec; i += nthreads) {
      const uint4 raw = vsrc[i];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < V; ++j) xs[j] = to_f(e[j]);
      visit(head + i * V, V);
      vbuf[i] = raw;
    }
  }
  for (int64_t i = tail0 + threadIdx.x; i < n; i += nthreads) {
    buf[i] = row[c0 + i];
    xs[0] = to_f(buf[i]);
    visit(i, 1);
  }

  // Combine: block, then cluster (every CTA folds the partials in the same order: identical lse everywhere).
  const RowSums mine = block_reduce(v, red);
  if (threadIdx.x == 0) partial = mine;
  cluster.sync();
  RowSums s = *cluster.map_shared_rank(&partial, 0);
  for (int k = 1; k < cs; ++k) {
    const RowSums o = *cluster.map_shared_rank(&partial, k);
    s.ms.merge(o.ms);
    s.wx += o.wx;
  }
  // Done reading the other CTAs' shared memory: say so now, wait for the others only before exiting, so the
  // gradient pass overlaps the slowest CTA instead of waiting for it.
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  const float log_s = logf(s.ms.s), m = s.ms.m, lse = m + log_s;
  if (rank == 0 && threadIdx.x == 0) {
    const float rel = (m - pivot) + log_s;
    float loss;
    if (ignored) {
      loss = 0.f;
    } else if (invalid) {
      loss = __int_as_float(0x7fffffff);
    } else {
      // a non-finite target logit (pivot 0 above) is subtracted from lse as it is; re-read here by one thread
      // rather than kept in a register through pass 1, where the kernel is at its 40-register bound
      const float xy = to_f(row[y]);
      loss = (w ? w[y] : 1.f) * (1.f - eps) * (rel - (isfinite(xy) ? 0.f : xy));
      if (eps > 0.f) loss += eps / C * infinite_sum(W, W * rel - s.wx, rel);
      if (zl > 0.f) loss += zl * lse * lse;
    }
    static_cast<float*>(a.loss)[r] = loss;
    static_cast<float*>(a.lse)[r] = lse;
    static_cast<float*>(a.lse_err)[r] = lse_residual(m, log_s, lse);
  }

  // Pass 2 from shared memory: s * (p_c K - [c == y] w_y (1 - eps) - eps/C w_c), p_c from (x - m) - log s.
  const float* scale = static_cast<const float*>(a.scale);
  const float sr = scale ? scale[a.scale_numel == 1 ? 0 : r] : 1.f;
  const float wy = (!skip && w) ? w[y] : 1.f;
  const float k = sr * (wy * (1.f - eps) + eps * W / C + (zl > 0.f ? 2.f * zl * lse : 0.f));
  const float ew = sr * eps / C, hit = sr * wy * (1.f - eps);
  const float fill = ignored ? 0.f : __int_as_float(0x7fffffff);
  // Chunk-local 32-bit indices in the per-element work (a chunk holds at most 64 KB).
  const int y_local = (!skip && y >= c0 && y < c1) ? static_cast<int>(y - c0) : -1;
  // the eps / C w_c term only with smoothing: 0 * a NaN / inf weight of a class no target uses is NaN
  const float* wc = w && eps > 0.f ? w + c0 : nullptr;
  auto grad_of = [&](int cl, float x) {
    if (skip) return fill;
    return fast_exp((x - m) - log_s) * k - (wc ? ew * wc[cl] : ew) - (cl == y_local ? hit : 0.f);
  };
  for (int i = threadIdx.x; i < head; i += nthreads) grow[c0 + i] = from_f<T>(grad_of(i, to_f(buf[i])));
  uint4* vdst = reinterpret_cast<uint4*>(grow + c0 + head);  // same misalignment as the logits row
  for (int i = threadIdx.x; i < nvec; i += nthreads) {
    const uint4 raw = vbuf[i];
    const T* e = reinterpret_cast<const T*>(&raw);
    uint4 res;
    T* o = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = from_f<T>(grad_of(static_cast<int>(head) + i * V + j, to_f(e[j])));
    vdst[i] = res;
  }
  for (int i = static_cast<int>(tail0) + threadIdx.x; i < n; i += nthreads) grow[c0 + i] = from_f<T>(grad_of(i, to_f(buf[i])));
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");  // no CTA exits while its `partial` is read
#endif
}

template <typename T>
cudaError_t launch_cluster(const CrossEntropyArgs& a, int cs, int64_t chunk, cudaStream_t stream) {
  auto kernel = knob("PYKERNELS_CE_CLUSTER_CPASYNC") ? cross_entropy_cluster_kernel<T, true>
                                                     : cross_entropy_cluster_kernel<T, false>;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  // built without sm_90 code, or JIT-compiled from older PTX (a "+PTX" arch list: binaryVersion is then the
  // device's, ptxVersion the PTX's): the body is compiled out
  if (attr.binaryVersion < 90 || attr.ptxVersion < 90) return cudaErrorNotSupported;
  const size_t smem = static_cast<size_t>(chunk) * sizeof(T) + 16;  // + room for the misalignment offset
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.rows() * cs));
  const int threads = threads_knob("PYKERNELS_CE_CLUSTER_THREADS", kMaxThreads);
  cfg.blockDim = dim3(threads ? threads : kDefaultThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = cs;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, a, chunk);
}

}  // namespace

bool cross_entropy_fwd_cluster(const CrossEntropyArgs& a, cudaStream_t stream, cudaError_t* err) {
  // Contiguous (N, C) rows of class-index targets, gradient requested, on sm_90+.
  if (!a.grad || a.target_prob || a.D != 1 || a.sc != 1 || a.sn != a.C || a.dtype == DType::F64) return false;
  if (std::getenv("PYKERNELS_CE_NO_CLUSTER")) return false;  // measurement knob
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major < 9) return false;
  const int64_t esz = a.dtype == DType::F32 ? 4 : 2;
  const int64_t vec = 16 / esz;
  const int64_t row_bytes = a.C * esz;
  if (row_bytes < 16 * 1024 || reinterpret_cast<uintptr_t>(a.logits) % 16 ||
      reinterpret_cast<uintptr_t>(a.grad) % 16)
    return false;
  const int64_t chunk_bytes = knob("PYKERNELS_CE_CLUSTER_CHUNK_KB") ? knob("PYKERNELS_CE_CLUSTER_CHUNK_KB") * 1024
                                                                       : kChunkBytes;
  const int cs = static_cast<int>((row_bytes + chunk_bytes - 1) / chunk_bytes);
  if (cs > kMaxCluster || a.rows() * cs > 0x7fffffffLL) return false;
  int64_t chunk = (a.C + cs - 1) / cs;
  chunk = (chunk + vec - 1) / vec * vec;  // chunks start at the row's alignment phase
  switch (a.dtype) {
    case DType::F32: *err = launch_cluster<float>(a, cs, chunk, stream); break;
    case DType::F16: *err = launch_cluster<__half>(a, cs, chunk, stream); break;
    default: *err = launch_cluster<__nv_bfloat16>(a, cs, chunk, stream); break;
  }
  if (*err == cudaErrorNotSupported) {
    cudaGetLastError();
    return false;
  }
  if (*err == cudaSuccess) *err = cudaGetLastError();
  return true;
}

}  // namespace cuda
}  // namespace pykernels

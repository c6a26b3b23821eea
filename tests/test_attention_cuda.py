"""The CUDA attention kernels on the CPU tier (no GPU): the ops exist with the Triton ops' schemas, the binary holds
tensor-core (HMMA) code for every built arch without local memory, and the dispatch rules that keep calls the
kernels do not cover away from them. Their numerics run in the GPU tier: tests/test_attention.py and
tests/test_attention_ops.py are parametrised over every registered backend, "cuda" included."""
from __future__ import annotations

import pytest
import torch

import pykernels
from pykernels.functional import attention as fa
from pykernels.ops import attention as attn_ops

from test_build import exp2_between_branches, kernel_sass, no_local_memory, require_cuda_build

KERNELS = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")


def test_ops_registered_with_the_triton_schemas():
    require_cuda_build()
    assert "cuda" in attn_ops.KERNELS
    for kind in ("fwd", "bwd"):
        ours = str(getattr(torch.ops.pykernels, f"attention_{kind}").default._schema)
        triton = str(getattr(torch.ops.pykernels, f"attention_{kind}_triton").default._schema)
        assert ours == triton.replace(f"attention_{kind}_triton", f"attention_{kind}")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::attention_{kind}", "CUDA")


def test_sass_uses_tensor_cores_without_local_memory():
    """Per built arch, every instantiation (fp16/bf16 x head dim 64/128/256) of the three kernels: HMMA instructions
    fed by ldmatrix (LDSM, and its transposing form LDSM.MT for the P V-like products), cp.async tile copies (LDGSTS),
    no LDL/STL (local memory: spills or stack arrays)."""
    for sm, found in kernel_sass(KERNELS).items():
        assert {k: len(v) for k, v in found.items()} == {k: 6 for k in KERNELS}, f"{sm}: instantiations {found.keys()}"
        for kern, fns in found.items():
            for f in fns:
                assert "HMMA" in f, f"{sm} {kern}: no tensor-core instruction"
                assert "LDSM.16.M88" in f and "LDSM.16.MT88" in f, f"{sm} {kern}: fragments not by ldmatrix"
                assert "LDGSTS" in f, f"{sm} {kern}: no cp.async tile copies"
                assert no_local_memory(f), f"{sm} {kern}: local memory in the kernel"


def test_cuda_coverage_rules():
    f16 = torch.float16
    assert fa._cuda_reason(f16, (64, 64)) is None
    assert fa._cuda_reason(torch.bfloat16, (128, 96)) is None
    assert "dtype" in fa._cuda_reason(torch.float32, (64, 64))
    assert fa._cuda_reason(f16, (256, 200)) is None
    assert "head dim 320" in fa._cuda_reason(f16, (64, 320))
    assert fa._cuda_reason(f16, (64, 64), (65535 * 64, 7)) is None  # the grids' row-tile axis: 65535 tiles
    assert "sequence length 4194241" in fa._cuda_reason(f16, (64, 64), (7, 65535 * 64 + 1))
    # sm_86 / sm_89 (99 KB a block) cannot run the dQ kernel at head dims 129-256; an A100 (163 KB) can
    assert "135168 bytes" in fa._cuda_reason(f16, (256, 256), (7, 7), 101376)
    assert fa._cuda_reason(f16, (128, 128), (7, 7), 101376) is None
    assert fa._cuda_reason(f16, (256, 256), (7, 7), 166912) is None
    assert fa._cuda_reason(f16, (256, 256), (7, 7), None) is None  # no backward: the forward fits (101,376 B)
    # automatic calls on CUDA try triton (GPU-validated, measured) before the unmeasured cuda kernels
    from pykernels import backends
    for op in ("scaled_dot_product_attention", "varlen_attention", "lstm"):
        assert backends._chain(torch.device("cuda"), op) == ("triton", "cuda", "reference")
        assert backends._chain(torch.device("cpu"), op) == ("cpu", "reference")
    assert backends._chain(torch.device("cuda"), "cross_entropy") == ("cuda", "triton", "reference")


def test_backward_smem_is_read_under_compile_too(monkeypatch):
    """The shared memory that decides whether the cuda dQ kernel fits (head dims 129-256 on sm_86 / sm_89) is read
    under torch.compile as in eager calls, as a constant of the graph (pykernels/_device_props.py): compiled calls
    skipped the query and failed at the launch. No GPU needed: the device's properties are stood in for, a CPU
    tensor records the gradient, and the traced function branches on the value."""
    props = type("Props", (), {"multi_processor_count": 84, "shared_memory_per_block_optin": 101376})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    dev = torch.device("cuda", 0)

    def f(t):
        smem = fa._backward_smem(dev, (t,))
        why = fa._cuda_reason(torch.float16, (256, 256), (7, 7), smem)
        return t * (2.0 if why is not None and "135168 bytes" in why else 3.0), smem

    torch._dynamo.reset()
    t = torch.ones(2, requires_grad=True)
    out, smem = torch.compile(f, fullgraph=True)(t)
    assert smem == 101376 and out.tolist() == [2.0, 2.0]
    with torch.no_grad():  # no backward: no query, the forward fits
        out, smem = torch.compile(f, fullgraph=True)(t)
    assert smem is None and out.tolist() == [3.0, 3.0]
    torch._dynamo.reset()


def test_device_props_of_no_index_are_the_current_devices(monkeypatch):
    """index None (a call's device without an index) reads the current device, not device 0, on a multi-GPU host."""
    from pykernels import _device_props
    props = {i: type(f"P{i}", (), {"multi_processor_count": 10 * (i + 1),
                                   "shared_memory_per_block_optin": 1000 * (i + 1)}) for i in (0, 1)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props[d])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _device_props.smem_optin(None) == 2000 and _device_props.sm_count(None) == 20
    assert _device_props.smem_optin(0) == 1000 and _device_props.sm_count(0) == 10


def test_constant_mark_is_torchs():
    """pykernels marks its GPU queries as torch.compiler.assume_constant_result does, without importing Dynamo at
    `import pykernels`: the same attribute, and nothing else, as this torch's decorator sets."""
    from pykernels import _device_props

    def theirs():
        pass

    def ours():
        pass

    torch.compiler.assume_constant_result(theirs)
    _device_props.constant_under_compile(ours)
    assert theirs.__dict__ == ours.__dict__ == {"_dynamo_marked_constant": True}


def test_cuda_backend_on_cpu_tensors_says_why():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(pykernels.BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        fa.scaled_dot_product_attention(q, q, q, backend="cuda")


_PHILOX_MAIN = r'''
#include <cstdio>
#include <cstdlib>
#include "cuda/philox.h"
int main(int argc, char** argv) {
  const unsigned long long seed = strtoull(argv[1], nullptr, 10);
  const long long n = atoll(argv[2]);
  const float p = static_cast<float>(atof(argv[3]));
  for (long long i = 0; i < n; ++i) putchar(pykernels::dropout_keep(seed, i, p) ? '1' : '0');
  return 0;
}
'''


def test_cuda_dropout_mask_is_the_triton_mask(tmp_path):
    """csrc/cuda/philox.h (the CUDA kernels' keep-mask), compiled for this CPU, keeps exactly the scores the Triton
    kernels keep for the same seed: score (row, col) of a dense call is counter row * S + col."""
    import os
    import shutil
    import subprocess

    from pykernels import available_backends
    if available_backends("cpu")["triton"] is not None:
        pytest.skip("needs the Triton interpreter for the reference mask")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "philox_main.cpp"
    src.write_text(_PHILOX_MAIN)
    exe = tmp_path / "philox_main"
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{root}", str(src), "-o", str(exe)], check=True)
    B, H, L, S = 1, 2, 19, 23
    for seed, p in ((123456789012, 0.35), (2**61 + 977, 0.1)):
        out = subprocess.run([str(exe), str(seed), str(B * H * L * S), repr(p)], capture_output=True, text=True,
                             check=True).stdout
        ours = torch.tensor([c == "1" for c in out]).reshape(B, H, L, S)
        theirs = attn_ops.dropout_mask(torch.tensor([seed]), B, H, L, S, p).bool()
        assert 0.5 < ours.float().mean() < 1.0
        assert torch.equal(ours, theirs), f"seed {seed}: {(ours != theirs).sum()} of {ours.numel()} differ"


HOPPER_KERNELS = {  # kernel: the wgmma shapes (HGMMA.64xNx16) each instantiation must use, by padded head dim
    "attn_fwd_sm90a_kernel": {64: {64}, 128: {64, 128}, 256: {64, 256}},
    # S^T, dP^T at N = the query tile (64 at head dim 64, else 32); dK, dV at N = the gradient columns (128 max)
    "attn_bwd_dkdv_sm90a_kernel": {64: {64}, 128: {32, 128}, 256: {32, 128}},
    # S, dP at N = 64 keys; dQ at N = the gradient columns
    "attn_bwd_dq_sm90a_kernel": {64: {64}, 128: {64, 128}, 256: {64, 128}},
}


def test_hopper_kernels_use_wgmma_only_in_the_sm90a_binary():
    """The Hopper forward and backward kernels: HGMMA (wgmma) of the expected shapes in every instantiation (fp16/bf16
    x head dim 64/128/256) of the sm_90a binary, without local memory; in the other binaries a stub that traps (the
    dispatch checks which binary the device loaded: attention_sm90a_ready)."""
    import re
    arches = pykernels.build_info().get("arch_list", [])
    if "9.0a" not in arches:
        pytest.skip(f"built for {arches}: no sm_90a binary")
    for sm, found in kernel_sass(tuple(HOPPER_KERNELS)).items():
        for kern, by_dim in HOPPER_KERNELS.items():
            fns = found.get(kern, [])
            assert len(fns) == 6, f"{sm} {kern}: {len(fns)} instantiations"
            shapes = []
            for f in fns:
                assert no_local_memory(f), f"{sm} {kern}: local memory"
                assert ("HGMMA" in f) == (sm == "sm_90a"), f"{sm} {kern}: HGMMA {'HGMMA' in f}"
                shapes.append({int(n) for n in re.findall(r"HGMMA\.64x(\d+)x16", f)})
            if sm == "sm_90a":
                assert sorted(map(sorted, shapes)) == sorted(sorted(v) for v in by_dim.values() for _ in (0, 1)), \
                    f"{kern}: wgmma shapes {shapes}"
                # operands whose rows are the reduction read MN-major in place; tiles by cp.async
                assert all("tnspB" in f and "LDGSTS" in f for f in fns), kern


def test_hopper_tma_forward_is_warp_specialised_only_in_the_sm90a_binary():
    """attn_fwd_sm90a_tma_kernel (the FlashAttention-3-style forward: TMA loads into an mbarrier ring, a producer
    warpgroup and wgmma consumer warpgroups), every instantiation (fp16/bf16 x head dim 64/128/256) of the sm_90a
    binary: UTMALDG (cp.async.bulk.tensor), SYNCS (mbarrier init / arrive / try_wait), HGMMA with a transposed
    (MN-major) B operand (V read as TMA stored it), no local memory; setmaxnreg (USETMAXREG) where there are two
    consumer warpgroups (head dims 64, 128). In the other binaries a stub that traps."""
    import re
    arches = pykernels.build_info().get("arch_list", [])
    if "9.0a" not in arches:
        pytest.skip(f"built for {arches}: no sm_90a binary")
    for sm, found in kernel_sass(("attn_fwd_sm90a_tma_kernel",)).items():
        fns = found.get("attn_fwd_sm90a_tma_kernel", [])
        assert len(fns) == 6, f"{sm}: {len(fns)} instantiations"
        for f in fns:
            name = f.split("\n", 1)[0]
            assert no_local_memory(f), f"{sm} {name}: local memory"
            if sm != "sm_90a":
                assert "TRAP" in f and not re.search(r"\b(HGMMA|UTMALDG|SYNCS)", f), f"{sm} {name}: not a stub"
                continue
            for op in ("UTMALDG", "SYNCS.ARRIVE", "SYNCS.PHASECHK", "HGMMA"):
                assert op in f, f"{name}: no {op}"
            assert ".tnspB" in f, f"{name}: P V does not read V MN-major"
            assert ("USETMAXREG" in f) == ("Li256E" not in name), f"{name}: setmaxnreg"


_SW128_MAIN = r'''
// Checks, on the host, that the wgmma descriptors of the Hopper TMA forward (csrc/cuda/wgmma_sw128.cuh, the functions
// the kernel calls) address exactly the bytes where the TMA loads put each element. The descriptor is decoded and
// its addresses generated as the PTX ISA's canonical layouts define them (CUTLASS's notation, in 16-byte units,
// Swizzle<3,4,3> on the byte address):
//   K-major, 128-byte swizzle:  ((8, m), 2) : ((8, SBO), 1)          element (row r, k) of a k16 step
//   MN-major, 128-byte swizzle: ((8, n), (8, k)) : ((1, LBO), (8, SBO))  element (k, column n)
// and the TMA side by sw128_tma_offset (CU_TENSOR_MAP_SWIZZLE_128B: 16-byte chunk c of row r at c ^ (r % 8)).
#include <cstdio>
#include "cuda/wgmma_sw128.cuh"
using namespace pykernels::cuda;

static unsigned swz(unsigned a) { return a ^ (((a >> 7) & 7u) << 4); }
struct D { unsigned start, lbo, sbo, mode; };
static D decode(unsigned long long d) {
  return {unsigned(d & 0x3FFF) << 4, unsigned((d >> 16) & 0x3FFF) << 4, unsigned((d >> 32) & 0x3FFF) << 4,
          unsigned(d >> 62)};
}
static unsigned kmajor_addr(D d, int r, int k) {  // 16-bit elements: k in [0, 16)
  return swz(d.start + (r / 8) * d.sbo + (r % 8) * 128 + (k / 8) * 16 + (k % 8) * 2);
}
static unsigned mnmajor_addr(D d, int k, int n) {
  return swz(d.start + (n / 64) * d.lbo + (k / 8) * d.sbo + (k % 8) * 128 + ((n % 64) / 8) * 16 + (n % 8) * 2);
}
static int bad = 0;
static void expect(bool ok, const char* what, int a, int b, int c, int d) {
  if (!ok && bad++ < 10) printf("MISMATCH %s %d %d %d %d\n", what, a, b, c, d);
}

int main() {
  const unsigned base = 3 * 1024;  // any 1024-byte aligned tile
  // configurations of attn_fwd_sm90a_tma_kernel: (DP, BM, BN, SUB)
  const int cfg[3][4] = {{64, 128, 128, 128}, {128, 128, 128, 64}, {256, 64, 64, 64}};
  for (const auto& c : cfg) {
    const int DP = c[0], BM = c[1], BN = c[2], SUB = c[3];
    for (int w = 0; w < BM / 64; ++w)  // A = Q: this warpgroup's 64 rows, every k16 step of the head dim
      for (int kk = 0; kk < DP / 16; ++kk) {
        const D d = decode(sw128_kmajor_tile_desc(base, BM, 64 * w, kk));
        expect(d.mode == 1 && d.sbo == 1024, "Q fields", DP, w, kk, 0);
        for (int r = 0; r < 64; ++r)
          for (int k = 0; k < 16; ++k)
            expect(kmajor_addr(d, r, k) == base + sw128_tma_offset(BM, 64 * w + r, 16 * kk + k), "Q", DP, r, kk, k);
      }
    for (int sub = 0; sub < BN / SUB; ++sub) {
      for (int kk = 0; kk < DP / 16; ++kk) {  // B = K (N = SUB keys x K = 16 head-dim columns)
        const D d = decode(sw128_kmajor_tile_desc(base, BN, sub * SUB, kk));
        for (int n = 0; n < SUB; ++n)
          for (int k = 0; k < 16; ++k)
            expect(kmajor_addr(d, n, k) == base + sw128_tma_offset(BN, sub * SUB + n, 16 * kk + k), "K", DP, n, kk, k);
      }
      for (int kk = 0; kk < SUB / 16; ++kk) {  // B = V (K = 16 keys x N = DP head-dim columns), MN-major
        const D d = decode(sw128_mnmajor_tile_desc(base, BN, sub * SUB, kk));
        expect(d.mode == 1 && d.sbo == 1024 && d.lbo == unsigned(BN * 128), "V fields", DP, sub, kk, 0);
        for (int k = 0; k < 16; ++k)
          for (int n = 0; n < DP; ++n)
            expect(mnmajor_addr(d, k, n) == base + sw128_tma_offset(BN, sub * SUB + 16 * kk + k, n), "V", DP, k, kk, n);
      }
    }
  }
  printf(bad ? "FAILED %d\n" : "OK\n", bad);
  return bad != 0;
}
'''


def test_hopper_tma_descriptors_address_what_tma_wrote(tmp_path):
    """The swizzle-128B wgmma descriptors of the Hopper TMA forward (the header's functions, compiled for the host by
    nvcc) address, element for element, the shared-memory bytes where TMA's 128-byte swizzle puts Q, K and V:
    decoded and expanded as the PTX ISA's canonical K-major / MN-major layouts, for the kernel's three tile
    configurations, both consumer warpgroups and every k16 step and sub-tile."""
    _host_check(tmp_path, _SW128_MAIN)


_NOSW_MAIN = r"""
// Checks, on the host, that the no-swizzle wgmma descriptors of the Hopper fallback forward and the Hopper backward
// (kmajor_desc_at / mnmajor_desc_at of csrc/cuda/wgmma.cuh, at the offsets attention_sm90a_tiles.cuh uses) address
// exactly the elements the tile loads wrote (element (r, c) of a C-column tile at 2 kmajor_offset(r, c, C) bytes).
// The descriptor is decoded and expanded as the PTX ISA's canonical no-swizzle layouts (CUTLASS INTERLEAVE, bytes):
//   K-major,  element (row m, k < 16):  start + (m / 8) SBO + (m % 8) 16 + (k / 8) LBO + (k % 8) 2
//   MN-major, element (k < 16, col n):  start + (n / 8) SBO + (k / 8) LBO + (k % 8) 16 + (n % 8) 2
#include <cstdio>
#include "cuda/wgmma.cuh"
using namespace pykernels::cuda;

struct D { unsigned start, lbo, sbo, mode; };
static D decode(unsigned long long d) {
  return {unsigned(d & 0x3FFF) << 4, unsigned((d >> 16) & 0x3FFF) << 4, unsigned((d >> 32) & 0x3FFF) << 4,
          unsigned(d >> 62)};
}
static int bad = 0;
static void expect(bool ok, const char* what, int a, int b, int c, int d) {
  if (!ok && bad++ < 10) printf("MISMATCH %s %d %d %d %d\n", what, a, b, c, d);
}

int main() {
  const unsigned base = 4096;
  for (int C : {64, 128, 256}) {     // K-major reads: a tile of `rows` rows x C columns, k16 step kk at + 128 kk
    for (int rows : {32, 64}) {
      for (int kk = 0; kk < C / 16; ++kk) {
        const D d = decode(kmajor_desc_at(base + 2 * 128 * kk, C));
        expect(d.mode == 0, "K mode", C, rows, kk, 0);
        for (int m = 0; m < rows; ++m)
          for (int k = 0; k < 16; ++k)
            expect(d.start + (m / 8) * d.sbo + (m % 8) * 16 + (k / 8) * d.lbo + (k % 8) * 2 ==
                       base + 2 * kmajor_offset(m, 16 * kk + k, C), "K", C, m, kk, k);
      }
      // MN-major reads (wgmma_acc): rows are the reduction, columns [c0, c0 + N) the product's N
      for (int c0 : {0, 128}) {
        if (c0 >= C) continue;
        const int N = C - c0 < 128 ? C - c0 : 128;
        for (int kk = 0; kk < rows / 16; ++kk) {
          const D d = decode(mnmajor_desc_at(base + 2 * kmajor_offset(16 * kk, c0, C), C));
          for (int k = 0; k < 16; ++k)
            for (int n = 0; n < N; ++n)
              expect(d.start + (n / 8) * d.sbo + (k / 8) * d.lbo + (k % 8) * 16 + (n % 8) * 2 ==
                         base + 2 * kmajor_offset(16 * kk + k, c0 + n, C), "MN", C, k, kk, n);
        }
      }
    }
  }
  printf(bad ? "FAILED %d\n" : "OK\n", bad);
  return bad != 0;
}
"""


def test_hopper_noswizzle_descriptors_address_what_the_loads_wrote(tmp_path):
    """The no-swizzle wgmma descriptors (the Hopper backward and the fallback forward; csrc/cuda/wgmma.cuh, compiled
    for the host by nvcc), decoded and expanded as the PTX ISA's canonical K-major / MN-major layouts, address
    element for element where the tile loads put each value (kmajor_offset), for every k16 step, head dim 64/128/256,
    query tiles of 32 and 64 rows and both 128-column halves: swapped stride/leading offsets or a wrong step fail."""
    _host_check(tmp_path, _NOSW_MAIN)


def _host_check(tmp_path, main):
    import os
    import subprocess

    from test_build import _nvcc
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    src = tmp_path / "check_main.cu"
    src.write_text(main)
    exe = tmp_path / "check_main"
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    subprocess.run([nvcc, "-std=c++17", f"-I{root}", str(src), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-2000:]


# Scores a thread holds in one tile of each kernel (its accumulator elements: tile columns / 2 for a warp's 16 rows),
# by padded head dim: the count of exp2 (MUFU.EX2) a plain tile runs.
TILE_SCORES = {
    "attn_fwd_kernel": {64: 32, 128: 32, 256: 32},                 # 64 keys
    "attn_fwd_sm90a_kernel": {64: 32, 128: 32, 256: 32},           # 64 keys
    "attn_fwd_sm90a_tma_kernel": {64: 64, 128: 32, 256: 32},       # sub-tiles of 128 / 64 / 64 keys
    "attn_bwd_dq_kernel": {64: 32, 128: 32, 256: 32},              # 64 keys
    "attn_bwd_dq_sm90a_kernel": {64: 32, 128: 32, 256: 32},
    "attn_bwd_dkdv_kernel": {64: 16, 128: 16, 256: 8},             # 32 / 32 / 16 queries
    "attn_bwd_dkdv_sm90a_kernel": {64: 32, 128: 16, 256: 16},      # 64 / 32 / 32 queries
}


def test_plain_tiles_run_branch_free_score_code():
    """Each attention kernel picks its score code once per warp and tile (csrc/cuda/attention_tiles.cuh, tile_mode):
    a tile without soft cap, mask or dropout whose scores are all visible runs one straight stretch of SASS holding
    every exp2 of the tile, with no branch. The code that carries every option, inlined per score, branched around
    them score by score: 0 or 1 exp2 between branches in every kernel but the sm_80 forward (17), and a Hopper
    forward whose softmax of 64 keys was ~6,000 instructions long."""
    import re
    for sm, found in kernel_sass(tuple(TILE_SCORES)).items():
        for kern, by_dim in TILE_SCORES.items():
            for f in found.get(kern, []):
                name = f.split("\n", 1)[0]
                if "TRAP" in f and "MUFU" not in f:  # the sm_90a kernels' stubs in the other binaries
                    continue
                dp = int(re.search(r"Li(\d+)E", name).group(1))
                best = exp2_between_branches(f)
                assert best >= by_dim[dp], f"{sm} {kern} (head dim {dp}): {best} exp2 between branches"


_VISIBLE_MAIN = r'''
// all_visible (the test that lets a tile skip the per-score checks) against visible itself, score by score, over
// lengths, causal alignments, windows and tile positions (including tiles past the ends): exact both ways.
#include <cstdio>
#include "cuda/attention_tiles.cuh"
using namespace pykernels;
using namespace pykernels::cuda;

int main() {
  int bad = 0, tiles = 0, all = 0;
  const int lens[] = {1, 7, 16, 33, 80};
  const long long wins[] = {-1, 0, 5, 40};
  for (int L : lens)
    for (int S : lens)
      for (int causal = 0; causal < 2; ++causal)
        for (long long diag : {0ll, -3ll, 9ll})
          for (long long wl : wins)
            for (long long wr : wins) {
              AttentionArgs a;
              a.causal = causal;
              a.win_left = wl;
              a.win_right = wr;
              Seq s{0, 0, L, S, diag + (causal ? S - L : 0)};
              for (int rows : {8, 16})
                for (int cols : {8, 16, 64})
                  for (int ilo = 0; ilo < L + 8; ilo += 3)
                    for (int jlo = 0; jlo < S + 8; jlo += 5) {
                      bool every = true;
                      for (int i = ilo; i < ilo + rows; ++i)
                        for (int j = jlo; j < jlo + cols; ++j) every = every && visible(a, s, i, j);
                      const bool got = all_visible(a, s, ilo, ilo + rows, jlo, jlo + cols);
                      ++tiles;
                      all += every;
                      if (got != every && bad++ < 10)
                        printf("MISMATCH L=%d S=%d causal=%d d=%lld wl=%lld wr=%lld tile %d+%d x %d+%d: %d vs %d\n", L,
                               S, causal, (long long)s.d, wl, wr, ilo, rows, jlo, cols, got, every);
                    }
            }
  printf("%d tiles, %d all visible\n", tiles, all);
  if (all == 0 || all == tiles) ++bad;  // both outcomes must occur
  printf(bad ? "FAILED %d\n" : "OK\n", bad);
  return bad != 0;
}
'''


def test_tile_visibility_is_exact(tmp_path):
    """all_visible (csrc/cuda/attention_tiles.cuh, compiled for the host by nvcc) says a tile is fully visible exactly
    when visible() holds for every score in it: a false yes would skip masking (wrong results), a false no would
    send a full tile down the slower checked path."""
    _host_check(tmp_path, _VISIBLE_MAIN)


def test_finish_forward_rule_repairs_the_usual_large_mask_fills():
    """csrc/cuda/attention_tiles.cuh's finish_forward (mask hold kMaskHold2, lse_gaps, the lse nudges, the keep rule)
    replayed in float32 numpy, operation for operation: a row filled with a large mask value gets an lse_lo that the
    backward's dO scale can use (P~ <= 2^8, scale <= 1 + 2^-10) for every usual fill, fp32 / bf16 finfo.min
    included, at 2 to 1,024 keys; the first hold tried, -FLT_MAX, would not have survived the round trip. A mirror
    of the CUDA code, not the code itself: the GPU tier runs test_rows_masked_by_a_large_finite_value_as_torch."""
    np = pytest.importorskip("numpy")
    f = np.float32
    log2e, ln2 = f(1.4426950408889634), f(0.6931471805599453)
    hold = f(float.fromhex("-0x1.fffffcp+127"))
    with np.errstate(over="ignore"):
        assert f(f(f(-np.finfo(f).max) * ln2) * log2e) != -np.finfo(f).max
        assert f(f(hold * ln2) * log2e) == hold

        def kept(fill, n, rng):
            y = f(f(fill) * log2e)  # masked_score: x + mv * log2e, held where it overflows
            s = (rng.standard_normal(n).astype(f) * f(2) * log2e + (y if np.isfinite(y) else hold)).astype(f)
            m = s.max()
            log2_l = f(np.log2(np.sum(np.exp2(s - m), dtype=f)))
            lse = f(f(m + log2_l) * ln2)

            def gaps(lse):
                d = f(m - f(lse * log2e))  # lse_offset: __fmul_rn
                return d, f(d + log2_l)
            d, lo2 = gaps(lse)
            for _ in range(3):
                if lo2 >= -f(2.0 ** -10):
                    break
                lse = np.nextafter(lse, f(-np.inf))
                d, lo2 = gaps(lse)
            return d <= 8 and lo2 >= -f(2.0 ** -10)

        rng = np.random.default_rng(0)
        for fill in (-3.0, -1e4, -65504.0, -1e6, -1e7, -3e7, -1e8, -1e9, -1e12, -3.3895314e38, -3.4028235e38):
            for n in (2, 7, 64, 1024):
                assert all(kept(fill, n, rng) for _ in range(50)), (fill, n)

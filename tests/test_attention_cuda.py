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

from test_build import kernel_sass, no_local_memory, require_cuda_build

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
    """Per built arch, every instantiation (fp16/bf16 x head dim 64/128/256) of the three kernels: HMMA instructions,
    no LDL/STL (local memory: spills or stack arrays)."""
    for sm, found in kernel_sass(KERNELS).items():
        assert {k: len(v) for k, v in found.items()} == {k: 6 for k in KERNELS}, f"{sm}: instantiations {found.keys()}"
        for kern, fns in found.items():
            for f in fns:
                assert "HMMA" in f, f"{sm} {kern}: no tensor-core instruction"
                assert no_local_memory(f), f"{sm} {kern}: local memory in the kernel"


def test_cuda_coverage_rules():
    f16 = torch.float16
    assert fa._cuda_reason(f16, (64, 64)) is None
    assert fa._cuda_reason(torch.bfloat16, (128, 96)) is None
    assert "dtype" in fa._cuda_reason(torch.float32, (64, 64))
    assert fa._cuda_reason(f16, (256, 200)) is None
    assert "head dim 320" in fa._cuda_reason(f16, (64, 320))
    # automatic calls on CUDA try triton (GPU-validated, measured) before the unmeasured cuda kernels
    from pykernels import backends
    for op in ("scaled_dot_product_attention", "varlen_attention", "lstm"):
        assert backends._chain(torch.device("cuda"), op) == ("triton", "cuda", "reference")
        assert backends._chain(torch.device("cpu"), op) == ("cpu", "reference")
    assert backends._chain(torch.device("cuda"), "cross_entropy") == ("cuda", "triton", "reference")


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


def test_hopper_forward_uses_wgmma_only_in_the_sm90a_binary():
    """attn_fwd_sm90a_kernel: HGMMA (wgmma) in every instantiation (fp16/bf16 x head dim 64/128/256) of the sm_90a
    binary, without local memory; in the other binaries a stub that traps (the dispatch checks which binary the
    device loaded: attention_fwd_sm90a_ready)."""
    arches = pykernels.build_info().get("arch_list", [])
    if "9.0a" not in arches:
        pytest.skip(f"built for {arches}: no sm_90a binary")
    for sm, found in kernel_sass(("attn_fwd_sm90a_kernel",)).items():
        fns = found.get("attn_fwd_sm90a_kernel", [])
        assert len(fns) == 6, f"{sm}: {len(fns)} instantiations"
        for f in fns:
            assert no_local_memory(f), f"{sm}: local memory"
            assert ("HGMMA" in f) == (sm == "sm_90a"), f"{sm}: HGMMA {'HGMMA' in f}"


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

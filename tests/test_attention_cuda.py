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
    assert fa._cuda_reason(f16, (64, 64), 0.0) is None
    assert fa._cuda_reason(torch.bfloat16, (128, 96), 0.0) is None
    assert "dtype" in fa._cuda_reason(torch.float32, (64, 64), 0.0)
    assert fa._cuda_reason(f16, (256, 200), 0.0) is None
    assert "head dim 320" in fa._cuda_reason(f16, (64, 320), 0.0)
    assert "dropout" in fa._cuda_reason(f16, (64, 64), 0.1)
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

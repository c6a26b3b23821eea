"""The CUDA attention kernels on the CPU tier (no GPU): the ops exist with the Triton ops' schemas, the binary holds
tensor-core (HMMA) code for every built arch without local memory, and the dispatch rules that keep calls the
kernels do not cover away from them. Their numerics run in the GPU tier: tests/test_attention.py and
tests/test_attention_ops.py are parametrised over every registered backend, "cuda" included."""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

import pykernels
from pykernels.functional import attention as fa
from pykernels.ops import attention as attn_ops

from test_build import _cuobjdump, _so

KERNELS = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")


def _require_cuda_build():
    _so()
    if not pykernels.build_info().get("with_cuda"):
        pytest.skip("pykernels._C was built without CUDA kernels")


def test_ops_registered_with_the_triton_schemas():
    _require_cuda_build()
    assert "cuda" in attn_ops.KERNELS
    for kind in ("fwd", "bwd"):
        ours = str(getattr(torch.ops.pykernels, f"attention_{kind}").default._schema)
        triton = str(getattr(torch.ops.pykernels, f"attention_{kind}_triton").default._schema)
        assert ours == triton.replace(f"attention_{kind}_triton", f"attention_{kind}")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::attention_{kind}", "CUDA")


def test_sass_uses_tensor_cores_without_local_memory():
    """Per built arch, every instantiation (fp16/bf16 x head dim 64/128) of the three kernels: HMMA instructions,
    no LDL/STL (local memory: spills or stack arrays)."""
    _require_cuda_build()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    for arch in pykernels.build_info()["arch_list"]:
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        p = subprocess.run([tool, "--dump-sass", "--gpu-architecture", sm, _so()], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        functions = re.split(r"\n\s*Function : ", p.stdout)
        found = {}
        for f in functions:
            name = f.split("\n", 1)[0]
            kern = next((k for k in KERNELS if k in name), None)
            if kern is None:
                continue
            found.setdefault(kern, 0)
            found[kern] += 1
            assert "HMMA" in f, f"{sm} {name}: no tensor-core instruction"
            assert not re.search(r"\b(LDL|STL)\b", f), f"{sm} {name}: local memory in the kernel"
        assert found == {k: 4 for k in KERNELS}, f"{sm}: instantiations found {found}"


def test_cuda_coverage_rules():
    f16 = torch.float16
    assert fa._cuda_reason(f16, (64, 64), False, 0.0) is None
    assert fa._cuda_reason(torch.bfloat16, (128, 96), False, 0.0) is None
    assert "dtype" in fa._cuda_reason(torch.float32, (64, 64), False, 0.0)
    assert "head dim 256" in fa._cuda_reason(f16, (64, 256), False, 0.0)
    assert "attn_mask" in fa._cuda_reason(f16, (64, 64), True, 0.0)
    assert "dropout" in fa._cuda_reason(f16, (64, 64), False, 0.1)
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

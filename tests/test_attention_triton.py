"""Triton attention kernels (pykernels::attention, backend "triton") against the float64 oracle: forward, lse
and every input gradient, odd lengths, L != S, GQA, both causal alignments, windows, softcap, bool/float masks,
non-contiguous inputs; the Triton interpreter on the CPU tier (fp32/fp16), CUDA in the GPU tier."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pykernels.reference import attention as ref
from pykernels.testing import assert_error_rule

from conftest import require_backend

DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
CASES = [  # (B, H, Hk, L, S, E, Ev, causal, alignment, window, softcap, mask, why)
    (1, 2, 2, 1, 1, 16, 16, False, "top_left", (-1, -1), 0.0, None, "one query, one key"),
    (2, 2, 2, 17, 17, 32, 32, True, "top_left", (-1, -1), 0.0, None, "odd length, causal"),
    (1, 4, 2, 33, 20, 24, 40, True, "bottom_right", (-1, -1), 0.0, None, "L > S, GQA, Ev != E, odd E"),
    (1, 2, 1, 20, 33, 64, 64, True, "top_left", (-1, -1), 0.0, None, "L < S top-left, MQA"),
    (1, 2, 2, 19, 19, 32, 32, True, "top_left", (5, 0), 2.0, "bool", "window + softcap + bool mask"),
    (1, 2, 2, 9, 30, 16, 16, False, "top_left", (3, 4), 0.0, "float", "two-sided window + float mask"),
    (2, 2, 2, 18, 18, 16, 16, False, "top_left", (-1, -1), 0.0, "rows", "fully masked query rows"),
]


def _mask(kind, B, H, L, S, device):
    if kind == "bool":
        return torch.rand(L, S, device=device) < 0.8
    if kind == "float":
        return torch.randn(1, H, L, S, device=device)
    if kind == "rows":
        m = torch.rand(B, 1, L, S, device=device) < 0.7
        m[:, :, 3] = False
        return m
    return None


def _bias(mask):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_forward_backward_against_oracle(device, dtype, case):
    require_backend("triton", device)
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter computes bf16 tl.dot wrongly (TOOLCHAIN.md)")
    B, H, Hk, L, S, E, Ev, causal, align, window, cap, kind, _ = case
    q = torch.randn(B, H, L, E, device=device).to(dtype)
    k = torch.randn(B, Hk, S, E, device=device).to(dtype)
    v = torch.randn(B, Hk, S, Ev, device=device).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    mask = _mask(kind, B, H, L, S, device)
    scale = 1 / math.sqrt(E)
    diag = S - L if align == "bottom_right" else 0
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, lse = torch.ops.pykernels.attention(*x, _bias(mask), scale, causal, diag, window[0], window[1], cap, "triton")
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, x, g)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ro, rl = ref.scaled_dot_product_attention(*x64, attn_mask=m64, is_causal=causal, enable_gqa=True,
                                             alignment=align, window=window, softcap=cap)
    rgrads = torch.autograd.grad(ro, x64, g.double())
    base, bgrads = None, [None] * 3
    if align == "top_left" and window == (-1, -1) and not cap:  # torch's own SDPA at this dtype: the baseline
        xb = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        base = F.scaled_dot_product_attention(*xb, attn_mask=None if mask is None else mask.to(dtype)
                                              if mask.dtype != torch.bool else mask, is_causal=causal,
                                              enable_gqa=H != Hk, scale=scale)
        bgrads = torch.autograd.grad(base, xb, g)
    floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert_error_rule("out", o, ro, base, floor=floor)
    fin = torch.isfinite(rl)
    assert bool((torch.isinf(lse) == ~fin).all())
    assert_error_rule("lse", lse[fin], rl[fin], floor=2e-5)
    for name, a, r, b in zip(("dq", "dk", "dv"), grads, rgrads, bgrads):
        assert_error_rule(name, a, r, b, floor=floor)


def test_opcheck_interpreted():
    require_backend("triton", "cpu")
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 11, 16), torch.randn(1, 1, 11, 16)
    for causal in (False, True):
        torch.library.opcheck(torch.ops.pykernels.attention.default,
                              (q.requires_grad_(), k, v, None, 0.25, causal, 2, -1, -1, 0.0, "triton"),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


_COMPILE = '''
import os, sys, json
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, {root!r})
from pykernels.triton import attention as a
from pykernels.triton._compile import compile_for, spills
out = []
strides = ["sqb", "sqh", "sqm", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd", "sbb", "sbh", "sbm",
           "sbn"]
for arch in (80, 90):
    for dt in ("bf16", "fp16"):
        for kern, extra_ptrs, extra_strides in ((a._attn_fwd, ["O", "LSE"], ["sob", "soh", "som", "sod"]),
                                                (a._attn_bwd_dkdv, ["DO", "LSE", "DELTA", "DK", "DV"], ["sdb", "sdh", "sdm", "sdd"]),
                                                (a._attn_bwd_dq, ["DO", "LSE", "DELTA", "DQ"], ["sdb", "sdh", "sdm", "sdd"])):
            sig = {{"Q": f"*{{dt}}", "K": f"*{{dt}}", "V": f"*{{dt}}", "Bias": "*fp32"}}
            for p in extra_ptrs:
                sig[p] = "*fp32" if p in ("LSE", "DELTA") else f"*{{dt}}"
            for s in strides + extra_strides:
                sig[s] = "i64"
            sig.update({{"H": "i32", "GROUP": "i32", "L": "i32", "S": "i32", "HEAD_E": "i32", "HEAD_EV": "i32",
                        "scale": "fp32", "softcap": "fp32", "diag": "i32", "win_left": "i32", "win_right": "i32"}})
            c = compile_for(kern, sig, dict(IS_CAUSAL=True, HAS_WINDOW=False, SOFTCAP=False, HAS_BIAS=False,
                                            IEEE=False, E=128, EV=128, BLOCK_M=64 if kern is not a._attn_fwd else 128,
                                            BLOCK_N=64 if kern is a._attn_fwd else 32), arch, num_warps=4)
            ptx = c.asm["ptx"]
            out.append((kern.__name__ if hasattr(kern, "__name__") else str(kern), arch, dt, "wgmma" in ptx,
                        "mma.sync" in ptx, spills(c)))
print(json.dumps(out))
'''


def test_kernels_compile_for_sm80_and_sm90():
    """Compiled for real targets without a GPU: mma.sync on sm_80; the sm_90 bf16 forward must use wgmma."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _COMPILE.format(root=root)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    import json
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(rows) == 12
    for name, arch, dt, wgmma, mma, _ in rows:
        assert wgmma or mma, (name, arch, dt)
        if arch == 90 and "fwd" in name and dt == "bf16":
            assert wgmma, f"{name} sm_90 bf16 has no wgmma"

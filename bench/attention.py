"""Attention suite: scaled dot-product attention on (B, H, L, E) query/key/value, self-attention (S = L), causal or
not, forward + backward (a fixed random output gradient) and forward alone.

FLOPs (the two matmuls QK^T and PV, 2 FLOPs per multiply-add): forward ``4 * B * H * L * L * E``, half of it
causal (the masked half of the score matrix is skipped); forward + backward 3.5x the forward (the backward's five
matmuls: recomputed QK^T, dV, dP, dQ, dK, as FlashAttention-2 counts it). No byte model: the op is compute-bound.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .harness import Case, Provider
from .providers import allow_recompiles, implemented, normalised_errors, peer, pykernels_providers, tolerance

NAME = "attention"
MODES = ("fwd+bwd", "fwd")
PRESETS = {  # (device type, quick) -> [(B, H, L, E, causal)]
    ("cuda", False): [(8, 16, 1024, 64, 0), (8, 16, 1024, 64, 1), (4, 16, 4096, 64, 1), (4, 16, 2048, 128, 0),
                      (4, 16, 2048, 128, 1), (2, 16, 8192, 128, 1)],
    ("cuda", True): [(4, 16, 2048, 128, 1)],
    ("cpu", False): [(2, 8, 512, 64, 0), (2, 8, 512, 64, 1)],
    ("cpu", True): [(1, 4, 256, 64, 1)],
}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def flops(B: int, H: int, L: int, E: int, causal: bool, mode: str) -> float:
    fwd = 4 * B * H * L * L * E * (0.5 if causal else 1.0)
    return 3.5 * fwd if mode == "fwd+bwd" else fwd


def reference_attention(q, k, v, grad_out, causal: bool, chunk_bytes: int = 1 << 28):
    """(out, dq, dk, dv) in float32, by (batch, head) chunks so the (L, L) score matrices of one chunk stay under
    about ``chunk_bytes`` (8192^2 fp32 scores are 256 MiB per head)."""
    B, H, L, E = q.shape
    scale = 1.0 / math.sqrt(E)
    qf, kf, vf, gf = (t.reshape(B * H, L, E) for t in (q, k, v, grad_out))
    outs = [torch.empty(B * H, L, E, device=q.device, dtype=torch.float32) for _ in range(4)]
    step = max(1, chunk_bytes // (3 * 4 * L * L))  # scores, probabilities and their gradient live at once
    mask = torch.ones(L, L, device=q.device, dtype=torch.bool).tril() if causal else None
    for s in range(0, B * H, step):
        qc, kc, vc = (t[s:s + step].detach().float().requires_grad_() for t in (qf, kf, vf))
        with torch.enable_grad():
            scores = (qc @ kc.transpose(1, 2)) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ vc
            grads = torch.autograd.grad(o, (qc, kc, vc), gf[s:s + step].float())
        for dst, src in zip(outs, (o.detach(),) + grads):
            dst[s:s + step] = src
    return tuple(t.reshape(B, H, L, E) for t in outs)


class AttentionCase(Case):
    suite = NAME

    def __init__(self, B: int, H: int, L: int, E: int, causal: bool, dtype: torch.dtype, device: torch.device):
        self.B, self.H, self.L, self.E, self.causal = B, H, L, E, bool(causal)
        self.dtype, self.device = dtype, device
        self.name = f"B={B} H={H} L={L} E={E}" + (" causal" if causal else "")
        self.shape = {"B": B, "H": H, "L": L, "E": E, "causal": int(causal)}
        self.tol = tolerance(dtype)

    def inputs(self):
        q, k, v = (torch.randn(self.B, self.H, self.L, self.E, device=self.device).to(self.dtype) for _ in range(3))
        self.grad_out = torch.randn_like(q)  # the backward's input: random, never zeros or ones
        return (q, k, v, self.causal), (0, 1, 2)

    def reference(self, args):
        q, k, v, causal = args
        return reference_attention(q, k, v, self.grad_out, causal)

    def backward(self, out):
        out.backward(self.grad_out)

    def errors(self, ref, out, grads, mode):
        pairs = [(out, ref[0])] + (list(zip(grads, ref[1:])) if mode == "fwd+bwd" else [])
        return normalised_errors(pairs)

    def flops(self, mode):
        return flops(self.B, self.H, self.L, self.E, self.causal, mode)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    shapes = ([(shape["B"], shape["H"], shape["L"], shape["E"], shape.get("causal", 0))] if shape
              else PRESETS[(device.type, quick)])
    return [AttentionCase(*s, dtype, device) for s in shapes]


def _kernels():
    from pykernels.ops import attention as ops
    return implemented(ops.KERNELS)


def _pykernels(backend: str):
    def fn(q, k, v, causal):
        import pykernels
        return pykernels.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    return fn


def _torch(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa(name: str, device: torch.device) -> Provider:
    """torch's SDPA restricted to one of its backends (sdpa_kernel); flash and math also run on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    prov = Provider(f"sdpa-{name}", baseline=True)
    if device.type != "cuda" and name in ("efficient", "cudnn"):
        prov.absent = f"SDPA's {name} backend runs on CUDA only"
        return prov

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    prov.fn = fn
    return prov


def _flex():
    """FlexAttention compiled (its eager mode materialises the scores); the causal block mask is built once per
    sequence length, outside the timed call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    allow_recompiles(64)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def fn(q, k, v, causal):
        L = q.shape[-2]
        if causal and L not in masks:
            masks[L] = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device=q.device)
        return compiled(q, k, v, block_mask=masks[L] if causal else None)
    return fn


def _flash_attn():
    from flash_attn import flash_attn_func

    def fn(q, k, v, causal):  # flash-attn takes (B, L, H, E): transposed views, no copies
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    return fn


def _cuda_mma_sync(out: List[Provider]) -> Provider:
    """The cuda backend with its Hopper kernels off (PYKERNELS_ATTN_NO_SM90A=1, read at each call): the sm_80
    mma.sync kernels, to time them beside the wgmma/TMA ones in one run: ``--backends cuda,cuda-mma-sync``."""
    cuda = next(p for p in out if p.name == "pykernels-cuda")
    run = _pykernels("cuda")

    def fn(q, k, v, causal):
        prev = os.environ.get("PYKERNELS_ATTN_NO_SM90A")
        os.environ["PYKERNELS_ATTN_NO_SM90A"] = "1"
        try:
            return run(q, k, v, causal)
        finally:
            if prev is None:
                del os.environ["PYKERNELS_ATTN_NO_SM90A"]
            else:
                os.environ["PYKERNELS_ATTN_NO_SM90A"] = prev
    return Provider("pykernels-cuda-mma-sync", fn, cuda.absent, default=False)


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    """pykernels-<backend> (and, on request, the cuda backend on its mma.sync kernels), then torch's SDPA as
    dispatched by torch ("torch") and pinned to each of its backends, FlexAttention (CUDA) and flash-attn when
    importable."""
    out = pykernels_providers(device, _pykernels, _kernels)
    out.append(_cuda_mma_sync(out))
    out.append(Provider("torch", _torch, baseline=True))
    out += [_sdpa(name, device) for name in SDPA_BACKENDS]
    out.append(peer("flex_attention", device, _flex))
    out.append(peer("flash-attn", device, _flash_attn))
    return out

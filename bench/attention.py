"""Attention suite: scaled dot-product attention, self-attention (S = L), causal or not, on (B, H, L, E) queries
with H or (GQA) Hkv key/value heads, and on packed variable-length batches (T, H, E) with cumulative sequence
offsets; forward + backward (a fixed random output gradient), forward alone and backward alone.

FLOPs (the two matmuls QK^T and PV, 2 FLOPs per multiply-add, counted on the query heads): forward
``4 * B * H * L * L * E``, half of it causal (the masked half of the score matrix is skipped), summed over the
sequences of a varlen batch; the backward 2.5x the forward (its five matmuls: recomputed QK^T, dV, dP, dQ, dK, as
FlashAttention-2 counts it), forward + backward 3.5x. No byte model: the op is compute-bound.

Shapes (``--shape``): dense ``B=4,H=16,L=2048,E=128,causal=1`` (add ``Hkv=4`` for GQA); varlen
``T=16384,H=16,E=128,causal=1`` (add ``nseq=8``): T tokens cut into nseq sequences at seeded random points.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .harness import BACKWARD_MODES, Case, Provider, check_shape_values
from .providers import allow_recompiles, implemented, normalised_errors, peer, pykernels_providers, tolerance

NAME = "attention"
MODES = ("fwd+bwd", "fwd", "bwd")


def _dense(B, H, L, E, causal, Hkv=None):
    return {"B": B, "H": H, "L": L, "E": E, "causal": causal, **({"Hkv": Hkv} if Hkv else {})}


def _varlen(T, H, E, causal, nseq):
    return {"T": T, "H": H, "E": E, "causal": causal, "nseq": nseq}


PRESETS = {  # (device type, quick) -> shapes: the H100 run's, a GQA one (Hq 32, Hkv 8) and a varlen batch of 16k
    ("cuda", False): [_dense(8, 16, 1024, 64, 0), _dense(8, 16, 1024, 64, 1), _dense(4, 16, 4096, 64, 1),
                      _dense(4, 16, 2048, 128, 0), _dense(4, 16, 2048, 128, 1), _dense(2, 16, 8192, 128, 1),
                      _dense(2, 32, 4096, 128, 1, Hkv=8), _varlen(16384, 16, 128, 1, 8)],
    ("cuda", True): [_dense(4, 16, 2048, 128, 1)],
    ("cpu", False): [_dense(2, 8, 512, 64, 0), _dense(2, 8, 512, 64, 1), _dense(2, 8, 256, 64, 1, Hkv=2),
                     _varlen(1024, 8, 64, 1, 4)],
    ("cpu", True): [_dense(1, 4, 256, 64, 1)],
}
# --preset: FlashAttention-2's grid (batch x seqlen = 16k tokens, H x E = 2048, seqlen 512..16k, E 64/128/256)
# and the Triton tutorial's (B = 4, H = 32, seqlen 1k..16k, E 64/128), causal and not
NAMED_PRESETS = {
    "fa2": [_dense(16384 // L, 2048 // E, L, E, c) for E in (64, 128, 256) for c in (0, 1)
            for L in (512, 1024, 2048, 4096, 8192, 16384)],
    "tutorial": [_dense(4, 32, L, E, c) for E in (64, 128) for c in (0, 1) for L in (1024, 2048, 4096, 8192, 16384)],
}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def flops(B: int, H: int, L: int, E: int, causal: bool, mode: str) -> float:
    return 4 * B * H * L * L * E * (0.5 if causal else 1.0) * MODE_FACTOR[mode]


def varlen_bounds(T: int, nseq: int) -> List[int]:
    """Offsets 0 = c_0 < ... < c_nseq = T of nseq sequences cut at random points (seeded by T and nseq, so every
    run and provider sees the same batch): lengths spread from a few tokens to several times T / nseq."""
    if not 1 <= nseq <= T:
        raise ValueError(f"nseq must be in [1, T={T}], got {nseq}")
    g = torch.Generator().manual_seed(T * 7919 + nseq)
    cuts = (torch.randperm(T - 1, generator=g)[:nseq - 1] + 1).sort().values.tolist()
    return [0] + cuts + [T]


def reference_attention(q, k, v, grad_out, causal: bool, chunk_bytes: int = 1 << 28):
    """(out, dq, dk, dv) in float32 of q (B, H, L, E), k/v (B, Hkv, L, E) (GQA: each kv head serves H / Hkv query
    heads; its gradients sum theirs), by (batch, head) chunks so the (L, L) score matrices of one chunk stay under
    about ``chunk_bytes`` (8192^2 fp32 scores are 256 MiB per head)."""
    B, H, L, E = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads {H} are not a multiple of key/value heads {Hkv}")
    k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
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
    o, dq, dk, dv = (t.reshape(B, H, L, E) for t in outs)
    dk, dv = (t.reshape(B, Hkv, H // Hkv, L, E).sum(2) for t in (dk, dv))
    return o, dq, dk, dv


def reference_varlen(q, k, v, grad_out, causal: bool, bounds: Sequence[int]):
    """(out, dq, dk, dv) in float32 of packed q (T, H, E), k/v (T, Hkv, E): each sequence on its own."""
    outs = [[] for _ in range(4)]
    for s, e in zip(bounds, bounds[1:]):
        seq = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v, grad_out))
        for dst, src in zip(outs, reference_attention(*seq, causal)):
            dst.append(src[0].transpose(0, 1))
    return tuple(torch.cat(t) for t in outs)


class AttentionCase(Case):
    """Dense (B, H, L, E) self-attention, GQA when Hkv < H. The call's arguments: (q, k, v, causal)."""
    suite = NAME

    def __init__(self, B: int, H: int, L: int, E: int, causal: bool, dtype: torch.dtype, device: torch.device,
                 Hkv: Optional[int] = None):
        Hkv = Hkv or H
        if H % Hkv:
            raise ValueError(f"H={H} must be a multiple of Hkv={Hkv}")
        self.B, self.H, self.Hkv, self.L, self.E, self.causal = B, H, Hkv, L, E, bool(causal)
        self.dtype, self.device = dtype, device
        # a leading word names a family of cases (its own plot: bench/report.py plot_groups)
        self.name = (f"gqa B={B} H={H} Hkv={Hkv}" if Hkv != H else f"B={B} H={H}") + f" L={L} E={E}" + (
            " causal" if causal else "")
        self.shape = _dense(B, H, L, E, int(causal), Hkv if Hkv != H else None)
        self.tol = tolerance(dtype)

    def _randn(self, *shape):
        return torch.randn(*shape, device=self.device).to(self.dtype)

    def inputs(self):
        q = self._randn(self.B, self.H, self.L, self.E)
        k, v = (self._randn(self.B, self.Hkv, self.L, self.E) for _ in range(2))
        self.grad_out = torch.randn_like(q)  # the backward's input: random, never zeros or ones
        return (q, k, v, self.causal), (0, 1, 2)

    def reference(self, args):
        q, k, v, causal = args[:4]
        return reference_attention(q, k, v, self.grad_out, causal)

    def backward(self, out, retain_graph=False):
        out.backward(self.grad_out, retain_graph=retain_graph)

    def errors(self, ref, out, grads, mode):
        pairs = [(out, ref[0])] + (list(zip(grads, ref[1:])) if mode in BACKWARD_MODES else [])
        return normalised_errors(pairs)

    def flops(self, mode):
        return flops(self.B, self.H, self.L, self.E, self.causal, mode)


class VarlenCase(AttentionCase):
    """A packed batch of nseq sequences of random lengths, T tokens in all, (T, H, E) each of q, k, v. The
    call's arguments: (q, k, v, causal, cu_seqlens int32 on the device, max_seqlen, offsets as Python ints)."""

    def __init__(self, T: int, H: int, E: int, causal: bool, nseq: int, dtype: torch.dtype, device: torch.device):
        self.T, self.H, self.Hkv, self.E, self.causal, self.nseq = T, H, H, E, bool(causal), nseq
        self.bounds = varlen_bounds(T, nseq)
        self.lengths = [e - s for s, e in zip(self.bounds, self.bounds[1:])]
        self.dtype, self.device = dtype, device
        self.name = f"varlen T={T} nseq={nseq} H={H} E={E}" + (" causal" if causal else "")
        self.shape = _varlen(T, H, E, int(causal), nseq)
        self.tol = tolerance(dtype)

    def inputs(self):
        q, k, v = (self._randn(self.T, self.H, self.E) for _ in range(3))
        self.grad_out = torch.randn_like(q)
        cu = torch.tensor(self.bounds, dtype=torch.int32, device=self.device)
        return (q, k, v, self.causal, cu, max(self.lengths), tuple(self.bounds)), (0, 1, 2)

    def reference(self, args):
        q, k, v, causal = args[:4]
        return reference_varlen(q, k, v, self.grad_out, causal, self.bounds)

    def flops(self, mode):
        return sum(flops(1, self.H, n, self.E, self.causal, mode) for n in self.lengths)


def make_case(shape: Dict[str, int], dtype: torch.dtype, device: torch.device) -> Case:
    """A case from a shape dict (a preset's or --shape's): varlen when it names T, else dense."""
    keys = ({"T", "H", "E", "causal", "nseq"} if "T" in shape else {"B", "H", "L", "E", "causal", "Hkv"})
    if set(shape) - keys:
        raise ValueError(f"attention shape {shape}: unknown {','.join(sorted(set(shape) - keys))}; dense "
                         f"B,H,L,E[,causal,Hkv] or varlen T,H,E[,causal,nseq]")
    check_shape_values(shape, sizes=sorted(keys - {"causal"}), flags=("causal",))  # not 2 read as causal
    try:
        if "T" in shape:
            return VarlenCase(shape["T"], shape["H"], shape["E"], shape.get("causal", 0),
                              shape.get("nseq", max(1, shape["T"] // 2048)), dtype, device)
        return AttentionCase(shape["B"], shape["H"], shape["L"], shape["E"], shape.get("causal", 0), dtype, device,
                             Hkv=shape.get("Hkv"))
    except KeyError as e:
        raise ValueError(f"attention shape {shape} lacks {e}: dense B,H,L,E[,causal,Hkv] or varlen "
                         f"T,H,E[,causal,nseq]") from None


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    return [make_case(s, dtype, device) for s in ([shape] if shape else PRESETS[(device.type, quick)])]


def _kernels():
    from pykernels.ops import attention as ops
    return implemented(ops.KERNELS)


def _gqa(q, k) -> bool:
    return k.shape[-3] != q.shape[-3]


def _pykernels(backend: str):
    def fn(q, k, v, causal, cu=None, max_len=None, bounds=None):
        import pykernels
        f = pykernels.functional
        if cu is not None:
            return f.varlen_attention(q, k, v, cu, cu, max_len, max_len, is_causal=causal, backend=backend)
        return f.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=_gqa(q, k), backend=backend)
    return fn


def _torch(q, k, v, causal, cu=None, max_len=None, bounds=None):
    """torch's SDPA; a varlen batch one sequence at a time (what a torch user without varlen kernels runs)."""
    if cu is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=_gqa(q, k))
    outs = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=causal,
                                           enable_gqa=_gqa(q, k)).transpose(0, 1)
            for s, e in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def _sdpa(name: str, device: torch.device) -> Provider:
    """torch's SDPA restricted to one of its backends (sdpa_kernel); flash and math also run on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    prov = Provider(f"sdpa-{name}", baseline=True)
    if device.type != "cuda" and name in ("efficient", "cudnn"):
        prov.absent = f"SDPA's {name} backend runs on CUDA only"
        return prov

    def fn(*args):
        with sdpa_kernel(backend):
            return _torch(*args)
    prov.fn = fn
    return prov


def _flex():
    """FlexAttention compiled (its eager mode materialises the scores). Block masks (causal; a varlen batch's
    document mask: a query sees the keys of its own sequence) are built once per shape, outside the timed call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    allow_recompiles(64)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def fn(q, k, v, causal, cu=None, max_len=None, bounds=None):
        if cu is None:
            L = q.shape[-2]
            if causal and L not in masks:
                masks[L] = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device=q.device)
            return compiled(q, k, v, block_mask=masks[L] if causal else None, enable_gqa=_gqa(q, k))
        key = (tuple(bounds), causal)
        if key not in masks:
            T = q.shape[0]
            doc = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=q.device),
                                          torch.tensor([e - s for s, e in zip(bounds, bounds[1:])], device=q.device))

            def same_doc(b, h, i, j):
                return (doc[i] == doc[j]) & (i >= j) if causal else doc[i] == doc[j]
            masks[key] = create_block_mask(same_doc, None, None, T, T, device=q.device)
        out = compiled(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=masks[key],
                       enable_gqa=_gqa(q, k))
        return out[0].transpose(0, 1)
    return fn


def _flash_attn():
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    def fn(q, k, v, causal, cu=None, max_len=None, bounds=None):
        if cu is not None:  # flash-attn's own layout (T, H, E); causal per sequence (L = S: either alignment)
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
        # flash-attn takes (B, L, H, E): transposed views, no copies; GQA natively
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    return fn


def _cuda_mma_sync(out: List[Provider]) -> Provider:
    """The cuda backend with its Hopper kernels off (PYKERNELS_ATTN_NO_SM90A=1, read at each call): the sm_80
    mma.sync kernels, to time them beside the wgmma/TMA ones in one run: ``--backends cuda,cuda-mma-sync``."""
    cuda = next(p for p in out if p.name == "pykernels-cuda")
    run = _pykernels("cuda")

    def fn(*args):
        prev = os.environ.get("PYKERNELS_ATTN_NO_SM90A")
        os.environ["PYKERNELS_ATTN_NO_SM90A"] = "1"
        try:
            return run(*args)
        finally:
            if prev is None:
                del os.environ["PYKERNELS_ATTN_NO_SM90A"]
            else:
                os.environ["PYKERNELS_ATTN_NO_SM90A"] = prev
    return Provider("pykernels-cuda-mma-sync", fn, cuda.absent, default=False)


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    """pykernels-<backend> (and, on request, the cuda backend on its mma.sync kernels), then torch's SDPA as
    dispatched by torch ("torch") and pinned to each of its backends, FlexAttention (CUDA) and flash-attn when
    importable. Every provider takes the dense and the varlen cases' arguments."""
    out = pykernels_providers(device, _pykernels, _kernels)
    out.append(_cuda_mma_sync(out))
    out.append(Provider("torch", _torch, baseline=True))
    out += [_sdpa(name, device) for name in SDPA_BACKENDS]
    out.append(peer("flex_attention", device, _flex))
    out.append(peer("flash-attn", device, _flash_attn))
    return out

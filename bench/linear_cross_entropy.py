"""Linear cross-entropy suite: the mean cross-entropy of ``x @ W.t()`` (x (N, H) hidden states, W (V, H) the
output projection) with class-index targets (every 17th row ignored, as in padded batches), forward + backward
(dx and dW) and forward alone. What matters besides time is the peak memory (``peak_extra_mem_bytes``): the
unfused path materialises the N x V logits (and their fp32 copy and gradient).

FLOPs (2 per multiply-add): forward ``2 * N * H * V`` (the logits GEMM); forward + backward ``6 * N * H * V``
(plus dx = dlogits @ W and dW = dlogits^T @ x). Kernels that recompute the logits in the backward do more work than
this; the model counts the useful work only. No byte model: the op is compute-bound.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cross_entropy import IGNORE_EVERY, reference_ce
from .harness import Case, Provider
from .providers import allow_recompiles, implemented, normalised_errors, peer, pykernels_providers, tolerance

NAME = "linear_cross_entropy"
MODES = ("fwd+bwd", "fwd")
PRESETS = {  # (device type, quick) -> [(N, H, V)]
    # the last: issue 6's target shape (<= 45 ms fwd+bwd in bf16 on an H100, <= 0.5 GB extra memory)
    ("cuda", False): [(8192, 2048, 32000), (8192, 2048, 128256), (4096, 4096, 151936), (8192, 4096, 128256)],
    ("cuda", True): [(8192, 2048, 128256)],
    ("cpu", False): [(1024, 256, 8192)],
    ("cpu", True): [(256, 128, 4096)],
}
CHUNK_BYTES = 1 << 28  # fp32 logits per row chunk of the chunked baseline and the reference


def flops(N: int, H: int, V: int, mode: str) -> float:
    return float((6 if mode == "fwd+bwd" else 2) * N * H * V)


def reference_lce(x, W, t, ignore_index: int = -100, chunk_bytes: int = CHUNK_BYTES):
    """(loss, dx, dW) in float32, row chunk by row chunk (only one chunk's logits live at a time)."""
    N, H = x.shape
    V = W.shape[0]
    Wf = W.float()
    keep = t != ignore_index
    count = keep.sum().clamp(min=1).to(torch.float64)
    dx = torch.empty(N, H, device=x.device, dtype=torch.float32)
    dW = torch.zeros(V, H, device=x.device, dtype=torch.float32)
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    step = max(1, chunk_bytes // (4 * V))
    for s in range(0, N, step):
        xc = x[s:s + step].float()
        loss_c, g = reference_ce(xc @ Wf.t(), t[s:s + step], ignore_index, chunk_bytes)  # mean over the chunk
        kept = keep[s:s + step].sum()
        total += loss_c.double() * kept
        g *= (kept / count).float()
        dx[s:s + step] = g @ Wf
        dW += g.t() @ xc
    return (total / count).float(), dx, dW


class LinearCrossEntropyCase(Case):
    suite = NAME

    def __init__(self, N: int, H: int, V: int, dtype: torch.dtype, device: torch.device):
        self.N, self.H, self.V, self.dtype, self.device = N, H, V, dtype, device
        self.name, self.shape = f"N={N} H={H} V={V}", {"N": N, "H": H, "V": V}
        self.tol = tolerance(dtype)

    def inputs(self):
        # W scaled as an initialised output layer (std 0.02): logits of std ~0.02 * sqrt(H), realistic
        x = torch.randn(self.N, self.H, device=self.device).to(self.dtype)
        W = (torch.randn(self.V, self.H, device=self.device) * 0.02).to(self.dtype)
        t = torch.randint(0, self.V, (self.N,), device=self.device)
        t[::IGNORE_EVERY] = -100
        return (x, W, t), (0, 1)

    def reference(self, args):
        return reference_lce(*args)

    def errors(self, ref, out, grads, mode):
        loss_ref = float(ref[0])
        loss_err = abs(float(out.detach().float()) - loss_ref)
        abs_err, rel = loss_err, loss_err / max(1.0, abs(loss_ref))
        if mode == "fwd+bwd":
            g_abs, g_rel = normalised_errors(zip(grads, ref[1:]))
            abs_err, rel = max(abs_err, g_abs), max(rel, g_rel)
        return abs_err, rel

    def flops(self, mode):
        return flops(self.N, self.H, self.V, mode)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    shapes = [(shape["N"], shape["H"], shape["V"])] if shape else PRESETS[(device.type, quick)]
    return [LinearCrossEntropyCase(N, H, V, dtype, device) for N, H, V in shapes]


def _kernels():
    from pykernels.ops import linear_cross_entropy as ops
    return implemented(ops.KERNELS)


def _pykernels(backend: str, fused: Optional[bool] = None):
    def fn(x, W, t):
        import pykernels
        return pykernels.functional.linear_cross_entropy(x, W, t, backend=backend, fused=fused)
    return fn


def _cpu_split(out: List[Provider]) -> Provider:
    """The cpu backend with fused=False (the backward recomputes the logits), to compare with its fused path (the
    gradients in the forward) in one run: ``--backends cpu,cpu-split``."""
    cpu = next(p for p in out if p.name == "pykernels-cpu")
    return Provider("pykernels-cpu-split", _pykernels("cpu", fused=False), cpu.absent, default=False)


def torch_lce(x, W, t):
    """What a model does without fusion: the logits in the input dtype, the loss in fp32."""
    return F.cross_entropy((x @ W.t()).float(), t)


def _chunk_loss_sum(x, W, t):
    return F.cross_entropy((x @ W.t()).float(), t, reduction="sum")


def torch_chunked_lce(x, W, t, chunk_bytes: int = CHUNK_BYTES):
    """The memory-saving recipe in plain PyTorch: row chunks whose logits are recomputed in the backward
    (activation checkpointing), so one chunk's logits are live at a time instead of all N x V."""
    step = max(1, chunk_bytes // (4 * W.shape[0]))
    total = sum(checkpoint(_chunk_loss_sum, x[s:s + step], W, t[s:s + step], use_reentrant=False)
                for s in range(0, x.shape[0], step))
    return total / (t != -100).sum()


def _torch_chunked_op() -> Provider:
    """torch's own F.linear_cross_entropy on its chunked path (torch >= 2.13; options=None would be eager)."""
    prov = Provider("torch.linear_cross_entropy", baseline=True)
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        prov.absent = f"torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13+)"
        return prov
    options = torch.nn.LinearCrossEntropyOptions()
    prov.fn = lambda x, W, t: F.linear_cross_entropy(x, W, t, options=options)
    return prov


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, W, t: loss(W, x, t)  # Liger takes the weight first


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy
    return lambda x, W, t: linear_cross_entropy(x, W, t)  # ignore_index -100 and mean, as here


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    """pykernels-<backend>, then torch (logits then cross-entropy), its torch.compile, the chunked torch recipe,
    torch's own chunked op, Liger's and Apple's cut-cross-entropy fused kernels when importable."""
    out = pykernels_providers(device, _pykernels, _kernels)
    if device.type == "cpu" and any(p.name == "pykernels-cpu" for p in out):
        out.append(_cpu_split(out))
    out.append(Provider("torch", torch_lce, baseline=True))
    allow_recompiles(64)
    out.append(Provider("torch.compile", torch.compile(torch_lce, fullgraph=True, dynamic=False), baseline=True))
    out.append(Provider("torch-chunked", torch_chunked_lce, baseline=True))
    out.append(_torch_chunked_op())
    out.append(peer("liger", device, _liger))
    out.append(peer("cut-cross-entropy", device, _cut_cross_entropy))
    return out

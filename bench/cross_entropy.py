"""Cross-entropy suite: the mean loss over (N, V) logits with class-index targets (every 17th row ignored, as
in padded batches), forward + backward and forward alone.

Bytes (the floor, docs/cross_entropy.md "Bytes"): fwd+bwd reads the logits once and writes their gradient once,
``2 * N * V * b``; the forward alone (no_grad, nothing saved) reads them once, ``N * V * b``; both + ``8 * N``
for the int64 targets. The loss output is negligible. No FLOP model: the op is memory-bound.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .harness import Case, Provider
from .providers import allow_recompiles, implemented, max_abs_diff, nan_max, peer, pykernels_providers, tolerance

NAME = "cross_entropy"
MODES = ("fwd+bwd", "fwd")
IGNORE_EVERY = 17
PRESETS = {  # (device type, quick) -> [(N, V)]
    ("cuda", False): [(8192, 32000), (8192, 50257), (8192, 128256), (8192, 262144)],
    ("cuda", True): [(8192, 128256)],
    ("cpu", False): [(256, 256), (1024, 256), (1024, 1024), (2048, 1024), (4096, 32000)],  # small: NATIVE_FASTER_BELOW
    ("cpu", True): [(1024, 32000)],
}


def minimal_bytes(N: int, V: int, elem_bytes: int, mode: str) -> float:
    passes = 2 if mode == "fwd+bwd" else 1
    return float(passes * N * V * elem_bytes + 8 * N)


def reference_ce(x: torch.Tensor, t: torch.Tensor, ignore_index: int = -100,
                 chunk_bytes: int = 1 << 28) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and its gradient in float32, row chunk by row chunk (bounded temporaries even at
    8192 x 262144): loss = mean over kept rows of lse - x[t]; grad = (softmax - onehot) / kept, 0 on ignored."""
    N, V = x.shape
    keep = t != ignore_index
    count = keep.sum().clamp(min=1).to(torch.float32)
    grad = torch.empty(N, V, device=x.device, dtype=torch.float32)
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    step = max(1, chunk_bytes // (4 * V))
    for s in range(0, N, step):
        xc, tc, kc = x[s:s + step].float(), t[s:s + step], keep[s:s + step]
        lse = torch.logsumexp(xc, dim=1)
        tsafe = torch.where(kc, tc, 0)
        picked = xc.gather(1, tsafe[:, None])[:, 0]
        total += ((lse - picked) * kc).sum(dtype=torch.float64)
        g = torch.exp(xc - lse[:, None])
        g.scatter_add_(1, tsafe[:, None], -torch.ones_like(lse[:, None]))
        grad[s:s + step] = g * (kc[:, None] / count)
    return (total / count).to(torch.float32), grad


class CrossEntropyCase(Case):
    suite = NAME

    def __init__(self, N: int, V: int, dtype: torch.dtype, device: torch.device):
        self.N, self.V, self.dtype, self.device = N, V, dtype, device
        self.name, self.shape = f"N={N} V={V}", {"N": N, "V": V}
        self.tol = tolerance(dtype)

    def inputs(self):
        # generated in fp32 then rounded, so every dtype sees the same distribution (std 2: realistic logits)
        x = (torch.randn(self.N, self.V, device=self.device) * 2).to(self.dtype)
        t = torch.randint(0, self.V, (self.N,), device=self.device)
        t[::IGNORE_EVERY] = -100
        return (x, t), (0,)

    def reference(self, args):
        return reference_ce(*args)

    def errors(self, ref, out, grads, mode):
        loss_ref, grad_ref = ref
        loss_err = abs(float(out.detach().float()) - float(loss_ref))
        abs_err, rel = loss_err, loss_err / max(1.0, abs(float(loss_ref)))
        if mode == "fwd+bwd":
            if grads[0] is None:
                return float("inf"), float("inf")
            g_err = max_abs_diff(grads[0], grad_ref)
            # relative to the largest gradient entry (~1/N): an absolute tolerance would accept any gradient
            abs_err, rel = nan_max(abs_err, g_err), nan_max(rel, g_err / float(grad_ref.abs().max()))
        return abs_err, rel

    def bytes(self, mode):
        return minimal_bytes(self.N, self.V, torch.empty((), dtype=self.dtype).element_size(), mode)


SHAPE_KEYS = (("N", "V"), ())  # --shape: (required, optional)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    shapes = [(shape["N"], shape["V"])] if shape else PRESETS[(device.type, quick)]
    return [CrossEntropyCase(N, V, dtype, device) for N, V in shapes]


def _kernels():
    from pykernels.ops import cross_entropy as ops
    return implemented(ops.KERNELS, c_extension=True)


def _pykernels(backend: str):
    def fn(x, t):
        import pykernels
        return pykernels.functional.cross_entropy(x, t, backend=backend)
    return fn


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss()


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    """pykernels-<backend> (those that target this device by default; the others, and the pure-PyTorch
    reference, only when asked for by name), then the baselines: torch eager, torch.compile, Liger."""
    out = pykernels_providers(device, _pykernels, _kernels)
    out.append(Provider("torch", F.cross_entropy, baseline=True))
    allow_recompiles(64)
    out.append(Provider("torch.compile", torch.compile(F.cross_entropy, fullgraph=True, dynamic=False),
                        baseline=True))
    out.append(peer("liger", device, _liger))
    return out

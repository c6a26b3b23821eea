"""Linear cross-entropy suite: the mean cross-entropy of ``x @ W.t()`` (x (N, H) hidden states, W (V, H) the
output projection) with class-index targets (every 17th row ignored, as in padded batches), forward + backward
(dx and dW) and forward alone. What matters besides time is the peak memory (``peak_extra_mem_bytes``): the
unfused path materialises the N x V logits (and their fp32 copy and gradient). The "options" cases add class
weights, label smoothing 0.1, z-loss 1e-4 and a soft cap of 30 (the extras cost no GEMM: their time should match
the plain case's); the peers that cannot express them all report an error saying so.

FLOPs (2 per multiply-add): forward ``2 * N * H * V`` (the logits GEMM); forward + backward ``6 * N * H * V``
(plus dx = dlogits @ W and dW = dlogits^T @ x). Kernels that recompute the logits in the backward do more work than
this; the model counts the useful work only. No byte model: the op is compute-bound.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cross_entropy import IGNORE_EVERY, reference_ce
from .harness import Case, Provider
from .providers import (allow_recompiles, implemented, nan_max, normalised_errors, peer, pykernels_providers,
                        tolerance)

NAME = "linear_cross_entropy"
MODES = ("fwd+bwd", "fwd")
PRESETS = {  # (device type, quick) -> [(N, H, V[, options])]
    # (8192, 4096, 128256): issue 6's target shape (<= 45 ms fwd+bwd in bf16 on an H100, <= 0.5 GB extra memory)
    ("cuda", False): [(8192, 2048, 32000), (8192, 2048, 128256), (4096, 4096, 151936), (8192, 4096, 128256),
                      (8192, 2048, 128256, 1)],
    ("cuda", True): [(8192, 2048, 128256)],
    ("cpu", False): [(1024, 256, 8192), (1024, 256, 8192, 1)],
    ("cpu", True): [(256, 128, 4096)],
}
# --preset grid: the plan's grid (docs/linear_cross_entropy.md), N x V at H = 4096
NAMED_PRESETS = {"grid": [{"N": N, "H": 4096, "V": V} for N in (4096, 8192, 16384)
                          for V in (32000, 128256, 151936, 262144)]}
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}  # and class weights in [0.5, 1.5)
CHUNK_BYTES = 1 << 28  # fp32 logits per row chunk of the chunked baseline and the reference


def flops(N: int, H: int, V: int, mode: str) -> float:
    return float((6 if mode == "fwd+bwd" else 2) * N * H * V)


def loss_sum(x, W, t, opts: Optional[dict] = None):
    """The numerator of the mean loss of rows x in fp32 (torch's cross-entropy with ``opts``' weight and label
    smoothing, plus z_loss * lse^2 per counted row, of the soft-capped logits)."""
    z = (x @ W.t()).float()
    if not opts:
        return F.cross_entropy(z, t, reduction="sum")
    z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    ce = F.cross_entropy(z, t, weight=opts["weight"].float(), label_smoothing=opts["label_smoothing"], reduction="sum")
    return ce + opts["z_loss"] * (torch.logsumexp(z, 1).square() * (t != -100)).sum()


def denominator(t, opts: Optional[dict] = None):
    """The mean's denominator: the counted rows, or with class weights the sum of the targets' weights."""
    keep = t != -100
    return keep.sum() if not opts else opts["weight"].float()[t[keep]].sum()


def reference_options(x, W, t, opts: dict, chunk_bytes: int = CHUNK_BYTES):
    """(loss, dx, dW) in float32 with the options, by autograd on row chunks of fp32 logits."""
    Wf = W.detach().float().requires_grad_()
    denom = denominator(t, opts).double()
    dx = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    step = max(1, chunk_bytes // (16 * W.shape[0]))  # logits, capped logits, their tanh and gradient live at once
    for s in range(0, x.shape[0], step):
        xc = x[s:s + step].detach().float().requires_grad_()
        with torch.enable_grad():
            part = loss_sum(xc, Wf, t[s:s + step], opts)
            (part / denom.float()).backward()
        total += part.detach().double()
        dx[s:s + step] = xc.grad
    return (total / denom).float(), dx, Wf.grad


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

    def __init__(self, N: int, H: int, V: int, dtype: torch.dtype, device: torch.device, options: bool = False):
        self.N, self.H, self.V, self.dtype, self.device, self.options = N, H, V, dtype, device, bool(options)
        self.name = ("options " if options else "") + f"N={N} H={H} V={V}"  # a family of its own (plots)
        self.shape = {"N": N, "H": H, "V": V, **({"options": 1} if options else {})}
        self.tol = tolerance(dtype)

    def inputs(self):
        # W scaled as an initialised output layer (std 0.02): logits of std ~0.02 * sqrt(H), realistic
        x = torch.randn(self.N, self.H, device=self.device).to(self.dtype)
        W = (torch.randn(self.V, self.H, device=self.device) * 0.02).to(self.dtype)
        t = torch.randint(0, self.V, (self.N,), device=self.device)
        t[::IGNORE_EVERY] = -100
        if not self.options:
            return (x, W, t), (0, 1)
        weight = (torch.rand(self.V, device=self.device) + 0.5).to(self.dtype)  # (torch: the logits' dtype)
        return (x, W, t, dict(OPTIONS, weight=weight)), (0, 1)

    def reference(self, args):
        return reference_options(*args) if self.options else reference_lce(*args)

    def errors(self, ref, out, grads, mode):
        loss_ref = float(ref[0])
        loss_err = abs(float(out.detach().float()) - loss_ref)
        abs_err, rel = loss_err, loss_err / max(1.0, abs(loss_ref))
        if mode == "fwd+bwd":
            g_abs, g_rel = normalised_errors(zip(grads, ref[1:]))
            abs_err, rel = nan_max(abs_err, g_abs), nan_max(rel, g_rel)
        return abs_err, rel

    def flops(self, mode):
        return flops(self.N, self.H, self.V, mode)

    def model_extra_mem(self, provider, mode):
        """The Triton backend's workspace plus the gradients it returns (cost_model), to read beside its measured
        peak: issue 6 bounds the workspace at 0.5 GB."""
        if provider not in ("pykernels-triton", "pykernels-triton-fused"):
            return None
        from pykernels.ops.linear_cross_entropy import cost_model
        c = cost_model(self.N, self.H, self.V, self.dtype, backward=mode == "fwd+bwd")
        fused = provider.endswith("fused") and mode == "fwd+bwd"  # (a forward alone takes the split path)
        return int(c["fused_workspace_bytes" if fused else "workspace_bytes"] + c["gradient_bytes"])


SHAPE_KEYS = (("N", "H", "V"), ("options",))  # --shape: (required, optional)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    shapes: List[Tuple[int, ...]] = ([(shape["N"], shape["H"], shape["V"], shape.get("options", 0))] if shape
                                     else PRESETS[(device.type, quick)])
    return [LinearCrossEntropyCase(*s[:3], dtype, device, *s[3:]) for s in shapes]


def _no_options(name: str, fn):
    """A peer's call on the plain cases; on the options cases an error that says why it is not timed."""
    def call(x, W, t, opts=None):
        if opts:
            raise NotImplementedError(f"{name}: the options case (class weights, label smoothing, z-loss, soft cap "
                                      f"with pykernels' normalisation) is not mapped to this provider")
        return fn(x, W, t)
    return call


def _kernels():
    from pykernels.ops import linear_cross_entropy as ops
    return implemented(ops.KERNELS)


def _pykernels(backend: str, fused: Optional[bool] = None):
    def fn(x, W, t, opts=None):
        import pykernels
        return pykernels.functional.linear_cross_entropy(x, W, t, backend=backend, fused=fused, **(opts or {}))
    return fn


def _variant(out: List[Provider], backend: str, fused: bool, default: bool) -> Provider:
    """A backend's other path, side by side with its automatic one: pykernels-cpu-split (fused=False: the backward
    recomputes the logits; ``--backends cpu,cpu-split``) and pykernels-triton-fused (fused=True: the gradients in
    the forward, three GEMMs; on by default on CUDA until it has been measured against the split path)."""
    base = next(p for p in out if p.name == f"pykernels-{backend}")
    return Provider(f"pykernels-{backend}-{'fused' if fused else 'split'}", _pykernels(backend, fused=fused),
                    base.absent, default=default)


def torch_lce(x, W, t, opts=None):
    """What a model does without fusion: the logits in the input dtype, the loss in fp32."""
    if not opts:
        return F.cross_entropy((x @ W.t()).float(), t)
    return loss_sum(x, W, t, opts) / denominator(t, opts)


def torch_chunked_lce(x, W, t, opts=None, chunk_bytes: int = CHUNK_BYTES):
    """The memory-saving recipe in plain PyTorch: row chunks whose logits are recomputed in the backward
    (activation checkpointing), so one chunk's logits are live at a time instead of all N x V."""
    step = max(1, chunk_bytes // (4 * W.shape[0]))
    total = sum(checkpoint(loss_sum, x[s:s + step], W, t[s:s + step], opts, use_reentrant=False)
                for s in range(0, x.shape[0], step))
    return total / denominator(t, opts)


def _torch_chunked_op() -> Provider:
    """torch's own F.linear_cross_entropy on its chunked path (torch >= 2.13; options=None would be eager)."""
    prov = Provider("torch.linear_cross_entropy", baseline=True)
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        prov.absent = f"torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13+)"
        return prov
    options = torch.nn.LinearCrossEntropyOptions()
    prov.fn = _no_options(prov.name, lambda x, W, t: F.linear_cross_entropy(x, W, t, options=options))
    return prov


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss()
    return _no_options("liger", lambda x, W, t: loss(W, x, t))  # Liger takes the weight first


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy
    return _no_options("cut-cross-entropy", lambda x, W, t: linear_cross_entropy(x, W, t))  # -100 ignored, mean


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    """pykernels-<backend>, then torch (logits then cross-entropy), its torch.compile, the chunked torch recipe,
    torch's own chunked op, Liger's and Apple's cut-cross-entropy fused kernels when importable."""
    out = pykernels_providers(device, _pykernels, _kernels)
    if device.type == "cpu" and any(p.name == "pykernels-cpu" for p in out):
        out.append(_variant(out, "cpu", False, default=False))
    if device.type == "cuda" and any(p.name == "pykernels-triton" for p in out):
        out.append(_variant(out, "triton", True, default=True))
    out.append(Provider("torch", torch_lce, baseline=True))
    allow_recompiles(64)
    out.append(Provider("torch.compile", torch.compile(torch_lce, fullgraph=True, dynamic=False), baseline=True))
    out.append(Provider("torch-chunked", torch_chunked_lce, baseline=True))
    out.append(_torch_chunked_op())
    out.append(peer("liger", device, _liger))
    out.append(peer("cut-cross-entropy", device, _cut_cross_entropy))
    return out

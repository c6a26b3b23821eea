"""Cross-entropy suite: forward + backward of the loss over (N, V) logits.

Bytes (the floor, docs/cross_entropy.md): read the logits once and write their gradient once,
``2 * N * V * elem_bytes`` (+ 8 N for targets); the forward alone reads ``N * V * elem_bytes``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import pykernels

from .harness import Result, finish, peak_extra_memory, time_ms

SUITE = "cross_entropy"
PRESETS = {  # device -> quick?, list of (N, V)
    ("cuda", True): [(8192, 128256)],
    ("cuda", False): [(8192, 32000), (8192, 50257), (8192, 128256), (4096, 262144)],
    ("cpu", True): [(1024, 32000)],
    ("cpu", False): [(4096, 32000)],
}


def fwd_bwd_bytes(N: int, V: int, elem: int) -> float:
    return 2.0 * N * V * elem + 8.0 * N


def providers(device: torch.device) -> Dict[str, Tuple[Optional[Callable], Optional[str]]]:
    """name -> (loss function, reason it is absent)."""
    out: Dict[str, Tuple[Optional[Callable], Optional[str]]] = {}
    for b, why in pykernels.available_backends(device).items():
        if b == "reference":
            continue
        out[f"pykernels-{b}"] = ((lambda x, t, b=b: pykernels.functional.cross_entropy(x, t, backend=b)), why)
    out["torch"] = (F.cross_entropy, None)
    out["torch.compile"] = (torch.compile(F.cross_entropy, fullgraph=True, dynamic=False), None)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        out["liger"] = (LigerCrossEntropyLoss(), None)
    except Exception as e:
        out["liger"] = (None, f"liger-kernel not importable: {type(e).__name__}: {e}")
    return out


def run(device: torch.device, dtype: torch.dtype, quick: bool, select=lambda name: True,
        shapes: Optional[List[Tuple[int, int]]] = None) -> List[Result]:
    results = []
    shapes = shapes or PRESETS[(device.type, quick)]
    provs = {k: v for k, v in providers(device).items() if select(k)}
    for N, V in shapes:
        case = f"N={N} V={V}"
        x0 = (torch.randn(N, V, device=device, dtype=torch.float32) * 2).to(dtype)
        t = torch.randint(0, V, (N,), device=device)
        t[::17] = -100  # some ignored rows, as in padded batches
        xr = x0.float().requires_grad_()
        ref = F.cross_entropy(xr, t)
        ref.backward()
        for name, (fn, absent) in provs.items():
            r = Result(SUITE, case, name, "fwd+bwd", str(dtype).replace("torch.", ""), {"N": N, "V": V},
                       bytes=fwd_bwd_bytes(N, V, x0.element_size()))
            if fn is None or absent:
                r.status, r.error = "absent", absent
                results.append(r)
                continue
            x = x0.detach().clone().requires_grad_()
            try:
                loss = fn(x, t)
                loss.backward()
                err = max(abs(float(loss.detach()) - float(ref.detach())), float((x.grad.float() - xr.grad).abs().max()))
                r.max_err = err
                tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
                if not err <= tol * max(1.0, abs(float(ref.detach()))):  # NaN fails too
                    r.status, r.error = "wrong", f"max error {err:.3e} vs fp32 reference"
                    results.append(r)
                    continue
                step = lambda: fn(x, t).backward()  # noqa: E731
                r.ms_p50, r.ms_p20, r.ms_p80 = time_ms(step, device, grad_to_none=[x], quick=quick)
                x.grad = None
                r.peak_extra_mem_bytes = peak_extra_memory(step, device)
            except Exception as e:  # a provider that cannot run this case is reported, not fatal
                r.status, r.error = "error", f"{type(e).__name__}: {e}"
            results.append(r)
        del x0, xr
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results

"""What the suites share: pykernels providers per backend, peers that are absent unless importable, per-dtype
tolerances and chunked error measures (bounded temporaries next to multi-GiB benchmark inputs)."""
from __future__ import annotations

import math
from typing import Callable, Collection, Dict, Iterable, List, Optional, Tuple

import torch

from .harness import Provider

# pykernels backends that target each device type (triton on CPU is the interpreter: a debugging tool)
TARGETS = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
C_EXTENSION = ("cuda", "cpu")  # backends whose kernels the compiled extension registers (absent when unbuilt)

# Normalised error (max |out - ref| / max |ref|) a correct kernel stays within: half precision is bounded by the
# rounding of its outputs and intermediates (bf16 eps 2^-8, fp16 2^-11), fp32 by summation order. Measured on CPU
# (--quick shapes, torch and pykernels-reference/-cpu, every suite): fp32 <= 8e-7, fp16 <= 1.2e-3, bf16 <= 8.4e-3;
# GPU shapes are larger (longer sums, 256 LSTM steps), hence the margins.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def tolerance(dtype: torch.dtype) -> float:
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {list(TOLERANCE)}, got {dtype}")
    return TOLERANCE[dtype]


def backends(device: torch.device) -> Dict[str, Optional[str]]:
    """pykernels' backend -> None when usable on ``device``, else why not."""
    import pykernels
    try:
        return pykernels.available_backends(device)
    except TypeError:  # the documented contract takes no argument
        return pykernels.available_backends()


def allow_recompiles(n: int) -> None:
    """dynamic=False compiles once per (shape, grad mode): 4 shapes x 2 modes already reach dynamo's default
    limit of 8 per code object, and fullgraph=True turns hitting it into an error. The knob was renamed."""
    import torch._dynamo
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


def implemented(registry: Iterable[str], c_extension: bool = False) -> Tuple[str, ...]:
    """Backends with a kernel of an op: its ops registry (backend -> kernel ops) plus, when the op has C++
    kernels, the extension's backends even where it is not built (their provider then says it is not built)."""
    return tuple(sorted(set(registry) | (set(C_EXTENSION) if c_extension else set())))


def pykernels_providers(device: torch.device, call: Callable[[str], Callable[..., object]],
                        kernels: Callable[[], Collection[str]]) -> List[Provider]:
    """pykernels-<backend> for every backend, ``call(backend)`` being the function timed.

    Absent with the reason where the backend cannot run on this device or has no kernel of this op (``kernels()``,
    see implemented()). On by default: the backends that target the device and implement the op; where none
    does, the reference, which is what an automatic call runs there."""
    try:
        avail, have = backends(device), kernels()
    except Exception as e:  # the package itself broken: say so instead of benchmarking nothing silently
        return [Provider("pykernels", None, f"import failed: {type(e).__name__}: {e}")]
    targets = [b for b in TARGETS.get(device.type, ()) if b in have]
    out = []
    for b, why in avail.items():
        if why is None and b != "reference" and b not in have:
            why = f"no {b} kernel of this op"
        default = b in targets or (b == "reference" and not targets)
        out.append(Provider(f"pykernels-{b}", call(b), why, default=default))
    return out


def peer(name: str, device: torch.device, build: Callable[[], Callable[..., object]],
         cuda_only: bool = True) -> Provider:
    """A baseline from another package: ``build()`` imports it and returns the function timed. Listed as absent,
    with the reason, when it does not import or (``cuda_only``) the device is not a GPU."""
    if cuda_only and device.type != "cuda":
        return Provider(name, None, f"{name} runs on CUDA only", baseline=True)
    try:
        return Provider(name, build(), baseline=True)
    except Exception as e:  # ImportError, or a broken install raising anything
        return Provider(name, None, f"{name} not importable: {type(e).__name__}: {e}"[:300], baseline=True)


def max_abs_diff(a: torch.Tensor, ref: torch.Tensor, chunk_bytes: int = 1 << 28) -> float:
    """max |a - ref| over chunks of the leading dimension: no full-size fp32 temporaries next to large inputs.
    NaN anywhere gives NaN (torch's max propagates it; Python's max() would drop it depending on order)."""
    if a.shape != ref.shape:
        raise ValueError(f"output shape {tuple(a.shape)} != reference shape {tuple(ref.shape)}")
    if ref.dim() == 0 or ref.numel() == 0:
        return float((a.float() - ref.float()).abs().max()) if ref.numel() else 0.0
    row = max(1, ref[0].numel() * 4)
    step = max(1, chunk_bytes // row)
    return float(torch.stack([(a[s:s + step].float() - ref[s:s + step].float()).abs().max()
                              for s in range(0, ref.shape[0], step)]).max())


def nan_max(a: float, b: float) -> float:
    """max(a, b) that keeps a NaN (Python's max() drops it when it comes second): a provider whose loss is right and
    whose gradient is NaN is wrong."""
    return a if math.isnan(a) or b <= a else b


def normalised_errors(pairs: Iterable[Tuple[Optional[torch.Tensor], torch.Tensor]]) -> Tuple[float, float]:
    """(max absolute error, max of each error / max |reference|) over (output, reference) pairs; a missing
    output (a gradient that never arrived) is an infinite error."""
    abs_err = rel = 0.0
    for out, ref in pairs:
        if out is None:
            return float("inf"), float("inf")
        e = max_abs_diff(out.detach(), ref)
        if math.isnan(e):
            return e, e
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        abs_err, rel = max(abs_err, e), max(rel, e / (scale or 1.0))
    return abs_err, rel

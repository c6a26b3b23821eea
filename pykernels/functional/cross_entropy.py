"""pykernels.functional.cross_entropy: torch.nn.functional.cross_entropy on fused kernels."""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _native, backends
from ..errors import ArgumentTypeError, ArgumentValueError
from . import _args, _autocast
from ..ops import cross_entropy as _ce
from ..reference import cross_entropy as _ce_ref

__all__ = ["cross_entropy"]

_KERNEL_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    if size_average is None and reduce is None:
        if reduction == "elementwise_mean":  # torch still takes it, with this warning
            warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.")
            return "mean"
        return reduction
    # PyTorch's own rule and deprecation warning for the legacy arguments.
    return torch.nn._reduction.legacy_get_string(size_average, reduce)


def _index(fn: str, name: str, v) -> int:
    """An integer argument as torch's parser takes it (int, numpy integers: anything with __index__; not a float),
    within int64 (torch's ValueError past it, where the kernels' launch raised an OverflowError)."""
    if not _args.is_index(v):
        raise ArgumentTypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    v = _args.index(v)
    if not -2**63 <= v < 2**63:
        raise ArgumentValueError(f"{fn}: {name} must fit in int64, got {v}")
    return v


def _smoothing(label_smoothing) -> float:
    """torch's rule: label_smoothing < 0 or NaN smooths nothing (its only bound, <= 1, is checked by the callers)."""
    return label_smoothing if label_smoothing > 0 else 0.0


def _check_weight_dtype(op: str, weight: Optional[Tensor], logits_dtype: torch.dtype, amp: bool) -> None:
    """torch's rule for a class weight with class-index targets (probability targets promote with it instead): the
    logits' dtype; under autocast (``amp``; cross_entropy is on its float32 list) after its casts to float32."""
    if weight is None:
        return
    dtype = torch.float32 if amp and _autocast.eligible(weight) else weight.dtype
    if dtype != logits_dtype:
        raise ArgumentTypeError(f"{op}: weight has dtype {weight.dtype} but the logits are {logits_dtype}; with "
                                f"class-index targets they must match (as torch)")


def _check_cross_entropy_args(input, target, weight, reduction, label_smoothing, z_loss, ignore_index) -> bool:
    """Validates the call; returns True for probability targets."""
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"cross_entropy: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"cross_entropy: target must be a Tensor, got {type(target).__name__}")
    _args.check_float_dtype("cross_entropy", "input", input)
    if input.dim() < 1:
        raise ArgumentValueError("cross_entropy: input must have at least 1 dimension (C) or (N, C, ...), got a scalar")
    if target.device != input.device:
        raise ArgumentValueError(f"cross_entropy: target is on {target.device} but input is on {input.device}")
    if reduction not in _ce.REDUCTIONS:
        raise ArgumentValueError(f"cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if label_smoothing > 1.0:  # torch's only bound: <= 0 and NaN mean none (the caller passes 0 for those)
        raise ArgumentValueError(f"cross_entropy: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not (z_loss >= 0.0 and z_loss != float("inf")):
        raise ArgumentValueError(f"cross_entropy: z_loss must be finite and >= 0, got {z_loss}")
    C = input.shape[0 if input.dim() == 1 else 1]
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point:
            raise ArgumentTypeError("cross_entropy: weight must be a floating-point Tensor")
        if weight.shape != (C,):
            raise ArgumentValueError(f"cross_entropy: weight must have shape ({C},) (one per class), got "
                                     f"{tuple(weight.shape)}")
        if weight.device != input.device:
            raise ArgumentValueError(f"cross_entropy: weight is on {weight.device} but input is on {input.device}")
    if target.shape == input.shape and input.dim() > 0 and target.dtype.is_floating_point:
        if ignore_index >= 0:
            raise ArgumentValueError("cross_entropy: ignore_index is not supported for probability (floating) targets")
        return True
    if target.shape == input.shape and input.dim() > 0:  # torch's rule, also for a (1,) target of a (1,) input
        raise ArgumentTypeError(f"cross_entropy: a target of the input's shape {tuple(input.shape)} holds class "
                                f"probabilities and must be floating point, got {target.dtype}")
    if target.dtype.is_floating_point:
        raise ArgumentValueError(f"cross_entropy: floating target must have the input's shape {tuple(input.shape)} "
                                 f"(class probabilities), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise ArgumentTypeError(f"cross_entropy: class-index target must be int64 (torch.long) or uint8, got "
                                f"{target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != expected and not (input.dim() == 1 and target.shape == (1,)):  # torch takes (1,) for (C,)
        raise ArgumentValueError(f"cross_entropy: target must have shape {tuple(expected)} for input of shape "
                                 f"{tuple(input.shape)}, got {tuple(target.shape)}")
    amp = _autocast.enabled(input)
    _check_weight_dtype("cross_entropy", weight, torch.float32 if amp and _autocast.eligible(input) else input.dtype,
                        amp)
    return False


def _check_target_range(target: Tensor, C: int, ignore_index: int, op: str = "cross_entropy") -> None:
    """Class indices in [0, C) or ignore_index (target already int64: a uint8 255 must not equal -1). CPU: an
    IndexError naming the first bad target, as torch; elsewhere, and inside compiled graphs, a device-side assert
    (as PyTorch's CUDA kernels): no host sync, traceable by torch.compile."""
    ok = ((target >= 0) & (target < C)) | (target == ignore_index)
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            bad = target[~ok][0].item()
            raise IndexError(f"{op}: target {bad} is out of bounds for {C} classes (ignore_index={ignore_index})")
    else:
        torch._assert_async(ok.all(), f"{op}: target out of bounds")


def _canonical(x: Tensor) -> Tensor:
    """(C) -> (1, C, 1); (N, C) -> (N, C, 1); (N, C, d1..dk) -> (N, C, d1*..*dk), a view when possible."""
    if x.dim() == 1:
        return x.reshape(1, -1, 1)
    if x.dim() == 2:
        return x.unsqueeze(-1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, return_lse: bool = False, fused: Optional[bool] = None,
                  backend: Optional[str] = None):
    """``torch.nn.functional.cross_entropy`` with fused kernels.

    Extras (keyword-only):
      z_loss: coefficient of the PaLM z-loss ``z_loss * lse**2`` added to each counted element's loss.
      return_lse: also return the log-sum-exp over classes, fp32 (fp64 for fp64 input), shape of the target's
        batch (detached).
      fused: compute the gradient during the forward (one read of the logits, one write of the gradient, the
        minimum). None: on when the input requires grad and the reduction is "mean" or "sum". With an incoming
        gradient other than exactly 1 (e.g. loss / accumulation_steps) the backward then costs one more pass.
        Through a retained graph (retain_graph=True): with an incoming gradient of 1 on the CPU any number of
        backward passes; otherwise the first scales the saved gradient in place (no second (N, C) buffer), and a
        second backward through the same graph raises, naming fused=False, which takes any number. The split
        path (fused=False, and reduction="none") saves the logits themselves, not torch's log-probabilities (no
        second (N, C) tensor): changing the logits in place after the loss makes its backward raise autograd's
        "modified by an inplace operation" error, where torch's works.
      backend: "triton", "cuda", "cpu" or "reference"; see ``pykernels.backends``.

    Under ``torch.autocast`` the loss is float32 for half-precision (or float32) logits, as torch's (its float32
    list); the kernels read the half-precision logits as they are and the gradient keeps their dtype.
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    ignore_index = _index("cross_entropy", "ignore_index", ignore_index)
    label_smoothing = _args.check_real("cross_entropy", "label_smoothing", label_smoothing)
    z_loss = _args.check_real("cross_entropy", "z_loss", z_loss)
    _args.check_bool("cross_entropy", "return_lse", return_lse)
    _args.check_bool("cross_entropy", "fused", fused, optional=True)
    probs = _check_cross_entropy_args(input, target, weight, reduction, label_smoothing, z_loss, ignore_index)
    label_smoothing = _smoothing(label_smoothing)
    if input.dim() == 1 and not probs and target.dim() == 1:
        target = target.reshape(())
    if (not z_loss and not return_lse and (probs or target.dtype == torch.int64)
            and (weight is None or weight.dtype == input.dtype)
            and backends.prefer_native("cross_entropy", input.device, backend, input.numel(),
                                       torch.is_grad_enabled() and (input.requires_grad or target.requires_grad))):
        # small enough that torch's own kernel is faster (backends.NATIVE_FASTER_BELOW); it applies autocast itself
        return _native.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing)
    amp = _autocast.enabled(input)
    out_dtype = torch.float32 if amp and _autocast.eligible(input) else input.dtype
    if probs:  # torch's -sum(t * log_softmax(x)) promotes: float32 probabilities give bf16 logits a float32 loss,
        out_dtype = torch.promote_types(out_dtype, target.dtype)  # cast once from the kernels' accumulator
        if weight is not None:  # (and the class weights multiply in: float32 weights, float32 loss)
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    with _autocast.off(input) if amp else contextlib.nullcontext():
        return _cross_entropy(input, target, weight, reduction, probs, ignore_index, label_smoothing, z_loss,
                              return_lse, fused, backend, out_dtype)


def _cross_entropy(input, target, weight, reduction, probs, ignore_index, label_smoothing, z_loss, return_lse,
                   fused, backend, out_dtype):
    C = input.shape[0 if input.dim() == 1 else 1]
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if not probs:  # int64 before any comparison: a uint8 255 must not equal ignore_index -1
        target = target.to(torch.int64)
        _check_target_range(target, C, ignore_index)

    def unsupported(b: str) -> Optional[str]:
        if b == "reference":
            return None
        if input.dtype not in _KERNEL_DTYPES[b]:
            return f"dtype {input.dtype} is not supported by the {b} kernels"
        if probs and target.requires_grad:
            return "gradient with respect to probability targets is only implemented by the reference"
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            return "gradient with respect to weight is only implemented by the reference"
        if b in _ce.KERNELS:
            return None
        return _ce.triton_import_error if b == "triton" else "kernel ops are not registered"

    # Without a gradient the Triton kernel is the faster one on the H100 (0.75 vs 1.04 ms forward at N=8192
    # V=128256 bf16, bench/results/h100-cross_entropy-quick-20261122.json); with one, the CUDA kernel.
    order = ("triton", "cuda", "reference") if input.device.type == "cuda" and not needs_grad else None
    chosen = backends.choose("cross_entropy", input.device, backend, unsupported, order, tensors=(input, target),
                             empty=input.numel() == 0)
    if chosen == "reference":
        # under autocast torch computes on a float32 copy of the logits: so does the reference (no-op otherwise)
        loss, lse = _ce_ref.cross_entropy(input.to(out_dtype), target, weight, ignore_index, reduction,
                                          label_smoothing, z_loss)
        return (loss, lse.detach().to(_ce.acc_dtype(input.dtype))) if return_lse else loss

    x = _canonical(input)
    t = _canonical(target.to(input.dtype)) if probs else target.reshape(-1).contiguous()  # (the kernels: stride 1)
    w = None if weight is None else weight.detach().to(_ce.acc_dtype(input.dtype)).contiguous()
    if fused is None:
        fused = reduction != "none"
    loss, lse, *_ = _ce.cross_entropy(x, t, w, ignore_index, _ce.REDUCTIONS[reduction], float(label_smoothing),
                                           float(z_loss), bool(fused and needs_grad and not torch.jit.is_tracing()),
                                           chosen)  # (a traced graph must not depend on grad mode: its check)
    loss = loss.to(out_dtype)
    batch = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if reduction == "none":
        loss = loss.reshape(batch)
    return (loss, lse.reshape(batch)) if return_lse else loss

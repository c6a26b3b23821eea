"""pykernels.functional.linear_cross_entropy: torch.nn.functional.linear_cross_entropy without the logits.

Semantics are torch's (2.13+): ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` with
``ignore_index=None`` meaning -100 for class-index targets (and forbidden with probability targets). Works on
torch versions that lack torch's own function.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from ..errors import ArgumentTypeError, ArgumentValueError
from . import _args, _autocast
from .cross_entropy import _check_target_range, _check_weight_dtype, _index, _legacy_reduction, _smoothing
from ..ops import linear_cross_entropy as _lce
from ..reference import linear_cross_entropy as _lce_ref

__all__ = ["linear_cross_entropy"]

# fp32 on the tensor cores would be TF32 (not torch's fp32 matmul): the CUDA kernels take 16-bit inputs only.
_KERNEL_DTYPES = {"triton": (torch.float16, torch.bfloat16, torch.float32), "cuda": (torch.float16, torch.bfloat16),
                  "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def kernel_reason(b: str, dtype: torch.dtype) -> Optional[str]:
    """Why kernel backend ``b`` cannot run a call in ``dtype`` (None: it can); shared with the vocab-parallel
    entry point (pykernels/distributed.py)."""
    if dtype not in _KERNEL_DTYPES[b]:
        return f"dtype {dtype} is not supported by the {b} kernels"
    if b in _lce.KERNELS:
        return None
    if b == "triton":
        return _lce.triton_import_error or "kernel ops are not registered"
    return (f"pykernels._C was built without the {b} linear cross-entropy kernels "
            "(pykernels::linear_cross_entropy_partials); rebuild the extension")


def _finite_nonneg(name: str, v: float) -> None:
    if not (v >= 0.0 and v != float("inf")):
        raise ArgumentValueError(f"linear_cross_entropy: {name} must be finite and >= 0, got {v}")


def _check_options(reduction: str, label_smoothing, z_loss, softcap, return_lse) -> Tuple[float, float, float]:
    """The scalar options, shared with the vocab-parallel entry point (pykernels/distributed.py); returns
    label_smoothing, z_loss and softcap as Python numbers (torch's parser takes numpy scalars, 0-dim tensors)."""
    fn = "linear_cross_entropy"
    label_smoothing, z_loss, softcap = (_args.check_real(fn, name, v) for name, v in (
        ("label_smoothing", label_smoothing), ("z_loss", z_loss), ("softcap", softcap)))
    _args.check_bool(fn, "return_lse", return_lse)
    if reduction not in _lce.REDUCTIONS:
        raise ArgumentValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if label_smoothing > 1.0:  # torch's only bound: <= 0 and NaN mean none (_smoothing)
        raise ArgumentValueError(f"{fn}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    _finite_nonneg("z_loss", z_loss)
    _finite_nonneg("softcap", softcap)
    return label_smoothing, z_loss, softcap


def _check_tensors(input, linear_weight, target) -> None:
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"linear_cross_entropy: {name} must be a Tensor, got {type(t).__name__}")


def _check_dtypes_devices(input, linear_weight, target, linear_bias, weight) -> None:
    """The operands' dtypes and devices against input's (before their shapes are read); shared with the
    vocab-parallel entry point (pykernels/distributed.py)."""
    _args.check_float_dtype("linear_cross_entropy", "input", input)
    if linear_weight.dtype != input.dtype:
        raise ArgumentTypeError(f"linear_cross_entropy: linear_weight has dtype {linear_weight.dtype} but input has "
                                f"{input.dtype}; they must match")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise ArgumentTypeError("linear_cross_entropy: linear_bias must be a Tensor or None")
        if linear_bias.dtype != input.dtype:
            raise ArgumentTypeError(f"linear_cross_entropy: linear_bias has dtype {linear_bias.dtype} but input has "
                                    f"{input.dtype}")
    if weight is not None and (not isinstance(weight, Tensor) or not weight.dtype.is_floating_point):
        raise ArgumentTypeError("linear_cross_entropy: weight must be a floating-point Tensor")
    for name, t in (("linear_weight", linear_weight), ("target", target), ("linear_bias", linear_bias),
                    ("weight", weight)):
        if t is not None and t.device != input.device:
            raise ArgumentValueError(f"linear_cross_entropy: {name} is on {t.device} but input is on {input.device}")


def _check_args(input, linear_weight, target, linear_bias, weight, ignore_index, amp_dtype):
    """Validates the tensors (the options: _check_options); returns (logits_shape, probs, out_features)."""
    _check_tensors(input, linear_weight, target)
    if input.dim() < 1:
        raise ArgumentValueError("linear_cross_entropy: input must have at least 1 dimension (in_features), got a "
                                 "scalar")
    if linear_weight.dim() < 2:
        raise ArgumentValueError(f"linear_cross_entropy: linear_weight must have at least 2 dimensions (num_classes, "
                                 f"..., in_features), got shape {tuple(linear_weight.shape)}")
    H = input.shape[-1]
    if linear_weight.shape[-1] != H:
        raise ArgumentValueError(f"linear_cross_entropy: linear_weight's last dimension ({linear_weight.shape[-1]}) "
                                 f"must equal input's last dimension, in_features ({H})")
    _check_dtypes_devices(input, linear_weight, target, linear_bias, weight)
    C = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if out_features and input.dim() != 2:
        raise ArgumentValueError(f"linear_cross_entropy: a K-dimensional linear_weight {tuple(linear_weight.shape)} "
                                 f"needs batched input (N, {H}), got input of shape {tuple(input.shape)}")
    batch = tuple(input.shape[:-1])
    logits_shape = (*batch, C, *out_features)
    if linear_bias is not None and tuple(linear_bias.shape) != (C, *out_features):
        raise ArgumentValueError(f"linear_cross_entropy: linear_bias must have shape {(C, *out_features)}, got "
                                 f"{tuple(linear_bias.shape)}")
    if weight is not None and tuple(weight.shape) != (C,):
        raise ArgumentValueError(f"linear_cross_entropy: weight must have shape ({C},) (one per class), got "
                                 f"{tuple(weight.shape)}")
    # Class probabilities when the target has the logits' shape (torch's rule).
    # Batched-input extension: input (..., H) with a 2-D weight puts the classes last; torch's cross_entropy
    # wants them in dim 1, which the reference handles.
    probs = tuple(target.shape) == logits_shape and target.dtype.is_floating_point
    if probs:
        if ignore_index is not None:
            raise ArgumentValueError("linear_cross_entropy: ignore_index cannot be specified when target contains "
                                     "probabilities")
        return logits_shape, True, out_features
    if target.dtype.is_floating_point:
        raise ArgumentValueError(f"linear_cross_entropy: a floating target must have the logits' shape {logits_shape} "
                                 f"(class probabilities), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise ArgumentTypeError(f"linear_cross_entropy: class-index target must be int64 (torch.long) or uint8, got "
                                f"{target.dtype}")
    expected = (*batch, *out_features)
    if tuple(target.shape) != expected:
        raise ArgumentValueError(f"linear_cross_entropy: target must have shape {expected} for input of shape "
                                 f"{tuple(input.shape)} and linear_weight of shape {tuple(linear_weight.shape)}, got "
                                 f"{tuple(target.shape)}")
    _check_weight_dtype("linear_cross_entropy", weight, amp_dtype or input.dtype, amp_dtype is not None)
    return logits_shape, False, out_features


def _fused_grads(fused: Optional[bool], backend: str, x: Tensor, linear_weight: Tensor,
                 linear_bias: Optional[Tensor], reduction: int) -> int:
    """The op's fused_grads: the gradients this call needs, when it takes the fused path (else 0)."""
    if fused is False or not torch.is_grad_enabled() or torch.jit.is_tracing():
        return 0  # (torch.jit.trace's check re-traces under no_grad: the traced graph must not depend on grad mode)
    grads = ((_lce.GRAD_INPUT if x.requires_grad else 0) | (_lce.GRAD_WEIGHT if linear_weight.requires_grad else 0)
             | (_lce.GRAD_BIAS if linear_bias is not None and linear_bias.requires_grad else 0))
    if not grads:
        return 0
    why = _lce.fused_reason(backend, x.dtype, reduction, asked=fused is True)
    if why:
        if not torch.compiler.is_compiling():
            backends.logger.debug("linear_cross_entropy: the backward recomputes the logits: %s", why)
        return 0
    return grads


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, z_loss: float = 0.0, softcap: float = 0.0,
                         return_lse: bool = False, group=None, vocab_start: Optional[int] = None,
                         vocab_size: Optional[int] = None, fused: Optional[bool] = None,
                         backend: Optional[str] = None):
    """``torch.nn.functional.linear_cross_entropy`` on fused kernels: the N x V logits are never materialised
    (backends "triton" and "cuda"; the "reference" backend is torch's linear + cross_entropy).

    input (H), (N, H) or, as an extension, (..., H) with target (...); linear_weight (C, H) or, as torch,
    (C, d1..dK, H) for a K-dimensional loss (reference only). ``options`` (torch's chunking options) is accepted
    and ignored: the kernels never hold the logits.

    Extras (keyword-only):
      z_loss: coefficient of the PaLM z-loss ``z_loss * lse**2`` added to each non-ignored row's loss.
      softcap: Gemma-2 logit soft-capping ``softcap * tanh(logits / softcap)`` before the loss (0: off).
      return_lse: also return the per-row log-sum-exp of the (capped) logits, fp32 (fp64 for fp64), detached.
      group: a torch.distributed process group: vocab-parallel loss, ``linear_weight`` (and ``linear_bias``)
        hold this rank's contiguous rows of the vocabulary, ``weight`` covers the whole vocabulary
        (see ``pykernels.distributed``); vocab_start / vocab_size override the shard's first class and the
        vocabulary size (default: rank * rows, world * rows). One small all_gather per call checks that the shards
        tile the vocabulary and that the ranks agree on vocab_size and input's shape.
      fused: compute the gradients during the forward, for an upstream gradient of 1 (the backward only scales them: one
        GEMM fewer than recomputing the logits, three in all as torch's own). None: on the "cpu" backend (float32,
        float64 and bfloat16); True: also on "triton" (CUDA, not yet measured faster); either where the reduction is
        "mean" or "sum", a gradient is needed and there is no ``group``; otherwise (logged on the ``pykernels`` logger)
        the backward recomputes the logits. The forward then computes the gradient of every operand that requires one,
        whether or not a backward asks for it, and keeps them until the backward. Through a retained graph
        (retain_graph=True) ``torch.autograd.grad`` may run any number of times, but a saved gradient that a
        ``.backward()`` made a leaf's ``.grad`` is then accumulated into in place, so a third ``.backward()`` raises
        autograd's "modified by an inplace operation". False: always recompute (for repeated backward passes, or a
        forward whose backward never runs or asks for only some gradients: it then costs only its own GEMM).
      backend: "triton", "cuda", "cpu" or "reference"; see ``pykernels.backends``.

    Under ``torch.autocast``, as torch's linear then cross_entropy: input, linear_weight and linear_bias are cast
    to the autocast dtype (the projection runs in it) and the loss is float32.
    """
    _check_tensors(input, linear_weight, target)  # before autocast reads input.device
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)  # (torch >= 2.13)
    if options is not None and options_type is not None and not isinstance(options, options_type):
        raise ArgumentTypeError(f"linear_cross_entropy: options must be a torch.nn.LinearCrossEntropyOptions or "
                                f"None, got {type(options).__name__}")  # (ignored, but a typo must not pass)
    if not _autocast.enabled(input):
        return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                     label_smoothing, z_loss, softcap, return_lse, group, vocab_start, vocab_size,
                                     fused, backend, None)
    input, linear_weight, linear_bias = map(_autocast.to_lower_precision, (input, linear_weight, linear_bias))
    with _autocast.off(input):
        return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                     label_smoothing, z_loss, softcap, return_lse, group, vocab_start, vocab_size,
                                     fused, backend, torch.float32 if _autocast.eligible(input) else None)


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, z_loss, softcap, return_lse, group, vocab_start, vocab_size, fused, backend,
                          amp_dtype):
    """amp_dtype: float32 under autocast (the loss's dtype, and the logits' on the reference path), else None."""
    reduction = _legacy_reduction(None, None, reduction)
    if ignore_index is not None:
        ignore_index = _index("linear_cross_entropy", "ignore_index", ignore_index)
    if (input.dim() == 1 and isinstance(target, Tensor) and not target.dtype.is_floating_point
            and tuple(target.shape) == (1,)):  # (1,) class index for one (H,) row, as torch
        target = target.reshape(())
    out_dtype = amp_dtype or input.dtype
    if group is not None:
        from ..distributed import vocab_parallel_linear_cross_entropy
        out = vocab_parallel_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            return_lse=return_lse, group=group, vocab_start=vocab_start, vocab_size=vocab_size, backend=backend,
            _loss_dtype=amp_dtype)  # under autocast: float32 as torch's, cast once from the accumulator
        return out
    if vocab_start is not None or vocab_size is not None:  # (they were ignored: the full vocabulary's loss)
        raise ArgumentValueError("linear_cross_entropy: vocab_start / vocab_size place a vocab-parallel shard: they "
                                 "need group=")
    _args.check_bool("linear_cross_entropy", "fused", fused, optional=True)
    label_smoothing, z_loss, softcap = _check_options(reduction, label_smoothing, z_loss, softcap, return_lse)
    label_smoothing = _smoothing(label_smoothing)
    logits_shape, probs, out_features = _check_args(input, linear_weight, target, linear_bias, weight, ignore_index,
                                                    amp_dtype)
    if (_native.linear_cross_entropy is not None and amp_dtype is None and not z_loss and not softcap
            and not return_lse and input.dim() <= 2
            and backends.prefer_native("linear_cross_entropy", input.device, backend)):
        # as the other ops: torch's own op where torch can express the call and a rule says so (a traced graph; no
        # kernel of ours on CPU tensors without _C); no speed rule sends linear cross-entropy there
        return _native.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                            reduction=reduction, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing)
    ii = -100 if ignore_index is None else ignore_index
    C = linear_weight.shape[0]
    H = input.shape[-1]
    softcap = float(softcap or 0.0)

    def unsupported(b: str) -> Optional[str]:
        if b == "reference":
            return None
        why = kernel_reason(b, input.dtype)
        if why:
            return why
        if probs:
            return "probability targets (an N x C target tensor) are only implemented by the reference"
        if out_features:
            return "K-dimensional linear_weight is only implemented by the reference"
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            return "gradient with respect to weight is only implemented by the reference"
        why = backends.interpreted_dot_reason(b, input.dtype, input.device)
        if why and not _fused_grads(fused, b, input, linear_weight, linear_bias, _lce.REDUCTIONS[reduction]):
            return why + " (fused=True runs the fused path: no tl.dot there)"
        return None

    chosen = backends.choose("linear_cross_entropy", input.device, backend, unsupported,
                             tensors=(input, linear_weight, linear_bias, target), empty=input.numel() == 0 or C == 0)
    if not probs:  # int64 before any comparison: a uint8 255 must not equal ignore_index -1
        target = target.to(torch.int64)
        _check_target_range(target, C, ii, "linear_cross_entropy")
    if chosen == "reference":
        if amp_dtype is not None:  # float32 logits from the autocast-rounded operands (torch: rounded logits)
            input, linear_weight = input.to(amp_dtype), linear_weight.to(amp_dtype)
            linear_bias = None if linear_bias is None else linear_bias.to(amp_dtype)
        loss, lse = _lce_ref.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                                  None if probs else ii, label_smoothing, z_loss, softcap)
        return (loss, lse.detach()) if return_lse else loss

    batch = input.shape[:-1]
    x = input.reshape(-1, H)
    t = target.reshape(-1).contiguous()  # (a strided or expanded target: the kernels read stride 1)
    w = None if weight is None else weight.detach().to(_lce.acc_dtype(input.dtype)).contiguous()
    b = None if linear_bias is None else linear_bias.contiguous()
    red = _lce.REDUCTIONS[reduction]
    loss, m, log_s, *_ = _lce.linear_cross_entropy(x, linear_weight, b, t, w, ii, red, float(label_smoothing),
                                                   float(z_loss), softcap, chosen,
                                                   _fused_grads(fused, chosen, x, linear_weight, b, red))
    loss = loss.to(out_dtype)
    if reduction == "none":
        loss = loss.reshape(batch)
    return (loss, (m + log_s).reshape(batch)) if return_lse else loss

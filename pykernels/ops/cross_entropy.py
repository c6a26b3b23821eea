"""Cross-entropy operators: kernel ops of each backend, and the autograd-level op ``pykernels::cross_entropy``.

Kernel ops (contract in docs/cross_entropy.md), one set per backend:
- ``pykernels::cross_entropy_{fwd,bwd,scale_grad_}``: C++ schemas in csrc/cross_entropy.cpp, CPU and CUDA
  kernels ("cpu" / "cuda" backends); their fake impls are registered here.
- ``pykernels::cross_entropy_{fwd,bwd,scale_grad_}_triton``: ``triton_op``s over pykernels/triton/cross_entropy.py.

``pykernels::cross_entropy`` does the reduction around a backend's kernel ops. Its autograd (register_autograd)
has two paths:
- fused: the forward kernel also writes the gradient (scaled by 1/denominator for "mean") and the backward
  multiplies it in place by the incoming gradient; the kernel skips that pass on the device when the incoming
  gradient is exactly 1, so forward+backward read the logits once and write the gradient once;
- split: the forward saves the logits, the per-row lse and its rounding residual lse_err; the backward kernel
  reads them once and writes the gradient once. Used when the forward does not require grad or the caller asks
  for it (fused=False).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext, backends
from ..reference import cross_entropy as _ref
from . import _checks, _higher_order
from ._eager import EagerOp
from ._fused_grads import hand_out

NONE, MEAN, SUM = 0, 1, 2
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


# ---------------------------------------------------------------------------------------------------------
# Fake (meta) implementations, shared by the C++ and the Triton kernel ops.

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of weights, scales, per-row losses and lse: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, write_grad):
    N, C, D = logits.shape
    M = N * D
    loss = logits.new_empty((M,), dtype=acc_dtype(logits.dtype))
    lse = logits.new_empty((M,), dtype=acc_dtype(logits.dtype))
    lse_err = logits.new_empty((M,), dtype=acc_dtype(logits.dtype))
    grad = logits.new_empty((N, C, D)) if write_grad else logits.new_empty((0,))
    return loss, lse, grad, lse_err


def _bwd_fake(grad_rows, logits, target, weight, lse, lse_err, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _scale_fake(grad, scale):
    return None


# ---------------------------------------------------------------------------------------------------------
# Kernel ops per backend.

KERNELS = {}  # backend -> (fwd, bwd, scale_grad_) op overloads

if _ext.loaded():
    torch.library.register_fake("pykernels::cross_entropy_fwd")(_fwd_fake)
    torch.library.register_fake("pykernels::cross_entropy_bwd")(_bwd_fake)
    torch.library.register_fake("pykernels::cross_entropy_scale_grad_")(_scale_fake)
    _cpp = (torch.ops.pykernels.cross_entropy_fwd.default, torch.ops.pykernels.cross_entropy_bwd.default,
            torch.ops.pykernels.cross_entropy_scale_grad_.default)
    KERNELS["cpu"] = KERNELS["cuda"] = _cpp

_mods, triton_import_error = backends.triton_kernel_modules("cross_entropy")
if _mods:
    _tk, = _mods
    _tfwd = torch.library.triton_op("pykernels::cross_entropy_fwd_triton", mutates_args=())(_tk.cross_entropy_fwd)
    _tbwd = torch.library.triton_op("pykernels::cross_entropy_bwd_triton", mutates_args=())(_tk.cross_entropy_bwd)
    _tscale = torch.library.triton_op("pykernels::cross_entropy_scale_grad__triton",
                                      mutates_args=("grad",))(_tk.cross_entropy_scale_grad_)
    KERNELS["triton"] = (torch.ops.pykernels.cross_entropy_fwd_triton.default,
                         torch.ops.pykernels.cross_entropy_bwd_triton.default,
                         torch.ops.pykernels.cross_entropy_scale_grad__triton.default)


# ---------------------------------------------------------------------------------------------------------
# The autograd-level op.

def _denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int, acc: torch.dtype) -> Tensor:
    """Divisor of reduction="mean": sum of target weights over non-ignored rows (PyTorch's weighted mean),
    the number of rows for probability targets. Stays on the device: no host sync."""
    if target.dtype.is_floating_point:
        return torch.full((), float(target.shape[0] * target.shape[2]), dtype=acc, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    w = weight.to(acc)[torch.where(valid, target, 0).clamp(0, C - 1)]
    return torch.where(valid, w, 0.0).sum()


def _cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: int,
                     label_smoothing: float, z_loss: float, write_grad: bool, backend: str
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """logits (N, C, D); target int64 (N*D,) or probabilities (N, C, D); weight (C,) of acc_dtype or None.

    Returns (loss, lse, grad, denominator, lse_err): loss of acc_dtype (the caller casts it: to the logits' dtype,
    or to float32 under autocast, as torch), shape () or (N*D,) for reduction none;
    lse (N*D,) of acc_dtype; grad the gradient of the reduced loss when write_grad (else empty); denominator ();
    lse_err (N*D,) of acc_dtype, the rounding residual of lse that the split backward needs (internal).
    """
    fwd, _, _ = _checks.kernels("pykernels::cross_entropy", KERNELS, backend)
    denom = _denominator(target, weight, ignore_index, logits.shape[1], acc_dtype(logits.dtype))
    grad_scale = (1.0 / denom).reshape(1) if reduction == MEAN else None
    rows, lse, grad, lse_err = fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                                   write_grad)
    if reduction == NONE:
        loss = rows
    elif reduction == SUM:
        loss = rows.sum()
    else:
        loss = rows.sum() / denom  # 0/0 = NaN when every target is ignored, as PyTorch
    return loss, lse, grad, denom, lse_err


cross_entropy_op = torch.library.custom_op("pykernels::cross_entropy", mutates_args=())(_cross_entropy)


@cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, write_grad, backend):
    N, C, D = logits.shape
    loss = logits.new_empty((N * D,) if reduction == NONE else (), dtype=acc_dtype(logits.dtype))
    lse = logits.new_empty((N * D,), dtype=acc_dtype(logits.dtype))
    grad = logits.new_empty((N, C, D)) if write_grad else logits.new_empty((0,))
    lse_err = logits.new_empty((N * D,), dtype=acc_dtype(logits.dtype))
    return loss, lse, grad, logits.new_empty((), dtype=acc_dtype(logits.dtype)), lse_err


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, write_grad, backend = inputs
    _, lse, grad, denom, lse_err = output
    ctx.mark_non_differentiable(lse, grad, denom, lse_err)
    # Never materialise zero gradients for the unused outputs: one for `grad` would be an N x C fill.
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, reduction, label_smoothing, z_loss, write_grad, backend)
    if write_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, weight, lse, lse_err, denom)


def _reference_loss(ignore_index: int, reduction: int, label_smoothing: float, z_loss: float):
    """The op's loss in plain PyTorch, for a double backward (see _higher_order)."""
    name = {v: k for k, v in REDUCTIONS.items()}[reduction]

    def forward(logits, target, weight):
        N, _, D = logits.shape
        t = target if target.is_floating_point() else target.reshape(N, D)
        loss, _ = _ref.cross_entropy(logits.to(acc_dtype(logits.dtype)), t, weight, ignore_index, name,
                                     label_smoothing, z_loss)
        return (loss.reshape(-1) if reduction == NONE else loss,)
    return forward


def _backward(ctx, g_loss, g_lse, g_grad, g_denom, g_lse_err):
    ignore_index, reduction, label_smoothing, z_loss, write_grad, backend = ctx.args
    _, bwd, scale_grad_ = KERNELS[backend]
    if g_loss is None:  # only lse/denominator were used downstream: they carry no gradient
        return None, None, None, None, None, None, None, None, None
    if _higher_order.create_graph(g_loss):
        if write_grad:
            _higher_order.refuse("pykernels.cross_entropy", "the fused forward saved the gradient, not the logits",
                                 "Pass fused=False (or backend='reference') to the call or module.")
        return _higher_order.reference_grads("pykernels.cross_entropy", _reference_loss(*ctx.args[:4]),
                                             ctx.saved_tensors[:3], ctx.needs_input_grad, (g_loss,))
    g = g_loss.to(acc_dtype(g_loss.dtype)).reshape(-1).contiguous()  # may arrive expanded (stride 0)
    if write_grad:
        def mul(grad, g):  # per row (reduction="none": g is (N * D,)) or a scalar
            return (grad * (g.reshape(grad.shape[0], 1, grad.shape[2]) if g.numel() > 1 else g)).to(grad.dtype)
        (grad,) = hand_out(ctx, "pykernels.cross_entropy", lambda: ctx.saved_tensors, g, mul, scale_grad_)
        return grad, None, None, None, None, None, None, None, None
    logits, target, weight, lse, lse_err, denom = ctx.saved_tensors
    grad_rows = g / denom if reduction == MEAN else g
    grad = bwd(grad_rows, logits, target, weight, lse, lse_err, ignore_index, label_smoothing, z_loss)
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("pykernels::cross_entropy", _backward, setup_context=_setup_context)
cross_entropy = EagerOp(cross_entropy_op, _cross_entropy, _setup_context, _backward)

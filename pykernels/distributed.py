"""Vocab-parallel fused linear cross-entropy over a torch.distributed process group.

Each rank holds a contiguous block of rows of the LM head: ``linear_weight`` (V_r, H) (and ``linear_bias`` (V_r,))
are the classes ``[vocab_start, vocab_start + V_r)`` of a vocabulary of ``vocab_size`` classes (default: rank r
holds ``[r * V_r, (r + 1) * V_r)`` and ``vocab_size = world * V_r``). ``input``, ``target`` and the class
``weight`` (vocab_size,) are the same on every rank (replicated, as after a tensor-parallel all-gather).

Forward: every rank runs the backend's forward kernel on its shard (per-row max and log-sum-exp relative to it,
target logit, smoothing sum over its classes; never the logits), then two all_reduces combine them: MAX of the row
max, then one SUM of the stacked (sum-exp relative to the global max, target logit, smoothing sum). The loss is
identical on every rank.
Backward: every rank recomputes its shard's logit tiles with the global lse, gets d_weight / d_bias of its own
rows and its partial d_input, and one SUM all_reduce of d_input (in fp32) makes d_input right on every rank.
Collectives: 2 in the forward (2N and 3N floats), 1 in the backward (N x H floats).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends
from .errors import ArgumentTypeError, ArgumentValueError
from .ops import linear_cross_entropy as _lce

__all__ = ["vocab_parallel_linear_cross_entropy"]


class _VocabParallelLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                z_loss, softcap, group, vocab_start, vocab_size, backend, loss_dtype):
        fwd, _ = _lce.KERNELS[backend]
        acc = _lce.acc_dtype(input.dtype)
        smooth = label_smoothing > 0
        w_local = None if weight is None else weight[vocab_start:vocab_start + linear_weight.shape[0]].contiguous()
        m_l, ls_l, zy, zs = fwd(input, linear_weight, linear_bias, target, w_local, vocab_start, softcap, smooth)
        m = m_l.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        stats = torch.stack([torch.exp((m_l - m) + ls_l), zy.to(acc), zs.to(acc)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        log_s = torch.log(stats[0])
        lse = m + log_s
        valid, bad, w_y, wsum = _lce.row_terms(target, weight, ignore_index, vocab_size, acc)
        rows = _lce.rows_loss(m, log_s, stats[1], stats[2], valid, bad, w_y, wsum, vocab_size, label_smoothing,
                              z_loss)
        loss, denom = _lce.reduce_rows(rows, w_y, reduction)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, w_local, m, log_s, denom)
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss, softcap, group, vocab_start, vocab_size,
                    backend)
        ctx.mark_non_differentiable(lse)
        return loss.to(loss_dtype), lse  # one rounding, from the accumulator

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        input, linear_weight, linear_bias, target, weight, w_local, m, log_s, denom = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss, softcap, group, vocab_start, vocab_size, backend = ctx.args
        acc = _lce.acc_dtype(input.dtype)
        g = _lce.upstream_rows(g_loss, denom, reduction, input.shape[0], acc)
        valid, _, w_y, wsum = _lce.row_terms(target, weight, ignore_index, vocab_size, acc)
        cp, cy, cw = _lce.row_coefficients(g, m + log_s, valid, w_y, wsum, vocab_size, label_smoothing, z_loss)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = linear_bias is not None and ctx.needs_input_grad[2]
        gx, gw, gb = _lce.split_backward(input, linear_weight, linear_bias, target, w_local, m, log_s, cp, cy, cw,
                                         vocab_start, softcap, label_smoothing > 0, need_x, need_w, need_b, backend)
        if need_x:
            gx = gx.contiguous()
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=group)  # fp32: the sum over shards, then one rounding
            gx = gx.to(input.dtype)
        return ((gx if need_x else None), (gw if need_w else None), (gb if need_b else None),
                None, None, None, None, None, None, None, None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                        linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                                        reduction: str = "mean", ignore_index: Optional[int] = None,
                                        label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0,
                                        return_lse: bool = False, group=None, vocab_start: Optional[int] = None,
                                        vocab_size: Optional[int] = None, backend: Optional[str] = None,
                                        _loss_dtype: Optional[torch.dtype] = None):
    """``pykernels.functional.linear_cross_entropy`` with the vocabulary sharded over ``group`` (None: the default
    group). Class-index targets only (global class ids); input (..., H), linear_weight (V_r, H) of this rank.
    Backends: "cuda" (fp16/bf16), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cpu" (the C++ kernels) and
    "reference" (the kernel contract in plain PyTorch, chunked: also never the logits). ``_loss_dtype``: the loss's
    dtype (None: input's; float32 under autocast), cast once from the float32 accumulator."""
    from .functional.cross_entropy import _check_target_range, _index, _smoothing
    from .functional.linear_cross_entropy import _check_options, kernel_reason
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("linear_cross_entropy: group= needs an initialised torch.distributed process group")
    if group is True:
        group = None
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2:
        raise ArgumentValueError("linear_cross_entropy: vocab-parallel linear_weight must be this rank's (V_r, H) rows")
    if not isinstance(input, Tensor) or not input.dtype.is_floating_point or input.dim() < 1:
        raise ArgumentTypeError("linear_cross_entropy: input must be a floating-point Tensor (..., H)")
    Vr, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ArgumentValueError(f"linear_cross_entropy: linear_weight's last dimension ({H}) must equal input's last "
                                 f"dimension, in_features ({input.shape[-1]})")
    if linear_weight.dtype != input.dtype:
        raise ArgumentTypeError(f"linear_cross_entropy: linear_weight has dtype {linear_weight.dtype} but input has "
                                f"{input.dtype}; they must match")
    if (not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.uint8)
            or tuple(target.shape) != tuple(input.shape[:-1])):
        raise ArgumentValueError(f"linear_cross_entropy: vocab-parallel target must be int64 (or uint8) class indices "
                                 f"of shape {tuple(input.shape[:-1])}")
    target = target.to(torch.int64)  # before any comparison: a uint8 255 must not equal ignore_index -1
    vocab_start = rank * Vr if vocab_start is None else int(vocab_start)
    vocab_size = world * Vr if vocab_size is None else int(vocab_size)
    if not 0 <= vocab_start <= vocab_size - Vr:
        raise ArgumentValueError(f"linear_cross_entropy: shard [{vocab_start}, {vocab_start + Vr}) is outside the "
                         f"vocabulary of {vocab_size} classes")
    if linear_bias is not None and tuple(linear_bias.shape) != (Vr,):
        raise ArgumentValueError(f"linear_cross_entropy: linear_bias must have shape ({Vr},) (this rank's classes), "
                                 f"got {tuple(linear_bias.shape)}")
    if weight is not None and tuple(weight.shape) != (vocab_size,):
        raise ArgumentValueError(f"linear_cross_entropy: weight must have shape ({vocab_size},) (the whole "
                                 f"vocabulary), got {tuple(weight.shape)}")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ArgumentValueError("linear_cross_entropy: the vocab-parallel path treats the class weight as a "
                                 "constant; pass weight.detach() (a weight that requires grad would get no "
                                 "gradient)")
    _check_options(reduction, label_smoothing, z_loss, softcap)
    label_smoothing = _smoothing(label_smoothing)
    ii = -100 if ignore_index is None else _index("linear_cross_entropy", "ignore_index", ignore_index)
    _check_target_range(target, vocab_size, ii, "linear_cross_entropy")

    def unsupported(b: str) -> Optional[str]:
        if b == "reference":
            return None
        return kernel_reason(b, input.dtype) or backends.interpreted_dot_reason(b, input.dtype, input.device)

    chosen = backends.choose("linear_cross_entropy_vocab_parallel", input.device, backend, unsupported,
                             tensors=(input, linear_weight, linear_bias))
    batch = input.shape[:-1]
    w = None if weight is None else weight.detach().to(_lce.acc_dtype(input.dtype)).contiguous()
    loss, lse = _VocabParallelLCE.apply(input.reshape(-1, H), linear_weight,
                                        None if linear_bias is None else linear_bias.contiguous(),
                                        target.reshape(-1).contiguous(), w, ii, _lce.REDUCTIONS[reduction],
                                        float(label_smoothing), float(z_loss), float(softcap or 0.0), group,
                                        vocab_start, vocab_size, chosen, _loss_dtype or input.dtype)
    if reduction == "none":
        loss = loss.reshape(batch)
    return (loss, lse.reshape(batch)) if return_lse else loss

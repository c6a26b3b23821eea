"""Attention operators: kernel ops of each backend, and the autograd-level op ``pykernels::attention``.

Kernel ops (contract in docs/attention.md), one pair per backend, the same schema for all:
- ``pykernels::attention_fwd`` / ``attention_bwd``: reserved for the C++/CUDA kernels (backend "cuda"); when
  the compiled extension registers them, their fakes are registered here and they join ``KERNELS``.
- ``pykernels::attention_fwd_triton`` / ``attention_bwd_triton``: ``triton_op``s over pykernels/triton/attention.py.

``pykernels::attention`` is the autograd-level op: the forward saves (q, k, v, bias, out, lse, seed), the backward
recomputes the probabilities tile by tile from the lse (FlashAttention-2 style) and regenerates the dropout mask
from the seed. It covers dense (B, H, L, E) and packed varlen (T, H, E) calls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..reference import attention as _ref
from . import _higher_order
from ._eager import EagerOp

# ---------------------------------------------------------------------------------------------------------
# Fakes, shared by every backend's kernel ops.

def _fwd_fake(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal, diag,
              bottom_right, win_left, win_right, softcap, dropout_p, seed):
    if cu_seqlens_q is not None:
        T, H = q.shape[0], q.shape[1]
        return q.new_empty(T, H, v.shape[-1]), q.new_empty(H, T, dtype=torch.float32)
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p, seed, bias_requires_grad):
    dbias = (bias.new_empty(bias.shape) if bias_requires_grad and bias is not None and bias.dtype != torch.bool
             else q.new_empty(0))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


# ---------------------------------------------------------------------------------------------------------
# Kernel ops per backend.

KERNELS = {}  # backend -> (fwd, bwd) op overloads

_mods, triton_import_error = backends.triton_kernel_modules("attention")
if _mods:
    _ta, = _mods
    torch.library.triton_op("pykernels::attention_fwd_triton", mutates_args=())(_ta.attention_fwd)
    torch.library.triton_op("pykernels::attention_bwd_triton", mutates_args=())(_ta.attention_bwd)
    KERNELS["triton"] = (torch.ops.pykernels.attention_fwd_triton.default,
                         torch.ops.pykernels.attention_bwd_triton.default)


def _register_cpp() -> None:
    """The "cuda" backend: C++ ops of the same schema without the suffix, once the extension defines them."""
    try:
        fwd, bwd = torch.ops.pykernels.attention_fwd.default, torch.ops.pykernels.attention_bwd.default
    except (AttributeError, RuntimeError):
        return
    torch.library.register_fake("pykernels::attention_fwd")(_fwd_fake)
    torch.library.register_fake("pykernels::attention_bwd")(_bwd_fake)
    KERNELS["cuda"] = (fwd, bwd)


_register_cpp()


# ---------------------------------------------------------------------------------------------------------
# The autograd-level op.

def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                 cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                 is_causal: bool, diag: int, bottom_right: bool, win_left: int, win_right: int, softcap: float,
                 dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """Dense: q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), bias a bool (True = attend) or float (added)
    mask broadcastable to (B, H, L, S) or None -> (out (B, H, L, Ev), lse (B, H, L) fp32).
    Varlen (cu_seqlens_q/k int32 (nseq + 1,)): q (T, H, E), k/v (Tk, Hk, E|Ev) -> (out (T, H, Ev), lse (H, T))."""
    return KERNELS[backend][0](q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                               is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p, seed)


attention_op = torch.library.custom_op("pykernels::attention", mutates_args=())(_attention)


@attention_op.register_fake
def _(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal, diag, bottom_right,
      win_left, win_right, softcap, dropout_p, seed, backend):
    return _fwd_fake(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal, diag,
                     bottom_right, win_left, win_right, softcap, dropout_p, seed)


_N_INPUTS = 18


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, is_causal, diag, bottom_right, win_left, win_right, softcap,
     dropout_p, seed, backend) = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, bias, cu_q, cu_k, o, lse, seed)
    ctx.args = (max_q, max_k, scale, is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p, backend)


def _backward(ctx, g_o, g_lse):
    if g_o is None:
        return (None,) * _N_INPUTS
    q, k, v, bias, cu_q, cu_k, o, lse, seed = ctx.saved_tensors
    max_q, max_k, scale, is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p, backend = ctx.args
    if _higher_order.create_graph(g_o):
        if dropout_p > 0:
            _higher_order.refuse("pykernels.attention", "its dropout mask is the kernel's own random stream",
                                 "Use dropout_p=0 or backend='reference' for higher-order gradients.")
        alignment = "bottom_right" if (bottom_right or diag != 0) else "top_left"

        def forward(q, k, v, bias, cu_q, cu_k):
            if cu_q is not None:
                return (_ref.varlen_attention(q, k, v, cu_q, cu_k, None, 0.0, is_causal, scale, alignment,
                                              (win_left, win_right), softcap)[0],)
            return (_ref.scaled_dot_product_attention(q, k, v, bias, None, 0.0, is_causal, scale,
                                                      k.shape[1] != q.shape[1], alignment, (win_left, win_right),
                                                      softcap)[0],)
        return _higher_order.reference_grads("pykernels.attention", forward, (q, k, v, bias, cu_q, cu_k),
                                             ctx.needs_input_grad, (g_o,))
    want_dbias = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dbias = KERNELS[backend][1](g_o, q, k, v, o, lse, bias, cu_q, cu_k, max_q, max_k, scale,
                                            is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p,
                                            seed, want_dbias)
    return (dq, dk, dv, dbias if want_dbias else None) + (None,) * (_N_INPUTS - 4)


torch.library.register_autograd("pykernels::attention", _backward, setup_context=_setup_context)
attention = EagerOp(attention_op, _attention, _setup_context, _backward)


def dropout_mask(seed: Tensor, B: int, H: int, L: int, S: int, dropout_p: float) -> Tensor:
    """The (B, H, L, S) keep-mask the Triton kernels apply for a dense call with this seed."""
    if not _mods:
        raise backends.BackendUnavailableError(f"dropout_mask runs the Triton kernel: {triton_import_error}")
    return _mods[0].dropout_mask(seed, B, H, L, S, dropout_p)

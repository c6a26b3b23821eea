"""Attention operators (work in progress: registered and tested, not yet behind pykernels.functional until
they are measured on a GPU against SDPA; see the attention issue).

Kernel ops: ``pykernels::attention_fwd_triton`` / ``attention_bwd_triton`` (triton_op over
pykernels/triton/attention.py). ``pykernels::attention`` is the autograd-level op: forward saves (q, k, v, o,
lse), backward recomputes the probabilities tile by tile (FlashAttention-2 style)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

KERNELS = {}
triton_import_error: Optional[str] = None
try:
    from ..triton import attention as _ta
except Exception as e:  # no triton
    triton_import_error = f"{type(e).__name__}: {e}"
else:
    @torch.library.triton_op("pykernels::attention_fwd_triton", mutates_args=())
    def _fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, is_causal: bool, diag: int,
             win_left: int, win_right: int, softcap: float) -> Tuple[Tensor, Tensor]:
        return _ta.attention_fwd(q, k, v, bias, scale, is_causal, diag, (win_left, win_right), softcap)

    @torch.library.triton_op("pykernels::attention_bwd_triton", mutates_args=())
    def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, bias: Optional[Tensor],
             scale: float, is_causal: bool, diag: int, win_left: int, win_right: int, softcap: float
             ) -> Tuple[Tensor, Tensor, Tensor]:
        return _ta.attention_bwd(do, q, k, v, o, lse, bias, scale, is_causal, diag, (win_left, win_right), softcap)

    KERNELS["triton"] = (torch.ops.pykernels.attention_fwd_triton.default,
                         torch.ops.pykernels.attention_bwd_triton.default)


@torch.library.custom_op("pykernels::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, is_causal: bool, diag: int,
                 win_left: int, win_right: int, softcap: float, backend: str) -> Tuple[Tensor, Tensor]:
    """q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), bias additive broadcastable to (B, H, L, S) or None.
    Returns (out (B, H, L, Ev), lse (B, H, L) fp32)."""
    return KERNELS[backend][0](q, k, v, bias, scale, is_causal, diag, win_left, win_right, softcap)


@attention_op.register_fake
def _(q, k, v, bias, scale, is_causal, diag, win_left, win_right, softcap, backend):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, is_causal, diag, win_left, win_right, softcap, backend = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, o, lse, bias)
    ctx.args = (scale, is_causal, diag, win_left, win_right, softcap, backend)


def _backward(ctx, g_o, g_lse):
    if g_o is None:
        return (None,) * 11
    q, k, v, o, lse, bias = ctx.saved_tensors
    scale, is_causal, diag, win_left, win_right, softcap, backend = ctx.args
    dq, dk, dv = KERNELS[backend][1](g_o, q, k, v, o, lse, bias, scale, is_causal, diag, win_left, win_right,
                                     softcap)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("pykernels::attention", _backward, setup_context=_setup_context)

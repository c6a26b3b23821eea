"""Attention operators: kernel ops of each backend, and the autograd-level op ``pykernels::attention``.

Kernel ops (contract in docs/attention.md), one pair per backend, the same schema for all:
- ``pykernels::attention_fwd`` / ``attention_bwd``: reserved for the C++/CUDA kernels (backend "cuda"); when
  the compiled extension registers them, their fakes are registered here and they join ``KERNELS``.
- ``pykernels::attention_fwd_triton`` / ``attention_bwd_triton``: ``triton_op``s over pykernels/triton/attention.py.
- ``pykernels::attention_fwd_reference`` / ``attention_bwd_reference``: the plain-PyTorch reference behind the same
  contract (``REFERENCE_KERNELS``, not in ``KERNELS``), for traced reference calls (see below).

``pykernels::attention`` is the autograd-level op: the forward saves (q, k, v, bias, out, lse, lse_lo, seed), the
backward recomputes the probabilities tile by tile from the lse (FlashAttention-2 style; the backward kernel ops take
lse_lo, which corrects them where lse's rounding lost mass) and regenerates the dropout mask from the seed. It covers
dense (B, H, L, E) and packed varlen (T, H, E) calls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..reference import attention as _ref
from . import _checks, _higher_order
from ._eager import EagerOp

# ---------------------------------------------------------------------------------------------------------
# Fakes, shared by every backend's kernel ops.

def _fwd_fake(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal, diag,
              bottom_right, win_left, win_right, softcap, dropout_p, seed):
    if cu_seqlens_q is not None:
        T, H = q.shape[0], q.shape[1]
        out, rows = q.new_empty(T, H, v.shape[-1]), (H, T)
    else:
        B, H, L, _ = q.shape
        out, rows = q.new_empty(B, H, L, v.shape[-1]), (B, H, L)
    return out, q.new_empty(rows, dtype=torch.float32), q.new_empty(rows, dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, lse_lo, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
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
# The reference as a pair of kernel ops (backend "reference"), for traced calls.
#
# An eager reference call runs pykernels/reference/attention.py directly (plain PyTorch: full autograd, double
# backward, forward AD). Under torch.compile that code cannot be traced for varlen: it reads cu_seqlens on the host
# and loops over the sequences (data-dependent: GuardOnDataDependentSymNode). These opaque ops run the same forward
# with the kernels' contract (and its hand-derived backward), so a compiled varlen call on the reference goes
# through pykernels::attention as a kernel call does. Kept out of KERNELS: that dict lists the backends with
# kernels (the benchmarks and tests read it that way).

def _reference_generator(seed: Optional[Tensor], device) -> torch.Generator:
    """The generator of the reference ops' dropout masks, seeded with the op's ``seed`` tensor: the forward and the
    backward draw the same masks. Not the stream of an eager reference call (which draws from torch's global
    generator) nor the Triton / CUDA kernels' (Philox in the kernel)."""
    if seed is None:
        raise ValueError("pykernels::attention_fwd/bwd_reference: dropout_p > 0 needs a seed tensor")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.reshape(-1)[0]) & ((1 << 64) - 1))
    return gen


def _reference_call(q, k, v, bias, cu_q, cu_k, scale, is_causal, diag, bottom_right, win_left, win_right,
                    softcap, dropout_p, seed, grad_out=None, bias_requires_grad=False):
    """A kernel op's arguments run on the reference: its (out, lse), or with ``grad_out`` its hand-derived
    gradients (dq, dk, dv, dbias or None)."""
    window = (int(win_left), int(win_right))
    masked = bool(is_causal) or window != (-1, -1)  # the diagonal matters only then
    if cu_q is not None:
        if masked and diag != 0:
            raise NotImplementedError("the reference kernel ops take varlen calls with diag == 0 (per-sequence "
                                      "alignment comes from bottom_right)")
        alignment = "bottom_right" if bottom_right else "top_left"
        masks = None if dropout_p <= 0 else _ref.varlen_dropout_masks(cu_q, cu_k, q.shape[1], dropout_p, q.device,
                                                                      _reference_generator(seed, q.device))
        if grad_out is None:
            return _ref.varlen_attention(q, k, v, cu_q, cu_k, masks, dropout_p, is_causal, scale, alignment,
                                         window, softcap)
        return _ref.varlen_attention_backward(grad_out, q, k, v, cu_q, cu_k, masks, dropout_p, is_causal, scale,
                                              alignment, window, softcap) + (None,)
    L, S = q.shape[-2], k.shape[-2]
    d = diag + (S - L if bottom_right else 0)
    if d == 0 or not masked:
        alignment = "top_left"
    elif d == S - L:
        alignment = "bottom_right"
    else:
        raise NotImplementedError(f"the reference kernel ops take a diagonal of 0 or S - L, got {d}")
    keep = None
    if dropout_p > 0:
        keep = torch.rand(q.shape[:-1] + (S,), generator=_reference_generator(seed, q.device), device=q.device,
                          dtype=torch.float32) >= dropout_p  # (float32 whatever the default dtype: see reference)
    args = (q, k, v, bias, keep, dropout_p, is_causal, scale, k.shape[1] != q.shape[1], alignment, window, softcap)
    if grad_out is None:
        return _ref.scaled_dot_product_attention(*args)
    return _ref.scaled_dot_product_attention_backward(grad_out, *args, mask_grad=bias_requires_grad)


@torch.library.custom_op("pykernels::attention_fwd_reference", mutates_args=())
def _attention_fwd_reference(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                             max_seqlen_k: int, scale: float, is_causal: bool, diag: int, bottom_right: bool,
                             win_left: int, win_right: int, softcap: float, dropout_p: float, seed: Optional[Tensor]
                             ) -> Tuple[Tensor, Tensor, Tensor]:
    out, lse = _reference_call(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, scale, is_causal, diag, bottom_right,
                               win_left, win_right, softcap, dropout_p, seed)
    lse = lse.float().contiguous()  # the fakes' layout (lse fp32, also for float64 inputs)
    # lse_lo 0: the reference's backward normalises through the row sums, never through the lse
    return out.contiguous(), lse, torch.zeros_like(lse)


@torch.library.custom_op("pykernels::attention_bwd_reference", mutates_args=())
def _attention_bwd_reference(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             lse_lo: Optional[Tensor], bias: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                             cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                             is_causal: bool, diag: int, bottom_right: bool, win_left: int, win_right: int,
                             softcap: float, dropout_p: float, seed: Optional[Tensor], bias_requires_grad: bool
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reference's backward derived by hand (an op's implementation runs below the autograd dispatch keys,
    where torch.autograd records nothing; torch.func.vjp there breaks under a TorchDispatchMode), from the
    forward recomputed with the same dropout masks (the seed's); out, lse and lse_lo are not read."""
    want_dbias = bool(bias_requires_grad) and bias is not None and bias.dtype != torch.bool
    dq, dk, dv, dbias = _reference_call(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, scale, is_causal, diag,
                                        bottom_right, win_left, win_right, softcap, dropout_p, seed, grad_out,
                                        want_dbias)
    dq, dk, dv = (torch.empty_like(t).copy_(g) for t, g in ((q, dq), (k, dk), (v, dv)))  # the fake's layout
    return dq, dk, dv, bias.new_empty(bias.shape).copy_(dbias) if want_dbias else q.new_empty(0)


_attention_fwd_reference.register_fake(_fwd_fake)
_attention_bwd_reference.register_fake(_bwd_fake)
REFERENCE_KERNELS = (torch.ops.pykernels.attention_fwd_reference.default,
                     torch.ops.pykernels.attention_bwd_reference.default)


def kernel_ops(backend: str):
    """(fwd, bwd) kernel ops of ``backend``: KERNELS', or the reference's."""
    if backend == "reference":
        return REFERENCE_KERNELS
    return _checks.kernels("pykernels::attention", {**KERNELS, "reference": REFERENCE_KERNELS}, backend)


# ---------------------------------------------------------------------------------------------------------
# The autograd-level op.

def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                 cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                 is_causal: bool, diag: int, bottom_right: bool, win_left: int, win_right: int, softcap: float,
                 dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense: q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), bias a bool (True = attend) or float (added)
    mask broadcastable to (B, H, L, S) or None -> (out (B, H, L, Ev), lse (B, H, L) fp32, lse_lo).
    Varlen (cu_seqlens_q/k int32 (nseq + 1,)): q (T, H, E), k/v (Tk, Hk, E|Ev) -> (out (T, H, Ev), lse (H, T),
    lse_lo). lse_lo (lse's layout, fp32): log of how much exp(s - lse) overestimates each row's probabilities
    (Triton: what rounding took from lse; CUDA: with its exp2 offset's rounding; the reference: 0), which the
    backward kernel ops take back (docs/attention.md)."""
    return kernel_ops(backend)[0](q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
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
    o, lse, lse_lo = output
    ctx.mark_non_differentiable(lse, lse_lo)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, bias, cu_q, cu_k, o, lse, lse_lo, seed)
    ctx.args = (max_q, max_k, scale, is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p, backend)


def _backward(ctx, g_o, g_lse, g_lse_lo):
    if g_o is None:
        return (None,) * _N_INPUTS
    q, k, v, bias, cu_q, cu_k, o, lse, lse_lo, seed = ctx.saved_tensors
    max_q, max_k, scale, is_causal, diag, bottom_right, win_left, win_right, softcap, dropout_p, backend = ctx.args
    if _higher_order.create_graph(g_o):
        if dropout_p > 0 and backend != "reference":
            _higher_order.refuse("pykernels.attention", "its dropout mask is the kernel's own random stream",
                                 "Use dropout_p=0 or backend='reference' for higher-order gradients.")

        def forward(q, k, v, bias, cu_q, cu_k):  # the reference (with the reference ops' seeded dropout masks)
            return (_reference_call(q, k, v, bias, cu_q, cu_k, scale, is_causal, diag, bottom_right, win_left,
                                    win_right, softcap, dropout_p, seed)[0],)
        return _higher_order.reference_grads("pykernels.attention", forward, (q, k, v, bias, cu_q, cu_k),
                                             ctx.needs_input_grad, (g_o,))
    want_dbias = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dbias = kernel_ops(backend)[1](g_o, q, k, v, o, lse, lse_lo, bias, cu_q, cu_k, max_q, max_k, scale,
                                               is_causal, diag, bottom_right, win_left, win_right, softcap,
                                               dropout_p, seed, want_dbias)
    if want_dbias and (bias.dim() == 0 or bias.shape[-1] == 1):
        # constant along the keys: softmax ignores it, the gradient is exactly 0 (the kernels' dS rows sum to
        # dO.(O - O rounded), ~1e-3 |dO||O| in fp16, which an optimizer like Adam would turn into steps); NaN kept
        # (an inf is summed noise that overflowed a 16-bit mask's dtype, not a gradient)
        dbias = torch.where(dbias.isnan(), dbias, 0)
    return (dq, dk, dv, dbias if want_dbias else None) + (None,) * (_N_INPUTS - 4)


torch.library.register_autograd("pykernels::attention", _backward, setup_context=_setup_context)
attention = EagerOp(attention_op, _attention, _setup_context, _backward)


def dropout_mask(seed: Tensor, B: int, H: int, L: int, S: int, dropout_p: float) -> Tensor:
    """The (B, H, L, S) keep-mask the Triton kernels apply for a dense call with this seed."""
    if not _mods:
        raise backends.BackendUnavailableError(f"dropout_mask runs the Triton kernel: {triton_import_error}")
    return _mods[0].dropout_mask(seed, B, H, L, S, dropout_p)

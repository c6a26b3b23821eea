"""Fused linear cross-entropy operators (contract: docs/linear_cross_entropy.md).

Kernels, one (fwd, bwd) pair per backend in ``KERNELS``, all with the signatures of the Triton launchers:
- "triton": ``pykernels::linear_cross_entropy_{fwd,bwd}_triton``, ``triton_op``s over
  pykernels/triton/linear_cross_entropy.py;
- "cuda" and "cpu": the C++ ops ``pykernels::linear_cross_entropy_partials`` / ``_dlogits``
  (csrc/linear_cross_entropy.cpp; kernels in csrc/cuda/linear_cross_entropy.cu, defined by CUDA builds only, and
  csrc/cpu/linear_cross_entropy.cpp) behind the launch logic the backends share
  (pykernels/ops/linear_cross_entropy_launch.py);
- "reference": the contract in plain PyTorch, chunked over the vocabulary (pykernels/reference/linear_cross_entropy.py),
  plain functions (autograd never sees them: they run inside the op below).

``pykernels::linear_cross_entropy`` turns a backend's per-row statistics into the loss (the reduction, the
weighted-mean denominator, label smoothing, z-loss) and registers the autograd formula. Two paths:
- split: the backward recomputes the logits tile by tile through the backend's ``bwd`` kernel (one op,
  ``pykernels::linear_cross_entropy_backward``, when traced); nothing of size N x V is saved or allocated (four
  GEMMs in all);
- fused (``FUSED``: the cpu backend, float32/float64/bfloat16, reduction mean or sum): the forward's kernel also
  writes the gradients for an upstream gradient of 1, a block of rows at a time (three GEMMs, as torch's own),
  and the backward only scales them.
The per-row helpers (``row_terms``, ``rows_loss``, ``row_coefficients``) are shared with the vocab-parallel path
(pykernels/distributed.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from ..reference import linear_cross_entropy as _ref
from . import _checks, _higher_order
from . import linear_cross_entropy_launch as _launch
from ._eager import EagerOp, tracing
from ._fused_grads import hand_out

NONE, MEAN, SUM = 0, 1, 2
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


acc_dtype = _launch.acc_dtype


KERNELS = {"reference": (_ref.linear_cross_entropy_fwd, _ref.linear_cross_entropy_bwd)}

_mods, triton_import_error = backends.triton_kernel_modules("linear_cross_entropy", "linear_cross_entropy_fused")
if _mods:
    _tk, _tkf = _mods
    torch.library.triton_op("pykernels::linear_cross_entropy_fwd_triton", mutates_args=())(
        _tk.linear_cross_entropy_fwd)
    torch.library.triton_op("pykernels::linear_cross_entropy_bwd_triton", mutates_args=())(
        _tk.linear_cross_entropy_bwd)
    KERNELS["triton"] = (torch.ops.pykernels.linear_cross_entropy_fwd_triton.default,
                         torch.ops.pykernels.linear_cross_entropy_bwd_triton.default)
    torch.library.triton_op("pykernels::linear_cross_entropy_fused_triton", mutates_args=())(
        _tkf.linear_cross_entropy_fused)


# The CUDA kernels' geometry (csrc/cuda/linear_cross_entropy.h): 128 x 128 logit tiles; chunks of 256 columns.
_CUDA_TILE = 128


def _cpp_partials(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth, splits):
    return torch.ops.pykernels.linear_cross_entropy_partials(input, linear_weight, linear_bias, target.contiguous(),
                                                             weight, vocab_start, softcap, smooth, splits)


def _cpp_dlogits(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start,
                 softcap, smooth, col0, dl, db):
    torch.ops.pykernels.linear_cross_entropy_dlogits(input, linear_weight, linear_bias, target.contiguous(), weight,
                                                     m, log_s, coef_p, coef_y, coef_w, vocab_start, softcap, smooth,
                                                     col0, dl, db)


_CUDA = _launch.Kernels(_cpp_partials, _cpp_dlogits, tile_cols=_CUDA_TILE, chunk_align=2 * _CUDA_TILE,
                        db_rows=_CUDA_TILE)


def _cuda_fwd(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth):
    splits = _launch.num_splits(input.shape[0], linear_weight.shape[0], input.device, _CUDA_TILE)
    return _launch.forward(_CUDA, input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth,
                           splits)


def _cuda_bwd(*args):
    return _launch.backward(_CUDA, *args)


def _partials_fake(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth, splits):
    N, acc = input.shape[0], acc_dtype(input.dtype)
    mk = [input.new_empty(splits, N, dtype=acc) for _ in range(3)]
    return (*mk, input.new_empty(splits if smooth else 0, N, dtype=acc))


def _dlogits_fake(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start,
                  softcap, smooth, col0, dl, db_part):
    return None


# The CPU kernels (csrc/cpu/linear_cross_entropy.cpp): BLAS logit blocks, reduced or turned into dlogits by one
# vectorised pass; one split (the kernel loops over the classes itself), bias sums per 64 rows.
_CPU = _launch.Kernels(_cpp_partials, _cpp_dlogits, tile_cols=1024, chunk_align=64, db_rows=64)


def _cpu_fwd(input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth):
    return _launch.forward(_CPU, input, linear_weight, linear_bias, target, weight, vocab_start, softcap, smooth, 1)


def _cpu_bwd(*args):
    return _launch.backward(_CPU, *args)


# The fused path (gradients in the forward; see ``_linear_cross_entropy``): backend -> (kernel, dtypes). CPU:
# pykernels::linear_cross_entropy_fused (csrc/cpu/linear_cross_entropy.cpp), float32 / float64, and bfloat16 where
# oneDNN has bf16 GEMMs (float16 GEMMs, and bf16 ones elsewhere, are slow on CPUs: the split path converts those to
# float32; csrc/cpu/gemm_dtype.h). Triton: the same contract with cuBLAS GEMMs around
# a Triton row kernel (pykernels/triton/linear_cross_entropy_fused.py). FUSED_AUTO: the backends whose fused path
# automatic calls (fused=None) take, because it measured faster; the others only on fused=True.
FUSED = {}
FUSED_AUTO = {"cpu"}
if triton_import_error is None:
    FUSED["triton"] = (torch.ops.pykernels.linear_cross_entropy_fused_triton.default,
                       (torch.float32, torch.float16, torch.bfloat16))
GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS = 1, 2, 4  # the bits of the op's ``fused_grads``


def _fused_fake(input, linear_weight, linear_bias, target, weight, coef_p0, coef_lse, coef_y, coef_w, softcap,
                smooth, block_rows, input_grad, weight_grad, bias_grad):
    (N, H), V = input.shape, linear_weight.shape[0]
    rows = [input.new_empty(N, dtype=acc_dtype(input.dtype)) for _ in range(4)]
    return (*rows, input.new_empty((N, H) if input_grad else (0,)),
            input.new_empty((V, H) if weight_grad else (0,)), input.new_empty((V,) if bias_grad else (0,)))


def _register_cpp() -> None:
    try:
        torch.ops.pykernels.linear_cross_entropy_partials.default
        torch.ops.pykernels.linear_cross_entropy_dlogits.default
    except (AttributeError, RuntimeError):
        return
    torch.library.register_fake("pykernels::linear_cross_entropy_partials")(_partials_fake)
    torch.library.register_fake("pykernels::linear_cross_entropy_dlogits")(_dlogits_fake)
    for key, kernels in (("CPU", (_cpu_fwd, _cpu_bwd)), ("CUDA", (_cuda_fwd, _cuda_bwd))):
        if torch._C._dispatch_has_kernel_for_dispatch_key("pykernels::linear_cross_entropy_partials", key):
            KERNELS[key.lower()] = kernels
    try:
        fused = torch.ops.pykernels.linear_cross_entropy_fused.default
    except (AttributeError, RuntimeError):  # an extension built before the fused kernel
        return
    torch.library.register_fake("pykernels::linear_cross_entropy_fused")(_fused_fake)
    if torch._C._dispatch_has_kernel_for_dispatch_key("pykernels::linear_cross_entropy_fused", "CPU"):
        bf16 = (torch.bfloat16,) if torch.bfloat16 in _native.ONEDNN_DTYPES else ()
        FUSED["cpu"] = (fused, (torch.float32, torch.float64, *bf16))


def fused_reason(backend: str, dtype: torch.dtype, reduction: int, asked: bool = True) -> Optional[str]:
    """Why a call cannot take the fused path (None: it can); ``asked``: fused=True (else automatic)."""
    if reduction == NONE:
        return "reduction 'none' (per-row upstream gradients reach dW only through the backward)"
    if backend not in FUSED:
        return f"the {backend} backend has no fused kernel"
    if not asked and backend not in FUSED_AUTO:
        return f"the {backend} fused path is not measured faster yet (fused=True takes it)"
    if dtype not in FUSED[backend][1]:
        why = (" (this CPU's oneDNN has no bf16 GEMMs: the split path runs fp32 ones)"
               if backend == "cpu" and dtype == torch.bfloat16 else "")
        return f"the {backend} fused kernel takes {', '.join(map(str, FUSED[backend][1]))}, not {dtype}{why}"
    return None


_register_cpp()


# ---------------------------------------------------------------------------------------------------------
# The split path's backward as one op. The backends' ``bwd`` loops over vocabulary chunks in Python (the shared
# launch logic: ``for c0 in range(0, V, chunk)``, chunk from N and V; the reference: chunks of 4096 columns). Traced
# in the autograd formula, that loop would make V, and the number of chunks N implies, guards of the graph (a
# recompile per vocabulary size under torch.compile(dynamic=True), ConstraintViolationError with a dynamic
# vocabulary dim) and unroll one node group per chunk. Behind ``pykernels::linear_cross_entropy_backward`` a traced
# graph holds one call whatever N and V; eager calls run the kernels directly (the same code, the same numbers).

def _split_backward(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                    weight: Optional[Tensor], m: Tensor, log_s: Tensor, coef_p: Tensor, coef_y: Tensor,
                    coef_w: Tensor, vocab_start: int, softcap: float, smooth: bool, input_grad: bool,
                    weight_grad: bool, bias_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``bwd`` kernel of ``KERNELS[backend]`` (the kernel contract's arguments, then the backend's name):
    (grad_input (N, H) in the accumulation dtype, grad_weight (V, H) in linear_weight's dtype, grad_bias (V,) in
    linear_bias's dtype); an unrequested one (grad_bias also without a bias) is empty: (0,), of the accumulation
    dtype for grad_input, of linear_weight's dtype for grad_weight, of input's for grad_bias."""
    _, bwd = _checks.kernels("pykernels::linear_cross_entropy_backward", KERNELS, backend)
    return bwd(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start,
               softcap, smooth, input_grad, weight_grad, bias_grad)


linear_cross_entropy_backward_op = torch.library.custom_op("pykernels::linear_cross_entropy_backward",
                                                           mutates_args=())(_split_backward)


@linear_cross_entropy_backward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, m, log_s, coef_p, coef_y, coef_w, vocab_start, softcap,
      smooth, input_grad, weight_grad, bias_grad, backend):
    N, H = input.shape
    V = linear_weight.shape[0]
    gx = input.new_empty((N, H) if input_grad else (0,), dtype=acc_dtype(input.dtype))
    gw = linear_weight.new_empty((V, H) if weight_grad else (0,))
    gb = linear_bias.new_empty((V,)) if bias_grad and linear_bias is not None else input.new_empty(0)
    return gx, gw, gb


def split_backward(*args) -> Tuple[Tensor, Tensor, Tensor]:
    """``pykernels::linear_cross_entropy_backward`` (arguments as ``_split_backward``) when something traces the
    call, else its body directly (no custom-op dispatch in eager backward passes)."""
    if tracing(*(a for a in args if isinstance(a, Tensor))):
        return linear_cross_entropy_backward_op(*args)
    return _split_backward(*args)


# ---------------------------------------------------------------------------------------------------------
# Per-row math, shared with the vocab-parallel path. C is the number of classes of the whole vocabulary.

def row_terms(target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int, acc: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(valid, bad, w_y, W): valid = not ignored; bad = not ignored and out of [0, C) (loss NaN);
    w_y the target's class weight (0 on ignored rows); W = sum of the class weights (C without weight)."""
    valid = target != ignore_index
    inrange = (target >= 0) & (target < C)
    bad = valid & ~inrange
    y = torch.where(valid & inrange, target, 0)
    if weight is None:
        w_y = valid.to(acc)
        # (C itself, not float(C): a traced backward's C is the symbolic vocabulary size, which float() would
        # specialise; the same rounding to acc)
        wsum = torch.full((), C, dtype=acc, device=target.device)
    else:
        w_y = torch.where(valid, weight.to(acc)[y], 0.0)
        wsum = weight.to(acc).sum()
    return valid, bad, w_y, wsum


def rows_loss(m: Tensor, log_s: Tensor, z_target: Tensor, z_sum: Tensor, valid: Tensor, bad: Tensor, w_y: Tensor,
              wsum: Tensor, C: int, label_smoothing: float, z_loss: float) -> Tensor:
    """Per-row loss: w_y (1-eps)(lse - z_y) + (eps/C)(W lse - sum_c w_c z_c) + zl lse^2 (last two on valid rows),
    lse = m + log_s; lse - z_y is formed as (m - z_y) + log_s (exact near the max, as log_softmax)."""
    eps = label_smoothing
    lse = m + log_s
    loss = w_y * (1.0 - eps) * torch.where(valid, (m - z_target) + log_s, 0.0)
    if eps:
        # sum_c w_c (lse - z_c): an infinite W (a +-inf class weight, no NaN) makes it W itself, as torch's
        # -sum w log_softmax (every lse - z_c > 0), where W lse - sum w z is inf - inf = NaN; (lse - lse) keeps a
        # NaN row NaN
        smooth = torch.where(wsum.isinf(), wsum + (lse - lse), wsum * lse - z_sum)
        loss = loss + torch.where(valid, (eps / C) * smooth, 0.0)
    if z_loss:
        loss = loss + torch.where(valid, z_loss * lse.square(), 0.0)
    return torch.where(bad, float("nan"), loss)


def row_coefficient_parts(g: Tensor, valid: Tensor, w_y: Tensor, wsum: Tensor, C: int, label_smoothing: float,
                          z_loss: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(coef_p0, coef_lse, coef_y, coef_w) for per-row upstream gradients g, all zero on ignored rows (also when g
    is inf/NaN there, e.g. 1/0 of an all-ignored mean): the kernels' coef_p = coef_p0 + coef_lse * lse (the lse
    term only where coef_lse != 0), so that the fused kernel can form it once the row's lse is known."""
    eps = label_smoothing
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    # eps W / C only with smoothing: 0 * a NaN / inf weight of a class no target uses is NaN (the kernels read
    # coef_w, and the class weights, only with smoothing too)
    coef_p0 = torch.where(valid, g * (w_y * (1.0 - eps) + eps * wsum / C if eps else w_y), zero).contiguous()
    coef_lse = torch.where(valid, g * (2.0 * z_loss), zero).contiguous()
    coef_y = torch.where(valid, g * w_y * (1.0 - eps), zero).contiguous()
    coef_w = torch.where(valid, g * (eps / C), zero).contiguous()
    return coef_p0, coef_lse, coef_y, coef_w


def row_coefficients(g: Tensor, lse: Tensor, valid: Tensor, w_y: Tensor, wsum: Tensor, C: int,
                     label_smoothing: float, z_loss: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(coef_p, coef_y, coef_w) of the kernels' dlogits formula (see ``row_coefficient_parts``)."""
    p0, pl, cy, cw = row_coefficient_parts(g, valid, w_y, wsum, C, label_smoothing, z_loss)
    cp = torch.where(pl != 0, p0 + pl * lse, p0).contiguous() if z_loss else p0
    return cp, cy, cw


def reduce_rows(rows: Tensor, w_y: Tensor, reduction: int) -> Tuple[Tensor, Tensor]:
    """(loss, denominator); mean divides by sum_r w_y (NaN when everything is ignored, as PyTorch)."""
    denom = w_y.sum()
    if reduction == NONE:
        return rows, denom
    if reduction == SUM:
        return rows.sum(), denom
    return rows.sum() / denom, denom


def upstream_rows(g_loss: Tensor, denom: Tensor, reduction: int, N: int, acc: torch.dtype) -> Tensor:
    g = g_loss.to(acc)
    if reduction == MEAN:
        g = g / denom
    return g.reshape(-1).expand(N).contiguous() if g.numel() == 1 else g.reshape(-1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# The autograd-level op.

def _linear_cross_entropy(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                          weight: Optional[Tensor], ignore_index: int, reduction: int, label_smoothing: float,
                          z_loss: float, softcap: float, backend: str, fused_grads: int = 0
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """input (N, H), linear_weight (V, H) of the same dtype, linear_bias (V,) or None, target int64 (N,),
    weight (V,) of the accumulation dtype or None.

    fused_grads: 0, or the gradients (GRAD_INPUT | GRAD_WEIGHT | GRAD_BIAS) that the backend's fused kernel writes
    during the forward, for an upstream gradient of 1 (``fused_reason`` must be None); the backward then only
    scales them. Else the backward recomputes the logits (nothing of size N x V is saved or allocated).

    Returns (loss, m, log_s, denominator, grad_input, grad_weight, grad_bias), all but the gradients in the
    accumulation dtype (the caller casts the loss: to the input's dtype, or to float32 under autocast, as torch):
    loss () or (N,) for reduction none; the row max m and log_s with lse = m + log_s, (N,); the mean's denominator
    (); the fused gradients in their operands' dtype (empty, of the accumulation dtype, when not written)."""
    op = "pykernels::linear_cross_entropy"
    kernels = _checks.kernels(op, KERNELS, backend)
    # row_terms indexes the class weight with the targets: a short one must fail here, named, not as an IndexError
    _checks.linear_cross_entropy(op, input, linear_weight, linear_bias, target, weight)
    acc = acc_dtype(input.dtype)
    C = linear_weight.shape[0]
    valid, bad, w_y, wsum = row_terms(target, weight, ignore_index, C, acc)
    if fused_grads:
        why = fused_reason(backend, input.dtype, reduction)
        if why:  # e.g. reduction none: per-row upstream gradients cannot be applied to dW afterwards
            raise ValueError(f"pykernels::linear_cross_entropy: fused_grads={fused_grads} but {why}")
        N = input.shape[0]
        # the per-row upstream gradients of a loss whose own upstream gradient is 1 (the backward scales)
        g = upstream_rows(torch.ones((), dtype=acc, device=input.device), w_y.sum(), reduction, N, acc)
        kernel, _ = FUSED[backend]
        m, log_s, zy, zs, gx, gw, gb = kernel(
            _launch.rows_contiguous(input), _launch.rows_contiguous(linear_weight), linear_bias, target, weight,
            *row_coefficient_parts(g, valid, w_y, wsum, C, label_smoothing, z_loss), softcap, label_smoothing > 0,
            _launch.fused_block_rows(N, C, input.element_size(), input.device),
            *(bool(fused_grads & bit) for bit in (GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS)))
    else:
        fwd, _ = kernels
        m, log_s, zy, zs = fwd(input, linear_weight, linear_bias, target, weight, 0, softcap, label_smoothing > 0)
        gx, gw, gb = (input.new_empty(0, dtype=acc) for _ in range(3))  # (outputs may not alias each other)
    rows = rows_loss(m, log_s, zy, zs, valid, bad, w_y, wsum, C, label_smoothing, z_loss)
    loss, denom = reduce_rows(rows, w_y, reduction)
    return loss, m, log_s, denom, gx, gw, gb


linear_cross_entropy_op = torch.library.custom_op("pykernels::linear_cross_entropy",
                                                  mutates_args=())(_linear_cross_entropy)


@linear_cross_entropy_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      backend, fused_grads=0):
    N, H = input.shape
    V = linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    loss = input.new_empty((N,) if reduction == NONE else (), dtype=acc)
    grads = [input.new_empty(shape if fused_grads & bit else (0,), dtype=input.dtype if fused_grads else acc)
             for bit, shape in ((GRAD_INPUT, (N, H)), (GRAD_WEIGHT, (V, H)), (GRAD_BIAS, (V,)))]
    return loss, input.new_empty(N, dtype=acc), input.new_empty(N, dtype=acc), input.new_empty((), dtype=acc), *grads


def _setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
     backend, *fused) = inputs
    _, m, log_s, denom, gx, gw, gb = output
    ctx.mark_non_differentiable(m, log_s, denom, gx, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, fused[0] if fused else 0)
    if ctx.args[-1]:
        ctx.save_for_backward(gx, gw, gb)  # the gradients for an upstream 1: nothing else is needed
    else:
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, m, log_s, denom)


def _reference_loss(ignore_index: int, reduction: int, label_smoothing: float, z_loss: float, softcap: float):
    """The op's loss in plain PyTorch (the logits materialised), for a double backward (see _higher_order)."""
    name = {v: k for k, v in REDUCTIONS.items()}[reduction]

    def forward(input, linear_weight, linear_bias, target, weight):
        loss, _ = _ref.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, name, ignore_index,
                                            label_smoothing, z_loss, softcap)
        return (loss,)
    return forward


def _backward(ctx, g_loss, g_m, g_log_s, g_denom, g_gx, g_gw, g_gb):
    ignore_index, reduction, label_smoothing, z_loss, softcap, backend, fused_grads = ctx.args
    none = (None,) * (len(ctx.needs_input_grad) - 3)  # 12 through the op, 11 from an eager call without fused_grads
    if g_loss is None:
        return None, None, None, *none
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if _higher_order.create_graph(g_loss):
        if fused_grads:
            _higher_order.refuse("pykernels.linear_cross_entropy", "the fused forward saved the gradients, not "
                                 "its inputs", "Pass fused=False (or backend='reference') to the call or module.")
        return _higher_order.reference_grads("pykernels.linear_cross_entropy",
                                             _reference_loss(*ctx.args[:5]), ctx.saved_tensors[:5],
                                             ctx.needs_input_grad, (g_loss,))
    if fused_grads:
        saved = ctx.saved_tensors
        g = g_loss.to(acc_dtype(saved[0].dtype))
        wanted = [ctx.needs_input_grad[i] and bool(fused_grads & bit)
                  for i, bit in enumerate((GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS))]
        scaled = iter(hand_out(ctx, "pykernels.linear_cross_entropy",
                               lambda: tuple(t for t, w in zip(saved, wanted) if w), g, lambda t, g: t * g))
        grads = tuple(next(scaled) if w else None for w in wanted)
        # (A saved tensor handed out may become a leaf's .grad itself, which a later .backward() adds to in place;
        # its version counter then makes a further pass through a retained graph raise, never read the sum.)
        return (*grads, *none)
    input, linear_weight, linear_bias, target, weight, m, log_s, denom = ctx.saved_tensors
    acc = acc_dtype(input.dtype)
    C = linear_weight.shape[0]
    g = upstream_rows(g_loss, denom, reduction, input.shape[0], acc)
    valid, _, w_y, wsum = row_terms(target, weight, ignore_index, C, acc)
    cp, cy, cw = row_coefficients(g, m + log_s, valid, w_y, wsum, C, label_smoothing, z_loss)
    need_b = linear_bias is not None and ctx.needs_input_grad[2]
    gx, gw, gb = split_backward(input, linear_weight, linear_bias, target, weight, m, log_s, cp, cy, cw, 0, softcap,
                                label_smoothing > 0, need_x, need_w, need_b, backend)
    return (gx.to(input.dtype) if need_x else None), (gw if need_w else None), (gb if need_b else None), *none


torch.library.register_autograd("pykernels::linear_cross_entropy", _backward, setup_context=_setup_context)
linear_cross_entropy = EagerOp(linear_cross_entropy_op, _linear_cross_entropy, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# Cost model (docs/linear_cross_entropy.md), for the benchmark harness: what a run should be compared with.

def cost_model(N: int, H: int, V: int, dtype: torch.dtype = torch.bfloat16, backward: bool = True,
               chunk_bytes: Optional[int] = None, splits: int = 16) -> dict:
    """FLOPs, minimal HBM bytes and the Triton backend's workspace for one call at (N, H, V).

    - ``flops``: tensor-core FLOPs of this design: 2NHV forward, + 6NHV backward (recomputed logits, dX, dW).
    - ``flops_3gemm``: the floor of any exact design that stores no logits across the pass (logits, dX, dW).
    - ``min_bytes``: read x and W (and write dX, dW with ``backward``); any FLCE must move these.
    - ``fused_workspace_bytes`` / ``fused_flops``: the same for the Triton fused path (fused=True: three GEMMs,
      6NHV, gradients in the forward; a logit block of CHUNK_BYTES and, for 16-bit inputs, the fp32 dW accumulator).
    - ``workspace_bytes``: extra memory the Triton backend allocates beyond inputs, outputs and gradients:
      forward partials (4 x splits x N fp32), saved lse (N fp32), backward dlogits chunk (N x chunk columns in
      ``dtype``), the fp32 dX accumulator for 16-bit inputs, 3 per-row coefficient vectors. cuBLAS workspace
      is not counted.
    - ``logits_bytes``: what materialising the logits would cost (N x V in ``dtype``; the fp32 upcast that
      eager ``cross_entropy(logits.float())`` adds is ``4NV`` more).
    """
    elt = torch.empty((), dtype=dtype).element_size()
    gemm = 2 * N * H * V
    flops = gemm * (4 if backward else 1)
    min_bytes = elt * (N * H + V * H) * (2 if backward else 1)
    if chunk_bytes is None:
        from .linear_cross_entropy_launch import CHUNK_BYTES as chunk_bytes  # noqa: N811
    chunk = min(V, max(256, (chunk_bytes // max(N * elt, 1)) // 256 * 256))
    fwd_ws = 4 * splits * N * 4 + 3 * N * 4
    bwd_ws = (N * chunk * elt + (N * H * 4 if elt < 4 else 0) + 3 * N * 4) if backward else 0
    # the Triton fused path (fused=True on CUDA): one block of logits, the fp32 dW accumulator (16-bit), the row
    # statistics and coefficients
    rows = _launch.fused_block_rows(N, V, elt, torch.device("cuda"))
    fused_ws = rows * V * elt + (V * H * 4 if elt < 4 else 0) + 8 * N * 4
    return {"flops": flops, "flops_3gemm": gemm * (3 if backward else 1), "min_bytes": min_bytes,
            "workspace_bytes": fwd_ws + bwd_ws, "fused_workspace_bytes": fused_ws, "fused_flops": gemm * 3,
            "forward_workspace_bytes": fwd_ws,
            "backward_workspace_bytes": bwd_ws, "backward_chunk_columns": chunk,
            "logits_bytes": N * V * elt, "gradient_bytes": elt * (N * H + V * H) if backward else 0}

"""LSTM operators (contract: docs/lstm.md): kernel ops of each backend and the autograd-level ops.

Kernel ops, one set per backend, same schemas:
- ``pykernels::lstm_cell_{fwd,bwd}``: C++ schemas in csrc/lstm.cpp, CPU and CUDA kernels ("cpu" / "cuda"
  backends); their fakes are registered here. ``pykernels::lstm_cell_grads``: the cell's whole backward, CPU only.
- ``pykernels::lstm_layer_{fwd,bwd}``: C++ schemas in csrc/lstm.cpp, CPU kernels (csrc/cpu/lstm_layer_kernels.h) and,
  in CUDA builds, persistent CUDA kernels (csrc/cuda/lstm_layer.cu): the "cpu" / "cuda" backends' sequence op.
- ``pykernels::lstm_cell_{fwd,bwd}_triton`` and ``pykernels::lstm_layer_{fwd,bwd}_triton``: ``triton_op``s over
  pykernels/triton/lstm.py (cell) and pykernels/triton/lstm_layer.py (sequence).

Autograd-level ops:
- ``pykernels::lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend) -> (h, c, ws)``: one fused step; the
  backward is the backend's pointwise gate-gradient kernel plus GEMMs for dx, dh, dW_ih, dW_hh, db (on the CPU one
  op for all of it, ``pykernels::lstm_cell_grads``).
- ``pykernels::lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, backend) -> (out, h_n, c_n, ws)``: one layer
  direction over a whole padded sequence: one input-projection GEMM, one recurrent launch; the backward runs the
  recurrence in reverse time, then one GEMM each for dx, dW_ih, dW_hh.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext, _native, backends
from ..reference import lstm as _ref
from . import _checks, _higher_order
from ._eager import EagerOp


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the workspace (saved gates, cell state) and of the gate gradients."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Fakes.

def _cell_fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    B, H = hx.shape
    return (input.new_empty(B, H), input.new_empty(B, H), input.new_empty(B, 5 * H, dtype=acc_dtype(input.dtype)))


def _cell_bwd_fake(grad_h, grad_c, cx, ws):
    B, H = cx.shape
    return cx.new_empty(B, 4 * H, dtype=ws.dtype), cx.new_empty(B, H)


def _cell_grads_fake(grad_h, grad_c, cx, ws, input, hx, w_ih, w_hh, input_grad, hx_grad, w_ih_grad, w_hh_grad,
                     bias_grad):
    def out(need, *shape):
        return input.new_empty(shape if need else (0,))
    B, H = cx.shape
    return (out(input_grad, B, input.shape[1]), out(hx_grad, B, H), cx.new_empty(B, H), out(w_ih_grad, *w_ih.shape),
            out(w_hh_grad, *w_hh.shape), out(bias_grad, 4 * H))


def _layer_fwd_fake(xproj, w_hh, h0, c0, reverse):
    T, B, H4 = xproj.shape
    H = H4 // 4
    return h0.new_empty(T, B, H), xproj.new_empty(T, B, 5 * H)


def _layer_bwd_fake(grad_out, grad_hn, grad_cn, c0, ws, w_hh, reverse):
    T, B, H5 = ws.shape
    H = H5 // 5
    return ws.new_empty(T, B, 4 * H), ws.new_empty(B, H), ws.new_empty(B, H)


# ---------------------------------------------------------------------------------------------------------
# Kernel ops per backend: CELL[backend] = (fwd, bwd); LAYER[backend] = (fwd, bwd).

def _ref_layer_fwd(xproj, w_hh, h0, c0, reverse):
    """The sequence kernel contract in plain PyTorch (acc dtype math, h rounded to w_hh's dtype per step)."""
    T, B, H4 = xproj.shape
    H = H4 // 4
    out = h0.new_empty(T, B, H)
    ws = xproj.new_empty(T, B, 5 * H)
    h, c = h0, c0.to(xproj.dtype)
    w = w_hh.to(xproj.dtype)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        g = xproj[t] + h.to(xproj.dtype) @ w.t()
        i, f, gg, o = g[:, :H].sigmoid(), g[:, H:2 * H].sigmoid(), g[:, 2 * H:3 * H].tanh(), g[:, 3 * H:].sigmoid()
        c = f * c + i * gg
        h = (o * c.tanh()).to(out.dtype)
        out[t] = h
        ws[t] = torch.cat([i, f, gg, o, c], 1)
    return out, ws


def _ref_layer_bwd(grad_out, grad_hn, grad_cn, c0, ws, w_hh, reverse):
    T, B, H5 = ws.shape
    H = H5 // 5
    acc = ws.dtype
    w = w_hh.to(acc)
    dg = ws.new_empty(T, B, 4 * H)
    dh = grad_hn.to(acc) if grad_hn is not None else ws.new_zeros(B, H)
    dc = grad_cn.to(acc) if grad_cn is not None else ws.new_zeros(B, H)
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    for s in range(T - 1, -1, -1):
        t = order[s]
        if grad_out is not None:
            dh = dh + grad_out[t].to(acc)
        i, f, g, o, c = ws[t].split(H, 1)
        c_prev = c0.to(acc) if s == 0 else ws[order[s - 1], :, 4 * H:]
        tc = c.tanh()
        dct = dc + dh * o * (1 - tc * tc)
        dg[t] = torch.cat([dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g),
                           dh * tc * o * (1 - o)], 1)
        dc = dct * f
        dh = dg[t].to(w_hh.dtype).to(acc) @ w
    return dg, dh, dc


# The reference entry of LAYER checks the kernel contract and lets the CPU tier compile the layer op (the
# interpreted Triton kernels cannot be traced on fake tensors); the public "reference" backend of
# pykernels.functional.lstm is pykernels/reference/lstm.py itself.
CELL = {}
# backend -> its op computing the cell's whole backward in one call (the CPU's: at small batches the Python glue of
# the GEMMs below cost as much as the kernels); other backends use their CELL backward plus _weight_grads.
CELL_GRADS = {}
LAYER = {"reference": (_ref_layer_fwd, _ref_layer_bwd)}


def _cpp_op_present(name: str) -> bool:
    try:
        getattr(torch.ops.pykernels, name).default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


cpp_error: Optional[str] = None
if not _ext.loaded():
    cpp_error = _ext.load_error
elif not _cpp_op_present("lstm_cell_fwd"):
    cpp_error = "pykernels._C was built without the LSTM kernels (csrc/lstm.cpp); rebuild the extension"
else:
    torch.library.register_fake("pykernels::lstm_cell_fwd")(_cell_fwd_fake)
    torch.library.register_fake("pykernels::lstm_cell_bwd")(_cell_bwd_fake)
    CELL["cpu"] = CELL["cuda"] = (torch.ops.pykernels.lstm_cell_fwd.default, torch.ops.pykernels.lstm_cell_bwd.default)
    if _cpp_op_present("lstm_cell_grads"):
        torch.library.register_fake("pykernels::lstm_cell_grads")(_cell_grads_fake)
        CELL_GRADS["cpu"] = torch.ops.pykernels.lstm_cell_grads.default
    if _cpp_op_present("lstm_layer_fwd"):  # an extension built before csrc/cpu/lstm_layer.cpp has the cell only
        torch.library.register_fake("pykernels::lstm_layer_fwd")(_layer_fwd_fake)
        torch.library.register_fake("pykernels::lstm_layer_bwd")(_layer_bwd_fake)
        LAYER["cpu"] = (torch.ops.pykernels.lstm_layer_fwd.default, torch.ops.pykernels.lstm_layer_bwd.default)
        if torch._C._dispatch_has_kernel_for_dispatch_key("pykernels::lstm_layer_fwd", "CUDA"):
            LAYER["cuda"] = LAYER["cpu"]  # the same ops; the CUDA build adds the persistent kernels

_mods, triton_import_error = backends.triton_kernel_modules("lstm", "lstm_layer")
if _mods:
    _tk, _tkl = _mods
    torch.library.triton_op("pykernels::lstm_cell_fwd_triton", mutates_args=())(_tk.lstm_cell_fwd)
    torch.library.triton_op("pykernels::lstm_cell_bwd_triton", mutates_args=())(_tk.lstm_cell_bwd)
    torch.library.triton_op("pykernels::lstm_layer_fwd_triton", mutates_args=())(_tkl.lstm_layer_fwd)
    torch.library.triton_op("pykernels::lstm_layer_bwd_triton", mutates_args=())(_tkl.lstm_layer_bwd)
    CELL["triton"] = (torch.ops.pykernels.lstm_cell_fwd_triton.default,
                      torch.ops.pykernels.lstm_cell_bwd_triton.default)
    LAYER["triton"] = (torch.ops.pykernels.lstm_layer_fwd_triton.default,
                       torch.ops.pykernels.lstm_layer_bwd_triton.default)


# ---------------------------------------------------------------------------------------------------------
# The cell.

def _lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """input (B, I), hx/cx (B, H), weights (4H, I)/(4H, H), biases (4H) or None, all of one dtype. Returns
    (h', c') in that dtype and ws (B, 5H) of acc_dtype: the activated gates i, f, g, o and c' unrounded."""
    return _checks.kernels("pykernels::lstm_cell", CELL, backend)[0](input, hx, cx, w_ih, w_hh, b_ih, b_hh)


lstm_cell_op = torch.library.custom_op("pykernels::lstm_cell", mutates_args=())(_lstm_cell)


@lstm_cell_op.register_fake
def _(input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend):
    return _cell_fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def _cell_setup(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.backend = backend
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, output[2], b_ih, b_hh)


gemm_dtype = _native.gemm_dtype  # the GEMM dtype of 16-bit operands on the CPU, shared with the other ops


# K-blocking of the backward GEMMs whose output is narrow: a (M, K) @ b (K, N) with min(M, N) <= _NARROW runs as
# K / _KBLOCK GEMMs of K = _KBLOCK (one bmm) and a cascade sum of their partial products. With one output dimension
# this small the BLAS takes a GEMV-like path that accumulates K sequentially (MKL, fp32: dW = dg^T x over K = T*B
# rows with input_size <= 8, or dx = dg W_ih over K = 4H with few rows or columns, had 4-9x the error of torch's
# LSTM backward, which accumulates per step); wider outputs are K-blocked by the BLAS itself and run as one GEMM.
# The partial products take K / _KBLOCK * M * N <= K * max(M, N) / 4 elements: less than the larger operand. Such
# GEMMs read far more than they compute, so the extra pass costs little.
_NARROW = 16
_KBLOCK = 64


def _mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, K-blocked when the output is narrow and a fp32 K is long (see _NARROW)."""
    (M, K), N = a.shape, b.shape[1]
    n = K // _KBLOCK
    if a.dtype != torch.float32 or min(M, N) > _NARROW or n < 4:
        return a @ b
    k = n * _KBLOCK
    out = torch.bmm(a[:, :k].unflatten(1, (n, _KBLOCK)).transpose(0, 1), b[:k].unflatten(0, (n, _KBLOCK))).sum(0)
    return out if k == K else out.addmm_(a[:, k:], b[k:])


def _weight_grads(dg: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool):
    """dx = dg W, dW = dg^T x, in the weights' dtype (dg is the fp32 gate gradient, rows flattened), the GEMMs in
    gemm_dtype(w), K-blocked where the output is narrow (_mm_acc)."""
    g = gemm_dtype(w)
    d = dg.to(g)
    return ((_mm_acc(d, w.to(g))).to(w.dtype) if need_x else None), \
        ((_mm_acc(d.t(), x.to(g))).to(w.dtype) if need_w else None)


def _bias_grads(db: Optional[Tensor], ih: bool, hh: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of b_ih and b_hh, both the bias gradient db: two tensors, as torch's (one shared tensor would
    let an in-place change of one gradient, e.g. clipping the results of autograd.grad, change the other)."""
    return (db if ih else None), (None if not hh else db.clone() if ih else db)


def _cell_backward(ctx, gh, gc, gws):
    input, hx, cx, w_ih, w_hh, ws, b_ih, b_hh = ctx.saved_tensors
    if gh is None and gc is None:
        return None, None, None, None, None, None, None, None
    if _higher_order.create_graph(gh, gc):
        return _higher_order.reference_grads("pykernels.lstm_cell", _ref.lstm_cell,
                                             (input, hx, cx, w_ih, w_hh, b_ih, b_hh), ctx.needs_input_grad, (gh, gc))
    n = ctx.needs_input_grad
    # (CPU kernels only: CELL["cpu"] is CELL["cuda"], whose ops follow the tensors' device, so a direct op call named
    # "cpu" may hold CUDA tensors)
    whole = CELL_GRADS.get(ctx.backend) if ws.device.type == "cpu" else None
    if whole is not None:
        dx, dh, dcx, dwih, dwhh, db = whole(gh, gc, cx, ws, input, hx, w_ih, w_hh, n[0], n[1], n[3], n[4],
                                            n[5] or n[6])
        return (dx if n[0] else None, dh if n[1] else None, dcx if n[2] else None, dwih if n[3] else None,
                dwhh if n[4] else None, *_bias_grads(db, ctx.has_bias[0] and n[5], ctx.has_bias[1] and n[6]), None)
    dg, dcx = CELL[ctx.backend][1](gh, gc, cx, ws)
    dx, dwih = _weight_grads(dg, input, w_ih, n[0], n[3])
    dh, dwhh = _weight_grads(dg, hx, w_hh, n[1], n[4])
    db = dg.sum(0).to(w_ih.dtype) if (n[5] or n[6]) else None
    return (dx, dh, dcx if n[2] else None, dwih, dwhh,
            *_bias_grads(db, ctx.has_bias[0] and n[5], ctx.has_bias[1] and n[6]), None)


torch.library.register_autograd("pykernels::lstm_cell", _cell_backward, setup_context=_cell_setup)
lstm_cell = EagerOp(lstm_cell_op, _lstm_cell, _cell_setup, _cell_backward)




# ---------------------------------------------------------------------------------------------------------
# One layer direction over a padded sequence.

def input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    """x (T, B, I) -> (T, B, 4H) in acc_dtype: x W_ih^T + b_ih + b_hh as one GEMM over all T*B rows."""
    T, B, _ = x.shape
    acc = acc_dtype(x.dtype)
    x2 = x.reshape(T * B, x.shape[-1])  # (not -1: T * B may be 0)
    if gemm_dtype(x) != x.dtype:  # CPU 16-bit without fast GEMMs in it: fp32 GEMM on copies
        x2, w_ih = x2.to(acc), w_ih.to(acc)
        b_ih, b_hh = (None, None) if b_ih is None else (b_ih.to(acc), b_hh.to(acc))
    if b_ih is None:
        xp = (x2 @ w_ih.t()).to(acc)
    elif x2.dtype == acc:  # the bias enters the GEMM as its C operand: no second pass over the (T*B, 4H) result
        xp = torch.addmm(b_ih + b_hh, x2, w_ih.t())
    else:  # 16-bit: the GEMM's result rounded to its dtype, the biases added in fp32 (as before the fold)
        xp = (x2 @ w_ih.t()).to(acc) + (b_ih.to(acc) + b_hh.to(acc))
    return xp.reshape(T, B, xp.shape[-1])


def _lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor], reverse: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (T, B, I), h0/c0 (B, H). Returns out (T, B, H), h_n, c_n (B, H) in x's dtype, and ws (T, B, 5H) of
    acc_dtype (activated gates and fp32 c of every step). ``reverse`` runs the sequence from t = T-1 down to 0."""
    T = x.shape[0]
    fwd, _ = _checks.kernels("pykernels::lstm_layer", LAYER, backend)
    xp = input_projection(x, w_ih, b_ih, b_hh)
    out, ws = fwd(xp, w_hh, h0.contiguous(), c0.contiguous(), reverse)
    if T == 0:
        return out, h0.clone(), c0.clone(), ws
    last = 0 if reverse else T - 1
    H = h0.shape[1]
    return out, out[last].clone(), ws[last, :, 4 * H:].to(x.dtype, copy=True), ws


lstm_layer_op = torch.library.custom_op("pykernels::lstm_layer", mutates_args=())(_lstm_layer)


@lstm_layer_op.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, backend):
    T, B, _ = x.shape
    H = h0.shape[1]
    return (x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H),
            x.new_empty(T, B, 5 * H, dtype=acc_dtype(x.dtype)))


def _layer_setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, backend = inputs
    out, _, _, ws = output
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)
    ctx.args = (reverse, backend, b_ih is not None)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, out, ws, b_ih, b_hh)


def _layer_backward(ctx, g_out, g_hn, g_cn, g_ws):
    reverse, backend, has_bias = ctx.args
    x, h0, c0, w_ih, w_hh, out, ws, b_ih, b_hh = ctx.saved_tensors
    none = (None,) * 9
    if g_out is None and g_hn is None and g_cn is None:
        return none
    T, B, _ = x.shape
    if T == 0:
        return (x.new_zeros(x.shape), g_hn, g_cn, torch.zeros_like(w_ih), torch.zeros_like(w_hh),
                None, None, None, None)
    if _higher_order.create_graph(g_out, g_hn, g_cn):
        def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
            return _ref.layer_direction(x, None, h0, c0, (w_ih, w_hh, b_ih, b_hh), has_bias, False, reverse)
        return _higher_order.reference_grads("pykernels.lstm_layer", forward, (x, h0, c0, w_ih, w_hh, b_ih, b_hh),
                                             ctx.needs_input_grad, (g_out, g_hn, g_cn))
    cont = (lambda t: None if t is None else t.contiguous())
    dg, dh0, dc0 = LAYER[backend][1](cont(g_out), cont(g_hn), cont(g_cn), c0.contiguous(), ws, w_hh, reverse)
    n = ctx.needs_input_grad
    H4 = dg.shape[-1]
    dg2 = dg.reshape(T * B, H4)
    dx, dwih = _weight_grads(dg2, x.reshape(T * B, x.shape[-1]), w_ih, n[0], n[3])
    dwhh = None
    if n[4]:
        # h_{t-1} of every step in the order of dg: forward reads out[t-1] (h0 at t = 0), reverse out[t+1]
        hprev = torch.cat([h0[None], out[:-1]]) if not reverse else torch.cat([out[1:], h0[None]])
        _, dwhh = _weight_grads(dg2, hprev.reshape(T * B, hprev.shape[-1]), w_hh, False, True)
    db = dg2.sum(0).to(w_ih.dtype) if has_bias and (n[5] or n[6]) else None
    return (dx.reshape(x.shape) if dx is not None else None, dh0.to(h0.dtype) if n[1] else None,
            dc0.to(c0.dtype) if n[2] else None, dwih, dwhh, *_bias_grads(db, n[5], n[6]), None, None)


torch.library.register_autograd("pykernels::lstm_layer", _layer_backward, setup_context=_layer_setup)
lstm_layer = EagerOp(lstm_layer_op, _lstm_layer, _layer_setup, _layer_backward)

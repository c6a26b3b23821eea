"""Argument checks of the kernel ops, the Python twins of the C++ ops' TORCH_CHECKs (csrc/*.cpp): one function per
op family, called by every Triton launcher of that family (pykernels/triton/*.py, registered with triton_op) and,
where they overlap, by the functional layer. torch.ops.pykernels.* can be called directly (by users, by
torch.compile's graphs): a wrong shape, dtype or device must raise an error naming the argument, not make a kernel
read or write out of bounds (an illegal memory access on a GPU, a segfault under the interpreter).

The checks read shapes, dtypes and devices only: they hold on the fake tensors torch.compile and opcheck trace the
launchers with, and cost no host sync. Values (cu_seqlens' offsets) are read only on real CPU tensors; on a GPU they
would cost a sync per call, and a traced call has none to read (the functional layer checks what it can)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ArgumentDtypeError, ArgumentTypeError, ArgumentValueError
from ._eager import tracing

# What the Triton kernels compute in (fp32 accumulation, fp32 statistics and workspaces).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
F32 = torch.float32

Shape = Sequence[Union[int, str]]  # a str entry: any size (its name in the message)


def kernels(op: str, table: dict, backend: str):
    """``table[backend]``, or an error listing the valid backends of ``op`` (the autograd-level ops take the
    backend as a string argument; a typo must not surface as a bare KeyError)."""
    try:
        return table[backend]
    except (KeyError, TypeError):
        pass
    from .. import backends  # (here: backends imports the ops modules)
    why = (backends.available_backends("cpu" if backend == "cpu" else None)[backend]
           if isinstance(backend, str) and backend in backends.BACKENDS else None)
    if why is not None:
        # a backend this process lacks (no extension, Triton not registered, no GPU): say why, as choose() does. A
        # graph traced (exported, cached) where it ran and loaded here names it, not the user.
        raise backends.BackendUnavailableError(f"{op}: backend {backend!r} cannot run here (the call, or the graph "
                                               f"that holds it, names it): {why}")
    raise ArgumentValueError(f"{op}: backend must be one of {tuple(table)}, got {backend!r}")


def _dtype_names(dtypes: Tuple[torch.dtype, ...]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def _shape_text(shape: Shape) -> str:
    return f"({shape[0]},)" if len(shape) == 1 else f"({', '.join(map(str, shape))})"


def tensor(op: str, name: str, t: Tensor, shape: Optional[Shape] = None, dtype=None,
           device: Optional[torch.device] = None, contiguous: bool = False) -> None:
    """``t`` has ``shape`` (str entries match any size), one of the dtypes ``dtype`` (a dtype or a tuple), lies on
    ``device``, and is contiguous when asked."""
    if dtype is not None:
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in dtypes:
            raise ArgumentTypeError(f"{op}: {name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(not isinstance(s, str) and s != n
                                                           for s, n in zip(shape, t.shape))):
        raise ArgumentValueError(f"{op}: {name} must have shape {_shape_text(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ArgumentValueError(f"{op}: {name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ArgumentValueError(f"{op}: {name} must be contiguous")


def _rows_vector(op: str, name: str, t: Tensor, n, dtype, device) -> None:
    """A contiguous vector of ``n`` elements, or of one (the kernels then read it at stride 0)."""
    tensor(op, name, t, dtype=dtype, device=device, contiguous=True)
    if t.numel() != n and t.numel() != 1:
        raise ArgumentValueError(f"{op}: {name} must have {n} elements (or 1), got {t.numel()}")


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy (pykernels/triton/cross_entropy.py; C++: make_args in csrc/cross_entropy.cpp).

def cross_entropy(op: str, logits: Tensor, target: Tensor, weight: Optional[Tensor], scale: Optional[Tensor],
                  lse: Optional[Tensor] = None, lse_err: Optional[Tensor] = None) -> None:
    """logits (N, C, D) with C >= 1; target int64 (N*D,) contiguous, or probabilities of the logits' dtype and shape;
    weight (C,), scale (N*D,) or (1,), lse / lse_err (N*D,): fp32, contiguous, on the logits' device."""
    tensor(op, "logits", logits, ("N", "C", "D"), TRITON_DTYPES)
    N, C, D = logits.shape
    if C == 0:
        raise ArgumentValueError(f"{op}: logits must have at least one class")
    dev = logits.device
    if target.dtype.is_floating_point:
        tensor(op, "target", target, (N, C, D), logits.dtype, dev)
    else:
        tensor(op, "target", target, (N * D,), torch.int64, dev, contiguous=True)
    if weight is not None:
        tensor(op, "weight", weight, (C,), F32, dev, contiguous=True)
    if scale is not None:
        _rows_vector(op, "grad_scale", scale, N * D, F32, dev)
    for name, t in (("lse", lse), ("lse_err", lse_err)):
        if t is not None:
            tensor(op, name, t, (N * D,), F32, dev, contiguous=True)


def cross_entropy_scale_grad(op: str, grad: Tensor, scale: Tensor) -> None:
    tensor(op, "grad", grad, ("N", "C", "D"), TRITON_DTYPES, contiguous=True)
    _rows_vector(op, "scale", scale, grad.shape[0] * grad.shape[2], F32, grad.device)


# ---------------------------------------------------------------------------------------------------------
# LSTM (pykernels/triton/lstm.py, lstm_layer.py; C++: check_lstm_* in csrc/lstm.cpp).

def lstm_cell(fn: str, input: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], names: Tuple[str, str] = ("hx[0]", "hx[1]")) -> None:
    """The cell's operands, 2-D input (B, I): one floating dtype and device, w_ih (4H, I), w_hh (4H, H), h and c
    (named ``names``) (B, H), biases (4H,). Shared by pykernels.functional.lstm_cell and the Triton cell op."""
    # Fast path (a step costs microseconds): one expression over the common valid case; the detailed checks
    # below only run to name the offending argument.
    try:
        dt, dev = input.dtype, input.device
        B, I = input.shape
        H4, H = w_hh.shape
        if (dt.is_floating_point and H4 == 4 * H and w_ih.shape == (H4, I) and h.shape == (B, H)
                and c.shape == (B, H) and h.dtype == dt and c.dtype == dt and w_ih.dtype == dt and w_hh.dtype == dt
                and h.device == dev and c.device == dev and w_ih.device == dev and w_hh.device == dev
                and ((b_ih is None and b_hh is None)
                     or (b_ih is not None and b_hh is not None and b_ih.shape == (H4,) and b_hh.shape == (H4,)
                         and b_ih.dtype == dt and b_hh.dtype == dt and b_ih.device == dev and b_hh.device == dev))):
            return
    except (AttributeError, ValueError, TypeError):
        pass
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise ArgumentDtypeError(f"{fn}: input must be floating point, got {input.dtype}")
    if input.dim() != 2:
        raise ArgumentValueError(f"{fn}: input must be 2-D (B, I), got {input.dim()}-D")
    for name, t in ((names[0], h), (names[1], c), ("w_ih", w_ih), ("w_hh", w_hh)):
        _like_input(fn, name, t, input)
    B, I = input.shape
    if w_hh.dim() != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ArgumentValueError(f"{fn}: w_hh must have shape (4*hidden_size, hidden_size), got "
                                 f"{tuple(w_hh.shape)}")
    H = w_hh.shape[1]  # (torch's hidden_size)
    if w_ih.dim() == 2 and w_ih.shape[0] == 4 * H and w_ih.shape[1] != I:
        raise ArgumentValueError(f"{fn}: input has inconsistent input_size: got {I}, w_ih expects "
                                 f"{w_ih.shape[1]}")
    if tuple(w_ih.shape) != (4 * H, I):
        raise ArgumentValueError(f"{fn}: w_ih must have shape ({4 * H}, {I}) (4*hidden_size, input_size), got "
                                 f"{tuple(w_ih.shape)}")
    for name, t in ((names[0], h), (names[1], c)):
        if tuple(t.shape) != (B, H):
            raise ArgumentValueError(f"{fn}: {name} must have shape ({B}, {H}), got {tuple(t.shape)}")
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh)):
        if t is not None:
            _like_input(fn, name, t, input)
            if tuple(t.shape) != (4 * H,):
                raise ArgumentValueError(f"{fn}: {name} must have shape ({4 * H},), got {tuple(t.shape)}")


def _like_input(fn: str, name: str, t, input: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != input.dtype:
        raise ArgumentTypeError(f"{fn}: {name} must have the input's dtype {input.dtype}, got {t.dtype}")
    if t.device != input.device:
        raise ArgumentValueError(f"{fn}: {name} is on {t.device} but input is on {input.device}")


def lstm_cell_kernel(op: str, input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
                     b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> None:
    """The Triton cell forward: ``lstm_cell``'s rules, a Triton dtype, and both biases or neither."""
    tensor(op, "input", input, dtype=TRITON_DTYPES)
    if (b_ih is None) != (b_hh is None):
        raise ArgumentValueError(f"{op}: pass both b_ih and b_hh, or neither")
    lstm_cell(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, names=("hx", "cx"))


def lstm_cell_bwd(op: str, grad_h: Optional[Tensor], grad_c: Optional[Tensor], cx: Tensor, ws: Tensor) -> None:
    tensor(op, "cx", cx, ("B", "H"), TRITON_DTYPES)
    B, H = cx.shape
    tensor(op, "ws", ws, (B, 5 * H), F32, cx.device, contiguous=True)
    for name, g in (("grad_h", grad_h), ("grad_c", grad_c)):
        if g is not None:
            tensor(op, name, g, (B, H), cx.dtype, cx.device)


def lstm_layer_fwd(op: str, xproj: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor) -> None:
    tensor(op, "h0", h0, ("B", "H"), TRITON_DTYPES)
    B, H = h0.shape
    tensor(op, "xproj", xproj, ("T", B, 4 * H), F32, h0.device)
    tensor(op, "c0", c0, (B, H), h0.dtype, h0.device)
    tensor(op, "w_hh", w_hh, (4 * H, H), h0.dtype, h0.device)


def lstm_layer_bwd(op: str, grad_out: Optional[Tensor], grad_hn: Optional[Tensor], grad_cn: Optional[Tensor],
                   c0: Tensor, ws: Tensor, w_hh: Tensor) -> None:
    tensor(op, "c0", c0, ("B", "H"), TRITON_DTYPES)
    B, H = c0.shape
    tensor(op, "ws", ws, ("T", B, 5 * H), F32, c0.device)
    tensor(op, "w_hh", w_hh, (4 * H, H), c0.dtype, c0.device)
    if grad_out is not None:
        tensor(op, "grad_out", grad_out, (ws.shape[0], B, H), c0.dtype, c0.device)
    for name, g in (("grad_hn", grad_hn), ("grad_cn", grad_cn)):
        if g is not None:
            tensor(op, name, g, (B, H), c0.dtype, c0.device)


# ---------------------------------------------------------------------------------------------------------
# Attention (pykernels/triton/attention.py; C++: make_call in csrc/attention.cpp).

def varlen_offsets(fn: str, cu_q: Tensor, cu_k: Tensor, T: int, Tk: int, device: torch.device,
                   dtypes: Tuple[torch.dtype, ...] = (torch.int32,)) -> None:
    """cu_seqlens_q / cu_seqlens_k: 1-D offsets of nseq + 1 entries (``dtypes``), on ``device``, the same length;
    on the CPU also their values: from 0, non-decreasing, ending at most at the row count (rows past the last offset
    are padding). Shared by pykernels.functional.varlen_attention and the Triton attention op."""
    for name, cu, total in (("cu_seqlens_q", cu_q, T), ("cu_seqlens_k", cu_k, Tk)):
        if not isinstance(cu, Tensor) or cu.dtype not in dtypes or cu.dim() != 1 or cu.numel() < 1:
            raise ArgumentTypeError(f"{fn}: {name} must be a 1-D {_dtype_names(dtypes)} tensor of nseq + 1 offsets")
        if cu.device != device:
            raise ArgumentValueError(f"{fn}: {name} is on {cu.device} but the tensors are on {device}")
        if cu.device.type == "cpu" and not tracing(cu):
            if int(cu[0]) != 0 or int(cu[-1]) > total or bool((cu[1:] < cu[:-1]).any()):
                raise ArgumentValueError(f"{fn}: {name} must start at 0, be non-decreasing and end at most at "
                                         f"{total} (rows past its last offset are padding), got {cu.tolist()}")
    if cu_q.shape != cu_k.shape:
        raise ArgumentValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (nseq + 1)")


def varlen_lengths(fn: str, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> None:
    """On the CPU: no sequence longer than max_seqlen_q / max_seqlen_k (they size the kernels' grids)."""
    if cu_q.device.type == "cpu" and not tracing(cu_q, cu_k):
        lq, lk = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
        if lq.numel() and (int(lq.max()) > max_q or int(lk.max()) > max_k):
            raise ArgumentValueError(f"{fn}: a sequence is longer than max_seqlen_q/max_seqlen_k")


def attention(op: str, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], cu_q: Optional[Tensor],
              cu_k: Optional[Tensor], max_q: int, max_k: int, dropout_p: float, seed: Optional[Tensor],
              grad_out: Optional[Tensor] = None, out: Optional[Tensor] = None, lse: Optional[Tensor] = None,
              lse_lo: Optional[Tensor] = None) -> None:
    """Dense q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), bias broadcastable to (B, H, L, S); varlen q (T, H, E),
    k / v (Tk, Hk, E|Ev) with int32 offsets; Hk divides H; backward: grad_out and out of the output's shape, lse (and
    lse_lo) fp32 contiguous (B, H, L) or (H, T)."""
    tensor(op, "q", q, dtype=TRITON_DTYPES)
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        tensor(op, name, t, dtype=q.dtype, device=dev)
    if (cu_q is None) != (cu_k is None):
        raise ArgumentValueError(f"{op}: pass both cu_seqlens_q and cu_seqlens_k, or neither")
    varlen = cu_q is not None
    dims = 3 if varlen else 4
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise ArgumentValueError(f"{op}: q, k, v must be {dims}-D, got {q.dim()}, {k.dim()}, {v.dim()}")
    H, Hk, E, Ev = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    if Hk == 0 or H % Hk:
        raise ArgumentValueError(f"{op}: the query heads ({H}) must be a multiple of the kv heads ({Hk})")
    if E == 0 or k.shape[-1] != E:
        raise ArgumentValueError(f"{op}: k must have q's head dim {E} (at least 1), got {k.shape[-1]}")
    if varlen:
        tensor(op, "v", v, (k.shape[0], Hk, "Ev"))
        varlen_offsets(op, cu_q, cu_k, q.shape[0], k.shape[0], dev)
        if max_q < 0 or max_k < 0:
            raise ArgumentValueError(f"{op}: max_seqlen_q and max_seqlen_k must be >= 0, got {max_q}, {max_k}")
        varlen_lengths(op, cu_q, cu_k, max_q, max_k)
        if bias is not None:
            raise ArgumentValueError(f"{op}: bias (attn_mask) is not supported with cu_seqlens (varlen)")
        out_shape, lse_shape = (q.shape[0], H, Ev), (H, q.shape[0])
    else:
        B, L, S = q.shape[0], q.shape[2], k.shape[2]
        tensor(op, "k", k, (B, Hk, S, E))
        tensor(op, "v", v, (B, Hk, S, "Ev"))
        if bias is not None:
            if not (bias.dtype == torch.bool or bias.dtype.is_floating_point):
                raise ArgumentTypeError(f"{op}: bias must be bool or floating, got {bias.dtype}")
            full = (B, H, L, S)
            if bias.dim() > 4 or any(b != 1 and b != n for b, n in zip(reversed(bias.shape), reversed(full))):
                raise ArgumentValueError(f"{op}: bias must broadcast to {full}, got {tuple(bias.shape)}")
            tensor(op, "bias", bias, device=dev)
        out_shape, lse_shape = (B, H, L, Ev), (B, H, L)
    if not 0.0 <= dropout_p < 1.0:
        raise ArgumentValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() < 1 or seed.device != dev):
        raise ArgumentValueError(f"{op}: dropout needs seed, an int64 tensor on {dev}")
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t is not None:
            tensor(op, name, t, out_shape, device=dev)
    for name, t in (("lse", lse), ("lse_lo", lse_lo)):
        if t is not None:
            tensor(op, name, t, lse_shape, F32, dev, contiguous=True)  # the kernels index their rows


# ---------------------------------------------------------------------------------------------------------
# Linear cross-entropy (pykernels/triton/linear_cross_entropy*.py and the op pykernels::linear_cross_entropy; C++:
# check_lce_* in csrc/linear_cross_entropy.cpp).

def linear_cross_entropy(op: str, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                         target: Tensor, weight: Optional[Tensor], dtypes: Optional[Tuple[torch.dtype, ...]] = None,
                         acc: Optional[torch.dtype] = None) -> None:
    """input (N, H) (floating, or one of ``dtypes``); linear_weight (V, H) and linear_bias (V,) of its dtype; target
    int64 (N,); weight (V,) (of ``acc`` when given); all on input's device."""
    tensor(op, "input", input, ("N", "H"), dtypes)
    if dtypes is None and not input.dtype.is_floating_point:
        raise ArgumentDtypeError(f"{op}: input must be floating point, got {input.dtype}")
    (N, H), dev = input.shape, input.device
    tensor(op, "linear_weight", linear_weight, ("V", H), input.dtype, dev)
    V = linear_weight.shape[0]
    if V >= 2**31 - 1:
        raise ArgumentValueError(f"{op}: linear_weight has {V} rows; the kernels take fewer than 2^31 - 1 classes")
    tensor(op, "target", target, (N,), torch.int64, dev)
    if linear_bias is not None:
        tensor(op, "linear_bias", linear_bias, (V,), input.dtype, dev)
    if weight is not None:
        tensor(op, "weight", weight, (V,), acc, dev)
        if acc is None and not weight.dtype.is_floating_point:
            raise ArgumentDtypeError(f"{op}: weight must be floating point, got {weight.dtype}")


def linear_cross_entropy_kernel(op: str, input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                                target: Tensor, weight: Optional[Tensor], softcap: float,
                                rows: Sequence[Tuple[str, Optional[Tensor]]] = ()) -> None:
    """A Triton kernel's operands (fp32 class weight, softcap >= 0) and its per-row fp32 vectors ``rows`` (name,
    tensor; None: not read)."""
    linear_cross_entropy(op, input, linear_weight, linear_bias, target, weight, TRITON_DTYPES, F32)
    for name, t in (("linear_bias", linear_bias), ("weight", weight)):
        if t is not None:
            tensor(op, name, t, contiguous=True)  # read at stride 1 (as the C++ ops require too)
    if not softcap >= 0.0:
        raise ArgumentValueError(f"{op}: softcap must be >= 0, got {softcap}")
    for name, t in rows:
        if t is not None:
            tensor(op, name, t, (input.shape[0],), F32, input.device, contiguous=True)

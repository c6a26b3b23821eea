"""pykernels.functional.lstm_cell / lstm: torch's LSTM cell and stacked LSTM on fused kernels.

``lstm_cell`` has the semantics of ``torch._VF.lstm_cell`` / ``torch.nn.LSTMCell``: gate order i, f, g, o,
batched (B, I) or unbatched (I,) input, hx = (h, c). ``lstm`` is the functional ``torch.nn.LSTM`` (the module
calls it): per layer and direction it runs the fused sequence op when a backend's kernels cover the call, else the
reference (plain PyTorch) — the reason is recorded in ``pykernels.last_dispatch["lstm"]`` and logged (DEBUG).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _device_props, _ext, _native, backends
from ..errors import ArgumentDtypeError, ArgumentTypeError, ArgumentValueError
from ..ops import _checks, lstm as _ops
from . import _args, _autocast
from ..reference import lstm as _ref

__all__ = ["lstm_cell", "lstm"]

_CELL_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


# torch.autocast's treatment of the LSTM, so that the drop-ins return what torch's do: nn.LSTM runs in the autocast
# dtype on CUDA and, where it takes oneDNN's rnn layer (on the lower-precision list), on CPU (_autocast_lstm); so
# does the cell on CUDA (lstm_cell is on the list). torch's CPU cell only multiplies in the autocast dtype, and its
# cell update promotes those gates with the cell state (the zeros it makes for hx=None take the input's): the cell
# runs in that promoted dtype here (the state's own, except bf16 gates with an fp16 state or the other way round:
# float32).
def _cell_autocast_dtype(input: Tensor, hx) -> torch.dtype:
    if input.device.type != "cpu":
        return torch.get_autocast_dtype(input.device.type)
    c = hx[1] if isinstance(hx, (tuple, list)) and len(hx) == 2 else input  # a malformed hx: named by the checks
    if not (isinstance(c, Tensor) and c.dtype.is_floating_point):
        return input.dtype
    return torch.promote_types(torch.get_autocast_dtype("cpu"), c.dtype)


def _cast(input: Tensor, hx, weights: Sequence[Optional[Tensor]], dtype: torch.dtype):
    """Every floating argument (float64 excepted, as autocast) in ``dtype``; the casts are differentiable, so
    float32 weights get their gradient back."""
    def to(t):
        return t.to(dtype) if _autocast.eligible(t) else t
    hx = tuple(to(t) for t in hx) if isinstance(hx, (tuple, list)) else hx
    return to(input), hx, [to(w) for w in weights]


def lstm_cell(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *, backend: Optional[str] = None
              ) -> Tuple[Tensor, Tensor]:
    """One LSTM step, ``torch.nn.LSTMCell``'s math: returns (h', c'). ``hx`` = (h, c), each (B, H) or (H,) for
    unbatched (I,) input; None means zeros. Keyword-only ``backend``: see ``pykernels.backends``."""
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"lstm_cell: input must be a Tensor, got {type(input).__name__}")
    if _autocast.enabled(input):
        args = _cast(input, hx, (w_ih, w_hh, b_ih, b_hh), _cell_autocast_dtype(input, hx))
        with _autocast.off(input):
            return lstm_cell(args[0], args[1], *args[2], backend=backend)
    unbatched = input.dim() == 1
    if input.dim() not in (1, 2):
        raise ArgumentValueError(f"lstm_cell: input must be 1-D (I) or 2-D (B, I), got {input.dim()}-D")
    x = input.unsqueeze(0) if unbatched else input
    H = w_hh.shape[-1] if isinstance(w_hh, Tensor) else 0
    if hx is None:
        h = c = x.new_zeros(x.shape[0], H)
    else:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ArgumentTypeError("lstm_cell: hx must be a tuple (h, c) or None")
        h, c = hx
        if unbatched:
            for name, t in (("hx[0]", h), ("hx[1]", c)):
                if not isinstance(t, Tensor) or t.dim() != 1:
                    raise ArgumentValueError(f"lstm_cell: {name} must be 1-D for unbatched (1-D) input")
            h, c = h.unsqueeze(0), c.unsqueeze(0)
    # torch adds the biases by broadcasting: a (1, 4H) row is its (4H,) bias (a view: the gradient reaches the row;
    # any other shape reaches the checks as given, so that their message shows it)
    b_ih, b_hh = (b.reshape(-1) if isinstance(b, Tensor) and tuple(b.shape) == (1, 4 * H) else b
                  for b in (b_ih, b_hh))
    _checks.lstm_cell("lstm_cell", x, h, c, w_ih, w_hh, b_ih, b_hh)
    if (b_ih is None) != (b_hh is None):  # torch takes one bias alone; the kernels take the pair
        b_ih, b_hh = (b_ih, torch.zeros_like(b_ih)) if b_hh is None else (torch.zeros_like(b_hh), b_hh)
    if backends.prefer_native("lstm_cell", x.device, backend, size=x.shape[0], dtype=x.dtype):  # measured slower
        hy, cy = torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)

    def unsupported(b: str) -> Optional[str]:
        if b == "reference":
            return None
        if x.dtype not in _CELL_DTYPES[b]:
            return f"dtype {x.dtype} is not supported by the {b} kernels"
        if why := backends.interpreted_dot_reason(b, x.dtype, x.device):
            return why
        if b not in _ops.CELL:
            return _ops.triton_import_error if b == "triton" else _ops.cpp_error
        return None

    chosen = backends.choose("lstm_cell", x.device, backend, unsupported, tensors=(x, h, c, w_ih, w_hh, b_ih, b_hh),
                             empty=x.shape[0] == 0)
    if chosen == "reference":
        hy, cy = _ref.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        hy, cy, _ = _ops.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, chosen)
    if unbatched:
        return hy.squeeze(0), cy.squeeze(0)
    return hy, cy


# ---------------------------------------------------------------------------------------------------------
# The stacked LSTM.

_LAYER_DTYPES = {"triton": (torch.float16, torch.bfloat16, torch.float32),
                 "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 "cuda": (torch.float16, torch.bfloat16, torch.float32)}


@functools.lru_cache(maxsize=None)
def cuda_layer_resident(hidden: int, dtype: torch.dtype, sms: int, smem_max: int) -> bool:
    """Whether the persistent CUDA kernels keep W_hh of this hidden size on chip, forward and backward, on a GPU
    of `sms` multiprocessors and `smem_max` bytes of opt-in shared memory per block: the launcher's own plan
    (csrc/cuda/lstm_layer.cu plan_with), asked without a GPU. The launcher refuses the streamed variant."""
    op = torch.ops.pykernels.lstm_layer_resident
    return all(op(hidden, dtype, forward, sms, smem_max) for forward in (True, False))


@_device_props.constant_under_compile
def _cuda_layer_fits(index: Optional[int], hidden: int, dtype: torch.dtype) -> bool:
    # a host query of the launcher's plan: a constant of the graph under torch.compile (pykernels/_device_props.py)
    return cuda_layer_resident(hidden, dtype, _device_props.sm_count(index), _device_props.smem_optin(index))


def _cuda_layer_reason(x: Tensor, hidden: int) -> Optional[str]:
    if not hasattr(torch.ops.pykernels, "lstm_layer_resident"):
        return None
    if _cuda_layer_fits(x.device.index, hidden, x.dtype):
        return None
    return (f"hidden size {hidden} ({x.dtype}): W_hh does not fit in the cuda sequence kernel's shared memory on "
            f"this GPU, and its streamed variant is disabled (it crashed on its one GPU run)")


def _uncovered(proj_size: int, packed: bool) -> Optional[str]:
    """Why no backend's sequence kernel can run a call (None: the options do not stop them)."""
    if proj_size:
        return "proj_size > 0 is not covered by the sequence kernels"
    if packed:
        return "packed sequences are not covered by the sequence kernels"
    return None


def _layer_unsupported(b: str, x: Tensor, proj_size: int, packed: bool, hidden: int) -> Optional[str]:
    if b == "reference":
        return None
    if b not in _ops.LAYER:
        if b == "triton" and _ops.triton_import_error:
            return _ops.triton_import_error
        return f"no {b} sequence kernel yet (the {b} backend has only the cell)"
    if x.dtype not in _LAYER_DTYPES[b]:
        return f"dtype {x.dtype} is not supported by the {b} sequence kernel"
    if why := backends.interpreted_dot_reason(b, x.dtype, x.device):
        return why
    if why := _uncovered(proj_size, packed):
        return why
    if b == "cuda" and x.is_cuda:
        return _cuda_layer_reason(x, hidden)
    return None


def _autocast_lstm(input: Tensor, hx) -> Tuple[torch.dtype, bool]:
    """(the dtype torch's LSTM computes in under autocast, whether that call raises). On the CPU autocast casts
    only inside oneDNN's rnn layer (on the lower-precision list), which torch's LSTM takes for float32 input, and
    for 16-bit input where oneDNN has that dtype (fp16: outside grad mode only). That layer raises ("could not
    create a primitive descriptor for the LSTM forward propagation primitive") in a 16-bit dtype this CPU's oneDNN
    lacks (_native.ONEDNN_DTYPES), and in fp16 under grad mode even where oneDNN has fp16 (an Intel Xeon with
    AVX512-FP16, torch 2.14.1). Other input takes torch's step-by-step LSTM, whose gate GEMMs alone are cast: its cell
    update promotes those gates with the state (the lstm_cell rule above), so fp16 input under bf16 autocast
    returns float32."""
    amp = torch.get_autocast_dtype(input.device.type)
    if input.device.type != "cpu":
        return amp, False
    grad, half = torch.is_grad_enabled(), (torch.float16, torch.bfloat16)
    onednn = (torch._C._get_mkldnn_enabled() and input.numel() > 0
              and (input.dtype == torch.float32 or (input.dtype in _native.ONEDNN_DTYPES
                                                    and not (input.dtype == torch.float16 and grad))))
    if onednn:
        return amp, amp in half and (amp not in _native.ONEDNN_DTYPES or (amp == torch.float16 and grad))
    return _cell_autocast_dtype(input, hx), False


def _native_lstm(input, hx, params, num_layers, bidirectional, has_biases, proj_size, batch_first, dropout,
                 training, batch_sizes):
    """torch's own LSTM (cuDNN on CUDA) with this function's conventions (unbatched input, default state)."""
    D = 2 if bidirectional else 1
    H = params[1].shape[0] // 4  # w_hh is (4H, proj_size or H)
    unbatched = batch_sizes is None and input.dim() == 2
    x = input.unsqueeze(0 if batch_first else 1) if unbatched else input
    if hx is None:
        B = int(batch_sizes[0]) if batch_sizes is not None else x.shape[0 if batch_first else 1]
        hx = (x.new_zeros(num_layers * D, B, proj_size or H), x.new_zeros(num_layers * D, B, H))
    elif unbatched:
        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    if batch_sizes is not None:
        out, h_n, c_n = torch._VF.lstm(x, batch_sizes, hx, list(params), has_biases, num_layers, dropout, training,
                                       bidirectional)
    else:
        out, h_n, c_n = torch._VF.lstm(x, hx, list(params), has_biases, num_layers, dropout, training,
                                       bidirectional, batch_first)
    if unbatched:
        return out.squeeze(0 if batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)


def _fits(t: Tensor, shape: tuple, input: Tensor, amp: bool) -> bool:
    """Whether ``_check_like`` passes ``t``: callers format its name (per parameter, per call) only when not."""
    return t.shape == shape and t.device == input.device and (amp or t.dtype == input.dtype)


def _check_like(name: str, t: Tensor, shape: tuple, input: Tensor, amp: bool, kind: str) -> None:
    """``t`` (a parameter or state tensor, named ``name``) has ``shape`` and the input's device, and its dtype unless
    under autocast (which casts every operand to one dtype before any kernel runs)."""
    if tuple(t.shape) != shape:
        raise ArgumentValueError(f"lstm: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != input.device:
        raise ArgumentValueError(f"lstm: {name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype and not amp:
        raise ArgumentTypeError(f"lstm: {name} has dtype {t.dtype} but input has {input.dtype} (torch: input and "
                                f"{kind} tensors must have the same dtype)")


def _check_lstm_args(input, hx, params, num_layers, bidirectional, has_biases, proj_size, batch_first,
                     batch_sizes) -> bool:
    """torch.nn.LSTM's checks (its module makes them before the functional call; this API is called directly too),
    each naming the argument: once per call, not per step. Returns whether autocast is on for the input (they
    need it)."""
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"lstm: input must be a Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise ArgumentDtypeError(f"lstm: input must be floating point, got {input.dtype}")
    packed = batch_sizes is not None
    if input.dim() not in ((2,) if packed else (2, 3)):
        raise ArgumentValueError(f"lstm: input must be 2-D (T, I) or 3-D ({'B, T' if batch_first else 'T, B'}, I), or "
                                 f"the 2-D data of a packed sequence; got {input.dim()}-D")
    if not packed and input.shape[1 if batch_first and input.dim() == 3 else 0] == 0:
        raise RuntimeError("lstm: input has sequence length 0; torch.nn.LSTM expects it larger than 0")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ArgumentValueError(f"lstm: num_layers must be a positive int, got {num_layers!r}")
    if not _args.is_index(proj_size) or proj_size < 0:  # torch.nn.LSTM's messages (it takes a numpy int too)
        raise ArgumentValueError(f"lstm: proj_size should be a positive integer or zero to disable projections, got "
                                 f"{proj_size!r}")
    D = 2 if bidirectional else 1
    per = (4 if has_biases else 2) + (1 if proj_size else 0)
    params = list(params)
    if len(params) != num_layers * D * per or not all(isinstance(p, Tensor) for p in params):
        raise ArgumentValueError(f"lstm: params must hold {num_layers * D * per} tensors (num_layers={num_layers}, "
                                 f"bidirectional={bidirectional}, has_biases={has_biases}, proj_size={proj_size}), got "
                                 f"{len(params)}")
    w_hh = params[1]
    if w_hh.dim() != 2 or w_hh.shape[0] % 4:
        raise ArgumentValueError(f"lstm: params[1] (weight_hh_l0) must have shape (4*hidden_size, ...), got "
                                 f"{tuple(w_hh.shape)}")
    H = w_hh.shape[0] // 4
    if proj_size and proj_size >= H:  # (torch's C++ LSTM then failed on the weights' sizes; the reference ran it)
        raise ArgumentValueError(f"lstm: proj_size has to be smaller than hidden_size ({H}, from params[1]), got "
                                 f"{proj_size}")
    H_out = proj_size or H
    if params[0].dim() != 2 or params[0].shape[1] != input.shape[-1]:
        raise ArgumentValueError(f"lstm: input has {input.shape[-1]} features but params[0] (weight_ih_l0) has shape "
                                 f"{tuple(params[0].shape)}")
    # every layer's tensors, as torch's flat-weights checks: a kernel trusts H from weight_hh_l0 and would read a
    # smaller later weight out of bounds
    amp = _autocast.enabled(input)
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_biases else []) + (
        ["weight_hr"] if proj_size else [])
    # each layer's shapes, once: weight_ih's input is the input's features in layer 0, the directions' outputs after
    shapes = [(4 * H, H_out)] + ([(4 * H,), (4 * H,)] if has_biases else []) + ([(proj_size, H)] if proj_size else [])
    first, later = [(4 * H, input.shape[-1])] + shapes, [(4 * H, H_out * D)] + shapes
    for k, t in enumerate(params):
        layer, j = divmod(k // per, D), k % per
        shape = (later if layer[0] else first)[j]
        if not _fits(t, shape, input, amp):
            _check_like(f"params[{k}] ({names[j]}_l{layer[0]}{'_reverse' if layer[1] else ''})", t, shape, input, amp,
                        "parameter")
    if hx is None:
        return amp
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, Tensor) for t in hx):
        raise ArgumentTypeError("lstm: hx must be a tuple (h_0, c_0) of tensors or None")
    unbatched = not packed and input.dim() == 2
    B = int(batch_sizes[0]) if packed else (None if unbatched else input.shape[0 if batch_first else 1])
    for name, t, size in (("hx[0]", hx[0], H_out), ("hx[1]", hx[1], H)):
        shape = (num_layers * D, size) if unbatched else (num_layers * D, B, size)
        if not _fits(t, shape, input, amp):
            _check_like(name, t, shape, input, amp, "hidden")
    return amp


def lstm(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], params: Sequence[Tensor], num_layers: int = 1,
         bidirectional: bool = False, has_biases: bool = True, proj_size: int = 0, batch_first: bool = False,
         dropout: float = 0.0, training: bool = False, batch_sizes: Optional[Tensor] = None, *,
         backend: Optional[str] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Functional ``torch.nn.LSTM``. ``params`` in torch's ``_flat_weights`` order (per layer, per direction:
    w_ih, w_hh, [b_ih, b_hh], [w_hr]). ``input``: (T, B, I), (B, T, I) with batch_first, (T, I) unbatched, or
    the data of a PackedSequence with its ``batch_sizes`` (states then in sorted order). Returns
    (output, (h_n, c_n)) shaped as torch.nn.LSTM's."""
    amp = _check_lstm_args(input, hx, params, num_layers, bidirectional, has_biases, proj_size, batch_first,
                           batch_sizes)
    packed = batch_sizes is not None

    # the rules are sized by batch rows and by whether a gradient is recorded; a packed batch or projections, which
    # no sequence kernel covers, go to torch's LSTM for that reason (where it can run them), not by a rule.
    # rows == 0: an empty batch
    uncovered = _uncovered(proj_size, packed)
    rows = None if packed else (1 if input.dim() == 2 else input.shape[0 if batch_first else 1])
    batch = None if uncovered else rows

    def unsupported(b: str) -> Optional[str]:
        return _layer_unsupported(b, input, proj_size, packed, params[1].shape[-1])
    operands = (input, *(hx or ()), *params)  # (all tensors: checked)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in operands)
    cast = amp and _autocast.eligible(input)  # (float64 input stays float64 under autocast)
    run_dtype, torch_fails = _autocast_lstm(input, hx) if cast else (input.dtype, False)
    # Traced on the CPU (torch.compile, export), torch's LSTM decomposes over the time steps: one guard per sequence
    # length (a recompile each, then eager past the recompile limit) and minutes of inductor compile for a long
    # sequence; our op keeps T symbolic. So there, where our CPU kernel runs, only what it does not cover (and
    # what torch must run) goes to torch's.
    traced_cpu = (input.device.type == "cpu" and uncovered is None and torch.compiler.is_compiling()
                  and _ext.loaded())
    if not torch_fails and not traced_cpu and backends.prefer_native(
            "lstm", input.device, backend, size=batch, grad=grad, dtype=run_dtype, tensors=operands,
            uncovered=uncovered):
        # (torch applies autocast itself)
        return _native_lstm(input, hx, params, num_layers, bidirectional, has_biases, proj_size, batch_first,
                            dropout, training, batch_sizes)
    if amp:
        # (float64 input: the weights in the autocast dtype fail the dtype check, as torch's GEMM raises)
        x, hx, params = _cast(input, hx, params, run_dtype if cast else torch.get_autocast_dtype(input.device.type))
        with _autocast.off(input):
            return lstm(x, hx, params, num_layers, bidirectional, has_biases, proj_size, batch_first, dropout,
                        training, batch_sizes, backend=backend)
    chosen = backends.choose("lstm", input.device, backend, unsupported, tensors=operands, empty=rows == 0)
    if chosen == "reference":
        return _ref.lstm(input, hx, params, num_layers, bidirectional, has_biases, proj_size, batch_first,
                         dropout, training, batch_sizes)

    D = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    B = x.shape[1]
    H = params[1].shape[1]
    if hx is None:
        h0 = c0 = x.new_zeros(num_layers * D, B, H)
    else:
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    def direction(x, h, c, w, reverse):
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        return _ops.lstm_layer(x, h, c, w[0], w[1], b_ih, b_hh, reverse, chosen)[:3]

    x, h_n, c_n = _ref.stack_layers(x, h0, c0, params, num_layers, D, per, dropout, training, direction)
    if unbatched:
        return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if batch_first:
        x = x.transpose(0, 1)
    return x, (h_n, c_n)

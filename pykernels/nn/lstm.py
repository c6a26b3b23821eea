"""Drop-in ``torch.nn.LSTMCell`` and ``torch.nn.LSTM`` on pykernels' fused kernels.

Both subclass the torch modules and only replace ``forward``: constructor, parameter names, order and shapes,
``state_dict``, ``flatten_parameters``, pickling and ``isinstance`` checks are torch's own, so a torch state_dict
loads strictly in both directions and an optimizer built on one module's parameters works on the other.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..functional.lstm import lstm as _lstm
from ..functional.lstm import lstm_cell as _lstm_cell
from .. import backends
from ..errors import ArgumentValueError
from ._adopt import adopt


def _with_backend(extra_repr: str, backend: Optional[str]) -> str:
    """torch's extra_repr, then ``backend=`` when one is asked for (as the other modules' reprs)."""
    return extra_repr + (f", backend={backend!r}" if backend else "")


class LSTMCell(torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` whose step is one fused kernel (``pykernels.functional.lstm_cell``).

    Keyword-only extra: ``backend`` ("triton", "cuda", "cpu", "reference"; None: automatic).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backends.backend_name(backend)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ArgumentValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if isinstance(hx, (tuple, list)) and len(hx) == 2 and isinstance(hx[0], Tensor) and hx[0].dim() != input.dim():
            # (any other malformed hx is named by the functional's checks, as torch's TypeError)
            raise ArgumentValueError(f"LSTMCell: Expected hx[0] to be {input.dim()}D, got {hx[0].dim()}D instead")
        return _lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return _with_backend(super().extra_repr(), self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.LSTMCell, *, backend: Optional[str] = None) -> "LSTMCell":
        """The same cell as a pykernels one, sharing its Parameter objects (optimizers keep working)."""
        return adopt(cls, module, backend=backend)


class LSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` on the fused sequence kernels (``pykernels.functional.lstm``).

    Each layer direction runs as one input-projection GEMM plus one recurrent launch where a backend's sequence
    kernel covers the call (float64: only the cpu backend's). Automatic calls run torch's own LSTM where it measured
    faster (``backends.NATIVE_FASTER``) and where no kernel covers the call (proj_size > 0, PackedSequence input),
    which a preference runs on the reference implementation (plain PyTorch). Visibly:
    ``pykernels.last_dispatch["lstm"]`` names the backend that ran and why the others were skipped (or why torch's
    ran). Keyword-only extra: ``backend``.
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backends.backend_name(backend)

    def forward(self, input, hx=None):  # mirrors torch.nn.LSTM.forward, with pykernels' lstm
        self._update_flat_weights()
        orig_input = input
        batch_sizes = None
        D = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = (torch.zeros(self.num_layers * D, max_batch_size, real_hidden_size, dtype=input.dtype,
                                  device=input.device),
                      torch.zeros(self.num_layers * D, max_batch_size, self.hidden_size, dtype=input.dtype,
                                  device=input.device))
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ArgumentValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None
            if hx is None:
                hx = (torch.zeros(self.num_layers * D, max_batch_size, real_hidden_size, dtype=input.dtype,
                                  device=input.device),
                      torch.zeros(self.num_layers * D, max_batch_size, self.hidden_size, dtype=input.dtype,
                                  device=input.device))
                self.check_forward_args(input, hx, batch_sizes)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                                           f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                                           f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)

        output, hidden = _lstm(input, hx, self._flat_weights, self.num_layers, self.bidirectional, self.bias,
                               self.proj_size, self.batch_first if batch_sizes is None else False,
                               float(self.dropout), self.training, batch_sizes, backend=self.backend)
        if isinstance(orig_input, PackedSequence):
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def extra_repr(self) -> str:
        return _with_backend(super().extra_repr(), self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.LSTM, *, backend: Optional[str] = None) -> "LSTM":
        """The same LSTM as a pykernels one, sharing its Parameter objects (and cuDNN's flattened weight
        views): optimizers keep working."""
        return adopt(cls, module, backend=backend)

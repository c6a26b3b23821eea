"""LSTM cell suite: one step of torch.nn.LSTMCell, (B, I) input and (B, H) state, forward + backward (fixed random
gradients on both h' and c') and forward alone. Small shapes are launch-bound: the per-call overhead is what is
measured there. Reference and FLOP model (one step of bench/lstm.py's): ``8 * B * H * (I + H)`` forward,
3x forward + backward.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from . import lstm
from .harness import Case, Provider
from .providers import implemented, pykernels_providers, tolerance

NAME = "lstm_cell"
MODES = ("fwd+bwd", "fwd")
PRESETS = {  # (device type, quick) -> [(B, I, H)]
    ("cuda", False): [(8, 256, 256), (64, 256, 256), (256, 1024, 1024), (1024, 1024, 1024)],
    ("cuda", True): [(256, 1024, 1024)],
    ("cpu", False): [(1, 256, 256), (8, 256, 256), (64, 256, 256)],  # the targets: B <= 64
    ("cpu", True): [(32, 128, 128)],
}


class LSTMCellCase(Case):
    suite = NAME
    launch_bound = True  # one step is microseconds on a GPU: also timed from a CUDA graph

    def __init__(self, B: int, I: int, H: int, dtype: torch.dtype, device: torch.device):  # noqa: E741
        self.B, self.I, self.H, self.dtype, self.device = B, I, H, dtype, device
        self.name, self.shape = f"B={B} I={I} H={H}", {"B": B, "I": I, "H": H}
        self.tol = tolerance(dtype)

    def inputs(self):
        x = torch.randn(self.B, self.I, device=self.device).to(self.dtype)
        h, c, self.grad_h, self.grad_c = (torch.randn(self.B, self.H, device=self.device).to(self.dtype)
                                          for _ in range(4))
        return (x, h, c, *lstm.lstm_weights(self.I, self.H, self.dtype, self.device)), tuple(range(7))

    def reference(self, args):
        x, h, c, *weights = args
        ref = lstm.reference_lstm(x[None], h[None], c[None], *weights, self.grad_h[None], self.grad_c[None])
        # (h', c', dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh): the sequence's length-1 axis dropped
        return (ref[0][0], ref[2][0]) + tuple(g[0] for g in ref[3:6]) + ref[6:]

    def backward(self, out, retain_graph=False):
        torch.autograd.backward(out, (self.grad_h, self.grad_c), retain_graph=retain_graph)

    def errors(self, ref, out, grads, mode):
        return lstm.lstm_errors(out, ref, grads, mode)

    def flops(self, mode):
        return lstm.flops(1, self.B, self.I, self.H, mode)


SHAPE_KEYS = (("B", "I", "H"), ())  # --shape: (required, optional)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    shapes = [(shape["B"], shape["I"], shape["H"])] if shape else PRESETS[(device.type, quick)]
    return [LSTMCellCase(*s, dtype, device) for s in shapes]


def _kernels():
    from pykernels.ops import lstm as ops
    return implemented(ops.CELL, c_extension=True)


def _pykernels(backend: str):
    def fn(x, h, c, *weights):
        import pykernels
        return pykernels.functional.lstm_cell(x, (h, c), *weights, backend=backend)
    return fn


def torch_lstm_cell(x, h, c, *weights):
    return torch._VF.lstm_cell(x, (h, c), *weights)  # what torch.nn.LSTMCell calls


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    out = pykernels_providers(device, _pykernels, _kernels)
    out.append(Provider("torch", torch_lstm_cell, baseline=True))
    return out

"""LSTM suite: one whole-sequence, single-layer LSTM over (T, B, I) inputs with an initial state, forward + backward
(a fixed random gradient on the output sequence; gradients of the input, state and every weight) and forward
alone. torch's side is its own LSTM (``torch._VF.lstm``, what torch.nn.LSTM calls: cuDNN on CUDA). The single
step (torch.nn.LSTMCell) is its own suite, bench/lstm_cell.py, which shares the reference and FLOP model here.

FLOPs (2 per multiply-add; the gate GEMMs, elementwise work ignored): per step ``8 * B * H * (I + H)`` forward
(4H gates from x and from h), forward + backward 3x that (the gradients of the inputs and of the weights).
No byte model: the recurrence is latency-bound at small B, compute-bound at large H.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .harness import Case, Provider
from .providers import implemented, normalised_errors, pykernels_providers, tolerance

NAME = "lstm"
MODES = ("fwd+bwd", "fwd")
PRESETS = {  # (device type, quick) -> [(T, B, I, H)]
    ("cuda", False): [(128, 64, 256, 256), (256, 32, 512, 512), (64, 16, 1024, 1024)],
    ("cuda", True): [(256, 32, 512, 512)],
    ("cpu", False): [(64, 1, 256, 256), (64, 16, 128, 128), (64, 64, 256, 256)],
    ("cpu", True): [(16, 8, 64, 64)],
}

# --preset small-batch: where the C++ CPU sequence kernel and oneDNN cross over (backends.OURS_FASTER_DTYPE)
NAMED_PRESETS = {
    "small-batch": [{"T": 64, "B": b, "I": h, "H": h} for h in (128, 256, 512) for b in (1, 2, 4, 8)],
    # --preset large-hidden: whether those rules, measured up to H=512, hold where W_hh (4H x H) outgrows the caches
    "large-hidden": [{"T": 64, "B": b, "I": h, "H": h} for h in (768, 1024) for b in (1, 8, 64)],
}


def flops(T: int, B: int, I: int, H: int, mode: str) -> float:  # noqa: E741 - torch's name for the input size
    return float((3 if mode == "fwd+bwd" else 1) * T * 8 * B * H * (I + H))


def lstm_weights(I: int, H: int, dtype: torch.dtype, device: torch.device) -> List[torch.Tensor]:
    """w_ih, w_hh, b_ih, b_hh drawn as torch.nn.LSTM initialises them: U(-1/sqrt(H), 1/sqrt(H))."""
    bound = H ** -0.5
    return [((torch.rand(*s, device=device) * 2 - 1) * bound).to(dtype) for s in ((4 * H, I), (4 * H, H), (4 * H,),
                                                                                   (4 * H,))]


def reference_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, grad_out, grad_c=None):
    """torch.nn.LSTM's math (gate order i, f, g, o) in float32, step by step with autograd: returns
    (out (T, B, H), h_n (1, B, H), c_n (1, B, H), dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh), the gradients of
    <out, grad_out> (+ <c_n, grad_c>)."""
    leaves = [t.detach().float().requires_grad_() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    xf, h, c, wi, wh, bi, bh = leaves
    h, c = h[0], c[0]
    with torch.enable_grad():
        outs = []
        for xp in (xf @ wi.t() + bi + bh).unbind(0):
            i, f, g, o = (xp + h @ wh.t()).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        out = torch.stack(outs)
        roots, seeds = [out], [grad_out.float()]
        if grad_c is not None:
            roots.append(c[None])
            seeds.append(grad_c.float())
        grads = torch.autograd.grad(roots, leaves, seeds)
    return (out.detach(), h.detach()[None], c.detach()[None]) + tuple(grads)


def lstm_errors(outs: Sequence[torch.Tensor], ref: tuple, grads, mode: str):
    """Errors of the outputs against ref's first len(outs) entries and, with the backward, of the gradients
    against the rest."""
    pairs = list(zip(outs, ref))
    if mode == "fwd+bwd":
        pairs += list(zip(grads, ref[len(outs):]))
    return normalised_errors(pairs)


class LSTMCase(Case):
    suite = NAME

    def __init__(self, T: int, B: int, I: int, H: int, dtype: torch.dtype, device: torch.device):  # noqa: E741
        self.T, self.B, self.I, self.H, self.dtype, self.device = T, B, I, H, dtype, device
        self.name, self.shape = f"T={T} B={B} I={I} H={H}", {"T": T, "B": B, "I": I, "H": H}
        self.tol = tolerance(dtype)

    def inputs(self):
        x = torch.randn(self.T, self.B, self.I, device=self.device).to(self.dtype)
        h0, c0 = (torch.randn(1, self.B, self.H, device=self.device).to(self.dtype) for _ in range(2))
        self.grad_out = torch.randn(self.T, self.B, self.H, device=self.device).to(self.dtype)
        return (x, h0, c0, *lstm_weights(self.I, self.H, self.dtype, self.device)), tuple(range(7))

    def reference(self, args):
        return reference_lstm(*args, self.grad_out)

    def backward(self, out, retain_graph=False):
        out[0].backward(self.grad_out, retain_graph=retain_graph)

    def errors(self, ref, out, grads, mode):
        seq, (h_n, c_n) = out
        return lstm_errors((seq, h_n, c_n), ref, grads, mode)

    def flops(self, mode):
        return flops(self.T, self.B, self.I, self.H, mode)


SHAPE_KEYS = (("T", "B", "I", "H"), ())  # --shape: (required, optional)


def cases(device: torch.device, dtype: torch.dtype, quick: bool,
          shape: Optional[Dict[str, int]] = None) -> List[Case]:
    shapes = [(shape["T"], shape["B"], shape["I"], shape["H"])] if shape else PRESETS[(device.type, quick)]
    return [LSTMCase(*s, dtype, device) for s in shapes]


def _kernels():
    from pykernels.ops import lstm as ops
    return implemented(ops.LAYER)


def _pykernels(backend: str):
    def fn(x, h0, c0, *weights):
        import pykernels
        return pykernels.functional.lstm(x, (h0, c0), weights, backend=backend)
    return fn


def torch_lstm(x, h0, c0, *weights):
    """torch's LSTM (cuDNN on CUDA). The weights are separate tensors, not views of one flat buffer as in a
    flatten_parameters()'d nn.LSTM, so cuDNN copies them (4H * (I + H) elements) at each call: small next to T
    steps of (B, I + H) x (I + H, 4H) GEMMs. train=True when recording a gradient: cuDNN's backward refuses
    an inference-mode forward (dropout is 0 either way); fwd mode runs its inference kernel, as nn.LSTM.eval()."""
    train = torch.is_grad_enabled()
    out, h_n, c_n = torch._VF.lstm(x, (h0, c0), list(weights), True, 1, 0.0, train, False, False)
    return out, (h_n, c_n)


def providers(device: torch.device, dtype: torch.dtype) -> List[Provider]:
    out = pykernels_providers(device, _pykernels, _kernels)
    out.append(Provider("torch", torch_lstm, baseline=True))
    return out

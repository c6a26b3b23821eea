"""LSTM in plain PyTorch: the oracle of the LSTM kernels (issue: fused LSTM) and their last fallback.

Semantics are torch.nn.LSTMCell's and torch.nn.LSTM's: gate order i, f, g, o; gates = x W_ih^T + b_ih +
h W_hh^T + b_hh; c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(c'), projected by W_hr^T when
proj_size > 0; stacked layers (dropout on the outputs of every layer but the last, training only), both
directions (outputs concatenated), batch_first, unbatched input, and packed sequences (the active batch
shrinks with time; the reverse direction starts each sequence at its own last step).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    gates = input @ w_ih.t() + hx @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def layer_direction(x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Tensor, w: Sequence[Tensor],
                     has_biases: bool, proj: bool, reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """x: (T, B, I) padded, or the packed data (sum(batch_sizes), I). Returns (out, h_n, c_n)."""
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
    w_hr = w[-1] if proj else None

    def step(xt, h, c):
        h2, c2 = lstm_cell(xt, h, c, w_ih, w_hh, b_ih, b_hh)
        return (h2 @ w_hr.t() if proj else h2), c2

    if batch_sizes is None:
        T = x.shape[0]
        h, c = h0, c0
        outs: List[Optional[Tensor]] = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            h, c = step(x[t], h, c)
            outs[t] = h
        return torch.stack(outs), h, c
    # Packed: at time t the first batch_sizes[t] sequences are active (sorted by decreasing length).
    sizes = batch_sizes.tolist()
    offsets = [0]
    for b in sizes:
        offsets.append(offsets[-1] + b)
    outs = [None] * len(sizes)
    h_final, c_final = h0.clone(), c0.clone()
    if not reverse:
        h, c = h0, c0
        for t, b in enumerate(sizes):
            if b < h.shape[0]:  # sequences that ended keep their last state
                h_final[b:h.shape[0]], c_final[b:h.shape[0]] = h[b:], c[b:]
                h, c = h[:b], c[:b]
            h, c = step(x[offsets[t]:offsets[t + 1]], h, c)
            outs[t] = h
        h_final[:h.shape[0]], c_final[:c.shape[0]] = h, c
    else:
        h, c = h0[:0], c0[:0]
        for t in range(len(sizes) - 1, -1, -1):
            b = sizes[t]
            if b > h.shape[0]:  # sequences whose last step is t join with their initial state
                h = torch.cat([h, h0[h.shape[0]:b]])
                c = torch.cat([c, c0[c.shape[0]:b]])
            h, c = step(x[offsets[t]:offsets[t + 1]], h, c)
            outs[t] = h
        h_final, c_final = h, c
    return torch.cat(outs), h_final, c_final


def stack_layers(x: Tensor, h0: Tensor, c0: Tensor, params: Sequence[Tensor], num_layers: int, D: int, per: int,
                 dropout: float, training: bool, direction: Callable[..., Tuple[Tensor, Tensor, Tensor]]
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """The stacking of nn.LSTM, shared by every backend: per layer, each direction ``direction(x, h0[k], c0[k],
    weights_k, reverse) -> (out, h_n, c_n)`` on the previous layer's output (directions concatenated), dropout on
    every layer's output but the last (training only, in this order so that a seed reproduces torch's masks).
    Returns (output of the last layer, h_n, c_n) with h_n/c_n stacked over layer * D + direction."""
    hs, cs = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            o, h, c = direction(x, h0[k], c0[k], params[k * per:(k + 1) * per], d == 1)
            outs.append(o)
            hs.append(h)
            cs.append(c)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if dropout and training and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    return x, torch.stack(hs), torch.stack(cs)


def lstm(input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], params: Sequence[Tensor], num_layers: int,
         bidirectional: bool, has_biases: bool = True, proj_size: int = 0, batch_first: bool = False,
         dropout: float = 0.0, training: bool = False, batch_sizes: Optional[Tensor] = None
         ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Functional nn.LSTM. ``params`` in torch's ``_flat_weights`` order (per layer, per direction: w_ih, w_hh,
    [b_ih, b_hh], [w_hr]). ``input``: (T, B, I), (B, T, I) with batch_first, (T, I) unbatched, or packed data
    with ``batch_sizes``. Returns (output, (h_n, c_n)) shaped as torch.nn.LSTM's."""
    D = 2 if bidirectional else 1
    per = 2 + (2 if has_biases else 0) + (1 if proj_size else 0)
    unbatched = batch_sizes is None and input.dim() == 2
    x = input
    if unbatched:
        x = x.unsqueeze(1)
    elif batch_first and batch_sizes is None:
        x = x.transpose(0, 1)
    B = int(batch_sizes[0]) if batch_sizes is not None else x.shape[1]
    H = params[1].shape[1] if not proj_size else params[1].shape[0] // 4
    out_size = proj_size or H
    if hx is None:
        h0 = x.new_zeros(num_layers * D, B, out_size)
        c0 = x.new_zeros(num_layers * D, B, H)
    else:
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    x, h_n, c_n = stack_layers(
        x, h0, c0, params, num_layers, D, per, dropout, training,
        lambda x, h, c, w, reverse: layer_direction(x, batch_sizes, h, c, w, has_biases, bool(proj_size), reverse))
    if unbatched:
        return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if batch_first and batch_sizes is None:
        x = x.transpose(0, 1)
    return x, (h_n, c_n)

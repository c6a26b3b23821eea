"""The LSTM oracle (pykernels/reference/lstm.py) against torch.nn.LSTMCell / torch.nn.LSTM in float64: forward,
final states, and the gradients of the input, the initial states and every parameter."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pykernels.reference import lstm as ref


def _grads_match(outs_a, outs_b, leaves_a, leaves_b):
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    gs = [torch.randn_like(a) for a in outs_a]
    ga = torch.autograd.grad(outs_a, leaves_a, gs, allow_unused=True)
    gb = torch.autograd.grad(outs_b, leaves_b, gs, allow_unused=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_cell(bias):
    cell = torch.nn.LSTMCell(5, 7, bias=bias, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    ours = ref.lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    theirs = cell(x, (h, c))
    leaves = [x, h, c] + list(cell.parameters())
    _grads_match(ours, theirs, leaves, leaves)


OPTIONS = list(itertools.product([1, 2], [False, True], [0, 3], [False, True], [True, False]))


@pytest.mark.parametrize("num_layers,bidirectional,proj_size,batch_first,bias", OPTIONS)
def test_layer_all_options(num_layers, bidirectional, proj_size, batch_first, bias):
    m = torch.nn.LSTM(4, 6, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
                      batch_first=batch_first, bias=bias, dtype=torch.float64)
    T, B = 5, 3
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64, requires_grad=True)
    D = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * D, B, proj_size or 6, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(num_layers * D, B, 6, dtype=torch.float64, requires_grad=True)
    out, (h, c) = ref.lstm(x, (h0, c0), m._flat_weights, num_layers, bidirectional, bias, proj_size, batch_first)
    tout, (th, tc) = m(x, (h0, c0))
    leaves = [x, h0, c0] + list(m.parameters())
    _grads_match([out, h, c], [tout, th, tc], leaves, leaves)


def test_unbatched_and_default_state():
    m = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out, (h, c) = ref.lstm(x, None, m._flat_weights, 2, True)
    tout, (th, tc) = m(x)
    _grads_match([out, h, c], [tout, th, tc], [x] + list(m.parameters()), [x] + list(m.parameters()))


@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 0), (True, 2)])
def test_packed_sequences_of_mixed_lengths(bidirectional, proj_size):
    m = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=bidirectional, proj_size=proj_size, dtype=torch.float64)
    lengths = torch.tensor([6, 6, 4, 2, 1])  # sorted, as the packed kernels will see them
    x = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths)
    D = 2 if bidirectional else 1
    h0 = torch.randn(2 * D, 5, proj_size or 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * D, 5, 5, dtype=torch.float64, requires_grad=True)
    data, (h, c) = ref.lstm(packed.data, (h0, c0), m._flat_weights, 2, bidirectional, True, proj_size,
                            batch_sizes=packed.batch_sizes)
    tpacked, (th, tc) = m(pack_padded_sequence(x, lengths), (h0, c0))  # its own graph: grads are taken twice
    leaves = [x, h0, c0] + list(m.parameters())
    _grads_match([data, h, c], [tpacked.data, th, tc], leaves, leaves)
    padded, _ = pad_packed_sequence(tpacked)
    assert padded.shape[0] == 6

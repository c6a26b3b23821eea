"""Per-step shapes under torch.compile: training varies the sequence length, the token count and varlen's
max_seqlen from step to step, and each value something specialises on costs a recompile, until Dynamo's
recompile_limit (8) silently sends the function back to eager. Ours must compile a bounded number of graphs
(Dynamo's automatic dynamic: the first shape, then one symbolic graph). CPU tier."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

import pykernels
from conftest import require_backend

SIZES = (5, 7, 9, 13, 17, 24, 33, 40, 64, 100)


def _graphs(fn, make, backward=True):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="eager")
    for n in SIZES:
        out = compiled(*make(n))
        if backward:
            out.sum().backward()
    return counters["stats"]["unique_graphs"]


def test_varlen_max_seqlen_stays_symbolic():
    """_args.is_index read a dynamic int (an int to Dynamo, not a SymInt) through operator.index, a guard on its
    value: 8 graphs for 12 values, then eager."""
    def make(n):
        lens = [n, max(1, n // 2), max(1, n // 3)]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = (torch.randn(sum(lens), 2, 16, requires_grad=True) for _ in range(3))
        return q, k, v, cu, max(lens)

    def f(q, k, v, cu, mx):
        return pykernels.functional.varlen_attention(q, k, v, cu, cu, mx, mx, is_causal=True)

    assert _graphs(f, make) <= 2


def test_lstm_sequence_length_stays_symbolic(monkeypatch):
    """Where the size rules pick torch's LSTM (fp32 from batch 3 with a gradient on an AVX-512 CPU, set here so
    that AVX2 CPUs test it too), a traced call ran torch's LSTM, which decomposes over the time steps: a guard (and a
    recompile) per sequence length, then eager; inductor took minutes per compile. Traced CPU calls run our op,
    which keeps T symbolic."""
    require_backend("cpu", "cpu")  # (the fix routes traced calls to the C++ kernel)
    from pykernels import _native
    monkeypatch.setattr(_native, "CPU_CAPABILITY", "AVX512")
    torch.manual_seed(0)
    m = pykernels.nn.LSTM(16, 32, num_layers=2, batch_first=True)
    n = _graphs(lambda x: m(x)[0], lambda T: (torch.randn(4, T, 16, requires_grad=True),))
    assert n <= 2
    x = torch.randn(4, 11, 16)
    torch.testing.assert_close(torch.compile(lambda x: m(x)[0], backend="eager")(x), m(x)[0])
    torch._dynamo.reset()

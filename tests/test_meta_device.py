"""Meta tensors (no data: deferred initialisation, shape inference, memory planning) through every functional and
module: the shapes and dtypes torch's own functions give, on the reference (a kernel needs data), recorded in
last_dispatch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pykernels

META = torch.device("meta")


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


def _same(ours, theirs):
    ours, theirs = (ours, theirs) if isinstance(ours, (tuple, list)) else ((ours,), (theirs,))
    for a, b in zip(ours, theirs):
        assert a.device == META and a.shape == b.shape and a.dtype == b.dtype, (a, b)


def test_functionals_and_modules_on_meta_tensors():
    P = pykernels.functional
    x, t = _meta(6, 9, dtype=torch.bfloat16).requires_grad_(), torch.empty(6, dtype=torch.int64, device=META)
    _same(P.cross_entropy(x, t), F.cross_entropy(x, t))
    loss = P.cross_entropy(x, t, reduction="none")
    _same(loss, F.cross_entropy(x, t, reduction="none"))
    assert pykernels.last_dispatch["cross_entropy"][0] == "reference"
    h, W = _meta(6, 4), _meta(9, 4)
    _same(P.linear_cross_entropy(h, W, t), F.cross_entropy(F.linear(h, W), t))
    q, k = _meta(2, 4, 7, 16, dtype=torch.float16), _meta(2, 2, 5, 16, dtype=torch.float16)
    _same(P.scaled_dot_product_attention(q, k, k, enable_gqa=True, window=(2, 2)),
          F.scaled_dot_product_attention(q, k, k, enable_gqa=True))
    assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == "reference"
    cu = torch.empty(3, dtype=torch.int32, device=META)
    out, lse = P.varlen_attention(_meta(7, 4, 16), _meta(5, 2, 16), _meta(5, 2, 8), cu, cu, 4, 4, return_lse=True)
    assert out.shape == (7, 4, 8) and lse.shape == (4, 7) and out.device == lse.device == META
    for ours, theirs, args in (
            (pykernels.nn.LSTM(3, 4, num_layers=2, bidirectional=True, device=META),
             torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, device=META), (_meta(5, 2, 3),)),
            (pykernels.nn.LSTMCell(3, 4, device=META), torch.nn.LSTMCell(3, 4, device=META), (_meta(2, 3),)),
            (pykernels.nn.MultiheadAttention(8, 2, device=META), torch.nn.MultiheadAttention(8, 2, device=META),
             (_meta(5, 2, 8),) * 3),
            (pykernels.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), (x, t))):
        a, b = ours(*args), theirs(*args)
        flat = lambda o: [t for t in (o if isinstance(o, (tuple, list)) else (o,)) for t in  # noqa: E731
                          (t if isinstance(t, (tuple, list)) else (t,)) if t is not None]
        _same(flat(a), flat(b))

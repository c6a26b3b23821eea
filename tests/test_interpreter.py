"""What Triton's interpreter cannot compute runs elsewhere, visibly: it multiplies bfloat16 tl.dot operands' raw bit
patterns (triton-lang/triton#11584; TOOLCHAIN.md), so the kernels with a tl.dot refuse bf16 CPU tensors there."""
from __future__ import annotations

import pytest
import torch

import pykernels
from pykernels import backends
from pykernels.functional import linear_cross_entropy, lstm, lstm_cell, scaled_dot_product_attention

BF16 = torch.bfloat16


def test_the_rule():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    interp = backends.triton_interpreted()
    assert (backends.interpreted_dot_reason("triton", BF16, cpu) is not None) == interp
    assert backends.interpreted_dot_reason("triton", torch.float16, cpu) is None
    assert backends.interpreted_dot_reason("cpu", BF16, cpu) is None
    assert backends.interpreted_dot_reason("triton", BF16, meta) is None


@pytest.mark.skipif(not backends.triton_interpreted() or pykernels.available_backends("cpu")["triton"] is not None,
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_bf16_dot_kernels_refuse_under_the_interpreter():
    x, h = torch.randn(3, 8, dtype=BF16), torch.randn(3, 4, dtype=BF16)
    w_ih, w_hh = torch.randn(16, 8, dtype=BF16), torch.randn(16, 4, dtype=BF16)
    q = torch.randn(1, 2, 3, 16, dtype=BF16)
    W, t = torch.randn(10, 8, dtype=BF16), torch.randint(0, 10, (3,))
    m = torch.nn.LSTM(8, 4).to(BF16)
    calls = {
        "lstm_cell": lambda **kw: lstm_cell(x, (h, h), w_ih, w_hh, **kw),
        "lstm": lambda **kw: lstm(torch.randn(5, 2, 8, dtype=BF16), None, list(m._flat_weights), **kw),
        "scaled_dot_product_attention": lambda **kw: scaled_dot_product_attention(q, q, q, **kw),
        "linear_cross_entropy": lambda **kw: linear_cross_entropy(x, W, t, **kw),
    }
    for op, call in calls.items():
        with pykernels.use_backend("triton"):
            call()
        ran, skipped = pykernels.last_dispatch[op]
        assert ran != "triton" and "tl.dot" in skipped["triton"], op
        with pytest.raises(pykernels.BackendUnavailableError, match="tl.dot"):
            call(backend="triton")
    # the fused linear cross-entropy path has no tl.dot (its GEMMs are torch's): it runs
    linear_cross_entropy(x.clone().requires_grad_(), W, t, fused=True, backend="triton").backward()


try:
    import triton
    import triton.language as tl
    from pykernels.triton._math import tanh as _kernel_tanh

    @triton.jit
    def _tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        tl.store(Y + offs, _kernel_tanh(tl.load(X + offs, mask=m)), mask=m)
except ImportError:  # the test below is skipped without Triton
    pass


@pytest.mark.skipif(not backends.triton_interpreted() or pykernels.available_backends("cpu")["triton"] is not None,
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_triton_tanh_keeps_fp32_relative_accuracy_at_every_magnitude():
    """The kernels' tanh (LSTM gates and cell, attention and linear cross-entropy softcap): the exp form
    1 - 2 / (e^{2x} + 1) has an absolute error of ulp(1), a relative error of 1e-2 at |x| = 1e-5."""
    mag = torch.logspace(-30, 2, 300, dtype=torch.float64)
    x64 = torch.cat([mag, -mag, torch.tensor([0.0, 0.5499, 0.55, 0.5501, float("inf"), -float("inf")],
                                            dtype=torch.float64)])
    x = x64.float()
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    ref = torch.tanh(x.double())
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-300)).nan_to_num(0.0)
    torch_rel = ((torch.tanh(x).double() - ref).abs() / ref.abs().clamp_min(1e-300)).nan_to_num(0.0)
    assert rel.max() <= max(2 * torch_rel.max().item(), 2 ** -22), (rel.max(), x[rel.argmax()])
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))

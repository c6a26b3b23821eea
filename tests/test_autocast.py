"""Under torch.autocast the loss drop-ins return what torch returns (CPU autocast, every CPU backend):
cross_entropy is on autocast's float32 list (half-precision logits in, float32 loss out, the gradient in the
logits' dtype); torch's linear_cross_entropy is linear (autocast dtype) then cross_entropy (float32 loss)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pykernels

from conftest import require_backend

CE_BACKENDS = ["cpu", "reference", "triton"]  # triton runs on CPU tensors under TRITON_INTERPRET=1


def _skip_unavailable(backend):
    require_backend(backend, "cpu")  # (the cpu and interpreted triton backends fail instead where CI needs them)


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_cross_entropy_under_autocast(backend, reduction, amp):
    _skip_unavailable(backend)
    if backend == "triton" and amp == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 arithmetic is not exact on CPU")
    torch.manual_seed(0)
    h = torch.randn(37, 16)
    w = torch.randn(53, 16, requires_grad=True)
    t = torch.randint(0, 53, (37,))
    t[::7] = -100
    outs = {}
    for name, fn in (("torch", F.cross_entropy),
                     ("ours", lambda x, y, **k: pykernels.functional.cross_entropy(x, y, backend=backend, **k))):
        w.grad = None
        with torch.autocast("cpu", dtype=amp):
            logits = F.linear(h, w)  # half-precision logits, as in a real autocast model
            logits.retain_grad()
            loss = fn(logits, t, reduction=reduction)
        assert logits.dtype == amp and loss.dtype == torch.float32, (name, loss.dtype)
        loss.sum().backward()
        assert logits.grad.dtype == amp
        outs[name] = loss.detach(), logits.grad, w.grad
    # the loss: float32 from the same half logits (ours differ by rounding only, <= 1.2e-7 relative); the gradients
    # within one ulp of the autocast dtype at their largest magnitude (Triton's float16: 0.6 of it). The former
    # rtol 2e-2 passed a loss 1.8% off.
    loss, theirs = outs["ours"][0], outs["torch"][0]
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(outs["ours"][1:], outs["torch"][1:]):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0,
                                   atol=torch.finfo(amp).eps * theirs.float().abs().max().item())
    with torch.autocast("cpu", dtype=amp):  # float64 is not autocast's: it stays float64
        x = torch.randn(5, 7, dtype=torch.float64)
        assert pykernels.functional.cross_entropy(x, t[:5].clamp(0) % 7, backend="reference").dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_linear_cross_entropy_under_autocast(backend):
    _skip_unavailable(backend)
    amp = torch.float16 if backend == "triton" else torch.bfloat16  # the interpreter's bf16 dot is not exact
    torch.manual_seed(0)
    h = torch.randn(29, 32, requires_grad=True)  # float32 activations and weights: autocast casts them
    w = torch.randn(300, 32, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    t = torch.randint(0, 300, (29,))
    outs = {}
    for name, fn in (("torch", lambda: F.cross_entropy(F.linear(h, w, b), t)),
                     ("ours", lambda: pykernels.functional.linear_cross_entropy(h, w, t, linear_bias=b,
                                                                                backend=backend))):
        h.grad = w.grad = b.grad = None
        with torch.autocast("cpu", dtype=amp):
            loss = fn()
        assert loss.dtype == torch.float32, name
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32  # through autocast's cast
        outs[name] = loss.detach(), h.grad, w.grad, b.grad
    for ours, theirs in zip(outs["ours"], outs["torch"]):
        # torch rounds the logits to the autocast dtype, the kernels keep them in float32: the rounding's size
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-3)
    with torch.autocast("cpu", dtype=amp):  # mixed dtypes are what autocast produces: no dtype error
        loss = pykernels.functional.linear_cross_entropy(h.to(amp), w, t, backend=backend)
    assert loss.dtype == torch.float32


def test_module_and_no_autocast_unchanged():
    x, t = torch.randn(6, 10, dtype=torch.bfloat16), torch.randint(0, 10, (6,))
    assert pykernels.nn.CrossEntropyLoss()(x, t).dtype == torch.bfloat16  # outside autocast: the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pykernels.nn.CrossEntropyLoss()(x, t).dtype == torch.float32
        with torch.autocast("cpu", enabled=False):
            assert pykernels.nn.CrossEntropyLoss()(x, t).dtype == torch.bfloat16


def _torch_lstm_under_autocast(theirs, inp, dtype):
    """torch's LSTM under CPU autocast; where this CPU's oneDNN lacks ``dtype`` that call raises (torch's autocast
    path asks oneDNN for the 16-bit RNN regardless), and the same math runs outside autocast on a cast copy."""
    if dtype in pykernels._native.ONEDNN_DTYPES:
        with torch.autocast("cpu", dtype=dtype):
            return theirs(inp)
    return copy.deepcopy(theirs).to(dtype)(inp.to(dtype))


def _two_layer_lstms(backend):
    """torch's two-layer LSTM (seeded) and ours with its weights, on ``backend`` (None: automatic)."""
    if backend is not None:
        _skip_unavailable(backend)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(8, 16, num_layers=2)
    ours = pykernels.nn.LSTM(8, 16, num_layers=2, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("grad", [False, True])
def test_lstm_under_autocast_avoids_a_failing_torch_lstm(monkeypatch, grad):
    """Where this CPU's oneDNN lacks the autocast dtype (simulated here on any CPU), torch's LSTM under autocast
    raises: automatic calls then run ours, whatever the speed rules say for that dtype and size."""
    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset())
    torch.manual_seed(0)
    ours = pykernels.nn.LSTM(8, 16)
    x = torch.randn(5, 3, 8, requires_grad=grad)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype):
            out, _ = ours(x)
        assert out.dtype == dtype
        assert pykernels.last_dispatch["lstm"][0] != "torch", pykernels.last_dispatch["lstm"]


def test_lstm_under_fp16_autocast_with_grad_mode_avoids_torch_even_where_onednn_has_fp16(monkeypatch):
    """torch's CPU LSTM under fp16 autocast raises whenever grad mode is on, also where oneDNN has fp16 (an Intel
    Xeon with AVX512-FP16; simulated here on any CPU), where the fp16 speed rule hands large batches to torch:
    such calls never reach torch's autocast LSTM (they run on fp16 copies, as autocast would, by the fp16 rules),
    with or without a gradient to record."""
    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset({torch.bfloat16, torch.float16}))
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    from pykernels import backends
    big = backends.ours_faster_dtype("lstm", "cpu", torch.float16)[0] + 1  # torch's by the speed rule
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(8, 16)
    ours = pykernels.nn.LSTM(8, 16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, big, 8)
    for requires_grad in (True, False):
        ours.requires_grad_(requires_grad)
        with torch.autocast("cpu", dtype=torch.float16):
            out, _ = ours(x)  # raised "could not create a primitive descriptor" in torch's autocast LSTM
        assert out.dtype == torch.float16
        want, _ = copy.deepcopy(theirs).half()(x.half())
        torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=0)
        if requires_grad:
            out.float().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
def test_lstm_and_cell_under_autocast(backend):
    """nn.LSTM runs in the autocast dtype (torch's CPU rnn layer is on the lower-precision list), also when its
    input already is lower precision (an autocast linear before it: mixed dtypes used to raise); the CPU cell
    keeps float32 inputs float32 and follows lower-precision ones, as torch's. Gradients reach float32 weights.
    backend None: automatic dispatch, which must not hand the call to a torch LSTM that raises on this CPU."""
    theirs, ours = _two_layer_lstms(backend)
    x = torch.randn(5, 3, 8)
    for inp in (x, x.bfloat16()):
        ref, (rh, rc) = _torch_lstm_under_autocast(theirs, inp, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = ours(inp)
        assert out.dtype == ref.dtype == torch.bfloat16 and h.dtype == rh.dtype and c.dtype == rc.dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
        out.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
        ours.zero_grad()
    cell = torch.nn.LSTMCell(8, 16)
    xc, hc = torch.randn(3, 8), (torch.randn(3, 16), torch.randn(3, 16))
    for inp in (xc, xc.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rh, _ = cell(inp, hc)
            h, _ = pykernels.functional.lstm_cell(inp, hc, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                  cell.bias_hh, backend=backend)
        assert h.dtype == rh.dtype, (inp.dtype, h.dtype, rh.dtype)
        torch.testing.assert_close(h.float(), rh.float(), atol=2e-2, rtol=0)
    # the other half dtype in the state (or in the input, hx=None): torch's cell update promotes to float32
    for amp, inp, state in ((torch.bfloat16, xc, tuple(t.half() for t in hc)), (torch.bfloat16, xc.half(), None),
                            (torch.float16, xc.bfloat16(), None), (torch.float16, xc, hc)):
        with torch.autocast("cpu", dtype=amp):
            rh, rc = cell(inp, state)
            h, c = pykernels.functional.lstm_cell(inp, state, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                  cell.bias_hh, backend=backend)
        assert (h.dtype, c.dtype) == (rh.dtype, rc.dtype), (amp, inp.dtype, h.dtype, rh.dtype)
        torch.testing.assert_close(h.float(), rh.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
@pytest.mark.parametrize("amp,inp,state", [(torch.bfloat16, torch.float16, None),
                                           (torch.bfloat16, torch.float16, torch.bfloat16),
                                           (torch.bfloat16, torch.float16, torch.float32),
                                           (torch.float16, torch.bfloat16, None)],
                         ids=["bf16-fp16-none", "bf16-fp16-bf16", "bf16-fp16-fp32", "fp16-bf16-none"])
def test_lstm_with_the_other_half_dtype_under_autocast(backend, amp, inp, state):
    """The 16-bit input oneDNN does not take (fp16 under grad mode; bf16 without AVX512-BF16) runs torch's step-by-step
    LSTM under autocast: only its gate GEMMs are cast, and the cell update promotes them with the state, so fp16
    input under bf16 autocast returns float32, as torch's (ours returned bf16). Where torch's call raises (its
    oneDNN path in a dtype this CPU lacks), ours runs in the autocast dtype."""
    theirs, ours = _two_layer_lstms(backend)
    x = torch.randn(5, 3, 8).to(inp)
    hx = None if state is None else tuple(torch.randn(2, 3, 16).to(state) for _ in range(2))
    with torch.autocast("cpu", dtype=amp):
        try:
            ref, (rh, rc) = theirs(x, hx)
        except RuntimeError:  # torch's oneDNN LSTM lacks the dtype here
            ref = None
        out, (h, c) = ours(x, hx)
    if ref is None:
        assert out.dtype == h.dtype == c.dtype == amp
        return
    assert (out.dtype, h.dtype, c.dtype) == (ref.dtype, rh.dtype, rc.dtype), (out.dtype, ref.dtype)
    for a, b in ((out, ref), (h, rh), (c, rc)):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=0)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("backend", [None, "reference"])
def test_attention_under_autocast(backend):
    """SDPA is on autocast's lower-precision list: float32 (or mixed) q/k/v and a float mask run in the autocast
    dtype and return it, on the automatic (torch's) path and on ours; float32 leaves get float32 gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    m = torch.randn(7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out = pykernels.functional.scaled_dot_product_attention(q, k.bfloat16(), v, attn_mask=m, backend=backend)
        tq, tk, tv = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v))
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        vo = pykernels.functional.varlen_attention(tq, tk, tv, cu, cu, 4, 4, backend=backend or "reference")
    assert out.dtype == ref.dtype == torch.bfloat16 and vo.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.float32

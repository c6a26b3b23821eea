"""Autograd beyond one reverse pass, through every op.

Gradients of gradients (create_graph=True: Hessian-vector products, gradient penalties, curvature estimates): the
kernels' backward is not differentiable; the ops then differentiate their reference forward
(pykernels/ops/_higher_order.py). Checked with torch.autograd.gradgradcheck on the float64 C++ kernels, against
torch's own second derivatives elsewhere, through the op as the eager path and the custom-op path call it; the ops
that cannot recompute their forward must raise, never return a gradient without a graph (which a penalty term would
silently drop).

Forward-mode AD (dual tensors, torch.func.jvp / jacfwd): the kernels have no forward derivative, so such calls run
on the reference, visibly (last_dispatch), and an explicit kernel backend raises: a kernel would drop the tangent.
Automatic calls that the measured rules give torch's own kernel keep it only where it has a forward derivative.
functorch's reverse mode (torch.func.grad / vjp / jacrev) runs on the reference the same way: torch's custom-op
autograd refuses it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels.testing import assert_error_rule

from conftest import require_backend

F64 = torch.float64
KERNEL_BACKENDS = [pytest.param("cpu", "cpu", F64, id="cpu-float64"),
               pytest.param("triton", "cpu", torch.float32, id="triton-interp"),
               pytest.param("cuda", "cuda", torch.float32, id="cuda", marks=pytest.mark.gpu),
               pytest.param("triton", "cuda", torch.float32, id="triton-cuda", marks=pytest.mark.gpu)]


def _math_attention(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(E) + mask) v in plain ops: torch's fused SDPA backends have no second derivative."""
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s + mask
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _second_order(f, leaves):
    """d/dx [ f(x) + sum_i |df/dx_i|^2 ] for every leaf: a gradient penalty's gradient (first and second order)."""
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    out = f(*xs)
    grads = torch.autograd.grad(out, xs, create_graph=True)
    assert all(g.grad_fn is not None for g in grads), "a gradient without a graph: its penalty would be dropped"
    (out + sum((g * g).sum() for g in grads)).backward()
    return [x.grad for x in xs]


def _compare(name, ours, theirs, leaves, dtype):
    """ours vs theirs (torch) at dtype, both against theirs in float64 (the error rule at 4x: second-order terms;
    float64: a 1e-9 floor)."""
    got = _second_order(ours, leaves)
    ref = _second_order(theirs, [t.double() for t in leaves])
    base = _second_order(theirs, leaves) if dtype != F64 else ref
    for k, (a, r, b) in enumerate(zip(got, ref, base)):
        if dtype == F64:
            assert_error_rule(f"{name} [{k}]", a, r, dtype=torch.float32, floor=1e-9)
        else:
            assert_error_rule(f"{name} [{k}]", a, r, b, dtype=dtype, factor=4.0)


@pytest.mark.parametrize("backend,device,dtype", KERNEL_BACKENDS)
def test_cross_entropy_second_order(backend, device, dtype):
    require_backend(backend, device)
    x = torch.randn(7, 11, dtype=dtype, device=device) * 2
    t = torch.randint(0, 11, (7,), device=device)
    t[2] = -100
    w = torch.rand(11, dtype=dtype, device=device) + 0.5
    for reduction in ("mean", "sum"):
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
        _compare(f"cross_entropy {backend} {reduction}",
                 lambda x: pykernels.functional.cross_entropy(x, t, fused=False, z_loss=0.0, backend=backend, **kw),
                 lambda x: F.cross_entropy(x, t, **{**kw, "weight": w.to(x.dtype)}), [x], dtype)


@pytest.mark.parametrize("backend,device,dtype", KERNEL_BACKENDS)
def test_linear_cross_entropy_second_order(backend, device, dtype):
    require_backend(backend, device)
    if backend == "cuda":
        dtype = torch.bfloat16  # the CUDA kernels take 16-bit only
    x = torch.randn(9, 6, dtype=dtype, device=device)
    W = torch.randn(13, 6, dtype=dtype, device=device) * 0.5
    b = torch.randn(13, dtype=dtype, device=device)
    t = torch.randint(0, 13, (9,), device=device)
    _compare(f"linear_cross_entropy {backend}",
             lambda x, W, b: pykernels.functional.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.2,
                                                                       fused=False, backend=backend),
             lambda x, W, b: F.cross_entropy(F.linear(x, W, b).float() if x.dtype != F64 else F.linear(x, W, b), t,
                                             label_smoothing=0.2),
             [x, W, b], dtype)


@pytest.mark.parametrize("backend,device,dtype", KERNEL_BACKENDS)
def test_attention_second_order(backend, device, dtype):
    require_backend(backend, device)
    if backend == "cpu":
        pytest.skip("attention has no C++ CPU kernel")
    if device == "cuda":
        dtype = torch.float16
    q, k, v = (torch.randn(2, 2, 9, 16, dtype=dtype, device=device) for _ in range(3))
    bias = torch.randn(9, 9, dtype=dtype, device=device)
    window = torch.ones(9, 9, dtype=torch.bool, device=device).tril(-3)  # keys more than 2 behind: hidden
    _compare(f"attention {backend}",
             lambda q, k, v, b: pykernels.functional.scaled_dot_product_attention(
                 q, k, v, b, window=(2, -1), softcap=0.0, backend=backend).square().sum(),
             lambda q, k, v, b: _math_attention(q, k, v, b.masked_fill(window, float("-inf"))).float().square().sum(),
             [q, k, v, bias], dtype)
    # varlen: two sequences, causal
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(9, 2, 16, dtype=dtype, device=device) for _ in range(3))

    def theirs(q, k, v):
        outs = [_math_attention(q[a:e].transpose(0, 1), k[a:e].transpose(0, 1), v[a:e].transpose(0, 1),
                                causal=True).transpose(0, 1) for a, e in ((0, 4), (4, 9))]
        return torch.cat(outs).float().square().sum()

    _compare(f"varlen attention {backend}",
             lambda q, k, v: pykernels.functional.varlen_attention(q, k, v, cu, cu, 5, 5, is_causal=True,
                                                                   backend=backend).square().sum(),
             theirs, [qv, kv, vv], dtype)


@pytest.mark.parametrize("backend,device,dtype", KERNEL_BACKENDS)
def test_lstm_cell_and_layer_second_order(backend, device, dtype):
    require_backend(backend, device)
    B, I, H, T = 3, 4, 5, 6
    cell_args = [torch.randn(B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I) * 0.5,
                 torch.randn(4 * H, H) * 0.5, torch.randn(4 * H), torch.randn(4 * H)]
    cell_args = [a.to(device, dtype) for a in cell_args]
    _compare(f"lstm_cell {backend}",
             lambda x, h, c, wi, wh, bi, bh: sum(o.square().sum() for o in pykernels.functional.lstm_cell(
                 x, (h, c), wi, wh, bi, bh, backend=backend)),
             lambda x, h, c, wi, wh, bi, bh: sum(o.square().sum() for o in torch.lstm_cell(
                 x, (h, c), wi, wh, bi, bh)),
             cell_args, dtype)
    if dtype == F64 and backend != "cpu":
        return
    ref = torch.nn.LSTM(I, H, bidirectional=True, dtype=dtype, device=device)
    x = torch.randn(T, B, I, dtype=dtype, device=device)
    params = [p.detach() for p in ref._flat_weights]

    def ours(x, *p):
        out, (h, c) = pykernels.functional.lstm(x, None, p, 1, True, backend=backend)
        assert pykernels.last_dispatch["lstm"][0] == backend
        return out.square().sum() + h.sum() + c.sum()

    def theirs(x, *p):
        out, h, c = torch._VF.lstm(x, (x.new_zeros(2, B, H), x.new_zeros(2, B, H)), p, True, 1, 0.0, False,
                                   True, False)
        return out.square().sum() + h.sum() + c.sum()

    _compare(f"lstm {backend}", ours, theirs, [x, *params], dtype)


def test_gradgradcheck_float64_cpu_kernels():
    """torch's own finite-difference check of the second derivatives, on the C++ kernels in float64."""
    require_backend("cpu", "cpu")
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    t = torch.tensor([1, 5, -100, 0])
    torch.autograd.gradgradcheck(lambda x: pykernels.functional.cross_entropy(
        x, t, label_smoothing=0.1, z_loss=1e-2, fused=False, backend="cpu"), (x,))
    W = torch.randn(7, 6, dtype=F64, requires_grad=True)
    b = torch.randn(7, dtype=F64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x, W, b: pykernels.functional.linear_cross_entropy(
        x, W, torch.tensor([1, 6, 0, 3]), linear_bias=b, z_loss=1e-2, softcap=3.0, reduction="none", fused=False,
        backend="cpu"), (x, W, b))
    cell = [torch.randn(*s, dtype=F64, requires_grad=True) for s in ((2, 3), (2, 4), (2, 4), (16, 3), (16, 4),
                                                                       (16,), (16,))]
    torch.autograd.gradgradcheck(lambda x, h, c, *w: pykernels.functional.lstm_cell(
        x, (h, c), *w, backend="cpu"), cell)
    from pykernels.ops import lstm as ops
    layer = [torch.randn(*s, dtype=F64, requires_grad=True) for s in ((3, 2, 2), (2, 3), (2, 3), (12, 2), (12, 3),
                                                                        (12,), (12,))]
    for reverse in (False, True):
        torch.autograd.gradgradcheck(lambda *a: ops.lstm_layer_op(*a, reverse, "cpu")[:3], layer)


def test_custom_op_path_records_the_graph_too():
    """The registered custom op (what torch.compile and tensor subclasses see; eager calls take EagerOp's
    autograd.Function) differentiates twice the same way."""
    require_backend("cpu", "cpu")
    from pykernels.ops import cross_entropy as ce
    x = torch.randn(5, 8, dtype=F64, requires_grad=True)
    t = torch.randint(0, 8, (5,))
    loss = ce.cross_entropy_op(x.reshape(5, 8, 1), t, None, -100, ce.MEAN, 0.0, 0.0, False, "cpu")[0]
    g, = torch.autograd.grad(loss, x, create_graph=True)
    h, = torch.autograd.grad(g.square().sum(), x)
    x2 = x.detach().requires_grad_()
    g2, = torch.autograd.grad(F.cross_entropy(x2, t), x2, create_graph=True)
    h2, = torch.autograd.grad(g2.square().sum(), x2)
    torch.testing.assert_close(h, h2, rtol=1e-10, atol=1e-12)


def test_what_cannot_be_differentiated_twice_raises():
    """A fused forward saved gradients, not inputs; a kernel's dropout mask is its own random stream: both raise
    with the way out instead of returning a gradient that carries no graph."""
    require_backend("cpu", "cpu")
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.randint(0, 6, (4,))
    loss = pykernels.functional.cross_entropy(x, t, fused=True, backend="cpu")
    with pytest.raises(RuntimeError, match="fused=False"):
        torch.autograd.grad(loss, x, create_graph=True)
    W = torch.randn(5, 6, requires_grad=True)
    loss = pykernels.functional.linear_cross_entropy(x, W, torch.randint(0, 5, (4,)), fused=True, backend="cpu")
    with pytest.raises(RuntimeError, match="fused=False"):
        torch.autograd.grad(loss, (x, W), create_graph=True)
    require_backend("triton", "cpu")
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    out = pykernels.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.3, backend="triton")
    with pytest.raises(RuntimeError, match="dropout"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    # the first-order backward of the same calls is untouched
    out = pykernels.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.3, backend="triton")
    assert torch.autograd.grad(out.sum(), q)[0].grad_fn is None


# ---------------------------------------------------------------------------------------------------------
# Forward-mode AD

def _forward_mode_calls(device):
    """(name, ours(backend), torch's, primals): every functional, on a kernel backend's preference."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device)  # noqa: E731
    t = torch.randint(0, 7, (5,), generator=g).to(device)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    P = pykernels.functional

    def varlen_theirs(q, k, v):
        return torch.cat([_math_attention(q[a:e].transpose(0, 1), k[a:e].transpose(0, 1), v[a:e].transpose(0, 1),
                                          causal=True).transpose(0, 1) for a, e in ((0, 2), (2, 5))])

    lstm = torch.nn.LSTM(3, 4, dtype=torch.float32).to(device)
    return [
        ("cross_entropy", lambda b: lambda x: P.cross_entropy(x, t, label_smoothing=0.1, backend=b),
         lambda x: F.cross_entropy(x, t, label_smoothing=0.1), (r(5, 7),)),
        ("linear_cross_entropy", lambda b: lambda x, W: P.linear_cross_entropy(x, W, t, backend=b),
         lambda x, W: F.cross_entropy(x @ W.t(), t), (r(5, 6), r(7, 6))),
        ("scaled_dot_product_attention",
         lambda b: lambda q, k, v: P.scaled_dot_product_attention(q, k, v, window=(1, 1), backend=b),
         lambda q, k, v: _math_attention(q, k, v, torch.zeros(5, 5, device=device).masked_fill(
             torch.ones(5, 5, dtype=torch.bool, device=device).tril(-2) | torch.ones(
                 5, 5, dtype=torch.bool, device=device).triu(2), float("-inf"))),
         (r(1, 2, 5, 16), r(1, 2, 5, 16), r(1, 2, 5, 16))),
        ("varlen_attention",
         lambda b: lambda q, k, v: P.varlen_attention(q, k, v, cu, cu, 3, 3, is_causal=True, backend=b),
         varlen_theirs, (r(5, 2, 16), r(5, 2, 16), r(5, 2, 16))),
        ("lstm_cell", lambda b: lambda x, h, c: P.lstm_cell(x, (h, c), *[p.detach() for p in lstm._flat_weights],
                                                             backend=b)[0],
         lambda x, h, c: torch.lstm_cell(x, (h, c), *[p.detach() for p in lstm._flat_weights])[0],
         (r(2, 3), r(2, 4), r(2, 4))),
        ("lstm", lambda b: lambda x: P.lstm(x, None, [p.detach() for p in lstm._flat_weights], backend=b)[0],
         lambda x: _lstm_loop(x, [p.detach() for p in lstm._flat_weights]),
         (r(4, 2, 3),)),
    ]


def _lstm_loop(x, w):
    """torch's LSTM as a loop of torch.lstm_cell (torch's fused CPU LSTM, oneDNN, has no forward derivative)."""
    h = c = x.new_zeros(x.shape[1], w[1].shape[1])
    outs = []
    for xt in x:
        h, c = torch.lstm_cell(xt, (h, c), *w)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("triton", "cpu", id="triton-interp"),
                                            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
                                            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)])
def test_forward_mode_runs_on_the_reference(backend, device):
    require_backend(backend, device)
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp
    for name, ours, theirs, primals in _forward_mode_calls(device):
        tangents = tuple(torch.randn_like(p) for p in primals)
        want = jvp(theirs, primals, tangents)
        with pykernels.use_backend(backend):
            got = jvp(ours(None), primals, tangents)
            ran, why = pykernels.last_dispatch[name]
            assert ran == "reference" and "forward-mode" in why[backend], f"{name}: {ran} {why}"
            with fwAD.dual_level():
                out = ours(None)(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
                dual = fwAD.unpack_dual(out)
        for a, b in ((got[0], want[0]), (got[1], want[1]), (dual.primal, want[0]), (dual.tangent, want[1])):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5, msg=name)
        with pytest.raises(pykernels.BackendUnavailableError, match="forward-mode"):
            jvp(ours(backend), primals, tangents)
        # without a tangent the kernels run again
        with pykernels.use_backend(backend):
            ours(None)(*primals)
        assert "forward-mode" not in str(pykernels.last_dispatch[name]), name


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("triton", "cpu", id="triton-interp"),
                                            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
                                            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)])
def test_functorch_reverse_mode_runs_on_the_reference(backend, device):
    """torch.func.grad / vjp / jacrev: torch's custom-op autograd refuses functorch's reverse mode (\"must override
    the setup_context staticmethod\"), so such calls run on the reference, visibly, and a kernel backend asked by
    name raises; they failed whenever a kernel was chosen (an automatic LSTMCell on the CPU: every call)."""
    require_backend(backend, device)
    from torch.func import grad, vjp
    for name, ours, theirs, primals in _forward_mode_calls(device):
        cotangent = torch.randn_like(theirs(*primals))
        want = vjp(theirs, *primals)[1](cotangent)
        with pykernels.use_backend(backend):
            got = vjp(ours(None), *primals)[1](cotangent)
            ran, why = pykernels.last_dispatch[name]
            assert ran == "reference" and "reverse mode" in why[backend], f"{name}: {ran} {why}"
            got_grad = grad(lambda *a: (ours(None)(*a) * cotangent).sum())(*primals)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(got_grad, want[0].to(got_grad.dtype), rtol=1e-4, atol=1e-5, msg=name)
        with pytest.raises(pykernels.BackendUnavailableError, match="reverse mode"):
            vjp(ours(backend), *primals)
        with pykernels.use_backend(backend):  # outside the transform the kernels run again
            ours(None)(*primals)
        assert "reverse mode" not in str(pykernels.last_dispatch[name]), name


def test_forward_mode_of_automatic_calls_that_torch_would_run():
    """Automatic CPU calls that the measured rules hand to torch's own kernel (backends.prefer_native): where that
    kernel has no forward derivative (SDPA, oneDNN's LSTM: NotImplementedError under jvp), forward-mode AD runs on
    the reference instead; where it has one (cross_entropy's small calls), torch's kernel keeps them."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp
    torch.manual_seed(0)
    P = pykernels.functional
    lstm = pykernels.nn.LSTM(5, 6).requires_grad_(False)  # (calls with a gradient may run ours on AVX2 CPUs)
    frozen = lstm._flat_weights
    mha = pykernels.nn.MultiheadAttention(8, 2)
    k, v, t = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randint(0, 7, (5,))
    rows = pykernels.backends.ours_faster_dtype("lstm", "cpu", torch.float32)[1] + 1  # past ours without a gradient
    calls = [  # (last_dispatch key, the call, primal, where it must run)
        ("scaled_dot_product_attention", lambda q: P.scaled_dot_product_attention(q, k, v), torch.randn(2, 2, 3, 8),
         "reference"),
        ("scaled_dot_product_attention", lambda e: mha(e, e, e, need_weights=False)[0], torch.randn(3, 2, 8),
         "reference"),
        ("lstm", lambda x: P.lstm(x, None, frozen)[0], torch.randn(4, rows, 5), "reference"),
        ("lstm", lambda x: lstm(x)[0], torch.randn(4, 32, 5), "reference"),
        ("cross_entropy", lambda x: P.cross_entropy(x, t), torch.randn(5, 7), "torch"),
    ]
    for name, f, primal in [c[:3] for c in calls]:
        pykernels.last_dispatch.pop(name, None)
        f(primal)
        assert pykernels.last_dispatch[name][0] == "torch", name  # (what the rules pick without a tangent)
    for name, f, primal, runs in calls:
        tangent = torch.randn_like(primal)
        with pykernels.use_backend("reference"):
            want = jvp(f, (primal,), (tangent,))
        got = jvp(f, (primal,), (tangent,))
        assert pykernels.last_dispatch[name][0] == runs, (name, pykernels.last_dispatch[name])
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(f(fwAD.make_dual(primal, tangent)))
        assert pykernels.last_dispatch[name][0] == runs, (name, pykernels.last_dispatch[name])
        for a, b in ((got[0], want[0]), (got[1], want[1]), (dual.primal, want[0]), (dual.tangent, want[1])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing

@pytest.mark.parametrize("backend,device", [pytest.param("triton", "cpu", id="triton-interp"),
                                            pytest.param("cpu", "cpu", id="cpu"),
                                            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
                                            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)])
def test_checkpoint_recomputes_the_same_dropout(backend, device):
    """torch.utils.checkpoint re-runs the forward in the backward with the RNG state restored: the recomputed
    attention dropout (its seed drawn from torch's generator) and LSTM inter-layer dropout must be the same masks,
    or the gradients belong to another forward."""
    require_backend(backend, device)
    from torch.utils.checkpoint import checkpoint
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 20, 16, device=device, dtype=dtype, requires_grad=True)
    lstm = pykernels.nn.LSTM(16, 8, num_layers=2, dropout=0.5, device=device, backend=None)
    calls = []
    if backend != "cpu":  # attention has no C++ CPU kernel
        calls.append(lambda q: pykernels.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.3,
                                                                                 backend=backend))
    calls.append(lambda q: lstm(q[0].transpose(0, 1).float())[0])
    for f in calls:
        with pykernels.use_backend(backend):
            torch.manual_seed(5)
            plain = f(q)
            g_plain, = torch.autograd.grad(plain.float().square().sum(), q)
            torch.manual_seed(5)
            ckpt = checkpoint(f, q, use_reentrant=False)
            g_ckpt, = torch.autograd.grad(ckpt.float().square().sum(), q)
            torch.manual_seed(5)
            ckpt_out = checkpoint(f, q, use_reentrant=False, context_fn=pykernels.checkpoint_context)
        g_out, = torch.autograd.grad(ckpt_out.float().square().sum(), q)  # recomputed outside the block
        assert torch.equal(plain, ckpt) and torch.equal(g_plain, g_ckpt) and torch.equal(g_plain, g_out)


def test_checkpoint_context_recomputes_under_the_forward_preference():
    """A use_backend block around the forward only (autocast's idiom): checkpoint's recomputation runs in the
    backward, outside the block, where another backend saves other tensors (CheckpointError) unless
    pykernels.checkpoint_context re-enters the forward's preference there, as torch does for autocast."""
    from torch.utils.checkpoint import CheckpointError, checkpoint
    x = torch.randn(16, 37, requires_grad=True)
    t = torch.randint(0, 37, (16,))
    lstm = pykernels.nn.LSTM(8, 16)
    xs = torch.randn(5, 3, 8, requires_grad=True)
    for fn, inp in ((lambda a: pykernels.functional.cross_entropy(a * 2, t), x), (lambda a: lstm(a)[0].sum(), xs)):
        with pykernels.use_backend("reference"):
            want, = torch.autograd.grad(fn(inp), inp)
            y = checkpoint(fn, inp, use_reentrant=False)
            y_ctx = checkpoint(fn, inp, use_reentrant=False, context_fn=pykernels.checkpoint_context)
        with pytest.raises(CheckpointError, match="different number of tensors"):
            torch.autograd.grad(y, inp)
        with pykernels.use_backend("cpu"):  # the forward's preference wins over the one open at the backward
            got, = torch.autograd.grad(y_ctx, inp)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

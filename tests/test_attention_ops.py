"""Operator-level checks of attention (pykernels::attention and the kernel ops): opcheck, float64 gradcheck,
torch.compile(fullgraph=True) parity, in-kernel dropout against the oracle given the kernels' own keep-mask,
the float-mask gradient, the GQA / causal / window block skipping at sizes spanning several blocks."""
from __future__ import annotations

import math

import pytest
import torch

import pykernels
from pykernels.ops import attention as attn_ops
from pykernels.reference import attention as ref
from pykernels.testing import assert_error_rule, max_abs_err

from conftest import backend_params, require_backend

# No C++ CPU attention kernel; the CUDA one (issue 4) is tested once pykernels.ops.attention registers it.
KERNEL_BACKENDS = [p for p in backend_params(include_reference=False)
                   if p.values[0] == "triton" or p.values[0] in attn_ops.KERNELS]


def _dtype(device):
    return torch.float16 if device == "cuda" else torch.float32


def _args(q, k, v, bias=None, causal=False, diag=0, window=(-1, -1), softcap=0.0, dropout_p=0.0, seed=None,
          cu=(None, None), maxlen=None, bottom_right=False):
    L, S = (q.shape[-2], k.shape[-2]) if maxlen is None else maxlen
    return (q, k, v, bias, cu[0], cu[1], L, S, 1 / math.sqrt(q.shape[-1]), causal, diag, bottom_right, window[0],
            window[1], softcap, dropout_p, seed)


def _samples(device, dtype):
    q, k, v = (torch.randn(1, 2, 9, 16, device=device, dtype=dtype), torch.randn(1, 1, 11, 16, device=device,
               dtype=dtype), torch.randn(1, 1, 11, 8, device=device, dtype=dtype))
    bias = torch.randn(9, 11, device=device, dtype=dtype)
    seed = torch.tensor([5], device=device, dtype=torch.int64)
    cq = torch.tensor([0, 4, 9], device=device, dtype=torch.int32)
    ck = torch.tensor([0, 6, 11], device=device, dtype=torch.int32)
    qv, kv, vv = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
    return [_args(q, k, v), _args(q, k, v, causal=True, diag=2), _args(q, k, v, bias=bias, window=(2, 3), softcap=3.0),
            _args(q, k, v, bias=bias > 0, dropout_p=0.2, seed=seed),
            _args(qv, kv, vv, cu=(cq, ck), maxlen=(5, 6), causal=True, bottom_right=True)]


def _utils(device):
    # AOT tracing runs wrap_triton kernels on fake tensors, which the CPU interpreter cannot execute; the
    # compiled-GPU tier runs every util.
    if device == "cpu":
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    require_backend(backend, device)
    for args in _samples(device, _dtype(device)):
        q = args[0].detach().clone().requires_grad_()
        bias = args[3]
        if bias is not None and bias.dtype != torch.bool:
            bias = bias.detach().clone().requires_grad_()
        torch.library.opcheck(torch.ops.pykernels.attention.default, (q,) + args[1:3] + (bias,) + args[4:] +
                              (backend,), test_utils=_utils(device))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_opcheck_kernel_ops(backend, device):
    require_backend(backend, device)
    fwd, bwd = attn_ops.KERNELS[backend]
    u = ("test_schema",) if device == "cpu" else ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in _samples(device, _dtype(device)):
        torch.library.opcheck(fwd, args, test_utils=u)
        o, lse, lo = fwd(*args)
        bias = args[3]
        torch.library.opcheck(bwd, (torch.randn_like(o),) + args[:3] + (o, lse, lo) + args[3:] +
                              (bias is not None and bias.dtype != torch.bool,), test_utils=u)


def test_gradcheck_float64_reference():
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 3, dtype=torch.float64, requires_grad=True)
    m = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, m):
        return pykernels.functional.scaled_dot_product_attention(q, k, v, m, enable_gqa=True, is_causal=True,
                                                                 window=(2, -1), softcap=2.0,
                                                                 causal_alignment="bottom_right",
                                                                 backend="reference")
    assert torch.autograd.gradcheck(f, (q, k, v, m))


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] +
                         [p for p in KERNEL_BACKENDS if p.values[1] == "cuda"])
def test_compile_fullgraph_parity(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    q = torch.randn(2, 4, 19, 16, device=device)
    k = torch.randn(2, 2, 23, 16, device=device)
    v = torch.randn(2, 2, 23, 16, device=device)
    m = torch.randn(19, 23, device=device)

    def f(q, k, v, *m):
        out, lse = pykernels.functional.scaled_dot_product_attention(q, k, v, *m, enable_gqa=True, is_causal=True,
                                                                     softcap=5.0, return_lse=True, backend=backend)
        return out, lse

    compiled = torch.compile(f, fullgraph=True)
    if backend == "cuda":
        q, k, v = (t.half() for t in (q, k, v))
    xe = [t.clone().requires_grad_() for t in (q, k, v, m)]
    xc = [t.clone().requires_grad_() for t in (q, k, v, m)]
    oe, le = f(*xe)
    oc, lc = compiled(*xc)
    assert max_abs_err(oe, oc) <= 1e-5 and max_abs_err(le, lc) <= 1e-5
    ge = torch.autograd.grad(oe, xe, torch.ones_like(oe))
    gc = torch.autograd.grad(oc, xc, torch.ones_like(oc))
    for a, b in zip(ge, gc):
        assert max_abs_err(a, b) <= 1e-5


def test_compile_dynamic_shapes_traces_the_argument_checks():
    """dynamic=True traces the float defaults (softcap) as SymFloats: math.isfinite on one failed the trace, on
    every backend, torch's SDPA included."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    cc = CompileCounterWithBackend("eager")
    f = torch.compile(pykernels.functional.scaled_dot_product_attention, fullgraph=True, dynamic=True, backend=cc)
    for L in (5, 7, 9):
        q, k, v = (torch.randn(2, 3, L, 8) for _ in range(3))
        torch.testing.assert_close(f(q, k, v, is_causal=True), torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True))
    assert cc.frame_count == 1


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_compile_fullgraph_varlen_reference_parity(alignment):
    """varlen_attention on the reference (every CPU call) under torch.compile(fullgraph=True): the reference reads
    cu_seqlens on the host and loops over the sequences, which Dynamo could not trace (GuardOnDataDependentSymNode);
    traced calls now run it as the opaque op pykernels::attention(backend="reference"). Causal + GQA + a window +
    padding rows past cu_seqlens[-1]; outputs, lse and q/k/v gradients equal eager's, and new offsets of the same
    shape reuse the graph (the offsets are data, not guarded on)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    H, Hk, E, Ev = 4, 2, 8, 6
    q, k, v = torch.randn(13, H, E), torch.randn(14, Hk, E), torch.randn(14, Hk, Ev)

    def f(q, k, v, cq, ck):
        return pykernels.functional.varlen_attention(q, k, v, cq, ck, 5, 5, is_causal=True, window=(2, -1),
                                                     softcap=4.0, causal_alignment=alignment, return_lse=True)

    cc = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces the backward too; no C++ compiler needed
    compiled = torch.compile(f, fullgraph=True, backend=cc)
    for cq, ck in (([0, 3, 8, 11], [0, 4, 8, 12]), ([0, 5, 6, 10], [0, 2, 7, 11])):  # rows 10.. / 11.. padding
        cq, ck = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
        xe = [t.clone().requires_grad_() for t in (q, k, v)]
        xc = [t.clone().requires_grad_() for t in (q, k, v)]
        oe, le = f(*xe, cq, ck)
        oc, lc = compiled(*xc, cq, ck)
        assert oc.shape == oe.shape and lc.shape == le.shape == (H, 13) and lc.dtype == torch.float32
        assert max_abs_err(oe, oc) <= 1e-6 and max_abs_err(le, lc) <= 1e-6
        assert bool((oc[int(cq[-1]):] == 0).all()) and bool(torch.isinf(lc[:, int(cq[-1]):]).all())
        g = torch.randn_like(oe)
        ge = torch.autograd.grad(oe, xe, g)
        gc = torch.autograd.grad(oc, xc, g)
        for name, a, b in zip(("dq", "dk", "dv"), ge, gc):
            assert max_abs_err(a, b) <= 1e-5, name
        assert bool((gc[0][int(cq[-1]):] == 0).all()) and bool((gc[1][int(ck[-1]):] == 0).all())
    assert cc.frame_count == 1


def test_reference_kernel_ops_dropout_masks_from_the_seed():
    """The reference kernel ops (what a compiled reference call runs) draw their dropout keep-masks from the seed
    tensor: the forward and the backward apply the same masks, equal to the eager reference given those masks."""
    H, Hk, E = 2, 1, 8
    q, k, v = torch.randn(9, H, E, dtype=torch.float64), torch.randn(11, Hk, E, dtype=torch.float64), \
        torch.randn(11, Hk, E, dtype=torch.float64)
    cq, ck = torch.tensor([0, 4, 8], dtype=torch.int32), torch.tensor([0, 6, 10], dtype=torch.int32)
    seed, p = torch.tensor([987654321], dtype=torch.int64), 0.3
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse, _ = attn_ops.attention_op(*_args(*x, causal=True, dropout_p=p, seed=seed, cu=(cq, ck), maxlen=(4, 6)),
                                   "reference")
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, x, g)
    masks = ref.varlen_dropout_masks(cq, ck, H, p, q.device, attn_ops._reference_generator(seed, q.device))
    assert 0.5 < float(torch.cat([m.flatten() for m in masks]).double().mean()) < 0.9
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, rl = ref.varlen_attention(*xr, cq, ck, masks, p, True, 1 / math.sqrt(E))
    rgrads = torch.autograd.grad(ro, xr, g)
    assert max_abs_err(o, ro) == 0 and max_abs_err(lse, rl) <= 1e-6 and lse.dtype == torch.float32
    for a, b in zip(grads, rgrads):
        assert max_abs_err(a, b) <= 1e-12
    o2, _, _ = attn_ops.attention_op(*_args(q, k, v, causal=True, dropout_p=p, seed=seed, cu=(cq, ck), maxlen=(4, 6)),
                                  "reference")
    assert torch.equal(o, o2)  # the seed alone decides the masks


@pytest.mark.parametrize("case", ["dense_float_mask", "dense_dead_row_dropout", "varlen"])
def test_reference_kernel_ops_backward_matches_autograd(case):
    """The reference bwd kernel op derives the gradients by hand (autograd records nothing below the autograd
    dispatch keys, where an op's implementation runs): equal to autograd through the reference, in float64, with
    GQA, softcap, causal + window, a float mask's summed gradient, dropout (the seed's masks), a row that sees no
    key and varlen padding rows. A double backward of the eager op on this backend differentiates the same forward."""
    d = dict(dtype=torch.float64)
    seed, p = torch.tensor([4242], dtype=torch.int64), 0.25
    H, Hk, E, Ev = 4, 2, 8, 5
    if case == "varlen":
        q, k, v = torch.randn(12, H, E, **d), torch.randn(13, Hk, E, **d), torch.randn(13, Hk, Ev, **d)
        cq, ck = torch.tensor([0, 3, 3, 10], dtype=torch.int32), torch.tensor([0, 4, 6, 11], dtype=torch.int32)
        leaves, bias = [q, k, v], None
        args = _args(q, k, v, causal=True, window=(3, -1), softcap=2.5, dropout_p=p, seed=seed, cu=(cq, ck),
                     maxlen=(7, 5), bottom_right=True)
        masks = ref.varlen_dropout_masks(cq, ck, H, p, q.device, attn_ops._reference_generator(seed, q.device))

        def reference(q, k, v, bias):
            return ref.varlen_attention(q, k, v, cq, ck, masks, p, True, 1 / math.sqrt(E), "bottom_right", (3, -1),
                                        2.5)[0]
    else:
        L, S = 7, 9
        q, k, v = torch.randn(2, H, L, E, **d), torch.randn(2, Hk, S, E, **d), torch.randn(2, Hk, S, Ev, **d)
        if case == "dense_float_mask":
            bias = torch.randn(L, S, **d)
            kw = dict(causal=True, diag=S - L, window=(2, 1), softcap=3.0)
            keep = None
        else:
            bias = torch.ones(L, S, dtype=torch.bool)
            bias[4] = False  # query row 4 sees no key: zeros, no NaN
            kw = dict(dropout_p=p, seed=seed)
            keep = torch.rand(2, H, L, S, generator=attn_ops._reference_generator(seed, q.device)) >= p
        leaves = [q, k, v] + ([bias] if bias.dtype != torch.bool else [])
        args = _args(q, k, v, bias=bias, **kw)

        def reference(q, k, v, bias):
            return ref.scaled_dot_product_attention(q, k, v, bias, keep, kw.get("dropout_p", 0.0),
                                                    kw.get("causal", False), 1 / math.sqrt(E), True,
                                                    "bottom_right" if kw.get("diag") else "top_left",
                                                    kw.get("window", (-1, -1)), kw.get("softcap", 0.0))[0]
    x = [t.clone().requires_grad_() for t in leaves]
    xb = x[3] if len(x) > 3 else bias
    o, _, _ = attn_ops.attention_op(*((x[0], x[1], x[2], xb) + args[4:]), "reference")
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, x, g)
    xr = [t.clone().requires_grad_() for t in leaves]
    ro = reference(xr[0], xr[1], xr[2], xr[3] if len(xr) > 3 else bias)
    assert max_abs_err(o, ro) == 0
    rgrads = torch.autograd.grad(ro, xr, g)
    for a, b in zip(grads, rgrads):
        assert a.shape == b.shape and max_abs_err(a, b) <= 1e-12
        assert bool(torch.isfinite(a).all())
    # double backward (eager EagerOp path): the reference forward again, the seed's masks included
    x2 = [t.clone().requires_grad_() for t in leaves]
    o2, _, _ = attn_ops.attention(*((x2[0], x2[1], x2[2], x2[3] if len(x2) > 3 else bias) + args[4:]), "reference")
    gq, = torch.autograd.grad(o2, x2[0], g, create_graph=True)
    hv = torch.autograd.grad(gq.square().sum(), x2[1])[0]
    xr2 = [t.clone().requires_grad_() for t in leaves]
    rq, = torch.autograd.grad(reference(xr2[0], xr2[1], xr2[2], xr2[3] if len(xr2) > 3 else bias), xr2[0], g,
                              create_graph=True)
    assert max_abs_err(hv, torch.autograd.grad(rq.square().sum(), xr2[1])[0]) <= 1e-10


def test_opcheck_reference_kernel_ops():
    fwd, bwd = attn_ops.REFERENCE_KERNELS
    assert "reference" not in attn_ops.KERNELS  # KERNELS lists the backends with kernels
    if "triton" in attn_ops.KERNELS:  # the kernel ops' schema (docs/attention.md)
        for ours, theirs in zip((fwd, bwd), attn_ops.KERNELS["triton"]):
            assert str(ours._schema).split("(", 1)[1] == str(theirs._schema).split("(", 1)[1]
    for args in _samples("cpu", torch.float32):
        torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
        o, lse, lo = fwd(*args)
        bias = args[3]
        torch.library.opcheck(bwd, (torch.randn_like(o),) + args[:3] + (o, lse, lo) + args[3:] +
                              (bias is not None and bias.dtype != torch.bool,),
                              test_utils=("test_schema", "test_faketensor"))
        q = args[0].detach().clone().requires_grad_()
        if bias is not None and bias.dtype != torch.bool:
            bias = bias.detach().clone().requires_grad_()
        torch.library.opcheck(torch.ops.pykernels.attention.default, (q,) + args[1:3] + (bias,) + args[4:] +
                              ("reference",), test_utils=("test_schema", "test_autograd_registration",
                                                          "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_oracle_with_the_kernels_mask(backend, device, causal):
    """The kernels' dropout (forward and the regenerated backward) equals the oracle given the same keep-mask."""
    require_backend(backend, device)
    dtype = _dtype(device)
    B, H, Hk, L, S, E = 1, 4, 2, 21, 26, 16
    q, k = torch.randn(B, H, L, E, device=device, dtype=dtype), torch.randn(B, Hk, S, E, device=device, dtype=dtype)
    v = torch.randn(B, Hk, S, E, device=device, dtype=dtype)
    seed, p = torch.tensor([123456789012], device=device), 0.35
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse, _ = attn_ops.attention_op(*_args(*x, causal=causal, dropout_p=p, seed=seed), backend)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, x, g)
    keep = attn_ops.dropout_mask(seed, B, H, L, S, p)
    assert 0.55 < float(keep.float().mean()) < 0.75
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = ref.scaled_dot_product_attention(*x64, dropout_mask=keep, dropout_p=p, is_causal=causal,
                                             enable_gqa=True)
    rgrads = torch.autograd.grad(ro, x64, g.double())
    floor = 2e-5 if dtype == torch.float32 else 4e-3
    assert_error_rule("out", o, ro, floor=floor)
    assert_error_rule("lse", lse, rl, floor=2e-5, dtype=torch.float32)  # lse ignores dropout
    for name, a, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_error_rule(name, a, r, floor=floor)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dropout_matches_oracle_with_the_kernels_mask(backend, device, causal):
    """varlen: sequence i's keep-mask is rows cq[i]:cq[i+1], columns 0:len_k(i) of the dense (H, T, Tk) mask (counter
    row * Tk + the sequence's own key index); the backward must regenerate it (a dK/dV pass counting with the
    sequence's length instead of Tk passed every other test: mutation review)."""
    require_backend(backend, device)
    dtype = _dtype(device)
    H, Hk, E, p = 4, 2, 16, 0.3
    cq = torch.tensor([0, 5, 12, 30], device=device, dtype=torch.int32)
    ck = torch.tensor([0, 7, 16, 37], device=device, dtype=torch.int32)
    T, Tk = 30, 37
    q = torch.randn(T, H, E, device=device, dtype=dtype)
    k, v = (torch.randn(Tk, Hk, E, device=device, dtype=dtype) for _ in range(2))
    seed = torch.tensor([77], device=device)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o, _, _ = attn_ops.attention_op(*_args(*x, causal=causal, dropout_p=p, seed=seed, cu=(cq, ck), maxlen=(18, 21),
                                           bottom_right=True), backend)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, x, g)
    full = attn_ops.dropout_mask(seed, 1, H, T, Tk, p)[0]
    cql, ckl = cq.tolist(), ck.tolist()
    masks = [full[:, cql[i]:cql[i + 1], :ckl[i + 1] - ckl[i]].cpu() for i in range(3)]
    x64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ro, _ = ref.varlen_attention(*x64, cq.cpu(), ck.cpu(), masks, p, causal, 1 / math.sqrt(E),
                                 alignment="bottom_right")
    rgrads = torch.autograd.grad(ro, x64, g.double().cpu())
    floor = 2e-5 if dtype == torch.float32 else 4e-3
    for name, a, r in zip(("out", "dq", "dk", "dv"), (o,) + grads, (ro,) + rgrads):
        assert_error_rule(name, a.cpu(), r, floor=floor)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_many_blocks_gqa_window_float_mask_grad(backend, device):
    """Sizes spanning several tiles in both directions (block skipping of causal + window in dK/dV and dQ), GQA
    groups of 3, a float mask broadcast over the heads whose gradient is summed over it."""
    require_backend(backend, device)
    dtype = _dtype(device)
    B, H, Hk, L, S, E = 1, 3, 1, 50, 37, 32
    q, k = torch.randn(B, H, L, E, device=device, dtype=dtype), torch.randn(B, Hk, S, E, device=device, dtype=dtype)
    v = torch.randn(B, Hk, S, E, device=device, dtype=dtype)
    m = torch.randn(B, 1, L, S, device=device, dtype=dtype)
    leaves = (q, k, v, m)
    for causal, diag, window in ((True, S - L, (9, -1)), (False, 0, (4, 20)), (True, 0, (-1, -1))):
        x = [t.clone().requires_grad_() for t in leaves]
        bias = x[3] if len(x) > 3 else None
        o, _, _ = attn_ops.attention_op(*_args(*x[:3], bias=bias, causal=causal, diag=diag, window=window), backend)
        g = torch.randn_like(o)
        grads = torch.autograd.grad(o, x, g)
        x64 = [t.detach().double().requires_grad_() for t in leaves]
        ro, _ = ref.scaled_dot_product_attention(*x64[:3], attn_mask=x64[3] if len(x64) > 3 else None,
                                                is_causal=causal, enable_gqa=True,
                                                alignment="bottom_right" if diag else "top_left", window=window)
        rgrads = torch.autograd.grad(ro, x64, g.double())
        floor = 2e-5 if dtype == torch.float32 else 4e-3
        assert_error_rule("out", o, ro, floor=floor)
        for name, a, r in zip(("dq", "dk", "dv", "dmask"), grads, rgrads):
            assert_error_rule(name, a, r, floor=floor)


def test_fake_shapes_of_varlen_and_dense():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 7, 16), torch.empty(2, 2, 9, 16), torch.empty(2, 2, 9, 24)
        o, lse, _ = torch.ops.pykernels.attention(*_args(q, k, v), "reference")
        assert o.shape == (2, 4, 7, 24) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
        cu = torch.empty(3, dtype=torch.int32)
        o, lse, _ = torch.ops.pykernels.attention(*_args(torch.empty(13, 4, 16), torch.empty(11, 2, 16),
                                                      torch.empty(11, 2, 8), cu=(cu, cu), maxlen=(7, 6)), "reference")
        assert o.shape == (13, 4, 8) and lse.shape == (4, 13)


def test_triton_kernel_ops_check_their_arguments():
    """The Triton kernel ops check shapes, dtypes, devices and (CPU tensors) the varlen offsets before a kernel runs,
    naming the argument: cu_seqlens_q ending past the rows made the kernel read out of bounds (SIGABRT under the
    interpreter, an illegal address on a GPU)."""
    require_backend("triton", "cpu")
    fwd, bwd = attn_ops.KERNELS["triton"]
    q, k, v = torch.randn(7, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cq, ck = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    for cu, name in (((torch.tensor([0, 3, 700], dtype=torch.int32), ck), "cu_seqlens_q must start at 0"),
                     ((cq, torch.tensor([0, 5, 4], dtype=torch.int32)), "cu_seqlens_k must start at 0"),
                     ((cq.long(), ck), "cu_seqlens_q must be a 1-D int32"), ((cq, ck[:2]), "same length")):
        with pytest.raises(RuntimeError, match=name):
            fwd(*_args(q, k, v, cu=cu, maxlen=(4, 5)))
    with pytest.raises(RuntimeError, match="longer than max_seqlen"):
        fwd(*_args(q, k, v, cu=(cq, ck), maxlen=(2, 5)))
    with pytest.raises(RuntimeError, match="attention_fwd_triton: the query heads"):
        fwd(*_args(q, torch.randn(9, 3, 8), torch.randn(9, 3, 8), cu=(cq, ck), maxlen=(4, 5)))
    qd, kd, vd = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    for args, name in ((_args(qd[0], kd[0], vd[0]), "must be 4-D"), (_args(qd, kd[:1], vd[:1]), "k must have shape"),
                       (_args(qd, kd, vd[:, :, :3]), "v must have shape"), (_args(qd, kd[..., :4], vd), "head dim"),
                       (_args(qd, kd, vd, bias=torch.zeros(5, 7)), "bias must broadcast"),
                       (_args(qd, kd, vd, dropout_p=0.1), "dropout needs seed"),
                       (_args(qd, kd, vd, dropout_p=0.1, seed=torch.tensor([1], dtype=torch.int32)),
                        "dropout needs seed"),
                       (_args(qd, kd, vd, dropout_p=1.0, seed=torch.tensor([1])), r"dropout_p must be in \[0, 1\)"),
                       (_args(qd, kd[:, :0], vd[:, :0]), "multiple of the kv heads"),
                       (_args(qd.long(), kd, vd), "q must be float16"), (_args(qd, kd.half(), vd), "k must be")):
        with pytest.raises(RuntimeError, match=name):
            fwd(*args)
    out, lse, lo = fwd(*_args(qd, kd, vd))
    g, rest = torch.randn_like(out), _args(qd, kd, vd)[3:]
    strided = torch.empty(*lse.shape[:-1], 2 * lse.shape[-1])[..., ::2].copy_(lse)  # read at stride 1
    for name, lse_arg, lo_arg in (("lse", lse[:, :1], None), ("lse", strided, None), ("lse_lo", lse, lo[:, :1]),
                                  ("lse_lo", lse, strided), ("lse_lo", lse, lo.double())):
        with pytest.raises(RuntimeError, match=f"attention_bwd_triton: {name} must"):
            bwd(g, qd, kd, vd, out, lse_arg, lo_arg, *rest, False)
    bwd(g, qd, kd, vd, out, lse, lo, *rest, False)  # the same call with consistent tensors runs


def test_a_backend_without_kernels_for_the_op_is_named_with_a_gpu_present(monkeypatch):
    """attention has no C++ CPU kernel: a direct op call with backend 'cpu' is a bad backend (the valid ones listed),
    judged for the CPU also where CUDA is the default device (asked of the default device, the cpu backend read as
    unavailable there)."""
    from pykernels.ops import _checks
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    with pytest.raises(ValueError, match="backend must be one of"):
        _checks.kernels("attention", {"triton": None, "reference": None}, "cpu")


@pytest.mark.gpu
def test_cuda_kernel_ops_check_the_backward_inputs():
    """Direct calls of the CUDA kernel ops: the backward checks out, grad_out, lse and lse_lo against q's and v's
    shapes, dtype and device (the kernels index them by those: an lse of (B, H, L - 1) or a grad_out of a smaller
    value head dim was read out of bounds, a CPU lse handed a host pointer to the kernel), and a varlen call's
    maximum lengths are non-negative."""
    require_backend("cuda", "cuda")
    fwd, bwd = attn_ops.KERNELS["cuda"]
    qd, kd, vd = (torch.randn(2, 4, 17, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out, lse, lo = fwd(*_args(qd, kd, vd))
    g = torch.randn_like(out)
    rest = _args(qd, kd, vd)[3:]
    for args, name in (((g, out, lse[:, :, :-1], lo), "lse must be"), ((g, out, lse.cpu(), lo), "lse must be"),
                       ((g, out, lse, lo[:, :, :-1]), "lse_lo must be"), ((g, out, lse, lo.cpu()), "lse_lo must be"),
                       ((g[..., :56], out[..., :56], lse, lo), "grad_out must be"),
                       ((g.cpu(), out, lse, lo), "grad_out must"), ((g, out.float(), lse, lo), "out must be")):
        with pytest.raises(RuntimeError, match=name):
            bwd(args[0], qd, kd, vd, args[1], args[2], args[3], *rest, False)
    for lse_lo in (lo, None):  # the same call with consistent tensors runs
        bwd(g, qd, kd, vd, out, lse, lse_lo, *rest, False)
    q, k = torch.randn(7, 2, 64, device="cuda", dtype=torch.float16), torch.randn(9, 2, 64, device="cuda",
                                                                                 dtype=torch.float16)
    cq, ck = (torch.tensor(c, dtype=torch.int32, device="cuda") for c in ([0, 3, 7], [0, 4, 9]))
    with pytest.raises(RuntimeError, match="max_seqlen_q and max_seqlen_k must be non-negative"):
        fwd(*_args(q, k, k, cu=(cq, ck), maxlen=(-1, 5)))


@pytest.mark.parametrize("backend", ["cpu", "bogus"])
def test_op_backend_argument_is_checked(backend):
    """pykernels::attention with a backend that has no kernel ops ("cpu": attention has no C++ CPU kernel) names it
    and the valid ones (it was a bare KeyError)."""
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=f"attention: backend must be one of .*'reference'.*got '{backend}'"):
        torch.ops.pykernels.attention(*_args(q, q, q), backend)


def test_reference_dropout_keeps_its_rate_under_a_bfloat16_default_dtype():
    """The reference's keep-masks are drawn in float32 whatever torch's default dtype: drawn in a bfloat16 default,
    p = 0.1 kept 0.8984 of the scores (rand's 8-bit grid), so every output was 0.2% low (8 sigma at 2^21 keys)."""
    S, p = 2 ** 21, 0.1
    q, k, v = (torch.ones(1, 1, n, 8, dtype=torch.float64) for n in (1, S, S))  # (float32 sums 2^21 terms to 1%)
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, S], dtype=torch.int32)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (T, H, E)
    try:
        outs = [pykernels.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="reference"),
                pykernels.functional.varlen_attention(*packed, cu_q, cu_k, 1, S, dropout_p=p, backend="reference"),
                attn_ops.attention_op(*_args(*packed, dropout_p=p, seed=torch.tensor([7]), cu=(cu_q, cu_k),
                                             maxlen=(1, S)), "reference")[0]]
    finally:
        torch.set_default_dtype(default)
    for out in outs:  # E[out] = 1 (the rescaled keep rate)
        assert abs(out.double().mean().item() - 1) < 1e-3, out.mean().item()

"""pykernels.functional.linear_cross_entropy / nn.LinearCrossEntropyLoss: against cross_entropy(linear(...)) in
float64 for every option, gradients of input, weight and bias, odd N/H/V, ignored rows, opcheck, compile parity,
no N x V allocation, drop-in module, and the Triton kernels under the interpreter (fp32/fp16: the interpreter's bf16
tl.dot is wrong) and compiled for sm_80/sm_90."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels.functional import linear_cross_entropy as _functional_lce
from pykernels.functional.linear_cross_entropy import _fused_grads
from pykernels.ops import linear_cross_entropy as lce_ops
from pykernels.reference import linear_cross_entropy as ref
from pykernels.testing import assert_error_rule, max_abs_err

from conftest import FUZZ_SCALE, assert_spill_budget, run_script_compiled
from conftest import require_backend as _require_backend

# "cpu" is the cpu backend as the functional layer runs it: float32/float64 mean/sum calls that need a gradient take
# the fused path (gradients in the forward); "cpu-split" is the same backend with fused=False (its recomputing
# backward, the launch logic shared with Triton and CUDA).
BACKENDS = [pytest.param("reference", "cpu", id="reference"), pytest.param("triton", "cpu", id="triton-interp"),
            pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
            pytest.param("cpu-split", "cpu", id="cpu-split"), pytest.param("cpu", "cpu", id="cpu")]
# "triton-fused": the triton backend with fused=True (gradients in the forward: cuBLAS GEMMs around a Triton row
# kernel; automatic calls do not take it until it is measured faster)
FUSED_BACKENDS = [pytest.param("triton-fused", "cpu", id="triton-fused-interp"),
                  pytest.param("triton-fused", "cuda", id="triton-fused-cuda", marks=pytest.mark.gpu)]


def _split(backend):
    """(backend name, the functional's ``fused``) of a test backend."""
    return {"cpu-split": ("cpu", False), "triton-fused": ("triton", True)}.get(backend, (backend, None))


def linear_cross_entropy(*args, backend=None, **kw):
    name, fused = _split(backend)
    return _functional_lce(*args, backend=name, fused=fused, **kw)


def require_backend(backend, device):
    _require_backend(_split(backend)[0], device)


def _op(x, W, b, t, w, ii, red, eps, zl, sc, backend):
    """The autograd-level op as the functional layer calls it (fused_grads from the leaves that require grad)."""
    name, fused = _split(backend)
    return lce_ops.linear_cross_entropy_op(x, W, b, t, w, ii, red, eps, zl, sc, name,
                                           _fused_grads(fused, name, x, W, b, red))


def _dtypes(backend, device):
    if backend == "reference":
        return [torch.float64]
    if backend in ("cpu", "cpu-split"):
        return [torch.float64, torch.float32, torch.bfloat16]
    if backend == "cuda":  # 16-bit only (fp32 goes to triton: tests/test_linear_cross_entropy_cuda.py)
        return [torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _one_dtype(backend):
    """The dtype of the single-dtype tests: the most precise one the backend takes."""
    return {"reference": torch.float64, "triton": torch.float32, "cuda": torch.float16, "cpu": torch.float32,
            "cpu-split": torch.float32, "triton-fused": torch.float32}[backend]


def _tol(dtype):
    """Absolute and relative tolerance of the single-case tests against a float64 torch expectation."""
    return dict(atol=1e-4, rtol=1e-4) if dtype in (torch.float32, torch.float64) else dict(atol=3e-2, rtol=3e-2)


def _rule_dtype(dtype):
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _make(N, H, V, dtype, device, bias, weighted, ignore=True, scale=0.4):
    x = torch.randn(N, H, dtype=torch.float64, device=device)
    W = torch.randn(V, H, dtype=torch.float64, device=device) * (scale / H ** 0.5) * 4
    b = torch.randn(V, dtype=torch.float64, device=device) if bias else None
    w = (torch.rand(V, dtype=torch.float64, device=device) + 0.5) if weighted else None
    t = torch.randint(0, V, (N,), device=device)
    if ignore:
        t[::3] = -100
    # inputs rounded to the tested dtype once, so the float64 oracle sees exactly the same numbers
    x, W = x.to(dtype).double(), W.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    w = None if w is None else w.to(dtype).double()
    return x, W, b, w, t


def _like(w, x):
    """The class weight in the logits' dtype, as torch wants it with class-index targets (_make rounded it)."""
    return None if w is None else w.to(x.dtype)


def _oracle(x, W, b, t, w, reduction, ignore_index, eps, zl, softcap):
    """pykernels.functional.cross_entropy(linear(...)) (the plain CE's semantics incl. z_loss) with softcap."""
    z = F.linear(x, W, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return pykernels.functional.cross_entropy(z, t, weight=_like(w, z), reduction=reduction,
                                              ignore_index=-100 if ignore_index is None else ignore_index,
                                              label_smoothing=eps, z_loss=zl, backend="reference")


def _run(fn, leaves, g):
    leaves = [a.detach().clone().requires_grad_() for a in leaves]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [a.grad for a in leaves]


# ---------------------------------------------------------------------------------------------------------
# The float64 contract against torch itself (reference backend, every option).

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,weighted,eps,zl,softcap,ii", [
    (False, False, 0.0, 0.0, 0.0, None), (True, True, 0.1, 0.0, 0.0, None), (True, False, 0.3, 1e-2, 0.0, -100),
    (False, True, 0.0, 1e-3, 4.0, 5), (True, True, 0.2, 1e-3, 2.5, -7)])
def test_reference_equals_linear_then_cross_entropy_float64(reduction, bias, weighted, eps, zl, softcap, ii):
    x, W, b, w, t = _make(9, 13, 31, torch.float64, "cpu", bias, weighted)
    if ii is not None and ii != -100:
        t[t == -100] = ii  # 5: an ignore_index that is also a valid class
    leaves = [x, W] + ([b] if bias else [])
    g = torch.randn(9 if reduction == "none" else (), dtype=torch.float64)

    def ours(x, W, b=None):
        return linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction, ignore_index=ii,
                                    label_smoothing=eps, z_loss=zl, softcap=softcap, backend="reference")

    def theirs(x, W, b=None):
        return _oracle(x, W, b, t, w, reduction, ii, eps, zl, softcap)

    (lo, go), (lt, gt) = _run(ours, leaves, g), _run(theirs, leaves, g)
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    for a, c in zip(go, gt):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    if zl or softcap:
        return
    # torch expresses the call: the oracle of every kernel test must be torch's own loss and gradients, or a wrong
    # oracle would only be compared with the (pykernels) reference built on the same cross-entropy formulas

    def torch_lce(x, W, b=None):
        return F.cross_entropy(F.linear(x, W, b), t, weight=w, reduction=reduction,
                               ignore_index=-100 if ii is None else ii, label_smoothing=eps)

    lc, gc = _run(torch_lce, leaves, g)
    for a, c in zip([lt] + gt, [lc] + gc):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13 has its own
        native = F.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction, ignore_index=ii,
                                        label_smoothing=eps)
        torch.testing.assert_close(lo, native, rtol=1e-12, atol=1e-12)


def test_torch_conventions_k_dim_probabilities_unbatched():
    """torch's shapes: unbatched input, K-dimensional weight, probability targets (reference backend)."""
    H, V = 6, 11
    x1, W = torch.randn(H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    t0 = torch.tensor(3)
    torch.testing.assert_close(linear_cross_entropy(x1, W, t0), F.cross_entropy(F.linear(x1, W), t0))
    xk, Wk, bk = torch.randn(4, H, dtype=torch.float64), torch.randn(V, 2, H, dtype=torch.float64), \
        torch.randn(V, 2, dtype=torch.float64)
    tk = torch.randint(0, V, (4, 2))
    zk = F.linear(xk, Wk.reshape(-1, H), bk.reshape(-1)).reshape(4, V, 2)
    torch.testing.assert_close(linear_cross_entropy(xk, Wk, tk, linear_bias=bk, reduction="none"),
                               F.cross_entropy(zk, tk, reduction="none"))
    p = torch.softmax(torch.randn(4, V, dtype=torch.float64), 1)
    xp = torch.randn(4, H, dtype=torch.float64)
    torch.testing.assert_close(linear_cross_entropy(xp, W, p, label_smoothing=0.1),
                               F.cross_entropy(F.linear(xp, W), p, label_smoothing=0.1))
    with pytest.raises(ValueError, match="ignore_index"):
        linear_cross_entropy(xp, W, p, ignore_index=-100)
    if hasattr(F, "linear_cross_entropy"):
        torch.testing.assert_close(linear_cross_entropy(xk, Wk, tk, linear_bias=bk),
                                   F.linear_cross_entropy(xk, Wk, tk, linear_bias=bk))


# ---------------------------------------------------------------------------------------------------------
# Kernels (Triton under the interpreter; the same on CUDA in the GPU tier).

CASES = [  # N, H, V, bias, weighted, eps, zl, softcap, reduction
    (13, 21, 37, False, False, 0.0, 0.0, 0.0, "mean"),
    (17, 40, 70, True, True, 0.1, 1e-3, 0.0, "none"),
    (5, 19, 53, True, False, 0.2, 0.0, 5.0, "sum"),
    (33, 17, 29, False, True, 0.0, 1e-2, 3.0, "mean"),
]


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[8]}")
def test_kernels_against_float64_oracle(backend, device, case):
    require_backend(backend, device)
    N, H, V, bias, weighted, eps, zl, sc, reduction = case
    for dtype in _dtypes(backend, device):
        x, W, b, w, t = _make(N, H, V, dtype, device, bias, weighted)
        leaves = [x, W] + ([b] if bias else [])
        g = torch.rand(N if reduction == "none" else (), dtype=torch.float64, device=device) + 0.5

        def ours(x, W, b=None):
            return linear_cross_entropy(x, W, t, linear_bias=b, weight=_like(w, x), reduction=reduction,
                                        label_smoothing=eps, z_loss=zl, softcap=sc, backend=backend)

        def torch_at(x, W, b=None):  # the plain-PyTorch oracle at this dtype: the baseline of the 2x rule
            return _oracle(x, W, b, t, w, reduction, None, eps, zl, sc)

        lr, gr = _run(torch_at, leaves, g)
        lo, go = _run(ours, [a.to(dtype) for a in leaves], g)
        lb, gb = _run(torch_at, [a.to(dtype) for a in leaves], g) if dtype != torch.float64 else (lr, gr)
        assert lo.dtype == dtype
        assert_error_rule(f"loss {dtype}", lo, lr, lb)
        for name, a, r, c in zip(("d_input", "d_weight", "d_bias"), go, gr, gb):
            assert a.dtype == dtype
            assert_error_rule(f"{name} {dtype}", a, r, c)


@pytest.mark.parametrize("backend,device", BACKENDS[1:])
def test_backward_in_several_vocab_chunks_and_splits(backend, device, monkeypatch):
    """A small workspace budget: the backward walks the vocabulary in several chunks (and the forward combines
    several vocabulary splits); the result must not depend on it."""
    require_backend(backend, device)
    from pykernels.ops import linear_cross_entropy_launch as tk
    dtype = _one_dtype(backend)
    # interpreter (16-row blocks): 10 token blocks in 2 groups, 32-column chunks; GPU: 256-column chunks, 3 of them
    N, V, cols = (150, 150, 32) if device == "cpu" else (300, 700, 256)
    x, W, b, w, t = _make(N, 16, V, dtype, device, True, True)
    t[:40] = -100  # whole token blocks of ignored rows: their gradient tiles are skipped (exactly zero)
    leaves = [a.to(dtype) for a in (x, W, b)]

    def ours(x, W, b):
        return linear_cross_entropy(x, W, t, linear_bias=b, weight=_like(w, x), label_smoothing=0.1, backend=backend)

    g = torch.tensor(1.0, device=device)
    one = _run(ours, leaves, g)
    monkeypatch.setattr(tk, "CHUNK_BYTES", N * x.element_size() * cols)  # the last chunk partial
    several = _run(ours, leaves, g)
    assert max_abs_err(one[0], several[0]) == 0.0
    # dW and db are per-chunk exact; dX sums the chunks' fp32 products in another order, rounded once
    rel = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for a, c in zip(one[1], several[1]):
        assert max_abs_err(a, c) <= rel * max(1.0, float(c.abs().max()))
    lr, gr = _run(lambda x, W, b: _oracle(x, W, b, t, w, "mean", None, 0.1, 0.0, 0.0), [x, W, b], g)
    lb, gb = _run(lambda x, W, b: _oracle(x, W, b, t, w, "mean", None, 0.1, 0.0, 0.0), leaves, g)
    for a, r, c in zip(several[1], gr, gb):
        assert_error_rule("chunked", a, r, c)


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
def test_ignored_rows_and_all_ignored_mean(backend, device):
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    x = torch.randn(7, 10, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(19, 10, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 19, (7,), device=device)
    t[[0, 3, 4]] = -100
    loss = linear_cross_entropy(x, W, t, label_smoothing=0.1, z_loss=1e-3, backend=backend)
    loss.backward()
    assert bool((x.grad[[0, 3, 4]] == 0).all()), "ignored rows must get exactly zero gradient"
    assert bool(torch.isfinite(x.grad).all()) and bool((x.grad[[1, 2, 5, 6]] != 0).any())
    x.grad = None
    W.grad = None
    t.fill_(-100)
    loss = linear_cross_entropy(x, W, t, backend=backend)
    assert torch.isnan(loss)  # 0/0 as PyTorch
    loss.backward()
    assert bool((x.grad == 0).all()) and bool((W.grad == 0).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batched_and_unbatched_input_and_lse(backend, device):
    """(B, T, H) input with (B, T) target (pykernels extension) and (H) input with () target (torch's)."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    x = torch.randn(2, 5, 12, device=device, dtype=dtype)
    W = (torch.randn(23, 12, device=device) * 0.3).to(dtype)
    t = torch.randint(0, 23, (2, 5), device=device)
    loss, lse = linear_cross_entropy(x, W, t, reduction="none", softcap=3.0, return_lse=True, backend=backend)
    z = 3.0 * torch.tanh(F.linear(x.double(), W.double()) / 3.0)
    assert loss.shape == (2, 5) and lse.shape == (2, 5)
    assert_error_rule("loss", loss, F.cross_entropy(z.movedim(-1, 1), t, reduction="none"), dtype=_rule_dtype(dtype))
    assert_error_rule("lse", lse, torch.logsumexp(z, -1), dtype=torch.float32)
    one = linear_cross_entropy(x[0, 0], W, t[0, 0], softcap=3.0, backend=backend)
    assert one.shape == () and abs(float(one) - float(loss[0, 0])) <= (1e-5 if dtype.itemsize > 2 else 1e-2)


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
def test_non_contiguous_and_degenerate_shapes(backend, device):
    """Strided input / weight (a transposed copy, every other column: copied to rows by rows_contiguous), N = 1,
    V = 1, H = 1."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    for N, H, V in ((6, 10, 21), (1, 7, 5), (4, 3, 1), (5, 1, 9)):
        x = torch.randn(H, N, device=device, dtype=dtype).t()            # non-contiguous rows
        W = torch.randn(V, 2 * H, device=device, dtype=dtype)[:, ::2]    # strided along H
        b = torch.randn(2 * V, device=device, dtype=dtype)[::2]
        t = torch.randint(0, V, (N, 2), device=device)[:, 1]             # a strided target
        leaves = [x, W, b]
        g = torch.tensor(1.0, dtype=torch.float64, device=device)

        def ours(x, W, b):
            return linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1, backend=backend)

        lr, gr = _run(lambda x, W, b: _oracle(x, W, b, t, None, "mean", None, 0.1, 0.0, 0.0),
                      [a.double() for a in leaves], g)
        lo, go = _run(ours, leaves, g)
        assert_error_rule(f"loss {N}x{H}x{V}", lo, lr, dtype=_rule_dtype(dtype))
        for name, a, r in zip(("d_input", "d_weight", "d_bias"), go, gr):
            assert_error_rule(f"{name} {N}x{H}x{V}", a, r, dtype=_rule_dtype(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
def test_row_padded_input_and_weight(backend, device):
    """x and W as column slices of wider tensors (unit stride along H, padded rows, row strides unlike each other and
    H): rows_contiguous keeps such views, so the kernels must read each with its own row stride. (_run clones its
    leaves, which makes such views contiguous: here the views are taken of the leaves.)"""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    N, H, V = 9, 12, 21
    xb, Wb = torch.randn(N, H + 3, device=device), torch.randn(V, H + 7, device=device) * 0.3
    b, t = torch.randn(V, device=device), torch.randint(0, V, (N,), device=device)
    got = []
    for dt, fn in ((dtype, lambda x, W, b: linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1,
                                                                 backend=backend)),
                   (torch.float64, lambda x, W, b: _oracle(x, W, b, t, None, "mean", None, 0.1, 0.0, 0.0))):
        leaves = [a.detach().to(dt, copy=True).requires_grad_() for a in (xb, Wb, b)]
        x, W = leaves[0][:, :H], leaves[1][:, :H]
        assert x.stride() == (H + 3, 1) and W.stride() == (H + 7, 1)
        loss = fn(x, W, leaves[2])
        loss.backward()
        got.append([loss.detach()] + [a.grad for a in leaves])
    for name, a, r in zip(("loss", "d_input", "d_weight", "d_bias"), *got):
        assert_error_rule(name, a, r, dtype=_rule_dtype(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS[1:] + FUSED_BACKENDS)
def test_token_block_whose_targets_have_zero_weight(backend, device):
    """A whole token block (16 rows under the interpreter) whose targets all have class weight 0, so the target
    coefficient is 0 in every row, while smoothing and z_loss still give every logit a gradient: such a block is not
    dead (only all-ignored blocks are skipped)."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    N, H, V = 16, 8, 20
    x, W = torch.randn(N, H, device=device, dtype=dtype), torch.randn(V, H, device=device, dtype=dtype) * 0.3
    t = torch.randint(0, 10, (N,), device=device)
    w = torch.ones(V, device=device, dtype=dtype)
    w[:10] = 0.0  # every target's weight
    g = torch.tensor(1.0, device=device)
    lo, go = _run(lambda x, W: linear_cross_entropy(x, W, t, weight=w, reduction="sum", label_smoothing=0.2,
                                                    z_loss=1e-2, backend=backend), [x, W], g)
    lr, gr = _run(lambda x, W: _oracle(x, W, None, t, w, "sum", None, 0.2, 1e-2, 0.0), [x.double(), W.double()], g)
    assert_error_rule("loss", lo, lr, dtype=_rule_dtype(dtype))
    for name, a, r in zip(("d_input", "d_weight"), go, gr):
        assert float(r.abs().max()) > 1e-3
        assert_error_rule(name, a, r, dtype=_rule_dtype(dtype))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cpu" and p.values[0] != "reference"])
def test_half_backward_in_several_vocab_chunks(backend, device, monkeypatch):
    """fp16 on the CPU: the chunked backward runs fp32 GEMMs on converted operands (gemm_dtype) and writes each
    chunk's dW rows from there; several chunks must land each at its own rows (the fp32 test takes the other
    branch)."""
    require_backend(backend, device)
    from pykernels.ops import linear_cross_entropy_launch as launch
    N, H, V = 20, 16, 50
    x, W = torch.randn(N, H).half(), (torch.randn(V, H) * 0.3).half()
    t = torch.randint(0, V, (N,))
    monkeypatch.setattr(launch, "CHUNK_BYTES", 1)  # the smallest chunks the launcher makes: several, the last partial
    g = torch.tensor(1.0)
    lo, go = _run(lambda x, W: linear_cross_entropy(x, W, t, reduction="sum", backend=backend), [x, W], g)
    lr, gr = _run(lambda x, W: _oracle(x, W, None, t, None, "sum", None, 0.0, 0.0, 0.0), [x.double(), W.double()], g)
    lt, gt = _run(lambda x, W: F.cross_entropy(F.linear(x, W), t, reduction="sum"), [x, W], g)
    assert_error_rule("loss", lo, lr, lt)
    for name, a, r, c in zip(("d_input", "d_weight"), go, gr, gt):
        assert_error_rule(name, a, r, c)


@pytest.mark.parametrize("backend,device", BACKENDS[1:] + FUSED_BACKENDS)
@pytest.mark.parametrize("p_y", [0.9, 0.99, 0.999])
def test_confident_target_gradient(backend, device, p_y):
    """softmax(z_y) near 1: the gradient's p_y - 1 is formed in fp32 before rounding (no cancellation)."""
    require_backend(backend, device)
    N, H, V = 8, 16, 40
    rows = torch.arange(N, device=device)
    x = torch.randn(N, H, dtype=torch.float64, device=device) * 0.05
    x[:, :N] = 0.0
    x[rows, rows] = 1.0  # feature n belongs to row n alone
    t = torch.randint(0, V, (N,), device=device)
    W = torch.randn(V, H, dtype=torch.float64, device=device) * 0.05
    # z_y - z_c ~ log(p_y (V - 1) / (1 - p_y)) through row n's own feature, so each row has one confident class
    # (a feature shared by all rows would give every row N equal top logits: p_y ~ 1/N, not confident)
    W[:, :N] = 0.0
    W[t, rows] = float(torch.log(torch.tensor(p_y * (V - 1) / (1 - p_y))))
    for dtype in _dtypes(backend, device):
        xs, Ws = x.to(dtype), W.to(dtype)
        g = torch.tensor(1.0, dtype=torch.float64, device=device)
        f = lambda x, W: _oracle(x, W, None, t, None, "sum", None, 0.0, 0.0, 0.0)  # noqa: E731
        lr, gr = _run(f, [xs.double(), Ws.double()], g)
        lb, gb = _run(f, [xs, Ws], g)
        lo, go = _run(lambda x, W: linear_cross_entropy(x, W, t, reduction="sum", backend=backend), [xs, Ws], g)
        assert_error_rule(f"loss {dtype} p_y={p_y}", lo, lr, lb)
        for name, a, r, c in zip(("d_input", "d_weight"), go, gr, gb):
            assert_error_rule(f"{name} {dtype} p_y={p_y}", a, r, c)


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_class_weight_as_torch(backend, device, eps, bad):
    """A NaN / inf weight of a class no target uses: without smoothing dX and dW stay torch's finite ones (the
    coefficient formed g (w_y + eps W / C) with eps = 0 and W = sum of the weights = inf / NaN: 0 * inf made every
    gradient NaN). With smoothing an inf weight gives torch's inf loss, not the NaN of W lse - sum_c w_c z_c."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    W = torch.randn(11, 8, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    t = torch.tensor([1, 2, 3, 4, 5], device=device)
    w = (torch.rand(11, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    w[9] = bad  # class 9: no target
    g = torch.tensor(1.0, dtype=torch.float64, device=device)
    lo, go = _run(lambda x, W: linear_cross_entropy(x, W, t, weight=w, reduction="sum", label_smoothing=eps,
                                                    backend=backend), [x, W], g)
    lr, gr = _run(lambda x, W: F.cross_entropy(F.linear(x, W), t, weight=w.double(), reduction="sum",
                                               label_smoothing=eps), [x.double(), W.double()], g)
    if eps == 0:
        assert bool(lo.isfinite()) and all(bool(a.isfinite().all()) for a in go)
        tol = _tol(dtype)
        torch.testing.assert_close(lo.double(), lr, **tol)
        for a, r in zip(go, gr):
            torch.testing.assert_close(a.double(), r, **tol)
    else:  # NaN: NaN; inf: +inf (the gradients are torch's NaN / inf mix: not compared)
        assert (bool(lo.isnan()) and bool(lr.isnan())) if bad != bad else (lo.item() == lr.item() == float("inf"))


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
def test_nan_input_row_poisons_its_row_as_torch(backend, device):
    """A NaN in an input row makes that row's loss, log-sum-exp and input gradient NaN (every one of its logits
    is NaN) and the weight gradient NaN, as torch's; the other rows' loss and gradient stay finite and equal. The
    CUDA forward's online log-sum-exp skipped tiles with no finite logit and returned lse -inf for such a row."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    gen = torch.Generator().manual_seed(3)
    N, H, V = 6, 16, 300
    x = torch.randn(N, H, generator=gen, dtype=torch.float64)
    W = torch.randn(V, H, generator=gen, dtype=torch.float64) / 4
    x[2] = float("nan")
    x[4, 3] = float("nan")
    t = torch.randint(0, V, (N,), generator=gen)
    x, W, t = x.to(device=device, dtype=dtype), W.to(device=device, dtype=dtype), t.to(device)
    g = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).to(device)
    lo, (gx, gw) = _run(lambda x, W: linear_cross_entropy(x, W, t, reduction="none", backend=backend), [x, W], g)
    lr, (rx, rw) = _run(lambda x, W: F.cross_entropy(F.linear(x, W), t, reduction="none"),
                        [x.double(), W.double()], g)
    _, lse = linear_cross_entropy(x, W, t, reduction="none", return_lse=True, backend=backend)
    tol = _tol(dtype)
    bad = torch.tensor([False, False, True, False, True, False], device=device)
    assert bool(lr[bad].isnan().all()) and bool(rw.isnan().all())  # the test's premise
    torch.testing.assert_close(lo.double(), lr, equal_nan=True, **tol)
    torch.testing.assert_close(lse.double(), torch.logsumexp(F.linear(x.double(), W.double()), 1), equal_nan=True,
                               **tol)
    torch.testing.assert_close(gx.double(), rx, equal_nan=True, **tol)
    assert bool(gw.isnan().all())


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
@pytest.mark.parametrize("masked", [(16, 32), (0, 16)], ids=["inner", "leading"])
def test_minus_inf_bias_masks_whole_tiles_as_torch(backend, device, masked):
    """A bias of -inf masking part of the vocabulary (padding classes): whole logit tiles and splits of -inf, whose
    online log-sum-exp must stay (max -inf, sum 0) instead of exp(-inf - -inf) = NaN. Loss as torch's, and zero
    gradients for the masked classes (mutation review: dropping the kernels' -inf guard passed every test). The
    leading case starts every row's running max at -inf (the fused kernel's guard)."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    gen = torch.Generator().manual_seed(4)
    N, H, V = 8, 16, 48
    x = torch.randn(N, H, generator=gen, dtype=torch.float64)
    W = torch.randn(V, H, generator=gen, dtype=torch.float64) / 4
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    b[masked[0]:masked[1]] = float("-inf")
    t = torch.randint(0, 16, (N,), generator=gen) + (16 if masked[0] == 0 else 0)  # targets never masked
    x, W, b, t = x.to(device=device, dtype=dtype), W.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), \
        t.to(device)
    g = torch.tensor(1.0, dtype=torch.float64, device=device)
    lo, (gx, gw) = _run(lambda x, W: linear_cross_entropy(x, W, t, linear_bias=b, reduction="sum", backend=backend),
                        [x, W], g)
    lr, (rx, rw) = _run(lambda x, W: F.cross_entropy(F.linear(x, W, b.double()), t, reduction="sum"),
                        [x.double(), W.double()], g)
    tol = _tol(dtype)
    assert bool(lo.isfinite()) and bool(gx.isfinite().all()) and bool(gw.isfinite().all())
    torch.testing.assert_close(lo.double(), lr, **tol)
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)
    assert bool((gw[masked[0]:masked[1]] == 0).all())


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_class_weight_with_smoothing_on_every_path(backend, device, reduction):
    """Class weights and label smoothing together with a reduction the fused paths take (the oracle's only case of
    both used reduction "none", which never runs fused: a fused smoothing gradient without the weight passed)."""
    require_backend(backend, device)
    dtype = _one_dtype(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    W = torch.randn(20, 8, generator=gen, dtype=torch.float64) * 0.5
    w = torch.rand(20, generator=gen, dtype=torch.float64) + 0.5
    t = torch.randint(0, 20, (6,), generator=gen)
    g = torch.tensor(1.0, dtype=torch.float64, device=device)
    x, W, w, t = x.to(device, dtype), W.to(device, dtype), w.to(device, dtype), t.to(device)
    lo, go = _run(lambda x, W: linear_cross_entropy(x, W, t, weight=w, label_smoothing=0.3, reduction=reduction,
                                                    backend=backend), [x, W], g)
    lr, gr = _run(lambda x, W: F.cross_entropy(F.linear(x, W), t, weight=w.double(), label_smoothing=0.3,
                                               reduction=reduction), [x.double(), W.double()], g)
    tol = _tol(dtype)
    torch.testing.assert_close(lo.double(), lr, **tol)
    for a, r in zip(go, gr):
        torch.testing.assert_close(a.double(), r, **tol)


def test_triton_fused_accumulates_dw_in_fp32_over_many_row_blocks(monkeypatch):
    """The Triton fused path sums dW and db over its row blocks in fp32 and rounds once: with a row block of one
    token (128 blocks) in fp16, its error stays within 2x torch's one-GEMM fp16 error (summing in fp16 was 2.8x)."""
    require_backend("triton-fused", "cpu")
    monkeypatch.setattr(lce_ops._launch, "fused_block_rows", lambda *a, **k: 1)
    g = torch.Generator().manual_seed(0)
    N, H, V = 128, 8, 20
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)

    def run(fn, dt):
        xs, Ws, bs = (u.to(dt).requires_grad_() for u in (x, W, b))
        fn(xs, Ws, bs).backward()
        return Ws.grad.double(), bs.grad.double()
    ours = run(lambda x, W, b: linear_cross_entropy(x, W, t, linear_bias=b, reduction="sum", backend="triton-fused"),
               torch.float16)
    base = run(lambda x, W, b: F.cross_entropy(F.linear(x, W, b), t, reduction="sum"), torch.float16)
    ref = run(lambda x, W, b: F.cross_entropy(F.linear(x, W, b), t, reduction="sum"), torch.float64)
    for name, o, bs, r in zip(("dW", "db"), ours, base, ref):
        assert_error_rule(f"fused {name}", o, r, bs)


def test_triton_fused_sums_db_over_row_blocks_in_fp32_and_returns_the_operands_dtype():
    """The fused op's db: each row block's column sums are added in fp32, not rounded to fp16 per block (the test
    above has one-row blocks, whose sums are exact in fp16). W = 0, so every row's logits are the bias; rows r and
    r + N/2 have opposite coefficients, so the exact db is 0, and 3-row blocks never pair them: fp16 block sums leave
    ~1e-1. Then the op's contract: dX, dW, db in the operands' dtype (autograd would cast an fp32 dW silently)."""
    require_backend("triton-fused", "cpu")
    fused, _ = lce_ops.FUSED["triton"]
    N, H, V = 128, 4, 16
    x, W, b = torch.randn(N, H).half(), torch.zeros(V, H, dtype=torch.float16), torch.randn(V).half()
    c = (torch.rand(N // 2) + 1.0) * 50
    zero = torch.zeros(N)
    gb = fused(x, W, b, torch.full((N,), -100), None, torch.cat([c, -c]), zero, zero, zero, 0.0, False, 3,
               False, False, True)[6]
    assert gb.dtype == torch.float16 and gb.shape == (V,)
    assert gb.double().abs().max().item() < 1e-3, gb
    N, H, V = 5, 3, 7
    x, W, b = torch.randn(N, H).half(), torch.randn(V, H).half(), torch.randn(V).half()
    got = fused(x, W, b, torch.randint(0, V, (N,)), None, *(torch.rand(N) for _ in range(4)), 0.0, False, 2,
                True, True, True)
    assert [(g.dtype, tuple(g.shape)) for g in got[4:]] == [(torch.float16, (N, H)), (torch.float16, (V, H)),
                                                          (torch.float16, (V,))]


def test_label_smoothing_of_one_is_in_range():
    """label_smoothing = 1.0 is valid (torch takes [0, 1]): the loss is the uniform target's."""
    x, W, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 0])
    want = F.cross_entropy(F.linear(x, W), t, label_smoothing=1.0)
    for backend in ("reference", "cpu"):
        if backend == "cpu":
            require_backend("cpu", "cpu")
        torch.testing.assert_close(linear_cross_entropy(x, W, t, label_smoothing=1.0, backend=backend), want)


@pytest.mark.gpu
def test_cuda_memory_within_model_and_int64_offsets(monkeypatch):
    """On a GPU: fwd+bwd allocate at most the cost model's workspace (+ cuBLAS slack) beyond inputs and
    gradients; and a weight with more than 2**31 elements (int64 offsets) gives the same loss as torch."""
    require_backend("triton", "cuda")
    from pykernels.ops import linear_cross_entropy_launch as tk
    # The default chunk (256 MiB) holds this problem's whole dlogits (125 MiB): bound it to a quarter of that so
    # that "less than the logits" is what is measured.
    monkeypatch.setattr(tk, "CHUNK_BYTES", 32 << 20)
    N, H, V = 2048, 1024, 32000
    x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    linear_cross_entropy(x, W, t, backend="triton").backward()  # autotune outside the measurement
    x.grad = W.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(x, W, t, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 2 * (N * H + V * H)  # minus the two gradients
    model = lce_ops.cost_model(N, H, V, torch.bfloat16, chunk_bytes=tk.CHUNK_BYTES)["workspace_bytes"]
    assert extra <= model + (64 << 20), f"extra {extra / 2**20:.1f} MiB > model {model / 2**20:.1f} MiB + 64"
    assert extra < N * V * 2, "as much as the logits"
    del x, W
    Nb, Hb, Vb = 64, 8200, 262144  # V x H > 2**31
    W = (torch.randn(Vb, Hb, device="cuda", dtype=torch.bfloat16) * 0.01)
    x = torch.randn(Nb, Hb, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(Vb - 1000, Vb, (Nb,), device="cuda")  # targets in the rows past 2**31 elements
    xf = x.float().requires_grad_()
    ref_ = F.cross_entropy(F.linear(xf, W.float()), t, reduction="none")
    (gref,) = torch.autograd.grad(ref_.sum(), xf)
    backends = ["triton"] + (["cuda"] if pykernels.available_backends("cuda")["cuda"] is None else [])
    for backend in backends:  # the CUDA kernels' offsets too (partials and dlogits: the backward)
        xb = x.detach().clone().requires_grad_()
        ours = linear_cross_entropy(xb, W, t, backend=backend, reduction="none")
        assert max_abs_err(ours, ref_) <= 0.05, backend
        ours.sum().backward()
        assert max_abs_err(xb.grad, gref) <= 0.05 * float(gref.abs().max()), backend


def test_bad_arguments_name_the_argument():
    x, W, t = torch.randn(4, 6), torch.randn(9, 6), torch.randint(0, 9, (4,))
    cases = [
        (dict(input=x, linear_weight=torch.randn(9, 5), target=t), ValueError, "in_features"),
        (dict(input=x, linear_weight=W.double(), target=t), TypeError, "linear_weight"),
        (dict(input=x, linear_weight=torch.randn(9), target=t), ValueError, "linear_weight"),
        (dict(input=x, linear_weight=W, target=t[:3]), ValueError, "target"),
        (dict(input=x, linear_weight=W, target=t.int()), TypeError, "target"),
        (dict(input=x, linear_weight=W, target=t, linear_bias=torch.randn(8)), ValueError, "linear_bias"),
        (dict(input=x, linear_weight=W, target=t, weight=torch.rand(8)), ValueError, "weight"),
        (dict(input=x, linear_weight=W, target=t, reduction="avg"), ValueError, "reduction"),
        (dict(input=x, linear_weight=W, target=t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(input=x, linear_weight=W, target=t, z_loss=-1.0), ValueError, "z_loss"),
        (dict(input=x, linear_weight=W, target=t, softcap=float("inf")), ValueError, "softcap"),
        (dict(input=x.long(), linear_weight=W, target=t), TypeError, "input"),
    ]
    for kwargs, exc, word in cases:
        x_, W_, t_ = kwargs.pop("input"), kwargs.pop("linear_weight"), kwargs.pop("target")
        with pytest.raises(exc, match=word):
            linear_cross_entropy(x_, W_, t_, **kwargs)
    bad = t.clone()
    bad[2] = 9
    with pytest.raises(IndexError, match="out of bounds"):
        linear_cross_entropy(x, W, bad, backend="triton" if pykernels.available_backends("cpu")["triton"] is None
                             else "reference")


def test_kernel_and_autograd_ops_check_their_arguments():
    """torch.ops.pykernels.* are callable directly: the autograd-level op checks its backend (a bare KeyError before)
    and the class weight it indexes with the targets (an IndexError before); the Triton kernel ops check their
    operands as the C++ ones do, before a kernel reads out of bounds (1-element coefficients for 4 rows segfaulted
    the fused kernel under the interpreter)."""
    x, W, t = torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 3, 6, 2])
    for backend in ("reference", "cpu", "triton"):
        if pykernels.available_backends("cpu")[backend] is None:
            with pytest.raises(ValueError, match="pykernels::linear_cross_entropy: weight must have shape"):
                lce_ops.linear_cross_entropy_op(x, W, None, t, torch.rand(2), -100, lce_ops.MEAN, 0.0, 0.0, 0.0,
                                                backend)
    with pytest.raises(ValueError, match="backend must be one of .*got 'bogus'"):
        lce_ops.linear_cross_entropy_op(x, W, None, t, None, -100, lce_ops.MEAN, 0.0, 0.0, 0.0, "bogus")
    require_backend("triton", "cpu")
    z = torch.zeros(1)
    fused = torch.ops.pykernels.linear_cross_entropy_fused_triton
    with pytest.raises(ValueError, match="coef_p0 must have shape"):
        fused(x, W, None, t, None, z, z, z, z, 0.0, False, 2, True, True, False)
    c = torch.zeros(4)
    for args, name in (((x, W, None, t, None, c, c, c, c, 0.0, False, 0, True, True, False), "block_rows"),
                       ((x, W, None, t, None, c, c, c, c, 0.0, False, 2, True, True, True), "bias_grad")):
        with pytest.raises(ValueError, match=name):
            fused(*args)
    fwd, bwd = lce_ops.KERNELS["triton"]
    for args, name in (((x, torch.randn(7, 5), None, t, None), "linear_weight"), ((x, W, None, t[:2], None), "target"),
                       ((x, W, torch.randn(2), t, None), "linear_bias"), ((x, W, None, t, torch.rand(7).double()),
                                                                          "weight"),
                       ((x.long(), W, None, t, None), "input"),
                       # read at stride 1: a strided view was read as its first 7 elements of storage
                       ((x, W, torch.randn(14)[::2], t, None), "linear_bias must be contiguous"),
                       ((x, W, None, t, torch.rand(14)[::2]), "weight must be contiguous")):
        with pytest.raises(RuntimeError, match=f"linear_cross_entropy_fwd_triton: {name}"):
            fwd(*args, 0, 0.0, False)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        fused(x, W, None, t, torch.rand(14)[::2], c, c, c, c, 0.0, False, 2, True, True, False)
    with pytest.raises(ValueError, match="linear_cross_entropy_bwd_triton: m must have shape"):
        bwd(x, W, None, t, None, z, c, c, c, c, 0, 0.0, False, True, True, False)
    for cap in (-1.0, float("nan")):  # (a NaN passes a `softcap < 0` check)
        with pytest.raises(ValueError, match="softcap must be >= 0"):
            fwd(x, W, None, t, None, 0, cap, False)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_options_and_dtypes_as_torch(backend):
    """Options of a wrong type are refused naming them (a str softcap / z_loss failed on a bare "'>=' not
    supported"; return_lse="no" and fused="no" were taken as True); vocab_start / vocab_size without group= (they
    were ignored: the full vocabulary's loss); a class weight of another dtype than the logits with class-index
    targets, and float8 input, raise on every backend as torch."""
    x, W, t = torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 3, 6, 2])
    lce = pykernels.functional.linear_cross_entropy
    cases = [(dict(softcap="a"), TypeError, "softcap must be a float"),
             (dict(z_loss=None), TypeError, "z_loss must be a float"),
             (dict(label_smoothing="a"), TypeError, "label_smoothing must be a float"),
             (dict(return_lse="no"), TypeError, "return_lse must be a bool"),
             (dict(fused="no"), TypeError, "fused must be a bool or None"),
             (dict(vocab_start=3), ValueError, "vocab_start / vocab_size .* need group="),
             (dict(vocab_size=100), ValueError, "vocab_start / vocab_size .* need group="),
             (dict(weight=torch.ones(7, dtype=torch.float64)), TypeError, "weight has dtype"),
             (dict(weight=torch.ones(7, dtype=torch.float16)), TypeError, "weight has dtype")]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lce(x, W, t, backend=backend, **kw)
    with pytest.raises(TypeError, match="input must be floating point .*float8"):
        lce(x.to(torch.float8_e4m3fn), W.to(torch.float8_e4m3fn), t, backend=backend)
    # probability targets promote with the weight (as torch); under autocast the weight is cast as the logits are
    p = torch.softmax(torch.randn(4, 7), 1)
    w64 = torch.rand(7, dtype=torch.float64) + 0.5
    torch.testing.assert_close(lce(x, W, p, weight=w64, backend=backend), F.cross_entropy(x @ W.T, p, weight=w64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = torch.rand(7).bfloat16() + 0.5
        got = lce(x, W, t, weight=w, backend=backend)
        assert got.dtype == torch.float32
        with pytest.raises(TypeError, match="weight has dtype"):
            lce(x, W, t, weight=w64, backend=backend)


def test_weight_that_requires_grad_gets_its_gradient():
    """The kernels treat the class weight as a constant: a weight that requires grad goes to the reference,
    visibly, and gets the gradient of the weighted mean."""
    require_backend("cpu", "cpu")
    x, W, t = torch.randn(7, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, 4, dtype=torch.float64), \
        torch.randint(0, 5, (7,))
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    with pykernels.use_backend("cpu"):
        loss = linear_cross_entropy(x, W, t, weight=w)
    ran, skipped = pykernels.last_dispatch["linear_cross_entropy"]
    assert ran == "reference" and "weight" in skipped["cpu"]
    loss.backward()
    wt = w.detach().clone().requires_grad_()
    nll = -torch.log_softmax(x.detach() @ W.T, 1).gather(1, t[:, None])[:, 0]
    (torch.sum(wt[t] * nll) / torch.sum(wt[t])).backward()  # torch's weighted mean, written out
    torch.testing.assert_close(w.grad, wt.grad)
    with pytest.raises(pykernels.BackendUnavailableError, match="weight"):
        linear_cross_entropy(x, W, t, weight=w, backend="cpu")


def test_uint8_targets_and_non_tensor_arguments():
    x, W = torch.randn(5, 4), torch.randn(300, 4)
    t = torch.randint(0, 255, (5,), dtype=torch.uint8)
    t[1] = 255  # a valid class of 300, not ignore_index -1 (uint8's 255 == -1)
    torch.testing.assert_close(linear_cross_entropy(x, W, t, ignore_index=-1),
                               F.cross_entropy(x @ W.T, t.long(), ignore_index=-1))
    with pytest.raises(IndexError, match="out of bounds"):
        linear_cross_entropy(x, W[:200], t, ignore_index=-1)
    for args, name in (([[1.0]], W, t), "input"), ((x, [[1.0]], t), "linear_weight"), ((x, W, [1]), "target"):
        with pytest.raises(TypeError, match=name):
            linear_cross_entropy(*args)


def test_backend_choice():
    x, W, t = torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 5, (3,))
    linear_cross_entropy(x, W, t)
    ran, skipped = pykernels.last_dispatch["linear_cross_entropy"]
    cpu = pykernels.available_backends("cpu")["cpu"] is None
    assert ran == ("cpu" if cpu else "reference") or (ran == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    if not cpu:
        with pytest.raises(pykernels.BackendUnavailableError, match="rebuild"):
            linear_cross_entropy(x, W, t, backend="cpu")
    with pytest.raises(pykernels.BackendUnavailableError):
        linear_cross_entropy(x, W, t, backend="cuda")
    if pykernels.available_backends("cpu")["triton"] is None:
        with pytest.raises(pykernels.BackendUnavailableError, match="probability"):
            linear_cross_entropy(x, W, torch.softmax(torch.randn(3, 5), 1), backend="triton")


# ---------------------------------------------------------------------------------------------------------
# Operator-level checks.

def _op_args(device, dtype, reduction, bias=True, weighted=True):
    x = torch.randn(6, 9, device=device, dtype=dtype)
    W = torch.randn(21, 9, device=device, dtype=dtype) * 0.5
    b = torch.randn(21, device=device, dtype=dtype) if bias else None
    t = torch.randint(0, 21, (6,), device=device)
    t[2] = -100
    w = (torch.rand(21, device=device) + 0.5).to(lce_ops.acc_dtype(dtype)) if weighted else None
    return x, W, b, t, w, -100, reduction, 0.1, 1e-3, 2.0


@pytest.mark.parametrize("backend,device", BACKENDS + FUSED_BACKENDS)
def test_opcheck(backend, device):
    require_backend(backend, device)
    # the cuda kernel ops take fp16/bf16 only (fp32 calls go to Triton in the functional layer, not in the op)
    dtype = {"reference": torch.float64, "cuda": torch.float16}.get(backend, torch.float32)
    # (AOT tracing sees the op and its backward, pykernels::linear_cross_entropy_backward, as opaque ops with fake
    # implementations: no triton_op body runs on fake tensors, which the interpreter cannot do)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    name, fused = _split(backend)
    for red in (lce_ops.NONE, lce_ops.MEAN, lce_ops.SUM):
        for bias in (False, True):
            x, W, b, *rest = _op_args(device, dtype, red, bias, weighted=bias)
            x, W, b = x.requires_grad_(), W.requires_grad_(), None if b is None else b.requires_grad_()
            grads = _fused_grads(fused, name, x, W, b, red)
            assert bool(grads) == (backend in ("cpu", "triton-fused") and red != lce_ops.NONE)
            torch.library.opcheck(torch.ops.pykernels.linear_cross_entropy.default,
                                  (x, W, b, *rest, name, grads), test_utils=utils)
    if backend == "cpu":  # the C++ kernel ops themselves (the CUDA ones: tests/test_linear_cross_entropy_cuda.py)
        x, W, b, t, w, *_ = _op_args(device, torch.float64, lce_ops.MEAN)
        pk = torch.ops.pykernels
        c = [torch.rand(x.shape[0], dtype=torch.float64) for _ in range(4)]
        for block_rows, grads in ((2, (True, True, True)), (6, (False, True, False)), (100, (True, False, True))):
            torch.library.opcheck(pk.linear_cross_entropy_fused.default,
                                  (x, W, b, t, w, *c, 2.0, True, block_rows, *grads))
        torch.library.opcheck(pk.linear_cross_entropy_partials.default, (x, W, b, t, w, 0, 2.0, True, 3))
        m, s, *_ = pk.linear_cross_entropy_partials(x, W, b, t, w, 0, 2.0, True, 1)
        c = [torch.rand(x.shape[0], dtype=torch.float64) for _ in range(3)]
        dl = torch.empty(x.shape[0], 5, dtype=torch.float64)
        db = torch.zeros(1, 5, dtype=torch.float64)
        torch.library.opcheck(pk.linear_cross_entropy_dlogits.default,
                              (x, W, b, t, w, m[0], s[0].log(), *c, 0, 2.0, True, 3, dl, db))
    if backend == "triton-fused":  # the Triton fused op itself (its body cannot run on fake tensors interpreted)
        x, W, b, t, w, *_ = _op_args(device, dtype, lce_ops.MEAN)
        c = [torch.rand(x.shape[0], device=device) for _ in range(4)]
        u = ("test_schema",) if device == "cpu" else ("test_schema", "test_faketensor")
        for block_rows, grads in ((2, (True, True, True)), (100, (False, True, False))):
            torch.library.opcheck(lce_ops.FUSED["triton"][0], (x, W, b, t, w, *c, 2.0, True, block_rows, *grads),
                                  test_utils=u)
    if backend == "triton":
        fwd, bwd = lce_ops.KERNELS["triton"]
        x, W, b, t, w, *_ = _op_args(device, dtype, lce_ops.MEAN)
        u = ("test_schema",) if device == "cpu" else ("test_schema", "test_faketensor")
        torch.library.opcheck(fwd, (x, W, b, t, w, 0, 2.0, True), test_utils=u)
        z = F.linear(x, W, b).float()
        m = z.amax(1)
        ls = torch.logsumexp(z - m[:, None], 1)
        c = [torch.rand(6, device=device) for _ in range(3)]
        torch.library.opcheck(bwd, (x, W, b, t, w, m, ls, *c, 0, 2.0, True, True, True, True), test_utils=u)


@pytest.mark.parametrize("backend", ["reference", "cpu-split", "cpu"])
def test_gradcheck_float64_kernels(backend):
    require_backend(backend, "cpu")
    x, W, b, t, w, ii, red, eps, zl, sc = _op_args("cpu", torch.float64, lce_ops.SUM)

    def f(x, W, b):
        return _op(x, W, b, t, w, ii, red, eps, zl, sc, backend)[0]

    torch.autograd.gradcheck(f, (x.requires_grad_(), W.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), BACKENDS[2],
                                            *BACKENDS[-2:], FUSED_BACKENDS[1]])
def test_compile_fullgraph_parity(backend, device):
    """The autograd-level op under torch.compile(fullgraph=True). Inductor cannot generate CPU code around an
    interpreted Triton kernel, so the CPU tier compiles the op over the reference and the C++ CPU kernels; the GPU
    tier over the Triton kernels."""
    require_backend(backend, device)
    torch._dynamo.reset()
    x, W, b, t, w, ii, _, eps, zl, sc = _op_args(device, torch.float32, lce_ops.MEAN)

    def f(x, W, b):
        return _op(x, W, b, t, w, ii, lce_ops.MEAN, eps, zl, sc, backend)[0]

    compiled = torch.compile(f, fullgraph=True)
    le, ge = _run(f, [x, W, b], torch.tensor(1.0, device=device))
    # Inductor's on-disk caches key a graph by the op's schema name, not its Python body: an edited op would
    # replay a stale compiled graph. Compile fresh.
    import torch._functorch.config as fconf
    import torch._inductor.config as iconf
    with iconf.patch({k: False for k in ("fx_graph_cache", "fx_graph_remote_cache") if hasattr(iconf, k)}), \
            fconf.patch({k: False for k in ("enable_autograd_cache",) if hasattr(fconf, k)}):
        lc, gc = _run(compiled, [x, W, b], torch.tensor(1.0, device=device))
    assert max_abs_err(le, lc) <= 1e-5
    for a, c in zip(ge, gc):
        assert max_abs_err(a, c) <= 1e-5


def _counting_aot_backend():
    """(backend, seen): aot_eager that records each graph it compiles (seen["frames"]: Dynamo graphs that got
    through AOT autograd, so a restart that specialises a float argument is not counted; seen["bw"]: the backward
    graphs)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    seen = {"frames": 0, "bw": []}

    def bw(gm, example_inputs):
        seen["bw"].append(gm)
        return make_boxed_func(gm.forward)

    inner = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw)

    def backend(gm, example_inputs):
        out = inner(gm, example_inputs)
        seen["frames"] += 1
        return out
    return backend, seen


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), BACKENDS[1],
                                            BACKENDS[4], BACKENDS[2], BACKENDS[3]])
def test_compile_dynamic_split_path_one_graph_for_all_shapes(backend, device, monkeypatch):
    """The split path's backward (reduction none here; every GPU call) loops over vocabulary chunks in Python.
    Traced into the autograd formula, that loop made V, and the chunk count N implies, guards: a recompile per
    vocabulary size under torch.compile(dynamic=True), ConstraintViolationError with mark_dynamic on the vocabulary
    dim. It is one op (pykernels::linear_cross_entropy_backward): one graph for every (N, V), with eager's numbers."""
    require_backend(backend, device)
    from pykernels.ops import linear_cross_entropy_launch as tk
    monkeypatch.setattr(tk, "CHUNK_BYTES", 0)  # one chunk per chunk_align columns: several, N-independent
    monkeypatch.setattr(ref, "_CHUNK", 24)
    dtype = _one_dtype(backend)
    name = _split(backend)[0]
    # (N, H, V): 2 to 5 backward chunks on the CPU (64 columns; interpreted Triton: 16; reference: 24), 2 to 4
    # on a GPU (256)
    shapes = ([(5, 4, 70), (9, 6, 130), (3, 5, 150), (17, 4, 200)] if device == "cpu" else
              [(40, 16, 300), (130, 32, 700), (7, 16, 520), (260, 16, 1000)])

    def f(x, W, b, t, w):
        if backend == "reference":  # (the functional's reference is torch's autograd: the op over these kernels)
            return _op(x, W, b, t, w, -100, lce_ops.NONE, 0.1, 0.0, 3.0, backend)[0]
        return linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction="none", label_smoothing=0.1,
                                    softcap=3.0, backend=backend)

    def case(N, H, V, seed):
        torch.manual_seed(seed)
        x, W, b, w, t = _make(N, H, V, dtype, device, True, True)
        return [a.to(dtype) for a in (x, W, b)], t, w.to(lce_ops.acc_dtype(dtype)), torch.rand(N, device=device)

    def run(fn, leaves, t, w, g):
        leaves = [a.detach().clone().requires_grad_() for a in leaves]
        out = fn(*leaves, t, w)
        out.backward(g.to(out.dtype))
        return [out.detach()] + [a.grad for a in leaves]

    torch._dynamo.reset()
    cb, seen = _counting_aot_backend()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=cb)
    for i, (N, H, V) in enumerate(shapes):
        leaves, t, w, g = case(N, H, V, i)
        # eager first: in a fresh process the first compiled call would write pykernels.last_dispatch, a guard
        # of its own graph (a recompile that is not this test's subject)
        want = run(f, leaves, t, w, g)
        got = run(compiled, leaves, t, w, g)
        assert backend == "reference" or pykernels.last_dispatch["linear_cross_entropy"][0] == name
        for a, e in zip(got, want):  # the same kernels, the same chunks, the same row math
            assert a.dtype == e.dtype and a.shape == e.shape
            assert max_abs_err(a, e) <= (0.0 if device == "cpu" else 1e-3 * max(1.0, float(e.abs().max())))
    assert seen["frames"] == 1, f"{seen['frames']} graphs compiled for {len(shapes)} shapes with dynamic=True"
    assert len(seen["bw"]) == 1
    calls = [n.target for n in seen["bw"][0].graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.pykernels.linear_cross_entropy_backward.default) == 1
    assert not [c for c in calls if "dlogits" in str(c) or "bwd_triton" in str(c)]

    # the vocabulary dim marked dynamic (as torch.export's Dim): compiles (it raised ConstraintViolationError)
    torch._dynamo.reset()
    cb, seen = _counting_aot_backend()
    compiled = torch.compile(f, fullgraph=True, backend=cb)
    for i, (N, H, V) in enumerate(shapes[:2]):
        leaves, t, w, g = case(N, 8, V, 10 + i)
        leaves = [a.detach().clone().requires_grad_() for a in leaves]
        for a in (*leaves, t, w):
            torch._dynamo.mark_dynamic(a, 0)
        compiled(*leaves, t, w).backward(g.to(dtype))
    assert seen["frames"] == 1


def test_opcheck_split_backward_op():
    """pykernels::linear_cross_entropy_backward (the split path's backward as one op) on the CPU backends: schema,
    fake shapes/dtypes/strides against the real op (every combination of requested gradients, with and without a
    bias or class weight), AOT dispatch with dynamic shapes."""
    op = torch.ops.pykernels.linear_cross_entropy_backward.default
    usable = pykernels.available_backends("cpu")
    samples = [("reference", torch.float64)]
    if usable["cpu"] is None:
        samples += [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float64)]
    if usable["triton"] is None:  # (interpreted)
        samples += [("triton", torch.float32)]
    for i, (name, dtype) in enumerate(samples):
        torch.manual_seed(i)
        for bias, weighted, grads in ((True, True, (True, True, True)), (False, True, (True, False, False)),
                                      (True, False, (False, True, True)), (True, True, (True, True, False)),
                                      (False, False, (False, False, True))):
            x, W, b, t, w, *_ = _op_args("cpu", dtype, lce_ops.NONE, bias, weighted)
            m, ls, *_ = lce_ops.KERNELS["reference"][0](x.double(), W.double(), None if b is None else b.double(),
                                                         t, None if w is None else w.double(), 0, 2.0, True)
            acc = lce_ops.acc_dtype(dtype)
            c = [torch.rand(x.shape[0], dtype=acc) for _ in range(3)]
            args = (x, W, b, t, w, m.to(acc), ls.to(acc), *c, 0, 2.0, True, *grads, name)
            torch.library.opcheck(op, args)
            gx, gw, gb = op(*args)
            ex, ew, eb = lce_ops.KERNELS[name][1](*args[:-1])  # the op is the backend's kernel
            for a, e in ((gx, ex), (gw, ew), (gb, eb)):
                assert a.dtype == e.dtype and torch.equal(a, e)
            assert gx.shape == ((6, 9) if grads[0] else (0,)) and gx.dtype == acc
            assert gw.shape == ((21, 9) if grads[1] else (0,)) and gw.dtype == dtype
            assert gb.shape == ((21,) if grads[2] and bias else (0,)) and gb.dtype == dtype


@pytest.mark.parametrize("backend,device", BACKENDS[:2] + BACKENDS[-2:])
def test_no_n_by_v_allocation(backend, device, monkeypatch):
    """Forward + backward never allocate a tensor as large as the N x V logits (workspace bounded by chunks)."""
    require_backend(backend, device)
    from torch.utils._python_dispatch import TorchDispatchMode
    N, H, V = 40, 16, 300
    if backend != "reference":
        from pykernels.ops import linear_cross_entropy_launch as tk
        monkeypatch.setattr(tk, "CHUNK_BYTES", N * 4 * 64)
    monkeypatch.setattr(ref, "_CHUNK", 64)
    biggest = [0]

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    biggest[0] = max(biggest[0], o.numel())
            return out

    x = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    t = torch.randint(0, V, (N,))
    # (the cpu kernels' own logit block is allocated in C++: at most 4096 x 1024 fp32, and for the fused path
    # fused_block_rows(N, V) rows, which the test of several blocks covers)
    with Sizes():
        loss = _op(x, W, b, t, None, -100, lce_ops.MEAN, 0.1, 0.0, 0.0, backend)[0]
        loss.backward()
    assert biggest[0] < N * V // 2, f"a tensor of {biggest[0]} elements (N x V = {N * V})"
    assert biggest[0] >= V * H  # sanity: the mode saw the weight gradient


def test_module_without_torchs_class(monkeypatch):
    """On a torch without nn.LinearCrossEntropyLoss (< 2.13, e.g. the GPU machines' 2.11) the module keeps the same
    layout (linear submodule, weight buffer) on torch's _WeightedLoss."""
    import importlib.util
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyLoss", raising=False)
    import pykernels.nn.linear_cross_entropy as mod
    spec = importlib.util.spec_from_file_location("pykernels.nn._lce_without_torch", mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    m = fresh.LinearCrossEntropyLoss(8, 11, bias=True, weight=torch.rand(11, dtype=torch.float64) + 0.5,
                                     label_smoothing=0.2, dtype=torch.float64)  # (torch: the logits' dtype)
    assert isinstance(m, torch.nn.modules.loss._WeightedLoss)
    assert set(m.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    x, t = torch.randn(4, 8, dtype=torch.float64), torch.randint(0, 11, (4,))
    z = F.linear(x, m.linear.weight, m.linear.bias)
    torch.testing.assert_close(m(x, t), F.cross_entropy(z, t, weight=m.weight.double(), label_smoothing=0.2))
    with pytest.raises(ValueError, match="weight"):
        fresh.LinearCrossEntropyLoss(8, 11, weight=torch.rand(10))


def test_cost_model_of_issue_shape():
    """N=8192, H=4096, V=128256 bf16: 8NHV FLOPs, and the Triton backend's extra memory within the 0.5 GB target."""
    c = lce_ops.cost_model(8192, 4096, 128256, torch.bfloat16, chunk_bytes=256 << 20)
    assert c["flops"] == 8 * 8192 * 4096 * 128256 and c["flops_3gemm"] == 6 * 8192 * 4096 * 128256
    assert c["backward_chunk_columns"] == 16384
    assert c["workspace_bytes"] < 0.5 * 2**30 < c["logits_bytes"]


def test_module_is_a_drop_in():
    torch.manual_seed(0)
    ours = pykernels.nn.LinearCrossEntropyLoss(12, 17, bias=True, label_smoothing=0.1, ignore_index=3,
                                               dtype=torch.float64)
    x, t = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 17, (5,))
    z = F.linear(x, ours.linear.weight, ours.linear.bias)
    torch.testing.assert_close(ours(x, t), F.cross_entropy(z, t, ignore_index=3, label_smoothing=0.1))
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        theirs = torch.nn.LinearCrossEntropyLoss(12, 17, bias=True, label_smoothing=0.1, ignore_index=3,
                                                 dtype=torch.float64)
        assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
        assert set(ours.state_dict()) == set(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert "label_smoothing=0.1" in repr(ours)
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        theirs = torch.nn.LinearCrossEntropyLoss(12, 17, bias=True, weight=torch.rand(17, dtype=torch.float64),
                                                 reduction="sum", dtype=torch.float64)
        swapped = pykernels.nn.LinearCrossEntropyLoss.from_torch(theirs, z_loss=0.0)
        assert swapped.linear.weight is theirs.linear.weight and swapped.weight is theirs.weight
        torch.testing.assert_close(swapped(x, t), theirs(x, t))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_module_forwards_z_loss_softcap_backend_and_prints_them(backend):
    require_backend(backend, "cpu")
    kw = dict(z_loss=1e-2, softcap=2.0)
    x, t = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 7, (5,))
    m = pykernels.nn.LinearCrossEntropyLoss(6, 7, bias=True, dtype=torch.float64, backend=backend, **kw)
    with torch.no_grad():
        m.linear.weight.mul_(4.0)  # logits beyond the softcap
    want = pykernels.functional.linear_cross_entropy(x, m.linear.weight, t, linear_bias=m.linear.bias,
                                                     backend="reference", **kw)
    assert not torch.allclose(want, F.cross_entropy(F.linear(x, m.linear.weight, m.linear.bias), t))
    torch.testing.assert_close(m(x, t), want)
    assert pykernels.last_dispatch["linear_cross_entropy"][0] == backend
    assert "z_loss=0.01" in repr(m) and "softcap=2.0" in repr(m) and f"backend='{backend}'" in repr(m)
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        theirs = torch.nn.LinearCrossEntropyLoss(6, 7, bias=True, dtype=torch.float64)
        theirs.load_state_dict(m.state_dict())
        swapped = pykernels.nn.LinearCrossEntropyLoss.from_torch(theirs, backend=backend, **kw)
        torch.testing.assert_close(swapped(x, t), want)
        assert "softcap=2.0" in repr(swapped)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch < 2.13 has no such module")
@pytest.mark.parametrize("out_features", [(3,), (3, 2)])
def test_module_with_out_features_as_torchs(out_features):
    """K-dimensional logits: the flat (C * prod(out_features), H) linear weight is read class-major, as torch's
    module reads it; the loss and every parameter's gradient match."""
    theirs = torch.nn.LinearCrossEntropyLoss(5, 7, out_features=out_features, bias=True, dtype=torch.float64)
    ours = pykernels.nn.LinearCrossEntropyLoss(5, 7, out_features=out_features, bias=True, dtype=torch.float64,
                                               backend="reference")
    ours.load_state_dict(theirs.state_dict())
    x, t = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 7, (4, *out_features))
    for m in (theirs, ours):
        m(x, t).backward()
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda msg: f"{name}: {msg}")


# ---------------------------------------------------------------------------------------------------------
# Compiled for real GPU targets without a GPU.

_COMPILE = '''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, {root!r})
from pykernels.triton import linear_cross_entropy as k
from pykernels.triton._compile import compile_for, spills

# The runtime JIT specialises 16-byte aligned pointers and ints divisible by 16 ("tt.divisibility"); mimic it
# for a contiguous problem with H % 16 == 0, so the check sees the loads the GPU will run (vectorised, pipelined).
ALIGNED = ("X", "W", "B", "T", "CW", "Mp", "Sp", "ZYp", "ZSp", "Mx", "LS", "CP", "CY", "CWr", "DL", "DBp", "H", "sxn",
           "swv", "sdn", "sdb")


def compile_aligned(kernel, signature, constexprs, arch, num_warps, num_stages):
    return compile_for(kernel, signature, constexprs, arch, num_warps=num_warps, num_stages=num_stages,
                       divisible=[a for a in ALIGNED if a in signature])


out = []
jobs = [(90, "bf16", cfg) for cfg in k.GPU_CONFIGS_16BIT] + [(80, "bf16", k.GPU_CONFIGS_16BIT[0]),
                                                              (90, "fp32", k.GPU_CONFIGS_FP32[0])]
for arch, dt, (BM, BN, BK, warps, stages) in jobs:
    common = {{"X": f"*{{dt}}", "W": f"*{{dt}}", "B": f"*{{dt}}", "T": "*i64", "CW": "*fp32", "N": "i32", "V": "i32",
              "H": "i32", "vocab_start": "i64", "sxn": "i64", "swv": "i64"}}
    flags = dict(HAS_BIAS=True, HAS_CW=True, SOFTCAP=True, SMOOTH=True, IEEE=dt == "fp32", BM=BM, BN=BN, BK=BK,
                 GROUP_M=8)
    fwd = dict(common, Mp="*fp32", Sp="*fp32", ZYp="*fp32", ZSp="*fp32", softcap="fp32", n_splits="i32")
    bwd = dict(common, Mx="*fp32", LS="*fp32", CP="*fp32", CY="*fp32", CWr="*fp32", DL=f"*{{dt}}", DBp="*fp32", col0="i32",
               n_cols="i32", sdn="i64", sdb="i64", softcap="fp32")
    for name, kern, sig in (("fwd", k._lce_fwd_kernel, fwd), ("dlogits", k._lce_dlogits_kernel, bwd)):
        c = compile_aligned(kern, sig, dict(flags, HAS_DB=True) if name == "dlogits" else flags, arch, warps, stages)
        ptx = c.asm["ptx"]
        out.append((name, arch, dt, [BM, BN, BK, warps, stages], "wgmma" in ptx, "mma.sync" in ptx,
                    "cp.async" in ptx, spills(c)))
print(json.dumps(out))
'''


# (kernel, arch, dtype, config) -> bytes (see conftest.assert_spill_budget). Only the first config and 128x64 are
# (nearly) clean on sm_90; the autotuner times every config on the GPU, so a spilling one only costs tuning time
# unless it wins: which did on the H100 run is not recorded.
LCE_KNOWN_SPILLS = {
    ("dlogits", 90, "bf16", (128, 128, 64, 8, 3)): 4, ("fwd", 90, "bf16", (128, 256, 64, 8, 3)): 668,
    ("dlogits", 90, "bf16", (128, 256, 64, 8, 3)): 904, ("fwd", 90, "bf16", (256, 128, 64, 8, 3)): 128,
    ("dlogits", 90, "bf16", (256, 128, 64, 8, 3)): 1060, ("fwd", 90, "bf16", (128, 128, 64, 4, 4)): 208,
    ("dlogits", 90, "bf16", (128, 128, 64, 4, 4)): 692, ("fwd", 90, "bf16", (64, 256, 64, 4, 4)): 548,
    ("dlogits", 90, "bf16", (64, 256, 64, 4, 4)): 804, ("fwd", 90, "bf16", (128, 64, 64, 4, 4)): 48,
    ("dlogits", 80, "bf16", (128, 128, 64, 8, 3)): 8, ("fwd", 90, "fp32", (64, 64, 32, 4, 3)): 12}


def test_kernels_compile_for_sm80_and_sm90():
    """Every GPU autotune config (bf16, sm_90) and the first on sm_80 / in fp32: tensor-core instructions (wgmma on
    sm_90, mma.sync on sm_80), pipelined asynchronous loads, no register spills."""
    pytest.importorskip("triton")
    rows = run_script_compiled(_COMPILE)
    from pykernels.triton import linear_cross_entropy as tk
    assert len(rows) == 2 * (len(tk.GPU_CONFIGS_16BIT) + 2)
    for name, arch, dt, cfg, wgmma, mma, pipelined, n_spills in rows:
        where = f"{name} sm_{arch} {dt} {cfg}"
        if dt == "bf16":
            assert (wgmma if arch == 90 else mma), f"{where}: no tensor-core instruction"
            assert pipelined, f"{where}: loads are not pipelined (cp.async)"
        else:  # fp32: exact fp32 FMA dots (input_precision="ieee"), no TF32 tensor cores
            assert not (wgmma or mma), f"{where}: tensor-core (TF32) instruction in an fp32 kernel"
        assert_spill_budget(where, n_spills, LCE_KNOWN_SPILLS, (name, arch, dt, tuple(cfg)))


_COMPILE_FUSED = '''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, {root!r})
from pykernels.triton import linear_cross_entropy_fused as k
from pykernels.triton._compile import compile_for, spills
out = []
for arch in (80, 90):
    for dt in ("bf16", "fp32"):
        sig = {{"Z": "*" + dt, "T": "*i64", "CW": "*fp32", "P0": "*fp32", "PL": "*fp32", "CY": "*fp32", "CWr": "*fp32",
               "M": "*fp32", "LS": "*fp32", "ZY": "*fp32", "ZS": "*fp32", "V": "i32", "szn": "i64", "softcap": "fp32"}}
        c = compile_for(k._lce_fused_rows_kernel, sig, dict(HAS_CW=True, SOFTCAP=True, SMOOTH=True, BLOCK=4096), arch,
                        num_warps=8)
        out.append((arch, dt, spills(c)))
print(json.dumps(out))
'''


def test_fused_row_kernel_compiles_for_sm80_and_sm90():
    """The Triton fused path's row kernel (every option on) compiles for real targets without spilling."""
    pytest.importorskip("triton")
    for arch, dt, n_spills in run_script_compiled(_COMPILE_FUSED):
        assert_spill_budget(f"fused rows sm_{arch} {dt}", n_spills, {}, None)


def test_fuzz_cpu_kernel_ops_against_reference_kernels(monkeypatch):
    """Random sizes (N, H, V from 1; V across the kernels' 1024-class blocks), a vocabulary shard (vocab_start),
    targets outside the shard and ignored, softcap, smoothing, class weights, bias, several backward chunks: the
    C++ CPU kernels behind the shared launch logic against the reference kernels in float64 on the same inputs,
    forward statistics and all three gradients. (16-bit rounds the dlogits before the GEMMs, as torch's own 16-bit
    path does: that is judged against torch's error by the 2x rule in test_kernels_against_float64_oracle.)"""
    require_backend("cpu", "cpu")
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies
    from pykernels.ops import linear_cross_entropy_launch as tk
    fwd, bwd = lce_ops.KERNELS["cpu"]

    @hyp.settings(max_examples=25 * FUZZ_SCALE, deadline=None)
    @hyp.given(N=st.integers(1, 70), H=st.integers(1, 40), V=st.integers(1, 2300), start=st.integers(0, 50),
               dtype=st.sampled_from([torch.float64, torch.float32]), softcap=st.sampled_from([0.0, 3.0]),
               smooth=st.booleans(), weighted=st.booleans(), bias=st.booleans(),
               chunk=st.sampled_from([64, 640, 1 << 30]), seed=st.integers(0, 2**31 - 1))
    def check(N, H, V, start, dtype, softcap, smooth, weighted, bias, chunk, seed):
        g = torch.Generator().manual_seed(seed)
        acc = lce_ops.acc_dtype(dtype)
        x = torch.randn(N, H, generator=g).to(dtype)
        W = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
        b = torch.randn(V, generator=g).to(dtype) if bias else None
        w = (torch.rand(V, generator=g) + 0.5).to(acc) if weighted else None
        t = torch.randint(-2, V + start + 3, (N,), generator=g)  # some outside the shard [start, start + V)
        monkeypatch.setattr(tk, "CHUNK_BYTES", N * x.element_size() * chunk)
        got = fwd(x, W, b, t, w, start, softcap, smooth)
        x64, W64 = x.double(), W.double()
        b64 = None if b is None else b.double()
        want = lce_ops.KERNELS["reference"][0](x64, W64, b64, t, None if w is None else w.double(), start, softcap,
                                               smooth)
        for name, a, r in zip(("m", "log_s", "z_target", "z_sum"), got, want):
            if name == "z_sum" and not smooth:
                continue
            assert_error_rule(name, a, r, dtype=torch.float32, floor=1e-12 if dtype == torch.float64 else 2e-5)
        m, log_s = want[0].to(acc), want[1].to(acc)
        coef = [torch.rand(N, generator=g, dtype=torch.float64).to(acc) for _ in range(3)]
        got = bwd(x, W, b, t, w, m, log_s, *coef, start, softcap, smooth, True, True, True)
        want = lce_ops.KERNELS["reference"][1](x64, W64, b64, t, None if w is None else w.double(), m.double(),
                                               log_s.double(), *[c.double() for c in coef], start, softcap, smooth,
                                               True, True, True)
        # fp32: dX sums V products (over several chunks): rounding grows like sqrt(V) ulps, as in torch's own GEMM
        floor = 1e-12 if dtype == torch.float64 else 2e-6 * max(1.0, (V / 100) ** 0.5)
        for name, a, r in zip(("dX", "dW", "db"), got, want):
            if name == "db" and b is None:
                continue
            assert_error_rule(name, a, r, dtype=torch.float32, floor=floor)

    check()


def test_cpu_kernels_16bit_across_class_blocks():
    """16-bit on the C++ CPU kernels with V over two of their 1024-class blocks: the logits go through the fp32
    block buffer and W is converted a block at a time, in the forward and within a backward chunk; the 2x rule
    against torch's own error at that dtype."""
    require_backend("cpu", "cpu")
    N, H, V = 21, 24, 2300
    for dtype in (torch.bfloat16, torch.float16):
        x, W, b, w, t = _make(N, H, V, dtype, "cpu", True, True)
        leaves = [x, W, b]
        g = torch.tensor(1.0, dtype=torch.float64)

        def ours(x, W, b):
            return linear_cross_entropy(x, W, t, linear_bias=b, weight=_like(w, x), label_smoothing=0.1, softcap=4.0,
                                        backend="cpu")

        def torch_at(x, W, b):
            return _oracle(x, W, b, t, w, "mean", None, 0.1, 0.0, 4.0)

        lr, gr = _run(torch_at, leaves, g)
        lo, go = _run(ours, [a.to(dtype) for a in leaves], g)
        lb, gb = _run(torch_at, [a.to(dtype) for a in leaves], g)
        assert_error_rule(f"loss {dtype}", lo, lr, lb)
        for name, a, r, c in zip(("d_input", "d_weight", "d_bias"), go, gr, gb):
            assert_error_rule(f"{name} {dtype}", a, r, c)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_cpu_split_path_across_1024_class_blocks(softcap):
    """The split forward over three 1024-class blocks (bias, class weights and target offset by the block start, the
    running max rescaled) and the split backward with one chunk of V = 2100 columns (wider than the C++ kernel's
    1024-class blocks): the bias, the class weights (smoothing term) and the target column of every block offset by
    the block's start; targets in all three blocks. float64 against the float64 oracle at rounding level (the class
    weights read without the sub-block offset gave dX 6-10% off and passed the 16-bit tolerances; a target one past a
    block, a bias or weight without the block offset were caught by the fuzz only: mutation review)."""
    require_backend("cpu-split", "cpu")
    x, W, b, w, t = _make(24, 16, 2100, torch.float64, "cpu", True, True)
    t[1::3] = torch.randint(1024, 2100, (8,))
    t[2], t[5] = 1024, 2048  # the first class of a block: one past the previous block's last column
    g = torch.tensor(0.75, dtype=torch.float64)
    lo, go = _run(lambda x, W, b: linear_cross_entropy(x, W, t, linear_bias=b, weight=w, label_smoothing=0.1,
                                                       softcap=softcap, backend="cpu-split"), [x, W, b], g)
    lr, gr = _run(lambda x, W, b: _oracle(x, W, b, t, w, "mean", None, 0.1, 0.0, softcap), [x, W, b], g)
    torch.testing.assert_close(lo, lr, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss: {m}")
    for name, a, r in zip(("d_input", "d_weight", "d_bias"), go, gr):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_cpu_kernels_smoothing_sum_over_large_V_keeps_precision():
    """The label-smoothing statistic sum_c w_c z_c over V = 128256 classes from both C++ ops (split: 1024-class blocks
    and two splits; fused: the whole row), against float64 with torch's fp32 sum as the baseline and the result's
    own fp32 rounding as the floor. One fp32 accumulator per vector lane over the row (16000 terms each) was 10-20x
    torch's error in the fused op, the blocks' sums added in fp32 6-7x; the loss takes it as eps / V (W lse - sum w z),
    where a logit offset multiplies it (offset 300: 8.3e-5 in the loss, torch 2.1e-6)."""
    require_backend("cpu", "cpu")
    N, V = 4, 128256
    x = torch.eye(N)  # one-hot rows: the logits are W's columns exactly, so only the sums differ
    W = torch.randn(V, N) * 2 + 5
    t = torch.randint(0, V, (N,))
    pk = torch.ops.pykernels
    ones = torch.ones(N)
    for w in (None, torch.rand(V) + 0.5):
        z = W.T.contiguous() if w is None else W.T * w
        ref = z.double().sum(1)
        lse_ref = torch.logsumexp(W.T.double(), 1)
        for splits in (1, 2, 7):  # (7 does not divide V: the last split takes the remainder)
            # the launcher's forward, which combines the splits (their fp32 sum failed the 2x rule: 8.3e-2 > 8.0e-2)
            m, log_s, _, zs = lce_ops._launch.forward(lce_ops._CPU, x, W, None, t, w, 0, 0.0, True, splits)
            assert_error_rule(f"split zs splits={splits} weighted={w is not None}", zs, ref, z.sum(1), floor=2**-24)
            torch.testing.assert_close(m.double() + log_s.double(), lse_ref)
        zs = pk.linear_cross_entropy_fused(x, W, None, t, w, ones, ones * 0, ones, ones, 0.0, True, 4096, False,
                                           False, False)[3]
        assert_error_rule(f"fused zs weighted={w is not None}", zs, ref, z.sum(1), floor=2**-24)


def _cpu_peak_bytes(fn):
    """Peak live bytes the CPU allocator handed out during fn, from the profiler's memory events (tensors alive
    before fn do not count)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_16bit_split_path_peak_memory(dtype, monkeypatch):
    """CPU 16-bit on the split path (float16; bfloat16, forced here by fused=False where oneDNN has bf16 GEMMs):
    forward+backward peaks at most at torch's linear + cross_entropy, and within the bound of
    docs/linear_cross_entropy.md ("Memory on the CPU") at a chunk budget that needs several chunks. The backward
    sized its 16-bit dlogits chunk at 2 bytes per element and converted it whole to fp32 for each GEMM: 1.17x
    torch's peak at this shape in fp16 (419 MiB above torch's 367 at 2048 x 256 x 32768 bf16)."""
    require_backend("cpu", "cpu")
    from pykernels import _native
    from pykernels.ops import linear_cross_entropy_launch as tk
    N, H, V = 1024, 128, 4096
    torch.manual_seed(0)
    x = torch.randn(N, H, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, H, dtype=dtype) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,))

    def peak(loss):
        def step():
            x.grad = W.grad = None
            loss().backward()
        step()  # warm up (lazy initialisation outside the measurement)
        x.grad = W.grad = None
        return _cpu_peak_bytes(step)

    theirs = peak(lambda: F.cross_entropy(F.linear(x, W), t))
    ours = peak(lambda: linear_cross_entropy(x, W, t, backend="cpu-split"))
    assert ours <= theirs, f"{ours / 2**20:.1f} MiB > torch's {theirs / 2**20:.1f} MiB"
    budget = 8 << 20
    monkeypatch.setattr(tk, "CHUNK_BYTES", budget)
    ours = peak(lambda: linear_cross_entropy(x, W, t, backend="cpu-split"))
    # the documented bound: bytes per chunk column (fp32 dlogits and W rows; a 16-bit chunk where the GEMMs run in
    # bf16, converted for dX a block of columns at a time), the columns within the budget, the N x H and W-block
    # terms, O(N) vectors
    bf16_gemms = _native.gemm_dtype(x) != torch.float32
    col = 2 * N + -(-4 * (N + H) // tk.ACC_SPLITS) if bf16_gemms else 4 * N + 4 * H
    chunk = min(V, max(64, budget // col // 64 * 64))
    assert chunk < V  # several chunks
    grads = x.element_size() * (N * H + V * H)
    backward = grads + chunk * col + 12 * N * H + 4 * min(chunk, 1024) * H
    if bf16_gemms:  # the dlogits op's logit block, fp32 and the bf16 product it is copied from
        backward += 6 * min(N, 4096) * min(chunk, 1024)
    forward = 4 * N * H + 4 * min(N, 4096) * min(V, 1024) + 4 * min(V, 1024) * H
    bound = max(forward, backward) + 64 * N + (64 << 10)
    assert ours <= bound, f"{ours / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
    # the CPU dlogits op writes a chunk in the input dtype or the accumulation dtype, and names dl otherwise
    v = torch.zeros(N)
    with pytest.raises(RuntimeError, match=r"dl must be \(1024, n_cols\) .* or Float"):
        torch.ops.pykernels.linear_cross_entropy_dlogits(x.detach(), W.detach(), None, t, None, v, v, v, v, v, 0, 0.0,
                                                         False, 0, torch.empty(N, 64, dtype=torch.float64), None)


# ---------------------------------------------------------------------------------------------------------
# The fused path of the cpu backend (gradients in the forward: pykernels::linear_cross_entropy_fused).

def _count_fused(monkeypatch, backend="cpu", force=()):
    """The grads flags (input, weight, bias) of each call of the backend's fused kernel; ``force``: dtypes it then
    takes even where automatic calls would not (the CPU kernel's bf16 where oneDNN has no bf16 GEMMs: correct, slow)."""
    calls = []
    kernel, dtypes = lce_ops.FUSED[backend]
    dtypes = tuple(dtypes) + tuple(d for d in force if d not in dtypes)

    def counted(*args):
        calls.append(tuple(args[12:15]))
        return kernel(*args)

    monkeypatch.setitem(lce_ops.FUSED, backend, (counted, dtypes))
    return calls


def test_cpu_fused_bf16_sums_dw_over_row_blocks_in_fp32(monkeypatch):
    """bf16 on the fused CPU path in 1-row blocks (forced where oneDNN has no bf16 GEMMs): dW summed over the 512
    blocks in fp32 and rounded once. All logits 0 over 2 classes: every row's dlogits are exactly (-1/2, 1/2), so dW
    is exactly (-256, 256); a bf16 running sum stalls at 128 (128 + 0.5 rounds back to 128), which the other tests'
    tolerances passed (mutation review)."""
    require_backend("cpu", "cpu")
    from pykernels.ops import linear_cross_entropy_launch as tk
    monkeypatch.setattr(tk, "FUSED_MIN_ROWS", 1)
    monkeypatch.setattr(tk, "FUSED_BLOCK_BYTES", 0)
    calls = _count_fused(monkeypatch, force=(torch.bfloat16,))
    N = 512
    x = torch.ones(N, 1, dtype=torch.bfloat16)
    W = torch.zeros(2, 1, dtype=torch.bfloat16)
    t = torch.zeros(N, dtype=torch.long)
    g = torch.tensor(1.0)
    lo, (gx, gw) = _run(lambda x, W: linear_cross_entropy(x, W, t, reduction="sum", backend="cpu"), [x, W], g)
    assert len(calls) == 1
    torch.testing.assert_close(gw, torch.tensor([[-256.0], [256.0]], dtype=torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(gx, torch.zeros(N, 1, dtype=torch.bfloat16), rtol=0, atol=0)


def test_fused_path_exactly_when_it_applies(monkeypatch):
    """float32/float64, reduction mean or sum, a gradient needed, fused not False: then the forward writes the
    gradients of the leaves that require one, and only those; otherwise the split path runs."""
    require_backend("cpu", "cpu")
    calls = _count_fused(monkeypatch)
    x = torch.randn(9, 7, requires_grad=True)
    W = torch.randn(11, 7, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    t = torch.randint(0, 11, (9,))

    def flags(x=x, W=W, **kw):
        n = len(calls)
        _functional_lce(x, W, t, backend="cpu", **kw)
        return calls[n] if len(calls) == n + 1 else None

    assert flags() == (True, True, False)
    assert flags(reduction="sum", linear_bias=b, fused=True) == (True, True, True)
    assert flags(x=x.detach(), linear_bias=b.detach()) == (False, True, False)
    assert flags(x=x.double().detach(), W=W.double(), linear_bias=b.double()) == (False, True, True)
    assert flags(reduction="none") is None
    assert flags(fused=False) is None
    # bfloat16 where this CPU's oneDNN has bf16 GEMMs, else (as float16: slow CPU GEMMs) the split path in fp32
    fast_bf16 = torch.bfloat16 in pykernels._native.ONEDNN_DTYPES
    assert flags(x=x.bfloat16(), W=W.bfloat16()) == ((True, True, False) if fast_bf16 else None)
    assert flags(x=x.half(), W=W.half()) is None
    assert flags(x=x.detach(), W=W.detach()) is None
    with torch.no_grad():
        assert flags() is None
    with pytest.raises(ValueError, match="reduction 'none'"):  # the op refuses what it cannot scale afterwards
        lce_ops.linear_cross_entropy_op(x, W, None, t, None, -100, lce_ops.NONE, 0.0, 0.0, 0.0, "cpu",
                                        lce_ops.GRAD_INPUT)
    for fused, want in ((None, 1), (False, 0)):  # the module passes its fused setting through
        mod = pykernels.nn.LinearCrossEntropyLoss(7, 11, fused=fused, backend="cpu")
        n = len(calls)
        mod(x, t).backward()
        assert len(calls) - n == want and ("fused=False" in repr(mod)) == (fused is False)


def test_triton_fused_path_only_when_asked(monkeypatch):
    """The Triton fused path is not measured faster yet: automatic calls (fused=None) recompute the logits in the
    backward, fused=True takes it (and says so in the debug log otherwise)."""
    require_backend("triton", "cpu")
    calls = _count_fused(monkeypatch, "triton")
    x = torch.randn(9, 7, requires_grad=True)
    W = torch.randn(11, 7, requires_grad=True)
    t = torch.randint(0, 11, (9,))
    _functional_lce(x, W, t, backend="triton").backward()
    assert calls == []
    _functional_lce(x, W, t, backend="triton", fused=True).backward()
    assert calls == [(True, True, False)]
    assert "not measured" in lce_ops.fused_reason("triton", torch.float32, lce_ops.MEAN, asked=False)
    assert lce_ops.fused_reason("triton", torch.float32, lce_ops.MEAN) is None
    assert lce_ops.fused_reason("cpu", torch.float32, lce_ops.MEAN, asked=False) is None


@pytest.mark.parametrize("backend,device,dtype", [
    *[pytest.param("cpu", "cpu", d, id=f"cpu-{str(d)[6:]}") for d in (torch.float64, torch.float32, torch.bfloat16)],
    *[pytest.param("triton-fused", "cpu", d, id=f"triton-fused-interp-{str(d)[6:]}")
      for d in (torch.float32, torch.float16, torch.bfloat16)],
    *[pytest.param("triton-fused", "cuda", d, id=f"triton-fused-cuda-{str(d)[6:]}", marks=pytest.mark.gpu)
      for d in (torch.float32, torch.bfloat16)]])
@pytest.mark.parametrize("N,block", [(40, 7), (50, 40)], ids=["block7", "block40"])
def test_fused_path_in_several_row_blocks(backend, device, dtype, N, block, monkeypatch):
    """Row blocks of 7 or 40 rows (the last one partial): dW accumulated over blocks (16-bit: in an fp32 buffer), the
    bias gradient's column sums over blocks, every option, ignored rows, an upstream gradient other than 1; against
    the float64 oracle (2x rule) and, in fp32/fp64, the split path (16-bit split paths compute fp32 logits). 40-row
    blocks hold several of the C++ kernel's 16-row bias partials, fewer in the last block: summing all the partial
    rows there (the first block's stale ones too) passed with 7-row blocks (mutation review)."""
    require_backend(backend, device)
    from pykernels.ops import linear_cross_entropy_launch as tk
    monkeypatch.setattr(tk, "FUSED_MIN_ROWS", block)
    monkeypatch.setattr(tk, "FUSED_BLOCK_BYTES", 0)
    monkeypatch.setattr(tk, "CHUNK_BYTES", 0)
    name = _split(backend)[0]
    split = {"cpu": "cpu-split", "triton-fused": "triton"}[backend]
    calls = _count_fused(monkeypatch, name, force=(dtype,))
    x, W, b, w, t = _make(N, 13, 57, dtype, device, True, True)
    leaves = [a.to(dtype) for a in (x, W, b)]
    for red in ("mean", "sum"):
        g = torch.tensor(0.75, dtype=torch.float64, device=device)

        def ours(backend):
            return lambda x, W, b: linear_cross_entropy(x, W, t, linear_bias=b, weight=_like(w, x), reduction=red,
                                                        label_smoothing=0.1, z_loss=1e-3, softcap=3.0,
                                                        backend=backend)

        def torch_at(x, W, b):
            return _oracle(x, W, b, t, w, red, None, 0.1, 1e-3, 3.0)

        n = len(calls)
        lo, go = _run(ours(backend), leaves, g)
        assert len(calls) == n + 1
        exact = dtype not in (torch.bfloat16, torch.float16)
        if not pykernels.backends.interpreted_dot_reason(_split(split)[0], dtype, torch.device(device)):  # tl.dot
            ls, gs = _run(ours(split), leaves, g)
            assert len(calls) == n + 1
        else:
            ls, gs = None, [None] * 3
        lr, gr = _run(torch_at, [x, W, b], g)
        lb, gb = _run(torch_at, leaves, g) if dtype != torch.float64 else (lr, gr)
        assert_error_rule(f"loss {red}", lo, lr, lb)
        assert not exact or max_abs_err(lo, ls) <= 8 * torch.finfo(dtype).eps * max(1.0, float(ls.abs()))
        for name, a, r, c, s in zip(("d_input", "d_weight", "d_bias"), go, gr, gb, gs):
            assert a.dtype == dtype
            assert_error_rule(f"{name} {red}", a, r, c)
            assert not exact or max_abs_err(a, s) <= 8 * torch.finfo(dtype).eps * max(1.0, float(s.abs().max()))


def test_fused_gradients_and_a_retained_graph():
    """The fused backward hands out the saved gradients (scaled when the upstream gradient is not 1). Through a
    retained graph: autograd.grad any number of times; .backward() twice (the first may make the saved tensor the
    leaf's .grad, which the second adds to in place); a third .backward() raises instead of reading the sum; the
    split path (fused=False) takes any number."""
    require_backend("cpu", "cpu")
    x = torch.randn(10, 6, requires_grad=True)
    W = torch.randn(15, 6, requires_grad=True)
    t = torch.randint(0, 15, (10,))
    for scale in (1.0, 3.0):
        ref_x, ref_W = torch.autograd.grad(F.cross_entropy(F.linear(x, W), t) * scale, (x, W))
        loss = linear_cross_entropy(x, W, t, backend="cpu") * scale
        for _ in range(3):
            gx, gW = torch.autograd.grad(loss, (x, W), retain_graph=True)
            assert max_abs_err(gx, ref_x) <= 1e-6 and max_abs_err(gW, ref_W) <= 1e-6
        x.grad = W.grad = None
        loss = linear_cross_entropy(x, W, t, backend="cpu") * scale
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        assert max_abs_err(x.grad, 2 * ref_x) <= 1e-5 and max_abs_err(W.grad, 2 * ref_W) <= 1e-5
        if scale == 1.0:  # (an upstream gradient other than 1 hands out fresh tensors: nothing aliases)
            with pytest.raises(RuntimeError, match="inplace"):
                loss.backward()
        x.grad = W.grad = None
        loss = linear_cross_entropy(x, W, t, backend="cpu-split") * scale
        for _ in range(3):
            loss.backward(retain_graph=True)
        assert max_abs_err(x.grad, 3 * ref_x) <= 1e-5 and max_abs_err(W.grad, 3 * ref_W) <= 1e-5


def test_fused_gradients_of_two_backward_passes_share_no_storage():
    """The fused backward hands out the saved gradients themselves (upstream gradient 1) on the node's first
    backward only: through a retained graph, an autograd.grad result then a .backward() (or the other way round)
    must not share storage, or in-place work on .grad (clip_grad_norm_) would rewrite the tensor already held; nor
    may a later pass with another upstream gradient scale them in place."""
    require_backend("cpu", "cpu")
    x = torch.randn(9, 6, requires_grad=True)
    W = torch.randn(13, 6, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    for grad_first in (True, False):
        x.grad = W.grad = b.grad = None
        loss = linear_cross_entropy(x, W, t, linear_bias=b, backend="cpu")
        if not grad_first:
            loss.backward(retain_graph=True)
        held = torch.autograd.grad(loss, (x, W, b), retain_graph=True)
        copies = [h.clone() for h in held]
        if grad_first:
            loss.backward()
        torch.nn.utils.clip_grad_norm_((x, W, b), 1e-3)  # scales every .grad in place
        for h, c, leaf in zip(held, copies, (x, W, b)):
            assert leaf.grad.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
            assert torch.equal(h, c)
    # an upstream gradient of 1, then one of 2 through the same graph: the second pass must not scale in place the
    # tensors the first one handed out
    loss = linear_cross_entropy(x, W, t, linear_bias=b, backend="cpu")
    held = torch.autograd.grad(loss, (x, W, b), retain_graph=True)
    copies = [h.clone() for h in held]
    twice = torch.autograd.grad(loss, (x, W, b), grad_outputs=torch.tensor(2.0))
    for h, c, d in zip(held, copies, twice):
        assert torch.equal(h, c) and torch.equal(d, 2 * c)


@pytest.mark.parametrize("backend,device,dtypes,max_v,budget", [
    pytest.param("cpu", "cpu", (torch.float64, torch.float32), 2300, 25, id="cpu"),
    pytest.param("triton", "cpu", (torch.float32,), 300, 8, id="triton-interp"),
    pytest.param("triton", "cuda", (torch.float32,), 9000, 25, id="triton-cuda", marks=pytest.mark.gpu)])
def test_fuzz_fused_kernel_against_reference_kernels(backend, device, dtypes, max_v, budget):
    """A backend's fused kernel op on random sizes (N, H, V from 1), row blocks from 1 row, targets ignored and
    outside [0, V), softcap, smoothing, class weights, bias, random per-row coefficients (some without the lse term)
    and requested gradients: its statistics against the reference forward kernel in float64, its gradients against
    the reference backward kernel with coef_p = coef_p0 + coef_lse * lse."""
    require_backend(backend, device)
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies
    fused, _ = lce_ops.FUSED[backend]
    ref_fwd, ref_bwd = lce_ops.KERNELS["reference"]

    @hyp.settings(max_examples=budget * FUZZ_SCALE, deadline=None)
    @hyp.given(N=st.integers(1, 70), H=st.integers(1, 40), V=st.integers(1, max_v), rows=st.integers(1, 80),
               dtype=st.sampled_from(dtypes), softcap=st.sampled_from([0.0, 3.0]),
               smooth=st.booleans(), weighted=st.booleans(), bias=st.booleans(),
               grads=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 2**31 - 1))
    def check(N, H, V, rows, dtype, softcap, smooth, weighted, bias, grads, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, H, generator=g).to(dtype)
        W = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
        b = torch.randn(V, generator=g).to(dtype) if bias else None
        w = (torch.rand(V, generator=g) + 0.5).to(dtype) if weighted else None
        t = torch.randint(-2, V + 2, (N,), generator=g)
        t[torch.rand(N, generator=g) < 0.2] = -100
        p0, pl, cy, cw = [torch.rand(N, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
        pl[::2] = 0.0
        ig, wg, bg = grads[0], grads[1], grads[2] and bias
        on = (lambda *ts: [None if u is None else u.to(device) for u in ts])  # noqa: E731
        got = fused(*on(x, W, b, t, w, p0, pl, cy, cw), softcap, smooth, rows, ig, wg, bg)
        got = [u.cpu() for u in got]
        x64, W64 = x.double(), W.double()
        b64 = None if b is None else b.double()
        w64 = None if w is None else w.double()
        want = ref_fwd(x64, W64, b64, t, w64, 0, softcap, smooth)
        floor = 1e-12 if dtype == torch.float64 else 2e-5
        for name, a, r in zip(("m", "log_s", "z_target", "z_sum"), got[:4], want):
            if name != "z_sum" or smooth:
                assert_error_rule(name, a, r, dtype=torch.float32, floor=floor)
        lse = want[0] + want[1]
        cp = torch.where(pl != 0, p0.double() + pl.double() * lse, p0.double())
        want = ref_bwd(x64, W64, b64, t, w64, want[0], want[1], cp, cy.double(), cw.double(), 0, softcap, smooth,
                       ig, wg, bg)
        floor = 1e-12 if dtype == torch.float64 else 2e-6 * max(1.0, (V / 100) ** 0.5)
        for name, a, r, on in zip(("dX", "dW", "db"), got[4:], want, (ig, wg, bg)):
            if on:
                assert_error_rule(name, a, r, dtype=torch.float32, floor=floor)
            else:
                assert a.numel() == 0

    check()


def test_triton_timed_autotune_off_under_deterministic_algorithms(monkeypatch):
    """On a GPU the Triton kernels pick tiles by timing (keyed on H, V); the tiles change the summation order and so
    the bits, so under torch.use_deterministic_algorithms(True) the first config is used, as with
    PYKERNELS_LCE_AUTOTUNE=0 (torch turns cuDNN's benchmarking off there too)."""
    pytest.importorskip("triton")
    from pykernels.triton import linear_cross_entropy as tl_lce
    monkeypatch.setattr(tl_lce, "_interpreted", lambda: False)
    cuda = torch.device("cuda", 0)
    assert tl_lce._kernel("fwd", cuda, torch.bfloat16)[1] == {}  # autotuned
    torch.use_deterministic_algorithms(True)
    try:
        kernel, meta = tl_lce._kernel("fwd", cuda, torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(False)
    BM, BN, BK, w, st = tl_lce.GPU_CONFIGS_16BIT[0]
    assert kernel is tl_lce._lce_fwd_kernel and meta == dict(BM=BM, BN=BN, BK=BK, num_warps=w, num_stages=st)


def test_triton_autotuning_leaves_no_stale_bias_partials(monkeypatch):
    """The first call per (H, V) on a GPU times every config on the real buffers. The bias partials have a row per
    block of the smallest BM, and a config writes only its own BM's rows: the rows a losing smaller-BM trial wrote
    were summed into the bias gradient (the winner's real run does not overwrite them). Here under the interpreter,
    through the same autotune builder, with a fake timer making the larger BM win: the first call's bias gradient
    must equal the second's and torch's."""
    pytest.importorskip("triton")
    require_backend("triton", "cpu")
    from pykernels.ops import linear_cross_entropy_launch as launch
    from pykernels.triton import linear_cross_entropy as tl_lce
    configs = [(32, 16, 16, 4, 1), (16, 16, 16, 4, 1)]  # (BM, BN, BK, warps, stages): the first is "fastest"

    def fake_bench(fn, quantiles=None, **kw):
        fn()
        return [1.0 if fake_bench.order.pop(0) == 32 else 2.0] * 3
    tuned = {}

    def kernel(kind, device, dtype):
        base = tl_lce._lce_fwd_kernel if kind == "fwd" else tl_lce._lce_dlogits_kernel
        if kind not in tuned:
            tuned[kind] = tl_lce._autotuned(base, configs, do_bench=fake_bench)
        return tuned[kind], {}
    monkeypatch.setattr(tl_lce, "_kernel", kernel)
    monkeypatch.setattr(tl_lce, "_geometry", lambda device, dtype: launch.Kernels(
        tl_lce._partials, tl_lce._dlogits, 16, 16, min(c[0] for c in configs)))  # db rows of the smallest BM
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(100, 16, generator=gen), torch.randn(40, 16, generator=gen)
    b, t = torch.randn(40, generator=gen), torch.randint(0, 40, (100,), generator=gen)
    bb = b.double().requires_grad_()
    want, = torch.autograd.grad(F.cross_entropy(F.linear(x.double(), W.double(), bb), t), bb)
    for call in ("tuning", "cached"):
        fake_bench.order = [32, 16] * 2  # the forward's trials, then the backward's
        bl = b.clone().requires_grad_()
        got, = torch.autograd.grad(linear_cross_entropy(x, W, t, linear_bias=bl, backend="triton"), bl)
        assert tuned["bwd"].best_config.kwargs["BM"] == 32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=call)
    # without a bias gradient the partials' buffer, which tuning zeroes, must alias no other argument (it was the
    # row maxima m): a new shape, tuned again
    xs = x[:50, :8].contiguous().requires_grad_()
    xd = xs.detach().double().requires_grad_()
    want_x, = torch.autograd.grad(F.cross_entropy(F.linear(xd, W[:, :8].double()), t[:50]), xd)
    fake_bench.order = [32, 16] * 2
    got_x, = torch.autograd.grad(linear_cross_entropy(xs, W[:, :8], t[:50], backend="triton"), xs)
    torch.testing.assert_close(got_x.double(), want_x, atol=1e-5, rtol=1e-5)


def test_cuda_chunk_accumulation_without_fp32_output_gemm_stays_exact(monkeypatch, caplog):
    """mm_acc_ on CUDA accumulates each 16-bit chunk's product in fp32 through addmm(out_dtype=); where this torch
    refuses that for the operands, it now says so once and converts the chunks to fp32 (it used to round the first
    chunk's product to the 16-bit dtype silently). Fake CUDA tensors: the dispatch and the ops, without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from pykernels.ops import linear_cross_entropy_launch as launch
    monkeypatch.setattr(launch, "_HAS_OUT_DTYPE", [True])
    real, calls = torch.addmm, []

    def addmm(*args, **kw):
        calls.append((args[1].dtype, args[2].dtype, kw.get("out_dtype")))
        if "out_dtype" in kw:
            raise RuntimeError("self and mat2 must have the same dtype")
        return real(*args, **kw)
    with FakeTensorMode():
        acc = torch.zeros(4, 8, device="cuda")
        a, b = (torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in ((4, 6), (6, 8)))
        monkeypatch.setattr(torch, "addmm", addmm)
        with caplog.at_level("WARNING", logger="pykernels"):
            launch.mm_acc_(acc, a, b)
    assert launch._HAS_OUT_DTYPE == [False] and "no fp32-output GEMM" in caplog.text
    assert calls[0][2] == torch.float32  # tried the fp32-output GEMM first


def test_triton_fused_writes_only_the_requested_gradients():
    """The fused op's contract (and its fake's shapes): a gradient not requested comes back empty, (0,), also db
    when there is a bias (want_b must follow bias_grad, not the bias: a (V,) db nobody asked for costs a column sum
    per row block, and its shape differs from the fake's under torch.compile); the requested ones are full-size."""
    require_backend("triton-fused", "cpu")
    fused, _ = lce_ops.FUSED["triton"]
    N, H, V = 5, 3, 7
    x, W, b = torch.randn(N, H), torch.randn(V, H), torch.randn(V)
    t = torch.randint(0, V, (N,))
    coefs = [torch.rand(N) for _ in range(4)]
    for flags in ((True, True, False), (False, True, False), (True, False, False), (False, False, True)):
        got = fused(x, W, b, t, None, *coefs, 0.0, False, 2, *flags)[4:]
        want = [shape if on else (0,) for on, shape in zip(flags, ((N, H), (V, H), (V,)))]
        assert [tuple(g.shape) for g in got] == want, (flags, [g.shape for g in got])
        fake = lce_ops._fused_fake(x, W, b, t, None, *coefs, 0.0, False, 2, *flags)[4:]
        assert [tuple(g.shape) for g in fake] == want, flags

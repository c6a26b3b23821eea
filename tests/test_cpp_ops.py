"""The C++ CPU kernels of pykernels._C, called directly (torch.ops.pykernels.cross_entropy_*), against a float64
oracle written here from the formulas of docs/cross_entropy.md (loss by log_softmax, gradient by autograd).

Every test runs with torch's deterministic mode, whose empty() fills new float tensors with NaN: an output
element the kernel forgets to write (an ignored row's zero gradient included) fails the comparison.
"""
from __future__ import annotations

import os

import pytest
import torch

import pykernels  # noqa: F401  (loads _C and registers the ops' fake impls, which opcheck needs)
from pykernels import _ext

if not _ext.loaded():
    if os.environ.get("PYKERNELS_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"pykernels._C must load in this run: {_ext.load_error}")
    pytest.skip(f"pykernels._C unavailable: {_ext.load_error}", allow_module_level=True)

ops = torch.ops.pykernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) of the gradient: one rounding to the output dtype on top of fp32 math (fp64 for fp64).
GRAD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (8e-3, 1e-6),
            torch.float16: (2e-3, 1e-6)}
# loss and lse are in the accumulation dtype, computed from the same (rounded) logits as the oracle.
LOSS_TOL = {torch.float64: (1e-10, 1e-10)}
LOSS_TOL_LOW = (2e-5, 2e-5)


@pytest.fixture(autouse=True)
def _poison_new_tensors():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # empty() fills floats with NaN (fill_uninitialized_memory)
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.empty(3).isnan().all()
    yield
    torch.use_deterministic_algorithms(prev)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Oracle

def oracle(x, target, weight=None, ignore_index=-100, eps=0.0, zl=0.0, scale=None):
    """(loss, lse, grad) of the contract in float64 on the canonical (N, C, D) view; grad is
    scale[r] * dloss_r/dlogits, NaN rows for out-of-range class indices."""
    N, C, D = x.shape
    M = N * D
    xr = x.detach().double().permute(0, 2, 1).reshape(M, C).requires_grad_()
    logp = torch.log_softmax(xr, 1)
    lse = torch.logsumexp(xr, 1)
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    if target.dtype.is_floating_point:
        t = (1 - eps) * target.double().permute(0, 2, 1).reshape(M, C) + eps / C
        loss = -(w * t * logp).sum(1)
        counted = bad = torch.zeros(M, dtype=torch.bool)
        counted = ~counted
    else:
        ignored = target == ignore_index
        bad = ~ignored & ((target < 0) | (target >= C))
        counted = ~ignored & ~bad
        y = torch.where(counted, target, torch.zeros_like(target))
        loss = -w[y] * (1 - eps) * logp.gather(1, y[:, None])[:, 0]
        if eps:
            loss = loss - eps / C * (w * logp).sum(1)
        loss = torch.where(counted, loss, torch.zeros_like(loss))
    if zl:
        loss = loss + zl * lse.square() * counted
    s = torch.ones(M, dtype=torch.float64) if scale is None else scale.double().expand(M)
    (g,) = torch.autograd.grad((loss * s).sum(), xr)
    loss, g = loss.detach().clone(), g.clone()
    loss[bad] = float("nan")
    g[bad] = float("nan")
    return loss, lse.detach(), g.reshape(N, D, C).permute(0, 2, 1)


def assert_close(name, out, ref, rtol, atol, equal_nan=False):
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Inputs

def make_logits(layout, N, C, D, dtype):
    """Random logits (scaled so rows are far from uniform) in the requested memory layout."""
    def r(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    if layout == "contiguous":
        return r(N, C, D)
    if layout == "transposed":  # class stride N
        return r(C, N).t().unsqueeze(2) if D == 1 else r(C, N, D).transpose(0, 1)
    if layout == "sliced":  # row stride C + 5, rows start off any vector alignment
        return r(N, C + 5, D)[:, 2:C + 2]
    if layout == "classes_last":  # (N, D, C) storage viewed as (N, C, D): class stride 1, D stride C
        return r(N, D, C).permute(0, 2, 1)
    raise ValueError(layout)


def make_target(kind, x, ignore_index=-100):
    N, C, D = x.shape
    if kind == "prob":
        return torch.softmax(torch.randn(N, C, D, dtype=torch.float64) * 2, 1).to(x.dtype)
    t = torch.randint(0, C, (N * D,))
    t[1::3] = ignore_index
    return t


SHAPES = [(7, 33, 1), (3, 1000, 1), (5, 17, 3), (4, 1, 1), (2, 300, 2)]
LAYOUTS = ["contiguous", "transposed", "sliced", "classes_last"]
CONFIGS = [  # (weighted, label_smoothing, z_loss, ignore_index, grad_scale)
    (False, 0.0, 0.0, -100, None),
    (True, 0.1, 1e-2, -100, "rows"),
    (False, 0.2, 0.0, 2, "one"),
    (True, 0.0, 1e-3, -100, "one"),
]


def config_tensors(cfg, x):
    weighted, eps, zl, ii, sk = cfg
    N, C, D = x.shape
    acc = acc_of(x.dtype)
    w = (torch.rand(C, dtype=acc) + 0.5) if weighted else None
    scale = {None: None, "one": torch.rand(1, dtype=acc) + 0.5, "rows": torch.rand(N * D, dtype=acc) + 0.5}[sk]
    return w, eps, zl, ii, scale


# ---------------------------------------------------------------------------------------------------------
# Numerics

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_fwd_bwd_match_oracle(dtype, layout, kind):
    gtol = GRAD_TOL[dtype]
    ltol = LOSS_TOL.get(dtype, LOSS_TOL_LOW)
    for shape in SHAPES:
        if layout == "classes_last" and shape[2] == 1:
            continue  # same as contiguous
        x = make_logits(layout, *shape, dtype)
        for cfg in CONFIGS:
            w, eps, zl, ii, scale = config_tensors(cfg, x)
            t = make_target(kind, x, ii)
            where = f"{tuple(shape)} {layout} {kind} {cfg}"
            rloss, rlse, rgrad = oracle(x, t, w, ii, eps, zl, scale)

            loss, lse, grad = ops.cross_entropy_fwd(x, t, w, scale, ii, eps, zl, True)
            assert loss.dtype == lse.dtype == acc_of(dtype) and loss.shape == lse.shape == (x.shape[0] * x.shape[2],)
            assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
            assert_close(f"loss {where}", loss, rloss, *ltol)
            assert_close(f"lse {where}", lse, rlse, *ltol)
            assert_close(f"grad {where}", grad, rgrad, *gtol)
            if kind == "index":  # ignored rows: loss and gradient exactly 0, lse still computed
                ign = t == ii
                assert (loss[ign] == 0).all() and torch.isfinite(lse[ign]).all()
                assert (grad.permute(0, 2, 1).reshape(-1, x.shape[1])[ign] == 0).all()

            # Without the gradient: the same loss and lse, and an empty (0,) gradient of the logits' dtype.
            loss2, lse2, g2 = ops.cross_entropy_fwd(x, t, w, scale, ii, eps, zl, False)
            assert g2.shape == (0,) and g2.dtype == dtype
            assert torch.equal(loss2, loss) and torch.equal(lse2, lse)

            # The backward from the saved lse: the same gradient, scaled by grad_rows.
            grad_rows = scale if scale is not None else torch.ones(1, dtype=acc_of(dtype))
            gb = ops.cross_entropy_bwd(grad_rows, x, t, w, lse, ii, eps, zl)
            assert gb.shape == x.shape and gb.is_contiguous() and gb.dtype == dtype
            assert_close(f"bwd grad {where}", gb, rgrad, *gtol)
            assert_close(f"bwd vs fused grad {where}", gb, grad, *gtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_(dtype):
    acc = acc_of(dtype)
    N, C, D = 5, 37, 3
    x = make_logits("contiguous", N, C, D, dtype)
    _, _, grad = ops.cross_entropy_fwd(x, torch.randint(0, C, (N * D,)), None, None, -100, 0.0, 0.0, True)
    before = grad.clone()
    ops.cross_entropy_scale_grad_(grad, torch.ones(1, dtype=acc))  # the no-op fast path
    assert torch.equal(grad, before)
    for s in (torch.tensor([2.5], dtype=acc), torch.tensor([-0.3], dtype=acc), torch.rand(N * D, dtype=acc) + 0.5):
        g = before.clone()
        ops.cross_entropy_scale_grad_(g, s)
        # multiplied in the accumulation dtype, one rounding; row r = n*D + d scales g[n, :, d]
        expected = (before.to(acc) * s.view(N, 1, D) if s.numel() > 1 else before.to(acc) * s).to(dtype)
        assert torch.equal(g, expected), (s.numel(), (g.double() - expected.double()).abs().max())


def test_out_of_range_targets_give_nan_rows():
    N, C = 6, 11
    x = make_logits("contiguous", N, C, 1, torch.float32)
    t = torch.randint(0, C, (N,))
    t[1], t[3], t[4] = C, -5, -100  # too large, negative, ignored
    rloss, rlse, rgrad = oracle(x, t)
    loss, lse, grad = ops.cross_entropy_fwd(x, t, None, None, -100, 0.1, 1e-3, True)
    assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(grad[[1, 3]]).all()
    assert loss[4] == 0 and (grad[4] == 0).all() and torch.isfinite(lse).all()
    good = [0, 2, 5]
    assert torch.isfinite(loss[good]).all() and torch.isfinite(grad[good]).all()
    gb = ops.cross_entropy_bwd(torch.ones(N), x, t, None, lse, -100, 0.0, 0.0)
    assert_close("bwd", gb, rgrad, *GRAD_TOL[torch.float32], equal_nan=True)
    assert torch.isnan(gb[[1, 3]]).all() and (gb[4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_minus_inf_logits_without_smoothing(dtype):
    # Masked-out classes (-inf) are legal: no 0 * inf = NaN from the skipped smoothing / z-loss terms.
    x = make_logits("contiguous", 4, 40, 1, dtype)
    t = torch.randint(0, 20, (4,))
    x[:, 25:] = float("-inf")
    loss, lse, grad = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, True)
    rloss, rlse, rgrad = oracle(x, t)
    assert_close("loss", loss, rloss, *LOSS_TOL.get(dtype, LOSS_TOL_LOW))
    assert (grad[:, 25:] == 0).all()
    assert_close("grad", grad, rgrad, *GRAD_TOL[dtype])


def test_large_common_offset_keeps_loss_exact():
    # loss = lse - x_y must not inherit the rounding of lse ~ 1e4 (fp32 ulp there: 1e-3).
    x = make_logits("contiguous", 8, 500, 1, torch.float32) + 1e4
    t = torch.randint(0, 500, (8,))
    loss, _, _ = ops.cross_entropy_fwd(x, t, None, None, -100, 0.1, 0.0, False)
    rloss, _, _ = oracle(x, t, eps=0.1)
    assert_close("loss", loss, rloss, 1e-5, 1e-5)


def test_empty_batch():
    x = torch.randn(0, 7, 1)
    loss, lse, grad = ops.cross_entropy_fwd(x, torch.zeros(0, dtype=torch.long), None, None, -100, 0.0, 0.0, True)
    assert loss.shape == lse.shape == (0,) and grad.shape == (0, 7, 1)
    assert ops.cross_entropy_bwd(torch.ones(1), x, torch.zeros(0, dtype=torch.long), None, lse, -100, 0.0,
                                 0.0).shape == (0, 7, 1)


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument

def test_bad_inputs_raise_naming_the_argument():
    x = torch.randn(4, 5, 1)
    t = torch.randint(0, 5, (4,))
    one = torch.ones(1)
    fwd = ops.cross_entropy_fwd
    cases = [
        (lambda: fwd(x[:, :, 0], t, None, None, -100, 0.0, 0.0, True), "logits must be 3-D"),
        (lambda: fwd(x.int(), t, None, None, -100, 0.0, 0.0, True), "logits must be float"),
        (lambda: fwd(x, t.int(), None, None, -100, 0.0, 0.0, True), "class-index target must be int64"),
        (lambda: fwd(x, t[:3], None, None, -100, 0.0, 0.0, True), "class-index target must be contiguous of shape"),
        (lambda: fwd(x, torch.rand(4, 5, 2), None, None, -100, 0.0, 0.0, True), "probability target must have"),
        (lambda: fwd(x, torch.rand(4, 5, 1).double(), None, None, -100, 0.0, 0.0, True),
         "probability target must be"),
        (lambda: fwd(x, t, torch.ones(4), None, -100, 0.0, 0.0, True), "weight must have 5 elements"),
        (lambda: fwd(x, t, torch.ones(5).double(), None, -100, 0.0, 0.0, True), "weight must be Float"),
        (lambda: fwd(x, t, torch.ones(10)[::2], None, -100, 0.0, 0.0, True), "weight must be contiguous"),
        (lambda: fwd(x, t, None, torch.ones(3), -100, 0.0, 0.0, True), "grad_scale must have 4 elements"),
        (lambda: ops.cross_entropy_bwd(one, x, t, None, torch.zeros(3), -100, 0.0, 0.0), "lse must have 4"),
        (lambda: ops.cross_entropy_bwd(torch.ones(2), x, t, None, torch.zeros(4), -100, 0.0, 0.0),
         "grad_scale must have 4"),
        (lambda: ops.cross_entropy_scale_grad_(torch.randn(5, 4, 1).transpose(0, 1), one),
         "grad must be contiguous"),
        (lambda: ops.cross_entropy_scale_grad_(torch.randn(4, 5, 1), torch.ones(2)), "scale must have 4"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


# ---------------------------------------------------------------------------------------------------------
# opcheck: schema, fake impls (pykernels/ops/cross_entropy.py), and AOT dispatch of the CPU kernels

def _opcheck_samples():
    N, C, D = 3, 13, 2
    M = N * D
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        acc = acc_of(dtype)
        x = make_logits("contiguous", N, C, D, dtype)
        xt = make_logits("transposed", N, C, D, dtype)
        t = make_target("index", x)
        p = make_target("prob", x)
        w = torch.rand(C, dtype=acc) + 0.5
        yield "fwd", (x, t, None, None, -100, 0.0, 0.0, True)
        yield "fwd", (xt, t, w, torch.rand(M, dtype=acc), -100, 0.1, 1e-3, True)
        yield "fwd", (x, p, w, torch.rand(1, dtype=acc), -100, 0.2, 0.0, False)
        lse = torch.logsumexp(x.to(acc), 1).reshape(-1)  # row r = n*D + d
        yield "bwd", (torch.rand(M, dtype=acc), x, t, w, lse, -100, 0.1, 1e-3)
        yield "bwd", (torch.rand(1, dtype=acc), xt, p, None, lse, -100, 0.0, 0.0)
        yield "scale", (torch.randn(N, C, D, dtype=dtype), torch.rand(M, dtype=acc))
        yield "scale", (torch.randn(N, C, D, dtype=dtype), torch.ones(1, dtype=acc))


def test_opcheck():
    fns = {"fwd": ops.cross_entropy_fwd.default, "bwd": ops.cross_entropy_bwd.default,
           "scale": ops.cross_entropy_scale_grad_.default}
    for name, args in _opcheck_samples():
        # All utils, test_aot_dispatch_dynamic included; the kernel ops have no autograd of their own
        # (pykernels::cross_entropy carries it), so their inputs do not require grad.
        torch.library.opcheck(fns[name], args)

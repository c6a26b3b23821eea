"""The kernels of pykernels._C, called directly (torch.ops.pykernels.cross_entropy_*), against a float64 oracle
written here from the formulas of docs/cross_entropy.md (loss by log_softmax, gradient by autograd). CPU tensors
in CI; the same checks on CUDA tensors in the GPU tier (`-m gpu`), plus shapes that take the CUDA kernels' other
paths (misaligned rows, the sm_90 cluster kernel for rows >= 16 KB).

Every test runs with torch's deterministic mode, whose empty() fills new float tensors with NaN: an output
element the kernel forgets to write (an ignored row's zero gradient included) fails the comparison. Each test runs
with the CPU kernels at each ISA level this machine has (conftest.cpu_kernel_level: AVX-512, and _C's own build).
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

pytestmark = pytest.mark.usefixtures("cpu_kernel_level")
ops = torch.ops.pykernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
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


def skip_unsupported(device, dtype=None):
    if device == "cuda" and not _ext.has_cuda_kernels():
        pytest.fail("_C was built without its CUDA kernels") if torch.version.cuda else pytest.skip("CPU torch")
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only (docs/cross_entropy.md)")


# ---------------------------------------------------------------------------------------------------------
# Oracle

def oracle(x, target, weight=None, ignore_index=-100, eps=0.0, zl=0.0, scale=None):
    """(loss, lse, grad) of the contract in float64 on the canonical (N, C, D) view; grad is
    scale[r] * dloss_r/dlogits, NaN rows for out-of-range class indices."""
    x, target = x.detach().cpu(), target.cpu()
    weight = None if weight is None else weight.cpu()
    scale = None if scale is None else scale.cpu()
    N, C, D = x.shape
    M = N * D
    xr = x.double().permute(0, 2, 1).reshape(M, C).requires_grad_()
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
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Inputs

def make_logits(layout, N, C, D, dtype, device="cpu"):
    """Random logits (scaled so rows are far from uniform) in the requested memory layout."""
    def r(*shape):
        return (torch.randn(*shape, dtype=torch.float64, device=device) * 3).to(dtype)
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
        return torch.softmax(torch.randn(N, C, D, dtype=torch.float64, device=x.device) * 2, 1).to(x.dtype)
    t = torch.randint(0, C, (N * D,), device=x.device)
    t[1::3] = ignore_index
    return t


# (C = 4099: the forward without a gradient streams rows in chunks of 2048 classes, the last one a 3-class tail)
SHAPES = [(7, 33, 1), (3, 1000, 1), (5, 17, 3), (4, 1, 1), (2, 300, 2), (2, 4099, 1)]
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
    acc, dev = acc_of(x.dtype), x.device
    w = (torch.rand(C, dtype=acc, device=dev) + 0.5) if weighted else None
    scale = {None: None, "one": torch.rand(1, dtype=acc, device=dev) + 0.5,
             "rows": torch.rand(N * D, dtype=acc, device=dev) + 0.5}[sk]
    return w, eps, zl, ii, scale


# ---------------------------------------------------------------------------------------------------------
# Numerics

def check_against_oracle(x, kind, configs=CONFIGS, layout=""):
    """fwd with and without the gradient, and bwd from the saved lse and lse_err, against the oracle for each
    config."""
    dtype = x.dtype
    gtol = GRAD_TOL[dtype]
    ltol = LOSS_TOL.get(dtype, LOSS_TOL_LOW)
    shape = tuple(x.shape)
    for cfg in configs:
        w, eps, zl, ii, scale = config_tensors(cfg, x)
        t = make_target(kind, x, ii)
        where = f"{shape} {layout} {kind} {cfg}"
        rloss, rlse, rgrad = oracle(x, t, w, ii, eps, zl, scale)

        loss, lse, grad, lse_err = ops.cross_entropy_fwd(x, t, w, scale, ii, eps, zl, True)
        assert loss.dtype == lse.dtype == lse_err.dtype == acc_of(dtype)
        assert loss.shape == lse.shape == lse_err.shape == (x.shape[0] * x.shape[2],)
        # lse's rounding residual: at most half an ulp of lse (eps |lse| bounds a whole one)
        assert (lse_err.abs() <= torch.finfo(lse.dtype).eps * lse.abs()).all(), where
        assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
        assert_close(f"loss {where}", loss, rloss, *ltol)
        assert_close(f"lse {where}", lse, rlse, *ltol)
        assert_close(f"grad {where}", grad, rgrad, *gtol)
        if kind == "index":  # ignored rows: loss and gradient exactly 0, lse still computed
            ign = t == ii
            assert (loss[ign] == 0).all() and torch.isfinite(lse[ign]).all()
            assert (grad.permute(0, 2, 1).reshape(-1, x.shape[1])[ign] == 0).all()

        # Without the gradient: the same loss and lse (bitwise on the CPU for rows of up to 2048 classes, one chunk
        # of its streaming forward, longer rows may differ in the last bits; on CUDA another kernel may sum in
        # another order), and an empty (0,) gradient of the logits' dtype.
        loss2, lse2, g2, lse_err2 = ops.cross_entropy_fwd(x, t, w, scale, ii, eps, zl, False)
        assert g2.shape == (0,) and g2.dtype == dtype
        if x.device.type == "cpu" and x.shape[1] <= 2048:
            assert torch.equal(loss2, loss) and torch.equal(lse2, lse) and torch.equal(lse_err2, lse_err)
        assert_close(f"loss without grad {where}", loss2, rloss, *ltol)
        assert_close(f"lse without grad {where}", lse2, rlse, *ltol)

        # The backward from the saved lse and lse_err: the same gradient, scaled by grad_rows; lse_err None
        # (taken as 0: an lse from elsewhere) too, at these moderate logits.
        grad_rows = scale if scale is not None else torch.ones(1, dtype=acc_of(dtype), device=x.device)
        gb = ops.cross_entropy_bwd(grad_rows, x, t, w, lse, lse_err, ii, eps, zl)
        assert gb.shape == x.shape and gb.is_contiguous() and gb.dtype == dtype
        assert_close(f"bwd grad {where}", gb, rgrad, *gtol)
        assert_close(f"bwd vs fused grad {where}", gb, grad, *gtol)
        gn = ops.cross_entropy_bwd(grad_rows, x, t, w, lse, None, ii, eps, zl)
        assert_close(f"bwd grad without lse_err {where}", gn, rgrad, *gtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_fwd_bwd_match_oracle(device, dtype, layout, kind):
    skip_unsupported(device, dtype)
    for shape in SHAPES:
        if layout == "classes_last" and shape[2] == 1:
            continue  # same as contiguous
        check_against_oracle(make_logits(layout, *shape, dtype, device), kind, layout=layout)


# Launch knobs of csrc/cuda (read at each launch): the sm_90 cluster kernel's opt-in cp.async loads, and the
# L2-resident kernel forced for shapes the cluster kernel would take.
CUDA_PATHS = {"default": {}, "cluster_cpasync": {"PYKERNELS_CE_CLUSTER_CPASYNC": "1"},
              "no_cluster": {"PYKERNELS_CE_NO_CLUSTER": "1"}}


@pytest.mark.gpu
@pytest.mark.parametrize("path", list(CUDA_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("C", [50257, 32768, 128256, 131077])
def test_cuda_large_vocab_paths(dtype, C, path, monkeypatch):
    """Rows of 16 KB and more take the sm_90 cluster kernel (row in shared memory, up to 8 CTAs per row) when
    the gradient is written; odd C puts rows off 16-byte alignment (scalar head + vectors); sliced rows and
    probability targets take the L2 kernel."""
    skip_unsupported("cuda", dtype)
    for k, v in CUDA_PATHS[path].items():
        monkeypatch.setenv(k, v)
    cfgs = CONFIGS[:2]
    for layout in ("contiguous", "sliced"):
        check_against_oracle(make_logits(layout, 5, C, 1, dtype, "cuda"), "index", cfgs, layout)
    check_against_oracle(make_logits("contiguous", 2, C, 1, dtype, "cuda"), "prob", cfgs[:1], "contiguous")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_(device, dtype):
    skip_unsupported(device, dtype)
    acc = acc_of(dtype)
    N, C, D = 5, 37, 3
    x = make_logits("contiguous", N, C, D, dtype, device)
    t = torch.randint(0, C, (N * D,), device=device)
    _, _, grad, _ = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, True)
    before = grad.clone()
    ops.cross_entropy_scale_grad_(grad, torch.ones(1, dtype=acc, device=device))  # the no-op fast path
    assert torch.equal(grad, before)
    for s in (torch.tensor([2.5], dtype=acc, device=device), torch.tensor([-0.3], dtype=acc, device=device),
              torch.rand(N * D, dtype=acc, device=device) + 0.5):
        g = before.clone()
        ops.cross_entropy_scale_grad_(g, s)
        # multiplied in the accumulation dtype, one rounding; row r = n*D + d scales g[n, :, d]
        expected = (before.to(acc) * s.view(N, 1, D) if s.numel() > 1 else before.to(acc) * s).to(dtype)
        assert torch.equal(g, expected), (s.numel(), (g.double() - expected.double()).abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_targets_give_nan_rows(device):
    skip_unsupported(device)
    N, C = 6, 11
    x = make_logits("contiguous", N, C, 1, torch.float32, device)
    t = torch.randint(0, C, (N,), device=device)
    t[1], t[3], t[4] = C, -5, -100  # too large, negative, ignored
    rloss, rlse, rgrad = oracle(x, t)
    loss, lse, grad, lse_err = ops.cross_entropy_fwd(x, t, None, None, -100, 0.1, 1e-3, True)
    assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(grad[[1, 3]]).all()
    assert loss[4] == 0 and (grad[4] == 0).all() and torch.isfinite(lse).all()
    good = [0, 2, 5]
    assert torch.isfinite(loss[good]).all() and torch.isfinite(grad[good]).all()
    gb = ops.cross_entropy_bwd(torch.ones(N, device=device), x, t, None, lse, lse_err, -100, 0.0, 0.0)
    assert_close("bwd", gb, rgrad, *GRAD_TOL[torch.float32], equal_nan=True)
    assert torch.isnan(gb[[1, 3]]).all() and (gb[4] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_minus_inf_logits_without_smoothing(device, dtype):
    # Masked-out classes (-inf) are legal: no 0 * inf = NaN from the skipped smoothing / z-loss terms.
    skip_unsupported(device, dtype)
    x = make_logits("contiguous", 4, 40, 1, dtype, device)
    t = torch.randint(0, 20, (4,), device=device)
    x[:, 25:] = float("-inf")
    loss, lse, grad, _ = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, True)
    rloss, rlse, rgrad = oracle(x, t)
    assert_close("loss", loss, rloss, *LOSS_TOL.get(dtype, LOSS_TOL_LOW))
    assert (grad[:, 25:] == 0).all()
    assert_close("grad", grad, rgrad, *GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_minus_inf_logits_with_zero_probability_target_or_weight(device, dtype):
    # docs/cross_entropy.md: a probability target (or class weight) of 0 at a -inf logit adds nothing (torch's
    # -sum t log_softmax gives NaN there): the loss is the row's loss without those classes, their gradient 0.
    # (Dropping the `& (wt != zero)` mask of the relative sums, 0 * inf = NaN, passed every test: mutation review.)
    skip_unsupported(device, dtype)
    N, C, keep = 4, 40, 25
    x = make_logits("contiguous", N, C, 1, dtype, device)
    x[:, keep:] = float("-inf")
    t = make_target("prob", x)
    t0 = t.clone()
    t0[:, keep:] = 0  # zero targets at the masked classes
    wpos = torch.rand(C, dtype=acc_of(dtype), device=device) + 0.5
    w = wpos.clone()
    w[keep:] = 0  # or zero weights there (targets > 0, with smoothing: t' = eps / C > 0 too)
    for tt, ww, eps in ((t0, None, 0.0), (t0, wpos, 0.0), (t, w, 0.1)):
        # oracle on the kept classes, the targets smoothed over all C classes beforehand
        tk = ((1 - eps) * tt.double() + eps / C)[:, :keep]
        rloss, rlse, rgrad = oracle(x[:, :keep], tk, None if ww is None else ww[:keep])
        ltol = LOSS_TOL.get(dtype, LOSS_TOL_LOW)
        for write_grad in (False, True):  # the streaming forward, then the one that keeps the gradient
            loss, lse, grad, lse_err = ops.cross_entropy_fwd(x, tt, ww, None, -100, eps, 0.0, write_grad)
            assert_close(f"loss eps={eps} grad={write_grad}", loss, rloss, *ltol)
            assert_close(f"lse eps={eps} grad={write_grad}", lse, rlse, *ltol)
        assert (grad[:, keep:] == 0).all()
        assert_close(f"grad eps={eps}", grad[:, :keep], rgrad, *GRAD_TOL[dtype])
        gb = ops.cross_entropy_bwd(torch.ones(1, dtype=acc_of(dtype), device=device), x, tt, ww, lse, lse_err,
                                   -100, eps, 0.0)
        assert (gb[:, keep:] == 0).all()
        assert_close(f"bwd grad eps={eps}", gb[:, :keep], rgrad, *GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_large_common_offset_keeps_loss_exact(device):
    # loss = lse - x_y must not inherit the rounding of lse ~ 1e4 (fp32 ulp there: 1e-3).
    skip_unsupported(device)
    x = make_logits("contiguous", 8, 500, 1, torch.float32, device) + 1e4
    t = torch.randint(0, 500, (8,), device=device)
    loss, lse, _, lse_err = ops.cross_entropy_fwd(x, t, None, None, -100, 0.1, 0.0, False)
    rloss, rlse, rgrad = oracle(x, t, eps=0.1)
    assert_close("loss", loss, rloss, 1e-5, 1e-5)
    # lse + lse_err is m + log s to twice fp32's precision: the backward's probabilities do not inherit lse's
    # rounding either (exp(x - lse) alone: errors of ulp(1e4) / 2 = 5e-4 relative in every p).
    assert ((lse.double() + lse_err.double()) - rlse).abs().max() < 2e-5  # lse alone: up to 4.9e-4
    gb = ops.cross_entropy_bwd(torch.ones(1, device=device), x, t, None, lse, lse_err, -100, 0.1, 0.0)
    assert_close("bwd grad", gb, rgrad, 1e-5, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    skip_unsupported(device)
    x = torch.randn(0, 7, 1, device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss, lse, grad, lse_err = ops.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, True)
    assert loss.shape == lse.shape == lse_err.shape == (0,) and grad.shape == (0, 7, 1)
    assert ops.cross_entropy_bwd(torch.ones(1, device=device), x, t, None, lse, lse_err, -100, 0.0,
                                 0.0).shape == (0, 7, 1)
    ops.cross_entropy_scale_grad_(grad, torch.full((1,), 2.0, device=device))


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
        (lambda: ops.cross_entropy_bwd(one, x, t, None, torch.zeros(3), None, -100, 0.0, 0.0), "lse must have 4"),
        (lambda: ops.cross_entropy_bwd(one, x, t, None, torch.zeros(4), torch.zeros(3), -100, 0.0, 0.0),
         "lse_err must have 4"),
        (lambda: ops.cross_entropy_bwd(one, x, t, None, torch.zeros(4), torch.zeros(4).double(), -100, 0.0, 0.0),
         "lse_err must be Float"),
        (lambda: ops.cross_entropy_bwd(torch.ones(2), x, t, None, torch.zeros(4), None, -100, 0.0, 0.0),
         "grad_scale must have 4"),
        (lambda: ops.cross_entropy_scale_grad_(torch.randn(5, 4, 1).transpose(0, 1), one),
         "grad must be contiguous"),
        (lambda: ops.cross_entropy_scale_grad_(torch.randn(4, 5, 1), torch.ones(2)), "scale must have 4"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


@pytest.mark.gpu
def test_cuda_bad_inputs():
    skip_unsupported("cuda")
    x = torch.randn(4, 5, 1, device="cuda")
    t = torch.randint(0, 5, (4,), device="cuda")
    with pytest.raises(RuntimeError, match="target must be on cuda"):
        ops.cross_entropy_fwd(x, t.cpu(), None, None, -100, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="weight must be on cuda"):
        ops.cross_entropy_fwd(x, t, torch.ones(5), None, -100, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="float64 logits are not supported"):
        ops.cross_entropy_fwd(x.double(), t, None, None, -100, 0.0, 0.0, True)


# ---------------------------------------------------------------------------------------------------------
# opcheck: schema, fake impls (pykernels/ops/cross_entropy.py), and AOT dispatch of the CPU kernels

def _opcheck_samples(device):
    N, C, D = 3, 13, 2
    M = N * D
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        if device == "cuda" and dtype == torch.float64:
            continue
        acc = acc_of(dtype)

        def rand(*shape):
            return torch.rand(*shape, dtype=acc, device=device) + 0.5
        x = make_logits("contiguous", N, C, D, dtype, device)
        xt = make_logits("transposed", N, C, D, dtype, device)
        t = make_target("index", x)
        p = make_target("prob", x)
        w = rand(C)
        yield "fwd", (x, t, None, None, -100, 0.0, 0.0, True)
        yield "fwd", (xt, t, w, rand(M), -100, 0.1, 1e-3, True)
        yield "fwd", (x, p, w, rand(1), -100, 0.2, 0.0, False)
        lse = torch.logsumexp(x.to(acc), 1).reshape(-1)  # row r = n*D + d
        lse_err = (torch.rand(M, dtype=acc, device=device) - 0.5) * torch.finfo(acc).eps
        yield "bwd", (rand(M), x, t, w, lse, lse_err, -100, 0.1, 1e-3)
        yield "bwd", (rand(1), xt, p, None, lse, None, -100, 0.0, 0.0)
        yield "scale", (make_logits("contiguous", N, C, D, dtype, device), rand(M))
        yield "scale", (make_logits("contiguous", N, C, D, dtype, device), torch.ones(1, dtype=acc, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_unsupported(device)
    fns = {"fwd": ops.cross_entropy_fwd.default, "bwd": ops.cross_entropy_bwd.default,
           "scale": ops.cross_entropy_scale_grad_.default}
    for name, args in _opcheck_samples(device):
        # All utils, test_aot_dispatch_dynamic included; the kernel ops have no autograd of their own
        # (pykernels::cross_entropy carries it), so their inputs do not require grad.
        torch.library.opcheck(fns[name], args)

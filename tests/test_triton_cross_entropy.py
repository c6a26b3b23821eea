"""The Triton cross-entropy launchers (pykernels/triton/cross_entropy.py) called directly, on CPU tensors under
the Triton interpreter, against a float64 oracle (contract: docs/cross_entropy.md); and the kernels compiled
for sm_80 / sm_90 without a GPU."""
from __future__ import annotations

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (CI also sets it for the whole run)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from pykernels.reference.cross_entropy import cross_entropy_rows  # noqa: E402
from pykernels.triton import cross_entropy as k  # noqa: E402

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(k._cross_entropy_kernel, InterpretedFunction):
    # imported earlier in this process without the interpreter: @triton.jit reads the flag when it decorates
    k = importlib.reload(k)

DTYPES = [torch.float32, torch.float16]  # no bf16 in the interpreter
IGNORE = -100


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every torch.empty the launchers allocate starts as NaN / garbage: the kernels must write every output."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -12345)
    monkeypatch.setattr(torch, "empty", poisoned)


def _logits(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype)


def _targets(M, C, n_ignored=1):
    t = torch.randint(0, C, (M,))
    t[torch.randperm(M)[:n_ignored]] = IGNORE
    return t


def _oracle(x, target, weight, scale, eps, zl):
    """float64 (loss, lse, grad) of the rows; grad = scale[r] * dloss_r / dx (rows with NaN loss: zero here)."""
    xd = x.detach().double().requires_grad_()
    w = None if weight is None else weight.double().expand(x.shape[1])
    t = target.double() if target.dtype.is_floating_point else target
    loss, lse = cross_entropy_rows(xd, t, w, IGNORE, eps, zl)
    s = torch.ones_like(loss) if scale is None else scale.double().expand_as(loss)
    (torch.where(loss.isnan(), 0.0, loss) * s).sum().backward()
    return loss, lse, xd.grad


def _close(ours, ref, tol, what):
    ours = ours.double()
    assert ours.isnan().equal(ref.isnan()), f"{what}: NaN pattern"
    err = (ours - ref).nan_to_num(0).abs().max().item() if ref.numel() else 0.0
    bound = tol * (1 + ref.nan_to_num(0).abs().max().item() if ref.numel() else 1)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _grad_tol(dtype):
    return 2e-6 if dtype == torch.float32 else 2e-3  # relative to max |grad|: one rounding of the output dtype


def _check_fwd(x, target, weight=None, scale=None, eps=0.0, zl=0.0):
    """Forward with and without the gradient against the oracle; ignored rows exactly 0, bad rows NaN."""
    N, C, D = x.shape
    ref_loss, ref_lse, ref_grad = _oracle(x, target, weight, scale, eps, zl)
    loss, lse, grad = k.cross_entropy_fwd(x, target, weight, scale, IGNORE, eps, zl, True)
    loss0, lse0, none = k.cross_entropy_fwd(x, target, weight, scale, IGNORE, eps, zl, False)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (N * D,)
    assert grad.shape == (N, C, D) and grad.dtype == x.dtype and grad.is_contiguous()
    assert none.shape == (0,) and none.dtype == x.dtype
    torch.testing.assert_close(loss0, loss, rtol=0, atol=0, equal_nan=True, msg="single-pass forward differs")
    torch.testing.assert_close(lse0, lse, rtol=0, atol=0, equal_nan=True, msg="single-pass forward differs")
    _close(loss, ref_loss, 2e-6, "loss")
    _close(lse, ref_lse, 2e-6, "lse")
    rows_grad = grad.permute(0, 2, 1).reshape(N * D, C)
    ref_rows = ref_grad.permute(0, 2, 1).reshape(N * D, C)
    if not target.dtype.is_floating_point:
        ignored = target == IGNORE
        bad = ~ignored & ((target < 0) | (target >= C))
        assert (rows_grad[ignored] == 0).all(), "ignored rows must be exactly 0"
        assert rows_grad[bad].isnan().all(), "out-of-range rows must be NaN"
        ref_rows = torch.where(bad[:, None], float("nan"), ref_rows)
    _close(rows_grad, ref_rows, _grad_tol(x.dtype), "grad")
    return loss, lse, grad


CASES = {  # N, C, D, weighted, label_smoothing, z_loss
    "plain": (5, 37, 1, False, 0.0, 0.0),
    "weighted_smooth_z": (4, 50, 1, True, 0.1, 1e-3),
    "spatial": (2, 7, 9, True, 0.05, 0.0),
    "one_class": (3, 1, 2, False, 0.0, 1e-2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_index_targets(dtype, case):
    N, C, D, weighted, eps, zl = CASES[case]
    x = _logits((N, C, D), dtype)
    t = _targets(N * D, C)
    w = torch.rand(C) + 0.5 if weighted else None
    _check_fwd(x, t, w, None, eps, zl)
    _check_fwd(x, t, w, torch.rand(1) + 0.5, eps, zl)       # one scale for all rows
    _check_fwd(x, t, w, torch.rand(N * D) + 0.5, eps, zl)   # one scale per row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probability_targets(dtype):
    N, C, D = 3, 29, 2
    x = _logits((N, C, D), dtype)
    t = torch.softmax(torch.randn(N, C, D), 1)
    t[0, :, 0] = 0
    t[0, 3, 0] = 1  # a one-hot row
    _check_fwd(x, t)
    _check_fwd(x, t.to(dtype), torch.rand(C) + 0.5, torch.rand(N * D) + 0.5, 0.1, 1e-3)
    _check_fwd(x, t.transpose(0, 2).contiguous().transpose(0, 2), None, None, 0.2, 0.0)  # strided targets


def test_out_of_range_targets_are_nan():
    x = _logits((4, 10, 1), torch.float32)
    t = torch.tensor([3, 10, -5, IGNORE])
    loss, lse, grad = _check_fwd(x, t, torch.rand(10) + 0.5, None, 0.1, 1e-3)
    assert loss[1:3].isnan().all() and loss[3] == 0 and lse.isfinite().all()


def test_broadcast_weight():
    """A one-element weight broadcasts over the classes."""
    x = _logits((6, 13, 1), torch.float32)
    _check_fwd(x, _targets(6, 13), torch.tensor([1.7]), None, 0.1, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_block_rows(dtype, monkeypatch):
    """Rows spanning several chunks (a chunk of 16 classes forced), C not a multiple of the chunk; and tiles of
    several rows with a masked tail tile."""
    monkeypatch.setenv("PYKERNELS_CE_BLOCK_BYTES", str(16 * torch.empty(0, dtype=dtype).element_size()))
    x = _logits((3, 67, 1), dtype, scale=5.0)
    _check_fwd(x, _targets(3, 67), torch.rand(67) + 0.5, torch.rand(1) + 0.5, 0.1, 1e-3)
    assert k._plan(67, 3, x.element_size(), x.device, True)[:2] == (4, 16)  # 5 chunks, a tile of 4 rows
    monkeypatch.delenv("PYKERNELS_CE_BLOCK_BYTES")
    x = _logits((11, 5, 1), dtype)  # 11 rows in tiles of 16 (interpreter config)
    assert k._plan(5, 11, x.element_size(), x.device, True)[0] == 16
    _check_fwd(x, _targets(11, 5, n_ignored=3), None, torch.rand(11) + 0.5, 0.0, 0.0)


def test_non_contiguous_logits():
    base = _logits((9, 40), torch.float32)
    t = _targets(3, 17)
    _check_fwd(base[::3, 1:35:2].unsqueeze(2), t)                 # strided rows and classes
    _check_fwd(base.t()[:17, :3].t().unsqueeze(2), t, torch.rand(17) + 0.5, None, 0.1, 0.0)  # column-major
    _check_fwd(_logits((2, 20, 3), torch.float32).permute(0, 2, 1), _targets(40, 3))  # channels-last (N, C, D)
    _check_fwd(_logits((3, 5, 4), torch.float32).transpose(0, 2).contiguous().transpose(0, 2), _targets(12, 5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_bwd_equals_fused_gradient(dtype, prob):
    N, C, D = 4, 23, 2
    x = _logits((N, C, D), dtype)
    t = torch.softmax(torch.randn(N, C, D), 1) if prob else _targets(N * D, C)
    w = torch.rand(C) + 0.5
    scale = torch.rand(N * D) + 0.5
    _, lse, fused = k.cross_entropy_fwd(x, t, w, scale, IGNORE, 0.1, 1e-3, True)
    grad = k.cross_entropy_bwd(scale, x, t, w, lse, IGNORE, 0.1, 1e-3)
    assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
    ref = _oracle(x, t, w, scale, 0.1, 1e-3)[2]
    _close(grad, ref, _grad_tol(dtype), "bwd grad")
    _close(grad, fused.double(), 2 * _grad_tol(dtype), "bwd vs fused")
    if not prob:
        assert (grad.permute(0, 2, 1).reshape(N * D, C)[t == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(dtype):
    g = _logits((3, 7, 2), dtype)
    before = g.clone()
    k.cross_entropy_scale_grad_(g, torch.ones(1))
    assert torch.equal(g.view(torch.int16 if dtype == torch.float16 else torch.int32),
                       before.view(torch.int16 if dtype == torch.float16 else torch.int32)), "1.0 must be a no-op"
    k.cross_entropy_scale_grad_(g, torch.tensor([0.37]))
    torch.testing.assert_close(g, (before.float() * 0.37).to(dtype))
    g = before.clone()
    s = torch.rand(6) + 0.5  # per row r = n * D + d
    k.cross_entropy_scale_grad_(g, s)
    torch.testing.assert_close(g, (before.float() * s.view(3, 1, 2)).to(dtype))


def _confident_logits(N, C, p_y):
    """Rows whose softmax at the target is exactly p_y (in float64)."""
    x = torch.randn(N, C, dtype=torch.float64) * 0.5
    t = torch.randint(0, C, (N,))
    rest = torch.logsumexp(x.scatter(1, t[:, None], float("-inf")), 1)
    x.scatter_(1, t[:, None], (rest + torch.log(torch.tensor(p_y / (1 - p_y), dtype=torch.float64)))[:, None])
    return x, t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p_y", [0.9, 0.99, 0.999])
def test_confident_target_gradient(dtype, p_y):
    """The y entry p_y - 1 is formed in fp32 and rounded once: its relative error stays within 2x torch's (plus a
    floor of a few output ulps)."""
    x64, t = _confident_logits(8, 300, p_y)
    x = x64.to(dtype)
    ref = torch.softmax(x.double(), 1) - torch.nn.functional.one_hot(t, 300)
    xt = x.detach().requires_grad_()
    torch.nn.functional.cross_entropy(xt, t, reduction="sum").backward()
    ours = k.cross_entropy_fwd(x.unsqueeze(2), t, None, None, IGNORE, 0.0, 0.0, True)[2].squeeze(2)
    rows = torch.arange(8)
    ref_y = ref[rows, t]
    err_torch = ((xt.grad[rows, t].double() - ref_y) / ref_y).abs().max().item()
    err_ours = ((ours[rows, t].double() - ref_y) / ref_y).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps
    assert err_ours <= 2 * err_torch + floor, f"y entry: ours {err_ours:.3g}, torch {err_torch:.3g}"
    _close(ours, ref, _grad_tol(dtype), "grad")


def test_extreme_logits():
    """-inf logits (masked classes) and a large common offset: finite loss and lse, no NaN."""
    x = _logits((4, 19, 1), torch.float32)
    x[:, 5] = float("-inf")
    x[0, :7] = float("-inf")  # a lane whose first elements are all -inf
    x[2] += 1e4
    t = torch.tensor([8, 0, 3, IGNORE])
    loss, lse, grad = _check_fwd(x, t)
    assert loss.isfinite().all() and lse.isfinite().all() and grad.isfinite().all()


# ---------------------------------------------------------------------------------------------------------
# Compiled for real GPUs (no GPU needed).

_COMPILE = r'''
import json
from pykernels.triton import cross_entropy as k
from pykernels.triton._compile import compile_for, resource_usage, spills

SIG = {"TI": "*i64", "Wt": "*fp32", "Wsum": "*fp32", "Scale": "*fp32", "Loss": "*fp32", "Lse": "*fp32",
       "LseIn": "*fp32", "M": "i32", "C": "i32", "sn": "i64", "sd": "i64", "tn": "i64", "tc": "i64",
       "td": "i64", "scale_stride": "i32", "ignore_index": "i64", "eps": "fp32", "zl": "fp32"}
# what the runtime JIT specialises for contiguous (N, C) bf16 logits with C % 16 == 0 (sc = D = 1 become constants)
ALIGNED = ("X", "TI", "TP", "Wt", "Wsum", "Scale", "Loss", "Lse", "LseIn", "G", "C", "sn")
ALL = dict(HAS_W=True, SMOOTH=True, ZLOSS=True, HAS_SCALE=True)
NONE = dict(HAS_W=False, SMOOTH=False, ZLOSS=False, HAS_SCALE=True)
jobs = []
for C, elem, dt in ((128256, 2, "bf16"), (128256, 4, "fp32"), (32000, 2, "fp16"), (1000, 2, "bf16"), (32, 4, "fp32")):
    for mode in (0, 1, 2):
        rows, block, warps, programs = k.gpu_plan(C, 8192, elem, 132, 50 << 20, mode == 1)
        for prob, flags in ((False, NONE), (False, ALL), (True, ALL)):
            if C == 128256 or mode == 1:
                jobs.append((90, dt, C, mode, prob, flags, rows, block, warps, programs))
for mode in (0, 1, 2):
    jobs.append((80, "bf16", 128256, mode, False, ALL, *k.gpu_plan(128256, 8192, 2, 108, 40 << 20, mode == 1)))
out = []
for arch, dt, C, mode, prob, flags, rows, block, warps, programs in jobs:
    sig = dict(SIG, X="*" + dt, TP="*" + dt, G="*" + dt)
    c = compile_for(k._cross_entropy_kernel, sig, dict(sc=1, D=1, MODE=mode, PROB=prob, ROWS=rows, BLOCK=block,
                                                       **flags), arch, num_warps=warps, aligned=ALIGNED)
    ptx = c.asm["ptx"]
    out.append(dict(kernel="ce", arch=arch, dt=dt, C=C, mode=mode, prob=prob, plain=flags is NONE, rows=rows,
                    warps=warps, programs=programs, ptx=".entry" in ptx, v4="ld.global.v4" in ptx, spills=spills(c),
                    regs=resource_usage(c).get("reg", -1)))
for arch in (80, 90):
    for per_row in (False, True):
        c = compile_for(k._scale_grad_kernel, {"G": "*bf16", "Scale": "*fp32", "total": "i64", "CD": "i64",
                        "D": "i64"}, dict(PER_ROW=per_row, BLOCK=4096), arch, num_warps=8,
                        aligned=("G", "Scale", "total", "CD"))
        out.append(dict(kernel="scale", arch=arch, dt="bf16", mode=per_row, ptx=".entry" in c.asm["ptx"],
                        v4="ld.global.v4" in c.asm["ptx"], spills=spills(c), regs=resource_usage(c).get("reg", -1)))
print(json.dumps(out))
'''


def test_kernels_compile_for_sm80_and_sm90():
    """Each mode / target kind / flag set at the configurations a GPU would pick (H100: 132 SMs, 50 MB L2), for
    bf16, fp16 and fp32: PTX produced, vectorised loads, no spills. The big rows with the gradient get the
    persistent grid of one 32-warp program per SM (<= 64 registers, so all resident)."""
    from pykernels.triton._compile import run_uninterpreted
    rows = run_uninterpreted(_COMPILE)
    assert len(rows) == 2 * 9 + 3 * 3 + 3 + 4
    for r in rows:
        assert r["ptx"] and r["spills"] == 0, r
        assert r["v4"], f"loads not vectorised: {r}"
        if r["kernel"] == "ce" and r["mode"] == 1 and r["C"] == 128256:
            assert r["warps"] == 32 and r["programs"] in (108, 132) and 0 < r["regs"] <= 64, r

"""Operator-level checks of cross-entropy: opcheck, float64 gradcheck, torch.compile(fullgraph=True) parity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels.errors import ArgumentTypeError, ArgumentValueError
from pykernels.ops import cross_entropy as ce_ops
from pykernels.testing import max_abs_err

from conftest import backend_params, require_backend

KERNEL_BACKENDS = [p for p in backend_params(include_reference=False)]


def _dtype(backend, device):
    return torch.float32 if backend == "triton" or device == "cuda" else torch.float64


def _samples(device, dtype):
    """Arguments of pykernels::cross_entropy covering index/probability targets, weight, D > 1, reductions."""
    N, C, D = 5, 19, 3
    x = torch.randn(N, C, D, device=device, dtype=dtype)
    t = torch.randint(0, C, (N * D,), device=device)
    t[::4] = -100
    p = torch.softmax(torch.randn(N, C, D, device=device, dtype=dtype), 1)
    w = (torch.rand(C, device=device) + 0.5).to(ce_ops.acc_dtype(dtype))
    out = []
    for reduction in (ce_ops.NONE, ce_ops.MEAN, ce_ops.SUM):
        for write_grad in (False, True):
            out.append((x, t, None, -100, reduction, 0.0, 0.0, write_grad))
            out.append((x, t, w, -100, reduction, 0.1, 1e-3, write_grad))
            out.append((x[:, :, :1].transpose(0, 2).contiguous().transpose(0, 2), t[:N], w, -100, reduction,
                        0.0, 0.0, write_grad))  # non-contiguous logits
            out.append((x, p, w, -100, reduction, 0.2, 0.0, write_grad))
    return out


def _utils(backend, device):
    # AOT tracing runs wrap_triton kernels on fake tensors, which the CPU interpreter cannot execute; the
    # compiled-GPU tier runs every util.
    if backend == "triton" and device == "cpu":
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    require_backend(backend, device)
    for args in _samples(device, _dtype(backend, device)):
        x = args[0].detach().clone().requires_grad_(args[-1] or args[4] != ce_ops.NONE)
        torch.library.opcheck(torch.ops.pykernels.cross_entropy.default, (x,) + args[1:] + (backend,),
                              test_utils=_utils(backend, device))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_opcheck_kernel_ops(backend, device):
    require_backend(backend, device)
    fwd, bwd, scale = ce_ops.KERNELS[backend]
    dtype = _dtype(backend, device)
    for x, t, w, ii, _, eps, zl, wg in _samples(device, dtype)[:8]:
        # The interpreter cannot run a triton_op's traced body on fake tensors either: schema only there.
        u = ("test_schema",) if (backend, device) == ("triton", "cpu") else _utils(backend, device)
        torch.library.opcheck(fwd, (x, t, w, None, ii, eps, zl, wg), test_utils=u)
        M = x.shape[0] * x.shape[2]
        acc = ce_ops.acc_dtype(dtype)
        lse = torch.logsumexp(x.to(acc), 1).reshape(-1)  # row r = n*D + d
        lse_err = (torch.rand(M, device=device, dtype=acc) - 0.5) * torch.finfo(acc).eps
        for err in (lse_err, None):
            torch.library.opcheck(bwd, (torch.rand(M, device=device, dtype=acc), x, t, w, lse, err, ii, eps, zl),
                                  test_utils=u)
        torch.library.opcheck(scale, (torch.randn(x.shape[0], x.shape[1], x.shape[2], device=device, dtype=dtype),
                                      torch.rand(M, device=device, dtype=acc)), test_utils=u)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    """gradcheck needs repeated backward passes: the split path. The fused path's gradient is checked against
    the split path and the float64 reference elsewhere, and a second backward through it must fail loudly."""
    fused = False
    require_backend(backend, "cpu")
    x = torch.randn(4, 7, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4, 2))
    t[0, 0] = -100
    w = torch.rand(7, dtype=torch.float64) + 0.5
    p = torch.softmax(torch.randn(4, 7, 2, dtype=torch.float64), 1)
    for reduction in ("mean", "sum", "none"):
        def f(x):
            return pykernels.functional.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1,
                                                      z_loss=1e-2, fused=fused, backend=backend)

        def g(x):
            return pykernels.functional.cross_entropy(x, p, weight=w, reduction=reduction, label_smoothing=0.1,
                                                      fused=fused, backend=backend)
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradcheck(g, (x,))


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + KERNEL_BACKENDS)
def test_compile_fullgraph_parity(backend, device):
    require_backend(backend, device)
    if backend == "triton" and device == "cpu":
        pytest.skip("Inductor cannot generate CPU code around an interpreted Triton kernel")
    torch._dynamo.reset()
    dtype = torch.float32
    x = torch.randn(6, 33, device=device, dtype=dtype)
    t = torch.randint(0, 33, (6,), device=device)
    t[1] = -100

    def f(x, t):
        return pykernels.functional.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le, lc = f(xe, t), compiled(xc, t)
    le.backward()
    lc.backward()
    assert max_abs_err(le, lc) <= 1e-5 and max_abs_err(xe.grad, xc.grad) <= 1e-6


def test_first_compiled_call_compiles_once():
    """The dispatch record is written by eager calls only: written while tracing, the first graph of a process was
    guarded on the record being empty and compiled again on the next, identical, call."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from pykernels import backends
    saved = dict(backends.last_dispatch)
    backends.last_dispatch.clear()
    try:
        torch._dynamo.reset()
        cc = CompileCounterWithBackend("eager")
        g = torch.compile(lambda x, t: pykernels.functional.cross_entropy(x, t, backend="reference"), fullgraph=True,
                          backend=cc)
        x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
        for _ in range(3):
            g(x, t)
        assert cc.frame_count == 1
    finally:
        backends.last_dispatch.update(saved)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_second_backward_through_the_fused_path(backend, device):
    """The fused forward saves the gradient for an upstream 1. Through a retained graph: an upstream gradient of 1
    on the CPU hands the saved gradient out (first pass) or a copy (later ones), so any number of passes agree with
    torch's and share no storage; one scaled in place (another upstream gradient; any on a GPU, which would sync to
    tell) is gone after the first pass, and a second raises naming fused=False, not autograd's "modified by an
    inplace operation" (a plain retain_graph=True, autograd.grad twice, raised that until 2026-12-06)."""
    require_backend(backend, device)
    x = torch.randn(4, 9, device=device, requires_grad=True)
    t = torch.randint(0, 9, (4,), device=device)
    want = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    loss = pykernels.functional.cross_entropy(x, t, backend=backend)
    two = torch.tensor(2.0, device=device)
    if device == "cpu":
        held = [torch.autograd.grad(loss, x, retain_graph=True)[0] for _ in range(3)]
        loss.backward(retain_graph=True)
        held.append(torch.autograd.grad(loss, x, two, retain_graph=True)[0])  # (out of place: the first is held)
        for g, k in zip(held + [x.grad], (1, 1, 1, 2, 1)):
            torch.testing.assert_close(g, k * want)
        assert len({g.data_ptr() for g in held + [x.grad]}) == 5
        loss = pykernels.functional.cross_entropy(x, t, backend=backend)
    torch.testing.assert_close(torch.autograd.grad(loss, x, two, retain_graph=True)[0], 2 * want)
    with pytest.raises(RuntimeError, match="retain_graph=True.*fused=False"):
        loss.backward(two)
    y = x.detach().requires_grad_()  # fused=False supports retain_graph like PyTorch
    loss = pykernels.functional.cross_entropy(y, t, fused=False, backend=backend)
    loss.backward(torch.tensor(2.0, device=device), retain_graph=True)
    loss.backward()
    torch.testing.assert_close(y.grad, 3 * want)


def test_backend_selection_is_visible():
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    with pytest.raises(pykernels.BackendUnavailableError, match="cuda"):
        pykernels.functional.cross_entropy(x, t, backend="cuda")  # CPU tensors: a hard request fails loudly
    with pykernels.use_backend("cuda"):  # a preference falls back, and says so
        pykernels.functional.cross_entropy(x, t)
    ran, skipped = pykernels.last_dispatch["cross_entropy"]
    assert ran != "cuda" and "cuda" in skipped and skipped["cuda"]
    with pykernels.use_backend("reference"):
        pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == "reference"
    pykernels.functional.cross_entropy(x.double().half(), t)  # fp16 on CPU: some backend runs it, never wrong
    assert set(pykernels.available_backends("cpu")) == {"triton", "cuda", "cpu", "reference"}


def test_overlapping_preference_blocks_each_remove_their_own():
    """use_backend blocks of two threads (or asyncio tasks) overlap without nesting: A enters, B enters, A exits.
    A's exit must take out A's preference (it popped the last one pushed: B's, leaving A's in force inside B's
    block), and a compiled call follows the preference left in force (dynamo guards on it)."""
    from torch._dynamo.testing import EagerAndRecordGraphs
    from pykernels import backends
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    compiled = torch.compile(pykernels.functional.cross_entropy, fullgraph=True, backend=rec)
    a, b = pykernels.use_backend("reference"), pykernels.use_backend("cpu")
    a.__enter__()
    compiled(x, t)
    b.__enter__()
    a.__exit__(None, None, None)
    try:
        pykernels.functional.cross_entropy(x, t)
        assert pykernels.last_dispatch["cross_entropy"][0] == "cpu"
        compiled(x, t)
    finally:
        b.__exit__(None, None, None)
    torch._dynamo.reset()
    assert backends._preferred == []
    codes = [g.code for g in rec.graphs]
    assert len(codes) == 2 and "'cpu'" not in codes[0] and "'cpu'" in codes[1], codes


def test_env_backend_preference(monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", "reference")
    pykernels.functional.cross_entropy(torch.randn(3, 4), torch.randint(0, 4, (3,)))
    assert pykernels.last_dispatch["cross_entropy"][0] == "reference"


def test_triton_kernel_ops_check_their_arguments():
    """The Triton kernel ops are callable directly (torch.ops.pykernels.*): a bad argument raises naming it, before the
    kernel runs (an empty grad_scale was read out of bounds: a segfault under the interpreter), as the C++ ops do."""
    require_backend("triton", "cpu")
    fwd, bwd, scale_grad_ = ce_ops.KERNELS["triton"]
    x, t = torch.randn(4, 5, 1), torch.tensor([0, 1, 4, 2])
    V, T = ArgumentValueError, ArgumentTypeError
    for args, name, error in (((x, t, None, torch.ones(0)), "grad_scale", V), ((x, t[:2], None, None), "target", V),
                              ((torch.randint(0, 3, (4, 5, 1)), t, None, None), "logits", T),
                              ((x, t, torch.ones(3), None), "weight", V), ((x, t.int(), None, None), "target", T),
                              ((x, torch.rand(4, 5, 2), None, None), "target", V),
                              ((x.double(), t, None, None), "logits", T),
                              ((x, t[:, None], None, None), "target must have shape", V),  # the rank, not a prefix
                              ((torch.randn(4, 0, 1), t.clamp(max=0), None, None), "logits must have at least one", V)):
        with pytest.raises(error, match=f"cross_entropy_fwd_triton: {name}"):
            fwd(*args, -100, 0.0, 0.0, True)
    _, lse, _, lse_err = fwd(x, t, None, None, -100, 0.0, 0.0, False)
    with pytest.raises(V, match="lse must have shape"):
        bwd(torch.ones(4), x, t, None, lse[:1], lse_err, -100, 0.0, 0.0)
    with pytest.raises(V, match="scale must have 4 elements"):
        scale_grad_(torch.randn(4, 5, 1), torch.ones(2))
    g = torch.randn(4, 5, 1)
    want = g * 3.0
    scale_grad_(g, torch.full((1,), 3.0))  # one element: the mean's scalar, read at stride 0
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("backend", ["reference", "bogus"])
def test_op_backend_argument_is_checked(backend):
    """The autograd-level op takes its backend as a string: one it has no kernels for is named, with the valid
    ones (it was a bare KeyError)."""
    x, t = torch.randn(4, 5, 1), torch.tensor([0, 1, 4, 2])
    with pytest.raises(ArgumentValueError, match=f"backend must be one of .*got '{backend}'"):
        torch.ops.pykernels.cross_entropy(x, t, None, -100, ce_ops.MEAN, 0.0, 0.0, False, backend)


def test_triton_forward_grid_stays_within_cuda_limits():
    """Without a gradient the Triton kernel gets a program a row, up to CUDA's 2^31 - 1 grid extent: beyond it (a
    3-D segmentation map of 2^31 voxels) the programs stride over the rest, as the kernel's row loop allows."""
    tce = pytest.importorskip("pykernels.triton.cross_entropy")
    cpu = torch.device("cpu")
    assert tce._grid(7, 5, 2, cpu, write_grad=False) == 7 and tce._grid(0, 5, 2, cpu, write_grad=False) == 1
    assert tce._grid(2 ** 31 + 5, 2, 2, cpu, write_grad=False) == 2 ** 31 - 1

"""The eager path of the autograd-level ops (pykernels/ops/_eager.py): an eager call runs the op's own body and
autograd formula without the custom-op dispatch, gives bit-identical outputs and gradients to the op, and
anything that traces (a dispatch mode, torch.compile) still sees ``pykernels::<op>``."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pykernels  # noqa: F401  (registers the ops)
from pykernels.ops import attention as attn_ops
from pykernels.ops import cross_entropy as ce_ops
from pykernels.ops import linear_cross_entropy as lce_ops
from pykernels.ops import lstm as lstm_ops

from conftest import require_backend


def _ce():
    x = torch.randn(7, 11, 3, requires_grad=True)
    t = torch.randint(0, 11, (21,))
    t[4] = -100
    return ce_ops.cross_entropy, ce_ops.cross_entropy_op, "cpu", \
        (x, t, None, -100, ce_ops.MEAN, 0.1, 1e-3, True, "cpu"), [x]


def _ce_split():  # the split path: the backward kernel reads the saved logits
    eager, op, b, args, leaves = _ce()
    return eager, op, b, args[:7] + (False, "cpu"), leaves


def _lce():
    x, W, bias = (torch.randn(6, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True),
                  torch.randn(13, requires_grad=True))
    t = torch.randint(0, 13, (6,))
    return lce_ops.linear_cross_entropy, lce_ops.linear_cross_entropy_op, "reference", \
        (x, W, bias, t, None, -100, lce_ops.MEAN, 0.1, 1e-3, 2.0, "reference"), [x, W, bias]


def _lstm_weights(I, H):
    return [torch.randn(4 * H, I, requires_grad=True), torch.randn(4 * H, H, requires_grad=True),
            torch.randn(4 * H, requires_grad=True), torch.randn(4 * H, requires_grad=True)]


def _cell():
    x, h, c = (torch.randn(3, 5, requires_grad=True), torch.randn(3, 4, requires_grad=True),
               torch.randn(3, 4, requires_grad=True))
    w = _lstm_weights(5, 4)
    return lstm_ops.lstm_cell, lstm_ops.lstm_cell_op, "cpu", (x, h, c, *w, "cpu"), [x, h, c, *w]


def _layer():
    x, h, c = (torch.randn(6, 2, 5, requires_grad=True), torch.randn(2, 4, requires_grad=True),
               torch.randn(2, 4, requires_grad=True))
    w = _lstm_weights(5, 4)
    return lstm_ops.lstm_layer, lstm_ops.lstm_layer_op, "cpu", (x, h, c, *w, True, "cpu"), [x, h, c, *w]


def _attention():
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True), torch.randn(1, 1, 11, 16, requires_grad=True),
               torch.randn(1, 1, 11, 8, requires_grad=True))
    args = (q, k, v, None, None, None, 9, 11, 1 / math.sqrt(16), True, 2, False, -1, -1, 0.0, 0.0, None, "triton")
    return attn_ops.attention, attn_ops.attention_op, "triton", args, [q, k, v]


CASES = {"cross_entropy": _ce, "cross_entropy_split": _ce_split, "linear_cross_entropy": _lce,
         "lstm_cell": _cell, "lstm_layer": _layer, "attention": _attention}


def _setup(case):
    torch.manual_seed(0)
    eager, op, backend, args, leaves = CASES[case]()
    if backend != "reference":
        require_backend(backend, "cpu")
    return eager, op, args, leaves


def _grads(fn, args, leaves):
    outs = fn(*args)
    loss = sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64).reshape(o.shape)).sum()
               for o in outs if o.requires_grad)
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], grads


def _op_names(prof):
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("case", list(CASES))
def test_eager_path_skips_the_custom_op_and_matches_it(case):
    eager, op, args, leaves = _setup(case)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outs_e, grads_e = _grads(eager, args, leaves)
    outs_o, grads_o = _grads(op, args, leaves)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof_op:
        op(*args)
    qualname = op._qualname  # e.g. pykernels::cross_entropy: the profiler records a dispatched op by this name
    assert qualname in _op_names(prof_op)
    assert qualname not in _op_names(prof), f"the eager call dispatched {qualname}"
    for a, b in zip(outs_e, outs_o):
        assert torch.equal(a, b)
    for a, b in zip(grads_e, grads_o):
        assert torch.equal(a, b)
    with torch.no_grad():  # nothing to differentiate: the body alone, no graph
        outs = eager(*args)
        assert all(o.grad_fn is None for o in outs)
        for a, b in zip(outs, op(*args)):  # (the fused cross-entropy's grad output was scaled by its backward)
            assert torch.equal(a, b)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["cross_entropy", "lstm_cell"])
def test_a_dispatch_mode_sees_the_op(case):
    eager, op, args, leaves = _setup(case)
    with _Recorder() as rec:
        eager(*args)
    assert f"pykernels.{op._qualname.split('::')[1]}.default" in rec.ops, rec.ops


class _Sub(torch.Tensor):
    pass


def test_wrapped_and_subclassed_tensors_see_the_op(monkeypatch):
    """Tensor subclasses (DTensor-like wrappers, __torch_function__ loggers), functorch's wrapped tensors (vmap,
    grad) and functional tensors (export) take the custom op, whose pieces they may not handle; a Parameter is a
    plain tensor."""
    from pykernels.ops._eager import tracing
    assert not tracing(torch.randn(2), torch.nn.Parameter(torch.randn(2)))
    assert tracing(torch.randn(2), torch.randn(2).as_subclass(_Sub))
    assert tracing(torch._to_functional_tensor(torch.randn(2)))
    seen = []
    torch.func.vmap(lambda x: seen.append(tracing(x)) or x)(torch.randn(3, 2))
    torch.func.grad(lambda x: seen.append(tracing(x)) or x.sum())(torch.randn(2))
    assert seen == [True, True]
    eager, op, args, leaves = _setup("cross_entropy")
    calls = []
    monkeypatch.setattr(eager, "op", lambda *a: calls.append(1) or op(*a))
    eager(args[0].detach().as_subclass(_Sub), *args[1:])
    assert calls


def test_jit_trace_records_the_op():
    eager, op, args, leaves = _setup("cross_entropy")
    x = args[0].detach()
    with warnings.catch_warnings():  # torch >= 2.13 deprecates torch.jit.trace
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda x: eager(x, *args[1:])[0], (x,), check_trace=False)
    assert op._qualname in {n.kind() for n in traced.graph.nodes()}
    assert torch.equal(traced(x), eager(x, *args[1:])[0])


def test_jit_trace_of_the_modules_passes_its_check():
    """torch.jit.trace re-traces under no_grad to check the graph: the sized rules (which pick by grad mode) hand
    traced calls to torch's op, so both traces agree and the traced graph needs no pykernels to load."""
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():  # torch >= 2.13 deprecates torch.jit.trace
        warnings.simplefilter("ignore")
        lstm = pykernels.nn.LSTM(3, 4).eval()
        traced = torch.jit.trace(lstm, (x,))  # check_trace on: raised "Graphs differed across invocations"
        torch.testing.assert_close(traced(x)[0], lstm(x)[0])
        assert pykernels.last_dispatch["lstm"][0] != "torch"  # outside tracing the rules apply again
        loss = pykernels.nn.CrossEntropyLoss()
        # 2^20 logits with a gradient: ours, untraced (native_below)
        logits, t = torch.randn(64, 2 ** 14, requires_grad=True), torch.randint(0, 2 ** 14, (64,))
        traced = torch.jit.trace(loss, (logits, t))
        torch.testing.assert_close(traced(logits, t), loss(logits, t))


def test_jit_trace_of_losses_does_not_depend_on_grad_mode():
    """The fused-gradient flag depends on requires_grad and grad mode: traced as a constant, the check's no_grad
    re-trace differed, and a graph traced from an input without grad gave a later input none. Linear
    cross-entropy records torch's own op where torch has one, as the other ops."""
    x, t = torch.randn(4, 5), torch.randint(0, 6, (4,))
    with warnings.catch_warnings():  # torch >= 2.13 deprecates torch.jit.trace
        warnings.simplefilter("ignore")
        lce = pykernels.nn.LinearCrossEntropyLoss(5, 6)
        torch.jit.trace(lce, (x.requires_grad_(), t))  # raised "Graphs differed across invocations"
        traced = torch.jit.trace(lce, (x.detach(), t), check_trace=False)
        xg = x.detach().requires_grad_()
        traced(xg, t).backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
        for kw in ({"z_loss": 1e-2}, {"backend": "cpu" if pykernels.available_backends("cpu")["cpu"] is None else "reference"}):
            ce = pykernels.nn.CrossEntropyLoss(**kw)
            logits = torch.randn(4, 6, requires_grad=True)
            torch.jit.trace(ce, (logits, t))

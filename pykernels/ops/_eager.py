"""Eager calls of the autograd-level ops (pykernels::cross_entropy, ::attention, ::lstm_cell, ...) without the
custom-op dispatch.

An eager call of a ``torch.library.custom_op`` goes through Python: argument defaults, the autograd wrapper that
``register_autograd`` builds, redispatch. That measured 35 us per call without a gradient and about 100 us with one
(2 cores, torch 2.14, 2026-12-04): more than a whole cross-entropy or LSTM-cell step at small sizes (torch's
cross-entropy forward+backward at 256 x 65: 84 us; ours was 282 us, 243 us without the custom-op dispatch).

``EagerOp`` runs the op itself whenever something traces or transforms the call (torch.compile, export, make_fx,
torch.jit.trace, fake or functional tensors, a dispatch mode, functorch, tensor subclasses), so graphs hold
``pykernels::<op>`` as before. Otherwise it runs the op's own body and autograd formula directly: through a
``torch.autograd.Function`` built from the op's ``setup_context`` and ``backward`` when a gradient is needed, as a
plain call when not. One body and one formula serve both paths, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (Tensor, torch.nn.Parameter)


def tracing(*tensors: Tensor) -> bool:
    """True while something other than plain eager execution sees these tensors."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or torch._C._get_tracing_state():
        return True  # (the last: torch.jit.trace, which should record the op, not its pieces)
    for t in tensors:
        if type(t) not in _PLAIN or torch._is_functional_tensor(t) \
                or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
    return False


class EagerOp:
    """Calls ``op`` (a CustomOpDef over ``body`` with ``register_autograd(backward, setup_context)``) with the
    same arguments and results, the eager way when nothing traces (see the module docstring)."""

    def __init__(self, op, body: Callable, setup_context: Callable, backward: Callable):
        self.op, self.body = op, body

        def forward(ctx, *args):
            out = body(*args)
            setup_context(ctx, args, out)
            return out

        self.function = type(f"{body.__name__.strip('_')}_eager", (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if tracing(*tensors):
            return self.op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*args)
        return self.body(*args)

"""Double backward (``create_graph=True``) through the autograd-level ops.

The kernels' backward ops have no derivative of their own. A gradient they return to a backward that records a
graph (Hessian-vector products, gradient penalties, MAML, Sophia/AdaHessian curvature estimates) would carry no
graph: differentiating it again gives zero, or, mixed with other terms, silently drops this op's share. So when
autograd runs an op's backward with grad mode on (which it does exactly for ``create_graph=True``), the op
re-runs its forward in plain PyTorch (``pykernels.reference``: the same semantics) and differentiates that with
``create_graph=True``: correct gradients of any order, at the reference's cost (it materialises what the kernels
never hold: the logits, the attention scores), logged on the ``pykernels`` logger. An op that cannot recompute
its forward (a fused forward that saved only the gradients, a dropout mask only the kernel can regenerate)
raises instead. A traced backward (torch.compile) keeps the kernels.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from ._eager import tracing


def create_graph(*grads: Optional[Tensor]) -> bool:
    """True when autograd runs this backward to record a graph of it (``create_graph=True``)."""
    return torch.is_grad_enabled() and not tracing(*[g for g in grads if g is not None])


def refuse(op: str, why: str, fix: str) -> None:
    raise RuntimeError(f"{op}: a backward with create_graph=True (double backward) needs this op's forward again, "
                       f"but {why}. {fix}")


def reference_grads(op: str, forward: Callable[..., Sequence[Tensor]], inputs: Sequence[Optional[Tensor]],
                    needs_input_grad: Sequence[bool], grad_outputs: Sequence[Optional[Tensor]]
                    ) -> Tuple[Optional[Tensor], ...]:
    """The gradients for the op's backward, as differentiable functions of ``inputs`` (the op's first
    ``len(inputs)`` arguments, as saved: still attached to their graph) and of ``grad_outputs``:
    ``forward(*inputs)`` returns the differentiable outputs, in the order of ``grad_outputs`` (None: unused).
    Returns one entry per op argument (``len(needs_input_grad)``), None where no gradient is asked for."""
    if not torch.compiler.is_compiling():
        backends.logger.debug("%s: create_graph=True: the backward differentiates the reference forward", op)
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i] and t.requires_grad]
    result: list = [None] * len(needs_input_grad)
    if not wanted:
        return tuple(result)
    with torch.enable_grad():
        outs = forward(*inputs)
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        if not pairs:
            return tuple(result)
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(result)

"""The gradients a fused forward saved (computed for an upstream gradient of 1), handed to autograd scaled by the
upstream gradient that arrives: cross-entropy's N x C logits gradient, linear cross-entropy's dX, dW, db."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._eager import tracing


def hand_out(ctx, op: str, saved: Callable[[], Tuple[Tensor, ...]], g: Tensor,
             mul: Callable[[Tensor, Tensor], Tensor],
             scale_: Optional[Callable[[Tensor, Tensor], None]] = None) -> Tuple[Tensor, ...]:
    """The tensors ``saved()`` (read from ``ctx.saved_tensors``) times the upstream gradient ``g`` (``mul(t, g)``),
    for one backward pass of the node ``ctx``.

    - ``g`` exactly 1, checked on the CPU only (a GPU would sync): no pass, the saved tensors themselves, but once
      per node. A later backward through a retained graph copies them, since the first ones may be held (an
      autograd.grad result) or be a leaf's .grad, which .backward(), clip_grad_norm_, zero_grad change in place:
      results of two backward passes must not share storage.
    - otherwise, given ``scale_`` (an in-place scaler: no second N x C buffer at the peak of the backward) and on the
      node's first pass (nothing holds them), scaled in place. The saved gradient is then gone: a later backward
      through the graph raises, naming the way out, instead of autograd's "modified by an inplace operation".
    - otherwise ``mul`` out of place (also whenever a graph is traced: it may not mutate a saved output)."""
    if getattr(ctx, "scaled_in_place", False):
        raise RuntimeError(
            f"{op}: a second backward through the same graph (retain_graph=True): the fused forward saved the "
            "gradient, which the first backward scaled in place by its upstream gradient. Pass fused=False (or "
            "backend='reference') to the call or module to backpropagate through it more than once.")
    saved = saved()  # (after the check: autograd's own would raise first, on the version the scaling bumped)
    traced = tracing(*saved, g)
    handed_out = getattr(ctx, "handed_out", False)
    if not traced and g.device.type == "cpu" and bool((g == 1).all()):
        if handed_out:
            return tuple(t.clone() for t in saved)
        ctx.handed_out = True
        return saved
    if scale_ is None or traced or handed_out:
        return tuple(mul(t, g) for t in saved)
    for t in saved:
        scale_(t, g)  # (a no-op on the device where g == 1)
        # Kernels write through raw pointers: bump the version, so that autograd sees the change (a user's tensor
        # that aliases it, a saved tensor of another node).
        torch.autograd.graph.increment_version(t)
    ctx.scaled_in_place = True
    return saved

"""Linear cross-entropy in plain PyTorch: the oracle of the fused linear + cross-entropy kernels (issue: fused
linear cross-entropy). ``cross_entropy(linear(input, W, b), target, ...)`` with torch's
``torch.nn.functional.linear_cross_entropy`` conventions (ignore_index=None means -100 for class indices),
plus pykernels' extras: Gemma-2 logit soft-capping (``softcap * tanh(z / softcap)`` before the loss) and
z-loss. Materialises the N x V logits: an oracle, not a fallback for large vocabularies."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .cross_entropy import cross_entropy


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0
                         ) -> Tuple[Tensor, Tensor]:
    """Returns (loss, lse). input (..., H), linear_weight (V, H), target (...) or (..., V)."""
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if logits.dim() > 2:  # (N, d..., V): cross_entropy wants the classes in dim 1
        logits = logits.movedim(-1, 1)
        if target.dtype.is_floating_point:
            target = target.movedim(-1, 1)
    return cross_entropy(logits, target, weight, -100 if ignore_index is None else ignore_index, reduction,
                         label_smoothing, z_loss)

"""Cross-entropy in plain PyTorch, with pykernels' extras (z-loss, per-row lse).

Two levels:
- ``cross_entropy``: the whole functional (PyTorch semantics + z_loss), differentiable by autograd; the
  "reference" backend, and the oracle when run in float64.
- ``cross_entropy_rows``: the kernels' contract (docs/cross_entropy.md) on the canonical (N, C, D) view;
  the oracle of the per-backend kernel tests.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _class_dim(x: torch.Tensor) -> int:
    return 0 if x.dim() == 1 else 1


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, lse): loss as torch.nn.functional.cross_entropy (+ z_loss * lse^2 per counted
    element), lse the log-sum-exp over classes, shape of the target's batch (fp32 for low precision)."""
    cd = _class_dim(input)
    C = input.shape[cd]
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc)
    logp = torch.log_softmax(x, dim=cd)
    lse = torch.logsumexp(x, dim=cd)
    bshape = [1] * input.dim()
    bshape[cd] = C
    w = None if weight is None else weight.to(acc).reshape(bshape)
    eps = label_smoothing
    if target.dtype.is_floating_point:  # class probabilities
        t = target.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / C
        wt = t if w is None else t * w
        rows = -(wt * logp).sum(cd)
        counted = torch.ones_like(rows)
        # torch's divisor: input.numel() / C, 0 / 0 (a NaN mean) with no classes
        denom = torch.tensor(float(rows.numel()) if C else float("nan"), dtype=acc, device=x.device)
    else:
        target = target.to(torch.int64)
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target))
        nll = -torch.gather(logp, cd, y.unsqueeze(cd)).squeeze(cd)
        wy = torch.ones_like(nll) if weight is None else weight.to(acc)[y]
        wy = torch.where(valid, wy, torch.zeros_like(wy))
        rows = torch.where(valid, wy * nll, 0.0)  # an ignored row adds 0 even when its logits are NaN or all -inf
        if eps > 0:
            smooth = -(logp if w is None else logp * w).sum(cd)
            rows = (1 - eps) * rows + (eps / C) * torch.where(valid, smooth, torch.zeros_like(smooth))
        counted = valid.to(acc)
        denom = wy.sum()
    if z_loss:
        rows = rows + torch.where(counted > 0, z_loss * lse.square(), 0.0)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        # NaN when every target is ignored, as PyTorch, with a zero (not NaN) gradient, as PyTorch; counted targets
        # whose class weights sum to 0 divide by 0 there (NaN loss and gradient)
        empty = counted.sum() == 0
        loss = torch.where(empty, float("nan"), rows.sum() / torch.where(empty, 1.0, denom))
    else:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    # probabilities promote as torch's -sum(w * t * log_softmax(x)): float32 ones (or float32 class weights) give
    # bf16 logits a float32 loss
    wide = input.dtype
    if target.dtype.is_floating_point:
        wide = torch.promote_types(wide, target.dtype)
        if weight is not None:
            wide = torch.promote_types(wide, weight.dtype)
    return loss.to(wide), lse


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                       ignore_index: int, label_smoothing: float, z_loss: float
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-row (loss, lse) on the canonical view logits (N, C, D), in float64.

    Index targets are int64 (N*D,); probability targets are (N, C, D). Out-of-range targets give NaN.
    """
    N, C, D = logits.shape
    x = logits.double().permute(0, 2, 1).reshape(N * D, C)
    if target.dtype.is_floating_point:
        t = target.double().permute(0, 2, 1).reshape(N * D, C)
        loss, lse = cross_entropy(x, t, weight, reduction="none", label_smoothing=label_smoothing,
                                  z_loss=z_loss)
        return loss, lse
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    safe = torch.where(bad, torch.full_like(target, ignore_index), target)
    loss, lse = cross_entropy(x, safe, weight, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing, z_loss=z_loss)
    return torch.where(bad, torch.full_like(loss, float("nan")), loss), lse

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
    """Returns (loss, lse). input (..., H), linear_weight (V, H), target (...) or (..., V); or, as torch,
    input (N, H) with a K-dimensional linear_weight (V, d1..dK, H), bias (V, d1..dK), target (N, d1..dK)."""
    if linear_weight.dim() > 2:  # torch's K-dimensional loss: logits (N, V, d1..dK), classes already in dim 1
        shape = (*input.shape[:-1], *linear_weight.shape[:-1])
        logits = torch.nn.functional.linear(input, linear_weight.reshape(-1, input.shape[-1]),
                                            None if linear_bias is None else linear_bias.reshape(-1)).reshape(shape)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return cross_entropy(logits, target, weight, -100 if ignore_index is None else ignore_index, reduction,
                             label_smoothing, z_loss)
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if logits.dim() > 2:  # (N, d..., V): cross_entropy wants the classes in dim 1
        logits = logits.movedim(-1, 1)
        if target.dtype.is_floating_point:
            target = target.movedim(-1, 1)
    return cross_entropy(logits, target, weight, -100 if ignore_index is None else ignore_index, reduction,
                         label_smoothing, z_loss)


# ---------------------------------------------------------------------------------------------------------
# The kernels' contract (docs/linear_cross_entropy.md) in plain PyTorch, chunked over the vocabulary so that no
# N x V tensor exists: the oracle of the kernel-op tests (in float64), the "reference" kernels behind
# pykernels::linear_cross_entropy and the vocab-parallel path on CPU.

_CHUNK = 4096


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x: Tensor, W: Tensor, b: Optional[Tensor], softcap: float) -> Tensor:
    z = x @ W.to(x.dtype).t()
    if b is not None:
        z = z + b.to(x.dtype)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy_fwd(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                             weight: Optional[Tensor], vocab_start: int, softcap: float, smooth: bool
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row over this shard's classes [vocab_start, vocab_start + V): (m, log_s, z_target, z_sum) of the
    accumulation dtype: m = max_c z_c (0 when that is not finite), log_s = log sum_c exp(z_c - m) (so
    lse = m + log_s); z_target is 0 where the target is not a class of the shard; z_sum = sum_c w_c z_c (zeros
    without smoothing)."""
    acc = _acc(input.dtype)
    N, V = input.shape[0], linear_weight.shape[0]
    x = input.to(acc)
    m = torch.full((N,), -float("inf"), dtype=acc, device=input.device)
    s = torch.zeros(N, dtype=acc, device=input.device)
    zy = torch.zeros(N, dtype=acc, device=input.device)
    zs = torch.zeros(N, dtype=acc, device=input.device)
    for c0 in range(0, V, _CHUNK):
        c1 = min(V, c0 + _CHUNK)
        z = _logits(x, linear_weight[c0:c1], None if linear_bias is None else linear_bias[c0:c1], softcap)
        m_new = torch.maximum(m, z.amax(1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
        s = s * torch.exp(m - m_safe) + torch.exp(z - m_safe.unsqueeze(1)).sum(1)
        m = m_new
        local = target - vocab_start - c0
        hit = (local >= 0) & (local < c1 - c0)
        zy = zy + torch.where(hit, z.gather(1, local.clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1), 0.0)
        if smooth:
            zs = zs + (z if weight is None else z * weight[c0:c1].to(acc)).sum(1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m, torch.log(s), zy, zs


def linear_cross_entropy_bwd(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                             weight: Optional[Tensor], m: Tensor, log_s: Tensor, coef_p: Tensor, coef_y: Tensor, coef_w: Tensor,
                             vocab_start: int, softcap: float, smooth: bool, input_grad: bool, weight_grad: bool,
                             bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """dlogits[r, c] = (coef_p[r] exp((z_rc - m_r) - log_s_r) - coef_y[r] [c == y_r] - coef_w[r] w_c) *
    softcap'(z_rc);
    returns (dlogits @ W in the accumulation dtype, dlogits^T @ input, column sums of dlogits), each empty when
    not requested."""
    acc = _acc(input.dtype)
    N, H = input.shape
    V = linear_weight.shape[0]
    x = input.to(acc)
    gx = torch.zeros(N, H, dtype=acc, device=input.device) if input_grad else input.new_empty(0, dtype=acc)
    gws, gbs = [], []
    for c0 in range(0, V, _CHUNK):
        c1 = min(V, c0 + _CHUNK)
        Wc = linear_weight[c0:c1]
        z = _logits(x, Wc, None if linear_bias is None else linear_bias[c0:c1], softcap)
        d = coef_p.to(acc).unsqueeze(1) * torch.exp((z - m.to(acc).unsqueeze(1)) - log_s.to(acc).unsqueeze(1))
        local = (target - vocab_start - c0).unsqueeze(1)
        cols = torch.arange(c1 - c0, device=input.device).unsqueeze(0)
        d = d - torch.where(cols == local, coef_y.to(acc).unsqueeze(1), 0.0)
        if smooth:
            w = torch.ones(c1 - c0, dtype=acc, device=input.device) if weight is None else weight[c0:c1].to(acc)
            d = d - coef_w.to(acc).unsqueeze(1) * w.unsqueeze(0)
        if softcap:
            d = d * (1 - (z / softcap).square())
        if input_grad:
            gx = gx + d @ Wc.to(acc)
        if weight_grad:
            gws.append(d.t() @ x)
        if bias_grad and linear_bias is not None:
            gbs.append(d.sum(0))
    gw = torch.cat(gws).to(linear_weight.dtype) if weight_grad and gws else linear_weight.new_empty(
        (V, H) if weight_grad else (0,)).zero_()
    if bias_grad and linear_bias is not None:
        gb = torch.cat(gbs).to(linear_bias.dtype) if gbs else linear_bias.new_zeros(V)
    else:
        gb = input.new_empty(0)
    return gx, gw, gb

"""Attention in plain PyTorch: the oracle of the attention kernels (issue: fused attention) and their last
fallback. Explicit softmax(Q K^T * scale + bias) V with every feature the kernels must match, computed in the
dtype given (float64 for the oracle), with the log-sum-exp of each query row.

Semantics are torch.nn.functional.scaled_dot_product_attention's: layout (..., H, L, E) for the query and
(..., H_kv, S, E) / (..., H_kv, S, Ev) for key / value; a bool attn_mask is True where attention is allowed, a
float one is added to the scores; masks broadcast to (..., H, L, S); is_causal is aligned to the top-left
(query i sees keys j <= i); enable_gqa repeats each key/value head over H / H_kv query heads. A query row
that can see no key returns zeros (and lse = -inf), as PyTorch does.

Extras the kernels also offer: causal alignment "bottom_right" (FlashAttention's convention when L != S:
query i sees keys j <= i + S - L), a sliding window (left, right) around that diagonal (-1: unbounded),
logit soft-capping (softcap * tanh(s / softcap), applied before masking), and an explicit dropout keep-mask
(the kernels regenerate theirs from a seed; the tests hand the same mask to this reference).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def allowed(L: int, S: int, device, is_causal: bool = False, alignment: str = "top_left",
            window: Tuple[int, int] = (-1, -1)) -> Optional[Tensor]:
    """(L, S) bool: which keys each query may see under causality and the window; None when all."""
    if not is_causal and window == (-1, -1):
        return None
    if alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    diag = i + (S - L if alignment == "bottom_right" else 0)  # the key each query is aligned with
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        ok &= j <= diag
    left, right = window
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def _probs(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_mask: Optional[Tensor],
           dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool, alignment: str,
           window: Tuple[int, int], softcap: float):
    """The forward up to the probabilities, shared by the forward and its hand-derived backward: (key, value with
    the GQA heads repeated, accumulation dtype, scale, tanh of the softcapped scores or None, p, lse, dropout
    factor (keep-mask times 1 / (1 - p)) or None)."""
    L, E = query.shape[-2], query.shape[-1]
    S = key.shape[-2]
    H, Hk = query.shape[-3] if query.dim() >= 3 else 1, key.shape[-3] if key.dim() >= 3 else 1
    if H != Hk:
        if not enable_gqa or H % Hk:
            raise ValueError(f"query has {H} heads and key/value {Hk}: needs enable_gqa=True and H % H_kv == 0")
        key = key.repeat_interleave(H // Hk, dim=-3)
        value = value.repeat_interleave(H // Hk, dim=-3)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    sc = 1.0 / math.sqrt(E) if scale is None else scale
    s = torch.matmul(query.to(acc), key.to(acc).transpose(-2, -1)) * sc
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    ok = allowed(L, S, query.device, is_causal, alignment, window)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            ok = attn_mask if ok is None else ok & attn_mask
        else:
            s = s + attn_mask.to(acc)
    if ok is not None:
        s = s.masked_fill(~ok, float("-inf"))
    # Softmax normalised by the row's sum, never through the rounded lse: with every score near a large finite mask
    # value (Hugging Face's finfo.min padding, -1e9) lse = m + log(l) rounds back to m and exp(s - lse) would give 1
    # per key instead of 1 / S. The shift m is a constant of the softmax: detached, so the gradient is exact.
    m = s.detach().amax(dim=-1, keepdim=True) if S else s.new_zeros(s.shape[:-1] + (1,))
    m = m.masked_fill(torch.isinf(m), 0.0)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    dead = l == 0  # rows that see no key (every score -inf; S = 0): zero output, lse -inf, no NaN gradient
    l = l.masked_fill(dead, 1.0)
    p = e / l
    lse = (m + torch.log(l)).squeeze(-1).masked_fill(dead.squeeze(-1), float("-inf"))
    drop = None
    if dropout_mask is not None and dropout_p > 0:
        drop = dropout_mask.to(acc) * (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)
    return key, value, acc, sc, t, p, lse, drop


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, alignment: str = "top_left",
                                 window: Tuple[int, int] = (-1, -1), softcap: float = 0.0
                                 ) -> Tuple[Tensor, Tensor]:
    """Returns (out, lse): out (..., H, L, Ev) in the query's dtype, lse (..., H, L) in float32 (float64 for
    float64 inputs). ``dropout_mask`` (bool, broadcastable to the scores, True = keep) is applied with the
    1 / (1 - dropout_p) rescaling; without it no dropout is applied."""
    key, value, acc, _, _, p, lse, drop = _probs(query, key, value, attn_mask, dropout_mask, dropout_p, is_causal,
                                                 scale, enable_gqa, alignment, window, softcap)
    if drop is not None:
        p = p * drop
    out = torch.matmul(p, value.to(acc))
    return out.to(query.dtype), lse


def scaled_dot_product_attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                          attn_mask: Optional[Tensor] = None, dropout_mask: Optional[Tensor] = None,
                                          dropout_p: float = 0.0, is_causal: bool = False,
                                          scale: Optional[float] = None, enable_gqa: bool = False,
                                          alignment: str = "top_left", window: Tuple[int, int] = (-1, -1),
                                          softcap: float = 0.0, mask_grad: bool = False
                                          ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The gradients of ``scaled_dot_product_attention``'s out for ``grad_out``, derived by hand (what autograd
    gives through the forward above, step by step): (dq, dk, dv) in the dtypes and shapes of query, key, value,
    and the float ``attn_mask``'s gradient summed to its shape when ``mask_grad`` (else None). For callers where
    autograd records nothing: the reference kernel ops, which run below the autograd dispatch keys."""
    H, Hk = query.shape[-3] if query.dim() >= 3 else 1, key.shape[-3] if key.dim() >= 3 else 1
    key_r, value_r, acc, sc, t, p, _, drop = _probs(query, key, value, attn_mask, dropout_mask, dropout_p,
                                                    is_causal, scale, enable_gqa, alignment, window, softcap)
    do = grad_out.to(acc)
    pd = p if drop is None else p * drop
    dv = torch.matmul(pd.transpose(-2, -1), do)
    dp = torch.matmul(do, value_r.to(acc).transpose(-2, -1))
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))  # softmax backward; 0 where p is (masked keys, dead rows)
    dmask = None
    if mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
        dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    if t is not None:
        ds = ds * (1 - t * t)  # d(c tanh(s / c)) / ds
    ds = ds * sc
    dq = torch.matmul(ds, key_r.to(acc))
    dk = torch.matmul(ds.transpose(-2, -1), query.to(acc))
    if H != Hk:  # repeat_interleave's backward: each kv head sums its group of query heads
        dk = dk.unflatten(-3, (Hk, H // Hk)).sum(-3)
        dv = dv.unflatten(-3, (Hk, H // Hk)).sum(-3)
    return (dq.to(query.dtype).sum_to_size(query.shape), dk.to(key.dtype).sum_to_size(key.shape),
            dv.to(value.dtype).sum_to_size(value.shape), dmask)


def varlen_dropout_masks(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, H: int, dropout_p: float, device,
                         generator: Optional[torch.Generator] = None) -> list:
    """One (H, L_i, S_i) keep-mask (True = keep) per sequence, drawn in order from ``generator`` (None: torch's
    global one), as ``varlen_attention``'s ``dropout_masks``."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # float32 whatever the default dtype: a bfloat16 default drew p = 0.1 as 0.1016 (its 8-bit grid)
    return [torch.rand(H, cq[i + 1] - cq[i], ck[i + 1] - ck[i], generator=generator, device=device,
                       dtype=torch.float32) >= dropout_p for i in range(len(cq) - 1)]


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     dropout_masks=None, dropout_p: float = 0.0, is_causal: bool = False,
                     scale: Optional[float] = None, alignment: str = "top_left", window: Tuple[int, int] = (-1, -1),
                     softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Packed sequences: q (T, H, E), k (Tk, Hk, E), v (Tk, Hk, Ev); sequence i is rows cu_seqlens_q[i] :
    cu_seqlens_q[i+1] of q and cu_seqlens_k[i] : cu_seqlens_k[i+1] of k/v. Each sequence is attended on its own
    (dense semantics above, GQA when Hk divides H). ``dropout_masks``: None or one (H, L_i, S_i) keep-mask per
    sequence. Rows past cu_seqlens_q[-1] (cu_seqlens_k[-1]) are padding: no sequence reads them, their output is 0
    and their lse -inf (a row that sees no key). Returns out (T, H, Ev) and lse (H, T)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)
        ki, vi = k[ck[i]:ck[i + 1]].transpose(0, 1), v[ck[i]:ck[i + 1]].transpose(0, 1)
        o, lse = scaled_dot_product_attention(qi, ki, vi, dropout_mask=None if dropout_masks is None
                                              else dropout_masks[i], dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=True, alignment=alignment, window=window,
                                              softcap=softcap)
        outs.append(o.transpose(0, 1))
        lses.append(lse)
    pad = q.shape[0] - cq[-1]
    # zeros still attached to q, k and v (a zero gradient, as the kernels'), also when no sequence ran: padding
    # rows as q's rows widened from 0 columns to Ev by F.pad, and no rows of k and v
    H, Ev = q.shape[1], v.shape[-1]
    outs.append(torch.nn.functional.pad(q[cq[-1]:, :, :0], (0, Ev)))
    outs += [torch.nn.functional.pad(t[:0, :1, :0], (0, Ev)).expand(0, H, Ev) for t in (k, v)]
    lses.append(torch.full((q.shape[1], pad), float("-inf"), device=q.device,
                           dtype=lses[0].dtype if lses else torch.float32))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def varlen_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                              cu_seqlens_k: Tensor, dropout_masks=None, dropout_p: float = 0.0,
                              is_causal: bool = False, scale: Optional[float] = None, alignment: str = "top_left",
                              window: Tuple[int, int] = (-1, -1), softcap: float = 0.0
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients (dq, dk, dv) of ``varlen_attention``'s out for ``grad_out`` (T, H, Ev), derived by hand per
    sequence (``scaled_dot_product_attention_backward``); padding rows get zeros."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)
        ki, vi = k[ck[i]:ck[i + 1]].transpose(0, 1), v[ck[i]:ck[i + 1]].transpose(0, 1)
        gi = grad_out[cq[i]:cq[i + 1]].transpose(0, 1)
        dqi, dki, dvi, _ = scaled_dot_product_attention_backward(
            gi, qi, ki, vi, dropout_mask=None if dropout_masks is None else dropout_masks[i], dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=True, alignment=alignment, window=window, softcap=softcap)
        dq[cq[i]:cq[i + 1]] += dqi.transpose(0, 1)
        dk[ck[i]:ck[i + 1]] += dki.transpose(0, 1)
        dv[ck[i]:ck[i + 1]] += dvi.transpose(0, 1)
    return dq, dk, dv

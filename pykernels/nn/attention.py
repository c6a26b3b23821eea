"""pykernels.nn.MultiheadAttention: torch.nn.MultiheadAttention on the fused attention kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional.attention import scaled_dot_product_attention
from .. import backends
from ..errors import ArgumentAssertionError, ArgumentTypeError
from ._adopt import adopt

__all__ = ["MultiheadAttention"]


def _as_float_mask(m: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's MHA convention: bool True = blocked -> -inf; float masks are added as they are."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
    return m


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs on pykernels' flash-attention kernels.

    Same constructor, parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
    when kdim/vdim differ, ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``), state_dict keys and forward
    signature; still an instance of ``torch.nn.MultiheadAttention`` (a state_dict loads strictly both ways).
    Masks keep torch's MHA polarity: a bool ``key_padding_mask`` / ``attn_mask`` is True where attention is
    *blocked*; float masks are added to the scores. ``need_weights=True`` still returns the attention weights
    (computed explicitly next to the fused output, averaged over heads when ``average_attn_weights``); when
    dropout is active in training with ``need_weights=True`` the call runs torch's own implementation, whose
    returned weights are the dropped ones. A query that can see no key gets a zero output (torch: NaN with
    ``need_weights=True`` and on its eval fast path without a gradient, else 0).
    Keyword-only extra: ``backend`` (see ``pykernels.functional.scaled_dot_product_attention``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.backend = backends.backend_name(backend)

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, *, backend: Optional[str] = None
                   ) -> "MultiheadAttention":
        """The same module as a pykernels one, sharing its Parameter objects (optimizers keep working)."""
        return adopt(cls, module, backend=backend)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if (need_weights and self.training and self.dropout != 0.0
                or query.is_nested or key.is_nested or value.is_nested):
            # torch's own path: the dropped weights it returns (a negative dropout it skips there: no dropout; our
            # SDPA refuses one, as torch's does without weights); nested tensors (its inference fast path)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: need attn_mask if specifying the is_causal hint (as torch); "
                               "pass the causal mask, e.g. nn.Transformer.generate_square_subsequent_mask")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not isinstance(m, Tensor):  # (m.dtype below: a bare AttributeError; torch's TypeError)
                raise ArgumentTypeError(f"MultiheadAttention: {name} must be a Tensor or None, got {type(m).__name__}")
            if m is not None and m.dtype != torch.bool and not m.dtype.is_floating_point:
                # torch's check and exception (F._canonical_mask): an integer mask would be added to the scores
                raise AssertionError(f"MultiheadAttention: only bool and floating types of {name} are supported, "
                                     f"got {m.dtype}")
        # which inputs are one tensor, before the layout changes below make them distinct views (torch's rule)
        same_kv = key is value
        same_qkv = same_kv and query is key
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ArgumentAssertionError(f"MultiheadAttention: query, key, value must all be 2-D (unbatched) or 3-D, "
                                         f"got {query.dim()}, {key.dim()}, {value.dim()}")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, N, E) from here on, torch's internal layout
        L, N, E = query.shape
        Hn, hd = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ArgumentAssertionError(f"MultiheadAttention: query's embedding dim {E} != embed_dim "
                                         f"{self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != N:
            raise ArgumentAssertionError(f"MultiheadAttention: key {tuple(key.shape)} and value "
                                         f"{tuple(value.shape)} must match each other and the query's batch {N}")
        q, k, v = self._in_projection(query, key, value, same_qkv, same_kv)
        # torch's rule: the hint replaces the mask only without key padding and without weights (the weights are
        # computed from the mask, padded for bias_k / add_zero_attn, whose extra keys a causal call would hide);
        # the mask is then dropped unchecked, as torch's F.multi_head_attention_forward does
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None
        if attn_mask is not None:
            # torch's shapes and exception type: a transposed (S, L) mask must not be reshaped into place
            want = (L, key.shape[0]) if attn_mask.dim() == 2 else (N * Hn, L, key.shape[0])
            if attn_mask.dim() not in (2, 3):
                raise ArgumentAssertionError(f"MultiheadAttention: attn_mask must be 2-D or 3-D, got "
                                             f"{attn_mask.dim()}-D")
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(f"MultiheadAttention: the {attn_mask.dim()}-D attn_mask must have shape {want}, got "
                                   f"{tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S = k.shape[0]
        # (L, N, E) -> (N, H, L, hd)
        q = q.reshape(L, N, Hn, hd).permute(1, 2, 0, 3)
        k = k.reshape(S, N, Hn, hd).permute(1, 2, 0, 3)
        v = v.reshape(S, N, Hn, hd).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, Hn, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, Hn, 1, hd)], dim=2)
            S += 1
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        mask = None
        if attn_mask is not None:
            am = attn_mask.reshape(1, 1, L, S) if attn_mask.shape[0] == 1 else attn_mask.reshape(N, Hn, L, S)
            mask = am
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                extra = (self.bias_k is not None) + bool(self.add_zero_attn)  # columns padded on above
                given = (*key_padding_mask.shape[:-1], key_padding_mask.shape[-1] - extra)
                want = (N, S - extra) if batched else (S - extra,)
                raise ArgumentAssertionError(f"MultiheadAttention: key_padding_mask must be {want}"
                                             f"{'' if batched else ' for unbatched inputs'}, got "
                                             f"{given if batched else given[1:]}")
            kpm = key_padding_mask.reshape(N, 1, 1, S)
            if mask is None:
                mask = kpm
            elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
                mask = mask | kpm
            else:
                mask = _as_float_mask(mask, q.dtype) + _as_float_mask(kpm, q.dtype)
        sdpa_mask = None
        if mask is not None:
            sdpa_mask = ~mask if mask.dtype == torch.bool else mask  # SDPA's bool polarity: True = attend
        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, sdpa_mask, dropout_p, use_causal, backend=self.backend)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        weights = None
        if need_weights:
            # (never causal: use_causal excludes weights) scaled first, as torch: fp16 q.k can overflow
            s = torch.matmul(q * (hd ** -0.5), k.transpose(-2, -1))
            if sdpa_mask is not None:
                s = (s.masked_fill(~sdpa_mask, float("-inf")) if sdpa_mask.dtype == torch.bool
                     else s + sdpa_mask.to(s.dtype))  # torch's baddbmm(mask, ...): weights in the scores' dtype
            weights = torch.softmax(s, dim=-1)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, same_qkv: bool, same_kv: bool):
        """q, k, v = the input projections, as torch packs them: self-attention (one tensor for all three) runs one
        GEMM over in_proj_weight, encoder-decoder attention (key is value) one for q and one for k and v together;
        q, k, v are then views of the packed result (the attention kernels take strided inputs)."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if same_qkv:
                return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)
            if same_kv:
                kv = F.linear(key, w[E:], None if b is None else b[E:]).unflatten(-1, (2, E)).unbind(-2)
                return (F.linear(query, w[:E], None if b is None else b[:E]), *kv)
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" if self.backend else ""


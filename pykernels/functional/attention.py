"""pykernels.functional.scaled_dot_product_attention / varlen_attention: fused flash attention behind
torch.nn.functional.scaled_dot_product_attention's signature and semantics (contract: docs/attention.md)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _device_props, _native, backends
from ..errors import ArgumentTypeError, ArgumentValueError
from . import _args, _autocast
from ..ops import _checks, attention as _ops
from ..reference import attention as _ref

__all__ = ["scaled_dot_product_attention", "varlen_attention"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_ALIGNMENTS = ("top_left", "bottom_right")


def _check_common(fn: str, tensors: Sequence[Tuple[str, object]], dropout_p, scale, window, softcap,
                  causal_alignment, flags: Sequence[Tuple[str, object]] = ()) -> Tuple[int, int]:
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        _args.check_float_dtype(fn, name, t)
    (qn, q), rest = tensors[0], tensors[1:]
    for name, t in rest:
        if t.dtype != q.dtype:
            raise ArgumentTypeError(f"{fn}: {name} has dtype {t.dtype} but {qn} has {q.dtype} (they must match)")
        if t.device != q.device:
            raise ArgumentValueError(f"{fn}: {name} is on {t.device} but {qn} is on {q.device}")
    if not 0.0 <= _args.check_real(fn, "dropout_p", dropout_p) <= 1.0:  # (a str: torch's TypeError)
        raise ArgumentValueError(f"{fn}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is not None:
        _args.check_real(fn, "scale", scale, "a float or None")
    for name, flag in flags:
        _args.check_bool(fn, name, flag)
    _args.check_real(fn, "softcap", softcap, "a float (0: off)")
    if not (softcap >= 0.0 and softcap != float("inf")):  # (not math.isfinite: dynamic=True traces a SymFloat)
        raise ArgumentValueError(f"{fn}: softcap must be finite and >= 0 (0: off), got {softcap}")
    if causal_alignment not in _ALIGNMENTS:
        raise ArgumentValueError(f"{fn}: causal_alignment must be 'top_left' or 'bottom_right', got "
                                 f"{causal_alignment!r}")
    if window is None:
        return -1, -1
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ArgumentValueError(f"{fn}: window must be (left, right) ints >= -1 (-1: unbounded), got {window!r}")
    return int(window[0]), int(window[1])


def _multiple(H: int, Hk: int) -> bool:
    """Whether H query heads are a multiple of Hk key/value heads (GQA). 0 is the only multiple of 0: 0 key/value
    heads serve no query head (torch's SDPA returns zeros there, as if no key), and H % 0 raised a bare
    ZeroDivisionError."""
    return H % Hk == 0 if Hk else H == 0


def _clip_window(win: Tuple[int, int], n: int) -> Tuple[int, int]:
    """A side of n (the query plus key lengths) or more excludes no key: -1, before any kernel forms i + d + side
    in int32 (INT_MAX as "unbounded" wrapped to negative there)."""
    if win[0] < n and win[1] < n:  # the usual case, (-1, -1) included: nothing to clip
        return win
    return tuple(-1 if w >= n else w for w in win)


def _kernel_reason(b: str, dtype: torch.dtype, head_dims: Tuple[int, int], device: torch.device) -> Optional[str]:
    if b == "reference":
        return None
    if b == "cpu":
        return "attention has no C++ CPU kernel (automatic CPU calls run torch's SDPA, else the reference)"
    if b not in _ops.KERNELS:
        if b == "triton":
            return _ops.triton_import_error or "the Triton attention ops are not registered"
        return "the CUDA attention kernels are not implemented yet (pykernels::attention_fwd is not registered)"
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} is not supported by the {b} kernels (float16, bfloat16, float32)"
    if why := backends.interpreted_dot_reason(b, dtype, device):
        return why
    if max(head_dims) > MAX_HEAD_DIM:
        return f"head dim {max(head_dims)} > {MAX_HEAD_DIM}"
    return None


# What the CUDA kernels (csrc/cuda/attention.cu) cover; the rest of a "cuda" call's options go to the next
# backend, with this reason in last_dispatch.
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 256  # kAttentionMaxHeadDim, csrc/cuda/attention.h
# The cuda grids hold the 64-row tiles of a sequence on an axis CUDA caps at 65535 (launch in
# csrc/cuda/attention_tiles.cuh refuses more): longer sequences run on the next backend.
CUDA_MAX_SEQ_LEN = 65535 * 64


# The sm_80 dQ kernel at padded head dim 256 holds four 64 x 264 16-bit tiles (DqCfg, csrc/cuda/attention.cu):
# more shared memory than sm_86 / sm_89 GPUs (A10, L4, L40, RTX 30/40) give a block (99 KB), which run the sm_80 build.
CUDA_DQ_SMEM_256 = (2 * 64 + 2 * 64) * (256 + 8) * 2


def _cuda_reason(dtype: torch.dtype, head_dims: Tuple[int, int], lengths: Tuple[int, int] = (0, 0),
                 backward_smem: Optional[int] = None) -> Optional[str]:
    """Why the cuda kernels cannot run a call; ``backward_smem``: the shared memory a block may use on the call's GPU
    when the call will need the backward (None: no backward, or not asked)."""
    if dtype not in _CUDA_DTYPES:
        return f"dtype {dtype} is not supported by the cuda kernels (float16, bfloat16)"
    if max(head_dims) > CUDA_MAX_HEAD_DIM:
        return f"head dim {max(head_dims)} > {CUDA_MAX_HEAD_DIM} in the cuda kernels"
    if max(lengths) > CUDA_MAX_SEQ_LEN:
        return f"sequence length {max(lengths)} > {CUDA_MAX_SEQ_LEN} (65535 tiles of 64 rows) in the cuda kernels"
    if backward_smem is not None and max(head_dims) > 128 and backward_smem < CUDA_DQ_SMEM_256:
        return (f"head dim {max(head_dims)}: the cuda dQ kernel needs {CUDA_DQ_SMEM_256} bytes of shared memory per "
                f"block, this GPU gives {backward_smem}")
    return None


def _backward_smem(device: torch.device, tensors) -> Optional[int]:
    """The shared memory per block of the call's GPU when the call records a gradient (for _cuda_reason); under
    torch.compile too (a constant of the graph)."""
    if device.type != "cuda" or not torch.is_grad_enabled():
        return None
    if not any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        return None
    return _device_props.smem_optin(device.index)


def _unsupported(b: str, q: Tensor, head_dims: Tuple[int, int], lengths, dropout_p: float, tensors) -> Optional[str]:
    """Why backend ``b`` cannot run an attention call with queries like ``q`` (None: it can); ``tensors``: the
    operands whose gradient the call may record."""
    why = _kernel_reason(b, q.dtype, head_dims, q.device)
    if why is None and b != "reference" and dropout_p >= 1.0:
        return "dropout_p == 1 (every probability dropped) runs on the reference"
    if why is None and b == "cuda":
        return _cuda_reason(q.dtype, head_dims, lengths, _backward_smem(q.device, tensors))
    return why


def _seed(device: torch.device) -> Tensor:
    # Drawn from torch's generator of the device (torch.manual_seed reproduces it), kept on the device: no sync.
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _query_broadcasts(qlead: torch.Size, klead: torch.Size, gqa: bool) -> bool:
    """Whether key/value have a leading dim that query lacks or holds at 1 (a few int compares: GQA and MQA calls
    differ in the heads on every call, and torch.broadcast_shapes costs tens of microseconds)."""
    if gqa:
        qlead, klead = qlead[:-1], klead[:-1]
    return len(klead) > len(qlead) or any(q == 1 and k != 1 for q, k in zip(reversed(qlead), reversed(klead)))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, window: Optional[Tuple[int, int]] = None,
                                 softcap: float = 0.0, causal_alignment: str = "top_left",
                                 return_lse: bool = False, backend: Optional[str] = None):
    """``torch.nn.functional.scaled_dot_product_attention`` on fused flash-attention kernels.

    query (..., H, L, E), key (..., H_kv, S, E), value (..., H_kv, S, Ev); a bool ``attn_mask`` is True where
    attention is allowed, a float one is added to the scores (and gets a gradient when it requires grad); masks
    broadcast to (..., H, L, S); ``is_causal`` is top-left aligned; ``enable_gqa`` shares each key/value head
    among H / H_kv query heads; dropout is applied when ``dropout_p > 0`` (as torch, whatever the training
    mode). A query row that sees no key gives zeros. Unlike torch, ``attn_mask`` and ``is_causal`` may be
    combined (both apply).

    Extras (keyword-only):
      window: (left, right) sliding window around the causal diagonal: query i sees keys j with
        i + d - left <= j <= i + d + right (d = 0, or S - L for bottom-right alignment); -1: unbounded.
      softcap: logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2), applied before the mask.
      causal_alignment: "top_left" (torch) or "bottom_right" (FlashAttention: the last query sees every key).
      return_lse: also return the log-sum-exp of each query row's scores, fp32 (..., H, L) (detached).
      backend: "triton", "cuda", "cpu" or "reference"; see ``pykernels.backends``.
    """
    fn = "scaled_dot_product_attention"
    if isinstance(query, Tensor) and _autocast.enabled(query):  # torch's SDPA is on autocast's lower-precision list
        to = _autocast.to_lower_precision  # float64 and bool masks are left alone, as autocast does
        with _autocast.off(query):
            return scaled_dot_product_attention(to(query), to(key), to(value), to(attn_mask), dropout_p, is_causal,
                                                scale, enable_gqa, window=window, softcap=softcap,
                                                causal_alignment=causal_alignment, return_lse=return_lse,
                                                backend=backend)
    dropout_p, scale, softcap = _args.real(dropout_p), _args.real(scale), _args.real(softcap)
    win = _check_common(fn, [("query", query), ("key", key), ("value", value)], dropout_p, scale, window,
                        softcap, causal_alignment,
                        (("is_causal", is_causal), ("enable_gqa", enable_gqa), ("return_lse", return_lse)))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ArgumentValueError(f"{fn}: {name} must have at least 2 dimensions (..., L, E), got {t.dim()}")
    L, E = query.shape[-2], query.shape[-1]
    S, Ev = key.shape[-2], value.shape[-1]
    win = _clip_window(win, L + S)
    if key.shape[-1] != E:
        raise ArgumentValueError(f"{fn}: key's last dim {key.shape[-1]} != query's {E} (the head dim must match)")
    if value.shape[-2] != S:
        raise ArgumentValueError(f"{fn}: value has {value.shape[-2]} positions but key has {S}")
    if key.shape[:-2] != value.shape[:-2]:  # torch's two matmuls broadcast them independently
        try:
            kv_lead = torch.broadcast_shapes(key.shape[:-2], value.shape[:-2])
        except RuntimeError:
            raise ArgumentValueError(f"{fn}: the leading dims of key {tuple(key.shape)} and value "
                                     f"{tuple(value.shape)} do not broadcast") from None
        key, value = key.expand(*kv_lead, S, E), value.expand(*kv_lead, S, Ev)
    qlead, klead = query.shape[:-2], key.shape[:-2]
    if qlead != klead and _query_broadcasts(qlead, klead, enable_gqa):
        # torch broadcasts the leading dims of query and key/value (with GQA: all but the heads)
        try:
            if not enable_gqa:
                lead = torch.broadcast_shapes(qlead, klead)
            elif query.dim() >= 3 and key.dim() >= 3:
                lead = torch.broadcast_shapes(qlead[:-1], klead[:-1]) + qlead[-1:]
            else:
                lead = qlead
        except RuntimeError:  # the head and batch checks below name what does not fit
            lead = qlead
        if lead != qlead:  # a zero-stride view: the kernels read it in place, autograd sums dq back
            query = query.expand(*lead, L, E)
    H = query.shape[-3] if query.dim() >= 3 else 1
    Hk = key.shape[-3] if key.dim() >= 3 else 1
    gqa = H != Hk and Hk != 1 or (enable_gqa and H != Hk)
    if gqa:
        if not enable_gqa:
            raise ArgumentValueError(f"{fn}: query has {H} heads and key/value {Hk}: pass enable_gqa=True (GQA/MQA)")
        if not _multiple(H, Hk):
            raise ArgumentValueError(f"{fn}: query heads {H} must be a multiple of key/value heads {Hk} for GQA")
    batch = query.shape[:-3]
    kv_batch = key.shape[:-3]
    try:  # (torch.broadcast_shapes costs microseconds: not for the common equal shapes)
        full_batch = batch if kv_batch == batch else torch.broadcast_shapes(batch, kv_batch)
    except RuntimeError:
        raise ArgumentValueError(f"{fn}: batch dims of query {tuple(batch)} and key/value {tuple(kv_batch)} do not "
                                 f"broadcast") from None
    if full_batch != batch:
        raise ArgumentValueError(f"{fn}: key/value batch dims {tuple(kv_batch)} are larger than query's {tuple(batch)}")
    score_shape = query.shape[:-1] + (S,)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ArgumentTypeError(f"{fn}: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):  # torch's rule, on every device
            raise ArgumentTypeError(f"{fn}: attn_mask must be bool (True = attend), or float32 or query's dtype "
                                    f"{query.dtype} (added), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ArgumentValueError(f"{fn}: attn_mask is on {attn_mask.device} but query is on {query.device}")
        if query.dim() == 3 and attn_mask.dim() == 4 and attn_mask.shape[0] == 1:
            attn_mask = attn_mask.squeeze(0)  # as torch, which takes (1, H, L, S) masks of 3-D (H, L, E) queries
        try:
            ok = attn_mask.shape == score_shape or torch.broadcast_shapes(attn_mask.shape, score_shape) == score_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ArgumentValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                                     f"scores' shape {tuple(score_shape)}")
    if (win == (-1, -1) and softcap == 0.0 and causal_alignment == "top_left" and not return_lse
            and not (is_causal and attn_mask is not None)  # what torch's SDPA expresses
            and backends.prefer_native(fn, query.device, backend, tensors=(query, key, value, attn_mask))):
        return _native.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                    enable_gqa=enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    dropout_p = float(dropout_p)

    def unsupported(b: str) -> Optional[str]:
        return _unsupported(b, query, (E, Ev), (query.shape[-2], key.shape[-2]), dropout_p,
                            (query, key, value, attn_mask))

    chosen = backends.choose("scaled_dot_product_attention", query.device, backend, unsupported,
                             tensors=(query, key, value, attn_mask),
                             empty=query.numel() == 0 or key.numel() == 0 or value.numel() == 0)
    alignment = causal_alignment
    if chosen == "reference":
        keep = None
        if dropout_p > 0:
            # float32 whatever the default dtype: a bfloat16 default drew p = 0.1 as 0.1016 (its 8-bit grid)
            keep = torch.rand(score_shape, device=query.device, dtype=torch.float32) >= dropout_p
        k_, v_ = key, value
        if not gqa and Hk != H:  # broadcast of a single kv head
            k_ = key.expand(*key.shape[:-3], H, S, E) if key.dim() >= 3 else key.expand(*query.shape[:-2], S, E)
            v_ = (value.expand(*value.shape[:-3], H, S, Ev) if value.dim() >= 3
                  else value.expand(*query.shape[:-2], S, Ev))
        out, lse = _ref.scaled_dot_product_attention(query, k_, v_, attn_mask, keep, dropout_p, is_causal, scale,
                                                     gqa, alignment, win, softcap)
        return (out, lse.detach().float()) if return_lse else out

    # Canonical (B, H, L, E) views for the kernels: key/value broadcast over batch (and a single kv head over
    # the query heads when not GQA) through zero strides, never copied.
    B = math.prod(batch)
    Hkv = Hk if gqa else H
    q4 = query.reshape(B, H, L, E)
    k4 = key.expand(*batch, Hkv, S, E).reshape(B, Hkv, S, E) if key.dim() >= 3 else \
        key.expand(*batch, 1, S, E).reshape(B, 1, S, E)
    v4 = value.expand(*batch, Hkv, S, Ev).reshape(B, Hkv, S, Ev) if value.dim() >= 3 else \
        value.expand(*batch, 1, S, Ev).reshape(B, 1, S, Ev)
    bias = None
    if attn_mask is not None:
        Sm = attn_mask.shape[-1] if attn_mask.dim() else 1  # constant along the keys stays so (exact-zero grad)
        bias = attn_mask.expand(*score_shape[:-1], Sm).reshape(B, H, L, Sm) \
            if attn_mask.dim() > 4 or query.dim() != 4 else attn_mask
    diag = S - L if (alignment == "bottom_right") else 0
    seed = _seed(query.device) if dropout_p > 0 else None
    out, lse, _ = _ops.attention(q4, k4, v4, bias, None, None, L, S, float(scale), bool(is_causal), diag, False,
                                 win[0], win[1], float(softcap), dropout_p, seed, chosen)
    out = out.reshape(query.shape[:-1] + (Ev,))
    if return_lse:
        return out, lse.reshape(query.shape[:-1]).detach()
    return out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, dropout_p: float = 0.0, is_causal: bool = False,
                     scale: Optional[float] = None, window: Optional[Tuple[int, int]] = None,
                     softcap: float = 0.0, causal_alignment: str = "top_left", return_lse: bool = False,
                     backend: Optional[str] = None):
    """Attention over packed variable-length sequences (FlashAttention's varlen layout).

    q (T, H, E), k (Tk, H_kv, E), v (Tk, H_kv, Ev); sequence i is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of
    q and ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k/v (int32 offsets, nseq + 1 each); ``max_seqlen_q/k`` bound
    the sequence lengths (they size the launch grid: one above T (Tk) is taken as T (Tk); no host sync). GQA when
    H_kv divides H. Causal alignment, window and softcap as in ``scaled_dot_product_attention``, per sequence;
    causal defaults to top-left (torch's convention; FlashAttention's varlen is bottom-right: pass
    causal_alignment="bottom_right").
    Returns out (T, H, Ev), and with return_lse the log-sum-exp (H, T) fp32 (FlashAttention's layout).
    """
    fn = "varlen_attention"
    if isinstance(q, Tensor) and _autocast.enabled(q):  # as scaled_dot_product_attention
        to = _autocast.to_lower_precision
        with _autocast.off(q):
            return varlen_attention(to(q), to(k), to(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=dropout_p, is_causal=is_causal, scale=scale, window=window,
                                    softcap=softcap, causal_alignment=causal_alignment, return_lse=return_lse,
                                    backend=backend)
    dropout_p, scale, softcap = _args.real(dropout_p), _args.real(scale), _args.real(softcap)
    win = _check_common(fn, [("q", q), ("k", k), ("v", v)], dropout_p, scale, window, softcap, causal_alignment,
                        (("is_causal", is_causal), ("return_lse", return_lse)))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ArgumentValueError(f"{fn}: {name} must be (total_tokens, heads, head_dim), got shape "
                                     f"{tuple(t.shape)}")
    T, H, E = q.shape
    Tk, Hk, Ev = v.shape
    win = _clip_window(win, T + Tk)
    if k.shape[:2] != (Tk, Hk) or k.shape[2] != E:
        raise ArgumentValueError(f"{fn}: k must be ({Tk}, {Hk}, {E}) to match q and v, got {tuple(k.shape)}")
    if not _multiple(H, Hk):
        raise ArgumentValueError(f"{fn}: q heads {H} must be a multiple of k/v heads {Hk}")
    _checks.varlen_offsets(fn, cu_seqlens_q, cu_seqlens_k, T, Tk, q.device, (torch.int32, torch.int64))
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        # (any integer torch's parser takes: numpy ints, and the SymInt that export hands over for q.shape[0])
        if not _args.is_index(m) or m < 0:
            raise ArgumentValueError(f"{fn}: {name} must be an int >= 0, got {m!r}")
    # a bound above the total tokens is valid (flash-attn takes it) but sizes the launch grid: 2**40 ran for hours.
    # sym_min keeps a symbolic bound symbolic (min() would guard on it, specialising an exported token count).
    max_seqlen_q, max_seqlen_k = (torch.sym_min(_args.index(m), n) for m, n in ((max_seqlen_q, T), (max_seqlen_k, Tk)))
    _checks.varlen_lengths(fn, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    dropout_p = float(dropout_p)

    def unsupported(b: str) -> Optional[str]:
        return _unsupported(b, q, (E, Ev), (max_seqlen_q, max_seqlen_k), dropout_p, (q, k, v))

    chosen = backends.choose("varlen_attention", q.device, backend, unsupported, tensors=(q, k, v),
                             empty=T == 0 or Tk == 0 or q.numel() == 0)
    if q.device.type == "meta":  # shapes only (the sequence boundaries are data a meta tensor does not hold)
        out = q.new_empty(q.shape[0], H, Ev)
        return (out, q.new_empty(H, q.shape[0], dtype=torch.float32)) if return_lse else out
    # The reference's varlen code reads the offsets on the host and loops over the sequences: eager calls run it
    # as plain PyTorch (full autograd), traced ones (torch.compile) as the opaque op pykernels::attention with
    # backend "reference" below, whose dropout masks come from the seed (another random stream than eager's).
    if chosen == "reference" and not torch.compiler.is_compiling():
        masks = _ref.varlen_dropout_masks(cu_seqlens_q, cu_seqlens_k, H, dropout_p, q.device) if dropout_p > 0 else None
        out, lse = _ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, masks, dropout_p, is_causal, scale,
                                         causal_alignment, win, softcap)
        return (out, lse.detach().float()) if return_lse else out
    seed = _seed(q.device) if dropout_p > 0 else None
    out, lse, _ = _ops.attention(q, k, v, None, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                 max_seqlen_q, max_seqlen_k, float(scale), bool(is_causal), 0,
                                 causal_alignment == "bottom_right", win[0], win[1], float(softcap), dropout_p,
                                 seed, chosen)
    return (out, lse.detach()) if return_lse else out

"""Vocab-parallel fused linear cross-entropy over a torch.distributed process group.

Each rank holds a contiguous block of rows of the LM head: ``linear_weight`` (V_r, H) (and ``linear_bias`` (V_r,))
are the classes ``[vocab_start, vocab_start + V_r)`` of a vocabulary of ``vocab_size`` classes (default: rank r
holds ``[r * V_r, (r + 1) * V_r)`` and ``vocab_size = world * V_r``). ``input``, ``target`` and the class
``weight`` (vocab_size,) are the same on every rank (replicated, as after a tensor-parallel all-gather).

Check: before any kernel, one all_gather of 6 int64 per rank (vocab_start, V_r, vocab_size, N, H, and whether the
rank refused its own arguments) on input's device. Unless no rank refused, the shards tile [0, vocab_size) (no
overlap, no gap) and the ranks agree on vocab_size, N and H, every rank raises (CPU: the refusing rank its own error,
the others an ArgumentValueError naming the argument or the refusing rank; elsewhere a device-side assert, with no
host read). Otherwise the loss would be silently wrong, gloo would abort the process on mismatched all_reduce sizes,
or a rank raising alone would leave the others waiting. It moves 48 bytes per rank: latency only.
Forward: every rank runs the backend's forward kernel on its shard (per-row max and log-sum-exp relative to it,
target logit, smoothing sum over its classes; never the logits), then two all_reduces combine them: MAX of the row
max, then one SUM of the stacked (sum-exp relative to the global max, target logit, smoothing sum). The loss is
identical on every rank.
Backward: every rank recomputes its shard's logit tiles with the global lse, gets d_weight / d_bias of its own
rows and its partial d_input, and one SUM all_reduce of d_input (in fp32) makes d_input right on every rank.
Collectives: the check's all_gather (6 int64 per rank), 2 all_reduces in the forward (N floats, op MAX; then 3N
floats, op SUM), 1 in the backward (N x H floats).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends
from .errors import ArgumentTypeError, ArgumentValueError
from .ops import _higher_order
from .ops import linear_cross_entropy as _lce

__all__ = ["vocab_parallel_linear_cross_entropy"]


class _VocabParallelLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                z_loss, softcap, group, vocab_start, vocab_size, backend, loss_dtype):
        fwd, _ = _lce.KERNELS[backend]
        acc = _lce.acc_dtype(input.dtype)
        smooth = label_smoothing > 0
        w_local = None if weight is None else weight[vocab_start:vocab_start + linear_weight.shape[0]].contiguous()
        m_l, ls_l, zy, zs = fwd(input, linear_weight, linear_bias, target, w_local, vocab_start, softcap, smooth)
        # A shard with no finite logit in a row (an empty shard, or classes all at -inf) reports m = 0 with log_s =
        # -inf: it must not lift the row's max, or exp(true max - 0) underflows for logits below ~-87 (fp32) and the
        # loss becomes -inf. With no finite logit anywhere the max is the kernels' 0 again.
        m = m_l.masked_fill(ls_l == float("-inf"), float("-inf"))
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = m.masked_fill(m == float("-inf"), 0.0)
        stats = torch.stack([torch.exp((m_l - m) + ls_l), zy.to(acc), zs.to(acc)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        log_s = torch.log(stats[0])
        lse = m + log_s
        valid, bad, w_y, wsum = _lce.row_terms(target, weight, ignore_index, vocab_size, acc)
        rows = _lce.rows_loss(m, log_s, stats[1], stats[2], valid, bad, w_y, wsum, vocab_size, label_smoothing,
                              z_loss)
        loss, denom = _lce.reduce_rows(rows, w_y, reduction)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, w_local, m, log_s, denom)
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss, softcap, group, vocab_start, vocab_size,
                    backend)
        ctx.mark_non_differentiable(lse)
        # one rounding, from the accumulator. Traced, a fresh tensor: torch 2.11's Dynamo also returns the forward's
        # intermediates, and an output that is one of them (a no-op .to) gets its gradient slot: zero gradients
        # (pytorch/pytorch#180642; later torch leaves out the aliases)
        return loss.to(loss_dtype, copy=torch.compiler.is_compiling()), lse

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        if _higher_order.create_graph(g_loss):  # the collectives are outside autograd: a graph would miss them
            _higher_order.refuse("pykernels.linear_cross_entropy (vocab-parallel)", "its statistics and d_input are "
                                 "combined by collectives that autograd does not record", "Compute second-order "
                                 "terms without group= (on the whole weight), or with torch.distributed.nn's "
                                 "differentiable collectives around F.linear and F.cross_entropy.")
        input, linear_weight, linear_bias, target, weight, w_local, m, log_s, denom = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss, softcap, group, vocab_start, vocab_size, backend = ctx.args
        acc = _lce.acc_dtype(input.dtype)
        g = _lce.upstream_rows(g_loss, denom, reduction, input.shape[0], acc)
        valid, _, w_y, wsum = _lce.row_terms(target, weight, ignore_index, vocab_size, acc)
        cp, cy, cw = _lce.row_coefficients(g, m + log_s, valid, w_y, wsum, vocab_size, label_smoothing, z_loss)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = linear_bias is not None and ctx.needs_input_grad[2]
        gx, gw, gb = _lce.split_backward(input, linear_weight, linear_bias, target, w_local, m, log_s, cp, cy, cw,
                                         vocab_start, softcap, label_smoothing > 0, need_x, need_w, need_b, backend)
        if need_x:
            gx = gx.contiguous()
            dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=group)  # fp32: the sum over shards, then one rounding
            gx = gx.to(input.dtype)
        return ((gx if need_x else None), (gw if need_w else None), (gb if need_b else None),
                None, None, None, None, None, None, None, None, None, None, None, None)


def _agree(gathered: Tensor) -> Tensor:
    """Whether the gathered (world, 6) rows (vocab_start, V_r, vocab_size, N, H, refused) are consistent, as a bool
    tensor on their device (no host read): no rank refused its own arguments, the same vocab_size, N and H
    everywhere, and shards that tile [0, vocab_size) (inside it, sizes summing to it, no overlap; an empty shard
    holds no class)."""
    start, rows, vocab, n, h, refused = gathered.unbind(1)
    V = vocab[0]
    end = start + rows
    same = (refused == 0).all() & (vocab == V).all() & (n == n[0]).all() & (h == h[0]).all()
    inside = ((start >= 0) & (rows >= 0) & (end <= V)).all() & (rows.sum() == V)
    s = torch.where(rows > 0, start, V)  # empty shards sort last and overlap nothing
    order = s.argsort()
    e = torch.where(rows > 0, end, V)[order]
    return same & inside & (s[order][1:] >= e[:-1]).all()


def _disagreement(gathered: list) -> Optional[str]:
    """The first inconsistency of the gathered rows (host lists), as the error that names the argument; None when
    _agree holds."""
    starts, sizes, vocab, ns, hs, refused = zip(*gathered)
    if any(refused):
        return (f"linear_cross_entropy: rank(s) {[r for r, x in enumerate(refused) if x]} refused their arguments "
                f"(the error there names them): no rank computes")
    for name, what, values, hint in (
            ("vocab_size", "vocab_size", vocab, " (default: world size x the rank's rows; pass it and vocab_start "
                                                "for uneven shards)"),
            ("input", "input's rows N", ns, " (input and target must be replicated)"),
            ("input", "input's in_features H", hs, "")):
        if len(set(values)) > 1:
            return f"linear_cross_entropy: {name}: the ranks disagree on {what}: {list(values)} by rank{hint}"
    V = vocab[0]
    untiled = f"linear_cross_entropy: vocab_start: the shards do not tile [0, {V}): "
    end, last = 0, None  # classes [0, end) are covered, the last by shard `last`
    for s, e, r in sorted((s, s + v, r) for r, (s, v) in enumerate(zip(starts, sizes))):
        if not 0 <= s <= e <= V:
            return f"{untiled}rank {r}'s shard [{s}, {e}) is outside the vocabulary"
        if s == e:
            continue  # an empty shard holds no class
        if s < end:
            return (f"{untiled}rank {last[2]}'s shard [{last[0]}, {last[1]}) and rank {r}'s [{s}, {e}) overlap; pass "
                    f"vocab_start (and vocab_size) for uneven shards")
        if s > end:
            return f"{untiled}classes [{end}, {s}) are on no rank"
        end, last = e, (s, e, r)
    return None if end == V else f"{untiled}classes [{end}, {V}) are on no rank"


def _check_ranks_agree(vocab_start: int, rows: int, vocab_size: int, n: int, h: int, group, device,
                       refused: Optional[Exception] = None) -> None:
    """One all_gather of 6 int64 per rank: no rank refused its own arguments (``refused``: this rank's error, raised
    here after the gather), the shards [vocab_start, vocab_start + rows) tile [0, vocab_size) and every rank passes
    the same vocab_size and input of the same N x H. Otherwise the loss is silently wrong (overlap, gap,
    vocab_size), gloo aborts the process on mismatched collective sizes (N, H), or a rank raising alone leaves the
    others waiting in a collective. On CPU every rank decides from the same gathered values, so every rank raises
    (the refusing one its own error, the others an ArgumentValueError that names it); on other devices the peers
    of a refusing rank fail a device-side assert (as the target range check), which reads nothing back to the
    host: no stream sync per call. Under torch.compile a rank's own checks run while it traces, so its refusal
    reaches no other rank: they wait in the gather until the group's timeout."""
    # on input's device, as the other collectives: a device the group's backend takes
    mine = torch.tensor([vocab_start, rows, vocab_size, n, h, refused is not None], dtype=torch.int64,
                        device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    if refused is not None:
        raise refused
    gathered = torch.stack(parts)
    if gathered.device.type == "cpu" and not torch.compiler.is_compiling():
        why = _disagreement(gathered.tolist())
        if why is not None:
            raise ArgumentValueError(why)
    else:
        torch._assert_async(_agree(gathered), "linear_cross_entropy: the ranks' shards (vocab_start, rows) do not "
                                              "tile [0, vocab_size), or they disagree on vocab_size, N or H")


def vocab_parallel_linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                        linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                                        reduction: str = "mean", ignore_index: Optional[int] = None,
                                        label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0,
                                        return_lse: bool = False, group=None, vocab_start: Optional[int] = None,
                                        vocab_size: Optional[int] = None, backend: Optional[str] = None,
                                        _loss_dtype: Optional[torch.dtype] = None):
    """``pykernels.functional.linear_cross_entropy`` with the vocabulary sharded over ``group`` (None: the default
    group). Class-index targets only (global class ids); input (..., H), linear_weight (V_r, H) of this rank.
    Backends: "cuda" (fp16/bf16), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cpu" (the C++ kernels) and
    "reference" (the kernel contract in plain PyTorch, chunked: also never the logits). ``_loss_dtype``: the loss's
    dtype (None: input's; float32 under autocast), cast once from the float32 accumulator."""
    from .functional.cross_entropy import _check_target_range, _check_weight_dtype, _index, _smoothing
    from .functional.linear_cross_entropy import _check_dtypes_devices, _check_options, kernel_reason
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("linear_cross_entropy: group= needs an initialised torch.distributed process group")
    if group is True:
        group = None
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    Vr = H = 0
    try:  # checks of this rank's own arguments: their error is raised after the ranks' check, so no rank hangs
        if not isinstance(linear_weight, Tensor) or linear_weight.dim() != 2:
            raise ArgumentValueError("linear_cross_entropy: vocab-parallel linear_weight must be this rank's (V_r, H) "
                                     "rows")
        if not isinstance(input, Tensor) or not input.dtype.is_floating_point or input.dim() < 1:
            raise ArgumentTypeError("linear_cross_entropy: input must be a floating-point Tensor (..., H)")
        Vr, H = linear_weight.shape
        if input.shape[-1] != H:
            raise ArgumentValueError(f"linear_cross_entropy: linear_weight's last dimension ({H}) must equal input's "
                                     f"last dimension, in_features ({input.shape[-1]})")
        if (not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.uint8)
                or tuple(target.shape) != tuple(input.shape[:-1])):
            raise ArgumentValueError(f"linear_cross_entropy: vocab-parallel target must be int64 (or uint8) class "
                                     f"indices of shape {tuple(input.shape[:-1])}")
        _check_dtypes_devices(input, linear_weight, target, linear_bias, weight)
        target = target.to(torch.int64)  # before any comparison: a uint8 255 must not equal ignore_index -1
        vocab_start = rank * Vr if vocab_start is None else _index("linear_cross_entropy", "vocab_start", vocab_start)
        vocab_size = world * Vr if vocab_size is None else _index("linear_cross_entropy", "vocab_size", vocab_size)
        if linear_bias is not None and tuple(linear_bias.shape) != (Vr,):
            raise ArgumentValueError(f"linear_cross_entropy: linear_bias must have shape ({Vr},) (this rank's "
                                     f"classes), got {tuple(linear_bias.shape)}")
        if weight is not None and tuple(weight.shape) != (vocab_size,):
            raise ArgumentValueError(f"linear_cross_entropy: weight must have shape ({vocab_size},) (the whole "
                                     f"vocabulary), got {tuple(weight.shape)}")
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise ArgumentValueError("linear_cross_entropy: the vocab-parallel path treats the class weight as a "
                                     "constant; pass weight.detach() (a weight that requires grad would get no "
                                     "gradient)")
        label_smoothing, z_loss, softcap = _check_options(reduction, label_smoothing, z_loss, softcap, return_lse)
        _check_weight_dtype("linear_cross_entropy", weight, _loss_dtype or input.dtype, _loss_dtype is not None)
        label_smoothing = _smoothing(label_smoothing)
        ii = -100 if ignore_index is None else _index("linear_cross_entropy", "ignore_index", ignore_index)
        _check_target_range(target, vocab_size, ii, "linear_cross_entropy")
        refused = None
    except Exception as e:  # noqa: BLE001 (any error of this rank's arguments: re-raised after the gather)
        refused = e
        vocab_start, vocab_size = vocab_start if isinstance(vocab_start, int) else 0, 0
    _check_ranks_agree(vocab_start, Vr, vocab_size, target.numel() if isinstance(target, Tensor) else 0, H, group,
                       device, refused)

    def unsupported(b: str) -> Optional[str]:
        if b == "reference":
            return None
        return kernel_reason(b, input.dtype) or backends.interpreted_dot_reason(b, input.dtype, input.device)

    chosen = backends.choose("linear_cross_entropy_vocab_parallel", input.device, backend, unsupported,
                             tensors=(input, linear_weight, linear_bias))
    batch = input.shape[:-1]
    w = None if weight is None else weight.detach().to(_lce.acc_dtype(input.dtype)).contiguous()
    loss, lse = _VocabParallelLCE.apply(input.reshape(-1, H), linear_weight,
                                        None if linear_bias is None else linear_bias.contiguous(),
                                        target.reshape(-1).contiguous(), w, ii, _lce.REDUCTIONS[reduction],
                                        float(label_smoothing), float(z_loss), float(softcap or 0.0), group,
                                        vocab_start, vocab_size, chosen, _loss_dtype or input.dtype)
    if reduction == "none":
        loss = loss.reshape(batch)
    return (loss, lse.reshape(batch)) if return_lse else loss

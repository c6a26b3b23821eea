"""The linear cross-entropy oracle against torch's own linear + cross_entropy (and torch's
F.linear_cross_entropy where this torch has it), in float64, with every gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pykernels.reference import linear_cross_entropy as ref


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,weighted,smoothing", [(False, False, 0.0), (True, True, 0.1)])
def test_matches_linear_then_cross_entropy(reduction, bias, weighted, smoothing):
    N, H, V = 11, 7, 37
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    w = torch.rand(V, dtype=torch.float64) + 0.5 if weighted else None
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    leaves = [x, W] + ([b] if bias else [])
    ours, _ = ref.linear_cross_entropy(x, W, t, b, w, reduction, None, smoothing)
    theirs = F.cross_entropy(F.linear(x, W, b), t, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ours)
    for a, c in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(theirs, leaves, g)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13
        native = F.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction,
                                        label_smoothing=smoothing)
        torch.testing.assert_close(ours, native, rtol=1e-10, atol=1e-10)


def test_softcap_and_batched_input():
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    W = torch.randn(13, 6, dtype=torch.float64)
    t = torch.randint(0, 13, (2, 5))
    loss, lse = ref.linear_cross_entropy(x, W, t, softcap=3.0, reduction="none")
    z = 3.0 * torch.tanh((x @ W.t()) / 3.0)
    torch.testing.assert_close(loss, F.cross_entropy(z.movedim(-1, 1), t, reduction="none"))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_kernels_follow_their_contract_over_several_chunks(monkeypatch, softcap, chunk):
    """The chunked reference kernels (the oracle of every backend's kernel ops) against their docstrings computed on
    the whole N x V logits: a vocabulary shard at vocab_start, targets on chunk edges, outside the shard, ignored."""
    monkeypatch.setattr(ref, "_CHUNK", chunk)
    N, H, V, start = 9, 4, 23, 3
    x = torch.randn(N, H, dtype=torch.float64)
    W = torch.randn(V, H, dtype=torch.float64)
    b = torch.randn(V, dtype=torch.float64)
    w = torch.rand(V, dtype=torch.float64) + 0.5
    t = torch.tensor([start, start + 4, start + 5, start + 9, start + 10, start + V - 1, start + V, 0, -100])
    z = x @ W.t() + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    m, log_s, zy, zs = ref.linear_cross_entropy_fwd(x, W, b, t, w, start, softcap, True)
    torch.testing.assert_close(m + log_s, torch.logsumexp(z, 1))
    local = t - start
    hit = (local >= 0) & (local < V)
    torch.testing.assert_close(zy, torch.where(hit, z.gather(1, local.clamp(0, V - 1)[:, None])[:, 0], 0.0))
    torch.testing.assert_close(zs, (z * w).sum(1))
    cp, cy, cw = (torch.rand(N, dtype=torch.float64) for _ in range(3))
    gx, gw, gb = ref.linear_cross_entropy_bwd(x, W, b, t, w, m, log_s, cp, cy, cw, start, softcap, True,
                                              True, True, True)
    d = cp[:, None] * torch.softmax(z, 1) - cy[:, None] * F.one_hot(local.clamp(0, V - 1), V) * hit[:, None] \
        - cw[:, None] * w[None]
    if softcap:
        d = d * (1 - (z / softcap).square())
    torch.testing.assert_close(gx, d @ W)
    torch.testing.assert_close(gw, d.t() @ x)
    torch.testing.assert_close(gb, d.sum(0))


def test_ignore_index_zero_and_batched_probabilities():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    W = torch.randn(6, 4, dtype=torch.float64)
    z = F.linear(x, W)
    t = torch.tensor([[0, 1, 0], [2, 0, 5]])
    loss, _ = ref.linear_cross_entropy(x, W, t, ignore_index=0)
    torch.testing.assert_close(loss, F.cross_entropy(z.movedim(-1, 1), t, ignore_index=0))
    p = torch.softmax(torch.randn(2, 3, 6, dtype=torch.float64), -1)
    loss, _ = ref.linear_cross_entropy(x, W, p, label_smoothing=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(z.movedim(-1, 1), p.movedim(-1, 1), label_smoothing=0.1))

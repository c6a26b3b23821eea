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

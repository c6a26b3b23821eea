"""The attention oracle (pykernels/reference/attention.py) against torch's own scaled_dot_product_attention in
float64: it must be right before any kernel is compared with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pykernels.reference import attention as ref


def _qkv(B=2, H=4, Hk=4, L=7, S=9, E=16, Ev=None, dtype=torch.float64):
    q = torch.randn(B, H, L, E, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, S, E, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, S, Ev or E, dtype=dtype, requires_grad=True)
    return q, k, v


def _check(ours, theirs, inputs):
    xs1 = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    xs2 = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    o1, o2 = ours(*xs1), theirs(*xs2)
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(o1)
    g1 = torch.autograd.grad(o1, [x for x in xs1 if x.requires_grad], g)
    g2 = torch.autograd.grad(o2, [x for x in xs2 if x.requires_grad], g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("L,S", [(1, 1), (7, 9), (9, 7), (17, 17)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_plain_and_causal_top_left(L, S, is_causal):
    q, k, v = _qkv(L=L, S=S, Ev=24)
    _check(lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, is_causal=is_causal)[0],
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), [q, k, v])


@pytest.mark.parametrize("mask_shape", [(7, 9), (1, 1, 7, 9), (2, 1, 1, 9), (4, 7, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_broadcast_masks(mask_shape, kind):
    q, k, v = _qkv()
    if kind == "bool":
        m = torch.rand(mask_shape) < 0.7
    else:
        m = torch.randn(mask_shape, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v, m]
    _check(lambda q, k, v, m: ref.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)[0],
           lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3), inputs)


def test_fully_masked_rows_are_zero():
    q, k, v = _qkv()
    m = torch.rand(7, 9) < 0.5
    m[3] = False
    out, lse = ref.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert bool((out[..., 3, :] == 0).all()) and bool(torch.isneginf(lse[..., 3]).all())
    _check(lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, attn_mask=m)[0],
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m), [q, k, v])


def test_gqa():
    q, k, v = _qkv(H=8, Hk=2)
    _check(lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)[0],
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True), [q, k, v])
    with pytest.raises(ValueError, match="enable_gqa"):
        ref.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("L,S", [(5, 12), (12, 5)])
def test_bottom_right_causal_and_window_match_explicit_masks(L, S):
    q, k, v = _qkv(L=L, S=S)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    br = j <= i + S - L
    _check(lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, is_causal=True, alignment="bottom_right")[0],
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=br), [q, k, v])
    win = (j >= i + S - L - 3) & (j <= i + S - L + 1)
    _check(lambda q, k, v: ref.scaled_dot_product_attention(q, k, v, alignment="bottom_right", window=(3, 1))[0],
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=win), [q, k, v])


def test_softcap_and_lse():
    q, k, v = _qkv()
    cap = 2.5
    out, lse = ref.scaled_dot_product_attention(q, k, v, softcap=cap)
    s = cap * torch.tanh((q @ k.transpose(-2, -1)) / 4.0 / cap)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-10, atol=1e-10)


def test_dropout_mask_is_applied_with_rescaling():
    q, k, v = _qkv()
    keep = torch.rand(2, 4, 7, 9) > 0.25
    out, _ = ref.scaled_dot_product_attention(q, k, v, dropout_mask=keep, dropout_p=0.25)
    p = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1)
    torch.testing.assert_close(out, (p * keep / 0.75) @ v, rtol=1e-10, atol=1e-10)

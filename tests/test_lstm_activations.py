"""The CPU LSTM kernels' own sigmoid and tanh (csrc/cpu/lstm_pointwise.h: computed in the kernel rather than by
Sleef, for speed) against float64: within 2 ulp of the correctly rounded value over a dense sample of the whole
float range plus fresh random bit patterns, NaN in -> NaN out, the limits at +-inf.

They are read back from the cell op's workspace: with W_ih = 1 (I = 1), W_hh = 0 and no bias the gate
pre-activations are the inputs exactly, and ws holds the activated gates i, f, g, o."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pykernels.ops import lstm as ops

from conftest import skip_unless_required

TINY = torch.finfo(torch.float32).tiny


@pytest.fixture(autouse=True)
def _cpu_kernels():
    if "cpu" not in ops.CELL:
        skip_unless_required(ops.cpp_error)


def _sample(seed: int) -> torch.Tensor:
    dense = np.linspace(0, 0x7F800000, 1 << 20, dtype=np.int64).astype(np.int32).view(np.float32)
    rand = np.random.default_rng(seed).integers(0, 0x7F800000, 1 << 18, dtype=np.int64).astype(np.int32)
    v = torch.from_numpy(np.concatenate([dense, rand.view(np.float32)]))
    special = torch.tensor([0.0, float("inf"), float("nan"), 0.55, 88.72283935546875, 88.7228, 87.3365478515625,
                            9.01, 1e-30, 1.5e-45])
    return torch.cat([v, -v, special, -special])


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Distance in representable floats (across zero counted through it)."""
    def line(t):
        i = t.view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (line(got) - line(ref.float())).abs()


def _check(got: torch.Tensor, x: torch.Tensor, fn) -> None:
    ref = fn(x.double())
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan), "NaN must propagate, and only NaN"
    got, ref = got[~nan], ref[~nan]
    normal = ref.abs() >= TINY
    ulps = _ulps(got[normal], ref[normal])
    assert ulps.max().item() <= 2, f"{fn.__name__}: {ulps.max().item()} ulp at x = {x[~nan][normal][ulps.argmax()]}"
    # results below FLT_MIN: absolute error under FLT_MIN (torch's own sigmoid is no closer there)
    assert (got[~normal].double() - ref[~normal]).abs().max().item() <= TINY if (~normal).any() else True


def _cell_ws(gates: torch.Tensor, rows: int) -> torch.Tensor:
    """ws of the cell op for gate pre-activations `gates` (4, H) on every one of `rows` batch rows."""
    H = gates.shape[1]
    w_ih = gates.reshape(4 * H, 1).contiguous()
    out = torch.ops.pykernels.lstm_cell_fwd(torch.ones(rows, 1), torch.zeros(rows, H), torch.zeros(rows, H), w_ih,
                                            torch.zeros(4 * H, H), None, None)
    return out[-1]


def test_sigmoid_and_tanh_within_two_ulp_over_the_float_range():
    x = _sample(seed=int(torch.randint(0, 2**31, ())))
    # one value per row (B > 8: the GEMM path and the row-wise cell update), H = 1
    ws = torch.ops.pykernels.lstm_cell_fwd(x[:, None], torch.zeros(x.numel(), 1), torch.zeros(x.numel(), 1),
                                           torch.ones(4, 1), torch.zeros(4, 1), None, None)[-1]
    _check(ws[:, 0].contiguous(), x, torch.sigmoid)
    _check(ws[:, 2].contiguous(), x, torch.tanh)
    t = ws[:, 2]
    assert torch.equal(t[x == float("inf")], torch.ones_like(t[x == float("inf")]))
    assert torch.equal(t[x == -float("inf")], -torch.ones_like(t[x == -float("inf")]))
    s = ws[:, 0]
    assert torch.equal(s[x == float("inf")], torch.ones_like(s[x == float("inf")]))
    assert torch.equal(s[x == -float("inf")], torch.zeros_like(s[x == -float("inf")]))


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_small_and_large_batch_paths_share_the_activations(rows):
    """B <= 8 runs its own fused kernel; its vectors of units go through the same cell update (H not a multiple
    of the vector width, so the partial tail is covered too)."""
    g = torch.randn(4, 203) * 6
    g[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    ws = _cell_ws(g, rows)
    H = g.shape[1]
    for r in range(rows):
        _check(ws[r, :H].contiguous(), g[0], torch.sigmoid)
        _check(ws[r, H:2 * H].contiguous(), g[1], torch.sigmoid)
        _check(ws[r, 2 * H:3 * H].contiguous(), g[2], torch.tanh)
        _check(ws[r, 3 * H:4 * H].contiguous(), g[3], torch.sigmoid)

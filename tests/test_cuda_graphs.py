"""Every op's forward and backward captured in a CUDA graph and replayed (what torch.compile's "reduce-overhead" mode
and hand-written graph capture do): a host sync, a host-side read of device data or an allocation outside the
graph's pool fails the capture; a launch that bakes in a value of the first inputs gives stale results on replay.
Each replay runs on new values copied into the static inputs and must match an eager call on them. GPU tier only."""
from __future__ import annotations

import pytest
import torch

import pykernels
from conftest import require_backend

pytestmark = pytest.mark.gpu


def _graphed(step, static):
    """(replay, static outputs): ``step(*static)`` warmed up on a side stream (autotuning and first-call compiles
    happen there), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    return graph.replay, out


def _check_replays(step, make_inputs, n=2):
    static = make_inputs()
    replay, out = _graphed(step, static)
    for _ in range(n):
        fresh = make_inputs()
        for s, f in zip(static, fresh):
            s.copy_(f)
        replay()
        want = step(*fresh)
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def _with_grads(f):
    """f(*leaves) -> loss, as a step returning (loss, gradient of every floating input)."""
    def step(*args):
        leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
        loss = f(*leaves)
        grads = torch.autograd.grad(loss, [a for a in leaves if a.requires_grad])
        return (loss.detach(), *grads)
    return step


BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_in_a_cuda_graph(backend):
    require_backend(backend, "cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    f = _with_grads(lambda x: pykernels.functional.cross_entropy(x, t, label_smoothing=0.1, backend=backend))
    _check_replays(f, lambda: (torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16),))


@pytest.mark.parametrize("backend,fused", [("triton", None), ("triton", True), ("cuda", None)])
def test_linear_cross_entropy_in_a_cuda_graph(backend, fused):
    require_backend(backend, "cuda")
    t = torch.randint(0, 3000, (96,), device="cuda")
    f = _with_grads(lambda x, W: pykernels.functional.linear_cross_entropy(x, W, t, fused=fused, backend=backend))
    _check_replays(f, lambda: (torch.randn(96, 256, device="cuda", dtype=torch.bfloat16),
                               torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16) * 0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_in_a_cuda_graph(backend):
    require_backend(backend, "cuda")

    def loss(q, k, v):
        out = pykernels.functional.scaled_dot_product_attention(q, k, v, is_causal=True, window=(64, -1),
                                                               backend=backend)
        return out.float().square().mean()
    _check_replays(_with_grads(loss), lambda: tuple(torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.float16)
                                                    for _ in range(3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_in_a_cuda_graph(backend):
    require_backend(backend, "cuda")
    cell = pykernels.nn.LSTMCell(32, 48, device="cuda", backend=backend)
    layer = pykernels.nn.LSTM(32, 48, num_layers=2, device="cuda", backend=backend)

    def loss(x, h, c):
        hy, cy = cell(x[0], (h, c))
        out, _ = layer(x)
        return hy.sum() + cy.square().sum() + out.square().mean()
    _check_replays(_with_grads(loss), lambda: (torch.randn(7, 5, 32, device="cuda"), torch.randn(5, 48, device="cuda"),
                                               torch.randn(5, 48, device="cuda")))

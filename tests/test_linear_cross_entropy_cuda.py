"""The CUDA linear cross-entropy kernels on the CPU tier (no GPU): the ops exist with their schemas and fakes, the
binary holds tensor-core (HMMA), ldmatrix and cp.async code for every built arch without local memory, the dispatch
rules keep fp32 and automatic calls away from them, and the launch logic they share with Triton is right at their
geometry (128-row blocks, 128-column tiles, 256-column chunks), checked with a plain-torch model of the two kernels.
Their numerics run in the GPU tier: tests/test_linear_cross_entropy.py is parametrised over the "cuda" backend."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels import backends
from pykernels.ops import linear_cross_entropy as lce_ops
from pykernels.ops import linear_cross_entropy_launch as launch
from pykernels.testing import assert_error_rule

from test_build import kernel_sass, no_local_memory, require_cuda_build

flce = importlib.import_module("pykernels.functional.linear_cross_entropy")  # the package re-exports the function

KERNELS = ("lce_fwd_kernel", "lce_dlogits_kernel")


def test_ops_registered_with_fakes():
    require_cuda_build()
    assert "cuda" in lce_ops.KERNELS
    for name in ("linear_cross_entropy_partials", "linear_cross_entropy_dlogits"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{name}", "CUDA")
    schema = torch.ops.pykernels.linear_cross_entropy_dlogits.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["dl", "db_part"]
    # the fakes: shapes of the partials, nothing returned by dlogits
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, W = torch.empty(5, 8, dtype=torch.float16), torch.empty(11, 8, dtype=torch.float16)
        t = torch.empty(5, dtype=torch.long)
        outs = torch.ops.pykernels.linear_cross_entropy_partials(x, W, None, t, None, 0, 0.0, True, 3)
        assert [tuple(o.shape) for o in outs] == [(3, 5)] * 4 and all(o.dtype == torch.float32 for o in outs)
        outs = torch.ops.pykernels.linear_cross_entropy_partials(x, W, None, t, None, 0, 0.0, False, 3)
        assert tuple(outs[3].shape) == (0, 5)


def test_sass_uses_tensor_cores_ldmatrix_cp_async_without_local_memory():
    """Per built arch, both dtypes of both kernels: HMMA, LDSM (ldmatrix) and LDGSTS (cp.async), no LDL/STL."""
    for sm, found in kernel_sass(KERNELS).items():
        assert {k: len(v) for k, v in found.items()} == {k: 2 for k in KERNELS}, f"{sm}: instantiations {found.keys()}"
        for kern, fns in found.items():
            for f in fns:
                for op in ("HMMA", "LDSM", "LDGSTS"):
                    assert op in f, f"{sm} {kern}: no {op}"
                assert no_local_memory(f), f"{sm} {kern}: local memory in the kernel"


def test_dispatch_rules():
    assert flce.kernel_reason("cuda", torch.float16) in (None, flce.kernel_reason("cuda", torch.bfloat16))
    assert "dtype" in flce.kernel_reason("cuda", torch.float32)
    assert "not implemented" in flce.kernel_reason("cpu", torch.float16)
    # written without a GPU: automatic CUDA calls try the measured Triton kernels first
    for op in ("linear_cross_entropy", "linear_cross_entropy_vocab_parallel"):
        assert backends._chain(torch.device("cuda"), op) == ("triton", "cuda", "reference")
    x, W, t = torch.randn(3, 8), torch.randn(5, 8), torch.randint(0, 5, (3,))
    with pytest.raises(pykernels.BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        flce.linear_cross_entropy(x, W, t, backend="cuda")


# ---------------------------------------------------------------------------------------------------------
# The shared launch logic at the CUDA kernels' geometry, over a plain-torch model of the two kernels' contracts
# (csrc/linear_cross_entropy_args.h): fwd partials per (split of whole 128-column tiles, row); dlogits of a chunk
# with the bias gradient's column sums per block of 128 rows.

TILE = 128


def _logits(x, W, b, softcap):
    z = (x.float() @ W.float().t())
    if b is not None:
        z = z + b.float()
    return softcap * torch.tanh(z / softcap) if softcap else z


def _partials(x, W, b, target, cw, vocab_start, softcap, smooth, splits):
    N, V = x.shape[0], W.shape[0]
    tiles = -(-V // TILE)
    per = -(-tiles // splits)
    out = [torch.full((splits, N), float("-inf")), torch.zeros(splits, N), torch.zeros(splits, N),
           torch.zeros(splits if smooth else 0, N)]
    z = _logits(x, W, b, softcap)
    y = target - vocab_start
    for s in range(splits):
        c0, c1 = min(V, s * per * TILE), min(V, (s + 1) * per * TILE)
        if c0 >= c1:
            continue
        zs = z[:, c0:c1]
        m = zs.amax(1)
        out[0][s], out[1][s] = m, torch.exp(zs - m[:, None]).sum(1)
        hit = (y >= c0) & (y < c1)
        out[2][s] = torch.where(hit, z.gather(1, y.clamp(0, V - 1)[:, None])[:, 0], 0.0)
        if smooth:
            out[3][s] = (zs * (cw[c0:c1] if cw is not None else 1.0)).sum(1)
    return tuple(out)


def _dlogits(x, W, b, target, cw, m, log_s, cp, cy, cwr, vocab_start, softcap, smooth, col0, dl, db):
    nc = dl.shape[1]
    z = _logits(x, W[col0:col0 + nc], None if b is None else b[col0:col0 + nc], softcap)
    cols = torch.arange(col0, col0 + nc)
    d = cp[:, None] * torch.exp((z - m[:, None]) - log_s[:, None])
    d = d - torch.where(cols[None, :] == (target - vocab_start)[:, None], cy[:, None], 0.0)
    if smooth:
        d = d - cwr[:, None] * (cw[col0:col0 + nc][None, :] if cw is not None else 1.0)
    if softcap:
        d = d * (1 - (z / softcap) ** 2)
    dl.copy_(d.to(dl.dtype))
    if db is not None:
        r = dl.float()
        for i in range(0, x.shape[0], TILE):
            db[i // TILE] = r[i:i + TILE].sum(0)


MODEL = launch.Kernels(_partials, _dlogits, tile_cols=TILE, chunk_align=2 * TILE, db_rows=TILE)


@pytest.mark.parametrize("N,H,V,splits,chunk_cols", [(300, 24, 700, 3, 256), (129, 8, 257, 8, 512),
                                                     (5, 16, 1000, 4, 256)])
def test_launch_logic_at_cuda_geometry(N, H, V, splits, chunk_cols, monkeypatch):
    """Splits of whole tiles (some empty when splits > tiles / per), chunks of 256 columns with a partial last
    one, bias partials over 128-row blocks with a partial last block: loss and every gradient as torch's."""
    monkeypatch.setattr(launch, "CHUNK_BYTES", N * 4 * chunk_cols)
    torch.manual_seed(N)
    x = torch.randn(N, H, requires_grad=True)
    W = (torch.randn(V, H) * H ** -0.5).requires_grad_()
    b = torch.randn(V, requires_grad=True)
    w = torch.rand(V) + 0.5
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    monkeypatch.setitem(lce_ops.KERNELS, "model", (
        lambda *a: launch.forward(MODEL, *a, splits), lambda *a: launch.backward(MODEL, *a)))
    loss = lce_ops.linear_cross_entropy_op(x, W, b, t, w, -100, lce_ops.MEAN, 0.1, 1e-3, 4.0, "model")[0]
    loss.backward()
    xr, Wr, br = (a.detach().double().requires_grad_() for a in (x, W, b))
    z = 4.0 * torch.tanh(F.linear(xr, Wr, br) / 4.0)
    ref = pykernels.functional.cross_entropy(z, t, weight=w.double(), label_smoothing=0.1, z_loss=1e-3,
                                             backend="reference")
    ref.backward()
    assert_error_rule("loss", loss, ref, dtype=torch.float32)
    for name, a, r in (("d_input", x.grad, xr.grad), ("d_weight", W.grad, Wr.grad), ("d_bias", b.grad, br.grad)):
        assert_error_rule(name, a, r, dtype=torch.float32)

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

from test_build import exp2_between_branches, kernel_sass, no_local_memory, require_cuda_build

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


def test_plain_tiles_run_branch_free_loss_code():
    """A logit tile without bias, soft cap or smoothing, inside the shard (and, backward, inside the chunk and the
    rows), runs code without those options, chosen once per tile (csrc/cuda/specialize.cuh): the SASS has a
    straight stretch with the exp2 of a whole row half of the tile (16 logits, forward: each ends at the check for
    a row with nothing finite yet) or of the whole tile (64 logits a thread, backward). Tested per logit, the
    options had left 2 exp2 between branches in the backward."""
    for sm, found in kernel_sass(KERNELS).items():
        for kern, need in (("lce_fwd_kernel", 16), ("lce_dlogits_kernel", 64)):
            for f in found[kern]:
                run = exp2_between_branches(f)
                assert run >= need, f"{sm} {kern}: {run} exp2 between branches"


def test_dispatch_rules():
    assert flce.kernel_reason("cuda", torch.float16) in (None, flce.kernel_reason("cuda", torch.bfloat16))
    assert "dtype" in flce.kernel_reason("cuda", torch.float32)
    assert flce.kernel_reason("cpu", torch.float16) is None or "rebuild" in flce.kernel_reason("cpu", torch.float16)
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


# The paths no other CUDA test reaches (found by a desk review of csrc/cuda/linear_cross_entropy.cu): the 4-stage
# cp.async ring wrapping (KT = 9 > 4), several tiles per block (splits 1, 3) and an empty split (5), the scalar path
# at the same depth (H = 261), a partial last vocabulary tile, vocab_start != 0 (targets outside the shard), dlogits
# of a chunk at col0 = 256 with a partial column block, a skipped (all-zero coefficient) token block between live
# ones, odd and even dl row strides, and the bias partials of 3 token blocks, against float64 torch. On the CPU tier
# the same checks run on the plain-torch model of the kernels above (which keeps the test itself honest).
def _deep_inputs(dtype, H, N=300, V=1000, vocab_start=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 2 * H ** -0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype)
    cw = torch.rand(V, generator=g) + 0.5
    t = torch.randint(0, V + 100, (N,), generator=g)  # some past the shard's end
    t[::7] = -100
    t[::11] = 10  # global class 10 < vocab_start: in another shard
    return x, W, b, cw, t, vocab_start


def _deep_logits(x, W, b, softcap):
    z = x.double() @ W.double().t() + b.double()
    return softcap * torch.tanh(z / softcap)


def _deep_partials(PARTIALS, DEV, dtype, H, splits, softcap=20.0):
    x, W, b, cw, t, vs = _deep_inputs(dtype, H)
    V = W.shape[0]
    dev = lambda a: a.to(DEV)  # noqa: E731
    mp, sp, zyp, zsp = PARTIALS(dev(x), dev(W), dev(b), dev(t), dev(cw), vs, softcap, True, splits)
    mp, sp, zyp, zsp = (a.double().cpu() for a in (mp, sp, zyp, zsp))
    z = _deep_logits(x, W, b, softcap)
    tiles = -(-V // 128)
    per = -(-tiles // splits)
    y = t - vs
    for s in range(splits):
        c0, c1 = min(V, s * per * 128), min(V, (s + 1) * per * 128)
        if c0 >= c1:
            assert bool((mp[s] == float("-inf")).all()) and bool((sp[s] == 0).all()), f"empty split {s}"
            assert bool((zyp[s] == 0).all()) and bool((zsp[s] == 0).all())
            continue
        zs = z[:, c0:c1]
        lse = torch.logsumexp(zs, 1)
        err = (mp[s] + sp[s].log() - lse).abs().max().item()
        assert err < 2e-5 * max(1.0, lse.abs().max().item()), f"split {s} lse err {err}"
        hit = (y >= c0) & (y < c1)
        zy = torch.where(hit, z.gather(1, y.clamp(0, V - 1)[:, None])[:, 0], 0.0)
        assert (zyp[s] - zy).abs().max().item() < 1e-4, f"split {s} z_y"
        zsr = (zs * cw[c0:c1].double()).sum(1)
        assert (zsp[s] - zsr).abs().max().item() < 1e-5 * (c1 - c0) * softcap, f"split {s} z_sum"


def _deep_dlogits(DLOGITS, DEV, dtype, H, ldl_pad, softcap=20.0):
    x, W, b, cw, t, vs = _deep_inputs(dtype, H, seed=1)
    N = x.shape[0]
    z = _deep_logits(x, W, b, softcap)
    m = z.amax(1)
    ls = torch.logsumexp(z - m[:, None], 1)
    g = torch.Generator().manual_seed(2)
    cp, cy, cwr = (torch.rand(N, generator=g) for _ in range(3))
    for c in (cp, cy, cwr):
        c[128:256] = 0.0  # token block 1: skipped, exact zeros
    col0, nc = 256, 300
    buf = torch.full((N, nc + ldl_pad), float("nan"), dtype=dtype, device=DEV)
    dl = buf[:, :nc]
    db = torch.full((3, nc), float("nan"), device=DEV)
    d = lambda a: a.to(DEV)  # noqa: E731
    DLOGITS(d(x), d(W), d(b), d(t), d(cw), d(m.float()), d(ls.float()), d(cp), d(cy), d(cwr), vs, softcap, True,
            col0, dl, db)
    cols = torch.arange(col0, col0 + nc)
    zc = z[:, col0:col0 + nc]
    r = cp.double()[:, None] * torch.exp(zc - m[:, None] - ls[:, None])
    r = r - torch.where(cols[None, :] == (t - vs)[:, None], cy.double()[:, None], 0.0)
    r = r - cwr.double()[:, None] * cw[col0:col0 + nc].double()[None, :]
    r = r * (1 - (zc / softcap) ** 2)
    out = dl.double().cpu()
    assert not torch.isnan(out).any(), "dl element not written"
    assert bool((out[128:256] == 0).all()), "skipped block must be exact zeros"
    tol = 2 * torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
    err = (out - r).abs().max().item()
    assert err <= tol, f"dl err {err} > {tol}"
    dbr = torch.stack([out[i:i + 128].sum(0) for i in range(0, N, 128)])
    err = (db.double().cpu() - dbr).abs().max().item()
    assert err < 1e-4, f"db err {err}"



@pytest.mark.parametrize("ops", ["model", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_ops_on_deep_ring_multi_tile_and_skip_paths(ops):
    if ops == "cuda":
        require_cuda_build()
        if not torch.cuda.is_available():
            pytest.skip("needs a GPU")
        fns, dev = (torch.ops.pykernels.linear_cross_entropy_partials,
                    torch.ops.pykernels.linear_cross_entropy_dlogits), "cuda"
    else:
        fns, dev = (_partials, _dlogits), "cpu"
    for dtype in (torch.float16, torch.bfloat16):
        for H in (264, 261):  # 264: cp.async path (16-byte rows); 261: scalar loads; both KT = 9
            for splits in (1, 3, 5):  # 8 tiles: 8 / 3 per block; 5 splits of 2 tiles leave split 4 empty
                _deep_partials(fns[0], dev, dtype, H, splits)
            for pad in (0, 1):  # even / odd dl row stride (32-bit pair stores / scalar stores)
                _deep_dlogits(fns[1], dev, dtype, H, pad)

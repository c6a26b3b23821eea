"""Vocab-parallel linear cross-entropy: 2 processes, gloo on CPU (file store, no network), against the
single-process result. Each rank holds a contiguous block of the vocabulary's rows (odd V: uneven shards given by
vocab_start / vocab_size), and must get the same loss and lse, the full d_input and its own rows of d_weight /
d_bias. The reference kernels in float64 always; the Triton kernels (fp32) when the run is interpreted."""
from __future__ import annotations

import functools
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.multiprocessing.spawn import ProcessException

CASES = [  # bias, weighted, eps, zl, softcap, reduction, uneven
    (False, False, 0.0, 0.0, 0.0, "mean", False),
    (True, True, 0.1, 1e-3, 0.0, "none", True),
    (True, False, 0.2, 0.0, 4.0, "sum", True),
    (False, True, 0.0, 1e-2, 2.5, "mean", False),
]


def _bad_calls(rank, backends, linear_cross_entropy) -> None:
    """Arguments the ranks disagree on, and operands the one-process call rejects: the same clear error on every
    rank, before any kernel (shards overlapping or leaving a gap, or ranks passing different vocab_size, gave a
    silently wrong loss; a different N or H aborted the process inside gloo; a float32 bias on float64 input and an
    int64 class weight were not checked)."""
    from pykernels.errors import ArgumentTypeError, ArgumentValueError
    g = torch.Generator().manual_seed(3)
    N, H, V = 6, 8, 20
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    half = W[rank * 10:(rank + 1) * 10]
    gap = (0, 9) if rank == 0 else (10, 20)
    bad = [  # (expected, match, input, linear_weight, target, keywords)
        (ArgumentValueError, r"vocab_start: .*\[0, 10\).*\[0, 10\) overlap", x, W[:10], t.clamp(max=9),
         dict(vocab_start=0, vocab_size=10)),
        (ArgumentValueError, r"vocab_start: .* classes \[9, 10\) are on no rank", x, W[gap[0]:gap[1]], t,
         dict(vocab_start=gap[0], vocab_size=V)),
        # 11 + 9 rows with the default vocab_start (rank x rows): [0, 11) and [9, 18)
        (ArgumentValueError, r"vocab_start: .*\[0, 11\).*\[9, 18\) overlap", x, W[:11] if rank == 0 else W[11:], t,
         dict(vocab_size=V)),
        (ArgumentValueError, r"vocab_size: the ranks disagree on vocab_size: \[20, 21\]", x, half, t,
         dict(vocab_size=V + rank)),
        (ArgumentValueError, r"input: the ranks disagree on input's rows N: \[6, 5\]", x[:N - rank], half,
         t[:N - rank], {}),
        (ArgumentValueError, r"input: the ranks disagree on input's in_features H: \[8, 7\]", x[:, :H - rank],
         half[:, :H - rank], t, {}),
    ]
    for backend in backends:
        bad += [(ArgumentTypeError, "linear_bias has dtype torch.float32", x, half, t,
                 dict(linear_bias=torch.zeros(10, dtype=torch.float32), backend=backend)),
                (ArgumentTypeError, "weight must be a floating-point", x, half, t,
                 dict(weight=torch.ones(V, dtype=torch.int64), backend=backend)),
                (ArgumentTypeError, "weight has dtype torch.float32 but the logits are torch.float64", x, half, t,
                 dict(weight=torch.ones(V, dtype=torch.float32), backend=backend)),
                (ArgumentTypeError, "z_loss must be a float", x, half, t, dict(z_loss="a", backend=backend))]
    # one rank refusing its own arguments (here a bias of the wrong length): it raises its error, the others one
    # naming it, after the ranks' check (before it, the others waited in a collective until gloo's reset)
    bias = torch.zeros(11 if rank == 1 else 10, dtype=torch.float64)
    bad.append((ArgumentValueError, r"linear_bias must have shape \(10,\)" if rank == 1 else r"rank\(s\) \[1\] refused",
                x, half, t, dict(linear_bias=bias)))
    # a malformed argument is refused the same way (vocab_start=[10] raised int()'s TypeError before the gather)
    bad.append((ArgumentTypeError if rank == 1 else ArgumentValueError,
                "vocab_start must be an int" if rank == 1 else r"rank\(s\) \[1\] refused", x, half, t,
                dict(vocab_start=[10] if rank == 1 else 0, vocab_size=V)))
    for exc, match, xx, WW, tt, kw in bad:
        kw.setdefault("backend", "reference")
        with pytest.raises(exc, match=match):
            linear_cross_entropy(xx, WW, tt, group=dist.group.WORLD, **kw)


def _edge_cases(rank, backends, linear_cross_entropy) -> None:
    """Shards without a finite logit: an empty shard (rank 1 holds [V, V)) and a shard whose classes are all at
    -inf, next to logits far below 0 (-1000 in fp64, -120 in fp32: exp underflows). Their m = 0 joined the MAX and
    made the loss -inf with NaN gradients. Then the module: nn.LinearCrossEntropyLoss(group=) with a class weight of
    the whole vocabulary and uneven shards (its constructor wanted a (num_classes,) weight, the shard's), and a
    double backward, which the collectives cannot carry: a clear error, not silently wrong second derivatives."""
    import pykernels
    g = torch.Generator().manual_seed(21)
    N, H, V = 5, 6, 9
    for backend in backends:
        dtype = torch.float64 if backend == "reference" else torch.float32
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        low = -1000.0 if dtype == torch.float64 else -120.0
        x = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
        W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        t = torch.randint(0, V, (N,), generator=g)
        for case in ("empty", "minus_inf"):
            b = torch.full((V,), low, dtype=dtype)
            if case == "empty":
                lo, hi = (0, V) if rank == 0 else (V, V)
            else:
                lo, hi = (0, 5) if rank == 0 else (5, V)
                b[5:] = float("-inf")
                t = t.clamp(max=4)  # a target at -inf would make the loss inf
            res = []
            for W_, b_, kw in ((W, b, dict(backend="reference")),
                               (W[lo:hi], b[lo:hi], dict(group=dist.group.WORLD, vocab_start=lo, vocab_size=V,
                                                         backend=backend))):
                xx, WW = x.clone().requires_grad_(), W_.clone().requires_grad_()
                loss = linear_cross_entropy(xx, WW, t, linear_bias=b_, reduction="sum", **kw)
                loss.backward()
                res.append((loss.detach(), xx.grad, WW.grad))
            (lf, xf, Wf), (lp, xp, Wp) = res
            for name, p, f in (("loss", lp, lf), ("d_input", xp, xf), ("d_weight", Wp, Wf[lo:hi])):
                assert bool(p.isfinite().all()) and bool(f.isfinite().all()), f"{backend} {case}: {name} {p}"
                if not p.numel():  # the empty shard's d_weight
                    continue
                err = (p.double() - f.double()).abs().max().item()
                assert err <= tol * max(1.0, f.double().abs().max().item()), f"{backend} {case}: {name} {err:.3e}"
    # every class at -inf on every shard (rows all ignored): lse is -inf as torch.logsumexp gives, not NaN from
    # exp(-inf - -inf), and the sum over ignored rows is 0
    x3, W3, b3 = torch.randn(3, 4), torch.randn(6, 4), torch.full((6,), float("-inf"))
    lo3, hi3 = rank * 3, rank * 3 + 3
    for backend in backends:
        loss, lse = linear_cross_entropy(x3, W3[lo3:hi3], torch.full((3,), -100), linear_bias=b3[lo3:hi3],
                                         reduction="sum", return_lse=True, group=dist.group.WORLD, backend=backend)
        assert torch.equal(lse.double(), torch.full((3,), float("-inf"), dtype=torch.float64)), (backend, lse)
        assert loss.item() == 0.0, (backend, loss)
    # the module: a (vocab_size,) class weight, uneven shards [0, 4) and [4, 9)
    lo, hi = (0, 4) if rank == 0 else (4, V)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    t = torch.randint(0, V, (N,), generator=g)
    mod = pykernels.nn.LinearCrossEntropyLoss(H, hi - lo, weight=w, label_smoothing=0.1, group=dist.group.WORLD,
                                              vocab_start=lo, vocab_size=V, dtype=torch.float64,
                                              backend="reference")
    with torch.no_grad():
        mod.linear.weight.copy_(W[lo:hi])
    assert mod.weight.shape == (V,) and f"vocab_start={lo}" in repr(mod)
    want = F.cross_entropy(F.linear(x, W), t, weight=w, label_smoothing=0.1)
    assert abs(mod(x, t).item() - want.item()) <= 1e-10 * abs(want.item())
    with pytest.raises(ValueError, match="vocab_start and vocab_size .* need group="):
        pykernels.nn.LinearCrossEntropyLoss(H, V, vocab_size=V)
    # a double backward raises on every rank, naming the way out
    xx = x.clone().requires_grad_()
    loss = linear_cross_entropy(xx, W[lo:hi], t, group=dist.group.WORLD, vocab_start=lo, vocab_size=V,
                                backend="reference")
    with pytest.raises(RuntimeError, match=r"vocab-parallel.*create_graph=True.*without group="):
        torch.autograd.grad(loss, xx, create_graph=True)


def _fresh_returns(gm, example_inputs) -> None:
    """Runs Dynamo's graph; at the autograd.Function, runs its traced forward node by node: no tensor it returns may
    be another node's value. torch 2.11's Dynamo returns every forward intermediate too, and a returned tensor that
    is one of them (the loss's no-op .to) lost its gradient: d_input and d_weight exactly 0. torch 2.14 leaves such
    aliases out, so there only this check sees the regression."""
    hop = torch.ops.higher_order.autograd_function_apply

    class Outer(torch.fx.Interpreter):
        def run_node(self, n):
            if n.target is hop:
                fwd, values = getattr(self.module, n.args[0].target), {}

                class Inner(torch.fx.Interpreter):
                    def run_node(self, m):
                        values[m] = super().run_node(m)
                        return values[m]
                Inner(fwd).run(*self.fetch_args_kwargs_from_env(n)[0][2:])  # after (fwd_body, bwd_body)
                for r in next(m for m in fwd.graph.nodes if m.op == "output").args[0][0][:2]:  # (loss, lse)
                    also = [m.name for m, v in values.items() if m is not r and m.op != "output" and v is values[r]]
                    assert not also, f"the traced forward returns {r.name}, which is also {also}"
            return super().run_node(n)
    with torch.no_grad():
        Outer(gm).run(*example_inputs)


def _compiled(rank, backend, linear_cross_entropy) -> None:
    """torch.compile(fullgraph=True) of a vocab-parallel call (the rank check's all_gather, the forward's and the
    backward's all_reduces traced with it): loss and gradients as eager's, with inductor and with Dynamo's graph
    run as it is; that graph's forward returns fresh tensors (_fresh_returns)."""
    g = torch.Generator().manual_seed(11)
    x, W = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    t = torch.randint(0, 20, (6,), generator=g)

    def step(x, Wr):
        return linear_cross_entropy(x, Wr, t, group=dist.group.WORLD, backend=backend)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm
    res = []
    for fn in (step, torch.compile(step, fullgraph=True), torch.compile(step, fullgraph=True, backend=capture)):
        xx, WW = x.clone().requires_grad_(), W[rank * 10:(rank + 1) * 10].clone().requires_grad_()
        loss = fn(xx, WW)
        res.append((loss.detach(), *torch.autograd.grad(loss, (xx, WW))))
    for got in res[1:]:
        for a, b in zip(got, res[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _fresh_returns(*graphs[0])


def _collectives(rank, linear_cross_entropy) -> None:
    """The collectives of one forward + backward are the ones pykernels.distributed's docstring states."""
    import pykernels.distributed as pd
    calls, real = [], (dist.all_gather, dist.all_reduce)

    def gather(parts, t, *a, **k):
        calls.append(("all_gather", t.numel(), t.dtype))
        return real[0](parts, t, *a, **k)

    def reduce(t, *a, **k):
        calls.append(("all_reduce", t.numel(), k.get("op"), t.dtype))
        return real[1](t, *a, **k)

    g = torch.Generator().manual_seed(11)
    N, H = 7, 5
    x = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(18, H, generator=g, dtype=torch.float64)
    dist.all_gather, dist.all_reduce = gather, reduce
    try:
        linear_cross_entropy(x, W[rank * 9:(rank + 1) * 9], torch.randint(0, 18, (N,), generator=g),
                             group=dist.group.WORLD, backend="reference").backward()
    finally:
        dist.all_gather, dist.all_reduce = real
    f64 = torch.float64
    assert calls == [("all_gather", 6, torch.int64), ("all_reduce", N, dist.ReduceOp.MAX, f64),
                     ("all_reduce", 3 * N, dist.ReduceOp.SUM, f64),
                     ("all_reduce", N * H, dist.ReduceOp.SUM, f64)], calls
    # 16-bit input: the statistics and the partial d_input travel in fp32 (summed, then rounded once)
    calls.clear()
    xb = x.detach().bfloat16().requires_grad_()
    dist.all_gather, dist.all_reduce = gather, reduce
    try:
        linear_cross_entropy(xb, W[rank * 9:(rank + 1) * 9].bfloat16(), torch.randint(0, 18, (N,), generator=g),
                             group=dist.group.WORLD, backend="reference").backward()
    finally:
        dist.all_gather, dist.all_reduce = real
    assert [c[3] for c in calls[1:]] == [torch.float32] * 3, calls
    doc = " ".join(pd.__doc__.split())
    assert ("Collectives: the check's all_gather (6 int64 per rank), 2 all_reduces in the forward (N floats, op MAX; "
            "then 3N floats, op SUM), 1 in the backward (N x H floats)") in doc


def _worker_process(body):
    """The spawned side of _spawn: joins the gloo group, runs body(rank, world, backends), waits for every rank, and
    leaves a done<rank> file, or the traceback in rank<rank>.txt."""
    @functools.wraps(body)  # spawn pickles the worker by its module-level name
    def run(rank: int, world: int, store: str, err_dir: str, backends) -> None:
        try:
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
            body(rank, world, backends)
            dist.barrier()  # every rank is done communicating: no destroy_process_group, see below
        except BaseException:
            with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as fh:
                fh.write(traceback.format_exc())
            raise
        open(os.path.join(err_dir, f"done{rank}"), "w").close()
        # Skip gloo's and the interpreter's teardown: once in CI (2026-12-04) a worker aborted after its checks with
        # "terminate called without an active exception" (a native thread still joinable when it was destroyed)
        os._exit(0)
    return run


@_worker_process
def _worker(rank: int, world: int, backends) -> None:
    from pykernels.functional import linear_cross_entropy
    for backend in backends:
        dtype = torch.float64 if backend == "reference" else torch.float32
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        for i, (bias, weighted, eps, zl, sc, red, uneven) in enumerate(CASES):
            g = torch.Generator().manual_seed(1234 + i)  # the same problem on every rank
            N, H, V = 11, 20, 37 if uneven else 36
            x = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
            W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4).to(dtype)
            b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
            w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
            t = torch.randint(0, V, (N,), generator=g)
            t[::4] = -100
            up = torch.rand(N if red == "none" else (), generator=g, dtype=torch.float64) + 0.5
            lo, hi = (0, 19) if rank == 0 else (19, V)
            if not uneven:
                lo, hi = rank * V // world, (rank + 1) * V // world

            def run(x, W, b, **kw):
                x, W = x.clone().requires_grad_(), W.clone().requires_grad_()
                b = None if b is None else b.clone().requires_grad_()
                loss, lse = linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=red,
                                                 label_smoothing=eps, z_loss=zl, softcap=sc, return_lse=True,
                                                 **kw)
                loss.backward(up.to(loss.dtype))
                return loss.detach(), lse, x.grad, W.grad, None if b is None else b.grad

            full = run(x, W, b, backend="reference")
            kw = dict(group=dist.group.WORLD, backend=backend)
            if uneven:
                kw.update(vocab_start=lo, vocab_size=V)
            part = run(x, W[lo:hi], None if b is None else b[lo:hi], **kw)
            names = ("loss", "lse", "d_input", "d_weight", "d_bias")
            for name, p, f in zip(names, part, full):
                if f is None:
                    assert p is None, name
                    continue
                if name in ("d_weight", "d_bias"):
                    f = f[lo:hi]
                err = (p.double() - f.double()).abs().max().item()
                assert err <= tol * max(1.0, f.double().abs().max().item()), \
                    f"{backend} case {i} rank {rank}: {name} error {err:.3e}"
        # a NaN / inf weight of a class no target uses (in rank 1's shard), no smoothing: finite gradients equal
        # to the one-process reference's (eps W / C with eps = 0 made every gradient NaN)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(6, 12, generator=g, dtype=torch.float64).to(dtype)
        W = (torch.randn(20, 12, generator=g, dtype=torch.float64) * 0.4).to(dtype)
        t = torch.tensor([0, 3, 11, 5, 17, 8])
        lo, hi = rank * 10, (rank + 1) * 10
        for bad in (float("nan"), float("inf")):
            w = (torch.rand(20, generator=g, dtype=torch.float64) + 0.5).to(dtype)  # (torch: the logits')
            w[14] = bad
            res = []
            for W_, kw in ((W, dict(backend="reference")),
                           (W[lo:hi], dict(group=dist.group.WORLD, backend=backend))):
                xx, WW = x.clone().requires_grad_(), W_.clone().requires_grad_()
                loss = linear_cross_entropy(xx, WW, t, weight=w, reduction="sum", **kw)
                loss.backward()
                res.append((loss.detach(), xx.grad, WW.grad))
            (lf, xf, Wf), (lp, xp, Wp) = res
            for name, p, f in (("loss", lp, lf), ("d_input", xp, xf), ("d_weight", Wp, Wf[lo:hi])):
                assert bool(p.isfinite().all()), f"{backend} weight {bad} rank {rank}: {name} not finite"
                err = (p.double() - f.double()).abs().max().item()
                assert err <= tol * max(1.0, f.double().abs().max().item()), \
                    f"{backend} weight {bad} rank {rank}: {name} error {err:.3e}"
    # under autocast the loss is float32 cast once from the accumulator, as the one-process call's (it was the
    # bf16-rounded value: 1e-2 off at a loss of 9.5)
    g = torch.Generator().manual_seed(99)
    x, W = torch.randn(16, 24, generator=g), torch.randn(40, 24, generator=g)
    t = torch.randint(0, 40, (16,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = linear_cross_entropy(x, W, t, backend="reference")
        part = linear_cross_entropy(x, W[rank * 20:(rank + 1) * 20], t, group=dist.group.WORLD,
                                    backend="reference")
    assert part.dtype == one.dtype == torch.float32
    assert abs(part.item() - one.item()) <= 1e-5 * abs(one.item()), (part.item(), one.item())
    # an empty batch: torch's NaN mean and 0 sum on every backend (the Triton launcher divided by 0 rows)
    x = torch.randn(0, 24, requires_grad=True)
    for backend in backends:
        for red, want in (("mean", float("nan")), ("sum", 0.0)):
            loss = linear_cross_entropy(x, W[rank * 20:(rank + 1) * 20], t[:0], reduction=red,
                                        group=dist.group.WORLD, backend=backend)
            loss.backward()
            assert (loss.isnan().item() if red == "mean" else loss.item() == 0.0), (backend, red, loss)
    _bad_calls(rank, backends, linear_cross_entropy)
    _edge_cases(rank, backends, linear_cross_entropy)
    _collectives(rank, linear_cross_entropy)
    _compiled(rank, "cpu" if "cpu" in backends else "reference", linear_cross_entropy)


@_worker_process
def _subgroup_worker(rank: int, world: int, backends) -> None:
    """World 3, the vocabulary sharded over the subgroup of global ranks 1 and 2 (group ranks 0 and 1): the
    default vocab_start is the group rank's, and every collective stays in the group (global rank 0 takes no part
    after creating it)."""
    sub = dist.new_group([1, 2])  # every rank creates it
    if rank > 0:
        from pykernels.functional import linear_cross_entropy
        g = torch.Generator().manual_seed(5)
        x = torch.randn(7, 10, generator=g, dtype=torch.float64)
        W = torch.randn(16, 10, generator=g, dtype=torch.float64)
        t = torch.randint(0, 16, (7,), generator=g)
        lo, hi = (rank - 1) * 8, rank * 8
        for backend in backends:
            dt = torch.float64 if backend == "reference" else torch.float32
            res = []
            for W_, kw in ((W, dict(backend="reference")), (W[lo:hi], dict(group=sub, backend=backend))):
                xx, WW = x.to(dt).clone().requires_grad_(), W_.to(dt).clone().requires_grad_()
                loss = linear_cross_entropy(xx, WW, t, label_smoothing=0.1, **kw)
                loss.backward()
                res.append((loss.detach(), xx.grad, WW.grad))
            (lf, xf, Wf), (lp, xp, Wp) = res
            tol = 1e-10 if dt == torch.float64 else 2e-5
            for name, p, f in (("loss", lp, lf), ("d_input", xp, xf), ("d_weight", Wp, Wf[lo:hi])):
                err = (p.double() - f.double()).abs().max().item()
                assert err <= tol * max(1.0, f.double().abs().max().item()), f"{backend} {name} {err:.3e}"


def _spawn(worker, world: int, tmp_path, backends) -> None:
    ctx = mp.start_processes(worker, args=(world, str(tmp_path / "store"), str(tmp_path), backends), nprocs=world,
                             join=False, start_method="spawn")
    try:
        import time
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("vocab-parallel workers did not finish in 240 s")
    except ProcessException as e:  # a worker raised (its traceback is in rank<i>.txt) or died
        errs = [p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))]
        done = sorted(p.name for p in tmp_path.glob("done*"))
        pytest.fail(f"worker failed ({e}; finished: {done}):\n" + "\n".join(errs))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    assert sorted(p.name for p in tmp_path.glob("done*")) == [f"done{r}" for r in range(world)]


def _backends():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import pykernels
    backends = ["reference"] + (["cpu"] if pykernels.available_backends("cpu")["cpu"] is None else [])
    if os.environ.get("TRITON_INTERPRET") == "1":
        if pykernels.available_backends("cpu")["triton"] is None:
            backends.append("triton")
    return backends


def test_vocab_parallel_on_a_subgroup(tmp_path):
    _spawn(_subgroup_worker, 3, tmp_path, [b for b in _backends() if b != "triton"])


def test_vocab_parallel_matches_single_process(tmp_path):
    _spawn(_worker, 2, tmp_path, _backends())


def test_group_without_process_group_raises():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    from pykernels.functional import linear_cross_entropy
    with pytest.raises(RuntimeError, match="process group"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 5, (3,)), group=True)


def test_device_side_shard_check_agrees_with_the_host_one():
    """On a GPU the ranks' agreement is a device-side assert on pykernels.distributed._agree (no host read); on
    CPU _disagreement's messages. Both must accept and refuse the same gathered (vocab_start, V_r, vocab_size, N,
    H) rows: tilings in any rank order, empty shards, overlaps, gaps, shards outside the vocabulary, and ranks
    disagreeing on vocab_size, N or H, a rank that refused its own arguments."""
    import itertools
    from pykernels.distributed import _agree, _disagreement
    layouts = [[(0, 10), (10, 10)], [(10, 10), (0, 10)], [(0, 20), (20, 0)], [(0, 0), (0, 20)],
               [(0, 7), (7, 6), (13, 7)], [(13, 7), (0, 7), (7, 6)], [(0, 10), (0, 10)], [(0, 9), (10, 10)],
               [(0, 11), (9, 9)], [(0, 11), (9, 11)], [(-1, 11), (10, 10)], [(0, 10), (10, 11)], [(5, 0), (0, 20)],
               [(0, 10), (10, 10), (20, 0)], [(0, 10), (10, 5), (10, 5)], [(0, 20), (5, 0), (25, 0)],
               [(0, 11), (10, 9)], [(0, 11), (10, 10)], [(10, 10), (0, 11)]]  # (overlaps of one class)
    seen = {True: 0, False: 0}
    for shards, (vocab, ns, hs) in itertools.product(layouts, [(20, 6, 8), ((20, 21), 6, 8), (20, (6, 5), 8),
                                                              (20, 6, (8, 7))]):
        per = lambda v, r: v[min(r, len(v) - 1)] if isinstance(v, tuple) else v  # noqa: E731
        for refused in (None, 0, 1):  # no rank, or rank 0 or 1, refused its own arguments
            rows = [[s, n, per(vocab, r), per(ns, r), per(hs, r), int(r == refused)]
                    for r, (s, n) in enumerate(shards)]
            ok = bool(_agree(torch.tensor(rows)))
            assert ok == (_disagreement(rows) is None), rows
            seen[ok] += 1
    assert seen[True] >= 6 and seen[False] >= 120


@_worker_process
def _options_worker(rank: int, world: int, backends) -> None:
    """Calls the other tests never make, each against torch in float64 (the same problem on every rank, uneven
    shards [0, 9) and [9, 20)): a frozen LM head (input and bias require grad, linear_weight does not: the
    backward's flags were read from the wrong slots and d_input / d_bias came back None); an ignore_index other
    than -100, both a valid class id held by rank 0 and -1 (every other test used the default); uint8 targets
    (widened before the kernels); targets on every shard boundary (lo - 1, lo, hi - 1, hi: an off-by-one in a
    kernel's shard range takes the neighbour's class or drops its own); an out-of-range target raising on every
    rank."""
    from pykernels.functional import linear_cross_entropy
    g = torch.Generator().manual_seed(31)
    N, H, V = 12, 10, 20
    lo, hi = (0, 9) if rank == 0 else (9, V)
    x64 = torch.randn(N, H, generator=g, dtype=torch.float64)
    W64 = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    b64 = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[:6] = torch.tensor([0, 8, 9, 10, 19, 5])  # both ends of both shards, and class 5 (an ignore_index below)
    kw = dict(group=dist.group.WORLD, vocab_start=lo, vocab_size=V)
    for backend in backends:
        dtype = torch.float64 if backend == "reference" else torch.float32
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        x, W, b = (u.to(dtype) for u in (x64, W64, b64))

        def close(name, p, f):
            assert p is not None, f"{backend} rank {rank}: {name} is None"
            err = (p.double() - f.double()).abs().max().item()
            assert err <= tol * max(1.0, f.double().abs().max().item()), f"{backend} rank {rank}: {name} {err:.3e}"

        for ii, tt, eps in ((-100, t, 0.0), (5, t, 0.1), (-1, torch.where(t == 8, -1, t), 0.1)):
            for grads in ("x,b", "W"):  # the frozen head, then only the head trained
                xx = x.clone().requires_grad_("x" in grads)
                WW = W[lo:hi].clone().requires_grad_("W" in grads)
                bb = b[lo:hi].clone().requires_grad_("b" in grads)
                for targets in ((tt, tt.to(torch.uint8)) if ii != -1 else (tt,)):
                    loss = linear_cross_entropy(xx, WW, targets, linear_bias=bb, ignore_index=ii,
                                                label_smoothing=eps, backend=backend, **kw)
                    loss.backward()
                    xr, Wr, br = (u.clone().requires_grad_() for u in (x64, W64, b64))
                    want = F.cross_entropy(F.linear(xr, Wr, br), tt, ignore_index=ii, label_smoothing=eps)
                    want.backward()
                    what = f"ignore_index={ii} {targets.dtype} grads={grads}"
                    close(f"{what} loss", loss.detach(), want.detach())
                    for name, leaf, ref in (("d_input", xx, xr.grad), ("d_weight", WW, Wr.grad[lo:hi]),
                                            ("d_bias", bb, br.grad[lo:hi])):
                        if leaf.requires_grad:
                            close(f"{what} {name}", leaf.grad, ref)
                            leaf.grad = None
        # a target past the vocabulary: every rank raises torch's IndexError, before any kernel
        for bad in (V, V + 3):
            with pytest.raises(IndexError, match=f"target {bad} is out of bounds for {V} classes"):
                linear_cross_entropy(x, W[lo:hi], torch.where(t == 19, bad, t), backend=backend, **kw)


def test_vocab_parallel_options_the_others_leave_out(tmp_path):
    _spawn(_options_worker, 2, tmp_path, _backends())

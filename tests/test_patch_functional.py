"""pykernels.patch_functional: torch.nn.functional's cross_entropy, scaled_dot_product_attention and
linear_cross_entropy rebound to pykernels', for code that calls them (Hugging Face models, torch's own modules).
Calls through torch's names must run our kernels (``last_dispatch`` names them), give torch's results (float64
reference, 2x-PyTorch-error rule at the tested dtype) and gradients, keep torch's signature, leave tensors we do not
take (subclasses, nested) to torch, never call back into themselves from the paths that hand a call to torch's
kernel, trace whole under torch.compile, and come undone."""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels import _native, backends
from pykernels.testing import assert_error_rule

from conftest import require_backend

_patch = importlib.import_module("pykernels.patch")  # (pykernels.patch is the function)

HAS_LCE = _native.linear_cross_entropy is not None
CPU = [pytest.param("reference", "cpu", id="reference"), pytest.param("cpu", "cpu", id="cpu"),
       pytest.param("triton", "cpu", id="triton-interp")]
GPU = [pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
       pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu)]


def _dtype(backend, device, op):
    if device == "cuda":
        return torch.bfloat16 if op == "attention" else torch.float32
    return torch.float32 if backend == "triton" else torch.float64


def _cases(device):
    """(op, callable through torch.nn.functional's name, tensors); the callables look F's names up when called."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    t = torch.randint(0, 37, (13,), generator=g)
    t[[2, 7]] = -100
    w = torch.rand(37, generator=g, dtype=torch.float64) + 0.5
    yield "cross_entropy", lambda x: F.cross_entropy(x, t.to(device), w.to(device, x.dtype), label_smoothing=0.1), \
        [r(13, 37)]
    probs = torch.softmax(r(5, 11, 3), 1)
    yield "cross_entropy", lambda x: torch.nn.CrossEntropyLoss(reduction="sum")(x, probs.to(device, x.dtype)), \
        [r(5, 11, 3)]
    mask = torch.rand(2, 1, 17, 19, generator=g) > 0.3
    yield "attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask.to(device)), \
        [r(2, 4, 17, 16), r(2, 4, 19, 16), r(2, 4, 19, 16)]
    yield "attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), \
        [r(1, 4, 23, 32), r(1, 2, 23, 32), r(1, 2, 23, 32)]
    if HAS_LCE:
        tt = torch.randint(0, 41, (9,), generator=g)
        yield "linear_cross_entropy", lambda x, W, b: F.linear_cross_entropy(x, W, tt.to(device), linear_bias=b), \
            [r(9, 24), r(41, 24, scale=0.2), r(41)]


def _run(fn, tensors, dtype, device):
    leaves = [a.detach().to(device, dtype).requires_grad_() for a in tensors]
    out = fn(*leaves)
    gout = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(out)  # same every run
    return out.detach(), torch.autograd.grad(out, leaves, gout)


OP_NAME = {"cross_entropy": "cross_entropy", "attention": "scaled_dot_product_attention",
           "linear_cross_entropy": "linear_cross_entropy"}


@pytest.mark.parametrize("backend,device", CPU + GPU)
def test_calls_through_torch_names_run_ours_with_torchs_results(backend, device):
    require_backend(backend, device)
    for op, fn, tensors in _cases(device):
        dtype = _dtype(backend, device, op)
        ref = _run(fn, tensors, torch.float64, device)  # torch's own, unpatched
        base = _run(fn, tensors, dtype, device)
        with pykernels.patch_functional(backend=backend):
            pykernels.last_dispatch.pop(OP_NAME[op], None)
            ours = _run(fn, tensors, dtype, device)
            ran, skipped = pykernels.last_dispatch[OP_NAME[op]]
            # a preference: where the backend has no kernel for the call (attention on "cpu", fp32 linear
            # cross-entropy on "cuda") the next backend runs, and the skipped one says why
            expect_fallback = (op == "attention" and backend == "cpu") or \
                (op == "linear_cross_entropy" and backend == "cuda" and dtype == torch.float32)
            assert (ran != backend and backend in skipped) if expect_fallback else ran == backend, (op, ran, skipped)
        for name, o, rf, b in zip(["output"] + [f"grad {i}" for i in range(len(tensors))], (ours[0],) + ours[1],
                                  (ref[0],) + ref[1], (base[0],) + base[1]):
            assert o.dtype == dtype
            assert_error_rule(f"{op} {name}", o, rf, b, floor=1e-12 if dtype == torch.float64 else None)


def test_torch_modules_and_layers_follow_the_names():
    """torch's CrossEntropyLoss and MultiheadAttention (through F.multi_head_attention_forward) and a
    TransformerEncoderLayer look the names up when called: they run pykernels, with their results unchanged."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).double().train()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    t = torch.randint(0, 32, (3, 10))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10, dtype=torch.float64)

    def step():
        layer.zero_grad()
        out = layer(x, src_mask=mask, is_causal=True)
        loss = torch.nn.CrossEntropyLoss()(out.flatten(0, 1), t.flatten())
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in layer.parameters()]

    want = step()
    with pykernels.patch_functional(backend="reference"):
        pykernels.last_dispatch.clear()
        got = step()
        assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == "reference"
        assert pykernels.last_dispatch["cross_entropy"][0] == "reference"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_automatic_calls_hand_over_to_torch_without_recursion():
    """Automatic dispatch hands small CPU calls to torch's kernel (backends.prefer_native): it must call torch's
    function as captured at import, not the patched name (which would call pykernels again, without end)."""
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    q = torch.randn(2, 3, 5, 8)
    with pykernels.patch_functional():
        loss = F.cross_entropy(x, t)
        assert pykernels.last_dispatch["cross_entropy"][0] == "torch"
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == "torch"
    torch.testing.assert_close(loss, _native.cross_entropy(x, t))
    torch.testing.assert_close(out, _native.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_undo_nesting_signature_and_bad_arguments():
    names = ("cross_entropy", "scaled_dot_product_attention") + (("linear_cross_entropy",) if HAS_LCE else ())
    originals = {n: getattr(F, n) for n in names}
    outer = pykernels.patch_functional()
    try:
        assert outer.names == names
        for n in names:
            assert getattr(F, n) is not originals[n] and getattr(F, n).__name__ == n
        assert inspect.signature(F.cross_entropy) == inspect.signature(originals["cross_entropy"])
        assert F.cross_entropy.__doc__ == originals["cross_entropy"].__doc__
        patched = F.cross_entropy
        with pykernels.patch_functional("cross_entropy", backend="reference") as inner:
            assert inner.names == ("cross_entropy",) and F.cross_entropy is not patched
            assert F.scaled_dot_product_attention is not originals["scaled_dot_product_attention"]
            x = torch.randn(4, 7)
            F.cross_entropy(x, torch.randint(0, 7, (4,)))
            assert pykernels.last_dispatch["cross_entropy"][0] == "reference"
        assert F.cross_entropy is patched  # the inner patch put back the outer one
        assert repr(inner) == "FunctionalPatch(undone)"
    finally:
        outer.undo()
    for n in names:
        assert getattr(F, n) is originals[n]
    outer.undo()  # twice: nothing left to undo
    assert F.cross_entropy is originals["cross_entropy"]
    with pytest.raises(ValueError, match="names.*'softmax'"):
        pykernels.patch_functional(["cross_entropy", "softmax"])
    with pytest.raises(ValueError, match="backend"):
        pykernels.patch_functional(backend="tpu")
    assert F.cross_entropy is originals["cross_entropy"]  # a refused patch rebinds nothing


def test_patches_undone_in_any_order():
    """Two threads' with-blocks overlap without nesting (A patches, B patches, A's block ends first): each undo takes
    out its own patch, and the name is torch's again once both are undone. Each handle put back what it saw: A's
    undo dropped B's open patch and B's bound A's routed function again, for good. Another library's patch made
    between two of ours is what the later one gives back."""
    original = F.cross_entropy
    x, t = torch.randn(4, 7), torch.randint(0, 7, (4,))
    try:
        a = pykernels.patch_functional("cross_entropy", backend="cpu")
        b = pykernels.patch_functional("cross_entropy", backend="reference")
        a.undo()
        F.cross_entropy(x, t)
        assert pykernels.last_dispatch["cross_entropy"][0] == "reference"  # B's block still runs B's patch
        b.undo()
        assert F.cross_entropy is original

        def other(*args, **kwargs):  # another library's patch
            return original(*args, **kwargs)
        a = pykernels.patch_functional("cross_entropy")
        F.cross_entropy = other
        with pykernels.patch_functional("cross_entropy"):
            a.undo()
        assert F.cross_entropy is other
        F.cross_entropy = original
        # a name listed twice is patched once (patched twice, the first routed function stayed bound for good)
        c = pykernels.patch_functional(["cross_entropy", "cross_entropy"])
        assert c.names == ("cross_entropy",)
        c.undo()
        assert F.cross_entropy is original
    finally:
        F.cross_entropy = original
        _patch._open.clear()


class _Logged(torch.Tensor):
    """A __torch_function__ subclass (as DTensor-like wrappers are): torch's function must see it."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclasses_and_nested_tensors_stay_with_torch():
    x = torch.randn(5, 6).as_subclass(_Logged)
    t = torch.randint(0, 6, (5,))
    _Logged.seen.clear()
    with pykernels.patch_functional(backend="reference"):
        pykernels.last_dispatch.pop("cross_entropy", None)
        loss = F.cross_entropy(x, t)
        assert "cross_entropy" in _Logged.seen and "cross_entropy" not in pykernels.last_dispatch
        torch.testing.assert_close(loss.as_subclass(torch.Tensor), _native.cross_entropy(x.as_subclass(torch.Tensor),
                                                                                        t))
        seqs = [torch.randn(n, 2, 8) for n in (3, 5)]  # (length, heads, E) each
        nt = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)  # (B, H, j, E)
        # to torch's function (which may call the name again per sequence, with plain tensors)
        assert not _patch._plain([nt])
        # so do a nested tensor of the strided layout (a plain torch.Tensor by type) and sparse layouts
        strided = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
        assert type(strided) is torch.Tensor and not _patch._plain([strided])
        assert not _patch._plain([torch.eye(3).to_sparse()]) and not _patch._plain([torch.eye(3).to_sparse_csr()])
        assert _patch._plain([torch.eye(3), torch.nn.Parameter(torch.eye(3)), 1.0])
        try:
            out = F.scaled_dot_product_attention(nt, nt, nt)
        except RuntimeError:  # torch's own refusal on this build
            return
        for s, o in zip(seqs, out.transpose(1, 2).unbind()):
            s = s.transpose(0, 1)
            torch.testing.assert_close(o.transpose(0, 1), _native.scaled_dot_product_attention(s, s, s))

def test_compiles_whole():
    """torch.compile(fullgraph=True) traces a model calling the patched names (the routing check included)."""
    def f(q, x, t):
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return F.cross_entropy(x + a.sum(), t)

    q = torch.randn(2, 2, 7, 8)
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    with pykernels.patch_functional(backend="reference"):
        want = f(q, x, t)
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True, backend="eager")(q, x, t)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want)


def _gpt2(embed: int) -> torch.nn.Module:
    """A small Transformers GPT2LMHeadModel (SDPA attention, no dropout): the e2e suite's, at a 61-token vocabulary."""
    from bench import models
    return models.HFGPT2(models.HFGPT2Config(seq=32, embed=embed, heads=4, layers=2, vocab=61)).lm


@pytest.mark.parametrize("backend,device,dtype", [
    pytest.param("reference", "cpu", torch.float32, id="reference"),
    pytest.param("triton", "cpu", torch.float32, id="triton-interp"),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(None, "cuda", torch.bfloat16, id="auto-cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_models(arch, backend, device, dtype):
    """Transformers' GPT-2 and Llama (GQA), their SDPA attention and causal-LM loss, which call the functional
    names: after the patch pykernels runs both, and the loss and every gradient keep torch's accuracy (float64
    reference, 2x rule against the unpatched model at the dtype), with right padding in the batch."""
    transformers = pytest.importorskip("transformers")
    if backend is not None:
        require_backend(backend, device)
    torch.manual_seed(0)
    if arch == "gpt2":
        model = _gpt2(64)
    else:
        cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg)
        model.config._attn_implementation = "sdpa"
    model = model.to(device).train()
    ids = torch.randint(0, 61, (2, 12), device=device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, 9:] = 0

    def step(dt):
        model.to(dt).zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return [out.loss.detach()] + [p.grad.clone() for p in model.parameters()]

    ref = step(torch.float64)
    base = step(dtype)
    with pykernels.patch_functional(backend=backend):
        pykernels.last_dispatch.clear()
        ours = step(dtype)
        ran = {op: pykernels.last_dispatch[op][0] for op in ("scaled_dot_product_attention", "cross_entropy")}
    assert all(b == backend for b in ran.values()) if backend else set(ran.values()) <= {"torch", "triton", "cuda"}
    names = ["loss"] + [n for n, _ in model.named_parameters()]
    for name, o, r, b in zip(names, ours, ref, base):
        assert_error_rule(f"{arch} {name}", o, r, b)


def test_hugging_face_model_under_torch_compile():
    """The common pairing: a Transformers model under torch.compile with the patch on. The patched names trace
    (ours as custom ops), and the loss and gradients equal the eager unpatched model's."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _gpt2(32).double()
    ids = torch.randint(0, 61, (2, 12))

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(ids)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    def f(ids):
        return model(input_ids=ids, labels=ids).loss

    want = loss_and_grads(f)
    torch._dynamo.reset()
    from torch._dynamo.testing import EagerAndRecordGraphs
    rec = EagerAndRecordGraphs()  # (last_dispatch records eager calls only: the traced graphs say what ran)
    with pykernels.patch_functional(backend="cpu"):
        got = loss_and_grads(torch.compile(f, backend=rec))
    code = "\n".join(g.code for g in rec.graphs)
    assert "torch.ops.pykernels.cross_entropy" in code  # ours, on the C++ kernels (backend "cpu" in its call)
    assert "scaled_dot_product_attention" not in code  # no C++ attention: the reference (plain torch ops)
    torch._dynamo.reset()
    for a, b in zip(got, want):  # the model's loss upcasts the logits to float32: fp32 summation order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_routed_call_takes_out_only_its_own_preference(monkeypatch):
    """patch_functional(backend=...) pushes its preference for the call and removes that entry, not the last one
    pushed: a use_backend block another thread opened during the call stays in force, and exits cleanly."""
    import threading
    inside, opened = threading.Event(), threading.Event()

    def slow(*args, **kwargs):  # stands for pykernels' function, busy while the other thread enters its block
        inside.set()
        assert opened.wait(10)
        return backends.preferred()

    monkeypatch.setitem(_patch.FUNCTIONALS, "cross_entropy", slow)
    original, seen = F.cross_entropy, {}
    with pykernels.patch_functional("cross_entropy", backend="reference"):
        worker = threading.Thread(target=lambda: seen.setdefault("ran_under", F.cross_entropy(torch.ones(1))))
        worker.start()
        assert inside.wait(10)
        with pykernels.use_backend("cpu"):
            opened.set()
            worker.join(10)
            seen["after"] = backends.preferred()
    assert F.cross_entropy is original
    assert seen == {"ran_under": "cpu", "after": "cpu"}  # (process-wide: the innermost open entry)
    assert backends._preferred == []

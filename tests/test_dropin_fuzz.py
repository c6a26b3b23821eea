"""Property-based fuzzing of the drop-in modules (hypothesis): pykernels.nn.LSTM, LSTMCell and MultiheadAttention
against the torch modules they replace, over random combinations of every constructor option and forward argument,
with the same state_dict. The fixed-case tests cover each option; combinations (packed + projected + bidirectional +
given states, key padding + bias_kv + zero_attn + 3-D float mask, ...) are where a drop-in silently disagrees.

Each module runs on a CPU-tier backend as a *preference* (``pykernels.use_backend``), as ``pykernels.patch`` users
get it: what the backend's kernel does not cover falls back visibly, and ``last_dispatch`` must then name the
backend that ran. Outputs and the gradients of the inputs, the states and every parameter are judged against torch
in float64 with the PyTorch-error rule at 3x (torch at the tested dtype is the baseline; the fixed-shape tests
hold 2x). Fixed example budgets keep
CI time bounded; PYKERNELS_FUZZ_SCALE=k runs k times as many."""
from __future__ import annotations


import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import pykernels  # noqa: E402
from pykernels.testing import assert_error_rule  # noqa: E402

from conftest import FUZZ_SCALE, require_backend  # noqa: E402

SEEDS = st.integers(0, 2**31 - 1)
F64 = torch.float64


def _fuzz(budget, **strategies):
    """hypothesis with this test's example budget (times PYKERNELS_FUZZ_SCALE), fresh examples every run."""
    return lambda f: settings(max_examples=budget * FUZZ_SCALE, deadline=None, derandomize=False)(given(**strategies)(f))


def _params(cpu, gpu):
    """(backend, device, dtype, example budget) parameters: ``cpu`` for the CPU tier, ``gpu`` marked gpu."""
    return [pytest.param(b, "cpu", dt, n, id=f"{b}-{str(dt)[6:]}" + ("-interp" if b == "triton" else ""))
            for b, dt, n in cpu] + \
        [pytest.param(b, "cuda", dt, n, id=f"{b}-cuda-{str(dt)[6:]}", marks=pytest.mark.gpu) for b, dt, n in gpu]


def _three_modules(torch_cls, ours_cls, dtype, device, *args, **kwargs):
    """torch's module in float64 (the oracle), ours and torch's at ``dtype``, all with the oracle's weights."""
    ref = torch_cls(*args, dtype=F64, **kwargs).to(device)
    ours = ours_cls(*args, dtype=dtype, backend=None, **kwargs).to(device)
    base = torch_cls(*args, dtype=dtype, **kwargs).to(device)
    sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    base.load_state_dict(sd, strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours, base


def _leaves(tensors, dtype, device):
    """Fresh leaves on ``device`` at ``dtype`` (the inputs are drawn on the CPU, from the case's generator)."""
    return [None if t is None else t.detach().to(device, dtype).requires_grad_(t.is_floating_point())
            for t in tensors]


def _grads(outs, leaves, gouts):
    outs, gouts = zip(*[(o, g.to(o)) for o, g in zip(outs, gouts) if o is not None])
    want = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(outs, want, gouts, allow_unused=True)


def _judge_runs(what, runs, dtype, no_grad=None):
    """runs: (outputs, gradients) of torch in float64, torch at dtype and ours at dtype, in that order. no_grad: ours
    again without autograd (inference calls take other paths: no saved state, no fused gradients), same outputs."""
    (r_out, r_g), (b_out, b_g), (o_out, o_g) = runs
    _judge(f"{what} outputs", o_out, r_out, b_out, dtype)
    _judge(f"{what} gradients", o_g, r_g, b_g, dtype)
    if no_grad is not None:
        with torch.no_grad():
            _judge(f"{what} outputs without autograd", list(no_grad()), r_out, b_out, dtype)


def _judge(what, got, ref, base, dtype):
    """Outputs or gradients, element by element, under the error rule at 3x (float64 runs: a 1e-9 floor)."""
    assert len(got) == len(ref) == len(base), what
    for k, (o, r, b) in enumerate(zip(got, ref, base)):
        assert (o is None) == (r is None), f"{what} [{k}]: {o is None=} but {r is None=}"
        if o is None:
            continue
        assert o.dtype == b.dtype, f"{what} [{k}]: dtype {o.dtype} != torch's {b.dtype}"
        if dtype == F64:
            assert_error_rule(f"{what} [{k}]", o, r, dtype=torch.float32, floor=1e-9)
        else:
            assert_error_rule(f"{what} [{k}]", o, r, b, dtype=dtype, factor=3.0)


# ---------------------------------------------------------------------------------------------------------
# nn.LSTM

@st.composite
def lstm_cases(draw):
    H = draw(st.integers(1, 9))
    return dict(
        I=draw(st.integers(1, 7)), H=H, layers=draw(st.integers(1, 3)), bias=draw(st.booleans()),
        batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()),
        proj=draw(st.sampled_from([0] + list(range(1, H)))) if H > 1 else 0,
        T=draw(st.integers(1, 9)), B=draw(st.integers(1, 5)),
        input=draw(st.sampled_from(["padded", "unbatched", "packed", "packed_sorted"])),
        states=draw(st.booleans()), seed=draw(SEEDS))


def _lstm_input(case, g):
    """(module input, the leaves it is built from, lengths or None) for one case, in float64."""
    T, B, I = case["T"], case["B"], case["I"]
    if case["input"] == "unbatched":
        x = torch.randn(T, I, generator=g, dtype=F64)
        return x, None
    x = torch.randn((B, T, I) if case["batch_first"] else (T, B, I), generator=g, dtype=F64)
    if case["input"] == "padded":
        return x, None
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[int(torch.randint(0, B, (1,), generator=g))] = T  # pack_padded_sequence needs one full row
    if case["input"] == "packed_sorted":
        lengths = lengths.sort(descending=True).values
    return x, lengths


def _lstm_forward(m, x, lengths, h0c0, case):
    """[output, h_n, c_n] (packing inside, so gradients reach the padded leaf; a packed output as its data)."""
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, batch_first=case["batch_first"],
                                   enforce_sorted=case["input"] == "packed_sorted")
    out, (h, c) = m(inp) if h0c0 is None else m(inp, h0c0)
    if lengths is not None:
        assert isinstance(out, PackedSequence)
        out = out.data
    return [out, h, c]


def _run_lstm(m, x, lengths, h0c0, case, gouts):
    """Forward and the gradients of x, h0, c0 and every parameter."""
    outs = _lstm_forward(m, x, lengths, h0c0, case)
    leaves = [x] + (list(h0c0) if h0c0 is not None else []) + list(m.parameters())
    return outs, _grads(outs, leaves, gouts)


@pytest.mark.parametrize("backend,device,dtype,budget", _params(
    [("cpu", torch.float32, 12), ("cpu", F64, 8), ("reference", torch.float32, 6), ("triton", torch.float32, 4)],
    [("triton", torch.float32, 6), ("triton", torch.bfloat16, 6), ("cuda", torch.float32, 6),
     ("cuda", torch.float16, 6)]))
def test_fuzz_lstm_module_against_torch(backend, device, dtype, budget):
    require_backend(backend, device)

    @_fuzz(budget, case=lstm_cases())
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        D = 2 if case["bidirectional"] else 1
        kw = dict(num_layers=case["layers"], bias=case["bias"], batch_first=case["batch_first"],
                  bidirectional=case["bidirectional"], proj_size=case["proj"])
        ref, ours, base = _three_modules(torch.nn.LSTM, pykernels.nn.LSTM, dtype, device, case["I"], case["H"],
                                         **kw)
        # torch's default init is U(-1/sqrt(H), 1/sqrt(H)): stable for any depth, as a trained model's would be
        x, lengths = _lstm_input(case, g)
        unbatched = case["input"] == "unbatched"
        B = 1 if unbatched else case["B"]
        real = case["proj"] or case["H"]
        states = None
        if case["states"]:
            shape = lambda n: (case["layers"] * D, n) if unbatched else (case["layers"] * D, B, n)  # noqa: E731
            states = (torch.randn(shape(real), generator=g, dtype=F64),
                      torch.randn(shape(case["H"]), generator=g, dtype=F64))
        n_out = int(lengths.sum()) if lengths is not None else None
        T = case["T"]
        out_shape = ((n_out, D * real) if lengths is not None else (T, D * real) if unbatched else
                     (B, T, D * real) if case["batch_first"] else (T, B, D * real))
        hshape = (case["layers"] * D, real) if unbatched else (case["layers"] * D, B, real)
        cshape = (case["layers"] * D, case["H"]) if unbatched else (case["layers"] * D, B, case["H"])
        gouts = [torch.randn(s, generator=g, dtype=F64) for s in (out_shape, hshape, cshape)]
        runs = []
        for m, dt in ((ref, F64), (base, dtype), (ours, dtype)):
            lv = _leaves([x] + (list(states) if states else []), dt, device)
            with pykernels.use_backend(backend):
                runs.append(_run_lstm(m, lv[0], lengths, tuple(lv[1:]) if states else None, case, gouts))
        ran, why = pykernels.last_dispatch["lstm"]
        kernel_covers = not case["proj"] and lengths is None and not (dtype == F64 and backend != "cpu")
        if backend == "reference" or kernel_covers:
            assert ran == backend, f"{case}: ran {ran} ({why})"
        else:  # packed / projected (and float64 off the C++ kernels): the visible fallback
            assert ran == "reference" and backend in str(why), f"{case}: ran {ran} ({why})"
        lv = _leaves([x] + (list(states) if states else []), dtype, device)
        with pykernels.use_backend(backend):
            _judge_runs(f"lstm {backend} {case}", runs, dtype, lambda: _lstm_forward(
                ours, lv[0], lengths, tuple(lv[1:]) if states else None, case))

    check()


# ---------------------------------------------------------------------------------------------------------
# nn.LSTMCell

@pytest.mark.parametrize("backend,device,dtype,budget", _params(
    [("cpu", torch.float32, 15), ("cpu", F64, 10), ("triton", torch.float32, 6)],
    [("triton", torch.float32, 6), ("cuda", torch.float32, 6), ("cuda", torch.bfloat16, 6)]))
def test_fuzz_lstm_cell_module_against_torch(backend, device, dtype, budget):
    require_backend(backend, device)

    @_fuzz(budget, I=st.integers(1, 40), H=st.integers(1, 40), B=st.sampled_from([None, 1, 2, 5, 9, 17]),
           bias=st.booleans(), states=st.booleans(), strided=st.booleans(), seed=SEEDS)
    def check(I, H, B, bias, states, strided, seed):
        g = torch.Generator().manual_seed(seed)
        ref, ours, base = _three_modules(torch.nn.LSTMCell, pykernels.nn.LSTMCell, dtype, device, I, H, bias=bias)
        shape = (lambda n: (n,)) if B is None else (lambda n: (B, n))
        x = torch.randn(shape(2 * I if strided else I), generator=g, dtype=F64)  # strided: the input is x[..., ::2]
        hc = [torch.randn(shape(H), generator=g, dtype=F64) for _ in range(2)] if states else []
        gouts = [torch.randn(shape(H), generator=g, dtype=F64) for _ in range(2)]
        runs = []
        for m, dt in ((ref, F64), (base, dtype), (ours, dtype)):
            lv = _leaves([x] + hc, dt, device)
            with pykernels.use_backend(backend):  # every other column: a non-contiguous input
                h, c = m(lv[0][..., ::2] if strided else lv[0], tuple(lv[1:]) if states else None)
            runs.append(([h, c], _grads([h, c], lv + list(m.parameters()), gouts)))
        _judge_runs(f"lstm_cell {backend} {I=} {H=} {B=} {bias=} {states=} {strided=}", runs, dtype)

    check()


# ---------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention

@st.composite
def mha_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    E = heads * draw(st.sampled_from([2, 4, 8]))
    cross = draw(st.sampled_from(["self", "same_dims", "kdim_vdim"]))
    return dict(
        E=E, heads=heads, cross=cross, bias=draw(st.booleans()), bias_kv=draw(st.booleans()),
        zero_attn=draw(st.booleans()), batch_first=draw(st.booleans()), unbatched=draw(st.booleans()),
        N=draw(st.integers(1, 3)), L=draw(st.integers(1, 9)), S=draw(st.integers(1, 9)),
        kdim=draw(st.integers(1, 7)), vdim=draw(st.integers(1, 7)),
        attn=draw(st.sampled_from([None, "bool", "float", "bool3", "float3", "causal"])),
        kpm=draw(st.sampled_from([None, "bool", "float"])), need_weights=draw(st.booleans()),
        average=draw(st.booleans()), seed=draw(SEEDS))


def _mha_call(case, g):
    """(query, key, value, forward kwargs) in float64 for one case. Every query row keeps one visible key (torch
    gives NaN rows otherwise, in some of its paths and not others)."""
    E, N, L, S, Hn = case["E"], case["N"], case["L"], case["S"], case["heads"]
    if case["cross"] == "self" or case["attn"] == "causal":
        S = L
    kd, vd = (case["kdim"], case["vdim"]) if case["cross"] == "kdim_vdim" else (E, E)
    shape = (lambda t, e: (t, e)) if case["unbatched"] else (
        (lambda t, e: (N, t, e)) if case["batch_first"] else (lambda t, e: (t, N, e)))
    q = torch.randn(shape(L, E), generator=g, dtype=F64)
    if case["cross"] == "self":
        k = v = q
    else:
        k, v = torch.randn(shape(S, kd), generator=g, dtype=F64), torch.randn(shape(S, vd), generator=g, dtype=F64)
    kw = dict(need_weights=case["need_weights"], average_attn_weights=case["average"])
    a, n = case["attn"], (1 if case["unbatched"] else N)
    if a in ("bool", "bool3"):
        m = torch.rand((L, S) if a == "bool" else (n * Hn, L, S), generator=g) < 0.4
        m[..., 0] = False
        kw["attn_mask"] = m
    elif a in ("float", "float3"):
        kw["attn_mask"] = torch.randn((L, S) if a == "float" else (n * Hn, L, S), generator=g, dtype=F64)
    elif a == "causal":
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        kw["is_causal"] = True  # the hint, with its mask (as torch requires)
    if case["kpm"] is not None:
        p = torch.rand(S, generator=g) < 0.4 if case["unbatched"] else torch.rand(N, S, generator=g) < 0.4
        p[..., 0] = False
        kw["key_padding_mask"] = p if case["kpm"] == "bool" else torch.randn(p.shape, generator=g, dtype=F64)
    return q, k, v, kw


@pytest.mark.parametrize("backend,device,dtype,budget", _params(
    [("reference", F64, 25), ("triton", torch.float32, 6)],
    [("triton", torch.float16, 6), ("triton", torch.bfloat16, 6), ("cuda", torch.float16, 6),
     ("cuda", torch.bfloat16, 6)]))
def test_fuzz_multihead_attention_against_torch(backend, device, dtype, budget):
    require_backend(backend, device)

    @_fuzz(budget, case=mha_cases())
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        ctor = dict(bias=case["bias"], add_bias_kv=case["bias_kv"], add_zero_attn=case["zero_attn"],
                    batch_first=case["batch_first"])
        if case["cross"] == "kdim_vdim":
            ctor.update(kdim=case["kdim"], vdim=case["vdim"])
        ref, ours, base = _three_modules(torch.nn.MultiheadAttention, pykernels.nn.MultiheadAttention,
                                         dtype, device, case["E"], case["heads"], **ctor)
        for m in (ref, ours, base):
            m.eval()  # dropout 0 either way; eval as a deployed model (torch's fast path needs no grad: not taken)
        q, k, v, kw = _mha_call(case, g)
        runs = []
        for m, dt in ((ref, F64), (base, dtype), (ours, dtype)):
            if case["cross"] == "self":  # one tensor for all three: torch's self-attention path
                qv = _leaves([q], dt, device)[0]
                leaves, call = [qv], (qv, qv, qv)
            else:
                leaves = _leaves([q, k, v], dt, device)
                call = tuple(leaves)
            mkw = {n: (t.to(device, dt if t.is_floating_point() else t.dtype) if torch.is_tensor(t) else t)
                   for n, t in kw.items()}
            with pykernels.use_backend(backend):
                out, w = m(*call, **mkw)
            if m is ours:
                ran, why = pykernels.last_dispatch["scaled_dot_product_attention"]
                assert ran == backend, f"{case}: ran {ran} ({why})"
            gouts = [torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=F64)]
            runs.append(([out, w], _grads([out], leaves + list(m.parameters()), gouts)))
        with pykernels.use_backend(backend):
            _judge_runs(f"mha {backend} {case}", runs, dtype, lambda: ours(*call, **mkw))

    check()


# ---------------------------------------------------------------------------------------------------------
# nn.LinearCrossEntropyLoss and nn.CrossEntropyLoss (torch's modules; torch < 2.13 has no linear one: then
# linear + cross_entropy is the oracle)

_TorchLCE = getattr(torch.nn, "LinearCrossEntropyLoss", None)


class _LinearThenCE(torch.nn.Module):
    """torch < 2.13: the module torch's LinearCrossEntropyLoss is (same ``linear`` and ``weight`` layout)."""

    def __init__(self, in_features, num_classes, *, bias, dtype, reduction, weight, ignore_index, label_smoothing):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, dtype=dtype)
        self.register_buffer("weight", weight)
        self.kw = dict(reduction=reduction, label_smoothing=label_smoothing,
                       ignore_index=-100 if ignore_index is None else ignore_index)

    def forward(self, x, t):
        return torch.nn.functional.cross_entropy(self.linear(x), t, weight=self.weight, **self.kw)


@st.composite
def loss_cases(draw):
    V = draw(st.integers(1, 40))
    return dict(N=draw(st.sampled_from([None, 1, 2, 7, 19])), H=draw(st.integers(1, 24)), V=V,
                bias=draw(st.booleans()), weighted=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                ignore_index=draw(st.sampled_from([None, -100, 0, V - 1])), ignored=draw(st.floats(0.0, 1.0)),
                label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.7])), seed=draw(SEEDS))


def _loss_inputs(case, g):
    N, H, V = case["N"], case["H"], case["V"]
    x = torch.randn((H,) if N is None else (N, H), generator=g, dtype=F64)
    t = torch.randint(0, V, () if N is None else (N,), generator=g)
    ii = case["ignore_index"]
    if ii is not None and N is not None:
        t = torch.where(torch.rand(N, generator=g) < case["ignored"], torch.full_like(t, ii), t)
    w = torch.rand(V, generator=g, dtype=F64) + 0.2 if case["weighted"] else None
    return x, t, w


@pytest.mark.parametrize("backend,device,dtype,budget", _params(
    [("cpu", torch.float32, 15), ("cpu", F64, 10), ("cpu", torch.bfloat16, 8), ("triton", torch.float32, 6)],
    [("triton", torch.float32, 6), ("triton", torch.bfloat16, 6), ("cuda", torch.bfloat16, 6)]))
def test_fuzz_linear_cross_entropy_module_against_torch(backend, device, dtype, budget):
    require_backend(backend, device)

    @_fuzz(budget, case=loss_cases())
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        x, t, w = _loss_inputs(case, g)
        kw = dict(bias=case["bias"], reduction=case["reduction"], ignore_index=case["ignore_index"],
                  label_smoothing=case["label_smoothing"])
        mods = []
        for cls, dt in ((_TorchLCE or _LinearThenCE, F64), (_TorchLCE or _LinearThenCE, dtype),
                        (pykernels.nn.LinearCrossEntropyLoss, dtype)):
            # class weights in the accumulation dtype: torch's module keeps its buffer's dtype as given
            m = cls(case["H"], case["V"], dtype=dt, weight=None if w is None else w.to(dt), **kw)
            mods.append(m.to(device))
        ref, base, ours = mods
        with torch.no_grad():
            ref.linear.weight.mul_(3.0)  # sharper softmaxes than the default init gives
        sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
        base.load_state_dict(sd, strict=True)
        ours.load_state_dict(sd, strict=True)
        gout = torch.rand(() if case["reduction"] != "none" or case["N"] is None else (case["N"],), generator=g,
                          dtype=F64) + 0.5
        runs = []
        for m, dt in ((ref, F64), (base, dtype), (ours, dtype)):
            xl = x.to(device, dt).requires_grad_()
            with pykernels.use_backend(backend):
                loss = m(xl, t.to(device))
            runs.append(([loss], _grads([loss], [xl] + list(m.linear.parameters()), [gout])))
        ran, why = pykernels.last_dispatch["linear_cross_entropy"]
        assert ran == backend, f"{case}: ran {ran} ({why})"
        with pykernels.use_backend(backend):
            _judge_runs(f"linear_cross_entropy {backend} {dtype} {case}", runs, dtype,
                        lambda: [ours(x.to(device, dtype), t.to(device))])

    check()


@pytest.mark.parametrize("backend,device,dtype,budget", _params(
    [("cpu", torch.float32, 15), ("cpu", torch.bfloat16, 8), ("triton", torch.float32, 6)],
    [("triton", torch.bfloat16, 6), ("cuda", torch.bfloat16, 6), ("cuda", torch.float32, 6)]))
def test_fuzz_cross_entropy_module_against_torch(backend, device, dtype, budget):
    """nn.CrossEntropyLoss on logits from a linear layer (the usual head), every option of the module, the
    backend asked for as a preference (which, unlike an automatic call, runs ours below torch's size threshold)."""
    require_backend(backend, device)

    @_fuzz(budget, case=loss_cases())
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        x, t, w = _loss_inputs(case, g)
        z = x @ (torch.randn(case["V"], case["H"], generator=g, dtype=F64) * 3 / case["H"] ** 0.5).T
        kw = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"])
        if case["ignore_index"] is not None:
            kw["ignore_index"] = case["ignore_index"]
        gout = torch.rand(() if case["reduction"] != "none" or case["N"] is None else (case["N"],), generator=g,
                          dtype=F64) + 0.5
        runs = []
        for cls, dt in ((torch.nn.CrossEntropyLoss, F64), (torch.nn.CrossEntropyLoss, dtype),
                        (pykernels.nn.CrossEntropyLoss, dtype)):
            m = cls(weight=None if w is None else w.to(device, dt), **kw)
            zl = z.to(device, dt).requires_grad_()
            with pykernels.use_backend(backend):
                loss = m(zl, t.to(device))
            runs.append(([loss], _grads([loss], [zl], [gout])))
        ran, why = pykernels.last_dispatch["cross_entropy"]
        assert ran == backend, f"{case}: ran {ran} ({why})"
        with pykernels.use_backend(backend):
            _judge_runs(f"cross_entropy {backend} {dtype} {case}", runs, dtype,
                        lambda: [m(z.to(device, dtype), t.to(device))])

    check()


# ---------------------------------------------------------------------------------------------------------
# pykernels.patch on torch's own Transformer layers: MultiheadAttention as torch.nn.Transformer* calls it (the
# is_causal hint with its mask, key padding, need_weights=False, norm_first, cross-attention in the decoder)

@st.composite
def transformer_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(kind=draw(st.sampled_from(["encoder", "decoder"])), heads=heads,
                E=heads * draw(st.sampled_from([4, 8])), ff=draw(st.sampled_from([8, 24])),
                norm_first=draw(st.booleans()), batch_first=draw(st.booleans()), bias=draw(st.booleans()),
                activation=draw(st.sampled_from(["relu", "gelu"])), N=draw(st.integers(1, 3)),
                L=draw(st.integers(1, 9)), S=draw(st.integers(1, 9)), causal=draw(st.booleans()),
                kpm=draw(st.booleans()), seed=draw(SEEDS))


@pytest.mark.parametrize("backend,device,dtype,budget", _params(
    [("reference", F64, 15), ("triton", torch.float32, 4)],
    [("triton", torch.bfloat16, 6), ("cuda", torch.bfloat16, 6)]))
def test_fuzz_patched_transformer_layers_against_torch(backend, device, dtype, budget):
    require_backend(backend, device)

    @_fuzz(budget, case=transformer_cases())
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        cls = torch.nn.TransformerEncoderLayer if case["kind"] == "encoder" else torch.nn.TransformerDecoderLayer
        kw = dict(dim_feedforward=case["ff"], dropout=0.0, activation=case["activation"],
                  batch_first=case["batch_first"], norm_first=case["norm_first"], bias=case["bias"])
        ref = cls(case["E"], case["heads"], dtype=F64, **kw).to(device)
        mods = [ref]
        for _ in range(2):
            m = cls(case["E"], case["heads"], dtype=dtype, **kw).to(device)
            m.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
            mods.append(m)
        ours = pykernels.patch(mods[2])
        assert type(ours.self_attn) is pykernels.nn.MultiheadAttention
        N, L, S, E = case["N"], case["L"], case["S"], case["E"]
        shape = (lambda t: (N, t, E)) if case["batch_first"] else (lambda t: (t, N, E))
        x = torch.randn(shape(L), generator=g, dtype=F64)
        mem = torch.randn(shape(S), generator=g, dtype=F64)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64) if case["causal"] else None
        kpm = None
        if case["kpm"]:
            kpm = torch.rand(N, L, generator=g) < 0.3
            kpm[:, 0] = False  # every query keeps a visible key
        gout = torch.randn(shape(L), generator=g, dtype=F64)
        runs = []
        for m, dt in ((ref, F64), (mods[1], dtype), (ours, dtype)):
            m.train()  # (torch's eval fast path would bypass MultiheadAttention.forward)
            xs = _leaves([x, mem], dt, device)
            am = None if mask is None else mask.to(device, dt)
            kp = None if kpm is None else kpm.to(device)
            with pykernels.use_backend(backend):
                if case["kind"] == "encoder":
                    out = m(xs[0], src_mask=am, src_key_padding_mask=kp, is_causal=case["causal"])
                    leaves = xs[:1]
                else:
                    out = m(xs[0], xs[1], tgt_mask=am, tgt_key_padding_mask=kp, tgt_is_causal=case["causal"])
                    leaves = xs
            if m is ours:
                assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == backend
            runs.append(([out], _grads([out], leaves + list(m.parameters()), [gout])))
        _judge_runs(f"transformer {backend} {case}", runs, dtype)

    check()

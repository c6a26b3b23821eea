"""Automatic dispatch hands an op to torch's own kernel where ours measured slower (backends.NATIVE_FASTER), only
for calls torch can express, visibly, and never against an explicit request or preference."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels import backends

from conftest import skip_unless_required

CUDA = torch.device("cuda")


def test_rule_applies_only_to_automatic_calls(monkeypatch):
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    for op in ("scaled_dot_product_attention", "lstm"):
        why = backends.prefer_native(op, CUDA, None)
        assert why and "measured" in why and "bench/results/" in why
        assert pykernels.last_dispatch[op] == ("torch", {"triton": why})
        assert backends.prefer_native(op, CUDA, "triton") is None  # a hard request runs ours
        with pykernels.use_backend("triton"):
            assert backends.prefer_native(op, CUDA, None) is None  # so does a preference
        cpu_why = backends.prefer_native(op, torch.device("cpu"), None)  # measured slower on CPU too
        assert cpu_why and "bench/results/cpu-" in cpu_why
        assert pykernels.last_dispatch[op] == ("torch", {"cpu": cpu_why})
    assert backends.prefer_native("cross_entropy", CUDA, None) is None  # ours is faster there
    assert backends.prefer_native("cross_entropy", torch.device("cpu"), None) is None
    assert backends.prefer_native("lstm_cell", torch.device("cpu"), None) is None  # the C++ cell is not slower
    monkeypatch.setenv("PYKERNELS_BACKEND", "triton")
    assert backends.prefer_native("lstm", CUDA, None) is None
    monkeypatch.delenv("PYKERNELS_BACKEND")
    for off in ("0", "false", "No", "off"):
        monkeypatch.setenv("PYKERNELS_PREFER_NATIVE", off)
        assert backends.prefer_native("lstm", CUDA, None) is None


def test_every_entry_cites_a_committed_measurement():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rules = [(op, why) for op, d in backends.NATIVE_FASTER.items() for why in d.values()]
    rules += [(op, rule[2]) for table in (backends.NATIVE_FASTER_BELOW, backends.NATIVE_FASTER_BELOW_AVX2,
                                          backends.NATIVE_FASTER_BELOW_OURS_AVX2)
              for op, d in table.items() for rule in d.values()]
    rules += [(op, why) for table in (backends.NATIVE_FASTER_DTYPE, backends.OURS_FASTER_DTYPE,
                                      backends.OURS_FASTER_DTYPE_AVX2, backends.OURS_FASTER_DTYPE_OURS_AVX2)
              for op, d in table.items() for per in d.values()
              for why in (v[-1] if isinstance(v, tuple) else v for v in per.values())]
    rules += [(op, why) for op, d in backends.OURS_WITHOUT_ONEDNN.items() for why in d.values()]
    def cited(why):  # the measurement files a rule's text names
        return re.findall(r"bench/results/[^ ;),]+", why)

    for op, why in rules:
        paths = cited(why)
        assert paths, (op, why)
        for path in paths:  # every file cited, where an entry cites several runs
            assert os.path.exists(os.path.join(root, path)), (op, path)
    # the CUDA chain's exceptions: a measurement, or the entry of the op whose kernels they share
    for op, why in backends.TRITON_FIRST_CUDA.items():
        paths = cited(why)
        assert all(os.path.exists(os.path.join(root, p)) for p in paths), (op, paths)
        assert paths or any(f"kernels of {other}" in why for other in backends.TRITON_FIRST_CUDA), (op, why)
        assert backends._chain(torch.device("cuda"), op)[0] == "triton", op


@pytest.mark.gpu
def test_cuda_automatic_calls_run_torch_exactly_and_extensions_run_ours(monkeypatch):
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    q, k, v = (torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = pykernels.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == "torch"
    pykernels.functional.scaled_dot_product_attention(q, k, v, is_causal=True, window=(8, 0))  # torch cannot
    assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == "triton"
    ref = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True).cuda()
    ours = pykernels.nn.LSTM(8, 16, num_layers=2, bidirectional=True).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8, device="cuda")
    (o1, (h1, c1)), (o2, (h2, c2)) = ours(x), ref(x)
    assert torch.equal(o1, o2) and torch.equal(h1, h2) and torch.equal(c1, c2)
    assert pykernels.last_dispatch["lstm"][0] == "torch"
    o3, _ = ours(x[:, :1])  # batch 1, default state
    assert torch.equal(o3, ref(x[:, :1])[0])


@pytest.mark.gpu
def test_cuda_cross_entropy_order_follows_the_measurement(monkeypatch):
    """Forward only: Triton (faster there); with a gradient: the CUDA kernel."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (64,), device="cuda")
    with torch.no_grad():
        pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == "triton"
    pykernels.functional.cross_entropy(x.requires_grad_(), t).backward()
    assert pykernels.last_dispatch["cross_entropy"][0] == "cuda"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_native_lstm_call_matches_torch_module(batch_first, bidirectional, proj_size):
    """The call that automatic CUDA dispatch makes (device-free logic, checked on CPU): unbatched input, default
    and given states, projections, packed sequences, exactly as torch.nn.LSTM."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from pykernels.functional.lstm import _native_lstm
    m = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=bidirectional, batch_first=batch_first,
                      proj_size=proj_size)
    args = (m._flat_weights, 2, bidirectional, True, proj_size, batch_first, 0.0, False)
    for x in (torch.randn(6, 3, 4), torch.randn(6, 4)):
        o1, (h1, c1) = m(x)
        o2, (h2, c2) = _native_lstm(x, None, *args, None)
        assert torch.equal(o1, o2) and torch.equal(h1, h2) and torch.equal(c1, c2)
        hx = (torch.randn(h1.shape), torch.randn(c1.shape))
        assert torch.equal(m(x, hx)[0], _native_lstm(x, hx, *args, None)[0])
    if not batch_first:
        pk = pack_padded_sequence(torch.randn(6, 3, 4), torch.tensor([6, 4, 2]))
        assert torch.equal(m(pk)[0].data, _native_lstm(pk.data, None, *args, pk.batch_sizes)[0])


def test_cpu_automatic_lstm_and_sdpa_run_torch_and_explicit_calls_run_ours(monkeypatch):
    """On CPU the measured-slower ops (NATIVE_FASTER["..."]["cpu"]) hand automatic calls to torch, exactly
    torch's result; backend="cpu" still runs the C++ sequence kernel, and the cell (not slower) stays ours. The bf16
    rules are those of a CPU whose oneDNN has bf16 and the fp32 ones of an AVX-512 CPU (simulated where it is not;
    see the next tests)."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset({torch.bfloat16}))
    monkeypatch.setattr(pykernels._native, "CPU_CAPABILITY", "AVX512")  # the fp32 rules of an AVX-512 CPU
    theirs = torch.nn.LSTM(5, 7, num_layers=2)
    ours = pykernels.nn.LSTM(5, 7, num_layers=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, backends.ours_faster_dtype("lstm", "cpu", torch.float32)[0] + 1, 5)  # past the fp32 rule
    assert torch.equal(ours(x)[0], theirs(x)[0])
    assert pykernels.last_dispatch["lstm"][0] == "torch"
    from pykernels.ops import lstm as lstm_ops
    if "cpu" in lstm_ops.LAYER:
        torch.testing.assert_close(pykernels.functional.lstm(x, None, list(theirs._flat_weights), 2,
                                                             backend="cpu")[0], theirs(x)[0])
        assert pykernels.last_dispatch["lstm"][0] == "cpu"
    q = torch.randn(2, 3, 9, 8)
    assert torch.equal(pykernels.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
                       F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert pykernels.last_dispatch["scaled_dot_product_attention"][0] == "torch"
    h = pykernels.functional.lstm_cell(x[0], None, theirs.weight_ih_l0, theirs.weight_hh_l0)
    assert h[0].shape == (x.shape[1], 7) and pykernels.last_dispatch["lstm_cell"][0] != "torch"
    # fp32 / bf16 sequences at small batches (the OURS_FASTER_DTYPE rule for this CPU and the ISA of our kernels,
    # sized with a gradient and without): ours; larger, or packed: torch's
    for dtype in (torch.float32, torch.bfloat16):
        if "cpu" not in lstm_ops.LAYER:
            break
        most, without, _ = backends.ours_faster_dtype("lstm", "cpu", dtype)
        if most > 64:  # every batch with a gradient (AVX2-only CPUs, fp32)
            continue
        ours.to(dtype), theirs.to(dtype)
        small = torch.randn(6, most, 5, dtype=dtype)
        out = ours(small)[0]
        assert pykernels.last_dispatch["lstm"][0] == "cpu", dtype
        torch.testing.assert_close(out, theirs(small)[0], **({} if dtype == torch.float32 else
                                                              {"atol": 2e-2, "rtol": 2e-2}))
        ours(small[:, 0])  # unbatched: one row
        assert pykernels.last_dispatch["lstm"][0] == "cpu"
        with torch.no_grad():
            ours(small[:, :max(without, 1)])
            assert pykernels.last_dispatch["lstm"][0] == ("cpu" if without else "torch"), dtype
            ours(torch.randn(6, without + 1, 5, dtype=dtype))
            assert pykernels.last_dispatch["lstm"][0] == "torch", dtype
        ours(torch.randn(6, most + 1, 5, dtype=dtype))
        assert pykernels.last_dispatch["lstm"][0] == "torch"
        packed = torch.nn.utils.rnn.pack_padded_sequence(small, [6] + [4] * (most - 1))
        ours(packed)
        assert pykernels.last_dispatch["lstm"][0] == "torch"
    ours.float(), theirs.float()
    # fp16 sequence where oneDNN has no fp16 (OURS_WITHOUT_ONEDNN): automatic calls run ours
    if "cpu" in lstm_ops.LAYER:
        half = pykernels.nn.LSTM(5, 7, num_layers=2).half()
        half(x.half())
        assert pykernels.last_dispatch["lstm"][0] == "cpu"
    # bf16 cell (NATIVE_FASTER_DTYPE, sized): automatic calls from the rule's batch up are torch's, exactly; smaller
    # ones (unbatched too) and explicit ones ours
    first, _, _ = backends.NATIVE_FASTER_DTYPE["lstm_cell"]["cpu"][torch.bfloat16]
    cell = torch.nn.LSTMCell(5, 7).bfloat16()
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    for B in (first, first + 3):
        xb, hb, cb = torch.randn(B, 5).bfloat16(), torch.randn(B, 7).bfloat16(), torch.randn(B, 7).bfloat16()
        got = pykernels.functional.lstm_cell(xb, (hb, cb), *w)
        assert pykernels.last_dispatch["lstm_cell"][0] == "torch"
        assert all(torch.equal(a, b) for a, b in zip(got, cell(xb, (hb, cb))))
    from pykernels.ops import lstm as lstm_ops
    if "cpu" in lstm_ops.CELL:
        for B in (None, 1, first - 1):
            xb = torch.randn(5).bfloat16() if B is None else torch.randn(B, 5).bfloat16()
            pykernels.functional.lstm_cell(xb, None, *w)
            assert pykernels.last_dispatch["lstm_cell"][0] == "cpu", B
        pykernels.functional.lstm_cell(xb, None, *w, backend="cpu")
        assert pykernels.last_dispatch["lstm_cell"][0] == "cpu"


def test_cpu_without_onednn_bf16_runs_ours_for_bf16_lstm(monkeypatch):
    """Where this CPU's oneDNN has no bf16 (simulated on any CPU), torch's bf16 LSTM and cell run generic GEMM loops:
    every automatic bf16 call of them that our kernels cover runs ours (OURS_WITHOUT_ONEDNN), whatever its size or
    gradient; a packed batch, which they do not cover, torch's."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset())
    from pykernels.ops import lstm as lstm_ops
    if "cpu" not in lstm_ops.LAYER or "cpu" not in lstm_ops.CELL:
        skip_unless_required("the C++ LSTM kernels are not built")
    lstm = pykernels.nn.LSTM(5, 7).bfloat16()
    x = torch.randn(6, 40, 5, dtype=torch.bfloat16)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            lstm(x)
            assert pykernels.last_dispatch["lstm"][0] == "cpu", grad
            lstm(torch.nn.utils.rnn.pack_padded_sequence(x, [6] * 20 + [3] * 20))  # no kernel covers packing
            assert pykernels.last_dispatch["lstm"][0] == "torch", grad
            pykernels.functional.lstm_cell(x[0], None, *lstm._flat_weights)
            assert pykernels.last_dispatch["lstm_cell"][0] == "cpu", grad
    with torch.no_grad():
        lstm.float()(x.float())  # fp32 keeps its measured rules (without a gradient: torch's on every CPU)
    assert pykernels.last_dispatch["lstm"][0] == "torch"


def test_cpu_fp16_lstm_rule_follows_onednn_fp16(monkeypatch):
    """fp16 sequences: where oneDNN has fp16 (simulated on any CPU) torch's fp16 LSTM wins at large batches, so
    automatic calls run ours only up to the sized rule's batches (with a gradient, without one); where it has none
    (OURS_WITHOUT_ONEDNN) ours runs every size."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    from pykernels.ops import lstm as lstm_ops
    if "cpu" not in lstm_ops.LAYER:
        skip_unless_required("the C++ LSTM kernels are not built")
    with_grad, without, _ = backends.ours_faster_dtype("lstm", "cpu", torch.float16)
    assert without < with_grad
    lstm = pykernels.nn.LSTM(5, 7).half()

    def ran(batch, grad):
        with torch.set_grad_enabled(grad):
            lstm(torch.randn(4, batch, 5, dtype=torch.float16))
        return pykernels.last_dispatch["lstm"][0]

    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset({torch.bfloat16, torch.float16}))
    assert [ran(with_grad, True), ran(with_grad + 1, True)] == ["cpu", "torch"]
    assert [ran(without, False), ran(without + 1, False)] == ["cpu", "torch"]
    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset({torch.bfloat16}))
    assert [ran(with_grad + 1, True), ran(without + 1, False)] == ["cpu", "cpu"]


def test_lstm_calls_no_kernel_covers_record_why_torch_ran(monkeypatch):
    """Automatic LSTM calls with proj_size > 0 or a packed batch run torch's LSTM because no sequence kernel covers
    them, and last_dispatch says so (it gave the fp32 speed rule, false in fp16, where the C++ kernel measured
    faster); a preference runs them on the reference, with the same reason for the skipped kernel."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    from pykernels.ops import lstm as lstm_ops
    if "cpu" not in lstm_ops.LAYER:
        skip_unless_required("the C++ LSTM kernels are not built")
    x = torch.randn(5, 3, 8, dtype=torch.float16)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3, 2])
    for module, arg, why in ((pykernels.nn.LSTM(8, 16, proj_size=4).half(), x, "proj_size > 0 is not covered"),
                             (pykernels.nn.LSTM(8, 16).half(), packed, "packed sequences are not covered")):
        module(arg)
        ran, skipped = pykernels.last_dispatch["lstm"]
        assert ran == "torch" and list(skipped) == ["cpu"] and why in skipped["cpu"], skipped
        assert "measured" not in skipped["cpu"], skipped
        with pykernels.use_backend("cpu"):
            module(arg)
        ran, skipped = pykernels.last_dispatch["lstm"]
        assert ran == "reference" and why in skipped["cpu"], skipped


def test_cpu_without_avx512_fp32_lstm_with_a_gradient_runs_ours(monkeypatch):
    """On an x86 CPU without AVX-512 (simulated on any CPU) OURS_FASTER_DTYPE_AVX2 replaces the fp32 sequence rule:
    automatic calls with a gradient run ours at any batch size, calls without one torch's; other capabilities keep
    OURS_FASTER_DTYPE."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    from pykernels.ops import lstm as lstm_ops
    if "cpu" not in lstm_ops.LAYER:
        skip_unless_required("the C++ LSTM kernels are not built")
    lstm = pykernels.nn.LSTM(5, 7)
    x = torch.randn(6, 40, 5)
    for cap, with_grad in (("AVX2", "cpu"), ("AVX512", "torch"), ("DEFAULT", "torch")):
        monkeypatch.setattr(pykernels._native, "CPU_CAPABILITY", cap)
        lstm(x)
        assert pykernels.last_dispatch["lstm"][0] == with_grad, cap
        with torch.no_grad():
            lstm(x)
        assert pykernels.last_dispatch["lstm"][0] == "torch", cap


def test_lstm_rules_follow_the_isa_of_our_cpu_kernels(monkeypatch):
    """Where torch dispatches at AVX512, the sequence rules measured with our recurrence built for AVX-512
    (OURS_FASTER_DTYPE) hold while its AVX-512 build runs, those measured with the AVX2 one
    (OURS_FASTER_DTYPE_OURS_AVX2) once ours run at AVX2 (PYKERNELS_DISABLE_AVX512=1, no _C_avx512); AVX2-only CPUs
    keep OURS_FASTER_DTYPE_AVX2. The automatic calls follow them."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    from pykernels import _ext
    from pykernels.ops import lstm as lstm_ops
    table = {"AVX512": backends.OURS_FASTER_DTYPE, "AVX2": backends.OURS_FASTER_DTYPE_OURS_AVX2}
    monkeypatch.setattr(pykernels._native, "CPU_CAPABILITY", "AVX512")
    assert backends.OURS_FASTER_DTYPE["lstm"]["cpu"][torch.float32][:2] != \
        backends.OURS_FASTER_DTYPE_OURS_AVX2["lstm"]["cpu"][torch.float32][:2]
    lstm = pykernels.nn.LSTM(5, 7)
    for level in ("AVX512", "AVX2"):
        monkeypatch.setattr(_ext, "cpu_kernels", level)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert backends.ours_faster_dtype("lstm", "cpu", dtype) == table[level]["lstm"]["cpu"][dtype]
        with_grad, without, _ = table[level]["lstm"]["cpu"][torch.float32]
        if "cpu" not in lstm_ops.LAYER:
            continue
        lstm(torch.randn(3, with_grad, 5))
        assert pykernels.last_dispatch["lstm"][0] == "cpu", level
        with torch.no_grad():
            lstm(torch.randn(3, max(without, 1), 5))
        assert pykernels.last_dispatch["lstm"][0] == ("cpu" if without else "torch"), level
    monkeypatch.setattr(pykernels._native, "CPU_CAPABILITY", "AVX2")
    assert backends.ours_faster_dtype("lstm", "cpu", torch.float32) == \
        backends.OURS_FASTER_DTYPE_AVX2["lstm"]["cpu"][torch.float32]


def test_cpu_small_cross_entropy_runs_torch_large_runs_ours(monkeypatch):
    """NATIVE_FASTER_BELOW: below the measured size an automatic CPU call that torch can express is torch's,
    exactly; at and above it, and for calls torch cannot express (z_loss, return_lse, uint8 targets) or explicit
    requests, ours runs."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    with_grad, without = backends.native_below("cross_entropy", "cpu")[:2]
    ce = pykernels.functional.cross_entropy
    x = torch.randn(64, 33, requires_grad=True)
    t = torch.randint(0, 33, (64,))
    t[3] = -100
    w = torch.rand(33)
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}, {"reduction": "none"}):
        ours = ce(x, t, **kw)
        assert pykernels.last_dispatch["cross_entropy"][0] == "torch"
        assert torch.equal(ours, F.cross_entropy(x, t, **kw))
        assert ours.grad_fn is not None
    for kw in ({"z_loss": 1e-3}, {"return_lse": True}, {"backend": "cpu"}):
        ce(x, t, **kw)
        assert pykernels.last_dispatch["cross_entropy"][0] == "cpu", kw
    ce(x, t.clamp(min=0).to(torch.uint8))  # (uint8 cannot hold -100: its 156 is out of range, as in torch)
    assert pykernels.last_dispatch["cross_entropy"][0] == "cpu"
    with pykernels.use_backend("cpu"):
        ce(x, t)
        assert pykernels.last_dispatch["cross_entropy"][0] == "cpu"
    # the sizes: with a gradient, without one (forward only: torch's crossover is higher)
    assert backends.prefer_native("cross_entropy", torch.device("cpu"), None, with_grad - 1, grad=True)
    assert backends.prefer_native("cross_entropy", torch.device("cpu"), None, with_grad, grad=True) is None
    assert backends.prefer_native("cross_entropy", torch.device("cpu"), None, without - 1, grad=False)
    assert backends.prefer_native("cross_entropy", torch.device("cpu"), None, without, grad=False) is None
    big = torch.randn(1, with_grad, 1, requires_grad=True)  # (N, C, d1): class dimension 1
    ce(big, torch.zeros(1, 1, dtype=torch.int64))
    assert pykernels.last_dispatch["cross_entropy"][0] == "cpu"
    assert backends.prefer_native("cross_entropy", CUDA, None, 10) is None  # no rule on CUDA
    with pytest.raises(ValueError, match="target must have shape"):  # our argument checks come first
        ce(x, t[:5])
    # the bound without a gradient per CPU and per level of our kernels: on AVX-512 2^21 logits with ours built for
    # it, 2^22 with ours at AVX2 (torch's 512-bit forward wins longer); 2^20 on AVX2 only
    for cap, ours, bound in (("AVX512", "AVX512", 1 << 21), ("AVX512", "AVX2", 1 << 22), ("AVX2", "AVX2", 1 << 20)):
        monkeypatch.setattr(pykernels._native, "CPU_CAPABILITY", cap)
        monkeypatch.setattr(pykernels._ext, "cpu_kernels", ours)
        assert backends.native_below("cross_entropy", "cpu")[:2] == (1 << 20, bound), (cap, ours)
        for size in (bound - 1, bound):
            native = backends.prefer_native("cross_entropy", torch.device("cpu"), None, size, grad=False)
            assert (native is not None) == (size < bound), (cap, ours, size)


def test_environment_variables_are_read_per_call_without_os_environ_get(monkeypatch):
    """PYKERNELS_BACKEND and PYKERNELS_PREFER_NATIVE are read at each call (README), but not through
    os.environ.get, whose encoded key and caught KeyError for an unset variable cost 1 us a read (backends.getenv):
    an automatic call reads none through os._Environ's accessors, and a variable set or removed in between still
    steers the next call."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    reads = []
    for name in ("__getitem__", "get", "__contains__"):
        original = getattr(type(os.environ), name)
        monkeypatch.setattr(type(os.environ), name,
                            lambda self, *a, _name=name, _f=original: reads.append((_name, a[0])) or _f(self, *a))
    x, t = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
    pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == "torch"
    assert reads == []
    os.environ["PYKERNELS_PREFER_NATIVE"] = "off"  # (monkeypatch restores it: its delenv above recorded it)
    pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == "cpu"
    os.environ["PYKERNELS_BACKEND"] = "reference"
    pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"] == ("reference", {})
    del os.environ["PYKERNELS_BACKEND"], os.environ["PYKERNELS_PREFER_NATIVE"]
    pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == "torch"
    assert [r for r in reads if r[1].startswith("PYKERNELS_")] == []
    monkeypatch.setattr(os, "environ", dict(os.environ, PYKERNELS_BACKEND="reference"))  # a replaced mapping
    pykernels.functional.cross_entropy(x, t)
    assert pykernels.last_dispatch["cross_entropy"][0] == "reference"


@pytest.mark.parametrize("case", ["lstm_cell bf16", "cross_entropy"])
def test_sized_rules_under_compile_with_a_dynamic_batch(case, monkeypatch):
    """The sized rules on a symbolic batch (Dynamo makes it one at the second distinct batch): a SymBool compared
    with a bool raised "BooleanAtom not allowed". Batches across each rule's bound (bf16 lstm_cell's 9 where oneDNN
    has bf16, set here so that AVX2 CPUs test it too; cross-entropy's 2^20 logits) compile and match eager."""
    from pykernels import _native
    torch.manual_seed(0)
    if case == "lstm_cell bf16":
        monkeypatch.setattr(_native, "ONEDNN_DTYPES", frozenset(_native.ONEDNN_DTYPES) | {torch.bfloat16})
        m = pykernels.nn.LSTMCell(8, 16, dtype=torch.bfloat16)
        make = lambda b: (torch.randn(b, 8, dtype=torch.bfloat16, requires_grad=True),)
        batches = (4, 5, 12)
    else:
        m = pykernels.nn.CrossEntropyLoss()
        make = lambda b: (torch.randn(b, 1024, requires_grad=True), torch.randint(0, 1024, (b,)))
        batches = (16, 24, 2048)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager")
    for b in batches:
        args = make(b)
        out = compiled(*args)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        want = m(*[a.detach().requires_grad_(a.requires_grad) for a in args])
        want = want[0] if isinstance(want, tuple) else want
        torch.testing.assert_close(out, want)
    torch._dynamo.reset()


def test_sized_rules_bound_by_size_and_gradient():
    """A sized *_DTYPE rule (with a gradient, without, why): NATIVE tables from that size up, OURS_FASTER_DTYPE up
    to it (a bound of 0: no non-empty batch); an unknown size (None) takes torch's kernel under either; plain reasons
    apply at every known size (an unknown one, e.g. a packed LSTM batch that no kernel covers, stays torch's)."""
    rule = (3, 0, "why")
    native = [backends._sized(rule, s, g, native=True) for s in (0, 2, 3, 9) for g in (True, False)]
    assert native == [None, "why", None, "why", "why", "why", "why", "why"]
    ours = [backends._sized(rule, s, g, native=False) for s in (0, 2, 3, 9) for g in (True, False)]
    assert ours == ["why", "why", "why", None, "why", None, None, None]
    assert backends._sized(rule, None, True, native=True) == "why"
    assert backends._sized(rule, None, True, native=False) is None
    assert backends._sized("plain", 7, False, native=False) == "plain"
    assert backends._sized("plain", None, False, native=False) is None
    assert backends._sized("plain", None, False, native=True) == "plain"
    assert backends._sized(None, 5, True, native=True) is None


def _empty_calls():
    """case -> call(backend) returning (op, leaves, ours, torch's): empty batches, as a data loader's last one,
    through the functional API, a module built with backend= and patch(model, backend=)."""
    pf = pykernels.functional

    def ce(b):
        x, t, w = torch.randn(0, 7, requires_grad=True), torch.randint(0, 7, (0,)), torch.rand(7)
        return "cross_entropy", [x], pf.cross_entropy(x, t, w, backend=b), F.cross_entropy(x, t, w)  # NaN

    def ce_no_class(b):  # probability targets over no class: torch's mean divides 0 by 0 (NaN)
        x = torch.randn(3, 0, requires_grad=True)
        t = torch.randn(3, 0)
        return "cross_entropy", [x], pf.cross_entropy(x, t, backend=b), F.cross_entropy(x, t)

    def ce_module(b):
        x, t = torch.randn(2, 7, 0, requires_grad=True), torch.randint(0, 7, (2, 0))
        kw = dict(reduction="none", label_smoothing=0.1)
        return "cross_entropy", [x], pykernels.nn.CrossEntropyLoss(**kw, backend=b)(x, t), \
            torch.nn.CrossEntropyLoss(**kw)(x, t)

    def lce(b, reduction):
        x, W = torch.randn(0, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
        bias, t = torch.randn(9, requires_grad=True), torch.randint(0, 9, (0,))
        return "linear_cross_entropy", [x, W, bias], \
            pf.linear_cross_entropy(x, W, t, linear_bias=bias, reduction=reduction, backend=b), \
            F.cross_entropy(F.linear(x, W, bias), t, reduction=reduction)

    def sdpa(b, q_shape, kv_shape):
        q = torch.randn(q_shape, requires_grad=True)
        k, v = torch.randn(kv_shape, requires_grad=True), torch.randn(kv_shape, requires_grad=True)
        return "scaled_dot_product_attention", [q, k, v], pf.scaled_dot_product_attention(q, k, v, backend=b), \
            F.scaled_dot_product_attention(q, k, v)

    def varlen(b, offsets):
        q, k, v = (torch.randn(0, 2, 8, requires_grad=True) for _ in range(3))
        cu = torch.tensor(offsets, dtype=torch.int32)
        whole = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return "varlen_attention", [q, k, v], pf.varlen_attention(q, k, v, cu, cu, 0, 0, backend=b), \
            whole.transpose(0, 1)  # (no token: the same as all tokens in one sequence)

    def lstm(b):
        m = torch.nn.LSTM(5, 4, num_layers=2, bidirectional=True)
        x = torch.randn(6, 0, 5, requires_grad=True)
        return "lstm", [x, *m.parameters()], pf.lstm(x, None, list(m._flat_weights), 2, True, backend=b), m(x)

    def cell(b):
        m = torch.nn.LSTMCell(5, 4)
        x = torch.randn(0, 5, requires_grad=True)
        return "lstm_cell", [x, *m.parameters()], pykernels.nn.LSTMCell.from_torch(m, backend=b)(x), m(x)

    def lstm_patched(b):
        m = torch.nn.LSTM(5, 4, proj_size=2, batch_first=True)
        x = torch.randn(0, 6, 5, requires_grad=True)
        want = m(x)
        return "lstm", [x, *m.parameters()], pykernels.patch(m, backend=b)(x), want

    return {"cross_entropy": ce, "cross_entropy-no-class": ce_no_class, "CrossEntropyLoss": ce_module,
            "linear_cross_entropy-mean": lambda b: lce(b, "mean"), "linear_cross_entropy-sum": lambda b: lce(b, "sum"),
            "sdpa-no-batch": lambda b: sdpa(b, (0, 2, 4, 8), (0, 2, 3, 8)),
            "sdpa-no-query": lambda b: sdpa(b, (1, 2, 0, 8), (1, 2, 3, 8)),
            "sdpa-no-key": lambda b: sdpa(b, (1, 2, 4, 8), (1, 2, 0, 8)),
            "varlen-no-sequence": lambda b: varlen(b, [0]), "varlen-no-token": lambda b: varlen(b, [0, 0, 0]),
            "lstm": lstm, "patch-LSTM": lstm_patched, "lstm_cell": cell}


EMPTY_CALLS = _empty_calls()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("case", list(EMPTY_CALLS))
def test_empty_call_under_a_hard_request_is_torchs(case, backend):
    """An empty call needs no kernel: under a hard request too (backend=, a module's or patch()'s backend) the
    reference answers it, visibly in last_dispatch, with torch's result (shapes, dtype, NaN mean, grad_fn) and
    gradients (it raised BackendUnavailableError "empty input", crashing a model on an empty last batch)."""
    from torch.utils._pytree import tree_leaves

    from conftest import require_backend
    require_backend(backend, "cpu")
    op, leaves, ours, theirs = EMPTY_CALLS[case](backend)
    assert pykernels.last_dispatch[op] == ("reference", {} if backend == "reference" else {backend: "empty input"})
    ours, theirs = tree_leaves(ours), tree_leaves(theirs)
    assert len(ours) == len(theirs)
    for a, r in zip(ours, theirs):
        assert (a.shape, a.dtype, a.requires_grad) == (r.shape, r.dtype, r.requires_grad), case
        torch.testing.assert_close(a, r, rtol=0, atol=0, equal_nan=True)

    def grads(outs):
        got = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got)]
    for g, w in zip(grads(ours), grads(theirs)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_gemm_dtype_rule(monkeypatch):
    """The dtype our CPU GEMMs run in (C++ twin csrc/cpu/gemm_dtype.h): fp16 always fp32, bf16 fp32 unless oneDNN has
    bf16 GEMMs, fp32 / fp64 their own; tensors off the CPU their own."""
    from pykernels import _native
    h, b, f, d = (torch.empty(2, dtype=t) for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    assert _native.gemm_dtype(f) == torch.float32 and _native.gemm_dtype(d) == torch.float64
    for onednn in (frozenset(), frozenset({torch.bfloat16, torch.float16})):
        monkeypatch.setattr(_native, "ONEDNN_DTYPES", onednn)
        assert _native.gemm_dtype(h) == torch.float32, onednn  # (torch's fp16 GEMMs measured 5-100x slower)
        assert _native.gemm_dtype(b) == (torch.bfloat16 if onednn else torch.float32), onednn
    for t in (torch.float16, torch.bfloat16):
        assert _native.gemm_dtype(torch.empty(2, dtype=t, device="meta")) == t

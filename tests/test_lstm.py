"""pykernels.functional.lstm_cell / lstm and pykernels.nn.LSTMCell / LSTM against torch.nn.LSTMCell / LSTM.

Every backend of the CPU tier (reference, C++ cpu, Triton under the interpreter) and, marked gpu, the GPU tier.
Outputs and the gradients of the input, the states and every parameter are checked with the error rule against
torch in float64 (pykernels.testing.assert_error_rule). Shapes are odd and tiny: the interpreter is slow.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import pykernels
from pykernels.functional import lstm_cell
from pykernels.testing import assert_error_rule, python_calls

from conftest import backend_params
from conftest import require_backend as _require_backend

F64 = torch.float64


def _layer_backends():
    """Backends with a sequence kernel: reference and triton always; cpu/cuda when pykernels.ops.lstm registers
    one (cpu does, csrc/cpu/lstm_layer.cpp; cuda has the cell only, the layer then runs on the next backend)."""
    from pykernels.ops import lstm as ops
    return [p for p in backend_params() if p.values[0] in ("reference", "triton") or p.values[0] in ops.LAYER]


LAYER_BACKENDS = _layer_backends()


def require_backend(backend, device):
    """conftest's rule, plus: the C++ backends must carry the LSTM ops (an extension built before csrc/lstm.cpp
    existed does not)."""
    _require_backend(backend, device)
    from pykernels.ops import lstm as ops
    if backend in ("cpu", "cuda") and backend not in ops.CELL:
        if os.environ.get("PYKERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail(ops.cpp_error)
        pytest.skip(ops.cpp_error)


def _dtypes(backend, device):
    if backend == "reference":
        return [torch.float32]
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]  # the interpreter's bf16 dot is wrong (TOOLCHAIN.md)


def _grads(outs, leaves, gouts):
    return torch.autograd.grad(outs, leaves, gouts, allow_unused=True)


def _check_all(name, outs, ref_outs, base_outs, grads, ref_grads, base_grads, dtype, factor=2.0):
    for k, (o, r, b) in enumerate(zip(outs, ref_outs, base_outs)):
        assert_error_rule(f"{name} out{k}", o, r, b, dtype=dtype, factor=factor)
    for k, (g, r, b) in enumerate(zip(grads, ref_grads, base_grads)):
        assert g is not None, f"{name}: gradient {k} missing"
        assert_error_rule(f"{name} grad{k}", g, r, b, dtype=dtype, factor=factor)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("bias", [True, False])
def test_cell_against_torch(backend, device, bias):
    require_backend(backend, device)
    B, I, H = 5, 7, 11
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=F64, device=device)
    x = torch.randn(B, I, dtype=F64, device=device)
    h = torch.randn(B, H, dtype=F64, device=device)
    c = torch.randn(B, H, dtype=F64, device=device)
    leaves64 = [x, h, c] + list(cell.parameters())
    leaves64 = [t.detach().requires_grad_() for t in leaves64]
    gouts = [torch.randn(B, H, dtype=F64, device=device) for _ in range(2)]
    ref = torch._VF.lstm_cell(leaves64[0], (leaves64[1], leaves64[2]), *leaves64[3:])
    ref_g = _grads(ref, leaves64, gouts)
    for dtype in _dtypes(backend, device):
        lv = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        base = torch._VF.lstm_cell(lv[0], (lv[1], lv[2]), *lv[3:])
        base_g = _grads(base, lv, [g.to(dtype) for g in gouts])
        lv2 = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        out = lstm_cell(lv2[0], (lv2[1], lv2[2]), *lv2[3:], backend=backend)
        assert out[0].dtype == dtype and out[1].dtype == dtype
        g = _grads(out, lv2, [g.to(dtype) for g in gouts])
        _check_all(f"{backend} {dtype}", out, ref, base, g, ref_g, base_g, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_small_activations_keep_relative_accuracy(backend, device):
    """Gates and cell state near 0 (inputs ~1e-5, no bias): the errors must scale with the values, as torch's.
    A tanh through 1 - 2 / (e^{2x} + 1) has an absolute error of ulp(1): a relative error of 1e-2 here."""
    require_backend(backend, device)
    cell = torch.nn.LSTMCell(4, 8, bias=False, dtype=F64, device=device)
    x = 1e-5 * torch.randn(3, 4, dtype=F64, device=device)
    w = [p.detach().float() for p in cell.parameters()]
    ref = cell(x)
    base = torch._VF.lstm_cell(x.float(), (torch.zeros(3, 8, device=device),) * 2, *w)
    out = lstm_cell(x.float(), None, *w, backend=backend)
    for name, o, r, b in zip("hc", out, ref, base):
        assert_error_rule(name, o, r, b, floor=2 ** -22 * r.abs().max().item())
    layer = torch.nn.LSTM(4, 8, bias=False, dtype=F64, device=device)
    xs = 1e-5 * torch.randn(5, 2, 4, dtype=F64, device=device)
    ref = layer(xs)[0]
    base = copy.deepcopy(layer).float()(xs.float())[0]
    if backend in [p.values[0] for p in LAYER_BACKENDS]:
        out = pykernels.functional.lstm(xs.float(), None, [p.detach().float() for p in layer._flat_weights],
                                        has_biases=False, backend=backend)[0]
        assert_error_rule("output", out, ref, base, floor=2 ** -22 * ref.abs().max().item())


@pytest.mark.parametrize("backend,device", backend_params())
def test_cell_unbatched_default_state_and_one_output_used(backend, device):
    require_backend(backend, device)
    cell = torch.nn.LSTMCell(3, 6, dtype=F64, device=device)
    x = torch.randn(3, dtype=F64, device=device)
    dt = torch.float32
    w = [p.detach().to(dt) for p in cell.parameters()]
    h, c = lstm_cell(x.to(dt), None, *w, backend=backend)
    rh, rc = cell(x)
    assert h.shape == (6,) and c.shape == (6,)
    assert_error_rule("h", h, rh, dtype=dt, floor=1e-5)
    assert_error_rule("c", c, rc, dtype=dt, floor=1e-5)
    # only c used downstream (h's gradient is None inside the backward), then only h
    xs = torch.randn(4, 3, dtype=F64, device=device)
    hs, cs = torch.randn(4, 6, dtype=F64, device=device), torch.randn(4, 6, dtype=F64, device=device)
    for pick in (0, 1):
        lv = [t.to(dt).requires_grad_() for t in (xs, hs, cs)]
        out = lstm_cell(lv[0], (lv[1], lv[2]), *w, backend=backend)
        g = torch.autograd.grad(out[pick].sum(), lv)
        lr = [t.clone().requires_grad_() for t in (xs, hs, cs)]
        rout = cell(lr[0], (lr[1], lr[2]))
        rg = torch.autograd.grad(rout[pick].sum(), lr)
        for a, r in zip(g, rg):
            assert_error_rule(f"grad via output {pick}", a, r, dtype=dt, floor=1e-5)


def test_cell_bad_arguments_name_the_argument():
    x = torch.randn(2, 3)
    w_ih, w_hh = torch.randn(8, 3), torch.randn(8, 2)
    h = c = torch.randn(2, 2)
    with pytest.raises(ValueError, match="input has inconsistent input_size"):
        lstm_cell(x, (h, c), torch.randn(8, 4), w_hh)
    with pytest.raises(ValueError, match="w_ih"):
        lstm_cell(x, (h, c), torch.randn(7, 3), w_hh)
    with pytest.raises(ValueError, match="w_hh"):
        lstm_cell(x, (h, c), w_ih, torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"w_ih must have shape \(8, 3\)"):  # hidden_size is w_hh's, as torch's
        lstm_cell(x, (h, c), torch.randn(12, 3), w_hh)
    with pytest.raises(ValueError, match=r"w_hh must have shape .*got \(6, 2\)"):  # w_ih agreeing with a wrong w_hh
        lstm_cell(x, (h, c), torch.randn(6, 3), torch.randn(6, 2))
    # a (1, 4H) bias broadcasts in torch's cell: the same values and the row's gradient
    rows = [torch.randn(1, 8, requires_grad=True) for _ in range(2)]
    got, want = lstm_cell(x, (h, c), w_ih, w_hh, *rows), torch.lstm_cell(x, (h, c), w_ih, w_hh, *rows)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got[1].sum(), rows), torch.autograd.grad(want[1].sum(), rows))
    with pytest.raises(ValueError, match=r"hx\[1\]"):
        lstm_cell(x, (h, torch.randn(3, 2)), w_ih, w_hh)
    with pytest.raises(TypeError, match="w_hh"):
        lstm_cell(x, (h, c), w_ih, w_hh.double())
    for b in ((torch.randn(8), None), (None, torch.randn(8))):  # the reference oracle takes one bias alone too
        torch.testing.assert_close(pykernels.reference.lstm.lstm_cell(x, h, c, w_ih, w_hh, *b),
                                   torch.lstm_cell(x, (h, c), w_ih, w_hh, *b))
    # torch's cell takes one bias alone (the other is 0), and raises RuntimeError for these: ours are both
    for b in ((torch.randn(8, requires_grad=True), None), (None, torch.randn(8, requires_grad=True))):
        got, want = lstm_cell(x, (h, c), w_ih, w_hh, *b), torch.lstm_cell(x, (h, c), w_ih, w_hh, *b)
        torch.testing.assert_close(got, want)
        gb = torch.autograd.grad(got[0].sum(), [t for t in b if t is not None])
        torch.testing.assert_close(gb, torch.autograd.grad(want[0].sum(), [t for t in b if t is not None]))
    for bad, match in (((x, (h, torch.randn(3, 2)), w_ih, w_hh), r"hx\[1\]"),
                       ((x, (h, c), w_ih, w_hh.double()), "w_hh"),
                       ((x, (h, c, c), w_ih, w_hh), "hx must be a tuple"), ((x, (h[0], c), w_ih, w_hh), r"hx\[0\]")):
        with pytest.raises(RuntimeError, match=match):  # (ours are also ValueError / TypeError)
            lstm_cell(*bad)
    with pytest.raises(ValueError, match="b_hh"):
        lstm_cell(x, (h, c), w_ih, w_hh, torch.randn(8), torch.randn(7))
    with pytest.raises(ValueError, match="input"):
        lstm_cell(torch.randn(2, 2, 3), (h, c), w_ih, w_hh)
    with pytest.raises(pykernels.BackendUnavailableError, match="triton"):
        lstm_cell(x.double(), (h.double(), c.double()), w_ih.double(), w_hh.double(), backend="triton")


# ---------------------------------------------------------------------------------------------------------
# The layer.

LAYER_CASES = [
    # (T, B, I, H, num_layers, bidirectional, batch_first, bias)
    (1, 3, 4, 5, 1, False, False, True),
    (5, 3, 4, 5, 2, True, False, True),
    (4, 2, 3, 6, 1, True, True, False),
    (3, 17, 5, 9, 2, False, True, True),
]


def _torch_and_ours(backend, device, dtype, *args, **kwargs):
    ref = torch.nn.LSTM(*args, dtype=F64, device=device, **kwargs)
    ours = pykernels.nn.LSTM(*args, dtype=dtype, device=device, backend=backend, **kwargs)
    base = torch.nn.LSTM(*args, dtype=dtype, device=device, **kwargs)
    sd = ref.state_dict()
    ours.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    base.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return ref, ours, base


def _run_module(m, x, hx, gouts):
    out, (h, c) = m(x, hx)
    leaves = [x, hx[0], hx[1]] + list(m.parameters())
    return [out, h, c], _grads([out, h, c], leaves, [g.to(out.dtype) for g in gouts])


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "T{}B{}I{}H{}L{}bi{}bf{}b{}".format(*map(int, c)))
def test_layer_against_torch(backend, device, case):
    require_backend(backend, device)
    T, B, I, H, L, bi, bf, bias = case
    D = 2 if bi else 1
    # CPU tier: fp32 (the interpreter is slow), plus bf16 on the C++ kernels, which have no interpreter bf16 bug
    dtypes = _dtypes(backend, device) if device == "cuda" else [torch.float32] + (
        [torch.bfloat16] if backend == "cpu" else [])
    for dtype in dtypes:
        ref, ours, base = _torch_and_ours(backend, device, dtype, I, H, num_layers=L, bidirectional=bi,
                                          batch_first=bf, bias=bias)
        x = torch.randn((B, T, I) if bf else (T, B, I), dtype=F64, device=device)
        h0 = torch.randn(L * D, B, H, dtype=F64, device=device)
        c0 = torch.randn(L * D, B, H, dtype=F64, device=device)
        gouts = [torch.randn((B, T, D * H) if bf else (T, B, D * H), dtype=F64, device=device),
                 torch.randn(L * D, B, H, dtype=F64, device=device), torch.randn(L * D, B, H, dtype=F64, device=device)]
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        r_out, r_g = _run_module(ref, leaves[0], (leaves[1], leaves[2]), gouts)
        lv = [t.to(dtype).requires_grad_() for t in (x, h0, c0)]
        b_out, b_g = _run_module(base, lv[0], (lv[1], lv[2]), gouts)
        lv = [t.to(dtype).requires_grad_() for t in (x, h0, c0)]
        o_out, o_g = _run_module(ours, lv[0], (lv[1], lv[2]), gouts)
        assert pykernels.last_dispatch["lstm"][0] == backend
        _check_all(f"{backend} {dtype}", o_out, r_out, b_out, o_g, r_g, b_g, dtype, factor=3.0)


def _fp32_errors_vs_torch(backend, device, T, B, I, H, seed, h0=True):
    """(ours, torch's fp32, float64 reference) of out, h_n, c_n and the gradients of x, h0, c0, W_ih, W_hh, b_ih,
    b_hh for a 1-layer fp32 LSTM."""
    torch.manual_seed(seed)
    ref, ours, base = _torch_and_ours(backend, device, torch.float32, I, H)
    x = torch.randn(T, B, I, dtype=F64, device=device)
    hx = [torch.randn(1, B, H, dtype=F64, device=device) for _ in range(2)]
    gouts = [torch.randn(T, B, H, dtype=F64, device=device), torch.randn(1, B, H, dtype=F64, device=device),
             torch.randn(1, B, H, dtype=F64, device=device)]
    runs = []
    for m, dt in ((ours, torch.float32), (base, torch.float32), (ref, F64)):
        lv = [t.to(dt).requires_grad_() for t in (x, *hx)]
        runs.append(_run_module(m, lv[0], (lv[1], lv[2]), gouts))
    assert pykernels.last_dispatch["lstm"][0] == backend
    return runs


# the kernel backends (the reference backend is autograd through plain torch ops: its fp32 GEMMs are torch's)
KERNEL_LAYER_BACKENDS = [p for p in LAYER_BACKENDS if p.values[0] != "reference"]


@pytest.mark.parametrize("backend,device", KERNEL_LAYER_BACKENDS)
def test_layer_fp32_weight_grads_of_long_narrow_gemms(backend, device):
    """dW = dG^T x over K = T*B = 6400 rows with I = H = 4: one fp32 GEMM with so narrow an output accumulates K
    sequentially in the BLAS (8x torch's error before ops/lstm.py _mm_acc K-blocked it). No floor: 2x torch's own
    error (its oneDNN backward accumulates per step)."""
    require_backend(backend, device)
    if backend == "triton" and device == "cpu":
        pytest.skip("100 steps of the interpreted kernels: slow; the GEMMs are the shared _weight_grads")
    (o_out, o_g), (b_out, b_g), (r_out, r_g) = _fp32_errors_vs_torch(backend, device, 100, 64, 4, 4, seed=0)
    for k, name in ((3, "W_ih"), (4, "W_hh"), (0, "x")):
        assert_error_rule(f"{backend} grad {name}", o_g[k], r_g[k], b_g[k], floor=0.0)


@pytest.mark.parametrize("backend,device", KERNEL_LAYER_BACKENDS)
def test_layer_fp32_large_hidden_recurrent_grad(backend, device):
    """dh_{t-1} = dG_t W_hh is a K = 4H sum per unit: one fp32 FMA chain over 4096 terms had 7-10x torch's error in
    dh0 at H = 1024 (csrc/cpu/lstm_layer.cpp bwd_rows, now blocked and pairwise summed; the forward's K = H chain
    likewise, 2-3x). Also dx = dG W_ih with few rows (K = 4H). No floor: 2x torch's own error."""
    require_backend(backend, device)
    if backend == "triton" and device == "cpu":
        pytest.skip("H = 1024 under the interpreter: slow")
    (o_out, o_g), (b_out, b_g), (r_out, r_g) = _fp32_errors_vs_torch(backend, device, 2, 2, 8, 1024, seed=0)
    for k, name in ((1, "h0"), (0, "x")):
        assert_error_rule(f"{backend} grad {name}", o_g[k], r_g[k], b_g[k], floor=0.0)
    assert_error_rule(f"{backend} out", o_out[0], r_out[0], b_out[0], floor=0.0)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.id == "triton-interp"])
def test_layer_split_kernels_path(backend, device, monkeypatch):
    """H above the row-block kernels' limit: the split-over-programs kernels (several programs, odd H) through
    nn.LSTM, both directions, every gradient."""
    require_backend(backend, device)
    from pykernels.triton import lstm_layer as tk
    monkeypatch.setattr(tk, "RESIDENT_MAX", 4)
    assert tk.plan(21, torch.float32, torch.device(device), True).split
    T, B, I, H = 3, 3, 4, 21
    ref, ours, base = _torch_and_ours(backend, device, torch.float32, I, H, bidirectional=True)
    x = torch.randn(T, B, I, dtype=F64)
    h0, c0 = torch.randn(2, B, H, dtype=F64), torch.randn(2, B, H, dtype=F64)
    gouts = [torch.randn(T, B, 2 * H, dtype=F64), torch.randn(2, B, H, dtype=F64), torch.randn(2, B, H, dtype=F64)]
    r_out, r_g = _run_module(ref, *[t.clone().requires_grad_() for t in (x,)], tuple(
        t.clone().requires_grad_() for t in (h0, c0)), gouts)
    lv = [t.float().requires_grad_() for t in (x, h0, c0)]
    b_out, b_g = _run_module(base, lv[0], (lv[1], lv[2]), gouts)
    lv = [t.float().requires_grad_() for t in (x, h0, c0)]
    o_out, o_g = _run_module(ours, lv[0], (lv[1], lv[2]), gouts)
    _check_all("split", o_out, r_out, b_out, o_g, r_g, b_g, torch.float32, factor=3.0)


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
def test_layer_unbatched_default_state_and_only_output_used(backend, device):
    require_backend(backend, device)
    ref, ours, _ = _torch_and_ours(backend, device, torch.float32, 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, dtype=F64, device=device)
    out, (h, c) = ours(x.float().requires_grad_())
    rout, (rh, rc) = ref(x)
    assert out.shape == (4, 10) and h.shape == (4, 5) and c.shape == (4, 5)
    for a, r in ((out, rout), (h, rh), (c, rc)):
        assert_error_rule("unbatched", a, r, dtype=torch.float32, floor=1e-5)
    xg = x.float().requires_grad_()
    g = torch.autograd.grad(ours(xg)[0].sum(), [xg] + list(ours.parameters()))
    xr = x.clone().requires_grad_()
    rg = torch.autograd.grad(ref(xr)[0].sum(), [xr] + list(ref.parameters()))
    for a, r in zip(g, rg):
        assert_error_rule("grad", a, r, dtype=torch.float32, floor=1e-5)
    # an explicit unbatched state (num_layers * 2, H): each layer and direction its own row (mutation review: with
    # one layer and direction a wrong unsqueeze axis gave the same shape)
    h0, c0 = torch.randn(4, 5, dtype=F64, device=device), torch.randn(4, 5, dtype=F64, device=device)
    rout, (rh, rc) = ref(x, (h0, c0))
    for got in (ours(x.float(), (h0.float(), c0.float())),  # the module and the functional API
                pykernels.functional.lstm(x.float(), (h0.float(), c0.float()),
                                          [p.detach() for p in ours._flat_weights], num_layers=2, bidirectional=True,
                                          backend=backend)):
        for a, r in zip((got[0], *got[1]), (rout, rh, rc)):
            assert_error_rule("unbatched with a state", a, r, dtype=torch.float32, floor=1e-5)


def test_layer_empty_batch_and_bad_arguments():
    """B = 0 runs (on the reference, visibly, torch's shapes come back); the functional API checks hx and params
    as nn.LSTM does, naming the argument, where the reference would have broadcast a batch-1 state."""
    m = torch.nn.LSTM(5, 4, num_layers=2, bidirectional=True)
    params = list(m._flat_weights)
    x = torch.randn(6, 0, 5, requires_grad=True)
    out, (h, c) = pykernels.functional.lstm(x, None, params, num_layers=2, bidirectional=True)
    rout, (rh, rc) = m(x)
    assert out.shape == rout.shape and h.shape == rh.shape and c.shape == rc.shape
    ran, skipped = pykernels.last_dispatch["lstm"]
    assert ran == "torch" or (ran == "reference" and "empty input" in skipped.values())
    x = torch.randn(6, 3, 5)
    z = torch.zeros
    cases = [
        ((x, (z(4, 1, 4), z(4, 3, 4)), params), r"hx\[0\] must have shape \(4, 3, 4\)"),
        ((x, (z(4, 3, 4), z(4, 3, 5)), params), r"hx\[1\] must have shape"),
        ((x[None], None, params), "input must be 2-D"),
        ((x, None, params[:5]), "params must hold 16 tensors"),
        ((x[..., :4], None, params), "input has 4 features"),
        # a later layer's weight: the kernels take H from weight_hh_l0 and read the smaller one out of bounds
        ((x, None, params[:5] + [params[5][:, :3]] + params[6:]), r"params\[5\] \(weight_hh_l0_reverse\) must have "
                                                                 r"shape \(16, 4\)"),
        ((x, None, params[:10] + [params[10][:7]] + params[11:]), r"params\[10\] \(bias_ih_l1\) must have shape \(16,\)"),
    ]
    for args, msg in cases:
        for backend in ("reference", None):
            with pytest.raises(ValueError, match=msg):
                pykernels.functional.lstm(*args, num_layers=2, bidirectional=True, backend=backend)
    # dtypes as torch's: a half-precision state or weight used to run (the recurrence rounded h to fp16 each step)
    cases = [((x, (z(4, 3, 4).half(), z(4, 3, 4)), params), r"hx\[0\] has dtype torch.float16"),
             ((x, None, params[:1] + [params[1].double()] + params[2:]), r"params\[1\] \(weight_hh_l0\) has dtype")]
    for args, msg in cases:
        for backend in ("reference", None):
            with pytest.raises(TypeError, match=msg):
                pykernels.functional.lstm(*args, num_layers=2, bidirectional=True, backend=backend)
    with pytest.raises(RuntimeError, match="sequence length 0"):  # torch's exception type
        pykernels.nn.LSTM(5, 4)(torch.randn(0, 3, 5))


def test_valid_call_formats_no_parameter_name():
    """Per-call overhead: a valid call checks each parameter and state with one comparison chain, formatting its
    name (an f-string per tensor) and calling _check_like only for a misfit (whose messages the test above checks),
    and reads autocast's state once."""
    m = pykernels.nn.LSTM(5, 4, num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 5)
    for grad in (True, False):  # (on this CPU the two may take different paths: ours, torch's)
        with torch.set_grad_enabled(grad):
            m(x)
            calls = python_calls(m, x, (torch.zeros(4, 2, 4), torch.zeros(4, 2, 4)))
        assert [c for c in calls if c.endswith(":_check_like")] == [], calls
        assert calls.count("_autocast.py:enabled") == 1, calls


@pytest.mark.parametrize("backend", [None, "reference"])
def test_layer_proj_size_checked_as_torch(backend):
    """proj_size as torch.nn.LSTM checks it (0 <= proj_size < hidden_size, its messages): proj_size == hidden_size
    died in torch's C++ ("MatrixRef ... not divisible") or ran on the reference, proj_size=-1 was reported as a
    params count."""
    H, I = 3, 4
    params = [torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H), torch.randn(H, H)]
    x = torch.randn(5, 2, I)
    with pytest.raises(ValueError, match=r"proj_size has to be smaller than hidden_size \(3"):
        pykernels.functional.lstm(x, None, params, proj_size=H, backend=backend)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="proj_size should be a positive integer or zero"):
            pykernels.functional.lstm(x, None, params[:4], proj_size=bad, backend=backend)
    import numpy as np
    m = torch.nn.LSTM(I, H, proj_size=2)
    out, (h, c) = pykernels.functional.lstm(x, None, list(m._flat_weights), proj_size=np.int64(2), backend=backend)
    rout, (rh, rc) = m(x)
    for a, r in ((out, rout), (h, rh), (c, rc)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
@pytest.mark.parametrize("proj_size,bidirectional", [(2, True), (0, True), (0, False)])
def test_packed_and_projected_sequences(backend, device, proj_size, bidirectional):
    """PackedSequence of mixed (unsorted) lengths and proj_size > 0: correct through the visible reference
    fallback, recorded in last_dispatch."""
    require_backend(backend, device)
    ref, ours, _ = _torch_and_ours(backend, device, torch.float32, 3, 4, num_layers=2, proj_size=proj_size,
                                   bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    lengths = torch.tensor([2, 5, 1, 5, 3])
    x = torch.randn(5, 5, 3, dtype=F64, device=device)
    h0 = torch.randn(2 * D, 5, proj_size or 4, dtype=F64, device=device)
    c0 = torch.randn(2 * D, 5, 4, dtype=F64, device=device)
    xr = x.clone().requires_grad_()
    rp, (rh, rc) = ref(pack_padded_sequence(xr, lengths, enforce_sorted=False), (h0, c0))
    xo = x.float().requires_grad_()
    packed = pack_padded_sequence(xo, lengths, enforce_sorted=False)
    if backend != "reference":  # a hard request names what the kernel does not cover
        with pytest.raises(pykernels.BackendUnavailableError, match="proj_size" if proj_size else "packed"):
            ours(packed, (h0.float(), c0.float()))
    ours.backend = None
    with pykernels.use_backend(backend):  # a preference falls back, visibly
        op, (oh, oc) = ours(packed, (h0.float(), c0.float()))
    assert pykernels.last_dispatch["lstm"][0] == "reference"
    assert backend in pykernels.last_dispatch["lstm"][1] or backend == "reference"
    assert torch.equal(op.batch_sizes, rp.batch_sizes) and torch.equal(op.unsorted_indices, rp.unsorted_indices)
    for a, r in ((op.data, rp.data), (oh, rh), (oc, rc)):
        assert_error_rule("packed", a, r, dtype=torch.float32, floor=1e-5)
    g = torch.autograd.grad(op.data.sum() + oh.sum(), xo)[0]
    rg = torch.autograd.grad(rp.data.sum() + rh.sum(), xr)[0]
    assert_error_rule("packed grad", g, rg, dtype=torch.float32, floor=1e-5)


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
def test_dropout_between_layers(backend, device):
    """Dropout on every layer's output but the last, in training only; the same mask stream as the reference and,
    on the CPU, as torch.nn.LSTM (the reference shares its layer loop with the kernel paths: alone it cannot see a
    dropout on the last layer's output, which would zero about half of it)."""
    require_backend(backend, device)
    theirs = torch.nn.LSTM(3, 4, num_layers=3, dropout=0.5, device=device)
    m = pykernels.nn.LSTM(3, 4, num_layers=3, dropout=0.5, backend=backend, device=device)
    m.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 3, device=device)
    m.eval()
    e1 = m(x)[0]
    torch.testing.assert_close(m(x)[0], e1, rtol=0, atol=0)
    m.train()
    torch.manual_seed(123)
    t1, (h1, c1) = m(x)
    torch.manual_seed(123)
    ref_out, _ = pykernels.reference.lstm.lstm(x, None, m._flat_weights, 3, False, True, 0, False, 0.5, True)
    assert not torch.allclose(t1, e1)
    assert not bool((t1 == 0).any())  # no dropout after the last layer
    assert_error_rule("dropout", t1, ref_out, dtype=torch.float32, floor=1e-5)
    if device == "cpu":  # cuDNN draws its masks its own way
        torch.manual_seed(123)
        want, (wh, wc) = theirs.train()(x)
        for name, a, b in (("out", t1, want), ("h_n", h1, wh), ("c_n", c1, wc)):
            assert_error_rule(f"dropout {name} vs torch", a, b, dtype=torch.float32, floor=1e-5)


def test_state_dict_optimizer_and_patch_both_ways():
    kw = dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True)
    tm = torch.nn.LSTM(3, 4, **kw)
    pm = pykernels.nn.LSTM(3, 4, **kw)
    assert [n for n, _ in tm.named_parameters()] == [n for n, _ in pm.named_parameters()]
    assert [p.shape for p in tm.parameters()] == [p.shape for p in pm.parameters()]
    pm.load_state_dict(tm.state_dict(), strict=True)
    tm2 = torch.nn.LSTM(3, 4, **kw)
    tm2.load_state_dict(pm.state_dict(), strict=True)
    for a, b in zip(tm2.parameters(), tm.parameters()):
        assert torch.equal(a, b)
    assert isinstance(pm, torch.nn.LSTM)
    # An optimizer's state moves between the two modules.
    opt = torch.optim.Adam(tm.parameters(), lr=1e-2)
    tm(torch.randn(2, 3, 3))[0].sum().backward()
    opt.step()
    opt2 = torch.optim.Adam(pm.parameters(), lr=1e-2)
    pm.load_state_dict(tm.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a plain load shares the moment tensors)
    x = torch.randn(2, 3, 3)
    for module, optimizer in ((tm, opt), (pm, opt2)):  # one more step each: the same parameters after
        optimizer.zero_grad()
        module(x)[0].sum().backward()
        optimizer.step()
    for a, b in zip(tm.parameters(), pm.parameters()):
        torch.testing.assert_close(a, b)
    # patch(): the same Parameter objects, so the optimizer built before patching still drives the module
    model = torch.nn.Sequential(torch.nn.LSTMCell(3, 4), torch.nn.Linear(4, 1))
    model.add_module("rnn", torch.nn.LSTM(3, 4))
    params = list(model.parameters())
    patched = pykernels.patch(model)
    assert type(patched[0]) is pykernels.nn.LSTMCell and type(patched.rnn) is pykernels.nn.LSTM
    assert all(a is b for a, b in zip(params, patched.parameters()))
    assert patched.rnn._flat_weights[0] is patched.rnn.weight_ih_l0
    cell = torch.nn.LSTMCell(3, 4, bias=False)
    pc = pykernels.patch(cell)
    assert type(pc) is pykernels.nn.LSTMCell and pc.bias_ih is None and pc.weight_ih is cell.weight_ih
    x = torch.randn(2, 3)
    torch.testing.assert_close(pc(x), cell(x))
    c1 = copy.deepcopy(pm)
    assert isinstance(c1, pykernels.nn.LSTM)


def test_module_cell_drop_in_and_errors():
    tc = torch.nn.LSTMCell(3, 5)
    pc = pykernels.nn.LSTMCell(3, 5)
    pc.load_state_dict(tc.state_dict(), strict=True)
    x = torch.randn(4, 3)
    torch.testing.assert_close(pc(x), tc(x))
    with pytest.raises(ValueError, match="1D or 2D"):
        pc(torch.randn(1, 2, 3))
    with pytest.raises(TypeError, match="hx must be a tuple"):  # torch's TypeError, not a misleading "hx[0] 1D"
        pc(x, torch.zeros(4, 5))
    assert repr(pc) == repr(tc)  # the backend shows when one is asked for, as the other modules'
    assert repr(pykernels.nn.LSTMCell(3, 5, backend="reference")) == "LSTMCell(3, 5, backend='reference')"
    assert repr(pykernels.nn.LSTM(3, 5, batch_first=True, backend="reference")) == \
        "LSTM(3, 5, batch_first=True, backend='reference')"
    pm = pykernels.nn.LSTM(3, 5)
    with pytest.raises(ValueError, match="2D or 3D"):
        pm(torch.randn(3))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        pm(torch.randn(2, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_saved_activation_memory_as_documented(dtype):
    """What autograd keeps for a sequence's backward is what docs/lstm.md ("Activation memory") states: ws in fp32
    (20 bytes) plus the output h per step, batch row and unit (24 bytes in fp32, 22 in 16-bit), and h0, c0. In
    16-bit that is more than torch's CPU nn.LSTM keeps (14): the docs said nothing about it while the README sold the
    16-bit LSTM on speed alone."""
    require_backend("cpu", "cpu")
    T, B, I, H = 7, 3, 5, 12
    m = pykernels.nn.LSTM(I, H).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in [*m.parameters(), x]}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pykernels.use_backend("cpu"):
        m(x)
    per_unit = 20 + x.element_size()
    assert sum(n for p, n in saved.items() if p not in skip) == T * B * H * per_unit + 2 * B * H * x.element_size()
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "lstm.md")) as f:
        docs = " ".join(f.read().split())
    assert "So 24 bytes in fp32 and 22 in fp16 / bf16" in docs


class _Twice(torch.nn.Module):
    def forward(self, w):
        return 2.0 * w


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_parametrized_weight_reaches_the_kernels(backend):
    """nn.LSTM re-reads its flat weights each forward: a parametrized weight (weight_norm, spectral_norm, any
    register_parametrization) is the one used, as in torch.nn.LSTM (dropping the re-read passed: mutation review)."""
    import torch.nn.utils.parametrize as parametrize
    require_backend(backend, "cpu")
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours = pykernels.nn.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        parametrize.register_parametrization(m, "weight_hh_l1_reverse", _Twice())
    x = torch.randn(5, 2, 3)
    want, (wh, wc) = theirs(x)
    got, (gh, gc) = ours(x)
    for a, b in ((got, want), (gh, wh), (gc, wc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cell_unbatched_on_torchs_cell(monkeypatch):
    """An unbatched call that the sized NATIVE_FASTER_DTYPE rule hands to torch's cell returns (H,) states, as
    torch.nn.LSTMCell (today's rule starts above batch 1, so a lowered threshold reaches the path: an unsqueezed
    result passed every test, mutation review)."""
    from pykernels import backends
    rule = backends.NATIVE_FASTER_DTYPE["lstm_cell"]["cpu"][torch.bfloat16]
    monkeypatch.setattr(pykernels._native, "ONEDNN_DTYPES", frozenset({torch.bfloat16, torch.float16}))
    monkeypatch.setitem(backends.NATIVE_FASTER_DTYPE["lstm_cell"]["cpu"], torch.bfloat16, (1, 1, rule[2]))
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("PYKERNELS_PREFER_NATIVE", raising=False)
    cell = torch.nn.LSTMCell(5, 7).bfloat16()
    x = torch.randn(5).bfloat16()
    got = pykernels.functional.lstm_cell(x, None, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert pykernels.last_dispatch["lstm_cell"][0] == "torch"
    want = cell(x)
    assert all(a.shape == (7,) and torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_functional_unbatched_multilayer_states(backend, proj_size):
    """functional.lstm on unbatched (T, I) input with num_layers * D > 1: h_n/c_n are (L*D, H) as torch's, on the
    kernels and on torch's LSTM (the automatic call)."""
    if backend is not None:
        require_backend(backend, "cpu")
    if backend == "cpu" and proj_size:
        pytest.skip("the cpu kernel does not cover proj_size")
    torch.manual_seed(0)
    m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=proj_size)
    x = torch.randn(5, 3)
    h0, c0 = torch.randn(4, proj_size or 4), torch.randn(4, 4)
    for hx in (None, (h0, c0)):
        want, (wh, wc) = m(x, hx)
        got, (gh, gc) = pykernels.functional.lstm(x, hx, list(m._flat_weights), num_layers=2, bidirectional=True,
                                                  proj_size=proj_size, backend=backend)
        assert gh.shape == wh.shape and gc.shape == wc.shape
        for a, b in ((got, want), (gh, wh), (gc, wc)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
def test_layer_parameter_grads_when_input_and_state_need_none(backend, device):
    """The usual training call: the input and the initial state do not require grad, the parameters do. Every
    parameter gets its gradient (the weight GEMMs must not be keyed on the input's or the state's flag)."""
    require_backend(backend, device)
    ref, ours, base = _torch_and_ours(backend, device, torch.float32, 3, 5, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, device=device)
    hx = tuple(torch.randn(2, 2, 5, dtype=F64, device=device) for _ in range(2))
    gout = torch.randn(4, 2, 10, dtype=F64, device=device)
    r = torch.autograd.grad(ref(x, hx)[0], list(ref.parameters()), gout)
    b = torch.autograd.grad(base(x.float(), tuple(h.float() for h in hx))[0], list(base.parameters()), gout.float())
    g = torch.autograd.grad(ours(x.float(), tuple(h.float() for h in hx))[0], list(ours.parameters()), gout.float(),
                            allow_unused=True)
    assert pykernels.last_dispatch["lstm"][0] == backend
    for (name, _), a, rr, bb in zip(ours.named_parameters(), g, r, b):
        assert a is not None, f"{backend}: no gradient for {name}"
        assert_error_rule(f"{backend} grad {name}", a, rr, bb, dtype=torch.float32, factor=3.0)


@pytest.mark.parametrize("backend,device", backend_params())
def test_cell_weight_grads_when_input_and_state_need_none(backend, device):
    """A cell step whose input and state do not require grad (the first step of a loop, hx None, or a state from
    no_grad code): W_ih, W_hh and the biases still get their gradients."""
    require_backend(backend, device)
    cell = torch.nn.LSTMCell(7, 11, dtype=F64, device=device)
    x = torch.randn(5, 7, dtype=F64, device=device)
    hc = (torch.randn(5, 11, dtype=F64, device=device), torch.randn(5, 11, dtype=F64, device=device))
    gouts = [torch.randn(5, 11, dtype=F64, device=device) for _ in range(2)]
    ref = torch.autograd.grad(cell(x, hc), list(cell.parameters()), gouts)
    for dtype in _dtypes(backend, device):
        w = [p.detach().to(dtype).requires_grad_() for p in cell.parameters()]
        base = torch.autograd.grad(torch._VF.lstm_cell(x.to(dtype), tuple(t.to(dtype) for t in hc), *w), w,
                                   [g.to(dtype) for g in gouts])
        w = [p.detach().to(dtype).requires_grad_() for p in cell.parameters()]
        out = lstm_cell(x.to(dtype), tuple(t.to(dtype) for t in hc), *w, backend=backend)
        got = torch.autograd.grad(out, w, [g.to(dtype) for g in gouts], allow_unused=True)
        for k, (a, r, b) in enumerate(zip(got, ref, base)):
            assert a is not None, f"{backend} {dtype}: no gradient for parameter {k}"
            assert_error_rule(f"{backend} {dtype} grad param{k}", a, r, b, dtype=dtype)


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
def test_layer_bias_hh_grad_with_bias_ih_frozen(backend, device):
    """A frozen b_ih (requires_grad False) and a trained b_hh: b_hh still gets its gradient (the bias gradient must
    not be keyed on b_ih's flag alone)."""
    require_backend(backend, device)
    ref, ours, _ = _torch_and_ours(backend, device, torch.float32, 3, 5)
    for m in (ref, ours):
        m.bias_ih_l0.requires_grad_(False)
    x = torch.randn(4, 2, 3, dtype=F64, device=device)
    gout = torch.randn(4, 2, 5, dtype=F64, device=device)
    (r,) = torch.autograd.grad(ref(x)[0], [ref.bias_hh_l0], gout)
    (g,) = torch.autograd.grad(ours(x.float())[0], [ours.bias_hh_l0], gout.float(), allow_unused=True)
    assert pykernels.last_dispatch["lstm"][0] == backend
    assert g is not None, f"{backend}: no gradient for bias_hh_l0"
    assert_error_rule(f"{backend} grad bias_hh_l0", g, r, dtype=torch.float32, floor=1e-5)


@pytest.mark.parametrize("backend,device", [p for p in LAYER_BACKENDS if p.values[1] == "cpu"])
def test_dropout_probability_is_p_not_one_minus_p(backend, device):
    """dropout=p drops a fraction p between layers, as torch.nn.LSTM (same seed, same CPU mask stream): the
    dropout test's p = 0.5 cannot tell p from 1 - p (mutation review)."""
    require_backend(backend, device)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.2, device=device)
    m = pykernels.nn.LSTM(3, 4, num_layers=2, dropout=0.2, backend=backend, device=device)
    m.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 5, 3, device=device)
    torch.manual_seed(11)
    got, (gh, gc) = m(x)
    assert pykernels.last_dispatch["lstm"][0] == backend
    torch.manual_seed(11)
    want, (wh, wc) = theirs(x)
    for name, a, b in (("out", got, want), ("h_n", gh, wh), ("c_n", gc, wc)):
        assert_error_rule(f"dropout 0.2 {name} vs torch", a, b, dtype=torch.float32, floor=1e-5)


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_unbatched_input_with_batch_first(backend, proj_size):
    """Unbatched (T, I) input is (T, I) whatever batch_first says, in the module and the functional API, with and
    without a state; every test of unbatched input had batch_first=False (mutation review: unsqueezing at the
    batch_first axis, or squeezing the output at axis 1, passed; proj_size > 0 takes torch's LSTM in an automatic
    call)."""
    if backend is not None:
        require_backend(backend, "cpu")
    if backend == "cpu" and proj_size:
        pytest.skip("the cpu kernel does not cover proj_size")
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=proj_size)
    theirs = torch.nn.LSTM(3, 4, **kw)
    ours = pykernels.nn.LSTM(3, 4, **kw, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 3)
    h0, c0 = torch.randn(4, proj_size or 4), torch.randn(4, 4)
    for hx in (None, (h0, c0)):
        want, (wh, wc) = theirs(x, hx)
        for got, (gh, gc) in (ours(x, hx),
                              pykernels.functional.lstm(x, hx, list(theirs._flat_weights), **kw, backend=backend)):
            assert got.shape == want.shape == (5, 2 * (proj_size or 4))
            assert gh.shape == wh.shape and gc.shape == wc.shape
            for a, b in ((got, want), (gh, wh), (gc, wc)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_functional_packed_data_ignores_batch_first(backend):
    """functional.lstm on a PackedSequence's data with batch_first=True: the data is (sum(lengths), I) whatever
    batch_first says, as torch's packed LSTM (the module passes batch_first=False for packed input: only a direct
    call reaches the reference's own guard, which dropping passed: mutation review)."""
    torch.manual_seed(0)
    m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]), batch_first=True)
    want, (wh, wc) = m(packed)
    got, (gh, gc) = pykernels.functional.lstm(packed.data, None, list(m._flat_weights), num_layers=2,
                                              bidirectional=True, batch_first=True,
                                              batch_sizes=packed.batch_sizes, backend=backend)
    for a, b in ((got, want.data), (gh, wh), (gc, wc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_module_state_dims_named_as_torch():
    """A state whose tensors' dims do not match the input's: torch.nn.LSTM's messages (with one tensor right and
    the other wrong, or both wrong for unbatched input, dropping the module's check raised only a later size
    message: mutation review)."""
    pm, tm = pykernels.nn.LSTM(3, 4), torch.nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    z = torch.zeros
    cases = [(x, (z(1, 2, 4), z(2, 4)), r"batched 3-D input, hx and cx should also be 3-D but got \(3-D, 2-D\)"),
             (x, (z(2, 4), z(1, 2, 4)), r"batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\)"),
             (x[:, 0], (z(1, 1, 4), z(1, 1, 4)), r"unbatched 2-D input, hx and cx should also be 2-D but got "
                                                  r"\(3-D, 3-D\)"),
             (x[:, 0], (z(1, 4), z(1, 1, 4)), r"unbatched 2-D input, hx and cx should also be 2-D but got "
                                               r"\(2-D, 3-D\)")]
    for inp, hx, msg in cases:
        for m in (tm, pm):
            with pytest.raises(RuntimeError, match=msg):
                m(inp, hx)


@pytest.mark.parametrize("backend,device", backend_params())
def test_cell_unbatched_with_a_state(backend, device):
    """Unbatched (I,) input with an explicit (H,) state, functional and module: (H,) states back, torch's values
    and gradients (the unbatched test passes hx=None; a wrong unsqueeze axis of the state was caught only by the
    fuzz's random draw: mutation review)."""
    require_backend(backend, device)
    cell = torch.nn.LSTMCell(3, 6, dtype=F64, device=device)
    ours = pykernels.nn.LSTMCell(3, 6, device=device, backend=backend)
    ours.load_state_dict({k: v.float() for k, v in cell.state_dict().items()})
    x, h0, c0 = (torch.randn(n, dtype=F64, device=device) for n in (3, 6, 6))
    lr = [t.clone().requires_grad_() for t in (x, h0, c0)]
    rh, rc = cell(lr[0], (lr[1], lr[2]))
    rg = torch.autograd.grad(rh.sum() + 2 * rc.sum(), lr)
    w = [p.detach() for p in ours.parameters()]
    for run in (lambda a, hx: lstm_cell(a, hx, *w, backend=backend), ours):
        lv = [t.float().requires_grad_() for t in (x, h0, c0)]
        h, c = run(lv[0], (lv[1], lv[2]))
        assert h.shape == (6,) and c.shape == (6,)
        g = torch.autograd.grad(h.sum() + 2 * c.sum(), lv)
        for name, a, r in (("h", h, rh), ("c", c, rc), ("dx", g[0], rg[0]), ("dh0", g[1], rg[1]), ("dc0", g[2], rg[2])):
            assert_error_rule(f"unbatched cell {name}", a, r, dtype=torch.float32, floor=1e-5)


@pytest.mark.parametrize("backend,device", LAYER_BACKENDS)
def test_packed_default_state(backend, device):
    """A PackedSequence without hx: zero states in sorted order (the packed test always passes one; a wrong default
    was caught only by the fuzz's random draw: mutation review)."""
    require_backend(backend, device)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, device=device)
    ours = pykernels.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 4, 3, device=device)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 1, 3]), enforce_sorted=False)
    want, (wh, wc) = theirs(packed)
    with pykernels.use_backend(backend):
        got, (gh, gc) = ours(packed)
    for name, a, b in (("out", got.data, want.data), ("h_n", gh, wh), ("c_n", gc, wc)):
        assert_error_rule(f"packed default state {name}", a, b, dtype=torch.float32, floor=1e-5)

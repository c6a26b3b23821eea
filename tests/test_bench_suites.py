"""The attention, linear cross-entropy, LSTM and LSTM-cell benchmark suites on CPU (CI tier, seconds): each fp32
reference against an independent float64 torch computation, the FLOP models on known shapes, default providers
and absence reasons, a wrong provider reported and not timed, and a --quick run's JSON per suite."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import pykernels

from bench import SUITES
from bench import __main__ as cli
from bench import attention, harness, linear_cross_entropy, lstm, lstm_cell, providers, timing

from conftest import require_backend

CPU = torch.device("cpu")
NEW = ("attention", "linear_cross_entropy", "lstm", "lstm_cell")
MODULES = {"attention": attention, "linear_cross_entropy": linear_cross_entropy, "lstm": lstm,
           "lstm_cell": lstm_cell}
# a tiny shape per suite, and a provider that is wrong in both modes (the wrong mask, a scaled loss, swapped states)
TINY = {"attention": {"B": 1, "H": 2, "L": 48, "E": 16, "causal": 1},
        "linear_cross_entropy": {"N": 40, "H": 24, "V": 300},
        "lstm": {"T": 5, "B": 3, "I": 7, "H": 6},
        "lstm_cell": {"B": 3, "I": 7, "H": 6}}
WRONG = {"attention": lambda q, k, v, causal, *varlen: F.scaled_dot_product_attention(q, k, v, is_causal=not causal),
         "linear_cross_entropy": lambda x, W, t: linear_cross_entropy.torch_lce(x, W, t) * 1.01,
         "lstm": lambda x, h0, c0, *w: lstm.torch_lstm(x, c0, h0, *w),
         "lstm_cell": lambda x, h, c, *w: lstm_cell.torch_lstm_cell(x, c, h, *w)}


def _f64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


def test_suites_registered():
    assert set(NEW) | {"cross_entropy", "e2e"} == set(SUITES)  # e2e: tests/test_bench_e2e.py
    for name, mod in MODULES.items():
        assert mod.NAME == name and mod.MODES[:2] == ("fwd+bwd", "fwd")
    assert attention.MODES == ("fwd+bwd", "fwd", "bwd")  # the backward alone: tests/test_bench.py


def test_attention_reference_matches_float64_sdpa():
    q, k, v, g = (torch.randn(2, 3, 40, 16) for _ in range(4))
    for causal in (False, True):
        # chunk_bytes below one head's scores: one (batch, head) per chunk
        ref = attention.reference_attention(q, k, v, g, causal, chunk_bytes=1)
        q64, k64, v64 = _f64(q, k, v)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
        expect = (out,) + torch.autograd.grad(out, (q64, k64, v64), g.double())
        for r, e in zip(ref, expect):
            assert r.dtype == torch.float32 and torch.allclose(r.double(), e, atol=1e-5), causal


def test_linear_cross_entropy_reference_matches_float64():
    x, W = torch.randn(37, 24), torch.randn(300, 24) * 0.3
    t = torch.randint(0, 300, (37,))
    t[::5] = -100
    loss, dx, dW = linear_cross_entropy.reference_lce(x, W, t, chunk_bytes=4 * 300 * 8)  # 8-row chunks
    x64, W64 = _f64(x, W)
    expect = F.cross_entropy(x64 @ W64.t(), t)
    ex, eW = torch.autograd.grad(expect, (x64, W64))
    assert torch.allclose(loss.double(), expect, rtol=1e-6)
    assert torch.allclose(dx.double(), ex, atol=1e-6) and torch.allclose(dW.double(), eW, atol=1e-6)


def test_lstm_references_match_float64_torch_modules():
    T, B, I, H = 6, 3, 5, 4
    m = torch.nn.LSTM(I, H).double()
    x, h0, c0, g = torch.randn(T, B, I), torch.randn(1, B, H), torch.randn(1, B, H), torch.randn(T, B, H)
    ref = lstm.reference_lstm(x, h0, c0, *m._flat_weights, g)
    x64, h64, c64 = _f64(x, h0, c0)
    out, (h_n, c_n) = m(x64, (h64, c64))
    expect = (out, h_n, c_n) + torch.autograd.grad(out, (x64, h64, c64, *m._flat_weights), g.double())
    assert len(ref) == len(expect) == 10
    for r, e in zip(ref, expect):
        assert torch.allclose(r.double(), e, atol=1e-5)

    cell = torch.nn.LSTMCell(I, H).double()
    case = lstm_cell.LSTMCellCase(B, I, H, torch.float32, CPU)
    args, diff = case.inputs()
    xc, hc, cc = _f64(*args[:3])
    with torch.no_grad():
        for p, w in zip(cell.parameters(), args[3:]):
            p.copy_(w)
    hy, cy = cell(xc, (hc, cc))
    expect = (hy, cy) + torch.autograd.grad((hy, cy), (xc, hc, cc, *cell.parameters()),
                                            (case.grad_h.double(), case.grad_c.double()))
    ref = case.reference(args)
    assert diff == tuple(range(7)) and len(ref) == len(expect) == 9
    for r, e in zip(ref, expect):
        assert r.shape == e.shape and torch.allclose(r.double(), e, atol=1e-5)


def test_flop_models():
    # attention: QK^T and PV, 2 * L * L * E FLOPs each per (batch, head); causal halves it; backward 2.5x more
    assert attention.flops(8, 16, 1024, 64, False, "fwd") == 34_359_738_368
    assert attention.flops(8, 16, 1024, 64, True, "fwd") == 17_179_869_184
    assert attention.flops(8, 16, 1024, 64, False, "fwd+bwd") == 3.5 * 34_359_738_368
    case = attention.cases(CPU, torch.float32, False, {"B": 8, "H": 16, "L": 1024, "E": 64, "causal": 1})[0]
    assert case.flops("fwd") == 17_179_869_184 and case.bytes("fwd") is None
    # linear CE: the logits GEMM forward, plus dx and dW backward
    assert linear_cross_entropy.flops(8192, 2048, 128256, "fwd") == 4_303_557_230_592
    assert linear_cross_entropy.flops(8192, 2048, 128256, "fwd+bwd") == 3 * 4_303_557_230_592
    # LSTM: 4H gates from the (I + H) inputs, 2 FLOPs per multiply-add, per step; the cell is one step
    assert lstm.flops(128, 64, 256, 256, "fwd") == 128 * 2 * 64 * (4 * 256) * (256 + 256) == 8_589_934_592
    assert lstm.flops(128, 64, 256, 256, "fwd+bwd") == 3 * 8_589_934_592
    assert lstm_cell.LSTMCellCase(64, 256, 256, torch.float32, CPU).flops("fwd") == 8_589_934_592 / 128


def test_default_providers_and_absence_reasons():
    built = pykernels.available_backends("cpu")["cpu"] is None
    for name, mod in MODULES.items():
        provs = {p.name: p for p in mod.providers(CPU, torch.float32)}
        default = {n for n, p in provs.items() if p.default and not p.baseline}
        if name in ("lstm_cell", "lstm", "linear_cross_entropy"):  # C++ kernels are the CPU backend
            assert default == {"pykernels-cpu"}
            if name == "linear_cross_entropy":  # its split path, on request
                assert provs["pykernels-cpu-split"].absent == provs["pykernels-cpu"].absent
        else:  # no CPU kernel of attention: the reference is what an automatic call runs on CPU
            assert default == {"pykernels-reference"}
            assert provs["pykernels-cpu"].absent == ("no cpu kernel of this op" if built else
                                                     pykernels.available_backends("cpu")["cpu"])
        assert provs["pykernels-cuda"].absent and provs["torch"].baseline and not provs["torch"].absent
    att = {p.name: p for p in attention.providers(CPU, torch.float32)}
    # the cuda backend on its mma.sync kernels: on request only, absent wherever the cuda backend is
    assert not att["pykernels-cuda-mma-sync"].default
    assert att["pykernels-cuda-mma-sync"].absent == att["pykernels-cuda"].absent
    for n in ("sdpa-efficient", "sdpa-cudnn", "flex_attention", "flash-attn"):
        assert "CUDA only" in att[n].absent and att[n].fn is None
    assert att["sdpa-math"].fn is not None
    lce = {p.name for p in linear_cross_entropy.providers(CPU, torch.float32)}
    assert {"torch.compile", "torch-chunked", "torch.linear_cross_entropy", "liger", "cut-cross-entropy"} <= lce


def test_peer_absent_unless_importable():
    cpu = providers.peer("p", CPU, lambda: 1 / 0)
    assert cpu.absent == "p runs on CUDA only" and cpu.baseline
    broken = providers.peer("p", CPU, lambda: __import__("no_such_module_xyz"), cuda_only=False)
    assert broken.fn is None and "not importable: ModuleNotFoundError" in broken.absent


def test_errors_are_chunked_and_nan_is_wrong():
    ref = torch.randn(10, 3)
    out = ref.clone()
    out[7, 1] += 0.5
    assert providers.max_abs_diff(out, ref, chunk_bytes=12) == pytest.approx(0.5)  # one row per chunk
    out[2, 0] = float("nan")
    assert providers.max_abs_diff(out, ref, chunk_bytes=12) != providers.max_abs_diff(out, ref, chunk_bytes=12)
    assert not providers.normalised_errors([(out, ref)])[1] <= 1.0  # the harness's test: NaN fails it
    assert providers.normalised_errors([(None, ref)]) == (float("inf"), float("inf"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        providers.tolerance(torch.int32)


@pytest.mark.parametrize("name", NEW)
def test_wrong_provider_is_reported_not_timed(monkeypatch, name):
    mod = MODULES[name]
    timed = []
    stub = timing.Timing(1.0, 1.0, 1.0, None, [1.0])
    monkeypatch.setattr(harness, "time_interleaved",  # CPU: a case's providers are timed interleaved
                        lambda fns, *a, **k: timed.extend(fns) or [stub] * len(fns))
    torch_p = next(p for p in mod.providers(CPU, torch.float32) if p.name == "torch")
    provs = [harness.Provider("wrong", WRONG[name]), torch_p]
    rs = harness.run_suite(mod, CPU, torch.float32, True, provs, mod.cases(CPU, torch.float32, True, TINY[name]),
                           mod.MODES)
    by = {(r.provider, r.mode): r for r in rs}
    for mode in mod.MODES:
        assert by["wrong", mode].status == "wrong" and by["wrong", mode].ms_p50 is None
        assert by["wrong", mode].rel_err > 1e-5 and by["wrong", mode].max_abs_err > 0  # recorded, not only in text
        assert by["torch", mode].status == "ok", by["torch", mode].error
        assert by["torch", mode].rel_err < 1e-5
    assert len(timed) == len(mod.MODES)  # torch in every mode only


@pytest.mark.skipif(not pykernels.backends.triton_interpreted(), reason="Triton runs on CPU only under "
                    "TRITON_INTERPRET=1 (as CI runs)")
@pytest.mark.parametrize("name", NEW)
def test_triton_provider_is_correct_under_the_interpreter(name):
    # the provider the GPU runs time, called as they call it: any convention mismatch shows here, without a GPU
    require_backend("triton", "cpu")
    mod = MODULES[name]
    prov = next(p for p in mod.providers(CPU, torch.float32) if p.name == "pykernels-triton")
    assert prov.absent is None and not prov.default  # the interpreter is for checking, not benchmarking
    (case,) = mod.cases(CPU, torch.float32, True, TINY[name])
    args, diff = case.inputs()
    ref = case.reference(args)
    for mode in mod.MODES:
        _, _, (_, rel) = harness.prepare(case, prov, mode, args, diff, ref)  # raises WrongOutput when off
        assert rel < 1e-5, mode


@pytest.mark.parametrize("name", NEW)
def test_quick_cli_run(tmp_path, capsys, name):
    # --baselines torch: torch.compile's CPU compile takes tens of seconds, too long for CI
    assert cli.main(["--suite", name, "--quick", "--device", "cpu", "--no-plots", "--baselines", "torch",
                     "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("CPU run")
    (path,) = tmp_path.glob(f"cpu-{name}-*.json")
    rs = json.loads(path.read_text())["results"]
    mod = MODULES[name]
    default = {p.name for p in mod.providers(CPU, torch.float32) if p.default and not p.baseline}
    assert {(r["provider"], r["mode"]) for r in rs} == {(p, m) for p in default | {"torch"} for m in mod.MODES}
    kernel_ok = pykernels.available_backends("cpu")["cpu"] is None or default == {"pykernels-reference"}
    for r in rs:
        want = "ok" if kernel_ok or r["provider"] == "torch" else "absent"  # extension not built
        assert r["status"] == want and r["suite"] == name, r["error"]
        if want == "ok":
            assert r["tflops"] > 0 and r["ms_p50"] > 0 and r["rel_err"] <= mod.tolerance(torch.float32)


def test_shape_needs_exactly_one_suite(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--suite", "attention", "lstm", "--shape", "T=4,B=2,I=3,H=3", "--device", "cpu"])
    assert "pass exactly one --suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the default is every suite
        cli.main(["--shape", "N=4,V=8", "--device", "cpu"])


def test_cuda_mma_sync_provider_switches_the_hopper_kernels_off_for_its_call_only(monkeypatch):
    import os
    seen = []
    monkeypatch.setattr(attention, "_pykernels",
                        lambda b: (lambda *a: seen.append((b, os.environ.get("PYKERNELS_ATTN_NO_SM90A")))))
    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv("PYKERNELS_ATTN_NO_SM90A", raising=False)
        else:
            monkeypatch.setenv("PYKERNELS_ATTN_NO_SM90A", before)
        prov = attention._cuda_mma_sync([harness.Provider("pykernels-cuda", None, None)])
        prov.fn(1, 2, 3, True)
        assert seen[-1] == ("cuda", "1") and os.environ.get("PYKERNELS_ATTN_NO_SM90A") == before

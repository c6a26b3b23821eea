"""The AVX-512 CPU library pykernels._C_avx512 (csrc/cpu/avx512/): built next to _C on x86-64, registered into _C at
import where torch itself dispatches at AVX512, and kept from every other library. Its kernels' results are tested
by the kernel tests at both levels (conftest.cpu_kernel_level)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import pykernels
from conftest import fresh_python
from pykernels import _cpuinfo, _ext, _native

if not _ext.loaded():
    if os.environ.get("PYKERNELS_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"pykernels._C must load in this run: {_ext.load_error}")
    pytest.skip(f"pykernels._C unavailable: {_ext.load_error}", allow_module_level=True)

BASE = "AVX2" if _ext.build_info.get("cpu_capability") == "avx2" else "DEFAULT"
CHOSEN = _ext.cpu_kernels == "AVX512"  # what the import chose (tests restore it)
BUILT = "avx512" in _ext.build_info.get("wide_cpu_libraries", [])
# Which kernels a 512-bit-capable disassembly shows: zmm registers, mask registers, the upper 16 xmm / ymm ones
# (EVEX encodings only), each only in AVX-512 code.
EVEX_OPERAND = ("%zmm", "%k1", "%k2", "%k3", "%k4", "%k5", "%k6", "%k7") + tuple(
    f"mm{i}" for i in range(16, 32))


@pytest.fixture
def restore_choice():
    """(Request it before monkeypatch: it must restore after monkeypatch's undo.)"""
    yield
    _ext.set_wide_kernels(True)  # as the import (False would replace the reason they are not used by "switched off")
    assert (_ext.cpu_kernels == "AVX512") == CHOSEN, _ext.wide_error


def wide_library():
    paths = _ext._libraries(this_python_only=True, name="_C_avx512")
    return paths[0] if paths else None


def test_built_on_x86_64():
    """A build on x86-64 always has it (the compiler needs no AVX-512 CPU), so wheels built anywhere carry it."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 only")
    assert BUILT and wide_library() is not None, _ext.build_info


def test_registered_exactly_where_torch_dispatches_at_avx512():
    reason = _ext._wide_reason()
    expected = BUILT and _cpuinfo.has_avx512() and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert (reason is None) == expected, reason
    info = pykernels.build_info()
    if expected:
        assert info["cpu_kernels"] == "AVX512" and info["cpu_kernels_note"] is None
        wide = ctypes.CDLL(str(wide_library()))  # the loaded library: the same handle
        for name in _ext._WIDE_KERNELS:
            assert _ext.wide_kernel(name) == ctypes.cast(getattr(wide, "pykernels_" + name), ctypes.c_void_p).value
    else:
        assert info["cpu_kernels"] == BASE and info["cpu_kernels_note"] == reason
        assert all(_ext.wide_kernel(name) is None for name in _ext._WIDE_KERNELS)


def test_the_wide_library_stays_out_of_the_global_namespace():
    """Loaded RTLD_LOCAL: no other library can bind to its symbols, among them its AVX-512 copies of inline
    functions of torch's and the standard library's headers, which would crash a later call on a CPU without it."""
    if not CHOSEN:
        pytest.skip(f"the AVX-512 library is not in use here: {_ext.wide_error}")
    everything = ctypes.CDLL(None)
    assert not hasattr(everything, "pykernels_cross_entropy_rows")
    assert not hasattr(everything, "pykernels_wide_kernels_abi")
    # also where a program imports extensions RTLD_GLOBAL (some do, for extensions that share symbols)
    out = fresh_python("import os, ctypes; sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW); import pykernels; "
                       "assert pykernels.build_info()['cpu_kernels'] == 'AVX512', pykernels.build_info(); "
                       "print(hasattr(ctypes.CDLL(None), 'pykernels_cross_entropy_rows'))")
    assert out == "False", out


def test_the_wide_library_exports_only_its_entry_points():
    """-fvisibility=hidden: its dynamic symbol table holds the C entry points and nothing compiled for AVX-512 that a
    lookup elsewhere could find."""
    if wide_library() is None or shutil.which("nm") is None:
        pytest.skip("needs the AVX-512 library and nm")
    out = subprocess.run(["nm", "-D", "--defined-only", str(wide_library())], capture_output=True, text=True,
                         check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert names == {"pykernels_wide_kernels_abi"} | {"pykernels_" + k for k in _ext._WIDE_KERNELS}, names


def _text_disassembly(path) -> str:
    return subprocess.run(["objdump", "-d", "-j", ".text", "--no-show-raw-insn", str(path)], capture_output=True,
                          text=True, check=True).stdout


def test_only_the_wide_library_holds_avx512_code():
    """_C runs on any CPU of its build capability: not one EVEX operand in it. The wide library really is 512-bit code
    (its flags reached the compiler)."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    from pykernels import _C
    main = _text_disassembly(_C.__file__)
    found = [op for op in EVEX_OPERAND if op in main]
    assert not found, f"_C holds AVX-512 instructions ({found}): it would die on an AVX2-only CPU"
    if wide_library() is None:
        pytest.skip("no AVX-512 library in this build")
    assert _text_disassembly(wide_library()).count("%zmm") > 100


def test_calls_go_through_the_registered_kernel(restore_choice):
    """_C's cross-entropy runs whatever is registered (here a recorder that computes nothing: the outputs stay as
    the deterministic mode's empty() made them, NaN), and its own kernel again once that is taken out."""
    calls = []
    recorder = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_bool)(lambda args, backward: calls.append(backward))
    main = _ext._main_library()
    x = torch.randn(3, 40, 1)
    t = torch.randint(0, 40, (3,))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert main.pykernels_set_wide_kernel(b"cross_entropy_rows", ctypes.cast(recorder, ctypes.c_void_p)) == 0
        loss, lse, grad, lse_err = torch.ops.pykernels.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, True)
        g = torch.ops.pykernels.cross_entropy_bwd(torch.ones(1), x, t, None, lse, lse_err, -100, 0.0, 0.0)
        assert calls == [False, True]
        assert loss.isnan().all() and grad.isnan().all() and g.isnan().all()
        _ext.set_wide_kernels(False)
        loss, *_ = torch.ops.pykernels.cross_entropy_fwd(x, t, None, None, -100, 0.0, 0.0, True)
        assert calls == [False, True]
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x[..., 0], t, reduction="none"))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert main.pykernels_set_wide_kernel(b"no_such_kernel", None) == -1


def test_lstm_calls_go_through_the_registered_kernels(restore_choice):
    """The LSTM recurrence runs whatever is registered for its forward and backward (recorders that compute nothing:
    the outputs stay NaN), except in float64, which the AVX-512 library does not hold; its own kernels again once
    they are taken out."""
    calls = []
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    rec_fwd, rec_bwd = fn(lambda args: calls.append("fwd")), fn(lambda args: calls.append("bwd"))
    main = _ext._main_library()
    ops = torch.ops.pykernels
    T, B, H = 3, 2, 5
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name, rec in ((b"lstm_layer_fwd", rec_fwd), (b"lstm_layer_bwd", rec_bwd)):
            assert main.pykernels_set_wide_kernel(name, ctypes.cast(rec, ctypes.c_void_p)) == 0
        for dtype, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (torch.float64, torch.float64)):
            xp, w = torch.randn(T, B, 4 * H, dtype=acc), torch.randn(4 * H, H).to(dtype)
            h0 = c0 = torch.zeros(B, H, dtype=dtype)
            out, ws = ops.lstm_layer_fwd(xp, w, h0, c0, False)
            dg, dh, dc = ops.lstm_layer_bwd(torch.ones(T, B, H, dtype=dtype), None, None, c0, ws.nan_to_num(), w, False)
            if dtype == torch.float64:
                assert calls == ["fwd", "bwd"] * 2 and not out.isnan().any() and not dg.isnan().any()
            else:
                assert calls[-2:] == ["fwd", "bwd"] and out.isnan().all() and ws.isnan().all() and dg.isnan().all()
        _ext.set_wide_kernels(False)
        out, _ = ops.lstm_layer_fwd(xp.float(), w.float(), h0.float(), c0.float(), False)
        assert calls == ["fwd", "bwd"] * 2 and not out.isnan().any()
    finally:
        torch.use_deterministic_algorithms(prev)


def test_reasons_come_in_order(restore_choice, monkeypatch):
    """Why the wide kernels are not in use names the first missing condition: the build, the CPU, torch's level,
    the file."""
    monkeypatch.setitem(_ext.build_info, "wide_cpu_libraries", [])
    assert "no _C_avx512" in _ext.set_wide_kernels(True) and _ext.cpu_kernels == BASE
    monkeypatch.setitem(_ext.build_info, "wide_cpu_libraries", ["avx512"])
    monkeypatch.setattr(_cpuinfo, "has_avx512", lambda: False)
    assert "lacks AVX-512" in _ext.set_wide_kernels(True)
    monkeypatch.setattr(_cpuinfo, "has_avx512", lambda: True)
    monkeypatch.setattr(_native, "CPU_CAPABILITY", "AVX2")
    assert "ATEN_CPU_CAPABILITY" in _ext.set_wide_kernels(True)
    monkeypatch.setattr(_native, "CPU_CAPABILITY", "AVX512")
    real = _ext._libraries
    monkeypatch.setattr(_ext, "_libraries", lambda this_python_only=False, name="_C":
                        [] if name == "_C_avx512" else real(this_python_only, name))
    assert "missing" in _ext.set_wide_kernels(True) and _ext.cpu_kernels == BASE
    assert _ext.wide_kernel("cross_entropy_rows") is None
    assert "switched off" in _ext.set_wide_kernels(False)
    monkeypatch.setenv("PYKERNELS_DISABLE_AVX512", "1")  # the user's switch comes first
    assert "PYKERNELS_DISABLE_AVX512=1" in _ext.set_wide_kernels(True) and _ext.cpu_kernels == BASE


def test_a_stale_library_without_a_slot_leaves_cs_own_kernels(restore_choice, monkeypatch):
    """A _C from before one of the wide entry points existed has no slot for it: _C's own kernels run, the reason
    says rebuild, and nothing raises (set_wide_kernels runs at import)."""
    if not _ext.loaded():
        pytest.skip(f"no _C: {_ext.load_error}")

    class Stale:
        @staticmethod
        def pykernels_set_wide_kernel(name, fn):
            return 1  # no slot of that name

    monkeypatch.setattr(_ext, "_main_library", lambda: Stale())
    why = _ext.set_wide_kernels(False)
    assert "could not be registered" in why and "rebuild" in why and _ext.cpu_kernels == BASE, why


def test_aten_cpu_capability_lowers_ours_with_torchs():
    if not CHOSEN:
        pytest.skip(f"the AVX-512 library is not in use here: {_ext.wide_error}")
    out = fresh_python("import pykernels; i = pykernels.build_info(); "
                       "print(i['cpu_kernels'], '|', i['cpu_kernels_note'])", ATEN_CPU_CAPABILITY="avx2")
    level, note = out.split(" | ")
    assert level == BASE and "ATEN_CPU_CAPABILITY" in note, out

"""Triton kernels compiled for real GPU targets (sm_80, sm_90) on a machine without a GPU: the interpreter is
more lenient than the compiler, so every kernel variant must also compile, without register spills."""
from __future__ import annotations

import textwrap

import pytest

from conftest import assert_spill_budget, run_script_compiled

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent('''
    import os, sys, json
    os.environ.pop("TRITON_INTERPRET", None)   # compile for real targets, not for the interpreter
    sys.path.insert(0, {root!r})
    from pykernels.triton import cross_entropy as k
    from pykernels.triton._compile import compile_for, spills
    out = []
    for arch in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            sig = {{"X": f"*{{dt}}", "TI": "*i64", "TP": f"*{{dt}}", "Wt": "*fp32", "Wsum": "*fp32",
                   "Scale": "*fp32", "Loss": "*fp32", "Lse": "*fp32", "LseErr": "*fp32", "LseIn": "*fp32",
                   "LseErrIn": "*fp32", "G": f"*{{dt}}",
                   "M": "i32", "C": "i32", "D": "i32", "sn": "i64", "sc": "i64", "sd": "i64", "tn": "i64",
                   "tc": "i64", "td": "i64", "scale_stride": "i32", "ignore_index": "i64", "eps": "fp32",
                   "zl": "fp32"}}
            for mode in (0, 1, 2):
                for prob in (False, True):
                    for flags in ((False, False, False, False), (True, True, True, True)):
                        c = compile_for(k._cross_entropy_kernel, sig,
                                        dict(MODE=mode, PROB=prob, HAS_W=flags[0], SMOOTH=flags[1],
                                             ZLOSS=flags[2], HAS_SCALE=flags[3], HAS_LSE_ERR=mode == 2,
                                             BLOCK=8192), arch, num_warps=16)
                        out.append(("ce", arch, dt, mode, prob, flags[0], spills(c), "ld.global" in c.asm["ptx"]))
            c = compile_for(k._scale_grad_kernel, {{"G": f"*{{dt}}", "Scale": "*fp32", "total": "i64", "CD": "i64",
                            "D": "i64"}}, dict(PER_ROW=False, BLOCK=4096), arch, num_warps=8)
            out.append(("scale", arch, dt, 0, False, False, spills(c), "ld.global" in c.asm["ptx"]))
    print(json.dumps(out))
''')


def _compile_all():
    return run_script_compiled(_SCRIPT)


# (kernel, arch, dtype, mode, probability targets, weighted) -> bytes (see conftest.assert_spill_budget)
CE_KNOWN_SPILLS = {("ce", 90, "fp16", 2, True, True): 4}


def test_cross_entropy_kernels_compile_for_sm80_and_sm90_without_spills():
    rows = _compile_all()
    assert len(rows) == 2 * 3 * (3 * 2 * 2 + 1)
    for name, arch, dt, mode, prob, weighted, n_spills, has_loads in rows:
        assert has_loads, (name, arch, dt, mode, prob)
        assert_spill_budget(f"{name} sm_{arch} {dt} mode={mode} prob={prob} weighted={weighted}", n_spills,
                            CE_KNOWN_SPILLS, (name, arch, dt, mode, prob, weighted))


_LAUNCHED = textwrap.dedent('''
    import os, re, sys, json
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, {root!r})
    from pykernels.triton import cross_entropy as k
    from pykernels.triton._compile import compile_for, spills
    out = []
    for arch in (80, 90):
        for dt, size in (("bf16", 2), ("fp32", 4)):
            block, warps = k._config(128256, size)
            # (N, C) logits as the launcher passes them, viewed (N, C, 1): D and the unit strides are constants
            sig = {{"X": f"*{{dt}}", "TI": "*i64", "TP": f"*{{dt}}", "Wt": "*fp32", "Wsum": "*fp32",
                   "Scale": "*fp32", "Loss": "*fp32", "Lse": "*fp32", "LseErr": "*fp32", "LseIn": "*fp32",
                   "LseErrIn": "*fp32", "G": f"*{{dt}}", "M": "i32", "C": "i32", "sn": "i64", "sc": "i64",
                   "sd": "i64", "tn": "i64",
                   "tc": "i64", "td": "i64", "scale_stride": "i32", "ignore_index": "i64", "eps": "fp32",
                   "zl": "fp32"}}
            div = [a for a, t in sig.items() if t.startswith("*")] + ["C", "sn"]  # 16-divisible: V = 128256
            for mode in (0, 1, 2):
                c = compile_for(k._cross_entropy_kernel, sig,
                                dict(D=1, MODE=mode, PROB=False, HAS_W=False, SMOOTH=False, ZLOSS=False,
                                     HAS_SCALE=False, HAS_LSE_ERR=mode == 2, BLOCK=block), arch, num_warps=warps,
                                unit=("sc", "sd"), divisible=div)
                ptx = c.asm["ptx"]
                out.append((arch, dt, mode, len(re.findall(r"ld\\.global[.a-z0-9]*\\.v4", ptx)),
                            len(re.findall(r"st\\.global[.a-z0-9]*\\.v4", ptx)), spills(c)))
    print(json.dumps(out))
''')


def test_cross_entropy_kernel_moves_16_bytes_an_access_as_launched():
    """The bandwidth-bound kernel, compiled as a launch on contiguous (N, V) logits with V = 128256 specialises it:
    its row loads (and the gradient's stores) are 16-byte vectors, without which it cannot reach the copy
    bandwidth. (V not divisible by 16 misaligns the rows: scalar accesses there, as in any row-wise kernel.)"""
    for arch, dt, mode, v4_loads, v4_stores, n_spills in run_script_compiled(_LAUNCHED):
        what = f"sm_{arch} {dt} mode={mode}"
        assert v4_loads > 0, f"{what}: no 16-byte loads"
        if mode != 0:  # (the forward writes no gradient)
            assert v4_stores > 0, f"{what}: no 16-byte gradient stores"
        assert_spill_budget(what, n_spills, {}, None)


_AUTOTUNERS = textwrap.dedent('''
    import os, sys, json
    os.environ.pop("TRITON_INTERPRET", None)   # the kernels as a GPU builds them (JITFunction, not interpreted)
    os.environ.pop("PYKERNELS_LCE_AUTOTUNE", None)
    sys.path.insert(0, {root!r})
    import torch
    from pykernels.triton import attention, linear_cross_entropy as lce
    lce._interpreted = lambda: False
    built = [(f"lce {{kind}} {{dt}}", lce._kernel(kind, torch.device("cuda", 0), dt)[0])
             for kind in ("fwd", "bwd") for dt in (torch.bfloat16, torch.float32)]
    built += [(f"attention {{kind}}", attention._tuned(kind)) for kind in attention._KERNELS]
    out = []
    for name, kernel in built:
        try:
            torch.library.wrap_triton(kernel)
            out.append((name, type(kernel).__name__, None))
        except RuntimeError as e:
            out.append((name, type(kernel).__name__, str(e)))
    print(json.dumps(out))
''')


def test_every_gpu_autotuner_is_accepted_by_wrap_triton():
    """Every launch goes through torch.library.wrap_triton, which refuses autotuners whose configs carry hooks; the
    interpreter's kernels pass it anyway, so the CPU tier must build the GPU's autotuners in a process without
    TRITON_INTERPRET. (A Config pre_hook on the linear cross-entropy's dlogits autotuner failed every GPU backward.)"""
    rows = run_script_compiled(_AUTOTUNERS)
    assert len(rows) == 4 + 3, rows
    for name, kind, err in rows:
        assert kind == "Autotuner" and err is None, (name, kind, err)


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_gpu_launch_glue_binds_every_kernel_argument(mode):
    """tests/gpu_glue_driver.py: every Triton launcher down its GPU branch (GPU tiles, the autotuners on, fake CUDA
    tensors of an H100), each launch's arguments bound as Triton binds them and its grid within CUDA's limits; in
    "compile" mode through torch's HOPifier, which refused the linear cross-entropy autotuner's Config pre_hook."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_glue_driver.py")
    p = subprocess.run([sys.executable, script, mode, "autotune"], capture_output=True, text=True, env=env,
                       timeout=600)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    cases = [line for line in lines if line.startswith(f"[{mode} autotune]")]
    assert len(cases) == 8 and all(line.endswith(": ok") for line in cases), "\n".join(lines) + p.stderr[-3000:]
    assert lines[-1].endswith("problems: 0"), "\n".join(lines)
    if mode == "eager":
        assert int(lines[-1].split()[2].rstrip(";")) > 1000, lines[-1]  # (every autotune config launched)


def test_launches_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every pykernels launch switches to its first CUDA tensor's
    device when that is another one (model parallelism in one process), and does nothing otherwise. Checked with
    fake CUDA tensors (no GPU here); the launch itself is a stub."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from pykernels.triton import _launch

    with FakeTensorMode():
        on1, on0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    cpu = torch.empty(2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    entered = []

    class Device:  # records torch.cuda.device(index) instead of touching a GPU
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    launched = []
    launcher = _launch._OnTensorsDevice({(1,): lambda *a, **k: launched.append(len(entered))})
    assert _launch.launch_device((cpu, 3, on1), {}) == 1
    assert _launch.launch_device((cpu, on0, on1), {}) is None  # the first CUDA tensor decides
    assert _launch.launch_device((cpu,), {"X": on1}) == 1
    assert _launch.launch_device((cpu, 2.0), {}) is None
    launcher[(1,)](cpu, on1)
    launcher[(1,)](on0)
    assert entered == [1] and launched == [1, 1]


@pytest.mark.gpu
def test_triton_kernels_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the Triton kernels run there and get torch's results."""
    import torch
    import torch.nn.functional as F
    import pykernels
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    x = torch.randn(9, 50, device="cuda:1", requires_grad=True)
    t = torch.randint(0, 50, (9,), device="cuda:1")
    with torch.cuda.device(0):
        loss = pykernels.functional.cross_entropy(x, t, backend="triton")
        loss.backward()
        q = torch.randn(1, 2, 33, 64, device="cuda:1", dtype=torch.float16)
        out = pykernels.functional.scaled_dot_product_attention(q, q, q, window=(4, 4), backend="triton")
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), attn_mask=(
        torch.arange(33, device="cuda:1")[:, None] - torch.arange(33, device="cuda:1")[None, :]).abs() <= 4)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)

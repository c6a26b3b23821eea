"""What ``import pykernels`` does and costs. Registering the Triton ops (torch.library.triton_op) imports
torch._inductor, over a second of every import; where no GPU can exist and the interpreter is off, the Triton backend
cannot run a single call, so the ops are not registered there and available_backends() says why."""
from __future__ import annotations

import glob
import importlib.machinery
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, fresh_python
from pykernels import backends

_OPS = ("attention", "cross_entropy", "linear_cross_entropy", "lstm")

_SCRIPT = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
import pykernels, pykernels.ops as ops
print(json.dumps({{"inductor": "torch._inductor" in sys.modules,
                  "errors": {{m: getattr(ops, m).triton_import_error for m in {_OPS!r}}},
                  "cpu": pykernels.available_backends("cpu"), "cuda": pykernels.available_backends("cuda")}}))
"""


def _import_without_interpreter(**extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYKERNELS_REGISTER_TRITON")}
    env.update(extra_env)
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine without a GPU")
def test_import_without_a_gpu_skips_the_triton_ops():
    pytest.importorskip("triton")
    out = _import_without_interpreter()
    if any(glob.glob(p) for p in backends._GPU_NODES) and torch.version.cuda is not None:
        pytest.skip("a GPU driver's device node exists here: the ops are registered (the GPU machine's case)")
    assert not out["inductor"], "import pykernels imported torch._inductor"
    for m, why in out["errors"].items():
        assert why and "Triton ops are not registered" in why and "TRITON_INTERPRET" in why, (m, why)
    assert out["cpu"]["triton"] == "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    assert out["cpu"]["cpu"] is None and out["cpu"]["reference"] is None
    assert out["cuda"]["triton"] == out["cuda"]["cuda"] == "no CUDA device here (torch.cuda.is_available() is False)"
    assert out["cuda"]["reference"] is None
    out = _import_without_interpreter(PYKERNELS_REGISTER_TRITON="1")  # the override registers them all the same
    assert out["errors"] == {m: None for m in _OPS} and out["inductor"]


@pytest.mark.gpu
def test_import_with_a_gpu_registers_the_triton_ops():
    pytest.importorskip("triton")
    out = _import_without_interpreter()
    assert out["errors"] == {m: None for m in _OPS}
    assert out["cuda"]["triton"] is None


def test_triton_kernel_modules_registers_wherever_a_call_could_run(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(backends, "_GPU_NODES", (str(tmp_path / "absent"),))
    mods, why = backends.triton_kernel_modules("cross_entropy")
    if sys.platform.startswith("linux"):
        assert mods is None and "this machine has no GPU" in why and str(tmp_path / "absent") in why
    monkeypatch.setattr(backends, "_GPU_NODES", (str(tmp_path),))  # a driver's node exists: register
    mods, why = backends.triton_kernel_modules("cross_entropy", "lstm")
    assert why is None and [m.__name__ for m in mods] == ["pykernels.triton.cross_entropy", "pykernels.triton.lstm"]
    monkeypatch.setattr(backends, "_GPU_NODES", (str(tmp_path / "nvidia*"),))  # patterns: /dev/nvidia0 alone
    (tmp_path / "nvidia0").touch()
    assert backends.triton_kernel_modules("cross_entropy")[1] is None
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    mods, why = backends.triton_kernel_modules("cross_entropy")
    assert mods is None and "torch is a CPU-only build" in why and "PYKERNELS_REGISTER_TRITON=1" in why
    monkeypatch.setenv("PYKERNELS_REGISTER_TRITON", "1")  # the user's override
    assert backends.triton_kernel_modules("cross_entropy")[1] is None
    monkeypatch.delenv("PYKERNELS_REGISTER_TRITON")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs them on CPU tensors: register
    mods, why = backends.triton_kernel_modules("cross_entropy")
    assert why is None and mods[0].__name__ == "pykernels.triton.cross_entropy"
    monkeypatch.setattr(backends, "_triton_import_errors", {})  # what the failure below records, then restored
    mods, why = backends.triton_kernel_modules("no_such_kernels")
    assert mods is None and why.startswith("ModuleNotFoundError")
    # triton imports but a kernel module does not: the backend is unusable, and available_backends() says why
    assert backends._triton_import_errors == {"pykernels.triton.no_such_kernels": why}
    reason = backends.available_backends("cpu")["triton"]
    assert reason and "pykernels.triton.no_such_kernels" in reason and why in reason, reason


def test_triton_kernels_that_fail_to_import_make_the_backend_unavailable(tmp_path):
    """A triton that imports but cannot load pykernels' kernel modules (here a stand-in without triton.language):
    available_backends() said triton was usable while every backend='triton' call raised. Said once at WARNING."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text('__version__ = "3.8.0"\n')
    script = f"""
import logging, sys
sys.path[:0] = [{str(tmp_path)!r}, {ROOT!r}]
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
import pykernels
print("TRITON", pykernels.available_backends("cpu")["triton"])
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (reason,) = [line for line in p.stdout.splitlines() if line.startswith("TRITON ")]
    assert "failed to import" in reason and "No module named 'triton.language'" in reason, reason
    assert "pykernels.triton.cross_entropy" in reason and "pykernels.triton.lstm" in reason, reason
    warnings = [line for line in p.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "its ops run without the triton backend" in warnings[0], p.stdout


def test_one_triton_module_failing_leaves_the_other_ops_their_kernels():
    """Only the ops of the module that failed lose Triton: a failed lstm_layer switched off cross_entropy's too."""
    script = f"""
import importlib.abc, sys
sys.path.insert(0, {ROOT!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pykernels.triton.lstm_layer":
            raise ImportError("simulated: a Triton without an API lstm_layer uses")
sys.meta_path.insert(0, Block())
import torch, pykernels
print("TRITON", pykernels.available_backends("cpu")["triton"])
pykernels.functional.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), backend="triton")
print("RAN", pykernels.last_dispatch["cross_entropy"][0])
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RAN triton" in p.stdout and "pykernels.triton.lstm_layer" in p.stdout, p.stdout


def test_dropout_mask_names_why_without_the_triton_ops(monkeypatch):
    from pykernels.ops import attention as ops
    monkeypatch.setattr(ops, "_mods", None)
    monkeypatch.setattr(ops, "triton_import_error", "the Triton ops are not registered: a reason")
    with pytest.raises(backends.BackendUnavailableError, match="dropout_mask runs the Triton kernel: the Triton ops"):
        ops.dropout_mask(torch.tensor([1]), 1, 1, 2, 2, 0.5)


def _load_error_of_a_copy(tmp_path, info, so) -> str:
    """available_backends('cpu')['cpu'] of a copy of the package's Python files with the given build record and an
    empty _C library file (so: True for this Python's name, or the file name)."""
    import shutil
    pkg = tmp_path / "pykernels"
    shutil.copytree(os.path.join(ROOT, "pykernels"), pkg, ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.json",
                                                                                        "__pycache__"))
    if info is not None:
        (pkg / "_build_info.json").write_text(info)
    if so:
        (pkg / (so if isinstance(so, str) else "_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import pykernels; "
              "assert pykernels.__file__.startswith(sys.path[0]); print(pykernels.available_backends('cpu')['cpu'])")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]  # never a failed import
    return p.stdout.strip().splitlines()[-1]


PY = sys.version.split()[0]
OTHER_MINOR = f"{sys.version_info.major}.{sys.version_info.minor - 1}.0"


@pytest.mark.parametrize("info,so,says", [
    (None, False, "not built"),
    (None, True, "has no _build_info.json"),
    ("[1]", True, "not a JSON object"),
    ("{", True, "unreadable"),
    (json.dumps({"torch_version": torch.__version__, "python": "2.7.18"}), True, "built for Python 2.7.18"),
    # another minor version of Python 3 (its ABI differs): refused by the record, not by a failed import
    (json.dumps({"torch_version": torch.__version__, "python": OTHER_MINOR}), True, f"built for Python {OTHER_MINOR}"),
    (json.dumps({"torch_version": "1.0.0", "python": PY}), True, "built for torch 1.0.0"),
    # the same torch release with another local tag (+cpu, +cu130) is not refused for its version: the load decides
    (json.dumps({"torch_version": torch.__version__.split("+")[0] + "+other", "python": PY}), True,
     "failed to load"),
    # a good record and a broken library: the import goes on and says why
    (json.dumps({"torch_version": torch.__version__, "python": PY}), True, "failed to load"),
    # the record without its library (deleted, half copied): said plainly, not Python's "circular import" text
    (json.dumps({"torch_version": torch.__version__, "python": PY}), False,
     "is not built: _build_info.json is there but no _C library"),
    # only another Python's library (a record without "python", as older builds wrote)
    (json.dumps({"torch_version": torch.__version__}), "_C.cpython-30-x86_64-linux-gnu.so",
     "is not built: _build_info.json is there but no _C library for this Python"),
])
def test_a_missing_or_mismatched_extension_is_named(tmp_path, info, so, says):
    why = _load_error_of_a_copy(tmp_path, info, so)
    assert says in why and ("rebuild" in why or "pip install" in why), why


def test_an_avx2_build_loads_on_an_avx2_cpu_whatever_aten_cpu_capability_says():
    """ATEN_CPU_CAPABILITY=default lowers the level torch dispatches its own kernels at, not the hardware: _ext asked
    torch.backends.cpu.get_cpu_capability(), which follows it, and refused the AVX2 build ("this CPU lacks it")."""
    from pykernels import _cpuinfo, _ext
    if not (_ext.loaded() and _ext.build_info.get("cpu_capability") == "avx2" and _cpuinfo.has_avx2()):
        pytest.skip("needs the extension built for AVX2, loaded on an AVX2 CPU")
    out = fresh_python("import pykernels; print(pykernels.available_backends('cpu')['cpu'])",
                       ATEN_CPU_CAPABILITY="default")
    assert out == "None", out


def test_avx512_needs_every_subset_the_wide_library_is_built_for(monkeypatch):
    """_C_avx512 is compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq: a CPU missing any of them gets _C's."""
    from pykernels import _cpuinfo
    monkeypatch.setattr(_cpuinfo.platform, "machine", lambda: "x86_64")
    full = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}
    monkeypatch.setattr(_cpuinfo, "_proc_cpuinfo_flags", lambda: full)
    assert _cpuinfo.has_avx512() is True
    for missing in ("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        monkeypatch.setattr(_cpuinfo, "_proc_cpuinfo_flags", lambda m=missing: full - {m})
        assert _cpuinfo.has_avx512() is False, missing


def test_avx2_check_reads_the_cpu_flags_first(monkeypatch):
    """The build uses -mavx2 -mfma: the kernel's flags must show both (a VM can mask FMA while torch's CPUID query,
    which asks for AVX2 alone, says yes); torch's query only where there is no /proc/cpuinfo."""
    from pykernels import _cpuinfo
    monkeypatch.setattr(_cpuinfo.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True, raising=False)
    for flags, has in (({"sse4_2", "avx2", "fma"}, True), ({"avx2"}, False), ({"avx", "fma"}, False)):
        monkeypatch.setattr(_cpuinfo, "_proc_cpuinfo_flags", lambda flags=flags: flags)
        assert _cpuinfo.has_avx2() is has, flags
    monkeypatch.setattr(_cpuinfo, "_proc_cpuinfo_flags", lambda: set())  # no /proc/cpuinfo: torch's answer
    assert _cpuinfo.has_avx2() is True
    monkeypatch.delattr(torch.cpu, "_is_avx2_supported")  # and a torch without the query
    assert _cpuinfo.has_avx2() is False
    monkeypatch.setattr(_cpuinfo.platform, "machine", lambda: "aarch64")
    assert _cpuinfo.has_avx2() is False


def test_without_any_kernel_automatic_calls_run_torchs_ops():
    """No kernel backend on the device (here the extension disabled): an automatic call torch can express runs
    torch's op, which beats the reference; said once at WARNING (not inside a compiled graph, where a logger call
    would break fullgraph); one torch cannot express runs the reference."""
    script = f"""
import sys, logging
sys.path.insert(0, {ROOT!r})
import torch, pykernels
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
x, t = torch.randn(1024, 1024, requires_grad=True), torch.randint(0, 1024, (1024,))
torch.compile(lambda a, b: pykernels.functional.cross_entropy(a, b), fullgraph=True)(x[:8, :16], t[:8] % 16)
for call in (lambda: pykernels.functional.cross_entropy(x, t),
             lambda: pykernels.nn.LSTM(8, 16)(torch.randn(4, 2, 8)),
             lambda: pykernels.functional.cross_entropy(x, t, z_loss=1e-3)):
    call()
ran = [pykernels.last_dispatch[op][0] for op in ("cross_entropy", "lstm")]
print("RAN", ran)
"""
    env = dict(os.environ, PYKERNELS_DISABLE_EXTENSION="1")
    env.pop("PYKERNELS_BACKEND", None)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RAN ['reference', 'torch']" in p.stdout  # the z_loss call last: torch cannot express it
    warnings = [line for line in p.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "PYKERNELS_DISABLE_EXTENSION" in warnings[0], p.stdout


def test_interpreter_switched_on_after_import_is_named():
    """TRITON_INTERPRET=1 set after an import that skipped the Triton ops: available_backends() says they are not
    registered (it said usable, while a call raised)."""
    script = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
import pykernels
os.environ["TRITON_INTERPRET"] = "1"
print(pykernels.available_backends("cpu")["triton"])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYKERNELS_REGISTER_TRITON")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    if any(glob.glob(g) for g in backends._GPU_NODES) and torch.version.cuda is not None:
        pytest.skip("a GPU driver's device node exists here: the ops are registered")
    assert "Triton ops are not registered" in p.stdout.strip().splitlines()[-1], p.stdout


def test_interpreter_switched_on_after_the_kernels_were_imported_is_named():
    """TRITON_INTERPRET=1 set after an import that registered the Triton ops in compiled mode
    (PYKERNELS_REGISTER_TRITON=1): triton.jit chose compiled kernels as it decorated them, so CPU calls cannot run
    them. available_backends() said usable and even a preference crashed inside Triton ("0 active drivers"); now the
    reason is named, a preference falls back and a backend="triton" request raises BackendUnavailableError."""
    pytest.importorskip("triton")
    script = f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
import pykernels
os.environ["TRITON_INTERPRET"] = "1"
print("AVAILABLE", pykernels.available_backends("cpu")["triton"])
x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
with pykernels.use_backend("triton"):
    pykernels.functional.cross_entropy(x, t)
ran, skipped = pykernels.last_dispatch["cross_entropy"]
print("RAN", ran, skipped.get("triton"))
try:
    pykernels.functional.cross_entropy(x, t, backend="triton")
except pykernels.BackendUnavailableError as e:
    print("REFUSED", e)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYKERNELS_BACKEND")}
    env["PYKERNELS_REGISTER_TRITON"] = "1"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    why = "TRITON_INTERPRET=1 was set after the Triton kernels were imported"
    lines = {line.split(" ", 1)[0]: line for line in p.stdout.splitlines()}
    assert why in lines.get("AVAILABLE", ""), p.stdout
    assert lines.get("RAN", "").startswith("RAN cpu ") and why in lines["RAN"], p.stdout
    assert why in lines.get("REFUSED", ""), p.stdout

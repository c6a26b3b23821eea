"""The compiled extension: it loads, matches the running torch, carries its CUDA kernels for the requested
architectures (when this torch is a CUDA build and nvcc exists), and those kernels do not spill."""
from __future__ import annotations

import functools
import glob
import json
import os
import platform
import re
import shutil
import subprocess

import pytest
import torch

import pykernels
from pykernels import _ext

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _so() -> str:
    """The built library; a failure when CI requires it, a skip for a user without a compiler."""
    files = [str(p) for p in _ext._libraries(this_python_only=True)]  # _C's, never _C_avx512's
    why = None if (files and _ext.loaded()) else (_ext.load_error or "pykernels._C is not built")
    if why:
        pytest.fail(why) if os.environ.get("PYKERNELS_REQUIRE_EXTENSION") == "1" else pytest.skip(why)
    return files[0]


def _release(tool) -> tuple:
    """(major, minor) of a CUDA tool's --version ("release 13.0"), (0, 0) if unknown."""
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@functools.lru_cache(maxsize=None)
def _cuobjdump():
    """The newest cuobjdump found (CUDA_HOME's, PATH's, Triton's bundled one), None if it is older than the nvcc
    that builds the binary: an older one misnames its ELF files (Triton 3.6's 12.8 lists nvcc 13's sm_90a cubins
    as sm_90)."""
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
             "/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    found = [c for c in dict.fromkeys(cands) if c and os.path.exists(c)]
    if not found:
        return None
    tool = max(found, key=_release)
    nvcc = _nvcc()
    return tool if nvcc is None or _release(tool) >= _release(nvcc) else None


def require_cuda_build() -> None:
    _so()
    if not pykernels.build_info().get("with_cuda"):
        pytest.skip("pykernels._C was built without CUDA kernels")


@functools.lru_cache(maxsize=None)
def _text_sections(tool: str, so: str) -> tuple:
    """(source file, mangled name, sm) of every function of the binary (cuobjdump --list-text: instant)."""
    p = subprocess.run([tool, "--list-text", so], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return tuple(re.findall(r"^SASS text section \d+ : ([^-\s]+)-(\S+)\.(sm_\w+)\.elf\.bin$", p.stdout, re.M))


@functools.lru_cache(maxsize=None)
def _functions(tool: str, so: str, sm: str, source: str):
    """(mangled name, SASS) of every function that ``source`` compiled for exactly ``sm``: its ELF is extracted and
    only it disassembled (the whole binary's SASS is ~60 MB an arch, ~12 s to dump); once per session."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cubin = f"{source}.{sm}.cubin"  # (the whole name: "attention.sm_90" alone would also extract its sm_90a)
        p = subprocess.run([tool, "--extract-elf", cubin, so], capture_output=True, text=True, cwd=tmp)
        assert p.returncode == 0 and os.path.exists(os.path.join(tmp, cubin)), (p.stdout + p.stderr)[-2000:]
        p = subprocess.run([tool, "--dump-sass", os.path.join(tmp, cubin)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    sections = re.split(r"\n\s*code for (sm_\w+)", p.stdout)
    text = "".join(body for arch, body in zip(sections[1::2], sections[2::2]) if arch == sm)
    return tuple((f.split("\n", 1)[0], f) for f in re.split(r"\n\s*Function : ", text)[1:])


def kernel_sass(kernels):
    """{sm: {kernel: [SASS of each instantiation]}} for every built arch: the functions of the binary whose mangled
    name contains one of ``kernels`` (skips without cuobjdump)."""
    require_cuda_build()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    out = {}
    so = _so()
    listed = _text_sections(tool, so)
    for arch in pykernels.build_info()["arch_list"]:
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        found = out.setdefault(sm, {})
        sources = sorted({src for src, name, s in listed if s == sm and any(k in name for k in kernels)})
        for name, f in (fn for src in sources for fn in _functions(tool, so, sm, src)):
            kern = next((k for k in kernels if k in name), None)
            if kern is not None:
                found.setdefault(kern, []).append(f)
    return out


def no_local_memory(sass: str) -> bool:
    """No LDL/STL: neither spills nor stack arrays."""
    return not re.search(r"\b(LDL|STL)\b", sass)


def sass_instructions(sass: str) -> list:
    """The instructions of one function's SASS in program order (predicate and operands, without the address)."""
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass)


def exp2_between_branches(sass: str) -> int:
    """The most exp2 (MUFU.EX2) instructions of one function's SASS that run with no branch (BRA) between them: a
    tile's whole softmax or loss code in one straight stretch, or the per-element branching it replaces."""
    best = run = 0
    for ins in sass_instructions(sass):
        if re.search(r"\bBRA\b", ins):
            best, run = max(best, run), 0
        elif "MUFU.EX2" in ins:
            run += 1
    return max(best, run)


def _nvcc():
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return cand if cand and os.path.exists(cand) else shutil.which("nvcc")


def test_build_info_written_for_this_torch():
    so = _so()
    path = os.path.join(os.path.dirname(so), "_build_info.json")
    assert os.path.exists(path), "setup.py's build_ext must write _build_info.json next to _C"
    with open(path) as f:
        info = json.load(f)
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["python"].rsplit(".", 1)[0] == platform.python_version().rsplit(".", 1)[0]
    assert isinstance(info["with_cuda"], bool) and info["built_at"]
    assert "-O3" in info["cxx_flags"] or "-O0" in info["cxx_flags"]
    if info["with_cuda"]:
        assert info["arch_list"], info
        # nvcc flags are global: fast math would also flush denormals and approximate logf and divisions everywhere
        assert "--use_fast_math" not in info["nvcc_flags"]
        assert any(f.startswith("-gencode=") for f in info["nvcc_flags"])


def test_extension_loads_and_matches_torch():
    _so()
    info = pykernels.build_info()
    assert info["loaded"], info["load_error"]
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    for op in ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_scale_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pykernels::{op}", "CPU")


def test_cpu_kernels_run_on_torch_openmp_threads():
    """The C++ CPU kernels parallelise with at::parallel_for, which torch's OpenMP backend inlines as `#pragma omp
    parallel`: without -fopenmp it compiles to a serial loop (as it did until 2026-12-04). The library must call
    into libgomp, and the process must hold one OpenMP runtime (torch's), not a second one of its own."""
    so = _so()
    with open(so, "rb") as f:
        assert b"GOMP_parallel" in f.read(), "the extension was compiled without OpenMP: its kernels run serially"
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            runtimes = {line.split()[-1] for line in f if re.search(r"lib(g|i)omp[^/]*\.so", line)}
        assert len({os.path.realpath(r) for r in runtimes}) <= 1, runtimes


def test_cuda_kernels_compiled_for_requested_arches_without_spills():
    _so()
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: no CUDA sources are compiled")
    if _nvcc() is None:
        pytest.skip("no nvcc: the CUDA sources cannot be compiled here")
    info = pykernels.build_info()
    if info.get("cuda_skipped"):
        pytest.skip("built with PYKERNELS_SKIP_CUDA_BUILD=1")
    assert info.get("with_cuda"), "torch is a CUDA build and nvcc exists, but _C was built without its CUDA kernels"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pykernels::cross_entropy_fwd", "CUDA")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to inspect the binary")
    elf = subprocess.run([tool, "--list-elf", _so()], capture_output=True, text=True, check=True).stdout
    for arch in info["arch_list"]:
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        assert sm in elf, f"{sm} missing from {elf}"
    res = subprocess.run([tool, "--dump-resource-usage", _so()], capture_output=True, text=True, check=True).stdout
    kernels = [line for line in res.splitlines() if "cross_entropy" in line or "scale_grad" in line]
    assert kernels, res[:2000]
    for block in res.split("Function ")[1:]:  # every kernel of ours: cross-entropy, LSTM cell, attention
        flat = block.replace(" ", "")
        assert "STACK:0" in flat and "LOCAL:0" in flat, f"local memory used: {block[:400]}"


def test_missing_extension_degrades_gracefully():
    assert _ext.loaded() or _ext.load_error
    code = ("import os; os.environ['PYKERNELS_DISABLE_EXTENSION']='1'; import pykernels, torch; "
            "b = pykernels.available_backends('cpu'); assert b['cpu'] and b['reference'] is None, b; "
            "x = torch.randn(3, 5, requires_grad=True); pykernels.functional.cross_entropy(x, torch.tensor([0, 1, 2]))"
            ".backward(); print(b['cpu']); "
            # torch's own linear cross-entropy where torch has one (it ran the reference, N x V logits and all)
            "f = pykernels.functional.linear_cross_entropy(x, torch.randn(7, 5), torch.tensor([0, 1, 2])); "
            "ran = pykernels.last_dispatch['linear_cross_entropy'][0]; "
            "assert ran == ('torch' if hasattr(torch.nn.functional, 'linear_cross_entropy') else 'reference'), ran")
    env = dict(os.environ)
    p = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "disabled" in p.stdout


def test_cuda_sources_are_cpp17_clean():
    """The GPU machines build the extension with their own torch (2.11), whose cpp_extension compiles .cu files as
    C++17; this machine's torch uses C++20. Every .cu file must pass nvcc's front end as C++17 with warnings as
    errors (a C++20-only construct, e.g. a lambda with template parameters, would otherwise only show up on the
    GPU machine, where build minutes are scarce). The device pass parses at -O0: the front end is the same, and
    cicc's optimiser made this test ~6x slower."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    assert sources
    procs = [(src, subprocess.Popen(
        [nvcc, "-std=c++17", "-Werror", "all-warnings", "-gencode=arch=compute_90a,code=compute_90a", "-cuda",
         "-Xcicc", "-O0", f"-I{CSRC}", src, "-o", os.devnull],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for src in sources]
    failed = {os.path.basename(src): p.communicate()[0][-1500:] for src, p in procs if p.wait() != 0}
    assert not failed, failed


def test_old_triton_interpreter_with_new_numpy_is_refused_with_the_reason(monkeypatch):
    """Triton < 3.7's interpreter converts 1-element arrays with int(), which numpy >= 2.4 refuses: the triton
    backend is then unavailable on CPU with that reason instead of failing inside every kernel."""
    import numpy
    import triton

    from pykernels import backends
    check = backends._interpreter_reason.__wrapped__
    for tv, nv, broken in (("3.6.0", "2.4.6", True), ("3.6.0", "2.3.1", False), ("3.7.0", "2.4.6", False),
                           ("3.8.0+git1234", "2.5.0", False), ("3.5.1", "2.4.0rc1", True)):
        monkeypatch.setattr(triton, "__version__", tv)
        monkeypatch.setattr(numpy, "__version__", nv)
        why = check()
        assert (why is not None) == broken, (tv, nv, why)
        if broken:
            assert tv in why and nv in why and "triton >= 3.7" in why


def test_cuda_backend_needs_code_for_the_gpu(monkeypatch):
    """The default build (8.0, 9.0, 9.0a; no PTX) has no code for a T4 (7.5), V100 (7.0) or Blackwell (10.0, 12.0):
    there the cuda backend must refuse with the reason, so automatic calls take the next backend, instead of
    failing at the launch with "no kernel image is available" (seen in review, 2026-12-06)."""
    from pykernels import backends
    monkeypatch.setitem(_ext.build_info, "arch_list", ["8.0", "9.0", "9.0a"])
    for cap, ok in (((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((7, 5), False),
                    ((7, 0), False), ((10, 0), False), ((12, 0), False)):
        assert (_ext.cuda_arch_reason(*cap) is None) == ok, cap
    assert "TORCH_CUDA_ARCH_LIST=10.0" in _ext.cuda_arch_reason(10, 0)
    assert "need compute capability 8.0 or newer" in _ext.cuda_arch_reason(7, 5)  # not "rebuild for 7.5"
    monkeypatch.setitem(_ext.build_info, "arch_list", ["7.5", "8.0"])
    assert "need compute capability 8.0" in _ext.cuda_arch_reason(7, 5)
    monkeypatch.setitem(_ext.build_info, "arch_list", ["8.0", "9.0", "9.0a"])
    monkeypatch.setitem(_ext.build_info, "arch_list", ["8.0", "9.0a", "9.0+PTX"])
    assert _ext.cuda_arch_reason(12, 0) is None and _ext.cuda_arch_reason(9, 0) is None
    assert _ext.cuda_arch_reason(7, 5) is not None
    monkeypatch.setitem(_ext.build_info, "arch_list", ["9.0a"])  # arch-specific code: that GPU only
    assert _ext.cuda_arch_reason(9, 0) is None and _ext.cuda_arch_reason(10, 0) is not None
    monkeypatch.setitem(_ext.build_info, "arch_list", ["9.0a+PTX"])  # ... its PTX too (sm_90a PTX needs sm_90)
    assert _ext.cuda_arch_reason(9, 0) is None
    assert _ext.cuda_arch_reason(10, 0) is not None and _ext.cuda_arch_reason(12, 0) is not None
    monkeypatch.setitem(_ext.build_info, "arch_list", ["sm_90", "8.0"])  # an entry it cannot read: the launch decides
    assert _ext.cuda_arch_reason(9, 0) is None
    # a build without its CUDA kernels has none, whatever its arch list
    monkeypatch.setitem(_ext.build_info, "with_cuda", False)
    assert _ext.has_cuda_kernels() is False
    monkeypatch.setitem(_ext.build_info, "with_cuda", True)
    assert _ext.has_cuda_kernels() is _ext.loaded()
    # the dispatch's view: a loaded CUDA build on a 7.5 GPU
    monkeypatch.setitem(_ext.build_info, "arch_list", ["8.0", "9.0", "9.0a"])
    monkeypatch.setattr(_ext, "loaded", lambda: True)
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 7.5" in backends._device_reason("cuda", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert backends._device_reason("cuda", torch.device("cuda")) is None


def test_sources_keep_the_build_light():
    """The 2-core CI builds everything: .cu files include no torch header (raw pointers), and every C++ file that
    reaches ATen (itself or through one of our headers) asks for per-operator headers with
    TORCH_ASSERT_ONLY_METHOD_OPERATORS before its first #include, which makes <ATen/ATen.h> an #error (it took
    ~35 s of each file's ~50 s)."""
    torch_header = re.compile(r"^\s*#\s*include\s*<(torch|ATen|c10)/", re.M)
    cu = glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))
    assert cu and not [f for f in cu if torch_header.search(open(f).read())]

    def reaches_torch(path, seen):
        text = open(path).read()
        if torch_header.search(text):
            return True
        for inc in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, re.M):
            dep = os.path.normpath(os.path.join(os.path.dirname(path), inc))
            if dep not in seen and os.path.exists(dep):
                seen.add(dep)
                if reaches_torch(dep, seen):
                    return True
        return False

    cpp = glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    guarded = 0
    for f in cpp:
        text = open(f).read()
        if reaches_torch(f, set()):
            first = re.search(r"^\s*#\s*include", text, re.M).start()
            guard = text.find("#define TORCH_ASSERT_ONLY_METHOD_OPERATORS")
            assert 0 <= guard < first, f"{f}: no TORCH_ASSERT_ONLY_METHOD_OPERATORS before the first #include"
            guarded += 1
    assert guarded >= 8, guarded

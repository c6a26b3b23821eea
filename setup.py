"""Builds pykernels._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found.

Install with `pip install --no-build-isolation -e .` so that _C is compiled against the torch you run.
Knobs: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, PYKERNELS_SKIP_CUDA_BUILD=1,
PYKERNELS_CPU_CAPABILITY=avx2|default (default: avx2 where this machine has it), CUDA_HOME, DEBUG=1.
On x86-64 it also builds pykernels._C_avx512 (csrc/cpu/avx512/: kernels compiled for AVX-512, whatever the build
machine has), which pykernels loads only on CPUs where torch dispatches at AVX512.
"""
from __future__ import annotations

import datetime
import glob
import importlib.util
import json
import os
import platform
import sys

# PyTorch guesses CUDA_HOME from the nvcc on PATH and may pick /usr/local, where linking fails
# (TOOLCHAIN.md): prefer the toolkit's standard location. Must happen before cpp_extension is imported.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG") == "1"


SKIP_CUDA = os.environ.get("PYKERNELS_SKIP_CUDA_BUILD") == "1"


def _with_cuda() -> bool:
    if SKIP_CUDA:
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and \
        os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


# Hopper-only kernels (wgmma, setmaxnreg, TMA multicast) go in files matching this pattern; when any exists and
# 9.0 is requested, the build also emits sm_90a code (those instructions do not exist in plain sm_90). The
# kernels guard their bodies with __CUDA_ARCH_FEAT_SM90_ALL so the other targets compile to empty stubs.
HOPPER_ONLY_SOURCES = "csrc/cuda/*_sm90a.cu"


def _arch_list() -> list[str]:
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = [a.strip() for a in raw.replace(" ", ";").split(";") if a.strip()]
    bare = [a.replace("+PTX", "") for a in archs]
    if glob.glob(HOPPER_ONLY_SOURCES) and "9.0" in bare and "9.0a" not in bare:
        archs.append("9.0a")
    return archs


def _gencode(archs: list[str]) -> list[str]:
    """Explicit -gencode pairs ("9.0a" -> sm_90a); "+PTX" also embeds PTX for forward compatibility."""
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _load_cpuinfo():
    """pykernels/_cpuinfo.py, by its path: importing the package would import what is being built."""
    path = os.path.join(ROOT, "pykernels", "_cpuinfo.py")
    spec = importlib.util.spec_from_file_location("_pykernels_cpuinfo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_capability() -> str:
    """AVX2 when the build machine has it (at::vec then uses 256-bit vectors instead of its scalar fallback).
    _ext refuses to load an AVX2 build on a CPU without AVX2 (the same check) rather than die of an illegal
    instruction."""
    if os.environ.get("PYKERNELS_CPU_CAPABILITY"):
        return os.environ["PYKERNELS_CPU_CAPABILITY"]
    return "avx2" if _load_cpuinfo().has_avx2() else "default"


def _cpu_capability_flags() -> list[str]:
    if _cpu_capability() == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


# csrc/cpu/avx512/ compiled as at::vec's AVX512 capability (512-bit Vectorized, in namespace at::vec::AVX512).
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512",
                "-Wno-maybe-uninitialized", "-Wno-uninitialized"]  # (GCC 12 flags its own avx512fintrin.h)


def _wide_cpu_libraries() -> list[str]:
    """The ISA-specific CPU libraries built besides _C: AVX-512 on x86-64 (any GCC or Clang compiles it there)."""
    return ["avx512"] if platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix" else []


def _sources(with_cuda: bool) -> list[str]:
    src = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        src += sorted(glob.glob("csrc/cuda/*.cu"))
    return src


OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
# C++ flags of every library. The C++ standard is the one torch asks for (C++20 for torch >= 2.13); torch's vec
# headers use #pragma unroll. -fopenmp: torch's OpenMP backend inlines at::parallel_for as `#pragma omp parallel`,
# which a translation unit compiled without OpenMP ignores: every CPU kernel ran on one thread until 2026-12-04. The
# link's libgomp.so.1 is the copy torch has already loaded (same soname): one OpenMP runtime, torch's thread count.
CXX = OPT + ["-fvisibility=hidden", "-Wno-unknown-pragmas", "-fopenmp"]
LINK = ["-fopenmp"]


def _extension():
    with_cuda = _with_cuda()
    cxx = CXX + _cpu_capability_flags()
    if not with_cuda:
        return cpp_extension.CppExtension("pykernels._C", _sources(False), extra_compile_args={"cxx": cxx},
                                          extra_link_args=LINK), with_cuda
    cxx.append("-DPYKERNELS_WITH_CUDA")
    nvcc = OPT + ["-lineinfo", "--expt-relaxed-constexpr", "-DPYKERNELS_WITH_CUDA",
                  f"--threads={os.environ.get('NVCC_THREADS', '1')}"] + _gencode(_arch_list())
    return cpp_extension.CUDAExtension("pykernels._C", _sources(True), extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=LINK), with_cuda


def _wide_extensions() -> list:
    """pykernels._C_<isa>: a plain shared library of the kernels in csrc/cpu/<isa>/ with C entry points, loaded by
    pykernels/_ext.py through ctypes (RTLD_LOCAL: the AVX-512 copies of inline torch and std functions it holds
    never replace anyone else's). Not a Python module: it has no PyInit."""
    flags = {"avx512": AVX512_FLAGS}
    return [cpp_extension.CppExtension(f"pykernels._C_{isa}", sorted(glob.glob(f"csrc/cpu/{isa}/*.cpp")),
                                       extra_compile_args={"cxx": CXX + flags[isa]}, extra_link_args=LINK)
            for isa in _wide_cpu_libraries() if glob.glob(f"csrc/cpu/{isa}/*.cpp")]


EXTENSION, WITH_CUDA = _extension()
WIDE_EXTENSIONS = _wide_extensions()


class BuildExt(cpp_extension.BuildExtension):
    """Writes pykernels/_build_info.json next to the library: what _C was built for, read at import time. The library
    goes to build_lib (the wheel's tree), and with inplace also to the checkout: `setup.py build_ext --inplace`,
    `setup.py develop`, and `pip install -e .`, whose editable_wheel sets build_ext's editable_mode, which turns
    inplace on (setuptools >= 64). A checkout's record must describe the checkout's library, never a wheel's."""

    def initialize_options(self):
        super().initialize_options()
        self.failed_wide = set()  # names of the wide libraries that did not build

    def build_extension(self, ext):
        """A wide library is optional: where it fails to build (a compiler or assembler without AVX-512), the build
        goes on without it and _C's own CPU kernels serve (the record lists only the wide libraries built)."""
        if ext not in WIDE_EXTENSIONS:
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - whatever the compiler's failure, _C stands without it
            self.failed_wide.add(ext.name)
            print(f"WARNING: {ext.name} was not built ({e}); pykernels' CPU kernels will run as built into _C",
                  file=sys.stderr)

    def build_extensions(self):
        super().build_extensions()
        # what failed is no output: not copied into the checkout (inplace), not listed for a wheel or editable install
        self.extensions = [e for e in self.extensions if e.name not in self.failed_wide]

    def run(self):
        super().run()
        info = {
            "torch_version": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "with_cuda": WITH_CUDA,
            "cuda_skipped": SKIP_CUDA,
            "cuda_home": cpp_extension.CUDA_HOME if WITH_CUDA else None,
            "arch_list": _arch_list() if WITH_CUDA else [],
            "python": platform.python_version(),
            "cpu_capability": _cpu_capability(),
            "wide_cpu_libraries": [e.name.rsplit("_", 1)[-1] for e in WIDE_EXTENSIONS
                                   if e.name not in self.failed_wide],
            "cxx_flags": EXTENSION.extra_compile_args.get("cxx"),
            "nvcc_flags": EXTENSION.extra_compile_args.get("nvcc"),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        targets = {os.path.join(self.build_lib, "pykernels")}
        if self.inplace:
            targets.add(os.path.join(ROOT, "pykernels"))
        for target in targets:
            if os.path.isdir(target):
                with open(os.path.join(target, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=1)


# Project metadata, dependencies and packages live in pyproject.toml; only the extension is described here.
setup(
    ext_modules=[EXTENSION] + WIDE_EXTENSIONS,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)

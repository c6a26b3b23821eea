"""Whether this machine's CPU has AVX2 (with FMA): the hardware, asked by setup.py (whether to build _C for AVX2) and
by _ext (whether an AVX2 build may load here). Not torch.backends.cpu.get_cpu_capability(): that is the level torch
dispatches its own kernels at, which ATEN_CPU_CAPABILITY lowers on any CPU. setup.py loads this file by its path,
before pykernels can be imported: it must import nothing from pykernels."""
from __future__ import annotations

import platform


def _proc_cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[-1].split()}
    except OSError:
        return set()


def has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        import torch
        # CPUID through torch's cpuinfo; it asks for AVX2 alone, but the x86 CPUs with AVX2 also have FMA3.
        return bool(torch.cpu._is_avx2_supported())
    except (ImportError, AttributeError, RuntimeError):
        flags = _proc_cpuinfo_flags()
        return "avx2" in flags and "fma" in flags
